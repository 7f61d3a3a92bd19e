//! The verdict against reference models: each scanned model's per-class
//! sizes compared with those of known-clean models of the same task
//! (`cwp scan --reference`), so that a class every model finds easy is not
//! taken for a backdoor target. See
//! [`crate::search::verdict::against_reference`] for the statistic.

use super::{rank, Referenced, Row};
use crate::search::verdict;

/// Marks the rows of `references` (paths as given) and gives every finished
/// row, and each canvas kind of it, its verdict against the reference rows
/// of the same method. A model is never its own reference (same weights,
/// whatever the path), and a reference over other classes is passed over;
/// a row left with no reference gets no such verdict.
pub fn apply(rows: &mut [Row], references: &[String]) {
    for r in rows.iter_mut() {
        r.reference = references.contains(&r.model);
    }
    let pool: Vec<Row> = rows
        .iter()
        .filter(|r| r.reference && r.error.is_none() && !r.values.is_empty())
        .cloned()
        .collect();
    for r in rows.iter_mut() {
        if r.error.is_some() || r.values.is_empty() {
            continue;
        }
        let refs: Vec<&Row> = pool
            .iter()
            .filter(|p| p.method == r.method && p.model_id != r.model_id && p.classes == r.classes)
            .collect();
        if refs.is_empty() {
            continue;
        }
        let theirs: Vec<&[f64]> = refs.iter().map(|p| p.values.as_slice()).collect();
        r.referenced = Some(judge(&r.classes, &r.values, &r.proven, &theirs));
        for k in r.by_canvas.iter_mut() {
            let theirs: Vec<&[f64]> = refs
                .iter()
                .filter_map(|p| p.by_canvas.iter().find(|q| q.kind == k.kind))
                .map(|q| q.values.as_slice())
                .filter(|v| v.len() == k.values.len())
                .collect();
            if k.values.is_empty() || theirs.is_empty() {
                continue;
            }
            k.referenced = Some(judge(&r.classes, &k.values, &k.proven, &theirs));
        }
    }
}

/// One verdict against references: flagged are the outliers whose pattern
/// counts as evidence (none with fewer than 3 classes, as in the method's
/// own verdict).
fn judge(classes: &[usize], values: &[f64], proven: &[usize], refs: &[&[f64]]) -> Referenced {
    let v = verdict::against_reference(classes, values, refs);
    let flagged: Vec<usize> = v
        .flagged
        .iter()
        .copied()
        .filter(|c| classes.len() >= 3 && proven.contains(c))
        .collect();
    let (flagged, score) = rank(&flagged, classes, &v.anomaly_index);
    Referenced {
        references: refs.len(),
        flagged,
        anomaly_index: v.anomaly_index,
        score,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::{KindRow, Method};

    /// A finished row of ten classes: class 8 is small in every model (as
    /// the bag is on Fashion-MNIST), `small` far smaller still.
    fn row(model: &str, id: &str, method: Method, small: Option<usize>) -> Row {
        let values: Vec<f64> = (0..10)
            .map(|c| match c {
                _ if Some(c) == small => -6.0,
                8 => -4.1,
                _ => -3.0 + 0.02 * (c % 3) as f64,
            })
            .collect();
        let classes: Vec<usize> = (0..10).collect();
        let v = verdict::analyse("x", &classes, &values);
        Row {
            model: model.into(),
            method,
            flagged: v.flagged.clone(),
            classes,
            anomaly_index: v.anomaly_index.clone(),
            score: None,
            seconds: 1.0,
            clean_accuracy: None,
            report: None,
            values: values.clone(),
            proven: (0..10).collect(),
            referenced: None,
            reference: false,
            by_canvas: vec![KindRow {
                kind: "natural".into(),
                flagged: v.flagged,
                anomaly_index: v.anomaly_index,
                score: None,
                values,
                proven: (0..10).collect(),
                referenced: None,
            }],
            label: None,
            error: None,
            model_id: id.into(),
            settings: String::new(),
        }
    }

    #[test]
    fn against_clean_references_only_the_planted_target_is_flagged() {
        let mut rows = vec![
            row("suspect", "s", Method::Cwp, Some(3)),
            row("clean-a", "a", Method::Cwp, None),
            row("clean-b", "b", Method::Cwp, None),
            row("clean-c", "c", Method::Cwp, None),
        ];
        // On its own, every model flags the easy class 8.
        assert!(rows.iter().all(|r| r.flagged.contains(&8)));
        let refs = ["clean-a", "clean-b", "clean-c"].map(String::from);
        apply(&mut rows, &refs);
        let s = rows[0].referenced.as_ref().unwrap();
        assert_eq!((s.references, s.flagged.as_slice()), (3, &[3][..]));
        assert_eq!(
            rows[0].by_canvas[0].referenced.as_ref().unwrap().flagged,
            [3]
        );
        assert!(!rows[0].reference && rows[1].reference);
        // A clean model is judged against the other two only.
        for r in &rows[1..] {
            let x = r.referenced.as_ref().unwrap();
            assert_eq!(x.references, 2, "{}", r.model);
            assert!(x.flagged.is_empty(), "{}: {x:?}", r.model);
        }
    }

    #[test]
    fn a_copy_of_the_model_is_no_reference_and_nor_is_another_method_or_class_list() {
        let mut copy = row("copy-of-suspect", "s", Method::Cwp, Some(3));
        copy.model = "elsewhere/suspect".into();
        let mut fewer = row("clean-few", "f", Method::Cwp, None);
        fewer.classes.truncate(9);
        let mut rows = vec![
            row("suspect", "s", Method::Cwp, Some(3)),
            copy,
            row("clean-nc", "n", Method::Nc, None),
            fewer,
        ];
        let refs = ["elsewhere/suspect", "clean-nc", "clean-few"].map(String::from);
        apply(&mut rows, &refs);
        assert!(rows[0].referenced.is_none(), "{:?}", rows[0].referenced);
    }

    #[test]
    fn an_unproven_class_is_not_flagged_against_references_either() {
        let mut suspect = row("suspect", "s", Method::Nc, Some(3));
        suspect.proven.retain(|&c| c != 3);
        let mut rows = vec![suspect, row("clean", "a", Method::Nc, None)];
        apply(&mut rows, &["clean".to_string()]);
        let x = rows[0].referenced.as_ref().unwrap();
        assert!(x.flagged.is_empty() && x.score.unwrap() > 2.0, "{x:?}");
    }
}
