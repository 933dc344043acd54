//! Every kind of YAML file scfm reads, told apart by its top-level keys, for `scfm
//! validate`: a job manifest, an embed job, a single-process training file, and the
//! settings of `scfm prepare`.

use std::path::Path;

use super::{EmbedManifest, Manifest};
use crate::config::{TrainFile, TrainSpec, is_url};
use crate::data::prepared::PrepareSettings;
use crate::error::{Error, Result};

/// A YAML file of one of the kinds scfm reads, loaded and validated.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigFile {
    /// A training job on a cluster (`run_id`, `cluster`, …): `scfm local` / `scfm launch`.
    Job(Box<Manifest>),
    /// An embed job (an `embed:` section): `scfm local`.
    Embed(Box<EmbedManifest>),
    /// Training in one process (`data`, `model`, `training`, `checkpoint`, no `run_id` or
    /// `cluster`): `scfm train --config`.
    Training(Box<TrainSpec>),
    /// Settings of `scfm prepare --settings`.
    Prepare(Box<PrepareSettings>),
}

/// Top-level keys that only a single-process training file (among the files without
/// `run_id`, `cluster` or `embed`) has.
const TRAINING_KEYS: [&str; 4] = ["data", "model", "training", "checkpoint"];

impl ConfigFile {
    /// Reads `path`, tells its kind from its top-level keys (`embed` → embed job; `run_id`
    /// or `cluster` → job manifest; `data`, `model`, `training` or `checkpoint` → training
    /// file; otherwise the settings of `scfm prepare`) and validates it as that kind.
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        let parse_err = |message: String| Error::Parse {
            path: path.into(),
            message,
        };
        let v: serde_norway::Value =
            serde_norway::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
        let Some(map) = v.as_mapping() else {
            return Err(parse_err(
                "expected a mapping of sections (a job manifest, an embed job, a training file or prepare settings)".into(),
            ));
        };
        let has = |k: &str| map.contains_key(k);
        if has("embed") {
            return Ok(ConfigFile::Embed(Box::new(EmbedManifest::load(path)?)));
        }
        if has("run_id") || has("cluster") {
            return Ok(ConfigFile::Job(Box::new(Manifest::load(path)?)));
        }
        if TRAINING_KEYS.iter().any(|k| has(k)) {
            let spec = TrainSpec::load(path)?;
            if !is_url(&spec.data.path) && !spec.data.path.exists() {
                return Err(Error::config(
                    "data.path",
                    format!("dataset `{}` does not exist", spec.data.path.display()),
                ));
            }
            return Ok(ConfigFile::Training(Box::new(spec)));
        }
        let settings: PrepareSettings = serde_norway::from_value(v.clone()).map_err(|e| {
            parse_err(format!(
                "{e}; not a job manifest (`run_id`, `cluster`), an embed job (`embed`), a training file (`data`, `checkpoint`) or prepare settings"
            ))
        })?;
        settings.validate()?;
        Ok(ConfigFile::Prepare(Box::new(settings)))
    }

    /// What kind of file it is and what runs it, for `scfm validate`.
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigFile::Job(_) => {
                "a job manifest (scfm local MANIFEST --workers N, scfm launch MANIFEST)"
            }
            ConfigFile::Embed(_) => "an embed job (scfm local MANIFEST --workers N)",
            ConfigFile::Training(_) => "a training file for one process (scfm train --config FILE)",
            ConfigFile::Prepare(_) => {
                "settings of scfm prepare (scfm prepare INPUTS --out OUT --settings FILE)"
            }
        }
    }

    /// The file with every default filled in and every path made absolute.
    pub fn to_yaml(&self) -> String {
        match self {
            ConfigFile::Job(m) => m.to_yaml(),
            ConfigFile::Embed(m) => m.to_yaml(),
            ConfigFile::Training(s) => {
                let file = TrainFile {
                    data: s.data.clone(),
                    model: serde_norway::to_value(&s.model).expect("model config serializes"),
                    training: s.training.clone(),
                    checkpoint: s.checkpoint.clone(),
                };
                serde_norway::to_string(&file).expect("training file serializes")
            }
            ConfigFile::Prepare(s) => serde_norway::to_string(s).expect("settings serialize"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `text` as `name` in a fresh folder holding `d.h5ad`, and loads it.
    fn load(name: &str, text: &str) -> Result<ConfigFile> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.h5ad"), b"x").unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        ConfigFile::load(&p)
    }

    #[test]
    fn tells_every_kind_apart_and_validates_it() {
        let train = "data: {path: d.h5ad}\nmodel: {preset: minimal}\ncheckpoint: {url: runs/x}\n";
        let f = load("train.yaml", train).unwrap();
        let ConfigFile::Training(s) = &f else {
            panic!("{f:?}")
        };
        assert!(s.data.path.is_absolute() && s.data.path.ends_with("d.h5ad"));
        assert!(f.kind().starts_with("a training file"), "{}", f.kind());
        // The resolved file reads back as the same training file.
        let again: TrainFile = serde_norway::from_str(&f.to_yaml()).unwrap();
        assert_eq!(TrainSpec::from_file(again, Path::new("/")).unwrap(), **s);
        let e = load("train.yaml", &train.replace("d.h5ad", "nope.h5ad"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.path") && e.contains("nope.h5ad"), "{e}");
        let e = load(
            "train.yaml",
            &format!("{train}training: {{batch_size: 1}}\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("training.batch_size"), "{e}");

        let job = format!("run_id: j\ncluster: {{max_workers: 2}}\n{train}");
        let f = load("job.yaml", &job).unwrap();
        assert!(matches!(f, ConfigFile::Job(_)) && f.kind().starts_with("a job manifest"));
        let e = load("job.yaml", &job.replace("run_id: j\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `run_id`"), "{e}");

        let f = load(
            "prep.yaml",
            "vocab: union\nmin_genes: 10\nshard_cells: 100\n",
        )
        .unwrap();
        assert!(matches!(f, ConfigFile::Prepare(_)) && f.kind().contains("scfm prepare"));
        let e = load("prep.yaml", "shard_cells: 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("shard_cells"), "{e}");
        let e = load("x.yaml", "bogus: 1\n").unwrap_err().to_string();
        assert!(
            e.contains("unknown field `bogus`") && e.contains("training file"),
            "{e}"
        );
        let e = load("x.yaml", "- a\n").unwrap_err().to_string();
        assert!(e.contains("expected a mapping"), "{e}");
    }

    /// A manifest named without a folder (`job.yaml`, run from its own folder) takes its
    /// relative paths from the current directory.
    #[test]
    fn a_bare_file_name_resolves_against_the_current_directory() {
        let base = crate::config::base_dir(Path::new("job.yaml")).unwrap();
        assert_eq!(base, std::env::current_dir().unwrap());
        let base = crate::config::base_dir(Path::new("configs/job.yaml")).unwrap();
        assert_eq!(base, std::env::current_dir().unwrap().join("configs"));
    }
}
