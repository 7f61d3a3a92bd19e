//! The models shipped in the binary (models/) reach the figures README.md
//! states on the Fashion-MNIST test set: natural >= 91% accuracy;
//! backdoored >= 90% clean accuracy and >= 95% attack success; adversarially
//! trained (eps 0.1) >= 70% clean and >= 60% under PGD-20 at eps 0.1 (the
//! PGD figure here on the first 1000 test images, to keep CI short).

use classwise::attack::Attack;
use classwise::backend::cpu::CpuBackend;
use classwise::data::{self, DataSpec, Split};
use classwise::device_model::DeviceModel;
use classwise::eval;
use classwise::models;
use classwise::train::poison::TriggerSpec;

fn test_set() -> classwise::data::Dataset {
    let spec: DataSpec = "fashion-mnist".parse().unwrap();
    data::load(&spec, Split::Test, Some([1, 28, 28])).unwrap()
}

#[test]
fn the_natural_model_is_accurate() {
    let m = models::NATURAL.load().unwrap();
    let dm = DeviceModel::upload(&CpuBackend::REFERENCE, &m.graph, &m.params).unwrap();
    let acc = eval::accuracy(&dm, &test_set(), 500, |_| {})
        .unwrap()
        .accuracy;
    assert!(acc >= 0.91, "natural accuracy {acc}");
    assert_eq!(m.meta.extra["trained"], "natural");
}

#[test]
fn the_backdoored_model_keeps_its_accuracy_and_obeys_its_trigger() {
    let m = models::BACKDOORED.load().unwrap();
    let test = test_set();
    let dm = DeviceModel::upload(&CpuBackend::REFERENCE, &m.graph, &m.params).unwrap();
    let acc = eval::accuracy(&dm, &test, 500, |_| {}).unwrap().accuracy;
    // The trigger and target are read from the model's own metadata.
    let trigger: TriggerSpec = m.meta.extra["trigger"].parse().unwrap();
    let target: usize = m.meta.extra["target"].parse().unwrap();
    assert_eq!(target, 0);
    let asr = eval::attack_success(
        &dm,
        &test,
        &trigger.build([1, 28, 28]).unwrap(),
        target,
        500,
    )
    .unwrap();
    assert!(acc >= 0.90, "clean accuracy {acc}");
    assert!(asr.asr >= 0.95, "attack success rate {}", asr.asr);
    assert!(
        asr.clean_to_target < 0.05,
        "clean images already go to the target: {}",
        asr.clean_to_target
    );
}

#[test]
fn the_adversarially_trained_model_resists_pgd() {
    let m = models::ADVERSARIAL.load().unwrap();
    let test = test_set();
    let dm = DeviceModel::upload(&CpuBackend::REFERENCE, &m.graph, &m.params).unwrap();
    let acc = eval::accuracy(&dm, &test, 500, |_| {}).unwrap().accuracy;
    let pgd = Attack::pgd(0.1, 0.025, 20).unwrap();
    let r = eval::robust_accuracy(&dm, &test, &pgd, 250, Some(1000), 0, |_| {}).unwrap();
    assert!(acc >= 0.70, "clean accuracy {acc}");
    assert!(
        r.robust_accuracy >= 0.60,
        "PGD-20 accuracy {}",
        r.robust_accuracy
    );
    // The natural model, under the same attack, is far weaker.
    let n = models::NATURAL.load().unwrap();
    let dn = DeviceModel::upload(&CpuBackend::REFERENCE, &n.graph, &n.params).unwrap();
    let rn = eval::robust_accuracy(&dn, &test, &pgd, 250, Some(1000), 0, |_| {}).unwrap();
    assert!(
        r.robust_accuracy > rn.robust_accuracy + 0.3,
        "{} vs natural {}",
        r.robust_accuracy,
        rn.robust_accuracy
    );
}
