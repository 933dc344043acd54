//! A trained model loaded for inference: from a checkpoint (a run's URL, or one
//! `ckpt-*` directory of it) or from an export folder (`scfm export`), with its gene
//! vocabulary and normalisation; or a randomly initialised model of the same shape (the
//! baseline `scfm evaluate` puts beside the trained one).

use std::path::Path;

use scfm_common::checkpoint::{open_part, select_verified, step_of, verify_dir};
use scfm_common::config::{CellEmbedding, ModelConfig};
use scfm_common::data::prepared::{VocabEntry, parse_vocab_tsv};
use scfm_common::runtime::Rt;
use scfm_common::storage::{Store, sha256_hex};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor, nn};

use crate::checkpoint::{NamedVecs, TrainState, VOCAB_PART, safetensors_to_vecs};
use crate::error::{Result, WorkerError};
use crate::model::ScfmModel;

/// `config.json` of an export folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportConfig {
    /// Always `scfm-export`.
    pub format: String,
    /// Layout version of the folder.
    pub version: u32,
    /// The architecture and its loss settings.
    pub model: ModelConfig,
    /// Genes in the vocabulary (`vocab.tsv` rows; token id = row + 2).
    pub n_genes: usize,
    /// `normalize_total` target applied before `log1p`.
    pub target_sum: f64,
    /// Optimizer steps the weights were trained for.
    pub step: u64,
    /// Where the weights came from (the checkpoint URL).
    pub source: String,
    /// SHA-256 of `model.safetensors`.
    pub model_sha256: String,
}

/// Export folder layout version written by this scfm.
pub const EXPORT_VERSION: u32 = 1;

/// A model ready for inference.
pub struct ModelBundle {
    /// The network (evaluation mode is chosen per call).
    pub model: ScfmModel,
    /// Its variables.
    pub vs: nn::VarStore,
    /// The gene vocabulary, in column order.
    pub vocab: Vec<VocabEntry>,
    /// `normalize_total` target of the training data.
    pub target_sum: f64,
    /// SHA-256 of the weights (`random-init:<seed>` for a random model).
    pub digest: String,
    /// Optimizer steps behind the weights (0 for a random model).
    pub step: u64,
    /// Where it came from.
    pub origin: String,
    /// The run's settings (model, data identity, batch) when loaded from a checkpoint.
    pub settings: serde_json::Value,
    /// The run's checkpoint URL when loaded from a checkpoint (where its metrics log is).
    pub run_url: Option<String>,
}

impl std::fmt::Debug for ModelBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelBundle")
            .field("origin", &self.origin)
            .field("step", &self.step)
            .field("genes", &self.vocab.len())
            .finish()
    }
}

fn ckpt_err(url: &str, message: impl Into<String>) -> WorkerError {
    WorkerError::Checkpoint {
        url: url.into(),
        message: message.into(),
    }
}

impl ModelBundle {
    /// Loads `spec`: an export folder (with `config.json`), a run's checkpoint URL (the
    /// newest checkpoint that verifies), or one checkpoint directory (`…/ckpt-000000200`).
    /// `vocab` replaces a missing vocabulary (checkpoints written before it was stored).
    /// Checkpoints are read on `rt`.
    pub fn load(spec: &str, device: Device, vocab: Option<&Path>, rt: &Rt) -> Result<Self> {
        let local = Path::new(spec);
        if local.join("config.json").is_file() {
            return Self::load_export(local, device);
        }
        let trimmed = spec.trim_end_matches('/');
        let (base, last) = trimmed.rsplit_once('/').unwrap_or((".", trimmed));
        let (store, verified) = if step_of(last).is_some() {
            let store = Store::open(base)?;
            let v = rt.block_on(verify_dir(&store, last, None))?;
            (store, v)
        } else {
            let store = Store::open(spec)?;
            let v = rt.block_on(select_verified(&store))?.ok_or_else(|| {
                ckpt_err(
                    &store.url_of("latest.json"),
                    "no checkpoint here (expected a run's checkpoint URL, a ckpt-* directory, or an export folder with config.json)",
                )
            })?;
            (store, v)
        };
        let dir = verified.dir.clone();
        let state_url = store.url_of(&format!("{dir}/state.json"));
        let state: TrainState = serde_json::from_value(verified.state.state.clone())
            .map_err(|e| ckpt_err(&state_url, format!("malformed state: {e}")))?;
        let cfg: ModelConfig = serde_json::from_value(state.model.clone())
            .map_err(|e| ckpt_err(&state_url, format!("malformed model config: {e}")))?;
        let target_sum = state.settings["data"]["target_sum"].as_f64().unwrap_or(1e4);
        let read =
            |name: &str| rt.block_on(open_part(&store, &dir, &verified.state, name)?.read_all());
        let stored_vocab = match vocab.is_none() && verified.state.files.contains_key(VOCAB_PART) {
            true => Some(read(VOCAB_PART)?),
            false => None,
        };
        let vocab = match (stored_vocab.as_ref(), vocab) {
            (_, Some(file)) => read_vocab_file(file)?,
            (Some(b), None) => parse_vocab_tsv(
                &String::from_utf8_lossy(b),
                &store.url_of(&format!("{dir}/{VOCAB_PART}")),
            )?,
            (None, None) => {
                return Err(ckpt_err(
                    &store.url_of(&dir),
                    "holds no vocab.tsv (written by an older scfm): pass the training data's vocabulary with --vocab FILE",
                ));
            }
        };
        let model_url = store.url_of(&format!("{dir}/model.safetensors"));
        let bytes = read("model.safetensors")?;
        let named = safetensors_to_vecs(&bytes, &model_url)?;
        let mut b = Self::build(&cfg, vocab, target_sum, device, 0)?;
        if b.vocab.len() != state.n_genes {
            return Err(ckpt_err(
                &state_url,
                format!(
                    "the vocabulary has {} genes but the model was trained on {}",
                    b.vocab.len(),
                    state.n_genes
                ),
            ));
        }
        load_weights(&b.vs, &named, &model_url)?;
        b.digest = sha256_hex(&bytes);
        b.step = state.step;
        b.origin = store.url_of(&dir);
        b.settings = state.settings.clone();
        b.run_url = Some(store.url().to_string());
        Ok(b)
    }

    /// Loads an export folder (`config.json`, `model.safetensors`, `vocab.tsv`).
    pub fn load_export(dir: &Path, device: Device) -> Result<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).map_err(|e| ckpt_err(&p.display().to_string(), e.to_string()))
        };
        let cfg_path = dir.join("config.json").display().to_string();
        let cfg: ExportConfig = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| ckpt_err(&cfg_path, format!("malformed: {e}")))?;
        if cfg.format != "scfm-export" || cfg.version > EXPORT_VERSION {
            return Err(ckpt_err(
                &cfg_path,
                format!(
                    "format {:?} version {} is not an scfm export this scfm reads (version <= {EXPORT_VERSION})",
                    cfg.format, cfg.version
                ),
            ));
        }
        let vocab = read_vocab_file(&dir.join("vocab.tsv"))?;
        if vocab.len() != cfg.n_genes {
            return Err(ckpt_err(
                &cfg_path,
                format!(
                    "n_genes {} but vocab.tsv has {} genes",
                    cfg.n_genes,
                    vocab.len()
                ),
            ));
        }
        let bytes = read("model.safetensors")?;
        let model_url = dir.join("model.safetensors").display().to_string();
        let digest = sha256_hex(&bytes);
        if digest != cfg.model_sha256 {
            return Err(ckpt_err(
                &model_url,
                "does not match model_sha256 in config.json",
            ));
        }
        let named = safetensors_to_vecs(&bytes, &model_url)?;
        let mut b = Self::build(&cfg.model, vocab, cfg.target_sum, device, 0)?;
        load_weights(&b.vs, &named, &model_url)?;
        b.digest = digest;
        b.step = cfg.step;
        b.origin = dir.display().to_string();
        Ok(b)
    }

    /// A randomly initialised model of `cfg` for `vocab` (seeded).
    pub fn random_init(
        cfg: &ModelConfig,
        vocab: Vec<VocabEntry>,
        target_sum: f64,
        device: Device,
        seed: u64,
    ) -> Result<Self> {
        let mut b = Self::build(cfg, vocab, target_sum, device, seed)?;
        b.digest = format!("random-init:{seed}");
        b.origin = "random initialisation".into();
        Ok(b)
    }

    fn build(
        cfg: &ModelConfig,
        vocab: Vec<VocabEntry>,
        target_sum: f64,
        device: Device,
        seed: u64,
    ) -> Result<Self> {
        tch::manual_seed(scfm_common::rng::derive_seed(seed, &[0]) as i64);
        let vs = nn::VarStore::new(device);
        let model = ScfmModel::new(&vs, cfg, vocab.len())?;
        Ok(ModelBundle {
            model,
            vs,
            vocab,
            target_sum,
            digest: String::new(),
            step: 0,
            origin: String::new(),
            settings: serde_json::Value::Null,
            run_url: None,
        })
    }

    /// Applies `--embedding` and `--metric-weight` (each `None`: the model's own setting):
    /// an error when the model cannot read its cells out so (`decoder_metric` without the
    /// GEPC decoder), when the weight is outside `[0, 1]`, or when it is given for a model
    /// that reads out the pooled vector (it would change nothing).
    pub fn set_read_out(
        &mut self,
        embedding: Option<CellEmbedding>,
        metric_weight: Option<f64>,
    ) -> Result<()> {
        if let Some(e) = embedding {
            self.set_embedding(e)?;
        }
        if let Some(w) = metric_weight {
            if !(0.0..=1.0).contains(&w) {
                return Err(WorkerError::Data(format!(
                    "--metric-weight {w}: outside [0, 1] (0: the pooled vector's metric, 1: \
                     the decoder's)"
                )));
            }
            if self.cfg().read_out() != CellEmbedding::DecoderMetric {
                return Err(WorkerError::Data(format!(
                    "--metric-weight {w} applies to the decoder_metric embedding, but the cells \
                     of {} would be read out as the pooled vector ({}); add --embedding \
                     decoder_metric",
                    self.origin,
                    if embedding.is_some() {
                        "--embedding pooled"
                    } else {
                        "the model's setting"
                    }
                )));
            }
            self.model.cfg.metric_weight = w;
        }
        Ok(())
    }

    /// Reads the cells out as `embedding` instead of the model's own setting; an error
    /// when the model cannot (`decoder_metric` without the GEPC decoder).
    pub fn set_embedding(&mut self, embedding: CellEmbedding) -> Result<()> {
        if embedding == CellEmbedding::DecoderMetric && !self.cfg().has_gepc() {
            return Err(WorkerError::Data(format!(
                "--embedding decoder_metric: the model {} has no GEPC decoder (w_gepc: 0) to \
                 read its metric from; use pooled",
                self.origin
            )));
        }
        self.model.cfg.embedding = embedding;
        Ok(())
    }

    /// The model's configuration.
    pub fn cfg(&self) -> &ModelConfig {
        &self.model.cfg
    }

    /// The device the model lives on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }
}

/// Reads a `vocab.tsv` file.
pub fn read_vocab_file(path: &Path) -> Result<Vec<VocabEntry>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ckpt_err(&path.display().to_string(), e.to_string()))?;
    Ok(parse_vocab_tsv(&text, &path.display().to_string())?)
}

/// Copies every named tensor into the variables; names and shapes must match exactly
/// (no variable missing, none left over).
pub fn load_weights(vs: &nn::VarStore, named: &NamedVecs, url: &str) -> Result<()> {
    let vars = vs.variables();
    let mut extra: Vec<&String> = named.keys().filter(|k| !vars.contains_key(*k)).collect();
    extra.sort();
    if !extra.is_empty() {
        return Err(ckpt_err(
            url,
            format!("holds tensors the model does not have: {extra:?}"),
        ));
    }
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let (shape, vals) = named
            .get(name)
            .ok_or_else(|| ckpt_err(url, format!("has no tensor `{name}`")))?;
        let want: Vec<usize> = var.size().iter().map(|&d| d as usize).collect();
        if shape != &want {
            return Err(ckpt_err(
                url,
                format!("tensor `{name}` has shape {shape:?}, the model {want:?}"),
            ));
        }
        let dims: Vec<i64> = want.iter().map(|&d| d as i64).collect();
        let src = Tensor::from_slice(vals).view(dims.as_slice());
        tch::no_grad(|| var.shallow_clone().copy_(&src));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(extra: &str) -> ModelBundle {
        let y =
            format!("hidden: 16\nn_layers: 1\nn_heads: 2\nffn_dim: 32\nmax_seq_len: 8\n{extra}");
        let cfg = ModelConfig::from_spec(&serde_norway::from_str(&y).unwrap()).unwrap();
        let vocab = (0..12)
            .map(|i| VocabEntry {
                gene_id: format!("G{i}"),
                symbol: format!("S{i}"),
            })
            .collect();
        ModelBundle::random_init(&cfg, vocab, 1e4, Device::Cpu, 1).unwrap()
    }

    /// `--embedding`: the metric needs the decoder; asking for it without one names the
    /// model, and the bundle keeps reading out the pooled vector.
    #[test]
    fn set_embedding_refuses_the_metric_without_a_decoder() {
        let mut b = bundle("w_gepc: 0.0");
        assert_eq!(b.cfg().read_out(), CellEmbedding::Pooled);
        let e = b.set_embedding(CellEmbedding::DecoderMetric).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("no GEPC decoder") && msg.contains("random initialisation"),
            "{msg}"
        );
        assert_eq!(b.cfg().read_out(), CellEmbedding::Pooled);
        b.set_embedding(CellEmbedding::Pooled).unwrap();

        let mut d = bundle("w_gepc: 1.0\nembedding: pooled\nmetric_weight: 1.0");
        assert_eq!(d.cfg().read_out(), CellEmbedding::Pooled);
        d.set_embedding(CellEmbedding::DecoderMetric).unwrap();
        assert_eq!(d.cfg().read_out(), CellEmbedding::DecoderMetric);
        assert_eq!(super::super::run::embedding_name(&d), "mean+decoder_metric");
    }

    /// `--metric-weight`: within `[0, 1]`, only for the decoder's metric, and named.
    #[test]
    fn set_read_out_takes_a_metric_weight_for_the_decoder_metric_only() {
        let mut p = bundle("w_gepc: 1.0\nembedding: pooled");
        let e = p.set_read_out(None, Some(0.5)).unwrap_err().to_string();
        assert!(
            e.contains("--metric-weight 0.5") && e.contains("pooled"),
            "{e}"
        );
        p.set_read_out(Some(CellEmbedding::DecoderMetric), Some(0.5))
            .unwrap();
        assert_eq!(p.cfg().metric_weight, 0.5);
        assert_eq!(
            super::super::run::embedding_name(&p),
            "mean+decoder_metric(0.5)"
        );
        for bad in [-0.5, 1.5, f64::NAN] {
            let e = p.set_read_out(None, Some(bad)).unwrap_err().to_string();
            assert!(e.contains("outside [0, 1]"), "{bad}: {e}");
        }
        assert_eq!(p.cfg().metric_weight, 0.5);
        p.set_read_out(None, None).unwrap();
        assert_eq!(p.cfg().metric_weight, 0.5);
    }
}
