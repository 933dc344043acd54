//! Per-gene mean and standard deviation of the log1p-normalised expression, measured on a
//! fixed sample of a source's cells: what the GEPC decoder's `scaled` targets are
//! standardised by (`model.gepc_target: scaled`).
//!
//! The sample depends only on the data (never on the rank, the world size or the step),
//! so every worker of a job, and a resumed run, measures the same statistics.

use scfm_common::data::CsrMatrix;
use tch::{Device, Kind, Tensor};

use super::source::CellSource;
use crate::error::{Result, WorkerError};

/// Cells of the sample when a source has more (in runs of [`SAMPLE_RUN`] consecutive rows
/// spread evenly over the whole source).
pub const SAMPLE_CELLS: usize = 8192;
/// Consecutive rows read at each sampled position (shards are read in blocks).
pub const SAMPLE_RUN: usize = 64;

/// Mean and standard deviation (population, zeros included) of each gene's log1p
/// expression over a sample of cells. A gene constant in the sample has `std = 1`, so
/// its target is only centred.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneStats {
    /// Per-gene mean.
    pub mean: Vec<f32>,
    /// Per-gene standard deviation (1 where the sample shows no variation).
    pub std: Vec<f32>,
    /// Cells the statistics were measured on.
    pub n_cells: usize,
}

/// The `(shard, first row, rows)` runs of the sample of a source with `shard_cells` rows per
/// shard: everything when it has at most `max_cells`, else `max_cells / run` runs of `run`
/// rows starting at evenly spaced positions of the concatenated shards (clipped at the end
/// of their shard).
pub fn sample_runs(
    shard_cells: &[usize],
    max_cells: usize,
    run: usize,
) -> Vec<(u32, usize, usize)> {
    let total: usize = shard_cells.iter().sum();
    let run = run.max(1);
    if total <= max_cells {
        return shard_cells
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(s, &n)| (s as u32, 0, n))
            .collect();
    }
    let n_runs = (max_cells / run).max(1);
    let mut starts = Vec::with_capacity(shard_cells.len() + 1);
    let mut acc = 0usize;
    for &n in shard_cells {
        starts.push(acc);
        acc += n;
    }
    let mut out: Vec<(u32, usize, usize)> = Vec::with_capacity(n_runs);
    for i in 0..n_runs {
        let pos = (i as u128 * total as u128 / n_runs as u128) as usize;
        let s = starts.partition_point(|&a| a <= pos) - 1;
        let row = pos - starts[s];
        let len = run.min(shard_cells[s] - row);
        // Runs never overlap: a run that would start inside the previous one is shifted.
        if let Some(&(ps, pr, pl)) = out.last()
            && ps as usize == s
            && pr + pl > row
        {
            let row = pr + pl;
            if row < shard_cells[s] {
                out.push((s as u32, row, run.min(shard_cells[s] - row)));
            }
            continue;
        }
        out.push((s as u32, row, len));
    }
    out
}

/// Running per-gene sums of values and squares.
struct Sums {
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    n: usize,
}

impl Sums {
    fn new(g: usize) -> Self {
        Sums {
            sum: vec![0.0; g],
            sum_sq: vec![0.0; g],
            n: 0,
        }
    }

    /// Adds the rows of `x`; `None` when a column is outside the genes.
    fn add(&mut self, x: &CsrMatrix) -> Option<()> {
        for (&c, &v) in x.indices.iter().zip(&x.data) {
            let c = c as usize;
            let v = f64::from(v);
            *self.sum.get_mut(c)? += v;
            self.sum_sq[c] += v * v;
        }
        self.n += x.n_rows;
        Some(())
    }

    fn finish(self) -> Option<GeneStats> {
        if self.n == 0 {
            return None;
        }
        let nf = self.n as f64;
        let (mean, std) = self
            .sum
            .iter()
            .zip(&self.sum_sq)
            .map(|(&s, &q)| {
                let m = s / nf;
                let sd = (q / nf - m * m).max(0.0).sqrt();
                (m as f32, if sd > 1e-6 { sd as f32 } else { 1.0 })
            })
            .unzip();
        Some(GeneStats {
            mean,
            std,
            n_cells: self.n,
        })
    }
}

impl GeneStats {
    /// SHA-256 of the means and standard deviations (their little-endian bytes, means
    /// first): equal on every worker of a job, which logs it.
    pub fn digest(&self) -> String {
        let bytes: Vec<u8> = self
            .mean
            .iter()
            .chain(&self.std)
            .flat_map(|v| v.to_le_bytes())
            .collect();
        scfm_common::storage::sha256_hex(&bytes)
    }
}

/// Measures [`GeneStats`] of `src` on the sample of [`sample_runs`] (`max_cells` cells in
/// runs of `run` rows).
pub fn gene_stats(src: &dyn CellSource, max_cells: usize, run: usize) -> Result<GeneStats> {
    let mut sums = Sums::new(src.n_genes());
    for (shard, row, len) in sample_runs(&src.shard_cells(), max_cells, run) {
        let block = src.read(shard, row, row + len)?;
        sums.add(&block.x).ok_or_else(|| {
            WorkerError::Data(format!(
                "{}: a column outside the {} genes of the vocabulary",
                src.describe(),
                src.n_genes()
            ))
        })?;
    }
    sums.finish().ok_or_else(|| {
        WorkerError::Data(format!(
            "{}: no cells to measure the genes' statistics on",
            src.describe()
        ))
    })
}

/// [`GeneStats`] of all the rows of `x` (normalised values, `n_genes` columns).
pub fn matrix_stats(x: &CsrMatrix, n_genes: usize) -> Result<GeneStats> {
    let mut sums = Sums::new(n_genes);
    sums.add(x).and_then(|()| sums.finish()).ok_or_else(|| {
        WorkerError::Data(format!(
            "no cells, or columns outside the {n_genes} genes, to measure the genes' statistics on"
        ))
    })
}

/// [`GeneStats`] on a device, to standardise dense profiles.
#[derive(Debug)]
pub struct GeneScale {
    mean: Tensor,
    inv_std: Tensor,
    clip: f64,
}

impl GeneScale {
    /// The statistics as `[1, G]` tensors on `device`; standardised values are clipped to
    /// `±clip` (`model.gepc_clip`). A clip beyond `f32::MAX` is `f32::MAX` (the same: the
    /// values are `f32`), which libtorch's float clamp takes where it refuses larger ones.
    pub fn new(stats: &GeneStats, clip: f64, device: Device) -> Self {
        let g = stats.mean.len() as i64;
        let inv: Vec<f32> = stats.std.iter().map(|s| 1.0 / s).collect();
        GeneScale {
            mean: Tensor::from_slice(&stats.mean).view([1, g]).to(device),
            inv_std: Tensor::from_slice(&inv).view([1, g]).to(device),
            clip: clip.min(f64::from(f32::MAX)),
        }
    }

    /// `clamp((profile - mean) / std, -clip, clip)` of a dense `[N, G]` profile.
    pub fn apply(&self, profile: &Tensor) -> Tensor {
        ((profile.to_kind(Kind::Float) - &self.mean) * &self.inv_std).clamp(-self.clip, self.clip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::MemorySource;

    #[test]
    fn small_sources_are_read_whole_and_large_ones_in_spread_runs() {
        assert_eq!(sample_runs(&[3, 0, 2], 10, 4), vec![(0, 0, 3), (2, 0, 2)]);
        let runs = sample_runs(&[100, 100], 40, 10);
        assert_eq!(runs, vec![(0, 0, 10), (0, 50, 10), (1, 0, 10), (1, 50, 10)]);
        // Runs are clipped at the end of their shard and never overlap.
        let runs = sample_runs(&[5, 5, 5, 5], 12, 4);
        let cells: usize = runs.iter().map(|r| r.2).sum();
        assert!(cells <= 12 && !runs.is_empty(), "{runs:?}");
        for w in runs.windows(2) {
            if w[0].0 == w[1].0 {
                assert!(w[0].1 + w[0].2 <= w[1].1, "{runs:?}");
            }
        }
        for &(s, r, l) in &runs {
            assert!(r + l <= 5 && l > 0, "shard {s}: {runs:?}");
        }
    }

    #[test]
    fn statistics_are_the_population_mean_and_std_with_zeros() {
        // 3 cells x 3 genes of (already normalised) values; gene 2 is never expressed.
        let x = CsrMatrix {
            n_rows: 3,
            n_cols: 3,
            indptr: vec![0, 2, 3, 5],
            indices: vec![0, 1, 1, 0, 1],
            data: vec![1.5, 3.0, 4.0, 2.0, 2.5],
        };
        let src = MemorySource::from_matrix(x.clone());
        let st = gene_stats(&src, 100, 64).unwrap();
        assert_eq!(st, matrix_stats(&x, 3).unwrap());
        assert!(matrix_stats(&x, 1).is_err(), "a column outside the genes");
        assert_eq!(st.n_cells, 3);
        assert_eq!(st.digest(), matrix_stats(&x, 3).unwrap().digest());
        let mut other = st.clone();
        other.std[2] = 2.0;
        assert_ne!(st.digest(), other.digest());
        let g0 = [1.5f64, 0.0, 2.0];
        let g1 = [3.0f64, 4.0, 2.5];
        for (j, v) in [g0, g1].iter().enumerate() {
            let m = v.iter().sum::<f64>() / 3.0;
            let sd = (v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / 3.0).sqrt();
            assert!((f64::from(st.mean[j]) - m).abs() < 1e-6, "gene {j}");
            assert!((f64::from(st.std[j]) - sd).abs() < 1e-6, "gene {j}");
        }
        assert_eq!((st.mean[2], st.std[2]), (0.0, 1.0), "constant gene");
        // Standardising clips at ±clip (10 by default, `model.gepc_clip`).
        let prof = Tensor::from_slice(&[g0[0] as f32, 100.0, 5.0]).view([1, 3]);
        let expect0 = (g0[0] - g0.iter().sum::<f64>() / 3.0) / f64::from(st.std[0]);
        let z1 = (100.0 - st.mean[1]) / st.std[1];
        assert!(z1 > 30.0, "{z1}");
        for (clip, want1) in [
            (10.0, 10.0),
            (30.0, 30.0),
            (f64::MAX, z1),
            (f64::INFINITY, z1),
        ] {
            let scale = GeneScale::new(&st, clip, Device::Cpu);
            let z: Vec<f32> = Vec::try_from(scale.apply(&prof).view([-1])).unwrap();
            assert!((f64::from(z[0]) - expect0).abs() < 1e-5);
            assert!((z[1] - want1).abs() < 1e-4, "clip {clip}: {}", z[1]);
            assert_eq!(z[2], 5.0);
        }
    }
}
