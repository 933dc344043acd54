//! Configuration files: model presets, training settings, and the single-process
//! training file (`scfm-worker train --config FILE`).

pub mod model;
pub mod training;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use model::{
    CellEmbedding, DEFAULT_METRIC_WEIGHT, ExpressionEncoding, GepcDecoder, GepcTarget, ModelConfig,
    Pooling, Positional, Subsample, preset_lr, spec_preset,
};
pub use training::{Augment, Device, Precision, Schedule, TrainingConfig};

use crate::data::h5ad::MatrixSource;
use crate::error::{Error, Result};

/// `base.join(p)` for a relative `p` (else `p`), with `.` and `..` folded lexically, so
/// that `configs/../data/x` is reported as `data/x`.
pub fn lexical_join(base: &Path, p: &Path) -> PathBuf {
    use std::path::Component;
    let joined = if p.is_relative() {
        base.join(p)
    } else {
        p.to_path_buf()
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The folder whose paths a file's relative paths are taken from: the file's own folder,
/// made absolute (the current directory for a bare file name such as `job.yaml`).
pub fn base_dir(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::path::absolute(dir).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })
}

/// Where the training cells come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A prepared dataset (a directory or URL with `dataset.json`, made by `scfm prepare`)
    /// or one input file of raw counts in any supported format, read into memory (relative
    /// paths are relative to the config file).
    pub path: PathBuf,
    /// Which matrix holds the counts: `X` (default), `{Layer: name}` or `Raw`.
    #[serde(default)]
    pub source: MatrixSource,
    /// One input file: accept values that are not whole numbers (normalised data); by
    /// default only raw integer counts pass, as in `scfm prepare`.
    #[serde(default)]
    pub allow_non_integer: bool,
    /// One CSV/TSV input file: it is genes × cells (a header row of cell names, one gene
    /// per line) rather than cells × genes.
    #[serde(default)]
    pub transpose: bool,
    /// Fraction of cells held out for validation (chosen by seed).
    #[serde(default = "default_val_fraction")]
    pub validation_fraction: f64,
    /// Target sum of `normalize_total` before log1p.
    #[serde(default = "default_target_sum")]
    pub target_sum: f64,
    /// Consecutive cells of a shard that form one unit of the sample order.
    #[serde(default = "default_block_cells")]
    pub block_cells: usize,
    /// Units whose cells are shuffled together (the shuffle window).
    #[serde(default = "default_shuffle_window")]
    pub shuffle_window: usize,
    /// Where shards of a remote dataset are cached (default: the system temp dir's
    /// `scfm-cache`).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Threads of each worker's loader that tokenise batches (1 on CPU training, where
    /// the cores train; 2–4 feed a GPU).
    #[serde(default = "default_loader_threads")]
    pub loader_threads: usize,
}

fn default_loader_threads() -> usize {
    1
}

fn default_block_cells() -> usize {
    64
}
fn default_shuffle_window() -> usize {
    64
}

/// Whether a data or checkpoint location is a URL (`scheme://…`) rather than a path.
pub fn is_url(p: &Path) -> bool {
    p.to_string_lossy().contains("://")
}

fn default_val_fraction() -> f64 {
    0.05
}
fn default_target_sum() -> f64 {
    1e4
}

/// Where checkpoints go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// A local path (relative paths are relative to the config file) or a `file://` URL.
    pub url: String,
    /// Save every this many optimizer steps (and at the end).
    #[serde(default = "default_every")]
    pub every_steps: u64,
    /// Number of most recent checkpoints to keep (the best by validation loss is kept too).
    #[serde(default = "default_keep")]
    pub keep_last: usize,
}

fn default_every() -> u64 {
    200
}
fn default_keep() -> usize {
    3
}

/// A single-process training file: data, model, training, checkpoint sections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainFile {
    /// Input data.
    pub data: DataConfig,
    /// `preset:` plus overrides; resolved with [`ModelConfig::from_spec`].
    #[serde(default)]
    pub model: serde_norway::Value,
    /// Optimisation settings.
    #[serde(default)]
    pub training: TrainingConfig,
    /// Checkpoint destination.
    pub checkpoint: CheckpointConfig,
}

/// The settings a checkpoint must have been trained with to be resumed: the model (less
/// its read-out settings, [`READ_OUT_FIELDS`]), the data (by identity, see
/// `data::prepared::data_identity`, and how it is read and ordered) and what fixes the
/// sample stream (seed, batch size, accumulation). Epochs, learning rate, the cluster and
/// how the model reads its cells out may change between runs.
pub fn run_settings(
    model: &ModelConfig,
    data: &DataConfig,
    data_identity: &str,
    training: &TrainingConfig,
) -> serde_json::Value {
    without_read_out(&serde_json::json!({
        "model": serde_json::to_value(model).expect("model config serializes"),
        "data": {
            "identity": data_identity,
            "source": serde_json::to_value(&data.source).expect("source serializes"),
            "validation_fraction": data.validation_fraction,
            "target_sum": data.target_sum,
            "block_cells": data.block_cells,
            "shuffle_window": data.shuffle_window,
        },
        "training": {
            "seed": training.seed,
            "batch_size": training.batch_size,
            "grad_accum": training.grad_accum,
        },
    }))
}

/// Model fields that only change how a trained model reads its cells out (`scfm embed`,
/// `scfm evaluate`), not what is trained: a resume may change them (the checkpoints it
/// writes then carry the new values).
pub const READ_OUT_FIELDS: [&str; 2] = ["embedding", "metric_weight"];

/// Run settings ([`run_settings`]) without the model's [`READ_OUT_FIELDS`]; checkpoints
/// written before those were left out of the settings compare through this.
pub fn without_read_out(settings: &serde_json::Value) -> serde_json::Value {
    let mut s = settings.clone();
    if let Some(model) = s.get_mut("model").and_then(|m| m.as_object_mut()) {
        for f in READ_OUT_FIELDS {
            model.remove(f);
        }
    }
    s
}

/// A [`TrainFile`] with its model resolved and every field validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSpec {
    /// Input data (path made absolute).
    pub data: DataConfig,
    /// The resolved model.
    pub model: ModelConfig,
    /// Optimisation settings.
    pub training: TrainingConfig,
    /// Checkpoint destination.
    pub checkpoint: CheckpointConfig,
}

impl TrainSpec {
    /// Reads, resolves and validates a training file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        let file: TrainFile = serde_norway::from_str(&text).map_err(|e| Error::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        Self::from_file(file, &base_dir(path)?)
    }

    /// Resolves and validates a parsed file; relative data paths are taken from `base`.
    pub fn from_file(mut file: TrainFile, base: &Path) -> Result<Self> {
        if file.data.path.is_relative() && !is_url(&file.data.path) {
            file.data.path = lexical_join(base, &file.data.path);
        }
        let url = &file.checkpoint.url;
        if !url.contains("://") && Path::new(url).is_relative() {
            file.checkpoint.url = lexical_join(base, Path::new(url))
                .to_string_lossy()
                .into_owned();
        }
        let model = ModelConfig::from_spec(&file.model)?;
        model.validate()?;
        if file.training.lr.is_none() {
            // `from_spec` succeeded, so the preset is a known one.
            file.training.lr = preset_lr(&spec_preset(&file.model)?);
        }
        file.training.validate()?;
        let v = file.data.validation_fraction;
        if !(0.0..1.0).contains(&v) {
            return Err(Error::config(
                "data.validation_fraction",
                format!("{v} is outside [0, 1)"),
            ));
        }
        if file.data.target_sum.is_nan() || file.data.target_sum <= 0.0 {
            return Err(Error::config(
                "data.target_sum",
                format!("{} must be > 0", file.data.target_sum),
            ));
        }
        if file.data.block_cells == 0 || file.data.shuffle_window == 0 {
            return Err(Error::config(
                "data.block_cells",
                "block_cells and shuffle_window must be >= 1",
            ));
        }
        if file.checkpoint.every_steps == 0 {
            return Err(Error::config("checkpoint.every_steps", "must be >= 1"));
        }
        if file.checkpoint.keep_last == 0 {
            return Err(Error::config("checkpoint.keep_last", "must be >= 1"));
        }
        Ok(TrainSpec {
            data: file.data,
            model,
            training: file.training,
            checkpoint: file.checkpoint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<TrainSpec> {
        let f: TrainFile = serde_norway::from_str(y).map_err(|e| Error::Parse {
            path: "t.yaml".into(),
            message: e.to_string(),
        })?;
        TrainSpec::from_file(f, Path::new("/base"))
    }

    #[test]
    fn run_settings_leave_out_the_read_out() {
        let spec = |extra: &str| {
            parse(&format!(
                "data: {{path: d.h5ad}}\ncheckpoint: {{url: runs/x}}\nmodel: {{preset: minimal{extra}}}\n"
            ))
            .unwrap()
        };
        let settings = |s: &TrainSpec| run_settings(&s.model, &s.data, "id", &s.training);
        let base = spec("");
        assert_eq!(base.model.embedding, CellEmbedding::DecoderMetric);
        let read_out = spec(", embedding: pooled, metric_weight: 1.0");
        let layers = spec(", n_layers: 1");
        assert_eq!(settings(&base), settings(&read_out));
        assert_ne!(settings(&base), settings(&layers));
        let model = &settings(&base)["model"];
        assert!(model["hidden"].is_number(), "{model}");
        for f in READ_OUT_FIELDS {
            assert!(model.get(f).is_none(), "{f} in {model}");
        }
        // A checkpoint written when the settings held them compares equal.
        let mut old = settings(&base);
        old["model"]["embedding"] = "pooled".into();
        old["model"]["metric_weight"] = 0.25.into();
        assert_eq!(without_read_out(&old), settings(&base));
        assert_eq!(
            without_read_out(&serde_json::Value::Null),
            serde_json::Value::Null
        );
    }

    #[test]
    fn resolves_and_rejects() {
        let ok = "data: {path: d.h5ad}\ncheckpoint: {url: runs/x}\nmodel: {preset: minimal, n_layers: 1}\n";
        let s = parse(ok).unwrap();
        assert_eq!(s.data.path, PathBuf::from("/base/d.h5ad"));
        assert_eq!(s.checkpoint.url, "/base/runs/x");
        assert_eq!(
            lexical_join(Path::new("/a/configs"), Path::new("../data/./x")),
            PathBuf::from("/a/data/x")
        );
        assert_eq!(
            lexical_join(Path::new("/a"), Path::new("/abs/y")),
            PathBuf::from("/abs/y")
        );
        assert_eq!(s.model.n_layers, 1);
        let e = parse("data: {path: d.h5ad, bogus: 1}\ncheckpoint: {url: x}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = parse("data: {path: d.h5ad}\ncheckpoint: {url: x}\ntraining: {batch_size: 1}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("training.batch_size"), "{e}");
        let e = parse("data: {path: d.h5ad, validation_fraction: 1.0}\ncheckpoint: {url: x}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid config `data.validation_fraction`: 1 is outside [0, 1)"
        );
        let e = parse("data: {path: d.h5ad}\ncheckpoint: {url: x}\nmodel: {n_heads: 5}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid config `model.n_heads`: 5 heads do not divide hidden size 128"
        );
    }

    #[test]
    fn learning_rate_defaults_to_the_presets() {
        let with = |model: &str, training: &str| {
            parse(&format!(
                "data: {{path: d.h5ad}}\ncheckpoint: {{url: x}}\nmodel: {model}\ntraining: {training}\n"
            ))
        };
        let lr = |model: &str, training: &str| with(model, training).unwrap().training.lr;
        assert_eq!(lr("{}", "{}"), Some(3e-3));
        assert_eq!(lr("{preset: minimal, n_layers: 1}", "{}"), Some(3e-3));
        assert_eq!(lr("{preset: default}", "{}"), Some(1e-3));
        assert_eq!(lr("{preset: large}", "{lr: null}"), Some(1e-3));
        assert_eq!(lr("{preset: default}", "{lr: 0.002}"), Some(2e-3));
        assert_eq!(lr("{}", "{lr: 0.0005}"), Some(5e-4));
        let e = with("{}", "{lr: 0}").unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid config `training.lr`: 0 must be a positive number"
        );
        let e = with("{preset: 3}", "{}").unwrap_err().to_string();
        assert!(
            e.contains("model.preset") && e.contains("expected a preset name"),
            "{e}"
        );
        for p in crate::config::model::PRESETS {
            assert!(preset_lr(p).is_some_and(|v| v > 0.0), "{p}");
        }
    }
}
