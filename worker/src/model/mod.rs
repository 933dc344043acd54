//! The scfm transformer: embeddings, pre-LN encoder, MGEM and contrastive heads.
//!
//! Parameter names follow PyTorch's `state_dict` conventions (`encoder.layers.0.attn.qkv.weight`,
//! `[out, in]` linear weights) so exported safetensors load into the reference PyTorch
//! module in `tests/python/scfm_ref.py`.

pub mod embedding;
pub mod encoder;
pub mod groups;
pub mod heads;
pub mod init;
pub mod loss;
pub mod stages;

use scfm_common::config::model::GepcGenes;
use scfm_common::config::model::special;
use scfm_common::config::{ExpressionEncoding, ModelConfig, Pooling};
use scfm_common::tokenizer::Batch;
use tch::{Device, Kind, Reduction, Tensor, nn};

use crate::error::{Result, WorkerError};
use groups::Groups;

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
    /// Each sequence's whole cell profile `[N, G]` (dense over the vocabulary), the GEPC
    /// decoder's targets; `None` when the batch carries no profiles or the model has no
    /// decoder.
    pub profile: Option<Tensor>,
    /// Each profile's genes-detected covariate `[N]` ([`heads::detected_covariate`]), with
    /// `profile`.
    pub detected: Option<Tensor>,
}

impl Inputs {
    /// Moves a collated [`Batch`] to `device`, with the dense profiles of `n_genes` genes
    /// when `n_genes` is given and the batch has them.
    pub fn from_batch_with_profiles(b: &Batch, device: Device, n_genes: Option<usize>) -> Self {
        let mut x = Self::from_batch(b, device);
        if let Some(g) = n_genes
            && b.profiles.n_rows() == b.n
            && b.n > 0
        {
            x.profile = Some(
                Tensor::from_slice(&b.profiles.dense(g))
                    .view([b.n as i64, g as i64])
                    .to(device),
            );
            let p = &b.profiles;
            let detected: Vec<f32> = (0..b.n)
                .map(|r| heads::detected_covariate(&p.values[p.indptr[r]..p.indptr[r + 1]]))
                .collect();
            x.detected = Some(Tensor::from_slice(&detected).to(device));
        }
        x
    }

    /// Moves a collated [`Batch`] to `device` (without profiles).
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
            profile: None,
            detected: None,
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
    /// Cell embeddings `[N, C]` (pooled, through the bottleneck when the model has one;
    /// not normalised).
    pub cell: Tensor,
    /// Contrastive projections `[N, projection_dim]`, unit rows.
    pub proj: Tensor,
    /// GEPC predictions `[N, G]` of every gene's expression from the cell embedding.
    pub gepc: Option<Tensor>,
}

/// What a training forward produces: only what the losses need.
#[derive(Debug)]
pub struct TrainOutputs {
    /// MGEM logits `[M, n_bins]` (or predictions `[M, 1]`) of the masked tokens, in
    /// row-major order (as `masked_select` over `[N, L]`).
    pub mgem: Tensor,
    /// Cell embeddings `[N, C]` (`C` = `cell_dim()`).
    pub cell: Tensor,
    /// Contrastive projections `[N, projection_dim]`, unit rows.
    pub proj: Tensor,
    /// GEPC predictions `[N, G]`; `None` without the decoder, and without the batch's
    /// profiles (the decoder's only reader is its loss).
    pub gepc: Option<Tensor>,
}

/// Query positions for the last block: `[CLS]` then each row's masked positions, padded
/// with 0 to the longest row. Returns `(idx [N, K], selects_masked [N, K])`.
fn query_index(masked: &Tensor) -> (Tensor, Tensor) {
    let (n, l) = masked.size2().expect("masked is [N, L]");
    let m: Vec<u8> = Vec::<u8>::try_from(
        &masked
            .to_kind(Kind::Uint8)
            .to_device(Device::Cpu)
            .reshape([-1]),
    )
    .expect("mask to host");
    let rows: Vec<Vec<i64>> = (0..n as usize)
        .map(|r| {
            (0..l as usize)
                .filter(|&c| m[r * l as usize + c] != 0)
                .map(|c| c as i64)
                .collect()
        })
        .collect();
    let k = 1 + rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut idx = vec![0i64; n as usize * k];
    let mut sel = vec![0u8; n as usize * k];
    for (r, cols) in rows.iter().enumerate() {
        for (j, &c) in cols.iter().enumerate() {
            idx[r * k + 1 + j] = c;
            sel[r * k + 1 + j] = 1;
        }
    }
    let dev = masked.device();
    let shape = [n, k as i64];
    (
        Tensor::from_slice(&idx).view(shape).to_device(dev),
        Tensor::from_slice(&sel)
            .view(shape)
            .to_kind(Kind::Bool)
            .to_device(dev),
    )
}

/// `[N, G]`: 1 where vocabulary gene `g` is not among row `n`'s unmasked gene tokens
/// (masked, left out of the view, or not expressed), else 0.
pub fn unseen_genes(x: &Inputs, g: i64) -> Tensor {
    let visible = x
        .genes
        .ge(special::OFFSET)
        .logical_and(&x.masked.logical_not());
    // Hidden and special tokens all point at a spare column G, cut off at the end.
    let idx = (&x.genes - special::OFFSET).where_scalarother(&visible, g);
    let n = x.genes.size()[0];
    Tensor::ones([n, g + 1], (Kind::Float, x.genes.device()))
        .scatter_value(1, &idx, 0.0)
        .narrow(1, 0, g)
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
    latent: Option<nn::Linear>,
    mgem: heads::MgemHead,
    proj: heads::ProjectionHead,
    gepc: Option<heads::GepcHead>,
    compute: Option<Kind>,
    /// The most groups of similar length the encoder runs a batch's rows in ([`groups`]).
    length_groups: usize,
}

/// Groups of similar length a model runs a batch's rows in unless told otherwise
/// (`training.length_groups`).
pub const DEFAULT_LENGTH_GROUPS: usize = 4;

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
        let c = cfg.cell_dim() as i64;
        let latent = cfg
            .latent_dim
            .map(|d| init::linear_unit(&(&p / "latent"), h, d as i64));
        let proj =
            heads::ProjectionHead::new(&(&p / "contrastive"), c, h, cfg.projection_dim as i64);
        let gepc = cfg.has_gepc().then(|| {
            heads::GepcHead::new(
                &(&p / "gepc"),
                c,
                h,
                n_genes as i64,
                cfg.gepc_detected,
                cfg.gepc_decoder,
            )
        });
        let model = ScfmModel {
            cfg: cfg.clone(),
            n_genes,
            embed,
            layers,
            norm,
            latent,
            mgem,
            proj,
            gepc,
            compute: None,
            length_groups: DEFAULT_LENGTH_GROUPS,
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

    /// Sets the most groups of similar length the encoder runs a batch's rows in (1: the
    /// whole batch padded to its longest row); see [`groups`].
    pub fn set_length_groups(&mut self, groups: usize) {
        self.length_groups = groups.max(1);
    }

    /// The pooled cell embeddings `[N, C]` of a batch (as [`ScfmModel::encode`]'s), the
    /// rows run in groups of similar length when that saves padding; `train` enables
    /// dropout.
    pub fn encode_cells(&self, x: &Inputs, train: bool) -> Tensor {
        match Groups::of_inputs(x, self.length_groups) {
            None => self.encode(x, train).1,
            Some(g) => {
                let cells: Vec<Tensor> = g
                    .groups
                    .iter()
                    .map(|(rows, len)| self.encode(&x.rows(rows, *len), train).1)
                    .collect();
                Tensor::cat(&cells, 0).index_select(0, &g.restore_rows(x.genes.device()))
            }
        }
    }

    /// The encoder's output after the final LayerNorm `[N, L, H]` and the pooled cell
    /// embeddings `[N, C]` (through the bottleneck when there is one; not normalised);
    /// `train` enables dropout.
    pub fn encode(&self, x: &Inputs, train: bool) -> (Tensor, Tensor) {
        self.encode_cut(x, train, None)
    }

    /// [`ScfmModel::encode`], cutting the residual stream after the embeddings and after
    /// every block when `cuts` is given (see [`stages`]).
    fn encode_cut(
        &self,
        x: &Inputs,
        train: bool,
        mut cuts: Option<&mut stages::Cuts>,
    ) -> (Tensor, Tensor) {
        let valid = x.genes.ne(special::PAD);
        let attend = valid.unsqueeze(1).unsqueeze(1);
        let mut h = self
            .embed
            .forward(&x.genes, &x.bins, &x.values, &x.masked, train);
        for layer in &self.layers {
            // After the embeddings and after every block.
            h = stages::cut(h, &mut cuts);
            h = layer.forward(&h, &attend, train, self.compute);
        }
        let hidden = stages::cut(h, &mut cuts).apply(&self.norm);
        let pooled = match self.cfg.pooling {
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
        let cell = self.to_cell(pooled);
        (hidden, cell)
    }

    /// The cell embedding of pooled encoder outputs `[N, H]`: through the bottleneck
    /// (`model.latent_dim`) when the model has one.
    fn to_cell(&self, pooled: Tensor) -> Tensor {
        match &self.latent {
            Some(l) => pooled.apply(l),
            None => pooled,
        }
    }

    /// Forward pass; `train` enables dropout.
    pub fn forward(&self, x: &Inputs, train: bool) -> Outputs {
        let (hidden, cell) = self.encode(x, train);
        let mgem = self.mgem.forward(&hidden);
        let proj = self.proj.forward(&cell);
        let gepc = self.gepc_forward(&cell, x.detected.as_ref());
        Outputs {
            hidden,
            mgem,
            cell,
            proj,
            gepc,
        }
    }

    /// The GEPC decoder's predictions for cell embeddings `[N, C]` (and the cells'
    /// genes-detected covariates `[N]`, used by a decoder with `gepc_detected`), if the
    /// model has it.
    pub fn gepc_forward(&self, cell: &Tensor, detected: Option<&Tensor>) -> Option<Tensor> {
        let g = self.n_genes as i64;
        self.gepc.as_ref().map(|d| {
            d.forward(
                cell,
                &self.embed.gene_table().narrow(0, special::OFFSET, g),
                detected,
            )
        })
    }

    /// The read-out matrix of `embedding: decoder_metric`, `S = A^(w/2)` `[C, C]` (float, on
    /// the model's device) with `A = MᵀM / G`, `M` `[G, C]` the GEPC decoder's linear map of
    /// the cell embedding and `w` the model's `metric_weight`. At `w = 1`
    /// `‖(c₁ − c₂) S‖² = ‖M (c₁ − c₂)‖² / G`, the decoded profiles' mean squared difference;
    /// at `w = 0`, `S = I`. Computed in double precision through an eigendecomposition
    /// (eigenvalues below 0 from rounding count as 0); `None` without the decoder.
    pub fn decoder_metric(&self) -> Option<Tensor> {
        let d = self.gepc.as_ref()?;
        let g = self.n_genes as i64;
        let power = self.cfg.metric_weight / 2.0;
        Some(tch::no_grad(|| {
            let genes = self.embed.gene_table().narrow(0, special::OFFSET, g);
            let map = d.linear_map(&genes).to_kind(Kind::Double); // [C, G]
            let gram = map.matmul(&map.transpose(0, 1)) / g.max(1) as f64;
            let (eig, vecs) = gram.linalg_eigh("L");
            let root = &vecs * eig.clamp_min(0.0).pow_tensor_scalar(power).unsqueeze(0);
            root.matmul(&vecs.transpose(0, 1)).to_kind(Kind::Float)
        }))
    }

    /// The training forward's GEPC predictions: only when the batch has the profiles its
    /// loss needs (for a 20,000-gene vocabulary the decoder is ~10 GFLOP per step for
    /// `default`, which a batch without profiles would spend for nothing).
    fn gepc_train(&self, cell: &Tensor, x: &Inputs) -> Option<Tensor> {
        x.profile
            .as_ref()
            .and_then(|_| self.gepc_forward(cell, x.detected.as_ref()))
    }

    /// The mean squared error of the GEPC predictions against the cell profiles, when the
    /// model has the decoder and the batch its targets: over every gene, or with
    /// `gepc_genes: unseen` over the genes each view does not show unmasked.
    pub fn gepc_loss(&self, pred: Option<&Tensor>, x: &Inputs) -> Option<Tensor> {
        match (pred, &x.profile) {
            (Some(p), Some(t)) => Some(match self.cfg.gepc_genes {
                GepcGenes::All => p.mse_loss(t, Reduction::Mean),
                GepcGenes::Unseen => {
                    let w = unseen_genes(x, self.n_genes as i64);
                    ((p - t).square() * &w).sum(Kind::Float) / w.sum(Kind::Float).clamp_min(1.0)
                }
            }),
            _ => None,
        }
    }

    /// The training forward: like [`ScfmModel::forward`] but the last block runs only for
    /// `[CLS]` and the masked tokens (with `cls` pooling), whose outputs are all the losses
    /// use, and the MGEM head only for the masked tokens (either pooling); the rest is dead
    /// code there. Same values as the full forward.
    pub fn forward_train(&self, x: &Inputs, train: bool) -> TrainOutputs {
        self.forward_train_cut(x, train, None)
    }

    /// [`ScfmModel::forward_train`], cutting the residual stream for a staged backward
    /// ([`stages::backward_staged`]) when `cuts` is given. Same values either way. The rows
    /// run in groups of similar length when that saves padding ([`groups`]); the heads and
    /// the decoder run on the reassembled batch.
    pub fn forward_train_cut(
        &self,
        x: &Inputs,
        train: bool,
        cuts: Option<&mut stages::Cuts>,
    ) -> TrainOutputs {
        let (mgem, cell) = match Groups::of_inputs(x, self.length_groups) {
            None => self.train_rows(x, train, cuts),
            Some(g) => self.train_groups(x, train, cuts, &g),
        };
        let proj = self.proj.forward(&cell);
        let gepc = self.gepc_train(&cell, x);
        TrainOutputs {
            mgem,
            cell,
            proj,
            gepc,
        }
    }

    /// [`ScfmModel::train_rows`] over each group of rows, the outputs put back in the
    /// batch's order and the groups' cuts merged level by level.
    fn train_groups(
        &self,
        x: &Inputs,
        train: bool,
        cuts: Option<&mut stages::Cuts>,
        g: &Groups,
    ) -> (Tensor, Tensor) {
        let staged = cuts.is_some();
        let (mut mgems, mut cells, mut parts) = (Vec::new(), Vec::new(), Vec::new());
        for (rows, len) in &g.groups {
            let mut c = stages::Cuts::new();
            let (m, cell) = self.train_rows(&x.rows(rows, *len), train, staged.then_some(&mut c));
            mgems.push(m);
            cells.push(cell);
            parts.push(c);
        }
        if let Some(cuts) = cuts {
            *cuts = stages::Cuts::merge(parts);
        }
        let device = x.genes.device();
        let per_row = Vec::<i64>::try_from(
            &x.masked
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)
                .to_device(Device::Cpu),
        )
        .expect("masked counts to host");
        let mgem = Tensor::cat(&mgems, 0).index_select(0, &g.restore_tokens(&per_row, device));
        let cell = Tensor::cat(&cells, 0).index_select(0, &g.restore_rows(device));
        (mgem, cell)
    }

    /// The training forward's encoder and MGEM head over the rows of `x`: the MGEM outputs
    /// of the masked tokens (row-major) and the cell embeddings `[N, C]`. The last block
    /// runs only for `[CLS]` and the masked tokens with `cls` pooling; the MGEM head only
    /// for the masked tokens (either pooling).
    fn train_rows(
        &self,
        x: &Inputs,
        train: bool,
        mut cuts: Option<&mut stages::Cuts>,
    ) -> (Tensor, Tensor) {
        let Some((last, first)) = self
            .layers
            .split_last()
            .filter(|_| self.cfg.pooling == Pooling::Cls)
        else {
            // Mean pooling needs every token's last-layer output; the MGEM head still runs
            // on the masked tokens only (it is per token, and the loss uses no other).
            let (hidden, cell) = self.encode_cut(x, train, cuts);
            let h = hidden.size()[2];
            let mgem = self
                .mgem
                .forward(&hidden.masked_select(&x.masked.unsqueeze(-1)).view([-1, h]));
            return (mgem, cell);
        };
        let attend = x.genes.ne(special::PAD).unsqueeze(1).unsqueeze(1);
        let mut h = self
            .embed
            .forward(&x.genes, &x.bins, &x.values, &x.masked, train);
        for layer in first {
            h = stages::cut(h, &mut cuts);
            h = layer.forward(&h, &attend, train, self.compute);
        }
        let h = stages::cut(h, &mut cuts);
        let (idx, sel) = query_index(&x.masked);
        let hs = last.forward_queries(&h, &attend, train, self.compute, &idx);
        let hs = stages::cut(hs, &mut cuts).apply(&self.norm);
        let hidden = hs.size()[2];
        let cell = self.to_cell(hs.select(1, 0));
        let mgem = self
            .mgem
            .forward(&hs.masked_select(&sel.unsqueeze(-1)).view([-1, hidden]));
        (mgem, cell)
    }

    /// The MGEM loss of a training forward, summed (`Reduction::Sum`) or averaged over the
    /// masked tokens.
    pub fn mgem_loss_train(&self, out: &TrainOutputs, x: &Inputs, reduction: Reduction) -> Tensor {
        match self.cfg.expression {
            ExpressionEncoding::Binned => loss::cross_entropy_selected(
                &out.mgem,
                &x.target_bins.masked_select(&x.masked),
                self.cfg.label_smoothing,
                reduction,
            ),
            ExpressionEncoding::Continuous => out
                .mgem
                .squeeze_dim(-1)
                .mse_loss(&x.target_values.masked_select(&x.masked), reduction),
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
                Reduction::Mean,
            ),
            ExpressionEncoding::Continuous => {
                loss::mgem_squared_error(&out.mgem, &x.target_values, &x.masked, Reduction::Mean)
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
    /// GEPC mean squared error (0 without the decoder or profiles).
    pub gepc: f64,
}

impl ScfmModel {
    /// Forward and losses for a batch holding two views per cell (rows `i`, `i + B`).
    pub fn losses(&self, x: &Inputs, train: bool) -> Losses {
        let out = self.forward_train(x, train);
        let mgem = self.mgem_loss_train(&out, x, Reduction::Mean);
        let con = loss::nt_xent(&out.proj, self.cfg.temperature);
        let mut total = &mgem * self.cfg.w_mgem + &con * self.cfg.w_contrastive;
        let mut gepc = 0.0;
        if let Some(g) = self.gepc_loss(out.gepc.as_ref(), x) {
            gepc = g.double_value(&[]);
            total += g * self.cfg.w_gepc;
        }
        Losses {
            mgem: mgem.double_value(&[]),
            contrastive: con.double_value(&[]),
            gepc,
            total,
        }
    }
}

#[cfg(test)]
mod tests;
