//! `cwp train` in its three settings, on small Fashion-MNIST subsets (a few
//! thousand images, two epochs): natural training learns, a backdoor planted
//! at rate 0.1 works while clean accuracy stays, PGD-style training buys
//! robustness, the same seed gives the same bits, and poisoning touches only
//! the chosen share of training images.

use std::path::Path;

use classwise::attack::Attack;
use classwise::backend::cpu::CpuBackend;
use classwise::data::{self, DataSpec, Dataset, Split};
use classwise::device_model::DeviceModel;
use classwise::eval;
use classwise::train::augment::Augment;
use classwise::train::poison::{poison_indices, Poisoning, TriggerSpec};
use classwise::train::{train, training_batch, EpochStats, TrainConfig};
use classwise::weights::Model;
use classwise::zoo::ModelSpec;
use rand::SeedableRng;

fn fashion(split: Split, per_class: usize) -> Dataset {
    let spec: DataSpec = "fashion-mnist".parse().unwrap();
    let d = data::load(&spec, split, Some([1, 28, 28])).unwrap();
    let idx: Vec<usize> = d
        .class_indices()
        .iter()
        .flat_map(|c| c[..per_class].to_vec())
        .collect();
    d.subset(&idx)
}

fn spec() -> ModelSpec {
    ModelSpec::new("smallcnn", [1, 28, 28], 10)
}

fn config(epochs: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 64,
        seed,
        ..TrainConfig::defaults(&spec())
    }
}

fn fit(
    cfg: &TrainConfig,
    train_set: &Dataset,
    test: &Dataset,
    out: &Path,
) -> (Model, Vec<EpochStats>) {
    train(
        &CpuBackend::REFERENCE,
        &spec(),
        train_set,
        test,
        cfg,
        out,
        false,
    )
    .unwrap()
}

fn badnets() -> TriggerSpec {
    "badnets:size=3,pos=br,fill=white".parse().unwrap()
}

#[test]
fn natural_training_lowers_the_loss_and_learns() {
    let (tr, te) = (fashion(Split::Train, 300), fashion(Split::Test, 100));
    let dir = tempfile::tempdir().unwrap();
    let (model, stats) = fit(&config(2, 1), &tr, &te, &dir.path().join("m.safetensors"));
    assert!(stats[1].loss < stats[0].loss, "{stats:?}");
    assert!(stats[1].test_accuracy > 0.65, "{stats:?}");
    // The written file carries what a user needs to know.
    let back = Model::load(&dir.path().join("m.safetensors"), &Default::default()).unwrap();
    assert_eq!(back.params, model.params);
    assert_eq!(back.meta.extra["trained"], "natural");
    assert!(back.meta.extra.contains_key("clean_accuracy"));
    assert!(
        !dir.path().join("m.safetensors.ckpt").exists(),
        "checkpoint left behind"
    );
}

#[test]
fn a_backdoor_planted_at_rate_one_tenth_succeeds_and_clean_accuracy_stays() {
    let (tr, te) = (fashion(Split::Train, 300), fashion(Split::Test, 100));
    let dir = tempfile::tempdir().unwrap();
    let (_, clean) = fit(&config(2, 1), &tr, &te, &dir.path().join("n.safetensors"));
    let mut cfg = config(2, 1);
    cfg.poison = Some(Poisoning {
        trigger: badnets().build([1, 28, 28]).unwrap(),
        target: 0,
        rate: 0.1,
    });
    let (model, stats) = fit(&cfg, &tr, &te, &dir.path().join("b.safetensors"));
    let last = stats.last().unwrap();
    assert!(last.asr.unwrap() > 0.9, "ASR {:?}", last.asr);
    assert!(
        last.test_accuracy > clean[1].test_accuracy - 0.05,
        "clean {} vs {}",
        last.test_accuracy,
        clean[1].test_accuracy
    );
    assert_eq!(model.meta.extra["target"], "0");
    assert_eq!(model.meta.extra["trained"], "backdoor");
}

#[test]
fn adversarial_training_beats_natural_training_under_the_same_attack() {
    let (tr, te) = (fashion(Split::Train, 300), fashion(Split::Test, 50));
    let dir = tempfile::tempdir().unwrap();
    let (natural, _) = fit(&config(2, 1), &tr, &te, &dir.path().join("n.safetensors"));
    let mut cfg = config(2, 1);
    cfg.adversarial = Some(Attack::fgsm_rs(0.1).unwrap());
    let (robust, _) = fit(&cfg, &tr, &te, &dir.path().join("a.safetensors"));
    let be = CpuBackend::REFERENCE;
    let attack = Attack::pgd(0.1, 0.025, 10).unwrap();
    let acc = |m: &Model| {
        let dm = DeviceModel::upload(&be, &m.graph, &m.params).unwrap();
        eval::robust_accuracy(&dm, &te, &attack, 100, None, 7, |_| {})
            .unwrap()
            .robust_accuracy
    };
    let (rn, ra) = (acc(&natural), acc(&robust));
    assert!(
        ra > rn + 0.15,
        "robust accuracy: adversarial {ra}, natural {rn}"
    );
}

#[test]
fn the_same_seed_gives_bit_identical_weights() {
    let (tr, te) = (fashion(Split::Train, 60), fashion(Split::Test, 20));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(1, 4);
    cfg.augment = Augment {
        crop_pad: 2,
        flip: true,
    };
    let (a, _) = fit(&cfg, &tr, &te, &dir.path().join("a.safetensors"));
    let (b, _) = fit(&cfg, &tr, &te, &dir.path().join("b.safetensors"));
    for (x, y) in a.params.iter().zip(&b.params) {
        assert!(x
            .data()
            .iter()
            .zip(y.data())
            .all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    let (c, _) = fit(&config(1, 5), &tr, &te, &dir.path().join("c.safetensors"));
    assert_ne!(a.params, c.params, "another seed gave the same weights");
}

#[test]
fn poisoning_touches_only_the_chosen_share_of_training_images() {
    let tr = fashion(Split::Train, 100);
    let chosen = poison_indices(tr.labels(), 0, 0.1, 3);
    // 10% of the 900 non-target images, none from the target class.
    assert_eq!(chosen.len(), 90);
    assert!(chosen.iter().all(|&i| tr.label(i) != 0));
    assert_eq!(chosen, poison_indices(tr.labels(), 0, 0.1, 3));
    let mut poisoned = vec![false; tr.len()];
    for &i in &chosen {
        poisoned[i] = true;
    }
    let p = Poisoning {
        trigger: badnets().build([1, 28, 28]).unwrap(),
        target: 0,
        rate: 0.1,
    };
    let all: Vec<usize> = (0..tr.len()).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (x, y) = training_batch(&tr, &all, &poisoned, Some(&p), Augment::NONE, &mut rng);
    let clean = tr.batch(&all);
    for i in 0..tr.len() {
        let img = &x.data()[i * 784..(i + 1) * 784];
        let orig = &clean.data()[i * 784..(i + 1) * 784];
        if poisoned[i] {
            assert_eq!(y[i], 0);
            // Exactly the 3x3 patch at rows/cols 24..27 is white.
            for (j, (&a, &b)) in img.iter().zip(orig).enumerate() {
                let (r, c) = (j / 28, j % 28);
                if (24..27).contains(&r) && (24..27).contains(&c) {
                    assert_eq!(a, 1.0);
                } else {
                    assert_eq!(a, b);
                }
            }
        } else {
            assert_eq!(y[i], tr.label(i));
            assert_eq!(img, orig);
        }
    }
}
