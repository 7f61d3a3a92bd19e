//! What the search shows on the shipped models, with the demo's settings
//! (2 epochs, sampled evaluation): on the BadNets model the target class's
//! pattern is the most predictive at the default k, needs the fewest pixels,
//! and the verdict flags it; on the natural model no class is flagged.

use classwise::backend::cpu::CpuBackend;
use classwise::data::{self, DataSpec, Split};
use classwise::demo::DemoConfig;
use classwise::models::{self, Shipped};
use classwise::search::{self, RunInputs, RunReport};

fn search(shipped: &Shipped) -> RunReport {
    let spec: DataSpec = "fashion-mnist".parse().unwrap();
    let test = data::load(&spec, Split::Test, Some([1, 28, 28])).unwrap();
    let model = shipped.load().unwrap();
    let cfg = DemoConfig {
        quiet: true,
        ..DemoConfig::default()
    }
    .search_config(model.graph.input, model.graph.num_classes);
    let inputs = RunInputs {
        model: &model,
        model_id: shipped.id(),
        model_label: shipped.slug.into(),
        test: &test,
        train: None,
        command: "test".into(),
        quiet: true,
    };
    let out = tempfile::tempdir().unwrap();
    search::run(&CpuBackend, &inputs, &cfg, out.path()).unwrap()
}

#[test]
fn the_backdoor_target_stands_out_and_is_flagged() {
    let r = search(&models::BACKDOORED);
    let target = 0;
    let power = |c: usize| r.classes[c].power;
    let min_k = |c: usize| r.classes[c].min_k.unwrap_or(usize::MAX);
    for c in 1..10 {
        assert!(
            power(target) > power(c),
            "class {c} power {} >= target's {}",
            power(c),
            power(target)
        );
        assert!(
            min_k(target) < min_k(c),
            "class {c} min k {} <= target's {}",
            min_k(c),
            min_k(target)
        );
    }
    assert_eq!(r.flagged, vec![target]);
}

#[test]
fn no_class_of_the_natural_model_is_flagged() {
    let r = search(&models::NATURAL);
    assert!(r.flagged.is_empty(), "flagged {:?}", r.flagged);
    assert_eq!(r.classes.len(), 10);
}
