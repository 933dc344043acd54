//! The embed job manifest: a manifest with an `embed:` section describes embedding a
//! prepared dataset with a trained model across the workers of a job (`scfm local
//! embed.yaml --workers N`, see `configs/job-embed.yaml`), instead of a training run.
//!
//! ```yaml
//! run_id: embed-atlas
//! data: {path: s3://bucket/atlas-prepared}      # a prepared dataset (`scfm prepare`)
//! embed:
//!   model: s3://bucket/runs/r1                   # checkpoint URL, ckpt-* dir or export folder
//!   out: s3://bucket/embeddings/r1               # parts/part-NNNNNN.h5ad + index.json
//!   batch_size: 64
//! cluster: {device: auto, preempt_grace_s: 120}  # optional
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Device;
use crate::error::{Error, Result};

/// Sections of a training manifest that an embed job does not have.
const TRAINING_ONLY: [&str; 5] = ["model", "training", "checkpoint", "metrics", "auth"];

/// `data:` of an embed job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedData {
    /// The prepared dataset (a directory with `dataset.json`, or an object-store URL).
    #[serde(default)]
    pub path: Option<String>,
}

/// `embed:` of an embed job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedSection {
    /// The model: a run's checkpoint URL, one `ckpt-*` directory, or an export folder.
    #[serde(default)]
    pub model: Option<String>,
    /// Where `parts/part-NNNNNN.h5ad`, their records and `index.json` are written.
    #[serde(default)]
    pub out: Option<String>,
    /// Cells per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// `obsm` key of the embedding.
    #[serde(default = "default_key")]
    pub key: String,
    /// Intra-op CPU threads per worker (default: all cores).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Stop the workers (as on SIGTERM) when the job runs longer than this.
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

fn default_batch() -> usize {
    64
}
fn default_key() -> String {
    "X_scfm".into()
}

/// `cluster:` of an embed job (optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedCluster {
    /// `auto` (CUDA when present), `cpu` or `cuda`.
    #[serde(default)]
    pub device: Device,
    /// After SIGTERM, how long workers get to finish their current part before they are
    /// killed.
    #[serde(default = "default_grace")]
    pub preempt_grace_s: u64,
}

fn default_grace() -> u64 {
    120
}

impl Default for EmbedCluster {
    fn default() -> Self {
        EmbedCluster {
            device: Device::Auto,
            preempt_grace_s: default_grace(),
        }
    }
}

/// An embed job manifest (validated: `data.path`, `embed.model` and `embed.out` are set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedManifest {
    /// Job identifier (letters, digits, `.`, `_`, `-`).
    pub run_id: String,
    /// The prepared dataset.
    pub data: EmbedData,
    /// What to embed with and where to.
    pub embed: EmbedSection,
    /// Device and grace period.
    #[serde(default)]
    pub cluster: EmbedCluster,
}

/// Whether the manifest YAML `text` has a top-level `embed:` section.
pub fn is_embed_yaml(text: &str) -> bool {
    serde_norway::from_str::<serde_norway::Value>(text)
        .ok()
        .and_then(|v| v.as_mapping().map(|m| m.contains_key("embed")))
        .unwrap_or(false)
}

impl EmbedManifest {
    /// Parses YAML text (`path` names it in errors), refusing training sections by name.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let parse_err = |message: String| Error::Parse {
            path: path.into(),
            message,
        };
        let v: serde_norway::Value =
            serde_norway::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        if let Some(m) = v.as_mapping() {
            for s in TRAINING_ONLY {
                if m.contains_key(s) {
                    return Err(Error::config(
                        s,
                        format!(
                            "an embed job (a manifest with `embed:`) does not train and has no `{s}` section; \
                             the model is `embed.model` (remove `{s}`, or remove `embed` to train)"
                        ),
                    ));
                }
            }
        }
        serde_norway::from_value(v).map_err(|e| parse_err(e.to_string()))
    }

    /// Reads a manifest, makes local paths absolute (relative to the file) and validates it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        let mut m = Self::parse(&text, path)?;
        m.resolve_paths(&crate::config::base_dir(path)?);
        m.validate()?;
        Ok(m)
    }

    /// Makes the local paths of `data.path`, `embed.model` and `embed.out` absolute.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.data.path,
            &mut self.embed.model,
            &mut self.embed.out,
        ]
        .into_iter()
        .flatten()
        {
            if !p.contains("://") {
                *p = crate::config::lexical_join(base, Path::new(p.as_str()))
                    .to_string_lossy()
                    .into_owned();
            }
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        super::check_run_id(&self.run_id)?;
        let data = self.data.path.as_deref().ok_or_else(|| {
            Error::config(
                "data.path",
                "missing: the prepared dataset to embed (`scfm prepare` writes one; embed a single file with `scfm embed`)",
            )
        })?;
        if data.contains("://") {
            crate::storage::Store::check_url(data)
                .map_err(|e| Error::config("data.path", e.to_string()))?;
        } else if !Path::new(data)
            .join(crate::data::prepared::DATASET_JSON)
            .is_file()
        {
            return Err(Error::config(
                "data.path",
                format!(
                    "`{data}` is not a prepared dataset (no dataset.json): run `scfm prepare` first, or embed a single file with `scfm embed`"
                ),
            ));
        }
        let model = self.embed.model.as_deref().ok_or_else(|| {
            Error::config(
                "embed.model",
                "missing: a run's checkpoint URL, one ckpt-* directory, or an export folder",
            )
        })?;
        if !model.contains("://") && !PathBuf::from(model).exists() {
            return Err(Error::config(
                "embed.model",
                format!("`{model}` does not exist"),
            ));
        }
        let out = self.embed.out.as_deref().ok_or_else(|| {
            Error::config(
                "embed.out",
                "missing: the URL or directory the parts and index.json are written to",
            )
        })?;
        crate::storage::Store::check_url(out)
            .map_err(|e| Error::config("embed.out", e.to_string()))?;
        if self.embed.batch_size == 0 {
            return Err(Error::config("embed.batch_size", "must be >= 1"));
        }
        if self.embed.key.is_empty() || self.embed.key.contains('/') {
            return Err(Error::config(
                "embed.key",
                format!("`{}` must be a non-empty name without `/`", self.embed.key),
            ));
        }
        if self.embed.threads == Some(0) {
            return Err(Error::config("embed.threads", "must be >= 1"));
        }
        Ok(())
    }

    /// The prepared dataset (validated).
    pub fn dataset(&self) -> &str {
        self.data.path.as_deref().unwrap_or_default()
    }

    /// The model (validated).
    pub fn model(&self) -> &str {
        self.embed.model.as_deref().unwrap_or_default()
    }

    /// The output URL (validated).
    pub fn out(&self) -> &str {
        self.embed.out.as_deref().unwrap_or_default()
    }

    /// Serializes back to YAML.
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("manifest serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        std::fs::create_dir_all(dir.join("prep")).unwrap();
        std::fs::write(dir.join("prep/dataset.json"), b"{}").unwrap();
        std::fs::create_dir_all(dir.join("run")).unwrap();
        let p = dir.join("embed.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn check(text: &str) -> Result<EmbedManifest> {
        let dir = tempfile::tempdir().unwrap();
        EmbedManifest::load(&write(dir.path(), text))
    }

    #[test]
    fn job_load_tells_the_kinds_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), OK);
        assert!(matches!(
            crate::manifest::ConfigFile::load(&p),
            Ok(crate::manifest::ConfigFile::Embed(_))
        ));
        let e = crate::manifest::Manifest::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("is an embed job") && e.contains("scfm local"),
            "{e}"
        );
    }

    const OK: &str = "run_id: e1\ndata: {path: prep}\nembed: {model: run, out: emb}\n";

    #[test]
    fn embed_manifest_resolves_and_defaults() {
        assert!(is_embed_yaml(OK) && !is_embed_yaml("run_id: t\n"));
        let m = check(OK).unwrap();
        assert!(m.dataset().ends_with("/prep") && m.model().ends_with("/run"));
        assert!(Path::new(m.out()).is_absolute());
        assert_eq!((m.embed.batch_size, m.embed.key.as_str()), (64, "X_scfm"));
        assert_eq!(m.cluster, EmbedCluster::default());
        let again = EmbedManifest::parse(&m.to_yaml(), Path::new("x")).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn embed_manifest_errors_name_the_field() {
        let e = |t: &str| check(t).unwrap_err().to_string();
        let msg = e("run_id: e1\ndata: {path: prep}\nembed: {model: run}\n");
        assert!(
            msg.starts_with("invalid config `embed.out`: missing"),
            "{msg}"
        );
        let msg = e("run_id: e1\ndata: {path: prep}\nembed: {out: x}\n");
        assert!(
            msg.starts_with("invalid config `embed.model`: missing"),
            "{msg}"
        );
        let msg = e("run_id: e1\ndata: {}\nembed: {model: run, out: x}\n");
        assert!(
            msg.starts_with("invalid config `data.path`: missing"),
            "{msg}"
        );
        let msg = e("run_id: e1\ndata: {path: run}\nembed: {model: run, out: x}\n");
        assert!(msg.contains("not a prepared dataset"), "{msg}");
        let msg = e(&format!("{OK}training: {{max_steps: 3}}\n"));
        assert!(
            msg.starts_with("invalid config `training`: an embed job"),
            "{msg}"
        );
        let msg = e(&OK.replace("out: emb", "out: emb, batch_size: 0"));
        assert_eq!(msg, "invalid config `embed.batch_size`: must be >= 1");
        let msg = e(&OK.replace("out: emb", "out: ftp://h/x"));
        assert!(
            msg.contains("embed.out") && msg.contains("not supported"),
            "{msg}"
        );
        let msg = e(&format!("{OK}cluster: {{max_workers: 2}}\n"));
        assert!(msg.contains("unknown field `max_workers`"), "{msg}");
    }
}
