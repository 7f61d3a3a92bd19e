//! Tests of the dataset type, data specs and the real Fashion-MNIST files.

use super::*;

fn tiny() -> Dataset {
    // Four 1×2×2 images: image k has pixels 10k, 10k+1, 10k+2, 10k+3.
    let images: Vec<u8> = (0..16).map(|v| (v / 4) * 10 + v % 4).collect();
    Dataset::new(
        "tiny".into(),
        [1, 2, 2],
        3,
        vec!["a".into(), "b".into(), "c".into()],
        images,
        vec![2, 0, 2, 1],
    )
    .unwrap()
}

#[test]
fn dataset_new_checks_sizes_labels_and_names() {
    let ok = |labels: Vec<usize>, images: usize, names: Vec<String>| {
        Dataset::new("d".into(), [1, 2, 2], 3, names, vec![0; images], labels)
    };
    assert!(ok(vec![0, 1], 8, vec![]).is_ok());
    let e = ok(vec![0, 1], 7, vec![]).unwrap_err().to_string();
    assert!(e.contains("dataset d") && e.contains("7"), "{e}");
    let e = ok(vec![0, 3], 8, vec![]).unwrap_err().to_string();
    assert!(e.contains("label 3 of image 1"), "{e}");
    let e = ok(vec![0], 4, vec!["x".into()]).unwrap_err().to_string();
    assert!(e.contains("1 class names for 3 classes"), "{e}");
    assert!(Dataset::new("d".into(), [0, 2, 2], 3, vec![], vec![], vec![]).is_err());
    assert!(Dataset::new("d".into(), [1, 2, 2], 0, vec![], vec![], vec![]).is_err());
    // Empty names default to the class numbers.
    let d = ok(vec![], 0, vec![]).unwrap();
    assert_eq!(d.class_names(), &["0", "1", "2"]);
    assert!(d.is_empty());
}

#[test]
fn batch_is_v_over_255_in_nchw_order() {
    let d = tiny();
    let b = d.batch(&[3, 0, 3]);
    assert_eq!(b.shape(), &[3, 1, 2, 2]);
    let want: Vec<f32> = [30u8, 31, 32, 33, 0, 1, 2, 3, 30, 31, 32, 33]
        .iter()
        .map(|&v| v as f32 / 255.0)
        .collect();
    assert_eq!(b.data(), &want[..]);
    assert_eq!(d.batch_labels(&[3, 0, 3]), vec![1, 2, 1]);
    let x = d.image(2);
    assert_eq!(x.shape(), &[1, 2, 2]);
    assert_eq!(x.data()[3], 23.0 / 255.0);
    assert_eq!(d.image_u8(1), &[10, 11, 12, 13]);
    // 0 and 255 map exactly to the ends of [0, 1].
    let ends = Dataset::new("e".into(), [1, 1, 2], 1, vec![], vec![0, 255], vec![0]).unwrap();
    assert_eq!(ends.batch(&[0]).data(), &[0.0, 1.0]);
    assert_eq!(d.batch(&[]).shape(), &[0, 1, 2, 2]);
}

#[test]
fn class_indices_and_subset() {
    let d = tiny();
    assert_eq!(d.class_indices(), vec![vec![1], vec![3], vec![0, 2]]);
    assert_eq!(d.class_counts(), vec![1, 1, 2]);
    let s = d.subset(&[2, 1]);
    assert_eq!(s.len(), 2);
    assert_eq!(s.labels(), &[2, 0]);
    assert_eq!(s.image_u8(0), d.image_u8(2));
    assert_eq!(s.image_u8(1), d.image_u8(1));
    assert_eq!(s.class_names(), d.class_names());
    assert_eq!(s.shape(), d.shape());
    // A class with no images still has its (empty) list.
    assert_eq!(s.class_indices(), vec![vec![1], vec![], vec![0]]);
}

#[test]
fn data_spec_parses_and_displays() {
    let s: DataSpec = "fashion-mnist".parse().unwrap();
    assert_eq!(
        s,
        DataSpec::new(DataKind::FashionMnist, DEFAULT_FASHION_MNIST_DIR)
    );
    assert_eq!(
        s.to_string(),
        "fashion-mnist:/usr/share/datasets/fashion-mnist"
    );
    for (text, kind, dir) in [
        ("fashion-mnist:/d", DataKind::FashionMnist, "/d"),
        ("mnist:rel/dir", DataKind::Mnist, "rel/dir"),
        (
            "cifar10:/x/cifar-10-batches-bin",
            DataKind::Cifar10,
            "/x/cifar-10-batches-bin",
        ),
        ("CIFAR-10:/c", DataKind::Cifar10, "/c"),
        ("folder:/a:b", DataKind::Folder, "/a:b"),
    ] {
        let s: DataSpec = text.parse().unwrap();
        assert_eq!(s, DataSpec::new(kind, dir), "{text}");
        assert_eq!(s.to_string().parse::<DataSpec>().unwrap(), s, "{text}");
    }
    for bad in ["imagenet:/x", "mnist", "folder:", "cifar10", ""] {
        let e = bad.parse::<DataSpec>().unwrap_err();
        assert!(matches!(e, Error::Arg { .. }), "{bad}: {e:?}");
        assert!(e.to_string().contains("--data"), "{bad}: {e}");
    }
    let e = "imagenet:/x".parse::<DataSpec>().unwrap_err().to_string();
    assert!(e.contains("imagenet") && e.contains("cifar10:DIR"), "{e}");
}

#[test]
fn idx_shape_mismatch_names_spec_and_shapes() {
    let t = tempfile::tempdir().unwrap();
    let (img, lab) = idx::file_stems(Split::Test);
    idx::write_maybe_gz(&t.path().join(img), &idx::encode_images(2, 2, &[1; 8])).unwrap();
    idx::write_maybe_gz(&t.path().join(lab), &idx::encode_labels(&[0, 1])).unwrap();
    let spec = DataSpec::new(DataKind::Mnist, t.path());
    let ds = load(&spec, Split::Test, Some([1, 2, 2])).unwrap();
    assert_eq!(ds.name(), format!("mnist:{} (test)", t.path().display()));
    let e = load(&spec, Split::Test, Some([3, 32, 32]))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&spec.to_string()), "{e}");
    assert!(e.contains("[1, 2, 2]") && e.contains("[3, 32, 32]"), "{e}");
}

// The real Fashion-MNIST (Debian's dataset-fashion-mnist, which the test
// script installs). These fail, not skip, when it is missing.

fn fashion(split: Split) -> Dataset {
    let spec: DataSpec = "fashion-mnist".parse().unwrap();
    load(&spec, split, Some([1, 28, 28])).unwrap_or_else(|e| {
        panic!("Fashion-MNIST must be installed (apt install dataset-fashion-mnist): {e}")
    })
}

#[test]
fn fashion_mnist_test_split() {
    let d = fashion(Split::Test);
    assert_eq!(d.len(), 10000);
    assert_eq!(d.shape(), [1, 28, 28]);
    assert_eq!(d.num_classes(), 10);
    assert_eq!(d.class_counts(), vec![1000; 10]);
    assert_eq!(d.label(0), 9);
    assert_eq!(d.class_names()[9], "Ankle boot");
    assert_eq!(
        d.name(),
        "fashion-mnist:/usr/share/datasets/fashion-mnist (test)"
    );
    // Real pictures: a dark background and some bright pixels.
    let x = d.image_u8(0);
    assert_eq!(x[0], 0);
    assert!(x.iter().any(|&v| v > 200));
}

#[test]
fn fashion_mnist_train_split_loads_fast() {
    let start = std::time::Instant::now();
    let d = fashion(Split::Train);
    let took = start.elapsed();
    assert_eq!(d.len(), 60000);
    assert_eq!(d.shape(), [1, 28, 28]);
    assert_eq!(d.class_counts(), vec![6000; 10]);
    // Generous bound (shared CI machines); typically a fraction of this.
    assert!(took.as_secs_f64() < 3.0, "loading took {took:?}");
    eprintln!("Fashion-MNIST train loaded in {took:?}");
}
