//! IDX files, the format of MNIST and Fashion-MNIST: a big-endian header
//! (magic `0x00000803` and dims n, rows, cols for images; `0x00000801` and n
//! for labels) followed by one byte per pixel or label. Each file may be plain
//! or gzipped (normally named `.gz`; gzip is recognised by content).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::{check_dir, read_file, DataKind, RawData, Split};
use crate::error::{Error, Result};

/// Magic number of an IDX file of `u8` images (3 dimensions).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of `u8` labels (1 dimension).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Fashion-MNIST's class names, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Number of classes of MNIST and Fashion-MNIST.
pub const NUM_CLASSES: usize = 10;

/// The file stems of a split: (images, labels).
pub fn file_stems(split: Split) -> (&'static str, &'static str) {
    match split {
        Split::Train => ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        Split::Test => ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
}

/// The file `dir/stem` or, failing that, `dir/stem.gz`; an error naming
/// both when neither exists.
pub fn find_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    let plain = dir.join(stem);
    let gz = dir.join(format!("{stem}.gz"));
    for p in [&plain, &gz] {
        if p.is_file() {
            return Ok(p.clone());
        }
    }
    Err(Error::format(
        &plain,
        format!(
            "missing: looked for {} and {}",
            plain.display(),
            gz.display()
        ),
    ))
}

/// The contents of a file, gunzipped when it holds gzip data (told by its
/// first two bytes, `1f 8b`, so the file name does not matter; an IDX file
/// starts with `00 00`).
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_file(path)?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        // IDX data compresses about 4:1 to 8:1; reserve for the common case.
        let mut out = Vec::with_capacity(bytes.len().saturating_mul(4));
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("cannot decompress gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Reads the big-endian `u32` number `k` of a header.
fn header_u32(bytes: &[u8], k: usize) -> u32 {
    let b = &bytes[4 * k..4 * k + 4];
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Checks a header's magic number and length; returns its dims.
fn parse_header(path: &Path, bytes: &[u8], magic: u32, what: &str) -> Result<Vec<usize>> {
    let ndim = (magic & 0xff) as usize;
    let header_len = 4 * (1 + ndim);
    if bytes.len() < 4 {
        return Err(Error::format(
            path,
            format!(
                "truncated: {} bytes, too short for an IDX header",
                bytes.len()
            ),
        ));
    }
    let found = header_u32(bytes, 0);
    if found != magic {
        let hint = match found {
            IMAGES_MAGIC => " (this is an IDX images file)",
            LABELS_MAGIC => " (this is an IDX labels file)",
            _ => "",
        };
        return Err(Error::format(
            path,
            format!(
                "wrong magic number 0x{found:08x} for IDX {what}, expected 0x{magic:08x}{hint}"
            ),
        ));
    }
    if bytes.len() < header_len {
        return Err(Error::format(
            path,
            format!(
                "truncated: {} bytes, the IDX {what} header alone needs {header_len}",
                bytes.len()
            ),
        ));
    }
    Ok((1..=ndim).map(|k| header_u32(bytes, k) as usize).collect())
}

/// Checks that the body after the header holds exactly `expected` bytes.
fn check_body(path: &Path, body: usize, expected: usize, what: &str) -> Result<()> {
    if body < expected {
        Err(Error::format(
            path,
            format!("truncated: the header promises {what} ({expected} bytes) but only {body} bytes follow"),
        ))
    } else if body > expected {
        Err(Error::format(
            path,
            format!(
                "{} bytes after the {what} the header promises ({expected} bytes)",
                body - expected
            ),
        ))
    } else {
        Ok(())
    }
}

/// An IDX images file (plain or `.gz`): `(n, rows, cols, pixels)`, pixels
/// row-major, images one after another.
pub fn read_images(path: &Path) -> Result<(usize, usize, usize, Vec<u8>)> {
    let mut bytes = read_maybe_gz(path)?;
    let dims = parse_header(path, &bytes, IMAGES_MAGIC, "images")?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(Error::format(
            path,
            format!("images of {rows}×{cols} pixels"),
        ));
    }
    let expected = n
        .checked_mul(rows)
        .and_then(|x| x.checked_mul(cols))
        .unwrap_or(usize::MAX);
    let header_len = 16;
    check_body(
        path,
        bytes.len() - header_len,
        expected,
        &format!("{n} images of {rows}×{cols}"),
    )?;
    bytes.drain(..header_len);
    Ok((n, rows, cols, bytes))
}

/// An IDX labels file (plain or `.gz`): one byte per label.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = read_maybe_gz(path)?;
    let dims = parse_header(path, &bytes, LABELS_MAGIC, "labels")?;
    let n = dims[0];
    let header_len = 8;
    check_body(path, bytes.len() - header_len, n, &format!("{n} labels"))?;
    bytes.drain(..header_len);
    Ok(bytes)
}

/// Loads one split of an MNIST-style folder.
pub(crate) fn load_dir(kind: DataKind, dir: &Path, split: Split) -> Result<RawData> {
    let hint = if kind == DataKind::FashionMnist {
        "; install Debian's dataset-fashion-mnist package or give fashion-mnist:DIR"
    } else {
        ""
    };
    check_dir(dir, &format!("{kind} data"), hint)?;
    let (img_stem, lab_stem) = file_stems(split);
    let img_path = find_file(dir, img_stem)?;
    let lab_path = find_file(dir, lab_stem)?;
    let (n, rows, cols, images) = read_images(&img_path)?;
    let labels = read_labels(&lab_path)?;
    if labels.len() != n {
        return Err(Error::format(
            &lab_path,
            format!(
                "{} labels but {} has {n} images",
                labels.len(),
                img_path.display()
            ),
        ));
    }
    if let Some((i, l)) = labels
        .iter()
        .enumerate()
        .find(|(_, l)| **l as usize >= NUM_CLASSES)
    {
        return Err(Error::format(
            &lab_path,
            format!("label {l} of image {i} is out of range (0..{NUM_CLASSES})"),
        ));
    }
    let class_names = match kind {
        DataKind::FashionMnist => FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        _ => (0..NUM_CLASSES).map(|c| c.to_string()).collect(),
    };
    Ok(RawData {
        shape: [1, rows, cols],
        class_names,
        images,
        labels: labels.into_iter().map(usize::from).collect(),
    })
}

/// Encodes `n` images of `rows × cols` as an IDX images file.
pub fn encode_images(rows: usize, cols: usize, pixels: &[u8]) -> Vec<u8> {
    let n = pixels.len() / (rows * cols).max(1);
    let mut out = Vec::with_capacity(16 + pixels.len());
    for v in [IMAGES_MAGIC, n as u32, rows as u32, cols as u32] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(pixels);
    out
}

/// Encodes labels as an IDX labels file.
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    for v in [LABELS_MAGIC, labels.len() as u32] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(labels);
    out
}

/// Writes `bytes` to `path`, gzipped when the name ends in `.gz` (for
/// building small IDX fixtures).
pub fn write_maybe_gz(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| Error::io(path, e);
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
    {
        let f = std::fs::File::create(path).map_err(io)?;
        let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        enc.write_all(bytes).map_err(io)?;
        enc.finish().map_err(io)?;
        Ok(())
    } else {
        std::fs::write(path, bytes).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        write_maybe_gz(&p, bytes).unwrap();
        p
    }

    /// Writes a consistent split: 3 images of 2×3 and labels 0, 9, 4.
    fn write_split(dir: &Path, stems: (&str, &str), gz: bool) -> Vec<u8> {
        let pixels: Vec<u8> = (0..18).map(|v| v * 10).collect();
        let ext = if gz { ".gz" } else { "" };
        write(
            dir,
            &format!("{}{ext}", stems.0),
            &encode_images(2, 3, &pixels),
        );
        write(
            dir,
            &format!("{}{ext}", stems.1),
            &encode_labels(&[0, 9, 4]),
        );
        pixels
    }

    fn err_text(r: Result<RawData>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn round_trip_plain_and_gz() {
        for gz in [false, true] {
            let t = tempfile::tempdir().unwrap();
            let pixels = write_split(t.path(), file_stems(Split::Test), gz);
            let raw = load_dir(DataKind::Mnist, t.path(), Split::Test).unwrap();
            assert_eq!(raw.shape, [1, 2, 3], "gz={gz}");
            assert_eq!(raw.images, pixels, "gz={gz}");
            assert_eq!(raw.labels, vec![0, 9, 4], "gz={gz}");
            if gz {
                let stem = file_stems(Split::Test).0;
                let bytes = std::fs::read(t.path().join(format!("{stem}.gz"))).unwrap();
                assert_eq!(&bytes[..2], &[0x1f, 0x8b], "really gzipped");
            }
            assert_eq!(raw.class_names[9], "9");
            // The train split is looked for under its own names.
            let e = err_text(load_dir(DataKind::Mnist, t.path(), Split::Train));
            assert!(e.contains("train-images-idx3-ubyte"), "{e}");
        }
    }

    #[test]
    fn fashion_names_and_train_names() {
        let t = tempfile::tempdir().unwrap();
        write_split(t.path(), file_stems(Split::Train), true);
        let raw = load_dir(DataKind::FashionMnist, t.path(), Split::Train).unwrap();
        assert_eq!(raw.class_names[0], "T-shirt/top");
        assert_eq!(raw.class_names[9], "Ankle boot");
    }

    #[test]
    fn missing_file_names_both_candidates() {
        let t = tempfile::tempdir().unwrap();
        let (img, lab) = file_stems(Split::Test);
        write(t.path(), img, &encode_images(2, 2, &[0; 4]));
        let e = err_text(load_dir(DataKind::Mnist, t.path(), Split::Test));
        let plain = t.path().join(lab);
        assert!(e.contains(&plain.display().to_string()), "{e}");
        assert!(e.contains(&format!("{}.gz", plain.display())), "{e}");
    }

    #[test]
    fn missing_directory_is_named() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("nope");
        let e = err_text(load_dir(DataKind::FashionMnist, &d, Split::Test));
        assert!(e.contains(&d.display().to_string()), "{e}");
        assert!(e.contains("dataset-fashion-mnist"), "{e}");
    }

    #[test]
    fn wrong_magic_names_file() {
        let t = tempfile::tempdir().unwrap();
        let (img, lab) = file_stems(Split::Test);
        // Labels written where the images belong.
        let p = write(t.path(), img, &encode_labels(&[1, 2]));
        write(t.path(), lab, &encode_labels(&[1, 2]));
        let e = err_text(load_dir(DataKind::Mnist, t.path(), Split::Test));
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("magic"), "{e}");
        assert!(e.contains("labels file"), "{e}");
    }

    #[test]
    fn gzip_is_told_by_content_not_name() {
        let t = tempfile::tempdir().unwrap();
        let gz = t.path().join("x.gz");
        write_maybe_gz(&gz, &encode_images(1, 1, &[7, 8])).unwrap();
        let plain_name = t.path().join("images");
        std::fs::rename(&gz, &plain_name).unwrap();
        assert_eq!(read_images(&plain_name).unwrap(), (2, 1, 1, vec![7, 8]));
        let gz_name = t.path().join("labels.gz");
        std::fs::write(&gz_name, encode_labels(&[3])).unwrap();
        assert_eq!(read_labels(&gz_name).unwrap(), vec![3]);
    }

    #[test]
    fn truncated_images_names_file() {
        for gz in [false, true] {
            let t = tempfile::tempdir().unwrap();
            let (img, lab) = file_stems(Split::Test);
            let ext = if gz { ".gz" } else { "" };
            let mut bytes = encode_images(2, 3, &[5; 18]);
            bytes.truncate(bytes.len() - 4);
            let p = write(t.path(), &format!("{img}{ext}"), &bytes);
            write(t.path(), lab, &encode_labels(&[0, 1, 2]));
            let e = err_text(load_dir(DataKind::Mnist, t.path(), Split::Test));
            assert!(e.contains(&p.display().to_string()), "{e}");
            assert!(e.contains("truncated"), "{e}");
        }
    }

    #[test]
    fn truncated_header_and_labels_name_file() {
        let t = tempfile::tempdir().unwrap();
        let p = write(t.path(), "a", &encode_images(2, 2, &[0; 4])[..10]);
        let e = read_images(&p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("truncated"),
            "{e}"
        );
        let p = write(t.path(), "b", &[0, 0]);
        let e = read_images(&p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("truncated"),
            "{e}"
        );
        let mut lab = encode_labels(&[1, 2, 3]);
        lab.pop();
        let p = write(t.path(), "c", &lab);
        let e = read_labels(&p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("truncated"),
            "{e}"
        );
    }

    #[test]
    fn trailing_bytes_name_file() {
        let t = tempfile::tempdir().unwrap();
        let mut bytes = encode_labels(&[1, 2]);
        bytes.push(3);
        let p = write(t.path(), "l", &bytes);
        let e = read_labels(&p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("1 bytes after"),
            "{e}"
        );
    }

    #[test]
    fn corrupt_gzip_names_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x.gz");
        std::fs::write(&p, b"\x1f\x8bnot really gzip").unwrap();
        let e = read_images(&p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("gzip"),
            "{e}"
        );
    }

    #[test]
    fn label_out_of_range_names_file() {
        let t = tempfile::tempdir().unwrap();
        let (img, lab) = file_stems(Split::Test);
        write(t.path(), img, &encode_images(1, 1, &[0, 0, 0]));
        let p = write(t.path(), lab, &encode_labels(&[0, 10, 1]));
        let e = err_text(load_dir(DataKind::Mnist, t.path(), Split::Test));
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("label 10 of image 1"), "{e}");
    }

    #[test]
    fn count_mismatch_names_both_files() {
        let t = tempfile::tempdir().unwrap();
        let (img, lab) = file_stems(Split::Test);
        let pi = write(t.path(), img, &encode_images(1, 1, &[0, 0, 0]));
        let pl = write(t.path(), lab, &encode_labels(&[0, 1]));
        let e = err_text(load_dir(DataKind::Mnist, t.path(), Split::Test));
        assert!(e.contains(&pl.display().to_string()), "{e}");
        assert!(e.contains(&pi.display().to_string()), "{e}");
        assert!(e.contains("2 labels") && e.contains("3 images"), "{e}");
    }

    #[test]
    fn huge_header_counts_do_not_panic() {
        let t = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        for v in [IMAGES_MAGIC, u32::MAX, u32::MAX, u32::MAX] {
            bytes.extend_from_slice(&v.to_be_bytes());
        }
        let p = write(t.path(), "big", &bytes);
        let e = read_images(&p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
