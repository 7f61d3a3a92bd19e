//! Image folders: one sub-folder per class (sorted by name = class index,
//! folder name = class name) of `.png`/`.jpg`/`.jpeg` files. A folder with
//! `train/` and `test/` (or `val/`) sub-folders has those as its splits
//! (the test split must have the same class folders); any other folder
//! serves both splits whole.
//!
//! Every image is converted to the model's `[C, H, W]`: resized (triangle
//! filter, like torchvision's bilinear `Resize`) so that it just covers
//! H×W (the shorter side to H or W), then centre-cropped; RGB becomes luma
//! when C = 1 and grey is repeated over three channels when C = 3 (an alpha
//! channel is dropped). Decoding runs on all cores.

use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageBuffer, Pixel};
use rayon::prelude::*;

use super::{check_dir, read_file, RawData, Split};
use crate::error::{Error, Result};

/// True for a file name this loader reads (`.png`, `.jpg`, `.jpeg`, any case;
/// hidden files excluded).
pub fn is_image_name(name: &str) -> bool {
    if name.starts_with('.') {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    [".png", ".jpg", ".jpeg"]
        .iter()
        .any(|ext| lower.ends_with(ext))
}

/// The folders of the train and test splits of `dir`: `dir/train` and
/// `dir/test` (else `dir/val`) when both exist, otherwise `dir` for both.
pub fn split_dirs(dir: &Path) -> (PathBuf, PathBuf) {
    let train = dir.join("train");
    if train.is_dir() {
        for name in ["test", "val"] {
            let test = dir.join(name);
            if test.is_dir() {
                return (train, test);
            }
        }
    }
    (dir.to_path_buf(), dir.to_path_buf())
}

/// Entries of a directory as `(name, path)`, sorted by name, hidden ones
/// skipped, keeping those for which `keep(path, name)` holds.
fn sorted_entries(
    dir: &Path,
    keep: impl Fn(&Path, &str) -> bool,
) -> Result<Vec<(String, PathBuf)>> {
    let io = |e| Error::io(dir, e);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !name.starts_with('.') && keep(&path, &name) {
            out.push((name, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The class sub-folders of `root`, sorted by name.
pub fn list_classes(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let classes = sorted_entries(root, |p, _| p.is_dir())?;
    if classes.is_empty() {
        return Err(Error::format(
            root,
            "no class sub-folders (expected one folder of PNG/JPEG images per class)",
        ));
    }
    Ok(classes)
}

/// The image files of one class folder, sorted by name; an error naming the
/// folder when it has none.
pub fn list_images(class_dir: &Path) -> Result<Vec<PathBuf>> {
    let files = sorted_entries(class_dir, |p, n| is_image_name(n) && p.is_file())?;
    if files.is_empty() {
        return Err(Error::format(
            class_dir,
            "empty class: no .png, .jpg or .jpeg files",
        ));
    }
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// Resizes `img` (non-empty) so it just covers `w × h` (aspect ratio kept;
/// unchanged when it already does exactly), then crops the centre `w × h`.
pub fn resize_and_crop<P>(
    img: &ImageBuffer<P, Vec<P::Subpixel>>,
    w: u32,
    h: u32,
) -> ImageBuffer<P, Vec<P::Subpixel>>
where
    P: Pixel + 'static,
{
    resize_and_crop_ratio(img, w, h, 1.0)
}

/// Resizes `img` (non-empty) so it just covers `ratio·w × ratio·h`, then
/// crops the centre `w × h` (`ratio` ≥ 1). With `ratio` = 256/224 at 224×224
/// this is torchvision's Resize(256) + CenterCrop(224), the ImageNet
/// evaluation transform (the authors' code uses it).
pub fn resize_and_crop_ratio<P>(
    img: &ImageBuffer<P, Vec<P::Subpixel>>,
    w: u32,
    h: u32,
    ratio: f64,
) -> ImageBuffer<P, Vec<P::Subpixel>>
where
    P: Pixel + 'static,
{
    let (iw, ih) = img.dimensions();
    let cover = |v: u32| (v as f64 * ratio.max(1.0)).round();
    let scale = f64::max(cover(w) / iw as f64, cover(h) / ih as f64);
    let nw = ((iw as f64 * scale).round() as u32).max(w);
    let nh = ((ih as f64 * scale).round() as u32).max(h);
    let resized;
    let src = if (nw, nh) == (iw, ih) {
        img
    } else {
        resized = imageops::resize(img, nw, nh, FilterType::Triangle);
        &resized
    };
    imageops::crop_imm(src, (nw - w) / 2, (nh - h) / 2, w, h).to_image()
}

/// Converts a decoded, non-empty image to `[C, H, W]` bytes (C = 1 or 3;
/// H, W > 0).
pub fn convert(img: &DynamicImage, shape: [usize; 3]) -> Vec<u8> {
    convert_ratio(img, shape, 1.0)
}

/// [`convert`], the shorter side first resized to `ratio` times the model's
/// (see [`resize_and_crop_ratio`]).
pub fn convert_ratio(img: &DynamicImage, shape: [usize; 3], ratio: f64) -> Vec<u8> {
    let [c, h, w] = shape;
    let (w32, h32) = (w as u32, h as u32);
    if c == 1 {
        resize_and_crop_ratio(&img.to_luma8(), w32, h32, ratio).into_raw()
    } else {
        let hwc = resize_and_crop_ratio(&img.to_rgb8(), w32, h32, ratio).into_raw();
        let plane = h * w;
        let mut chw = vec![0u8; 3 * plane];
        for (p, px) in hwc.chunks_exact(3).enumerate() {
            for (k, v) in px.iter().enumerate() {
                chw[k * plane + p] = *v;
            }
        }
        chw
    }
}

/// The most bytes one decoded image may take: the `image` crate's default
/// allocation limit, which keeps a huge (or malicious) file from exhausting
/// memory.
fn max_decoded_bytes() -> u64 {
    image::Limits::default().max_alloc.unwrap_or(u64::MAX)
}

/// Width, height and decoded size in bytes of an encoded image, read from its
/// header (nothing is decoded, so no limit applies).
fn probe_size(bytes: &[u8]) -> image::ImageResult<(u32, u32, u64)> {
    use image::ImageDecoder;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    reader.no_limits();
    let decoder = reader.into_decoder()?;
    let (w, h) = decoder.dimensions();
    Ok((w, h, decoder.total_bytes()))
}

/// The error for an image too large to decode, naming its size and the limit.
fn too_large(path: &Path, w: u32, h: u32, bytes: u64) -> Error {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Error::format(
        path,
        format!(
            "image of {w}×{h} pixels is too large: decoding it needs at least {:.0} MiB, \
             and the limit is {:.0} MiB per image (scale it down first)",
            mib(bytes),
            mib(max_decoded_bytes())
        ),
    )
}

/// Reads, decodes and converts one image file.
fn load_image(path: &Path, shape: [usize; 3], ratio: f64) -> Result<Vec<u8>> {
    let bytes = read_file(path)?;
    let cannot_decode = |e| Error::format(path, format!("cannot decode image: {e}"));
    let (w, h, decoded) = probe_size(&bytes).map_err(cannot_decode)?;
    if decoded > max_decoded_bytes() {
        return Err(too_large(path, w, h, decoded));
    }
    let img = image::load_from_memory(&bytes).map_err(|e| match e {
        // Decoders may need more than the output buffer the probe counted.
        image::ImageError::Limits(_) => too_large(path, w, h, decoded),
        e => cannot_decode(e),
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::format(path, "image with no pixels"));
    }
    Ok(convert_ratio(&img, shape, ratio))
}

/// Checks that `shape` is one a folder can be converted to.
fn check_shape(dir: &Path, shape: [usize; 3]) -> Result<()> {
    let [c, h, w] = shape;
    let fits = |v: usize| v > 0 && u32::try_from(v).is_ok();
    if (c == 1 || c == 3) && fits(h) && fits(w) {
        Ok(())
    } else {
        Err(Error::arg(
            "--data",
            format!(
                "folder:{}: images can be converted to 1 or 3 channels of a non-empty size, not to the model's {shape:?}",
                dir.display()
            ),
        ))
    }
}

/// Loads one split of an image folder, converted to `shape` (the shorter
/// side resized to `ratio` times the model's, then centre-cropped).
pub(crate) fn load_dir(dir: &Path, split: Split, shape: [usize; 3], ratio: f64) -> Result<RawData> {
    check_dir(dir, "image folder", "")?;
    check_shape(dir, shape)?;
    let (train_dir, test_dir) = split_dirs(dir);
    let classes = list_classes(&train_dir)?;
    let class_names: Vec<String> = classes.iter().map(|(n, _)| n.clone()).collect();
    let classes = match split {
        Split::Train => classes,
        Split::Test if test_dir == train_dir => classes,
        Split::Test => {
            let test_classes = list_classes(&test_dir)?;
            let test_names: Vec<String> = test_classes.iter().map(|(n, _)| n.clone()).collect();
            if test_names != class_names {
                return Err(Error::format(
                    &test_dir,
                    format!(
                        "class folders {test_names:?} differ from those of {}: {class_names:?}",
                        train_dir.display()
                    ),
                ));
            }
            test_classes
        }
    };
    let mut files = Vec::new();
    for (label, (_, class_dir)) in classes.iter().enumerate() {
        for f in list_images(class_dir)? {
            files.push((f, label));
        }
    }
    let images = files
        .par_iter()
        .map(|(p, _)| load_image(p, shape, ratio))
        .collect::<Result<Vec<Vec<u8>>>>()?;
    Ok(RawData {
        shape,
        class_names,
        images: images.concat(),
        labels: files.iter().map(|(_, l)| *l).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load, DataKind, DataSpec};
    use image::{GrayImage, Luma, Rgb, RgbImage};

    /// A grey image, black on the left half and white on the right.
    fn halves(w: u32, h: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, _| Luma([if x < w / 2 { 0 } else { 255 }]))
    }

    fn spec(dir: &Path) -> DataSpec {
        DataSpec::new(DataKind::Folder, dir)
    }

    fn mkdir(p: &Path) -> PathBuf {
        std::fs::create_dir_all(p).unwrap();
        p.to_path_buf()
    }

    #[test]
    fn the_imagenet_resize_covers_256_then_crops_224() {
        // 512×384 at 224 with ratio 256/224: the shorter side goes to 256
        // (341×256), then the centre 224×224 is cut, so a quarter-width
        // border on each side is lost: the left edge of the result lies at
        // column (341-224)/2 = 58 of the 341-wide resize, i.e. 87 of 512.
        let src = halves(512, 384);
        let out = resize_and_crop_ratio(&src, 224, 224, 256.0 / 224.0);
        assert_eq!(out.dimensions(), (224, 224));
        // The black/white edge at the source's middle stays in the middle.
        assert_eq!(out.get_pixel(100, 100)[0], 0);
        assert_eq!(out.get_pixel(123, 100)[0], 255);
        // Ratio 1 is the plain cover-and-crop.
        assert_eq!(
            resize_and_crop_ratio(&src, 224, 224, 1.0),
            resize_and_crop(&src, 224, 224)
        );
        // An image already `ratio` times the size is only cropped.
        let zoomed = resize_and_crop_ratio(&halves(64, 64), 32, 32, 2.0);
        let edge = (0..32).find(|&x| zoomed.get_pixel(x, 0)[0] > 127).unwrap();
        assert_eq!(edge, 16);
    }

    #[test]
    fn crop_without_resize_is_exact() {
        // 8×4 at 4×4: no resize (the shorter side already fits), the centre
        // 4 columns are kept: two black, two white.
        let out = resize_and_crop(&halves(8, 4), 4, 4);
        for y in 0..4 {
            let row: Vec<u8> = (0..4).map(|x| out.get_pixel(x, y)[0]).collect();
            assert_eq!(row, vec![0, 0, 255, 255], "row {y}");
        }
    }

    #[test]
    fn resize_then_crop_keeps_the_edge_in_the_middle() {
        // 32×16 at 8×8: halved to 16×8, centre 8 columns cropped.
        let out = resize_and_crop(&halves(32, 16), 8, 8);
        assert_eq!(out.dimensions(), (8, 8));
        for y in 0..8 {
            let row: Vec<u8> = (0..8).map(|x| out.get_pixel(x, y)[0]).collect();
            assert_eq!(&row[..3], &[0, 0, 0], "row {y}: {row:?}");
            assert_eq!(&row[5..], &[255, 255, 255], "row {y}: {row:?}");
            assert!(row.windows(2).all(|p| p[0] <= p[1]), "row {y}: {row:?}");
            // Symmetric around the edge (up to rounding).
            let sum = row[3] as i32 + row[4] as i32;
            assert!((254..=256).contains(&sum), "row {y}: {row:?}");
        }
        // A tall image is cropped top and bottom: 4×12 at 4×4 keeps rows 4..8.
        let tall = GrayImage::from_fn(4, 12, |_, y| Luma([if y < 6 { 10 } else { 200 }]));
        let out = resize_and_crop(&tall, 4, 4);
        assert_eq!(out.dimensions(), (4, 4));
        assert_eq!(out.get_pixel(0, 0)[0], 10);
        assert_eq!(out.get_pixel(3, 3)[0], 200);
    }

    #[test]
    fn upscale_of_a_flat_colour_stays_flat() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(5, 7, Rgb([10, 200, 30])));
        let chw = convert(&img, [3, 16, 16]);
        assert_eq!(chw.len(), 3 * 256);
        assert!(chw[..256].iter().all(|&v| v == 10));
        assert!(chw[256..512].iter().all(|&v| v == 200));
        assert!(chw[512..].iter().all(|&v| v == 30));
    }

    #[test]
    fn grey_conversion_both_ways() {
        // RGB -> luma (Rec. 709 weights, as the image crate uses).
        let rgb = DynamicImage::ImageRgb8(RgbImage::from_pixel(3, 3, Rgb([200, 100, 50])));
        let luma = convert(&rgb, [1, 3, 3]);
        let want = 0.2126 * 200.0 + 0.7152 * 100.0 + 0.0722 * 50.0;
        assert!(
            luma.iter().all(|&v| (v as f64 - want).abs() <= 1.0),
            "{luma:?}"
        );
        // Grey -> RGB repeats the value in each channel.
        let grey = DynamicImage::ImageLuma8(halves(2, 2));
        let chw = convert(&grey, [3, 2, 2]);
        assert_eq!(chw, vec![0, 255, 0, 255, 0, 255, 0, 255, 0, 255, 0, 255]);
    }

    #[test]
    fn classes_sorted_by_name_sizes_converted() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        // Created out of order; `b_cat` holds a wide and a tall image.
        halves(8, 4)
            .save(mkdir(&root.join("b_cat")).join("x.PNG"))
            .unwrap();
        RgbImage::from_pixel(4, 9, Rgb([255, 255, 255]))
            .save(root.join("b_cat").join("y.png"))
            .unwrap();
        GrayImage::from_pixel(4, 4, Luma([7]))
            .save(mkdir(&root.join("a_dog")).join("z.jpg"))
            .unwrap();
        std::fs::write(root.join("a_dog").join("notes.txt"), "ignored").unwrap();
        std::fs::write(root.join("README"), "ignored").unwrap();
        let ds = load(&spec(root), Split::Test, Some([1, 4, 4])).unwrap();
        assert_eq!(
            ds.class_names(),
            &["a_dog".to_string(), "b_cat".to_string()]
        );
        assert_eq!(ds.labels(), &[0, 1, 1]);
        // The JPEG is lossy but a flat grey stays close.
        assert!(ds.image_u8(0).iter().all(|&v| v.abs_diff(7) <= 2));
        let x = ds.image_u8(1);
        for y in 0..4 {
            assert_eq!(&x[y * 4..y * 4 + 4], &[0, 0, 255, 255]);
        }
        assert!(ds.image_u8(2).iter().all(|&v| v == 255));
        // Without split folders the same images serve as the train split.
        let tr = load(&spec(root), Split::Train, Some([1, 4, 4])).unwrap();
        assert_eq!(tr.labels(), ds.labels());
        assert!(tr.name().ends_with("(train)"));
    }

    #[test]
    fn train_and_val_folders_are_the_splits() {
        let t = tempfile::tempdir().unwrap();
        for (split, n) in [("train", 3), ("val", 1)] {
            for class in ["one", "two"] {
                let d = mkdir(&t.path().join(split).join(class));
                for k in 0..n {
                    halves(2, 2).save(d.join(format!("{k}.png"))).unwrap();
                }
            }
        }
        let tr = load(&spec(t.path()), Split::Train, Some([3, 2, 2])).unwrap();
        let te = load(&spec(t.path()), Split::Test, Some([3, 2, 2])).unwrap();
        assert_eq!(tr.labels(), &[0, 0, 0, 1, 1, 1]);
        assert_eq!(te.labels(), &[0, 1]);
        assert_eq!(te.class_names(), tr.class_names());
        // A test split whose classes differ from train's is refused.
        mkdir(&t.path().join("val").join("three"));
        let e = load(&spec(t.path()), Split::Test, Some([3, 2, 2]))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&t.path().join("val").display().to_string()),
            "{e}"
        );
        assert!(e.contains("three"), "{e}");
    }

    #[test]
    fn corrupt_image_is_named() {
        let t = tempfile::tempdir().unwrap();
        let d = mkdir(&t.path().join("c"));
        halves(4, 4).save(d.join("good.png")).unwrap();
        let bad = d.join("bad.png");
        std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot a png").unwrap();
        let e = load(&spec(t.path()), Split::Test, Some([1, 4, 4]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&bad.display().to_string()), "{e}");
        assert!(e.contains("cannot decode"), "{e}");
    }

    /// A PNG holding only a header that claims `w × h` grey pixels.
    fn png_header_only(w: u32, h: u32) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in bytes {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 == 1 {
                        0xEDB8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(w.to_be_bytes());
        ihdr.extend(h.to_be_bytes());
        ihdr.extend([8, 0, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(13u32.to_be_bytes());
        png.extend(&ihdr);
        png.extend(crc32(&ihdr).to_be_bytes());
        png
    }

    #[test]
    fn an_image_too_large_to_decode_is_named_with_its_size_and_the_limit() {
        let t = tempfile::tempdir().unwrap();
        let d = mkdir(&t.path().join("c"));
        halves(4, 4).save(d.join("good.png")).unwrap();
        let big = d.join("big.png");
        std::fs::write(&big, png_header_only(30000, 30000)).unwrap();
        let e = load(&spec(t.path()), Split::Test, Some([1, 4, 4]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&big.display().to_string()), "{e}");
        assert!(e.contains("30000×30000"), "{e}");
        let limit_mib = image::Limits::default().max_alloc.unwrap() >> 20;
        assert!(e.contains(&format!("limit is {limit_mib} MiB")), "{e}");
        // 30000 × 30000 one-byte pixels.
        assert!(
            e.contains(&format!("{:.0} MiB", 9e8 / (1u64 << 20) as f64)),
            "{e}"
        );
    }

    #[test]
    fn empty_class_and_no_classes_are_named() {
        let t = tempfile::tempdir().unwrap();
        let e = load(&spec(t.path()), Split::Test, Some([1, 4, 4]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&t.path().display().to_string()), "{e}");
        assert!(e.contains("no class sub-folders"), "{e}");
        halves(4, 4)
            .save(mkdir(&t.path().join("a")).join("1.png"))
            .unwrap();
        let empty = mkdir(&t.path().join("b"));
        std::fs::write(empty.join("x.txt"), "").unwrap();
        let e = load(&spec(t.path()), Split::Test, Some([1, 4, 4]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&empty.display().to_string()), "{e}");
        assert!(e.contains("empty class"), "{e}");
    }

    #[test]
    fn needs_a_usable_shape() {
        let t = tempfile::tempdir().unwrap();
        halves(4, 4)
            .save(mkdir(&t.path().join("a")).join("1.png"))
            .unwrap();
        for shape in [None, Some([2, 4, 4]), Some([3, 0, 4])] {
            let e = load(&spec(t.path()), Split::Test, shape)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("--data"), "{shape:?}: {e}");
            assert!(
                e.contains(&t.path().display().to_string()),
                "{shape:?}: {e}"
            );
        }
        let missing = t.path().join("missing");
        let e = load(&spec(&missing), Split::Test, Some([1, 4, 4]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&missing.display().to_string()), "{e}");
    }

    #[test]
    fn image_names() {
        for ok in ["a.png", "B.JPG", "c.Jpeg", "x.y.png"] {
            assert!(is_image_name(ok), "{ok}");
        }
        for no in ["a.gif", "png", "a.png.txt", "._a.png", "a.webp"] {
            assert!(!is_image_name(no), "{no}");
        }
    }
}
