//! `scfm report RUN --out DIR`: plots (PNG and SVG) and an `index.html` of a training run,
//! read from its checkpoint URL (any store [`Store`] opens: a local directory, `file://`,
//! `s3://`, ...): the metrics log (`metrics/part-*.jsonl`), the `ckpt-*/` directories,
//! `latest.json`, the newest
//! checkpoint's `state.json` (model config and settings), a stored manifest copy
//! (`manifest.yaml`/`.yml`/`.json`) and evaluation results (`evaluation.json`,
//! `evaluation.md`, or a file given with `--eval`).

pub mod data;
pub mod html;
pub mod plots;

use std::path::{Path, PathBuf};

use scfm_common::checkpoint::{LATEST, Latest, StateFile, checkpoint_dirs, step_of};
use scfm_common::metrics_log;
use scfm_common::storage::Store;

use data::Metrics;

/// Errors of `scfm report`.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Storage or other error from `scfm-common`.
    #[error(transparent)]
    Common(#[from] scfm_common::Error),
    /// RUN is a local path that does not exist.
    #[error("no run at {0}: no such directory")]
    NoRun(String),
    /// RUN has no metrics log.
    #[error(
        "{url} has no metrics log (metrics/part-*.jsonl): RUN must be a run's checkpoint.url (the directory holding metrics/ and ckpt-*/)"
    )]
    NoMetrics {
        /// The run's URL.
        url: String,
    },
    /// A line of the metrics log is not what a writer of scfm produces.
    #[error("{url} line {line}: {message}")]
    Malformed {
        /// URL of the metrics object (a part, or an older scfm's `metrics.jsonl`).
        url: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The metrics log has no step line.
    #[error("{0} has no step lines: the run has not completed a step yet")]
    NoSteps(String),
    /// The evaluation file cannot be read or parsed.
    #[error("evaluation file {path}: {message}")]
    Eval {
        /// Its path or URL.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// An output file cannot be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error("cannot draw {path}: {message}")]
    Plot {
        /// The plot file.
        path: PathBuf,
        /// The backend's message.
        message: String,
    },
}

/// Arguments of `scfm report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// The run: its checkpoint.url (local directory, file://, s3://, ...) holding
    /// metrics/ and ckpt-*/.
    pub run: String,
    /// Folder for index.html and the plots (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Evaluation results to show: .md verbatim, .json `{"rows": [{...}]}` as a table
    /// (default: evaluation.json / evaluation.md in RUN, when present).
    #[arg(long)]
    pub eval: Option<PathBuf>,
}

impl ReportArgs {
    /// Reads the run and writes the report; returns the path of `index.html`.
    pub async fn run(&self) -> Result<PathBuf, ReportError> {
        let run = load(&self.run, self.eval.as_deref()).await?;
        write(&run, &self.out)
    }
}

/// An evaluation document shown on the page.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalDoc {
    /// Shown verbatim.
    Text {
        /// Where it came from.
        source: String,
        /// Its text.
        text: String,
    },
    /// `{"rows": [...]}` shown as a table (other JSON as formatted text).
    Json {
        /// Where it came from.
        source: String,
        /// The document.
        value: serde_json::Value,
        /// The keys of the rows in the order the file first names them (the table's
        /// columns).
        columns: Vec<String>,
    },
}

/// Everything the report shows about a run.
#[derive(Debug, Clone)]
pub struct Run {
    /// The run's URL.
    pub url: String,
    /// The parsed metrics log.
    pub metrics: Metrics,
    /// Steps of the checkpoint directories present.
    pub checkpoints: Vec<u64>,
    /// `latest.json`, when present.
    pub latest: Option<Latest>,
    /// `(checkpoint dir, state)` of the newest checkpoint's `state.json`.
    pub state: Option<(String, serde_json::Value)>,
    /// `(key, text)` of a stored manifest copy.
    pub manifest: Option<(String, String)>,
    /// Evaluation documents.
    pub evaluation: Vec<EvalDoc>,
    /// Things the reader should know (unreadable optional files, ...).
    pub notes: Vec<String>,
}

impl Run {
    /// Steps marked as checkpoints on the loss plot: the directories present and the
    /// `checkpoint` events logged (older ones may have been deleted by `keep_last`).
    pub fn checkpoint_steps(&self) -> Vec<u64> {
        let mut s: Vec<u64> = self
            .checkpoints
            .iter()
            .chain(&self.metrics.checkpoint_events)
            .copied()
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    }
}

/// The keys of the objects in `rows` of a JSON document, in the order the text first
/// names them (`serde_json::Value` sorts keys); empty when there is no such array.
pub fn row_columns(text: &str) -> Vec<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(k) = m.next_key::<String>()? {
                        m.next_value::<IgnoredAny>()?;
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        rows: Vec<Keys>,
    }
    let mut cols: Vec<String> = Vec::new();
    if let Ok(doc) = serde_json::from_str::<Doc>(text) {
        for k in doc.rows.into_iter().flat_map(|r| r.0) {
            if !cols.contains(&k) {
                cols.push(k);
            }
        }
    }
    cols
}

/// Classifies an evaluation document by its name: `.json` must parse, `.md` (and
/// anything that is not JSON) is shown verbatim.
pub fn eval_doc(source: &str, bytes: &[u8]) -> Result<EvalDoc, ReportError> {
    let text = String::from_utf8_lossy(bytes).to_string();
    let parsed = serde_json::from_str::<serde_json::Value>(&text);
    if source.ends_with(".json") {
        let value = parsed.map_err(|e| ReportError::Eval {
            path: source.to_string(),
            message: format!("not JSON: {e}"),
        })?;
        return Ok(EvalDoc::Json {
            source: source.to_string(),
            value,
            columns: row_columns(&text),
        });
    }
    let is_md = [".md", ".markdown", ".txt"]
        .iter()
        .any(|e| source.ends_with(e));
    Ok(match parsed {
        Ok(value) if !is_md => EvalDoc::Json {
            source: source.to_string(),
            value,
            columns: row_columns(&text),
        },
        _ => EvalDoc::Text {
            source: source.to_string(),
            text,
        },
    })
}

/// Reads the run at `url`; `eval` is a local evaluation file to show instead of the
/// run's own `evaluation.json` / `evaluation.md`.
pub async fn load(url: &str, eval: Option<&Path>) -> Result<Run, ReportError> {
    // Store::open creates a missing local directory: refuse a typo'd path first.
    let local = match url.strip_prefix("file://") {
        Some(p) => Some(p),
        None if !url.contains("://") => Some(url),
        None => None,
    };
    if let Some(p) = local
        && !Path::new(p).is_dir()
    {
        return Err(ReportError::NoRun(url.to_string()));
    }
    let store = Store::open(url)?;
    let keys = metrics_log::log_keys(&store).await?;
    if keys.is_empty() {
        return Err(ReportError::NoMetrics {
            url: store.url().to_string(),
        });
    }
    let mut parser = data::Parser::default();
    let mut malformed = None;
    metrics_log::for_each_part(&store, &keys, |key, text| {
        if malformed.is_none()
            && let Err(e) = parser.feed(text, &store.url_of(key))
        {
            malformed = Some(e);
        }
        Ok(())
    })
    .await?;
    if let Some(e) = malformed {
        return Err(e);
    }
    let metrics = parser.finish();
    if metrics.steps.is_empty() {
        return Err(ReportError::NoSteps(store.url_of(metrics_log::DIR)));
    }
    let mut notes = Vec::new();
    let dirs = checkpoint_dirs(&store).await?;
    let latest = match store.get_opt(LATEST).await? {
        Some(b) => match serde_json::from_slice::<Latest>(&b) {
            Ok(l) => Some(l),
            Err(e) => {
                notes.push(format!("{} is unreadable: {e}", store.url_of(LATEST)));
                None
            }
        },
        None => None,
    };
    let newest = latest
        .as_ref()
        .map(|l| l.dir.clone())
        .or_else(|| dirs.last().cloned());
    let mut state = None;
    if let Some(dir) = newest {
        let key = format!("{dir}/state.json");
        match store.get_opt(&key).await? {
            Some(b) => match serde_json::from_slice::<StateFile>(&b) {
                Ok(s) => state = Some((dir, s.state)),
                Err(e) => notes.push(format!("{} is unreadable: {e}", store.url_of(&key))),
            },
            None => notes.push(format!("{} is missing", store.url_of(&key))),
        }
    }
    let mut manifest = None;
    for key in ["manifest.yaml", "manifest.yml", "manifest.json"] {
        if let Some(b) = store.get_opt(key).await? {
            manifest = Some((key.to_string(), String::from_utf8_lossy(&b).to_string()));
            break;
        }
    }
    let mut evaluation = Vec::new();
    if let Some(p) = eval {
        let bytes = std::fs::read(p).map_err(|e| ReportError::Eval {
            path: p.display().to_string(),
            message: e.to_string(),
        })?;
        evaluation.push(eval_doc(&p.display().to_string(), &bytes)?);
    } else {
        for key in ["evaluation.json", "evaluation.md"] {
            if let Some(b) = store.get_opt(key).await? {
                evaluation.push(eval_doc(&store.url_of(key), &b)?);
            }
        }
    }
    Ok(Run {
        url: store.url().to_string(),
        metrics,
        checkpoints: dirs.iter().filter_map(|d| step_of(d)).collect(),
        latest,
        state,
        manifest,
        evaluation,
        notes,
    })
}

/// Writes the plots and `index.html` of `run` into `out`; returns the page's path.
pub fn write(run: &Run, out: &Path) -> Result<PathBuf, ReportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReportError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let charts = plots::charts(&run.metrics, &run.checkpoint_steps());
    for c in &charts {
        plots::render(c, out)?;
    }
    let index = out.join("index.html");
    std::fs::write(&index, html::page(run, &charts)).map_err(io(&index))?;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluation_documents_are_classified_by_name() {
        let j = br#"{"rows":[{"embedding":"pca","ari":0.5}]}"#;
        assert!(matches!(
            eval_doc("e.json", j).unwrap(),
            EvalDoc::Json { .. }
        ));
        assert!(matches!(eval_doc("e.md", j).unwrap(), EvalDoc::Text { .. }));
        assert!(matches!(
            eval_doc("e.md", b"| a |").unwrap(),
            EvalDoc::Text { .. }
        ));
        assert!(matches!(
            eval_doc("e.out", b"x y").unwrap(),
            EvalDoc::Text { .. }
        ));
        let cols = row_columns(r#"{"rows":[{"embedding":"a","z":1,"b":2},{"c":3,"b":1}],"n":1}"#);
        assert_eq!(cols, ["embedding", "z", "b", "c"]);
        assert!(row_columns("[1]").is_empty());
        let e = eval_doc("/x/e.json", b"{oops").unwrap_err().to_string();
        assert!(e.contains("/x/e.json") && e.contains("not JSON"), "{e}");
    }

    #[tokio::test]
    async fn missing_run_and_missing_metrics_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nope");
        let e = load(gone.to_str().unwrap(), None).await.unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert!(!gone.exists(), "a missing run directory is not created");
        let e = load(dir.path().to_str().unwrap(), None).await.unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("has no metrics log"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }

    #[tokio::test]
    async fn a_run_directory_becomes_a_page_with_plots() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(run.join("ckpt-000000004")).unwrap();
        let lines: String = (1..=4)
            .map(|s| format!("{{\"event\":\"step\",\"step\":{s},\"epoch\":0,\"loss\":{s}.5,\"mgem\":1.0,\"contrastive\":0.5,\"grad_norm\":1.0,\"lr\":0.001,\"cells_per_s\":10.0,\"data_wait_s\":0.1,\"compute_s\":0.2,\"allreduce_s\":0.0}}\n"))
            .collect();
        std::fs::create_dir_all(run.join("metrics")).unwrap();
        std::fs::write(run.join("metrics/part-000000.jsonl"), lines).unwrap();
        let state = r#"{"state":{"step":4,"model":{"hidden":32}},"files":{}}"#;
        std::fs::write(run.join("ckpt-000000004/state.json"), state).unwrap();
        std::fs::write(
            run.join("evaluation.md"),
            "| embedding | ARI |\n| <pca> | 0.5 |\n",
        )
        .unwrap();
        let r = load(run.to_str().unwrap(), None).await.unwrap();
        assert_eq!(r.checkpoints, vec![4]);
        assert_eq!(r.state.as_ref().unwrap().0, "ckpt-000000004");
        let index = write(&r, &dir.path().join("out")).unwrap();
        let page = std::fs::read_to_string(&index).unwrap();
        for stem in ["loss", "lr", "grad_norm", "throughput", "timing", "workers"] {
            assert!(page.contains(&format!("src=\"{stem}.png\"")), "{stem}");
            assert!(dir.path().join(format!("out/{stem}.svg")).exists());
        }
        assert!(
            page.contains("&lt;pca&gt;"),
            "evaluation markdown is escaped"
        );
        assert!(
            page.contains("&quot;hidden&quot;: 32"),
            "state.json is shown"
        );
    }
}
