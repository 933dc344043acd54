//! The PCA baseline of `scfm evaluate`, scanpy's standard recipe: `normalize_total`
//! (1e4), `log1p`, the top highly variable genes (`seurat_v3` on counts, or `seurat` on
//! the log data), `scale` (zero mean, unit variance with scanpy's unbiased variance, no
//! clipping), then the top principal components of the scaled matrix.
//!
//! The components are the top eigenvectors of the genes × genes covariance (float64), so
//! memory is bounded by the dense cells × HVG matrix and the cost grows linearly with the
//! cells; the scores equal an exact SVD's up to each component's sign.

use scfm_common::data::CsrMatrix;
use scfm_common::data::preprocess::hvg::{SeuratParams, seurat, seurat_v3};
use scfm_common::data::preprocess::normalize::{log1p, normalize_total};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// How highly variable genes are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HvgFlavor {
    /// scanpy `flavor="seurat_v3"` on the counts.
    SeuratV3,
    /// scanpy `flavor="seurat"` on the log-normalised data.
    Seurat,
}

/// Settings of the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PcaSettings {
    /// Highly variable genes kept (all genes when the data has fewer).
    pub n_hvg: usize,
    /// Their flavor.
    pub flavor: HvgFlavor,
    /// Principal components.
    pub n_pcs: usize,
}

impl Default for PcaSettings {
    fn default() -> Self {
        PcaSettings {
            n_hvg: 2000,
            flavor: HvgFlavor::SeuratV3,
            n_pcs: 50,
        }
    }
}

/// The baseline embedding `[n_cells, n_pcs]` (row-major) of raw `counts`, and the number
/// of genes it used.
pub fn pca_baseline(counts: &CsrMatrix, s: &PcaSettings) -> Result<(Vec<f32>, usize, usize)> {
    let n = counts.n_rows;
    let genes: Vec<usize> = if counts.n_cols <= s.n_hvg {
        (0..counts.n_cols).collect()
    } else {
        match s.flavor {
            HvgFlavor::SeuratV3 => seurat_v3(counts, s.n_hvg, 0.3)?.selected,
            HvgFlavor::Seurat => {
                let mut x = counts.clone();
                normalize_total(&mut x, Some(1e4))?;
                log1p(&mut x);
                let p = SeuratParams {
                    n_top_genes: Some(s.n_hvg),
                    ..SeuratParams::default()
                };
                seurat(&x, &p)?.selected
            }
        }
    };
    let mut x = counts.clone();
    normalize_total(&mut x, Some(1e4))?;
    log1p(&mut x);
    // Dense cells × selected genes.
    let g = genes.len();
    let mut col = vec![usize::MAX; counts.n_cols];
    for (k, &c) in genes.iter().enumerate() {
        col[c] = k;
    }
    let mut dense = vec![0f32; n * g];
    for r in 0..n {
        let (idx, val) = x.row(r);
        for (&c, &v) in idx.iter().zip(val) {
            let k = col[c as usize];
            if k != usize::MAX {
                dense[r * g + k] = v;
            }
        }
    }
    let k = s.n_pcs.min(g).min(n.saturating_sub(1)).max(1);
    let scores = tch::no_grad(|| -> Result<Vec<f32>> {
        let m = Tensor::from_slice(&dense)
            .view([n as i64, g as i64])
            .to_kind(Kind::Double);
        let mean = m.mean_dim([0i64].as_slice(), true, Kind::Double);
        let centered = &m - &mean;
        let var = centered
            .square()
            .sum_dim_intlist([0i64].as_slice(), true, Kind::Double)
            / (n as f64 - 1.0).max(1.0);
        // scanpy leaves genes without variance at 0 (their std is taken as 1).
        let std = var.sqrt();
        let std = std.where_self(&std.gt(0.0), &Tensor::ones_like(&std));
        let z = centered / std;
        let cov = z.transpose(0, 1).matmul(&z) / (n as f64 - 1.0).max(1.0);
        let (_, vecs) = cov.linalg_eigh("L");
        // Eigenvalues ascend: the last k columns, largest first.
        let top = vecs.narrow(1, g as i64 - k as i64, k as i64).flip([1i64]);
        // A deterministic sign: each component's largest-magnitude loading positive.
        let idx = top.abs().argmax(0, true);
        let sign = top.gather(0, &idx, false).sign();
        let sign = sign.where_self(&sign.ne(0.0), &Tensor::ones_like(&sign));
        let pcs = z.matmul(&(top * sign)).to_kind(Kind::Float);
        Ok(Vec::<f32>::try_from(
            &pcs.to_device(Device::Cpu).reshape([-1]),
        )?)
    })?;
    Ok((scores, k, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pca_scores_equal_an_svd_of_the_scaled_data() {
        // Cells from two programs of genes, with noise: the first component separates them.
        let mut rng = scfm_common::rng::Rng::new(3, &[]);
        let (n, g) = (60usize, 12usize);
        let mut indptr = vec![0u64];
        let (mut indices, mut data) = (Vec::new(), Vec::new());
        for r in 0..n {
            for c in 0..g {
                let high = (r < n / 2) == (c < g / 2);
                let v = (if high { 20.0 } else { 2.0 }) + (rng.uniform() * 6.0).floor();
                indices.push(c as u32);
                data.push(v as f32);
            }
            indptr.push(indices.len() as u64);
        }
        let x = CsrMatrix {
            n_rows: n,
            n_cols: g,
            indptr,
            indices,
            data,
        };
        let s = PcaSettings {
            n_hvg: 2000,
            flavor: HvgFlavor::SeuratV3,
            n_pcs: 5,
        };
        let (scores, k, used) = pca_baseline(&x, &s).unwrap();
        assert_eq!((k, used), (5, g));
        // SVD of the same scaled matrix: |scores| agree column by column.
        let mut y = x.clone();
        normalize_total(&mut y, Some(1e4)).unwrap();
        log1p(&mut y);
        let m = Tensor::from_slice(&y.data)
            .view([n as i64, g as i64])
            .to_kind(Kind::Double);
        let c = &m - m.mean_dim([0i64].as_slice(), true, Kind::Double);
        let sd = c
            .square()
            .sum_dim_intlist([0i64].as_slice(), true, Kind::Double)
            .divide_scalar((n - 1) as f64)
            .sqrt();
        let z = c / sd;
        let (u, sv, _) = z.svd(true, true);
        let want = (u.narrow(1, 0, 5) * sv.narrow(0, 0, 5)).abs();
        let got = Tensor::from_slice(&scores)
            .view([n as i64, 5])
            .to_kind(Kind::Double)
            .abs();
        let err = (got - want).abs().max().double_value(&[]);
        assert!(err < 1e-4, "max |score| difference {err}");
        // The first component splits the two groups.
        let pc1: Vec<f32> = (0..n).map(|r| scores[r * 5]).collect();
        let a = pc1[..n / 2].iter().all(|&v| v > 0.0);
        let b = pc1[n / 2..].iter().all(|&v| v < 0.0);
        assert!(
            a && b || !a && pc1[..n / 2].iter().all(|&v| v < 0.0),
            "{pc1:?}"
        );
    }
}
