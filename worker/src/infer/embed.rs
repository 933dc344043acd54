//! Cell embeddings of a loaded model: input columns mapped onto the model's genes,
//! normalised as in training, tokenised for inference, encoded in batches without
//! gradients and pooled. The pooled vector is written as it is, not L2-normalised: its
//! length carries information (with the per-gene GEPC decoder, cells far from the centre
//! are those whose profile departs most from the average, as in PCA), which k-means and
//! Euclidean neighbours use; cosine neighbours ignore it.

use scfm_common::config::CellEmbedding;
use scfm_common::data::CsrMatrix;
use scfm_common::data::preprocess::normalize_log1p_matrix;
use scfm_common::tokenizer::{Batch, CellTokens, Tokenizer};
use tch::{Kind, Tensor};

use super::align::GeneAlignment;
use super::load::ModelBundle;
use crate::error::Result;
use crate::model::Inputs;

/// Encodes cells with one model.
pub struct Embedder<'a> {
    bundle: &'a ModelBundle,
    tok: Tokenizer,
    batch_size: usize,
    /// `S` of `embedding: decoder_metric` ([`crate::model::ScfmModel::decoder_metric`]).
    readout: Option<Tensor>,
}

impl<'a> Embedder<'a> {
    /// An embedder running `batch_size` cells per forward pass.
    pub fn new(bundle: &'a ModelBundle, batch_size: usize) -> Self {
        let readout = match bundle.cfg().read_out() {
            CellEmbedding::Pooled => None,
            CellEmbedding::DecoderMetric => bundle.model.decoder_metric(),
        };
        Embedder {
            bundle,
            tok: Tokenizer::new(bundle.cfg()),
            batch_size: batch_size.max(1),
            readout,
        }
    }

    /// The embedding width.
    pub fn dim(&self) -> usize {
        self.bundle.cfg().cell_dim()
    }

    /// The model's rows for `counts` (raw counts over the input's columns): each cell's
    /// mapped genes with a positive count, in model-column order, then `normalize_total`
    /// (over the model's genes, as the training shards hold only those) and `log1p`.
    pub fn model_rows(&self, counts: &CsrMatrix, align: &GeneAlignment) -> CsrMatrix {
        let mut indptr = Vec::with_capacity(counts.n_rows + 1);
        indptr.push(0u64);
        let (mut indices, mut data) = (Vec::new(), Vec::new());
        let mut row: Vec<(u32, f32)> = Vec::new();
        for r in 0..counts.n_rows {
            let (g, v) = counts.row(r);
            row.clear();
            row.extend(
                g.iter()
                    .zip(v)
                    .filter(|(_, x)| **x > 0.0)
                    .filter_map(|(&c, &x)| {
                        align.map.get(c as usize).copied().flatten().map(|m| (m, x))
                    }),
            );
            row.sort_unstable_by_key(|&(m, _)| m);
            indices.extend(row.iter().map(|&(m, _)| m));
            data.extend(row.iter().map(|&(_, x)| x));
            indptr.push(indices.len() as u64);
        }
        let mut x = CsrMatrix {
            n_rows: counts.n_rows,
            n_cols: align.n_model,
            indptr,
            indices,
            data,
        };
        normalize_log1p_matrix(&mut x, self.bundle.target_sum);
        x
    }

    /// The inference tokens of each row of `x` (normalised model rows).
    pub fn tokens(&self, x: &CsrMatrix) -> Vec<CellTokens> {
        (0..x.n_rows)
            .map(|r| {
                let (g, v) = x.row(r);
                self.tok.tokenize_inference(g, v)
            })
            .collect()
    }

    /// Cell embeddings `[n, cell_dim]` (row-major, the pooled vectors, through the bottleneck
    /// when the model has one, and in the decoder's metric with `embedding:
    /// decoder_metric`) of normalised model rows.
    pub fn embed(&self, x: &CsrMatrix) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(x.n_rows * self.dim());
        let toks = self.tokens(x);
        let model = &self.bundle.model;
        let device = self.bundle.device();
        tch::no_grad(|| -> Result<()> {
            for chunk in toks.chunks(self.batch_size) {
                let b = Batch::collate(chunk);
                let inputs = Inputs::from_batch(&b, device);
                let cell = model.encode_cells(&inputs, false);
                let cell = cell.to_kind(Kind::Float);
                let cell = match &self.readout {
                    Some(s) => cell.matmul(s),
                    None => cell,
                };
                out.extend(Vec::<f32>::try_from(
                    &cell.to_device(tch::Device::Cpu).reshape([-1]),
                )?);
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// Embeddings of `n` rows `[n, d]` as a tensor (for tests and evaluation).
pub fn as_tensor(rows: &[f32], d: usize) -> Tensor {
    Tensor::from_slice(rows).view([-1, d as i64])
}
