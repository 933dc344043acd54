//! Rows of a batch encoded in groups of similar length.
//!
//! A batch is padded to its longest sequence, and the encoder's cost grows with the padded
//! length of every row: on data whose cells express few genes (the demo's mouse cells keep
//! about 35 genes of 255 after the augmentations, and a batch's longest view about 88) most
//! of a step's tokens are padding. The encoder treats each sequence on its own (attention
//! stays within a sequence; padding is masked out), so the rows can be encoded in groups of
//! similar length, each padded only to its own longest row, and the outputs put back in
//! the batch's order: the same values up to the rounding of sums over fewer padded keys,
//! and gradients the same way. The losses (NT-Xent over the batch, the decoder) run on the
//! reassembled outputs.

use tch::{Device, Kind, Tensor};

use super::Inputs;
use scfm_common::config::model::special;

/// Up to this fraction of the padded tokens must remain after grouping for it to be used
/// (each group adds a pass through the encoder's kernels).
const WORTH: f64 = 0.9;

/// The smallest group, in rows (smaller matmuls lose more than they save).
const MIN_ROWS: usize = 8;

/// Rows of a batch in groups, longest first: each group's rows (indices into the batch)
/// and the length they are padded to.
#[derive(Debug, Clone, PartialEq)]
pub struct Groups {
    /// Each group's rows and padded length.
    pub groups: Vec<(Vec<i64>, i64)>,
}

impl Groups {
    /// The grouping of rows of these `lengths` (tokens per row, `[CLS]` included) into at
    /// most `max_groups` groups that minimises the padded tokens (each group at least
    /// [`MIN_ROWS`] rows), or `None` when one group is best or grouping would keep more than
    /// [`WORTH`] of the padded tokens.
    pub fn of(lengths: &[i64], max_groups: usize) -> Option<Groups> {
        let n = lengths.len();
        let k_max = max_groups.min(n / MIN_ROWS);
        if k_max < 2 {
            return None;
        }
        // Rows longest first (ties in row order, so the grouping is deterministic).
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
        let sorted: Vec<i64> = order.iter().map(|&r| lengths[r]).collect();
        // cost[k][i]: least padded tokens of the first i sorted rows in k groups; a group of
        // sorted rows j..i is padded to sorted[j] (its first, longest row).
        // Group boundaries are taken every `stride` rows (every row up to 256 rows), which
        // keeps the search at most ~256² × groups for large batches.
        let stride = n.div_ceil(256);
        let at = |i: usize| i == 0 || i == n || i.is_multiple_of(stride);
        let inf = i64::MAX / 4;
        let mut cost = vec![vec![inf; n + 1]; k_max + 1];
        let mut cut = vec![vec![0usize; n + 1]; k_max + 1];
        cost[0][0] = 0;
        for k in 1..=k_max {
            for i in ((k * MIN_ROWS)..=n).filter(|&i| at(i)) {
                for j in (((k - 1) * MIN_ROWS)..=(i - MIN_ROWS)).filter(|&j| at(j)) {
                    if cost[k - 1][j] == inf {
                        continue;
                    }
                    let c = cost[k - 1][j] + (i - j) as i64 * sorted[j];
                    if c < cost[k][i] {
                        cost[k][i] = c;
                        cut[k][i] = j;
                    }
                }
            }
        }
        let whole = n as i64 * sorted[0];
        let (best_k, best) = (2..=k_max)
            .map(|k| (k, cost[k][n]))
            .min_by_key(|&(k, c)| (c, k))?;
        if best as f64 > WORTH * whole as f64 {
            return None;
        }
        let mut bounds = vec![n];
        let mut i = n;
        for k in (1..=best_k).rev() {
            i = cut[k][i];
            bounds.push(i);
        }
        bounds.reverse();
        let groups = bounds
            .windows(2)
            .map(|w| {
                let rows = order[w[0]..w[1]].iter().map(|&r| r as i64).collect();
                (rows, sorted[w[0]])
            })
            .collect();
        Some(Groups { groups })
    }

    /// The groups of a batch's rows when `max_groups > 1` and grouping saves enough.
    pub fn of_inputs(x: &Inputs, max_groups: usize) -> Option<Groups> {
        if max_groups < 2 {
            return None;
        }
        let lengths = Vec::<i64>::try_from(
            &x.genes
                .ne(special::PAD)
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)
                .to_device(Device::Cpu),
        )
        .ok()?;
        Groups::of(&lengths, max_groups)
    }

    /// For rows in group order (the groups' rows one after another), the index that puts
    /// them back in the batch's order: `grouped.index_select(0, restore)`.
    pub fn restore_rows(&self, device: Device) -> Tensor {
        let n: usize = self.groups.iter().map(|g| g.0.len()).sum();
        let mut at = vec![0i64; n];
        for (pos, &r) in self.groups.iter().flat_map(|g| g.0.iter()).enumerate() {
            at[r as usize] = pos as i64;
        }
        Tensor::from_slice(&at).to_device(device)
    }

    /// For per-token outputs of the masked tokens in group order (each row's masked tokens
    /// in position order, the rows in group order), the index that puts them in the
    /// batch's row-major order (as `masked_select` over `[N, L]`), given each row's number
    /// of masked tokens.
    pub fn restore_tokens(&self, masked_per_row: &[i64], device: Device) -> Tensor {
        let mut grouped_start = vec![0i64; masked_per_row.len()];
        let mut pos = 0;
        for &r in self.groups.iter().flat_map(|g| g.0.iter()) {
            grouped_start[r as usize] = pos;
            pos += masked_per_row[r as usize];
        }
        let idx: Vec<i64> = masked_per_row
            .iter()
            .enumerate()
            .flat_map(|(r, &c)| (0..c).map(move |j| (r, j)))
            .map(|(r, j)| grouped_start[r] + j)
            .collect();
        Tensor::from_slice(&idx).to_device(device)
    }
}

impl Inputs {
    /// These rows of the batch, padded to `len` tokens (`len` at least their longest; the
    /// columns past it hold only padding). Without the GEPC targets.
    pub fn rows(&self, rows: &[i64], len: i64) -> Inputs {
        let idx = Tensor::from_slice(rows).to_device(self.genes.device());
        let pick = |t: &Tensor| t.index_select(0, &idx).narrow(1, 0, len);
        Inputs {
            genes: pick(&self.genes),
            bins: pick(&self.bins),
            values: pick(&self.values),
            masked: pick(&self.masked),
            target_bins: pick(&self.target_bins),
            target_values: pick(&self.target_values),
            profile: None,
            detected: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padded(g: &Groups) -> i64 {
        g.groups.iter().map(|(r, l)| r.len() as i64 * l).sum()
    }

    #[test]
    fn equal_lengths_are_not_grouped() {
        assert_eq!(Groups::of(&[50; 64], 4), None);
        // Too few rows for two groups of eight.
        assert_eq!(
            Groups::of(&[200, 10, 10, 10, 10, 10, 10, 10, 10, 10], 4),
            None
        );
        assert_eq!(Groups::of(&[200; 64], 1), None);
    }

    #[test]
    fn groups_cover_every_row_once_longest_first() {
        let lengths: Vec<i64> = (0..64).map(|i| 10 + (i * 37 % 64) * 3).collect();
        let g = Groups::of(&lengths, 4).expect("grouped");
        assert!(g.groups.len() >= 2 && g.groups.len() <= 4);
        let mut all: Vec<i64> = g.groups.iter().flat_map(|x| x.0.clone()).collect();
        all.sort();
        assert_eq!(all, (0..64).collect::<Vec<i64>>());
        for (rows, len) in &g.groups {
            assert!(rows.len() >= MIN_ROWS);
            assert_eq!(
                *len,
                rows.iter().map(|&r| lengths[r as usize]).max().unwrap()
            );
        }
        let lens: Vec<i64> = g.groups.iter().map(|x| x.1).collect();
        assert!(lens.windows(2).all(|w| w[0] >= w[1]), "{lens:?}");
        assert!(padded(&g) as f64 <= WORTH * 64.0 * *lengths.iter().max().unwrap() as f64);
    }

    #[test]
    fn the_grouping_is_the_cheapest_of_its_size() {
        // Two clear clusters: 16 long rows and 48 short ones.
        let mut lengths = vec![200i64; 16];
        lengths.extend(vec![20i64; 48]);
        let g = Groups::of(&lengths, 2).expect("grouped");
        assert_eq!(padded(&g), 16 * 200 + 48 * 20);
        // Every split of the sorted rows into two groups of at least MIN_ROWS costs as much
        // or more.
        let mut sorted = lengths.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        let best = (MIN_ROWS..=64 - MIN_ROWS)
            .map(|j| j as i64 * sorted[0] + (64 - j) as i64 * sorted[j])
            .min()
            .unwrap();
        assert_eq!(padded(&g), best);
    }

    /// The exact groups of a case with ties, as `scfm_torch.groups.length_groups` must
    /// choose them too (tests/python/test_scfm_torch.py has the same case): longest first,
    /// equal lengths in row order.
    #[test]
    fn three_clusters_give_three_groups_in_row_order() {
        let lengths: Vec<i64> = (0..40)
            .map(|r| match r % 4 {
                0 => 100,
                1 => 50,
                _ => 10,
            })
            .collect();
        let g = Groups::of(&lengths, 3).expect("grouped");
        let of = |m: i64| (0..40).filter(|r| r % 4 == m).collect::<Vec<i64>>();
        let short: Vec<i64> = (0..40).filter(|r| r % 4 >= 2).collect();
        assert_eq!(
            g.groups,
            vec![(of(0), 100), (of(1), 50), (short, 10)],
            "{:?}",
            g.groups
        );
    }

    #[test]
    fn restoring_puts_rows_and_tokens_back_in_order() {
        let g = Groups {
            groups: vec![(vec![2, 0], 5), (vec![1, 3], 3)],
        };
        let r = Vec::<i64>::try_from(&g.restore_rows(Device::Cpu)).unwrap();
        // Group order is rows 2, 0, 1, 3: row 0 sits at 1, row 1 at 2, row 2 at 0, row 3 at 3.
        assert_eq!(r, vec![1, 2, 0, 3]);
        // Masked tokens per row: 2, 1, 3, 0. Group order: row 2's (3), row 0's (2), row 1's
        // (1): positions 0..3 are row 2, 3..5 row 0, 5 row 1.
        let t = Vec::<i64>::try_from(&g.restore_tokens(&[2, 1, 3, 0], Device::Cpu)).unwrap();
        assert_eq!(t, vec![3, 4, 5, 0, 1, 2]);
    }
}
