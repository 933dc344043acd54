//! `scfm export CHECKPOINT --out DIR`: a Hugging Face–style folder that PyTorch users load
//! (`scfm_torch.load(DIR)` in `python/`), and that `scfm embed` / `scfm evaluate` accept
//! as MODEL:
//!
//! ```text
//! DIR/config.json        architecture, tokenizer and normalisation settings (ExportConfig)
//! DIR/model.safetensors  fp32 weights by PyTorch state_dict name
//! DIR/vocab.tsv          token_id, gene_id, gene_symbol
//! DIR/README.md          model card: data, training, losses, evaluation
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use scfm_common::runtime::Rt;
use scfm_common::storage::{Store, sha256_hex};
use tch::Device;

use super::load::{EXPORT_VERSION, ExportConfig, ModelBundle};
use crate::checkpoint::tensors_to_safetensors;
use crate::error::{Result, WorkerError};

/// Writes the export of `model` (a checkpoint or export) into `out`; `eval` is an
/// `evaluation.md` to put in the model card.
pub fn run_export(
    model: &str,
    out: &Path,
    eval: Option<&Path>,
    vocab: Option<&Path>,
    rt: &Rt,
) -> Result<ExportConfig> {
    let b = ModelBundle::load(model, Device::Cpu, vocab, rt)?;
    let io = |p: &Path, e: std::io::Error| WorkerError::Data(format!("{}: {e}", p.display()));
    let eval_md = match eval {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| io(p, e))?),
        None => None,
    };
    write_export(&b, out, eval_md.as_deref(), rt)
}

/// Writes the export of the loaded model `b` into `out` (created if missing); `eval_md` is
/// an evaluation table for the model card (the run's last losses are read on `rt`). The
/// folder is read back through the loader.
pub fn write_export(
    b: &ModelBundle,
    out: &Path,
    eval_md: Option<&str>,
    rt: &Rt,
) -> Result<ExportConfig> {
    let io = |p: &Path, e: std::io::Error| WorkerError::Data(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let mut named: Vec<(String, tch::Tensor)> = b.vs.variables().into_iter().collect();
    named.sort_by(|x, y| x.0.cmp(&y.0));
    let weights = tensors_to_safetensors(
        &named,
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
    )?;
    let cfg = ExportConfig {
        format: "scfm-export".into(),
        version: EXPORT_VERSION,
        model: b.cfg().clone(),
        n_genes: b.vocab.len(),
        target_sum: b.target_sum,
        step: b.step,
        source: b.origin.clone(),
        model_sha256: sha256_hex(&weights),
    };
    let card = model_card(b, &cfg, eval_md, rt);
    let files: [(&str, Vec<u8>); 4] = [
        ("model.safetensors", weights),
        (
            "vocab.tsv",
            scfm_common::data::prepared::vocab_tsv(&b.vocab).into_bytes(),
        ),
        ("README.md", card.into_bytes()),
        (
            "config.json",
            (serde_json::to_string_pretty(&cfg).expect("serializes") + "\n").into_bytes(),
        ),
    ];
    // config.json last: a folder without it is not taken for an export.
    let _ = std::fs::remove_file(out.join("config.json"));
    for (name, bytes) in files {
        let p: PathBuf = out.join(name);
        std::fs::write(&p, bytes).map_err(|e| io(&p, e))?;
    }
    // Read back through the loader: the folder must load as written.
    ModelBundle::load_export(out, Device::Cpu)?;
    Ok(cfg)
}

/// The last training and validation losses in the run's metrics log, if readable.
fn last_losses(run_url: Option<&str>, rt: &Rt) -> Option<String> {
    let url = run_url?;
    let store = Store::open(url).ok()?;
    let lines = rt
        .block_on(scfm_common::metrics_log::read_effective(&store))
        .ok()??;
    let mut last = None;
    let mut val = None;
    for v in lines {
        if let Some(x) = v.get("val_loss").and_then(|x| x.as_f64()) {
            val = Some(x);
        }
        if v.get("loss").and_then(|x| x.as_f64()).is_some() {
            last = Some(v);
        }
    }
    let l = last?;
    let f = |k: &str| {
        l.get(k)
            .and_then(|x| x.as_f64())
            .map_or("–".into(), |x| format!("{x:.4}"))
    };
    Some(format!(
        "| step | loss | MGEM | NT-Xent | GEPC | validation |\n|---:|---:|---:|---:|---:|---:|\n| {} | {} | {} | {} | {} | {} |\n",
        l.get("step").and_then(|x| x.as_u64()).unwrap_or(0),
        f("loss"),
        f("mgem"),
        f("contrastive"),
        f("gepc"),
        val.map_or("–".into(), |x| format!("{x:.4}"))
    ))
}

fn model_card(b: &ModelBundle, cfg: &ExportConfig, eval: Option<&str>, rt: &Rt) -> String {
    let m = &cfg.model;
    let mut s = format!(
        "# scfm model\n\nA single-cell RNA-seq transformer trained with scfm (masked gene-expression modelling{}{}).\n\n",
        if m.w_contrastive > 0.0 {
            ", contrastive NT-Xent"
        } else {
            ""
        },
        if m.has_gepc() {
            ", GEPC expression decoder"
        } else {
            ""
        },
    );
    s.push_str(&format!(
        "| | |\n|---|---|\n| parameters | {} |\n| genes | {} |\n| hidden / layers / heads | {} / {} / {} |\n| expression | {:?}{} |\n| max tokens per cell | {} |\n| cell embedding | {:?} pooling{}{} (not normalised) |\n| normalisation | normalize_total {} then log1p |\n| training steps | {} |\n| weights sha256 | `{}` |\n| exported from | `{}` |\n\n",
        m.param_count(cfg.n_genes),
        cfg.n_genes,
        m.hidden,
        m.n_layers,
        m.n_heads,
        m.expression,
        if m.expression == scfm_common::config::ExpressionEncoding::Binned {
            format!(" ({} bins)", m.n_bins)
        } else {
            String::new()
        },
        m.max_seq_len,
        m.pooling,
        m.latent_dim
            .map_or(String::new(), |d| format!(", a linear map to {d} dims")),
        if m.read_out() != scfm_common::config::CellEmbedding::DecoderMetric {
            String::new()
        } else if m.metric_weight == scfm_common::config::DEFAULT_METRIC_WEIGHT {
            ", in the GEPC decoder's metric (`embedding: decoder_metric`)".to_string()
        } else {
            format!(
                ", in the geometric mix of its own and the GEPC decoder's metric \
                 (`embedding: decoder_metric`, `metric_weight: {}`)",
                m.metric_weight
            )
        },
        cfg.target_sum,
        cfg.step,
        cfg.model_sha256,
        cfg.source
    ));
    if !b.settings.is_null() {
        s.push_str(&format!(
            "## Training data and settings\n\n```json\n{}\n```\n\n",
            serde_json::to_string_pretty(&b.settings).expect("serializes")
        ));
    }
    if let Some(t) = last_losses(b.run_url.as_deref(), rt) {
        s.push_str("## Last losses\n\n");
        s.push_str(&t);
        s.push('\n');
    }
    if let Some(e) = eval {
        s.push_str("## Evaluation\n\n");
        s.push_str(e.trim_start_matches("# scfm evaluation").trim());
        s.push_str("\n\n");
    }
    s.push_str(
        "## Use\n\n```python\nimport anndata, scfm_torch\nmodel = scfm_torch.load(\"THIS_FOLDER\")          # an nn.Module (fine-tune it)\nadata = anndata.read_h5ad(\"cells.h5ad\")          # raw counts in X\nadata.obsm[\"X_scfm\"] = scfm_torch.embed(model, adata)  # as `scfm embed`\n```\n\nor `scfm embed THIS_FOLDER cells.h5ad --out embedded.h5ad`.\n",
    );
    s
}
