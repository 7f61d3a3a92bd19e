//! Detection figures of a scan against its labels: how often a method flags
//! backdoored models and clean ones, how well its anomaly index ranks them,
//! and whether it names the right target.

use serde::{Deserialize, Serialize};

/// One scanned model as the figures see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    /// Whether the model carries a backdoor.
    pub backdoored: bool,
    /// Its target class, when backdoored.
    pub target: Option<usize>,
    /// The classes the method flagged, most anomalous first.
    pub flagged: Vec<usize>,
    /// The method's score of the model: its largest anomaly index.
    pub score: f64,
    /// Seconds the method took on it.
    pub seconds: f64,
}

/// The detection figures of one method over the labelled models.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// The method (`cwp` or `nc`).
    pub method: String,
    /// Labelled models scanned without error: backdoored and clean.
    pub backdoored: usize,
    /// Clean models among them.
    pub clean: usize,
    /// Share of backdoored models with at least one flagged class.
    pub tpr: Option<f64>,
    /// Share of clean models with at least one flagged class.
    pub fpr: Option<f64>,
    /// Area under the ROC curve of the score (ties count one half): the
    /// chance that a backdoored model scores above a clean one.
    pub auc: Option<f64>,
    /// Of the detected backdoored models, the share whose most anomalous
    /// flagged class is the target.
    pub target_accuracy: Option<f64>,
    /// Mean seconds per model.
    pub seconds_per_model: Option<f64>,
}

fn share(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// The figures of `method` over `models`.
pub fn detection(method: &str, models: &[Scored]) -> Detection {
    let (pos, neg): (Vec<&Scored>, Vec<&Scored>) = models.iter().partition(|m| m.backdoored);
    let detected: Vec<&&Scored> = pos.iter().filter(|m| !m.flagged.is_empty()).collect();
    let right = detected
        .iter()
        .filter(|m| m.target.is_some() && m.flagged.first() == m.target.as_ref())
        .count();
    let false_alarms = neg.iter().filter(|m| !m.flagged.is_empty()).count();
    Detection {
        method: method.to_string(),
        backdoored: pos.len(),
        clean: neg.len(),
        tpr: share(detected.len(), pos.len()),
        fpr: share(false_alarms, neg.len()),
        auc: roc_auc(
            &pos.iter().map(|m| m.score).collect::<Vec<_>>(),
            &neg.iter().map(|m| m.score).collect::<Vec<_>>(),
        ),
        target_accuracy: share(right, detected.len()),
        seconds_per_model: (!models.is_empty())
            .then(|| models.iter().map(|m| m.seconds).sum::<f64>() / models.len() as f64),
    }
}

/// ROC AUC as the Mann-Whitney statistic: over every (positive, negative)
/// pair, 1 when the positive scores higher, 1/2 on a tie. None without both
/// kinds. Scores must be comparable (NaN counts as a tie, never as a win).
pub fn roc_auc(pos: &[f64], neg: &[f64]) -> Option<f64> {
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    let mut wins = 0.0;
    for &p in pos {
        for &n in neg {
            wins += match p.partial_cmp(&n) {
                Some(std::cmp::Ordering::Greater) => 1.0,
                Some(std::cmp::Ordering::Less) => 0.0,
                _ => 0.5,
            };
        }
    }
    Some(wins / (pos.len() * neg.len()) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(backdoored: bool, target: Option<usize>, flagged: &[usize], score: f64) -> Scored {
        Scored {
            backdoored,
            target,
            flagged: flagged.to_vec(),
            score,
            seconds: 2.0,
        }
    }

    #[test]
    fn auc_is_one_when_every_backdoor_outscores_every_clean_model_and_half_on_ties() {
        assert_eq!(roc_auc(&[3.0, 4.0], &[1.0, 2.0]), Some(1.0));
        assert_eq!(roc_auc(&[1.0, 2.0], &[3.0, 4.0]), Some(0.0));
        assert_eq!(roc_auc(&[2.0], &[2.0]), Some(0.5));
        // pos 3 beats both, pos 1 beats none and ties one: (2 + 0.5) / 4.
        assert_eq!(roc_auc(&[3.0, 1.0], &[1.0, 2.5]), Some(0.625));
        assert_eq!(roc_auc(&[1.0], &[]), None);
    }

    #[test]
    fn rates_count_models_with_any_flag_and_target_accuracy_counts_the_top_flag() {
        let models = [
            m(true, Some(2), &[2], 5.0),
            m(true, Some(3), &[1, 3], 4.0),
            m(true, Some(4), &[], 1.0),
            m(true, Some(5), &[5], 3.0),
            m(false, None, &[7], 2.5),
            m(false, None, &[], 0.5),
        ];
        let d = detection("cwp", &models);
        assert_eq!((d.backdoored, d.clean), (4, 2));
        assert_eq!(d.tpr, Some(0.75));
        assert_eq!(d.fpr, Some(0.5));
        // Detected 3; the top flag is the target for 2 of them.
        assert_eq!(d.target_accuracy, Some(2.0 / 3.0));
        // Pairs won: 5 (2), 4 (2), 1 (1: beats 0.5), 3 (2) = 7 of 8.
        assert_eq!(d.auc, Some(7.0 / 8.0));
        assert_eq!(d.seconds_per_model, Some(2.0));
    }
}
