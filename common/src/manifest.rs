//! The job manifest: one YAML file that describes a training run on a cluster
//! (`scfm launch job.yaml`, `scfm local job.yaml --workers N`). See `configs/job-*.yaml`.
//! A manifest with an `embed:` section is an embed job instead ([`EmbedManifest`]).

mod embed;
mod kind;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{CheckpointConfig, DataConfig, Device, TrainFile, TrainSpec, TrainingConfig};
use crate::error::{Error, Result};

pub use self::embed::{EmbedCluster, EmbedData, EmbedManifest, EmbedSection, is_embed_yaml};
pub use self::kind::ConfigFile;

/// Cluster shape and timeouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Training starts once this many workers joined (after `join_timeout_s`), and
    /// pauses when fewer remain.
    #[serde(default = "one")]
    pub min_workers: usize,
    /// Training starts at once when this many joined; more are refused.
    pub max_workers: usize,
    /// `auto` (CUDA when present), `cpu` or `cuda`; overrides `training.device`.
    #[serde(default)]
    pub device: Device,
    /// How workers all-reduce gradients: `auto` (NCCL when every worker can use it, else
    /// the TCP ring), `nccl` (an error when NCCL cannot be used) or `ring`.
    #[serde(default)]
    pub collective: CollectiveBackend,
    /// Address the coordinator's gRPC server listens on (`host:port`, port 0 = any).
    #[serde(default = "default_listen")]
    pub coordinator: String,
    /// Host workers bind their ring sockets on (the address peers connect to).
    #[serde(default = "default_host")]
    pub worker_host: String,
    /// Worker heartbeat interval.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// A worker silent for this long is declared dead.
    #[serde(default = "default_worker_timeout")]
    pub worker_timeout_s: u64,
    /// How long to wait for `max_workers` before starting with `min_workers` (counted
    /// from the first join); the job fails when fewer than `min_workers` joined this long
    /// after the coordinator started.
    #[serde(default = "default_join_timeout")]
    pub join_timeout_s: u64,
    /// Deadline of every collective receive between workers.
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout_s: u64,
    /// Check that all workers hold identical parameters every this many steps.
    #[serde(default = "default_checksum_every")]
    pub checksum_every: u64,
    /// All-reduce the gradients block by block while the backward pass still runs (as
    /// PyTorch DDP's buckets do), instead of all at once after it. CPU gradients over the
    /// ring only; CUDA gradients are all-reduced after the backward pass either way.
    #[serde(default = "yes")]
    pub overlap_allreduce: bool,
    /// After SIGTERM, how long workers get to checkpoint and stop before the job fails.
    #[serde(default = "default_grace")]
    pub preempt_grace_s: u64,
}

/// `cluster.collective`: the backend of the gradient all-reduce between workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveBackend {
    /// NCCL when every worker of a generation can use it (CUDA device, NCCL loaded, one
    /// GPU per worker), else the TCP ring; each generation logs which and why.
    #[default]
    Auto,
    /// NCCL, or an error naming what is missing (and every path looked for).
    Nccl,
    /// The TCP ring; NCCL is never loaded.
    Ring,
}

impl std::fmt::Display for CollectiveBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CollectiveBackend::Auto => "auto",
            CollectiveBackend::Nccl => "nccl",
            CollectiveBackend::Ring => "ring",
        })
    }
}

fn default_grace() -> u64 {
    120
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_listen() -> String {
    "127.0.0.1:0".into()
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_heartbeat() -> u64 {
    1000
}
fn default_worker_timeout() -> u64 {
    30
}
fn default_join_timeout() -> u64 {
    120
}
fn default_collective_timeout() -> u64 {
    60
}
fn default_checksum_every() -> u64 {
    50
}

/// Metrics outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus `/metrics` on this address (`host:port`), if set.
    #[serde(default)]
    pub prometheus: Option<String>,
}

/// TLS files for the coordinator's gRPC endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the coordinator.
    pub cert: PathBuf,
    /// PEM private key of the coordinator.
    pub key: PathBuf,
    /// PEM CA certificate workers verify the coordinator with.
    pub ca: PathBuf,
    /// Server name in the certificate (default: `localhost`).
    #[serde(default)]
    pub domain: Option<String>,
    /// Also run the workers' gradient ring over TLS 1.3 with the same files: the accepting
    /// worker of every ring connection presents `cert` and `key`, the connecting one
    /// verifies them against `ca` for `domain`. Workers then need `--ring-tls-cert` and
    /// `--ring-tls-key` besides `--tls-ca` (`scfm local` passes them). Default `false`.
    #[serde(default)]
    pub ring: bool,
}

/// Who may join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Shared token workers present; prefer `token_env`.
    #[serde(default)]
    pub token: Option<String>,
    /// Name of an environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// TLS for the gRPC endpoint.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// A job manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Run identifier (letters, digits, `.`, `_`, `-`).
    pub run_id: String,
    /// Training data.
    pub data: DataConfig,
    /// `preset:` plus overrides.
    #[serde(default)]
    pub model: serde_norway::Value,
    /// Optimisation settings (`batch_size` is per worker).
    #[serde(default)]
    pub training: TrainingConfig,
    /// Cluster shape.
    pub cluster: ClusterConfig,
    /// Checkpoints.
    pub checkpoint: CheckpointConfig,
    /// Metrics outputs.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Authentication.
    #[serde(default)]
    pub auth: AuthConfig,
}

impl Manifest {
    /// Reads a manifest, makes relative paths absolute (relative to the file) and validates it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        if is_embed_yaml(&text) {
            return Err(Error::config(
                "embed",
                format!(
                    "{} is an embed job: run it with `scfm local {} --workers N` (or `scfm-worker embed-shards` on each machine)",
                    path.display(),
                    path.display()
                ),
            ));
        }
        let mut m = Self::parse(&text, path)?;
        m.resolve_paths(&crate::config::base_dir(path)?);
        m.validate()?;
        Ok(m)
    }

    /// Parses YAML text; `path` names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        serde_norway::from_str(text).map_err(|e| Error::Parse {
            path: path.into(),
            message: e.to_string(),
        })
    }

    /// Makes data, checkpoint and TLS paths absolute against `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &Path| crate::config::lexical_join(base, p);
        if !crate::config::is_url(&self.data.path) {
            self.data.path = abs(&self.data.path);
        }
        if !self.checkpoint.url.contains("://") {
            self.checkpoint.url = abs(Path::new(&self.checkpoint.url))
                .to_string_lossy()
                .into_owned();
        }
        if let Some(t) = &mut self.auth.tls {
            t.cert = abs(&t.cert);
            t.key = abs(&t.key);
            t.ca = abs(&t.ca);
        }
    }

    /// Checks every section; the error names the first bad field.
    pub fn validate(&self) -> Result<()> {
        check_run_id(&self.run_id)?;
        let c = &self.cluster;
        if c.max_workers == 0 {
            return Err(Error::config("cluster.max_workers", "must be >= 1"));
        }
        if c.min_workers == 0 || c.min_workers > c.max_workers {
            return Err(Error::config(
                "cluster.min_workers",
                format!(
                    "{} must be between 1 and cluster.max_workers ({})",
                    c.min_workers, c.max_workers
                ),
            ));
        }
        for (f, v) in [
            ("cluster.heartbeat_ms", c.heartbeat_ms),
            ("cluster.worker_timeout_s", c.worker_timeout_s),
            ("cluster.collective_timeout_s", c.collective_timeout_s),
            ("cluster.checksum_every", c.checksum_every),
        ] {
            if v == 0 {
                return Err(Error::config(f, "must be > 0"));
            }
        }
        if c.collective == CollectiveBackend::Nccl && c.device == Device::Cpu {
            return Err(Error::config(
                "cluster.collective",
                "`nccl` needs CUDA workers, but cluster.device is `cpu` (use `auto` or `ring`)",
            ));
        }
        if c.coordinator.parse::<std::net::SocketAddr>().is_err() {
            return Err(Error::config(
                "cluster.coordinator",
                format!("`{}` is not a host:port socket address", c.coordinator),
            ));
        }
        let url = self.data.path.to_string_lossy();
        if url.contains("://") {
            if let Err(e) = crate::storage::Store::check_url(&url) {
                return Err(Error::config("data.path", e.to_string()));
            }
        } else if !self.data.path.exists() {
            return Err(Error::config(
                "data.path",
                format!("dataset `{url}` does not exist"),
            ));
        }
        if let Err(e) = crate::storage::Store::check_url(&self.checkpoint.url) {
            return Err(Error::config("checkpoint.url", e.to_string()));
        }
        if let (None, Some(var)) = (&self.auth.token, &self.auth.token_env)
            && std::env::var(var).is_err()
        {
            return Err(Error::config(
                "auth.token_env",
                format!("environment variable `{var}` is not set"),
            ));
        }
        self.train_spec().map(|_| ())
    }

    /// Whether the job has a token (`auth.token` or `auth.token_env`): every request to
    /// its coordinator must carry it, and it keys the workers' ring.
    pub fn has_token(&self) -> bool {
        self.auth.token.is_some() || self.auth.token_env.is_some()
    }

    /// The shared token, if any (from `auth.token` or `auth.token_env`).
    pub fn token(&self) -> Option<String> {
        self.auth.token.clone().or_else(|| {
            self.auth
                .token_env
                .as_ref()
                .and_then(|v| std::env::var(v).ok())
        })
    }

    /// The training part as a validated [`TrainSpec`] (device from `cluster.device`).
    pub fn train_spec(&self) -> Result<TrainSpec> {
        let mut training = self.training.clone();
        training.device = self.cluster.device;
        let file = TrainFile {
            data: self.data.clone(),
            model: self.model.clone(),
            training,
            checkpoint: self.checkpoint.clone(),
        };
        TrainSpec::from_file(file, Path::new("/"))
    }

    /// Serializes back to YAML (what the coordinator hands to workers).
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("manifest serializes")
    }
}

/// Checks a `run_id`: non-empty letters, digits, `.`, `_` or `-`.
fn check_run_id(run_id: &str) -> Result<()> {
    if run_id.is_empty()
        || !run_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(Error::config(
            "run_id",
            format!("`{run_id}` must be non-empty letters, digits, `.`, `_` or `-`"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(extra_cluster: &str, data: &str) -> String {
        format!(
            "run_id: t1\ndata: {{path: {data}}}\nmodel: {{preset: minimal}}\ncluster:\n  max_workers: 2\n{extra_cluster}\ncheckpoint: {{url: ckpt}}\n"
        )
    }

    fn check(text: &str) -> Result<Manifest> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.h5ad"), b"x").unwrap();
        let p = dir.path().join("job.yaml");
        std::fs::write(&p, text).unwrap();
        Manifest::load(&p)
    }

    #[test]
    fn valid_manifest_resolves_paths() {
        let m = check(&manifest("", "d.h5ad")).unwrap();
        assert!(m.data.path.is_absolute() && m.checkpoint.url.ends_with("/ckpt"));
        assert_eq!((m.cluster.min_workers, m.cluster.max_workers), (1, 2));
        assert_eq!(m.cluster.collective, CollectiveBackend::Auto);
        for (text, want) in [
            ("  collective: auto", CollectiveBackend::Auto),
            ("  collective: nccl", CollectiveBackend::Nccl),
            ("  collective: ring", CollectiveBackend::Ring),
        ] {
            assert_eq!(
                check(&manifest(text, "d.h5ad")).unwrap().cluster.collective,
                want
            );
        }
        let again = Manifest::parse(&m.to_yaml(), Path::new("x")).unwrap();
        assert_eq!(again, m);
    }

    /// `auth.tls.ring` is off unless set, and survives the round trip to the workers.
    #[test]
    fn the_ring_tls_switch_defaults_to_off() {
        let tls = "auth:\n  tls: {cert: c.pem, key: k.pem, ca: ca.pem";
        let base = manifest("", "d.h5ad");
        let m = check(&format!("{base}{tls}}}\n")).unwrap();
        let t = m.auth.tls.as_ref().unwrap();
        assert!(!t.ring && t.cert.is_absolute());
        let m = check(&format!("{base}{tls}, ring: true}}\n")).unwrap();
        assert!(m.auth.tls.as_ref().unwrap().ring);
        let again = Manifest::parse(&m.to_yaml(), Path::new("x")).unwrap();
        assert_eq!(again, m);
    }

    /// YAML that does not parse, or a field in the wrong place: the error names the file,
    /// the line and column, and (for a field) its section and name.
    #[test]
    fn malformed_yaml_names_the_file_and_location() {
        // An unclosed flow mapping that starts on line 2.
        let text = "run_id: t1\ndata: {path: d.h5ad\nmodel: {preset: minimal}\n";
        let e = check(text).unwrap_err().to_string();
        assert!(
            e.starts_with("cannot parse ")
                && e.contains("job.yaml: did not find expected ',' or '}' at line 3 column 6")
                && e.ends_with("while parsing a flow mapping at line 2 column 7"),
            "{e}"
        );
        let e = check("run_id: t1\n  data: x\n").unwrap_err().to_string();
        assert!(
            e.starts_with("cannot parse ")
                && e.ends_with(
                    "job.yaml: mapping values are not allowed in this context at line 2 column 7"
                ),
            "{e}"
        );
        // deny_unknown_fields: the section, the field, what is allowed and where.
        let e = check(&manifest("  bogus: 1", "d.h5ad"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("job.yaml: cluster: unknown field `bogus`, expected one of `min_workers`")
                && e.ends_with("at line 6 column 3"),
            "{e}"
        );
    }

    #[test]
    fn bad_manifests_are_rejected_by_field() {
        let e = check(&manifest("  bogus: 1", "d.h5ad"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = check(&manifest("  min_workers: 3", "d.h5ad"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid config `cluster.min_workers`: 3 must be between 1 and cluster.max_workers (2)"
        );
        let e = check(&manifest("", "missing.h5ad"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid config `data.path`: dataset `")
                && e.ends_with("missing.h5ad` does not exist"),
            "{e}"
        );
        let e = check(&manifest("  coordinator: nowhere", "d.h5ad"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid config `cluster.coordinator`: `nowhere` is not a host:port socket address"
        );
        let text = manifest("", "d.h5ad").replace("url: ckpt", "url: ftp://host/run");
        let e = check(&text).unwrap_err().to_string();
        assert!(
            e.contains("checkpoint.url") && e.contains("`ftp://` is not supported"),
            "{e}"
        );
        let text = manifest("", "d.h5ad").replace("url: ckpt", "url: s3://bucket/run");
        check(&text).unwrap();
        let text = manifest("", "d.h5ad").replace("run_id: t1", "run_id: 'a b'");
        assert!(check(&text).unwrap_err().to_string().contains("run_id"));
        let text = manifest("", "d.h5ad").replace("preset: minimal", "preset: minimal, n_heads: 5");
        assert_eq!(
            check(&text).unwrap_err().to_string(),
            "invalid config `model.n_heads`: 5 heads do not divide hidden size 128"
        );
        let e = check(&manifest("  collective: mpi", "d.h5ad"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cluster.collective") && e.contains("unknown variant `mpi`"),
            "{e}"
        );
        let e = check(&manifest("  collective: nccl\n  device: cpu", "d.h5ad"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid config `cluster.collective`: `nccl` needs CUDA"),
            "{e}"
        );
        let text = format!(
            "{}auth: {{token_env: SCFM_SURELY_UNSET_VAR}}\n",
            manifest("", "d.h5ad")
        );
        assert!(
            check(&text)
                .unwrap_err()
                .to_string()
                .contains("SCFM_SURELY_UNSET_VAR")
        );
    }
}
