//! Reference export for the PyTorch cross-check (`tests/python/test_reference.py`).
//!
//! For a few small fixed configurations this writes, per case directory:
//! `config.json` (model config, number of genes, optimizer settings), `model.safetensors`
//! (the initial weights), `io.safetensors` (a padded two-view batch and every output of
//! the forward pass, the losses and selected gradients; with the GEPC decoder also the
//! dense cell profiles, its predictions and loss), and `trained.safetensors` (the
//! weights after three AdamW steps with clipping). The Python side rebuilds the same
//! model in PyTorch from the weights and compares everything.

use std::path::Path;

use scfm_common::config::ModelConfig;
use scfm_common::config::model::GepcTarget;
use scfm_common::data::CsrMatrix;
use scfm_common::tokenizer::Tokenizer;
use tch::{Device, Kind, Tensor, nn};

use crate::checkpoint::tensors_to_safetensors;
use crate::data::gene_stats::{GeneScale, matrix_stats};
use crate::data::{CellRef, Row, build_batch, stream};
use crate::error::{Result, WorkerError};
use crate::model::{Inputs, Outputs, ScfmModel};
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm};
use crate::params::FlatParams;

/// Optimizer settings used by every reference case.
pub const OPT: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.98,
    eps: 1e-6,
    weight_decay: 0.1,
};
/// Learning rate of the reference AdamW steps.
pub const LR: f64 = 1e-2;
/// Clipping norm of the reference AdamW steps (small so that clipping happens).
pub const CLIP: f64 = 0.5;

/// The cases, each a model over the `minimal` preset's settings. Every case names its
/// `w_gepc`, so that a change of the preset's weight leaves the cases (and their
/// tolerances, which scale with the losses) as they are.
fn cases() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "binned_cls",
            "hidden: 32\nn_layers: 2\nn_heads: 4\nffn_dim: 64\nmax_seq_len: 12\nn_bins: 11\nlabel_smoothing: 0.1\nw_contrastive: 0.5\nw_gepc: 1.0\ndropout: 0.0",
        ),
        (
            "continuous_sin_mean",
            "hidden: 32\nn_layers: 1\nn_heads: 2\nffn_dim: 48\nmax_seq_len: 12\nexpression: continuous\npositional: sinusoidal\npooling: mean\ntemperature: 0.2\nw_gepc: 1.0\ndropout: 0.0",
        ),
        (
            "binned_learned",
            "hidden: 16\nn_layers: 3\nn_heads: 4\nffn_dim: 32\nmax_seq_len: 10\nn_bins: 5\npositional: learned\nprojection_dim: 8\nw_gepc: 1.0\ndropout: 0.0",
        ),
        (
            "binned_gepc",
            "hidden: 16\nn_layers: 2\nn_heads: 2\nffn_dim: 32\nmax_seq_len: 12\nn_bins: 7\npooling: mean\nw_gepc: 0.7\ndropout: 0.0",
        ),
        (
            "continuous_gepc_scaled",
            "hidden: 16\nn_layers: 2\nn_heads: 2\nffn_dim: 32\nmax_seq_len: 12\nexpression: continuous\npooling: mean\nw_gepc: 1.0\ngepc_target: scaled\ngepc_clip: 1.5\ndropout: 0.0",
        ),
        (
            "continuous_gepc_unseen",
            "hidden: 16\nn_layers: 2\nn_heads: 2\nffn_dim: 32\nmax_seq_len: 12\nexpression: continuous\npooling: mean\nw_gepc: 1.0\ngepc_genes: unseen\ndropout: 0.0",
        ),
        (
            "continuous_gepc_per_gene",
            "hidden: 16\nn_layers: 2\nn_heads: 2\nffn_dim: 32\nmax_seq_len: 12\nexpression: continuous\npooling: mean\nw_gepc: 1.0\ngepc_decoder: per_gene\ndropout: 0.0",
        ),
        (
            "continuous_gepc_detected",
            "hidden: 16\nn_layers: 2\nn_heads: 2\nffn_dim: 32\nmax_seq_len: 12\nexpression: continuous\npooling: mean\nw_gepc: 1.0\ngepc_detected: true\ndropout: 0.0",
        ),
        (
            "continuous_latent_per_gene",
            "hidden: 16\nn_layers: 2\nn_heads: 2\nffn_dim: 32\nmax_seq_len: 12\nexpression: continuous\npooling: mean\nw_gepc: 1.0\ngepc_decoder: per_gene\ngepc_target: scaled\nlatent_dim: 6\ndropout: 0.0",
        ),
        (
            "binned_cls_latent",
            "hidden: 16\nn_layers: 2\nn_heads: 2\nffn_dim: 32\nmax_seq_len: 12\nn_bins: 7\nw_gepc: 1.0\nlatent_dim: 4\ndropout: 0.0",
        ),
    ]
}

/// A small deterministic cells × genes count matrix with varied cell sizes.
fn toy_counts(n_cells: usize, n_genes: usize) -> CsrMatrix {
    let mut dense = vec![0f32; n_cells * n_genes];
    for c in 0..n_cells {
        for g in 0..n_genes {
            let h = (c * 7919 + g * 104_729 + c * g * 31) % 97;
            if h < 12 + 5 * c {
                dense[c * n_genes + g] = ((h % 9) + 1) as f32;
            }
        }
    }
    let mut x = CsrMatrix::from_dense(n_cells, n_genes, &dense);
    scfm_common::data::preprocess::normalize_log1p_matrix(&mut x, 1e4);
    x
}

/// Writes every case under `out`.
pub fn export(out: &Path) -> Result<()> {
    let n_genes = 40;
    let x = toy_counts(6, n_genes);
    for (name, yaml) in cases() {
        let dir = out.join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| WorkerError::Internal(format!("{}: {e}", dir.display())))?;
        let spec: serde_norway::Value = serde_norway::from_str(yaml).expect("case yaml");
        let cfg = ModelConfig::from_spec(&spec)?;
        tch::manual_seed(1234);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = ScfmModel::new(&vs, &cfg, n_genes)?;
        let mut params = FlatParams::new(&vs);
        params.attach_grads();
        // Give LayerNorms and biases non-trivial values so the check covers them.
        tch::no_grad(|| {
            let noise = Tensor::randn([params.numel()], (Kind::Float, Device::Cpu)) * 0.05;
            let _ = params.flat.g_add_(&noise);
        });
        let weights: Vec<(String, Tensor)> = params
            .slots
            .iter()
            .map(|s| (s.name.clone(), params.view(s).copy()))
            .collect();
        write(&dir.join("model.safetensors"), &weights)?;

        let tok = Tokenizer::new(&cfg);
        let aug = scfm_common::config::Augment {
            gene_dropout: 0.2,
            ..Default::default()
        };
        let rows: Vec<Row> = (0..6u32)
            .map(|r| {
                let (genes, values) = x.row(r as usize);
                Row {
                    key: (0, CellRef { shard: 0, row: r }),
                    genes,
                    values,
                    depth: f32::NAN,
                    counts: None,
                }
            })
            .collect();
        let batch = build_batch(&rows, &tok, &aug, 7, stream::VIEW);
        // The dense profiles (the GEPC targets) only for a model with the decoder,
        // standardised by the genes' statistics over the cells when the model says so.
        let mut inputs = Inputs::from_batch_with_profiles(
            &batch,
            Device::Cpu,
            cfg.has_gepc().then_some(n_genes),
        );
        let mut scaled: Vec<(String, Tensor)> = Vec::new();
        if cfg.gepc_target == GepcTarget::Scaled
            && let Some(p) = inputs.profile.take()
        {
            let stats = matrix_stats(&x, n_genes)?;
            let n = x.n_rows as i64;
            let mut dense = vec![0f32; x.n_rows * n_genes];
            for r in 0..x.n_rows {
                let (g, v) = x.row(r);
                for (&c, &val) in g.iter().zip(v) {
                    dense[r * n_genes + c as usize] = val;
                }
            }
            scaled = vec![
                ("profile_log1p".into(), p.shallow_clone()),
                (
                    "cells".into(),
                    Tensor::from_slice(&dense).view([n, n_genes as i64]),
                ),
                ("gene_mean".into(), Tensor::from_slice(&stats.mean)),
                ("gene_std".into(), Tensor::from_slice(&stats.std)),
            ];
            inputs.profile = Some(GeneScale::new(&stats, cfg.gepc_clip, Device::Cpu).apply(&p));
        }
        params.zero_grad();
        let out = model.forward(&inputs, false);
        let (mgem, con, gepc, total) = losses(&model, &out, &inputs);
        total.backward();
        let mut io: Vec<(String, Tensor)> = vec![
            ("genes".into(), inputs.genes.to_kind(Kind::Float)),
            ("bins".into(), inputs.bins.to_kind(Kind::Float)),
            ("values".into(), inputs.values.shallow_clone()),
            ("masked".into(), inputs.masked.to_kind(Kind::Float)),
            (
                "target_bins".into(),
                inputs.target_bins.to_kind(Kind::Float),
            ),
            ("target_values".into(), inputs.target_values.shallow_clone()),
            ("out.hidden".into(), out.hidden.detach()),
            ("out.mgem".into(), out.mgem.detach()),
            ("out.cell".into(), out.cell.detach()),
            ("out.proj".into(), out.proj.detach()),
            ("loss.mgem".into(), mgem.detach().reshape([1])),
            ("loss.contrastive".into(), con.detach().reshape([1])),
            ("loss.total".into(), total.detach().reshape([1])),
        ];
        if let (Some(profile), Some(pred), Some(g)) = (&inputs.profile, &out.gepc, &gepc) {
            io.push(("profile".into(), profile.shallow_clone()));
            if let Some(d) = &inputs.detected {
                io.push(("detected".into(), d.shallow_clone()));
            }
            io.push(("out.gepc".into(), pred.detach()));
            io.push(("loss.gepc".into(), g.detach().reshape([1])));
        }
        io.append(&mut scaled);
        for s in &params.slots {
            io.push((
                format!("grad.{}", s.name),
                params
                    .grad
                    .narrow(0, s.offset, s.numel)
                    .view(s.shape.as_slice())
                    .copy(),
            ));
        }
        write(&dir.join("io.safetensors"), &io)?;

        let mut opt = AdamW::new(OPT, &params);
        let mut norms = Vec::new();
        for _ in 0..3 {
            params.zero_grad();
            let out = model.forward(&inputs, false);
            losses(&model, &out, &inputs).3.backward();
            norms.push(clip_grad_norm(&params, Some(CLIP)));
            opt.update(&params, LR);
        }
        let trained: Vec<(String, Tensor)> = params
            .slots
            .iter()
            .map(|s| (s.name.clone(), params.view(s).copy()))
            .collect();
        write(&dir.join("trained.safetensors"), &trained)?;
        let meta = serde_json::json!({
            "model": cfg, "n_genes": n_genes, "n_params": params.numel(),
            "adamw": {"lr": LR, "beta1": OPT.beta1, "beta2": OPT.beta2, "eps": OPT.eps, "weight_decay": OPT.weight_decay, "clip": CLIP, "steps": 3},
            "grad_norms": norms,
        });
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(&meta).expect("json"),
        )
        .map_err(|e| WorkerError::Internal(e.to_string()))?;
        eprintln!("wrote reference case {}", dir.display());
    }
    Ok(())
}

/// The MGEM, NT-Xent and (with the decoder) GEPC losses of `out`, and their weighted sum
/// `w_mgem * mgem + w_contrastive * contrastive (+ w_gepc * gepc)`, composed in the order
/// of [`ScfmModel::losses`].
fn losses(
    model: &ScfmModel,
    out: &Outputs,
    inputs: &Inputs,
) -> (Tensor, Tensor, Option<Tensor>, Tensor) {
    let cfg = &model.cfg;
    let mgem = model.mgem_loss(out, inputs);
    let con = crate::model::loss::nt_xent(&out.proj, cfg.temperature);
    let mut total = &mgem * cfg.w_mgem + &con * cfg.w_contrastive;
    let gepc = model.gepc_loss(out.gepc.as_ref(), inputs);
    if let Some(g) = &gepc {
        total += g * cfg.w_gepc;
    }
    (mgem, con, gepc, total)
}

fn write(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    let bytes = tensors_to_safetensors(named, None)?;
    std::fs::write(path, bytes)
        .map_err(|e| WorkerError::Internal(format!("{}: {e}", path.display())))
}
