//! The model's own scores on held-out cells: how well it fills in masked expression
//! (MGEM loss, masked-bin accuracy, correlation of reconstructed and true expression on
//! the masked genes) and, with the GEPC decoder, how well the cell embedding alone
//! reconstructs each cell's whole profile.

use scfm_common::data::CsrMatrix;
use scfm_common::rng::Rng;
use scfm_common::tokenizer::{Batch, Profiles, Tokenizer};
use serde::Serialize;
use tch::{Kind, Reduction, Tensor};

use super::load::ModelBundle;
use crate::data::gene_stats::{GeneScale, matrix_stats};
use crate::error::Result;
use crate::model::Inputs;
use scfm_common::config::ExpressionEncoding;
use scfm_common::config::model::GepcTarget;

/// Random stream of the evaluation masks.
const MASK_STREAM: u64 = 0x6576_616c; // "eval"

/// Reconstruction scores.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Reconstruction {
    /// Masked tokens scored.
    pub n_masked: usize,
    /// MGEM loss (cross-entropy over bins, or squared error), mean over masked tokens.
    pub mgem_loss: f64,
    /// Fraction of masked tokens whose most likely bin is the true one (binned only).
    pub masked_bin_accuracy: Option<f64>,
    /// Pearson correlation over all masked tokens of the reconstruction and the truth:
    /// the expected bin vs the true bin (binned), the predicted vs the true log1p value
    /// (continuous). `None` when either side is constant.
    pub masked_pearson: Option<f64>,
    /// Pearson correlation of the GEPC decoder's profile (from the cell embedding alone)
    /// and the true log1p profile over every cell × gene; `None` without the decoder.
    pub gepc_pearson: Option<f64>,
}

/// Running sums for a pooled Pearson correlation.
#[derive(Debug, Default, Clone, Copy)]
pub struct PearsonSums {
    n: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    syy: f64,
    sxy: f64,
}

impl PearsonSums {
    /// Adds pairs.
    pub fn add(&mut self, x: &[f32], y: &[f32]) {
        for (&a, &b) in x.iter().zip(y) {
            let (a, b) = (f64::from(a), f64::from(b));
            self.n += 1.0;
            self.sx += a;
            self.sy += b;
            self.sxx += a * a;
            self.syy += b * b;
            self.sxy += a * b;
        }
    }

    /// The correlation, or `None` when fewer than two pairs or a side has no variance.
    pub fn value(&self) -> Option<f64> {
        if self.n < 2.0 {
            return None;
        }
        let cxx = self.sxx - self.sx * self.sx / self.n;
        let cyy = self.syy - self.sy * self.sy / self.n;
        let cxy = self.sxy - self.sx * self.sy / self.n;
        let scale = self.sxx.abs().max(self.syy.abs()).max(1e-300);
        if cxx <= 1e-12 * scale || cyy <= 1e-12 * scale {
            return None;
        }
        Some((cxy / (cxx * cyy).sqrt()).clamp(-1.0, 1.0))
    }
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        &t.to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .reshape([-1]),
    )?)
}

/// Scores `bundle` on `x` (normalised model rows), masking each cell's genes as training
/// does (`mask_ratio`, seeded by `seed` and the row), `batch_size` cells at a time.
pub fn reconstruction(
    bundle: &ModelBundle,
    x: &CsrMatrix,
    seed: u64,
    batch_size: usize,
) -> Result<Reconstruction> {
    let model = &bundle.model;
    let cfg = bundle.cfg();
    let tok = Tokenizer::new(cfg);
    let device = bundle.device();
    let (mut loss_sum, mut n_masked, mut correct) = (0.0, 0usize, 0usize);
    let (mut masked, mut gepc) = (PearsonSums::default(), PearsonSums::default());
    let rows: Vec<usize> = (0..x.n_rows)
        .filter(|&r| x.indptr[r + 1] > x.indptr[r])
        .collect();
    // Standardised GEPC targets are standardised by the statistics of these cells.
    let scale = match (cfg.has_gepc(), cfg.gepc_target) {
        (true, GepcTarget::Scaled) if !rows.is_empty() => Some(GeneScale::new(
            &matrix_stats(x, bundle.vocab.len())?,
            cfg.gepc_clip,
            device,
        )),
        _ => None,
    };
    tch::no_grad(|| -> Result<()> {
        for chunk in rows.chunks(batch_size.max(1)) {
            let toks: Vec<_> = chunk
                .iter()
                .map(|&r| {
                    let (g, v) = x.row(r);
                    let mut rng = Rng::new(seed, &[MASK_STREAM, r as u64]);
                    tok.tokenize(g, v, None, true, &mut rng)
                })
                .collect();
            let mut b = Batch::collate(&toks);
            b.set_profiles(Profiles::from_rows(chunk.iter().map(|&r| x.row(r))));
            let genes = cfg.has_gepc().then_some(bundle.vocab.len());
            let mut inputs = Inputs::from_batch_with_profiles(&b, device, genes);
            if let Some(s) = &scale {
                inputs.profile = inputs.profile.map(|p| s.apply(&p));
            }
            let out = model.forward(&inputs, false);
            let sel = inputs.masked.unsqueeze(-1);
            let c = out.mgem.size()[2];
            let pred = out.mgem.masked_select(&sel).view([-1, c]);
            let m = pred.size()[0] as usize;
            n_masked += m;
            match cfg.expression {
                ExpressionEncoding::Binned => {
                    let target = inputs.target_bins.masked_select(&inputs.masked);
                    loss_sum += pred
                        .cross_entropy_loss::<Tensor>(&target, None, Reduction::Sum, -100, 0.0)
                        .double_value(&[]);
                    correct += pred
                        .argmax(-1, false)
                        .eq_tensor(&target)
                        .sum(Kind::Int64)
                        .int64_value(&[]) as usize;
                    let bins = Tensor::arange(c, (Kind::Float, device));
                    let expected = (pred.softmax(-1, Kind::Float) * bins).sum_dim_intlist(
                        [-1i64].as_slice(),
                        false,
                        Kind::Float,
                    );
                    masked.add(&host(&expected)?, &host(&target)?);
                }
                ExpressionEncoding::Continuous => {
                    let target = inputs.target_values.masked_select(&inputs.masked);
                    let p = pred.squeeze_dim(-1);
                    loss_sum += p.mse_loss(&target, Reduction::Sum).double_value(&[]);
                    masked.add(&host(&p)?, &host(&target)?);
                }
            }
            if let (Some(p), Some(t)) = (&out.gepc, &inputs.profile) {
                gepc.add(&host(p)?, &host(t)?);
            }
        }
        Ok(())
    })?;
    let binned = cfg.expression == ExpressionEncoding::Binned;
    Ok(Reconstruction {
        n_masked,
        mgem_loss: loss_sum / n_masked.max(1) as f64,
        masked_bin_accuracy: binned.then(|| correct as f64 / n_masked.max(1) as f64),
        masked_pearson: masked.value(),
        gepc_pearson: cfg.has_gepc().then(|| gepc.value()).flatten(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_pearson_matches_the_formula_and_is_safe_on_constants() {
        let mut p = PearsonSums::default();
        p.add(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 5.0, 9.0]);
        // numpy.corrcoef([1,2,3,4],[2,4,5,9])[0,1]
        assert!((p.value().unwrap() - 0.964_763_821_237_732_1).abs() < 1e-12);
        let mut c = PearsonSums::default();
        c.add(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]);
        assert_eq!(c.value(), None);
        assert_eq!(PearsonSums::default().value(), None);
    }
}
