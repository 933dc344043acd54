//! The scfm transformer: embeddings, pre-LN encoder, MGEM and contrastive heads.
//!
//! Parameter names follow PyTorch's `state_dict` conventions (`encoder.layers.0.attn.qkv.weight`,
//! `[out, in]` linear weights) so exported safetensors load into the reference PyTorch
//! module in `tests/python/scfm_ref.py`.

pub mod embedding;
pub mod encoder;
pub mod heads;
pub mod init;
pub mod loss;

use scfm_common::config::model::special;
use scfm_common::config::{ExpressionEncoding, ModelConfig, Pooling};
use scfm_common::tokenizer::Batch;
use tch::{Device, Kind, Tensor, nn};

use crate::error::{Result, WorkerError};

/// A batch on the model's device.
#[derive(Debug)]
pub struct Inputs {
    /// Token ids `[N, L]`.
    pub genes: Tensor,
    /// Input bins `[N, L]`.
    pub bins: Tensor,
    /// Input values `[N, L]`.
    pub values: Tensor,
    /// Masked positions `[N, L]` (bool).
    pub masked: Tensor,
    /// MGEM target bins `[N, L]`.
    pub target_bins: Tensor,
    /// MGEM target values `[N, L]`.
    pub target_values: Tensor,
}

impl Inputs {
    /// Moves a collated [`Batch`] to `device`.
    pub fn from_batch(b: &Batch, device: Device) -> Self {
        let shape = [b.n as i64, b.len as i64];
        let masked: Vec<u8> = b.masked.iter().map(|&m| m as u8).collect();
        Inputs {
            genes: Tensor::from_slice(&b.genes).view(shape).to(device),
            bins: Tensor::from_slice(&b.input_bins).view(shape).to(device),
            values: Tensor::from_slice(&b.input_values).view(shape).to(device),
            masked: Tensor::from_slice(&masked)
                .view(shape)
                .to_kind(Kind::Bool)
                .to(device),
            target_bins: Tensor::from_slice(&b.target_bins).view(shape).to(device),
            target_values: Tensor::from_slice(&b.target_values).view(shape).to(device),
        }
    }
}

/// What a forward pass produces.
#[derive(Debug)]
pub struct Outputs {
    /// Encoder output after the final LayerNorm `[N, L, H]`.
    pub hidden: Tensor,
    /// MGEM logits `[N, L, n_bins]` (binned) or predictions `[N, L, 1]` (continuous).
    pub mgem: Tensor,
    /// Cell embeddings `[N, H]` (pooled, not normalised).
    pub cell: Tensor,
    /// Contrastive projections `[N, projection_dim]`, unit rows.
    pub proj: Tensor,
}

/// The model.
#[derive(Debug)]
pub struct ScfmModel {
    /// Its configuration.
    pub cfg: ModelConfig,
    /// Number of genes in the vocabulary.
    pub n_genes: usize,
    embed: embedding::TokenEmbedding,
    layers: Vec<encoder::Block>,
    norm: nn::LayerNorm,
    mgem: heads::MgemHead,
    proj: heads::ProjectionHead,
    compute: Option<Kind>,
}

impl ScfmModel {
    /// Builds the model's parameters in `vs` after validating the configuration.
    pub fn new(vs: &nn::VarStore, cfg: &ModelConfig, n_genes: usize) -> Result<Self> {
        cfg.validate()?;
        cfg.validate_vocab(n_genes)?;
        let p = vs.root();
        let h = cfg.hidden as i64;
        let embed =
            embedding::TokenEmbedding::new(&(&p / "embed"), cfg, ModelConfig::n_tokens(n_genes));
        let layers = (0..cfg.n_layers)
            .map(|i| {
                encoder::Block::new(
                    &(&p / "encoder" / "layers" / i),
                    h,
                    cfg.n_heads as i64,
                    cfg.ffn_dim as i64,
                    cfg.dropout,
                )
            })
            .collect();
        let norm = nn::layer_norm(&p / "encoder" / "norm", vec![h], Default::default());
        let n_out = match cfg.expression {
            ExpressionEncoding::Binned => cfg.n_bins as i64,
            ExpressionEncoding::Continuous => 1,
        };
        let mgem = heads::MgemHead::new(&(&p / "mgem"), h, n_out);
        let proj = heads::ProjectionHead::new(&(&p / "contrastive"), h, cfg.projection_dim as i64);
        let model = ScfmModel {
            cfg: cfg.clone(),
            n_genes,
            embed,
            layers,
            norm,
            mgem,
            proj,
            compute: None,
        };
        let counted: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        let expected = cfg.param_count(n_genes) as i64;
        if counted != expected {
            return Err(WorkerError::Internal(format!(
                "parameter count {counted} != formula {expected}"
            )));
        }
        Ok(model)
    }

    /// Sets the precision of the encoder's matmuls and attention (`None` = fp32,
    /// `Some(Kind::BFloat16)` = bf16 autocast). Parameters, LayerNorms, heads, losses and
    /// the optimizer stay fp32.
    pub fn set_compute_kind(&mut self, kind: Option<Kind>) {
        self.compute = kind;
    }

    /// Forward pass; `train` enables dropout.
    pub fn forward(&self, x: &Inputs, train: bool) -> Outputs {
        let valid = x.genes.ne(special::PAD);
        let attend = valid.unsqueeze(1).unsqueeze(1);
        let mut h = self
            .embed
            .forward(&x.genes, &x.bins, &x.values, &x.masked, train);
        for layer in &self.layers {
            h = layer.forward(&h, &attend, train, self.compute);
        }
        let hidden = h.apply(&self.norm);
        let mgem = self.mgem.forward(&hidden);
        let cell = match self.cfg.pooling {
            Pooling::Cls => hidden.select(1, 0),
            Pooling::Mean => {
                let len = hidden.size()[1];
                let genes_only = valid
                    .narrow(1, 1, len - 1)
                    .unsqueeze(-1)
                    .to_kind(hidden.kind());
                let sum = (hidden.narrow(1, 1, len - 1) * &genes_only).sum_dim_intlist(
                    [1i64].as_slice(),
                    false,
                    None,
                );
                sum / genes_only
                    .sum_dim_intlist([1i64].as_slice(), false, None)
                    .clamp_min(1.0)
            }
        };
        let proj = self.proj.forward(&cell);
        Outputs {
            hidden,
            mgem,
            cell,
            proj,
        }
    }

    /// The MGEM loss for `out` on `x`'s masked tokens.
    pub fn mgem_loss(&self, out: &Outputs, x: &Inputs) -> Tensor {
        match self.cfg.expression {
            ExpressionEncoding::Binned => loss::mgem_cross_entropy(
                &out.mgem,
                &x.target_bins,
                &x.masked,
                self.cfg.label_smoothing,
            ),
            ExpressionEncoding::Continuous => {
                loss::mgem_mse(&out.mgem, &x.target_values, &x.masked)
            }
        }
    }
}

impl ScfmModel {
    /// The MGEM loss *summed* over `x`'s masked tokens (divide by the global count).
    pub fn mgem_loss_sum(&self, out: &Outputs, x: &Inputs) -> Tensor {
        match self.cfg.expression {
            ExpressionEncoding::Binned => loss::mgem_cross_entropy_sum(
                &out.mgem,
                &x.target_bins,
                &x.masked,
                self.cfg.label_smoothing,
            ),
            ExpressionEncoding::Continuous => {
                loss::mgem_sse(&out.mgem, &x.target_values, &x.masked)
            }
        }
    }
}

/// The losses of one micro-batch.
#[derive(Debug)]
pub struct Losses {
    /// `w_mgem * mgem + w_contrastive * contrastive` (differentiable).
    pub total: Tensor,
    /// MGEM loss value.
    pub mgem: f64,
    /// NT-Xent value.
    pub contrastive: f64,
}

impl ScfmModel {
    /// Forward and losses for a batch holding two views per cell (rows `i`, `i + B`).
    pub fn losses(&self, x: &Inputs, train: bool) -> Losses {
        let out = self.forward(x, train);
        let mgem = self.mgem_loss(&out, x);
        let con = loss::nt_xent(&out.proj, self.cfg.temperature);
        let total = &mgem * self.cfg.w_mgem + &con * self.cfg.w_contrastive;
        Losses {
            mgem: mgem.double_value(&[]),
            contrastive: con.double_value(&[]),
            total,
        }
    }
}

#[cfg(test)]
mod tests;
