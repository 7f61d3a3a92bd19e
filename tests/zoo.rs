//! The zoo builds every architecture with PyTorch's parameter names and shapes.

use classwise::zoo::{build, ModelSpec, ARCHS};

fn reference_names() -> serde_json::Map<String, serde_json::Value> {
    let path = common::fixtures_dir().join("state_dict_names.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

mod common;

#[test]
fn every_arch_has_exactly_the_pytorch_state_dict() {
    let reference = reference_names();
    let cases = [
        ("smallcnn", [1, 28, 28], "smallcnn_1x28"),
        ("smallcnn", [3, 32, 32], "smallcnn_3x32"),
        ("resnet18", [3, 32, 32], "resnet18_3x32"),
        ("resnet34", [3, 32, 32], "resnet34_3x32"),
        ("resnet50", [3, 32, 32], "resnet50_3x32"),
        ("preact_resnet18", [3, 32, 32], "preact_resnet18_3x32"),
        ("vgg16", [3, 32, 32], "vgg16_3x32"),
        ("wrn28_10", [3, 32, 32], "wrn28_10_3x32"),
        (
            "resnet50_imagenet",
            [3, 224, 224],
            "resnet50_imagenet_3x224",
        ),
    ];
    for (arch, input, key) in cases {
        let classes = if arch == "resnet50_imagenet" {
            1000
        } else {
            10
        };
        let graph = build(&ModelSpec::new(arch, input, classes)).unwrap();
        let want: Vec<(String, Vec<usize>)> = reference[key]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let shape = v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                (k.clone(), shape)
            })
            .collect();
        // Same entries in the same order as PyTorch's state_dict().
        assert_eq!(graph.state_dict_entries(), want, "{key}");
    }
    let covered: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.0).collect();
    assert_eq!(covered.len(), ARCHS.len(), "every zoo arch is checked");
}

#[test]
fn param_counts_match_the_published_models() {
    // torchvision resnet50 has 25,557,032 parameters; the CIFAR ResNet-18
    // 11,173,962 (kuangliu, 10 classes).
    let r50 = build(&ModelSpec::new("resnet50_imagenet", [3, 224, 224], 1000)).unwrap();
    assert_eq!(r50.param_count(), 25_557_032);
    let r18 = build(&ModelSpec::new("resnet18", [3, 32, 32], 10)).unwrap();
    assert_eq!(r18.param_count(), 11_173_962);
    // ResNet-50 at 224: about 4.1 GMACs, i.e. 8.2 GFLOPs per image.
    let f = r50.flops_per_image() as f64 / 1e9;
    assert!((8.0..8.4).contains(&f), "resnet50 flops {f}");
}

#[test]
fn configurable_channels_classes_and_size() {
    let g = build(&ModelSpec::new("resnet18", [1, 28, 28], 7)).unwrap();
    assert_eq!(g.params[0].shape, vec![64, 1, 3, 3]);
    assert_eq!(g.nodes.last().unwrap().shape, vec![7]);
    let s = build(&ModelSpec::new("smallcnn", [3, 64, 48], 5)).unwrap();
    let fc1 = s.param_id("fc1.weight").unwrap();
    assert_eq!(s.params[fc1].shape, vec![256, 64 * 16 * 12]);
}

#[test]
fn impossible_configurations_are_clear_errors() {
    let e = build(&ModelSpec::new("vgg16", [3, 28, 28], 10))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vgg16") && e.contains("32x32"), "{e}");
    let e = build(&ModelSpec::new("resnet99", [3, 32, 32], 10))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--arch") && e.contains("resnet99"), "{e}");
    let e = build(&ModelSpec::new("smallcnn", [1, 2, 2], 10))
        .unwrap_err()
        .to_string();
    assert!(e.contains("too small"), "{e}");
}
