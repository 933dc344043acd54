//! kNN label transfer scored by stratified cross-validation.
//!
//! [`stratified_kfold`] assigns test folds as scikit-learn's `StratifiedKFold._make_test_folds`
//! does: without shuffling the assignment is identical to scikit-learn's; with a seed each
//! class's block of fold numbers is shuffled with scfm's generator (the same design as
//! `shuffle=True`, not the same draws). [`knn_cross_validate`] then predicts every cell of a
//! fold from its `k` nearest neighbours among the cells of the other folds by majority vote
//! (uniform weights; ties go to the smallest label, as `KNeighborsClassifier` does) and
//! scores each fold with accuracy and macro-F1 (see [`super::scores`]).

use serde::Serialize;

use super::distance::{Embedding, Metric, Norms, Rows};
use super::knn::knn_scan;
use super::scores::{accuracy, macro_f1};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Test fold (`0..n_splits`) of every cell, stratified by `labels` as scikit-learn's
/// `StratifiedKFold(n_splits, shuffle=seed.is_some())`.
///
/// Classes are taken in order of first appearance; the number of cells of each class in
/// each fold comes from dealing the label-sorted cells round-robin to the folds; each class's
/// cells receive their fold numbers in blocks (`0, 0, …, 1, 1, …`) in cell order, or, with
/// `seed`, those blocks shuffled. Fails when `n_splits < 2` or when every class has fewer
/// than `n_splits` cells (scikit-learn's error); smaller classes are allowed, as in
/// scikit-learn (which only warns).
pub fn stratified_kfold(labels: &[u32], n_splits: usize, seed: Option<u64>) -> Result<Vec<u32>> {
    if n_splits < 2 {
        return Err(Error::eval(format!("n_splits = {n_splits}: at least 2")));
    }
    if labels.len() < n_splits {
        return Err(Error::eval(format!(
            "{n_splits} folds of {} cells: at least one cell per fold",
            labels.len()
        )));
    }
    // Encode classes by order of first appearance.
    let mut first: Vec<(u32, usize)> = Vec::new(); // (label, first index), sorted by label
    let mut enc = vec![0u32; labels.len()];
    let mut order: Vec<u32> = Vec::new(); // label of each encoded class
    {
        let mut seen = std::collections::HashMap::new();
        for (i, &l) in labels.iter().enumerate() {
            let next = seen.len() as u32;
            let c = *seen.entry(l).or_insert_with(|| {
                order.push(l);
                first.push((l, i));
                next
            });
            enc[i] = c;
        }
    }
    let n_classes = order.len();
    let mut counts = vec![0usize; n_classes];
    for &c in &enc {
        counts[c as usize] += 1;
    }
    if counts.iter().all(|&c| c < n_splits) {
        return Err(Error::eval(format!(
            "n_splits = {n_splits} is greater than the number of cells in every class (largest: {})",
            counts.iter().max().unwrap()
        )));
    }
    // allocation[f][c]: cells of class c among the positions p ≡ f (mod n_splits) of the
    // class-sorted cells (class c occupies positions start..start + counts[c]).
    let mut allocation = vec![vec![0usize; n_classes]; n_splits];
    let mut start = 0;
    for (c, &count) in counts.iter().enumerate() {
        for (f, alloc) in allocation.iter_mut().enumerate() {
            // positions p in [start, start + count) with p % n_splits == f
            let first_p = start + (f + n_splits - start % n_splits) % n_splits;
            alloc[c] = if first_p < start + count {
                (start + count - 1 - first_p) / n_splits + 1
            } else {
                0
            };
        }
        start += count;
    }
    let mut rng = seed.map(|s| Rng::new(s, &[0x5F01D5]));
    let mut folds = vec![0u32; labels.len()];
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_classes];
    for (i, &c) in enc.iter().enumerate() {
        members[c as usize].push(i);
    }
    for (c, cells) in members.iter().enumerate() {
        let mut block: Vec<u32> = (0..n_splits)
            .flat_map(|f| std::iter::repeat_n(f as u32, allocation[f][c]))
            .collect();
        if let Some(r) = rng.as_mut() {
            r.shuffle(&mut block);
        }
        for (&i, &f) in cells.iter().zip(&block) {
            folds[i] = f;
        }
    }
    Ok(folds)
}

/// Result of [`knn_cross_validate`].
#[derive(Debug, Clone, Serialize)]
pub struct KnnCv {
    /// Mean over folds of the fold's accuracy.
    pub accuracy: f64,
    /// Mean over folds of the fold's macro-F1.
    pub macro_f1: f64,
    /// Accuracy of every fold.
    pub fold_accuracy: Vec<f64>,
    /// Macro-F1 of every fold.
    pub fold_macro_f1: Vec<f64>,
    /// The out-of-fold prediction of every cell.
    #[serde(skip)]
    pub predictions: Vec<u32>,
}

/// Majority label among `neighbors` (ties: the smallest label).
fn vote(neighbors: &[u32], labels: &[u32], scratch: &mut Vec<(u32, u32)>) -> u32 {
    scratch.clear();
    scratch.extend(neighbors.iter().map(|&j| (labels[j as usize], 0)));
    scratch.sort_unstable();
    let mut best = (0u32, u32::MAX);
    let mut i = 0;
    while i < scratch.len() {
        let l = scratch[i].0;
        let run = scratch[i..].iter().take_while(|x| x.0 == l).count() as u32;
        if run > best.0 {
            best = (run, l);
        }
        i += run as usize;
    }
    best.1
}

/// kNN classification of every cell from the cells of the other folds: `k` neighbours
/// under `metric`, majority vote, scored per fold. `folds[i]` is cell `i`'s test fold (see
/// [`stratified_kfold`]); when a fold's training set has fewer than `k` cells, all of them
/// vote. `threads`: 0 for all cores (the result does not depend on it).
pub fn knn_cross_validate(
    emb: &Embedding,
    labels: &[u32],
    folds: &[u32],
    k: usize,
    metric: Metric,
    threads: usize,
) -> Result<KnnCv> {
    let n = emb.n();
    if labels.len() != n || folds.len() != n {
        return Err(Error::eval(format!(
            "{} labels and {} folds for {n} cells",
            labels.len(),
            folds.len()
        )));
    }
    if k == 0 {
        return Err(Error::eval("k = 0 neighbours"));
    }
    let n_folds = folds.iter().max().map_or(0, |&f| f as usize + 1);
    let mut fold_size = vec![0usize; n_folds];
    for &f in folds {
        fold_size[f as usize] += 1;
    }
    if let Some(f) = (0..n_folds).find(|&f| fold_size[f] == 0 || fold_size[f] == n) {
        return Err(Error::eval(format!(
            "fold {f} has {} of {n} cells: every fold needs test and training cells",
            fold_size[f]
        )));
    }
    let rows = Rows {
        emb: *emb,
        order: None,
    };
    let norms = Norms::new(emb, metric, None);
    let nn = knn_scan(&rows, &norms, k, threads, |q, r| folds[q] != folds[r]);
    let mut predictions = vec![0u32; n];
    let mut scratch = Vec::new();
    for (i, p) in predictions.iter_mut().enumerate() {
        let (idx, _) = nn.neighbors(i);
        let have = idx.iter().take_while(|&&j| j != u32::MAX).count();
        *p = vote(&idx[..have], labels, &mut scratch);
    }
    let mut fold_accuracy = Vec::with_capacity(n_folds);
    let mut fold_macro_f1 = Vec::with_capacity(n_folds);
    for f in 0..n_folds as u32 {
        let (t, p): (Vec<u32>, Vec<u32>) = (0..n)
            .filter(|&i| folds[i] == f)
            .map(|i| (labels[i], predictions[i]))
            .unzip();
        fold_accuracy.push(accuracy(&t, &p));
        fold_macro_f1.push(macro_f1(&t, &p));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok(KnnCv {
        accuracy: mean(&fold_accuracy),
        macro_f1: mean(&fold_macro_f1),
        fold_accuracy,
        fold_macro_f1,
        predictions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unshuffled_folds_hand_checked() {
        // sklearn: StratifiedKFold(3)._make_test_folds(X, y) for y = [1,1,1,1,0,0,0,1,1,0]
        // classes by appearance: 1 → 0 (6 cells), 0 → 1 (4 cells); sorted y_enc:
        // [0]*6 + [1]*4; fold f gets positions ≡ f (mod 3): class 0 → [2, 2, 2],
        // class 1 (positions 6..10) → fold 0: 6, 9; fold 1: 7; fold 2: 8 → [2, 1, 1].
        let y = [1, 1, 1, 1, 0, 0, 0, 1, 1, 0];
        let f = stratified_kfold(&y, 3, None).unwrap();
        // class "1" cells (0,1,2,3,7,8) get 0,0,1,1,2,2; class "0" cells (4,5,6,9) get 0,0,1,2
        assert_eq!(f, vec![0, 0, 1, 1, 0, 0, 1, 2, 2, 2]);
        assert!(stratified_kfold(&y, 7, None).is_err());
        assert!(stratified_kfold(&y, 1, None).is_err());
    }

    #[test]
    fn shuffled_folds_keep_the_allocation() {
        let y: Vec<u32> = (0..103)
            .map(|i| (i * 7 % 5) as u32 + (i % 2) as u32)
            .collect();
        let a = stratified_kfold(&y, 5, None).unwrap();
        let b = stratified_kfold(&y, 5, Some(3)).unwrap();
        assert_eq!(b, stratified_kfold(&y, 5, Some(3)).unwrap());
        assert_ne!(a, b);
        for l in 0..6 {
            for f in 0..5 {
                let count = |v: &[u32]| (0..y.len()).filter(|&i| y[i] == l && v[i] == f).count();
                assert_eq!(count(&a), count(&b), "label {l} fold {f}");
            }
        }
    }

    #[test]
    fn vote_breaks_ties_by_smallest_label() {
        let labels = [3, 1, 1, 3, 2];
        let mut s = Vec::new();
        assert_eq!(vote(&[0, 1, 2, 3], &labels, &mut s), 1);
        assert_eq!(vote(&[0, 3, 4], &labels, &mut s), 3);
        assert_eq!(vote(&[4, 0], &labels, &mut s), 2);
    }

    #[test]
    fn one_dimensional_cross_validation_hand_checked() {
        // Two well separated groups on a line, one mislabelled cell (index 2) inside group 0.
        let x: Vec<f32> = vec![0.0, 0.1, 0.25, 0.3, 10.0, 10.1, 10.2, 10.3];
        let labels = [0, 0, 1, 0, 1, 1, 1, 1];
        let folds = [0, 1, 0, 1, 0, 1, 0, 1];
        let emb = Embedding::new(&x, 8, 1).unwrap();
        let cv = knn_cross_validate(&emb, &labels, &folds, 1, Metric::Euclidean, 1).unwrap();
        // cell 2 (fold 0): nearest fold-1 cell is 3 → label 0; cell 3 (fold 1): nearest
        // fold-0 cell is 2 → label 1.
        assert_eq!(cv.predictions, vec![0, 0, 0, 1, 1, 1, 1, 1]);
        // fold 0: cells 0,2,4,6 → truth 0,1,1,1 vs 0,0,1,1: accuracy 3/4;
        // F1: label 0: 2·1/(1+2) = 2/3, label 1: 2·2/(3+2) = 4/5.
        // fold 1: cells 1,3,5,7 → truth 0,0,1,1 vs 0,1,1,1: accuracy 3/4, F1 (2/3 + 4/5) / 2.
        assert_eq!(cv.fold_accuracy, vec![0.75, 0.75]);
        assert!((cv.macro_f1 - (2.0 / 3.0 + 0.8) / 2.0).abs() < 1e-15);
        assert!(knn_cross_validate(&emb, &labels, &[0; 8], 1, Metric::Euclidean, 1).is_err());
    }
}
