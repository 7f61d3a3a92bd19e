//! CIFAR-10 binary batches (`cifar-10-batches-bin`): records of one label
//! byte and 3072 pixel bytes (the red plane, then green, then blue, 32×32
//! each, row-major), which is already the CHW layout a [`super::Dataset`]
//! keeps.

use std::path::{Path, PathBuf};

use super::{check_dir, read_file, RawData, Split};
use crate::error::{Error, Result};

/// Image side of CIFAR-10.
pub const SIDE: usize = 32;
/// Pixel bytes of one record (3 planes of 32×32).
pub const IMAGE_BYTES: usize = 3 * SIDE * SIDE;
/// Bytes of one record (label + pixels).
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// Number of classes.
pub const NUM_CLASSES: usize = 10;
/// The class names used when `batches.meta.txt` is absent.
pub const CLASSES: [&str; NUM_CLASSES] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The batch files of a split, in order.
pub fn file_names(split: Split) -> Vec<String> {
    match split {
        Split::Train => (1..=5).map(|k| format!("data_batch_{k}.bin")).collect(),
        Split::Test => vec!["test_batch.bin".to_string()],
    }
}

/// Parses one batch file's bytes: appends pixels and labels.
fn parse_batch(
    path: &Path,
    bytes: &[u8],
    images: &mut Vec<u8>,
    labels: &mut Vec<usize>,
) -> Result<()> {
    if bytes.is_empty() {
        return Err(Error::format(path, "empty file, expected CIFAR-10 records"));
    }
    if !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(Error::format(
            path,
            format!(
                "truncated: {} bytes is not a whole number of {RECORD_BYTES}-byte CIFAR-10 records ({} whole, {} bytes over)",
                bytes.len(),
                bytes.len() / RECORD_BYTES,
                bytes.len() % RECORD_BYTES
            ),
        ));
    }
    images.reserve(bytes.len() / RECORD_BYTES * IMAGE_BYTES);
    for (i, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = rec[0] as usize;
        if label >= NUM_CLASSES {
            return Err(Error::format(
                path,
                format!("label {label} of record {i} is out of range (0..{NUM_CLASSES})"),
            ));
        }
        labels.push(label);
        images.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

/// Class names from `batches.meta.txt` (one per line, blank lines ignored).
fn read_meta(path: &Path) -> Result<Vec<String>> {
    let bytes = read_file(path)?;
    let text = String::from_utf8(bytes).map_err(|_| Error::format(path, "not UTF-8 text"))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != NUM_CLASSES {
        return Err(Error::format(
            path,
            format!(
                "{} class names, expected {NUM_CLASSES} (one per line)",
                names.len()
            ),
        ));
    }
    Ok(names)
}

/// The folder holding the batches: `dir` itself, or `dir/cifar-10-batches-bin`
/// when only that one has them.
fn batches_dir(dir: &Path, split: Split) -> PathBuf {
    let first = &file_names(split)[0];
    let inner = dir.join("cifar-10-batches-bin");
    if !dir.join(first).exists() && inner.join(first).exists() {
        inner
    } else {
        dir.to_path_buf()
    }
}

/// Loads one split of a `cifar-10-batches-bin` folder.
pub(crate) fn load_dir(dir: &Path, split: Split) -> Result<RawData> {
    check_dir(dir, "CIFAR-10 binary batches", "")?;
    let dir = batches_dir(dir, split);
    let names = file_names(split);
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(Error::format(
            missing,
            format!(
                "missing: the CIFAR-10 {split} split needs {} in {}",
                names.join(", "),
                dir.display()
            ),
        ));
    }
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for p in &paths {
        let bytes = read_file(p)?;
        parse_batch(p, &bytes, &mut images, &mut labels)?;
    }
    let meta = dir.join("batches.meta.txt");
    let class_names = if meta.is_file() {
        read_meta(&meta)?
    } else {
        CLASSES.iter().map(|s| s.to_string()).collect()
    };
    Ok(RawData {
        shape: [3, SIDE, SIDE],
        class_names,
        images,
        labels,
    })
}

/// Encodes images (CHW, 3×32×32 each) and labels as one CIFAR-10 batch file
/// (for building fixtures).
pub fn encode_batch(labels: &[u8], images: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(labels.len() * RECORD_BYTES);
    for (l, img) in labels.iter().zip(images.chunks_exact(IMAGE_BYTES)) {
        out.push(*l);
        out.extend_from_slice(img);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load, DataKind, DataSpec};

    /// Image `k`: red plane `k`, green plane `100 + k`, blue = column index,
    /// so each plane is recognisable.
    fn image(k: u8) -> Vec<u8> {
        let mut v = vec![k; SIDE * SIDE];
        v.extend(vec![100 + k; SIDE * SIDE]);
        v.extend((0..SIDE * SIDE).map(|i| (i % SIDE) as u8));
        v
    }

    fn write_test_split(dir: &Path, labels: &[u8]) -> Vec<u8> {
        let images: Vec<u8> = (0..labels.len() as u8).flat_map(image).collect();
        std::fs::write(dir.join("test_batch.bin"), encode_batch(labels, &images)).unwrap();
        images
    }

    #[test]
    fn planes_land_in_place() {
        let t = tempfile::tempdir().unwrap();
        write_test_split(t.path(), &[3, 7]);
        let spec = DataSpec::new(DataKind::Cifar10, t.path());
        let ds = load(&spec, Split::Test, Some([3, 32, 32])).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.labels(), &[3, 7]);
        assert_eq!(ds.class_names()[3], "cat");
        let x = ds.image(1);
        assert_eq!(x.shape(), &[3, 32, 32]);
        let at = |c: usize, y: usize, xx: usize| x.data()[(c * SIDE + y) * SIDE + xx];
        // Red plane of image 1 is 1, green 101, blue the column.
        assert_eq!(at(0, 5, 9), 1.0 / 255.0);
        assert_eq!(at(1, 31, 0), 101.0 / 255.0);
        assert_eq!(at(2, 17, 30), 30.0 / 255.0);
        assert_eq!(ds.image_u8(0)[..SIDE * SIDE], vec![0u8; SIDE * SIDE][..]);
    }

    #[test]
    fn train_reads_five_batches_in_order_from_parent_dir() {
        let t = tempfile::tempdir().unwrap();
        let inner = t.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&inner).unwrap();
        for k in 1..=5u8 {
            let bytes = encode_batch(&[k, k - 1], &[image(k), image(k)].concat());
            std::fs::write(inner.join(format!("data_batch_{k}.bin")), bytes).unwrap();
        }
        let raw = load_dir(t.path(), Split::Train).unwrap();
        assert_eq!(raw.labels, vec![1, 0, 2, 1, 3, 2, 4, 3, 5, 4]);
        assert_eq!(raw.images.len(), 10 * IMAGE_BYTES);
        assert_eq!(raw.images[4 * IMAGE_BYTES], 3);
    }

    #[test]
    fn meta_names_used_when_present() {
        let t = tempfile::tempdir().unwrap();
        write_test_split(t.path(), &[0]);
        let names: Vec<String> = (0..10).map(|k| format!("c{k}")).collect();
        std::fs::write(t.path().join("batches.meta.txt"), names.join("\n") + "\n\n").unwrap();
        let raw = load_dir(t.path(), Split::Test).unwrap();
        assert_eq!(raw.class_names, names);
        std::fs::write(t.path().join("batches.meta.txt"), "a\nb\n").unwrap();
        let e = load_dir(t.path(), Split::Test).err().unwrap().to_string();
        assert!(
            e.contains("batches.meta.txt") && e.contains("2 class names"),
            "{e}"
        );
    }

    #[test]
    fn truncated_batch_names_file() {
        let t = tempfile::tempdir().unwrap();
        let images: Vec<u8> = [image(0), image(1)].concat();
        let mut bytes = encode_batch(&[0, 1], &images);
        bytes.truncate(bytes.len() - 100);
        let p = t.path().join("test_batch.bin");
        std::fs::write(&p, bytes).unwrap();
        let e = load_dir(t.path(), Split::Test).err().unwrap().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("truncated") && e.contains("1 whole"), "{e}");
        std::fs::write(&p, b"").unwrap();
        let e = load_dir(t.path(), Split::Test).err().unwrap().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("empty"),
            "{e}"
        );
    }

    #[test]
    fn bad_label_names_file() {
        let t = tempfile::tempdir().unwrap();
        write_test_split(t.path(), &[1, 10]);
        let p = t.path().join("test_batch.bin");
        let e = load_dir(t.path(), Split::Test).err().unwrap().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("label 10 of record 1"), "{e}");
    }

    #[test]
    fn missing_batch_names_it_and_the_set() {
        let t = tempfile::tempdir().unwrap();
        for k in [1, 2, 4, 5] {
            std::fs::write(
                t.path().join(format!("data_batch_{k}.bin")),
                encode_batch(&[0], &image(0)),
            )
            .unwrap();
        }
        let e = load_dir(t.path(), Split::Train).err().unwrap().to_string();
        let p = t.path().join("data_batch_3.bin");
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("data_batch_1.bin, data_batch_2.bin"), "{e}");
    }

    #[test]
    fn shape_mismatch_names_spec_and_both_shapes() {
        let t = tempfile::tempdir().unwrap();
        write_test_split(t.path(), &[0]);
        let spec = DataSpec::new(DataKind::Cifar10, t.path());
        let e = load(&spec, Split::Test, Some([1, 28, 28]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&spec.to_string()), "{e}");
        assert!(
            e.contains("[3, 32, 32]") && e.contains("[1, 28, 28]"),
            "{e}"
        );
        assert!(e.contains("--data"), "{e}");
    }
}
