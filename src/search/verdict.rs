//! The backdoor verdict: a class whose pattern needs far fewer pixels than
//! the others' is an outlier. Anomaly index as Neural Cleanse computes it:
//! distance from the median in units of the median absolute deviation
//! (scaled by 1.4826, consistent with a normal distribution); a class more
//! than 2 below the median is flagged.

use serde::{Deserialize, Serialize};

/// The consistency constant that turns a MAD into a normal standard deviation.
pub const MAD_SCALE: f64 = 1.4826;
/// Anomaly index above which a class (below the median) is flagged.
pub const THRESHOLD: f64 = 2.0;
/// The smallest spread the anomaly index divides by, in the units of the
/// statistic. Every statistic analysed here is a logarithm, so 0.05 is a 5%
/// difference. When more than half the classes share (nearly) one value the
/// MAD is 0 and every class a hair below the median would be infinitely
/// anomalous; with this floor a class is flagged only when it lies more than
/// `THRESHOLD * MAD_SCALE * MIN_MAD` (about 0.15, i.e. 14% smaller) below
/// the median, and a class far below (a backdoor's pattern is many times
/// smaller) still is.
pub const MIN_MAD: f64 = 0.05;

/// The anomaly analysis of one per-class statistic.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    /// Which statistic (e.g. `min_k90` or `mask_l1`).
    pub statistic: String,
    /// The statistic per class (the ordering follows `classes`).
    pub values: Vec<f64>,
    /// The classes analysed.
    pub classes: Vec<usize>,
    /// Median of the values.
    pub median: f64,
    /// Median absolute deviation (unscaled).
    pub mad: f64,
    /// `(median - value) / (1.4826 * max(MAD, MIN_MAD))` per class: positive
    /// below the median. Always finite for finite values; older reports
    /// (before the floor) may hold infinities, and JSON has none, so
    /// non-finite values are written as the strings `"inf"` / `"-inf"`.
    #[serde(with = "nonfinite")]
    pub anomaly_index: Vec<f64>,
    /// Classes with an anomaly index above the threshold (below the median).
    pub flagged: Vec<usize>,
}

/// Serde for `Vec<f64>` that keeps infinities and NaN through JSON: finite
/// values stay numbers, the others become `"inf"`, `"-inf"`, `"nan"`.
pub(crate) mod nonfinite {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Num {
        Finite(f64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|&x| {
                if x.is_finite() {
                    Num::Finite(x)
                } else if x.is_nan() {
                    Num::Text("nan".into())
                } else if x > 0.0 {
                    Num::Text("inf".into())
                } else {
                    Num::Text("-inf".into())
                }
            })
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Vec::<Num>::deserialize(d)?
            .into_iter()
            .map(|n| match n {
                Num::Finite(x) => Ok(x),
                Num::Text(t) => match t.as_str() {
                    "inf" => Ok(f64::INFINITY),
                    "-inf" => Ok(f64::NEG_INFINITY),
                    "nan" => Ok(f64::NAN),
                    other => Err(serde::de::Error::custom(format!(
                        "`{other}` is not a number (expected a number, \"inf\", \"-inf\" or \"nan\")"
                    ))),
                },
            })
            .collect()
    }
}

/// Median (mean of the two middle values for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The classes whose anomaly index exceeds [`THRESHOLD`].
fn over_threshold(classes: &[usize], anomaly_index: &[f64]) -> Vec<usize> {
    classes
        .iter()
        .zip(anomaly_index)
        .filter(|(_, &a)| a > THRESHOLD)
        .map(|(&c, _)| c)
        .collect()
}

/// Analyses `values` (one per class in `classes`, logarithms of a size);
/// small values are suspicious. The spread divided by is the MAD floored at
/// [`MIN_MAD`].
pub fn analyse(statistic: &str, classes: &[usize], values: &[f64]) -> Verdict {
    let med = median(values);
    let dev: Vec<f64> = values.iter().map(|v| (v - med).abs()).collect();
    let mad = median(&dev);
    let spread = MAD_SCALE * mad.max(MIN_MAD);
    let anomaly_index: Vec<f64> = values.iter().map(|&v| (med - v) / spread).collect();
    let flagged = over_threshold(classes, &anomaly_index);
    Verdict {
        statistic: statistic.to_string(),
        values: values.to_vec(),
        classes: classes.to_vec(),
        median: med,
        mad,
        anomaly_index,
        flagged,
    }
}

/// Analyses `values` against known-clean models of the same task (`refs`,
/// each one value per class in the same order, all on one log scale).
///
/// Some classes are easy for every model (Fashion-MNIST's bag needs a
/// third of the others' pixels in clean models too), so the plain verdict
/// flags them everywhere. Here each model's values are first taken relative
/// to its own median (a model whose patterns are all larger is no outlier),
/// then each class's typical relative value among the references is
/// subtracted: what is left is how much smaller this model's pattern is
/// than a clean model's for the same class. A class is anomalous when that
/// difference is far below the median difference, measured in the larger
/// of two spreads: the MAD of this model's differences (how closely it
/// follows the references overall) and the MAD of the class's own relative
/// value among the references (how much that class varies between clean
/// models, wide for the bag). A planted target is far outside both; a
/// class that is merely variable is not. With no reference this is
/// [`analyse`] of the relative values.
pub fn against_reference(classes: &[usize], values: &[f64], refs: &[&[f64]]) -> Verdict {
    let relative = |v: &[f64]| {
        let m = median(v);
        v.iter().map(|x| x - m).collect::<Vec<f64>>()
    };
    let own = relative(values);
    let theirs: Vec<Vec<f64>> = refs.iter().map(|r| relative(r)).collect();
    // Per class: the references' median and MAD of the relative value.
    let typical: Vec<(f64, f64)> = (0..own.len())
        .map(|c| {
            let col: Vec<f64> = theirs.iter().map(|r| r[c]).collect();
            if col.is_empty() {
                return (0.0, 0.0);
            }
            let m = median(&col);
            let dev: Vec<f64> = col.iter().map(|x| (x - m).abs()).collect();
            (m, median(&dev))
        })
        .collect();
    let diff: Vec<f64> = own.iter().zip(&typical).map(|(v, (m, _))| v - m).collect();
    let med = median(&diff);
    let dev: Vec<f64> = diff.iter().map(|v| (v - med).abs()).collect();
    let mad = median(&dev);
    let anomaly_index: Vec<f64> = diff
        .iter()
        .zip(&typical)
        .map(|(&d, &(_, class_mad))| (med - d) / (MAD_SCALE * mad.max(class_mad).max(MIN_MAD)))
        .collect();
    let flagged = over_threshold(classes, &anomaly_index);
    Verdict {
        statistic: "ln_size_vs_reference".to_string(),
        values: diff,
        classes: classes.to_vec(),
        median: med,
        mad,
        anomaly_index,
        flagged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_class_far_below_the_others_is_flagged_and_no_other() {
        let classes: Vec<usize> = (0..10).collect();
        let values = [
            120.0, 100.0, 9.0, 110.0, 95.0, 130.0, 105.0, 98.0, 125.0, 115.0,
        ];
        let v = analyse("min_k90", &classes, &values);
        // Sorted: 9 95 98 100 105 | 110 115 120 125 130.
        assert_eq!(v.median, 107.5);
        // Deviations sorted: 2.5 2.5 7.5 7.5 9.5 | 12.5 12.5 17.5 22.5 98.5.
        assert_eq!(v.mad, 11.0);
        assert_eq!(v.flagged, vec![2]);
        assert!((v.anomaly_index[2] - 98.5 / (1.4826 * 11.0)).abs() < 1e-12);
    }

    #[test]
    fn large_values_are_never_flagged() {
        let classes: Vec<usize> = (0..5).collect();
        let v = analyse("min_k90", &classes, &[10.0, 11.0, 12.0, 10.5, 900.0]);
        assert!(v.flagged.is_empty());
        assert!(v.anomaly_index[4] < 0.0);
    }

    #[test]
    fn evenly_spread_values_flag_nothing() {
        let classes: Vec<usize> = (0..10).collect();
        let values: Vec<f64> = (0..10).map(|i| 50.0 + 5.0 * i as f64).collect();
        assert!(analyse("x", &classes, &values).flagged.is_empty());
    }

    #[test]
    fn a_zero_mad_flags_only_a_class_far_below_the_shared_value() {
        // Four classes share ln(784); one is 0.1 below (10%), one far below.
        let classes: Vec<usize> = (0..6).collect();
        let l = 784f64.ln();
        let v = analyse("x", &classes, &[l, l, l - 0.1, l, l, 3f64.ln()]);
        assert_eq!(v.mad, 0.0);
        assert!(v.anomaly_index.iter().all(|a| a.is_finite()));
        assert_eq!(v.flagged, vec![5]);
    }

    #[test]
    fn classes_sharing_one_value_flag_nothing() {
        // The same class searched four times, and one other close by: no
        // spread to speak of, so no outlier (it was infinitely anomalous).
        let classes: Vec<usize> = (0..5).collect();
        let v = analyse("x", &classes, &[-3.0, -3.0, -3.0, -3.0, -3.04]);
        assert!(v.flagged.is_empty(), "{v:?}");
    }

    #[test]
    fn infinite_anomaly_indices_survive_json() {
        // Reports written before the MAD floor can hold infinities.
        let classes: Vec<usize> = (0..5).collect();
        let mut v = analyse("x", &classes, &[784.0, 900.0, 3.0, 784.0, 784.0]);
        v.anomaly_index[2] = f64::INFINITY;
        v.anomaly_index[1] = f64::NEG_INFINITY;
        let json = serde_json::to_string(&v).unwrap();
        let back: Verdict = serde_json::from_str(&json).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn a_class_small_in_every_clean_model_is_not_flagged_against_references() {
        // Class 8 needs a third of the others' pixels in every model (as the
        // bag does on Fashion-MNIST): the plain verdict flags it, the
        // reference explains it away.
        let classes: Vec<usize> = (0..10).collect();
        let model = |shift: f64, wobble: f64| -> Vec<f64> {
            (0..10)
                .map(|c| {
                    let base = -3.0 + 0.05 * ((c * 7 % 5) as f64 - 2.0) * wobble;
                    if c == 8 {
                        base - 1.1 + shift
                    } else {
                        base + shift
                    }
                })
                .collect()
        };
        let suspect = model(0.3, 1.0);
        assert_eq!(analyse("x", &classes, &suspect).flagged, vec![8]);
        let (a, b, c) = (model(0.0, -1.0), model(-0.2, 0.5), model(0.1, 2.0));
        let refs: Vec<&[f64]> = vec![&a, &b, &c];
        let v = against_reference(&classes, &suspect, &refs);
        assert!(v.flagged.is_empty(), "{v:?}");
    }

    #[test]
    fn a_backdoor_target_is_flagged_against_references_that_lack_it() {
        let classes: Vec<usize> = (0..10).collect();
        let clean: Vec<f64> = (0..10)
            .map(|c| if c == 8 { -4.1 } else { -3.0 + 0.03 * c as f64 })
            .collect();
        let mut backdoored = clean.clone();
        backdoored[3] = -5.2;
        let refs: Vec<&[f64]> = vec![&clean, &clean];
        let v = against_reference(&classes, &backdoored, &refs);
        assert_eq!(v.flagged, vec![3]);
        // The same model against no reference is judged on its own, and
        // then the bag joins the target.
        let alone = against_reference(&classes, &backdoored, &[]);
        assert_eq!(alone.flagged, vec![3, 8]);
    }

    #[test]
    fn a_class_that_varies_between_clean_models_is_judged_by_its_own_spread() {
        // Nine classes agree to within 1% in every model; class 8 wanders by
        // 0.4 between clean models. The suspect's class 8 lies 0.5 below the
        // references' median: far outside the other classes' agreement, but
        // within what class 8 does in clean models. Class 3, 1.5 below, is
        // outside both.
        let classes: Vec<usize> = (0..10).collect();
        let clean = |bag: f64| -> Vec<f64> {
            (0..10)
                .map(|c| {
                    if c == 8 {
                        -4.0 + bag
                    } else {
                        -3.0 + 0.01 * (c % 2) as f64
                    }
                })
                .collect()
        };
        let (a, b, c, d) = (clean(-0.4), clean(0.0), clean(0.4), clean(0.1));
        let refs: Vec<&[f64]> = vec![&a, &b, &c, &d];
        let mut suspect = clean(-0.45);
        let bag_only = against_reference(&classes, &suspect, &refs);
        assert!(bag_only.flagged.is_empty(), "{bag_only:?}");
        suspect[3] -= 1.5;
        assert_eq!(
            against_reference(&classes, &suspect, &refs).flagged,
            vec![3]
        );
    }
}
