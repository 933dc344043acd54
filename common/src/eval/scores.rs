//! Partition and classification scores, computed as scikit-learn 1.9 does.
//!
//! - [`adjusted_rand_score`]: `sklearn.metrics.adjusted_rand_score` (pair counts in exact
//!   integer arithmetic, the final ratio in `f64` as in Python);
//! - [`normalized_mutual_info_score`]: `normalized_mutual_info_score(...,
//!   average_method="arithmetic")`;
//! - [`accuracy`] and [`macro_f1`]: `accuracy_score` and `f1_score(average="macro",
//!   zero_division=0)` (labels: the union of the true and predicted labels).
//!
//! Labels are arbitrary `u32` values; only equality matters.

use super::silhouette::dense_codes;

/// The non-zero cells of the contingency table of two labellings.
#[derive(Debug, Clone)]
struct Contingency {
    /// Row sums (sizes of the classes of `a`), in increasing label order.
    rows: Vec<u64>,
    /// Column sums (sizes of the classes of `b`).
    cols: Vec<u64>,
    /// `(row, column, count)` of every non-zero cell, row-major.
    cells: Vec<(usize, usize, u64)>,
}

fn contingency(a: &[u32], b: &[u32]) -> Contingency {
    assert_eq!(a.len(), b.len(), "labellings of different lengths");
    let (ca, na) = dense_codes(a);
    let (cb, nb) = dense_codes(b);
    let mut keys: Vec<u64> = ca
        .iter()
        .zip(&cb)
        .map(|(&x, &y)| ((x as u64) << 32) | y as u64)
        .collect();
    keys.sort_unstable();
    let mut out = Contingency {
        rows: vec![0; na],
        cols: vec![0; nb],
        cells: Vec::new(),
    };
    let mut i = 0;
    while i < keys.len() {
        let j = i + keys[i..].iter().take_while(|&&k| k == keys[i]).count();
        let (r, c) = ((keys[i] >> 32) as usize, (keys[i] & 0xFFFF_FFFF) as usize);
        let count = (j - i) as u64;
        out.rows[r] += count;
        out.cols[c] += count;
        out.cells.push((r, c, count));
        i = j;
    }
    out
}

/// Adjusted Rand index of two labellings (`sklearn.metrics.adjusted_rand_score`): 1 for
/// identical partitions, about 0 for independent ones. Panics when the lengths differ.
pub fn adjusted_rand_score(labels_true: &[u32], labels_pred: &[u32]) -> f64 {
    let c = contingency(labels_true, labels_pred);
    let n = labels_true.len() as i128;
    let sum_squares: i128 = c.cells.iter().map(|&(_, _, v)| (v as i128).pow(2)).sum();
    // contingency · n_k summed = Σ_cells v · col[c]; its transpose likewise with rows.
    let by_cols: i128 = c
        .cells
        .iter()
        .map(|&(_, col, v)| v as i128 * c.cols[col] as i128)
        .sum();
    let by_rows: i128 = c
        .cells
        .iter()
        .map(|&(row, _, v)| v as i128 * c.rows[row] as i128)
        .sum();
    let tp = sum_squares - n;
    let fp = by_cols - sum_squares;
    let fn_ = by_rows - sum_squares;
    let tn = n * n - fp - fn_ - sum_squares;
    if fn_ == 0 && fp == 0 {
        return 1.0;
    }
    // Python: 2.0 * (int) / (int), each integer rounded to the nearest float.
    let num = (tp * tn - fn_ * fp) as f64;
    let den = ((tp + fn_) * (fn_ + tn) + (tp + fp) * (fp + tn)) as f64;
    2.0 * num / den
}

/// Entropy (natural log) of a labelling given its class sizes, as sklearn's `_entropy`.
fn entropy(sizes: &[u64]) -> f64 {
    if sizes.len() <= 1 {
        return 0.0;
    }
    let sum: f64 = sizes.iter().map(|&s| s as f64).sum();
    let ln_sum = sum.ln();
    -sizes
        .iter()
        .map(|&s| (s as f64 / sum) * ((s as f64).ln() - ln_sum))
        .sum::<f64>()
}

/// Mutual information (natural log) of two labellings (`sklearn.metrics.mutual_info_score`).
pub fn mutual_info_score(labels_true: &[u32], labels_pred: &[u32]) -> f64 {
    mutual_info(&contingency(labels_true, labels_pred))
}

fn mutual_info(c: &Contingency) -> f64 {
    if c.rows.len() == 1 || c.cols.len() == 1 {
        return 0.0;
    }
    let total: u64 = c.rows.iter().sum();
    let n = total as f64;
    let ln_n = n.ln();
    let ln_pi_sum = (c.rows.iter().sum::<u64>() as f64).ln();
    let ln_pj_sum = (c.cols.iter().sum::<u64>() as f64).ln();
    let mi: f64 = c
        .cells
        .iter()
        .map(|&(r, col, v)| {
            let nm = v as f64 / n;
            let outer = (c.rows[r] as i64 * c.cols[col] as i64) as f64;
            let log_outer = -outer.ln() + ln_pi_sum + ln_pj_sum;
            let term = nm * ((v as f64).ln() - ln_n) + nm * log_outer;
            if term.abs() < f64::EPSILON { 0.0 } else { term }
        })
        .sum();
    mi.max(0.0)
}

/// Normalised mutual information with the arithmetic mean of the entropies as normaliser
/// (`sklearn.metrics.normalized_mutual_info_score`, `average_method="arithmetic"`): 1 for
/// identical partitions (also when both have a single class), 0 for independent ones.
/// Panics when the lengths differ.
pub fn normalized_mutual_info_score(labels_true: &[u32], labels_pred: &[u32]) -> f64 {
    let c = contingency(labels_true, labels_pred);
    if (c.rows.len() == 1 && c.cols.len() == 1) || (c.rows.is_empty() && c.cols.is_empty()) {
        return 1.0;
    }
    let mi = mutual_info(&c);
    if mi == 0.0 {
        return 0.0;
    }
    let normalizer = (entropy(&c.rows) + entropy(&c.cols)) / 2.0;
    mi / normalizer
}

/// Fraction of equal entries (`sklearn.metrics.accuracy_score`). Panics when the lengths
/// differ; NaN for empty input.
pub fn accuracy(labels_true: &[u32], labels_pred: &[u32]) -> f64 {
    assert_eq!(labels_true.len(), labels_pred.len(), "lengths differ");
    let hits = labels_true
        .iter()
        .zip(labels_pred)
        .filter(|(a, b)| a == b)
        .count();
    hits as f64 / labels_true.len() as f64
}

/// Macro-averaged F1 (`sklearn.metrics.f1_score(average="macro", zero_division=0)`): the
/// unweighted mean over the labels present in the truth or the prediction of
/// `2 TP / (2 TP + FP + FN)`. Panics when the lengths differ; NaN for empty input.
pub fn macro_f1(labels_true: &[u32], labels_pred: &[u32]) -> f64 {
    assert_eq!(labels_true.len(), labels_pred.len(), "lengths differ");
    // The union of labels, with their true count, predicted count and hits.
    let mut union: Vec<u32> = labels_true.iter().chain(labels_pred).copied().collect();
    union.sort_unstable();
    union.dedup();
    let idx = |l: &u32| union.binary_search(l).expect("label in union");
    let mut stats = vec![(0u64, 0u64, 0u64); union.len()];
    for (t, p) in labels_true.iter().zip(labels_pred) {
        stats[idx(t)].0 += 1;
        stats[idx(p)].1 += 1;
        if t == p {
            stats[idx(t)].2 += 1;
        }
    }
    let sum: f64 = stats
        .iter()
        .map(|&(t, p, tp)| {
            let denom = (t + p) as f64;
            if denom == 0.0 {
                0.0
            } else {
                2.0 * tp as f64 / denom
            }
        })
        .sum();
    sum / union.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ari_hand_checked() {
        assert_eq!(adjusted_rand_score(&[0, 0, 1, 1], &[1, 1, 0, 0]), 1.0);
        assert_eq!(adjusted_rand_score(&[0, 0, 0, 0], &[0, 0, 0, 0]), 1.0);
        // sklearn docs: adjusted_rand_score([0, 0, 1, 2], [0, 0, 1, 1]) == 0.5714...
        let v = adjusted_rand_score(&[0, 0, 1, 2], &[0, 0, 1, 1]);
        assert!((v - 4.0 / 7.0).abs() < 1e-15, "{v}");
        // sklearn docs: adjusted_rand_score([0, 0, 1, 1], [0, 0, 1, 2]) == 0.5714...
        let v = adjusted_rand_score(&[0, 0, 1, 1], &[0, 0, 1, 2]);
        assert!((v - 4.0 / 7.0).abs() < 1e-15, "{v}");
        // Every same-class pair split: tp = 0, tn = 4, fp = fn = 4 → 2 (0 - 16) / 64 = -0.5.
        let v = adjusted_rand_score(&[0, 0, 1, 1], &[0, 1, 0, 1]);
        assert!((v + 0.5).abs() < 1e-15, "{v}");
    }

    #[test]
    fn ari_large_counts_do_not_overflow() {
        let n = 200_000usize;
        let a: Vec<u32> = (0..n).map(|i| (i % 2) as u32).collect();
        let b: Vec<u32> = (0..n).map(|i| ((i / 2) % 2) as u32).collect();
        let v = adjusted_rand_score(&a, &b);
        assert!(v.abs() < 1e-4, "{v}");
    }

    #[test]
    fn nmi_hand_checked() {
        assert_eq!(
            normalized_mutual_info_score(&[0, 0, 1, 1], &[5, 5, 2, 2]),
            1.0
        );
        assert_eq!(normalized_mutual_info_score(&[3, 3, 3], &[1, 1, 1]), 1.0);
        assert_eq!(
            normalized_mutual_info_score(&[0, 0, 1, 1], &[0, 1, 0, 1]),
            0.0
        );
        assert_eq!(
            normalized_mutual_info_score(&[0, 0, 1, 1], &[0, 0, 0, 0]),
            0.0
        );
        // a = [0,0,1,1], b = [0,0,0,1]: MI = H(a) + H(b) - H(a,b) with
        // H(a) = ln 2, H(b) = -(3/4 ln 3/4 + 1/4 ln 1/4), H(a,b) = -(1/2 ln 1/2 + 2 · 1/4 ln 1/4).
        let ha = 2f64.ln();
        let hb = -(0.75 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
        let hab = -(0.5 * 0.5f64.ln() + 0.5 * 0.25f64.ln());
        let want = (ha + hb - hab) / ((ha + hb) / 2.0);
        let v = normalized_mutual_info_score(&[0, 0, 1, 1], &[0, 0, 0, 1]);
        assert!((v - want).abs() < 1e-14, "{v} vs {want}");
        let mi = mutual_info_score(&[0, 0, 1, 1], &[0, 0, 0, 1]);
        assert!((mi - (ha + hb - hab)).abs() < 1e-15, "{mi}");
    }

    #[test]
    fn accuracy_and_macro_f1_hand_checked() {
        let t = [0, 0, 1, 1, 2];
        let p = [0, 1, 1, 1, 3];
        assert_eq!(accuracy(&t, &p), 0.6);
        // label 0: tp 1, t 2, p 1 → 2/3; label 1: tp 2, t 2, p 3 → 4/5; label 2: 0; label 3: 0
        let want = (2.0 / 3.0 + 0.8) / 4.0;
        assert!((macro_f1(&t, &p) - want).abs() < 1e-15);
        assert_eq!(macro_f1(&[4, 4], &[4, 4]), 1.0);
    }
}
