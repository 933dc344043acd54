//! The metrics log of a run: one schema of lines ([`Record`]) written by the coordinator of
//! a cluster and by a single process alike, stored next to the checkpoints as an
//! append-only sequence of immutable numbered parts.
//!
//! ```text
//! <url>/metrics/part-000000.jsonl   lines written by one flush (never rewritten)
//! <url>/metrics/part-000001.jsonl
//! <url>/metrics/index.json          {"version", "parts", "max_step", "writer"}, after each part
//! <url>/metrics.jsonl               an older scfm's whole log (read first when present)
//! ```
//!
//! A flush writes only the lines that are new since the previous one, as the next part,
//! so memory and upload per step are constant however long the run. Object stores have no
//! append (S3, GCS, Azure), hence parts rather than one growing file.
//!
//! Lines are never deleted: when a run continues from an earlier step (a resume from a
//! checkpoint, or a new generation that undid a survivor's last step), the writer appends
//! a `rollback` line, and every earlier line whose `step` is above its `to_step` no longer
//! counts. [`Effective`] applies this; [`read_effective`] reads a run's counting lines
//! (what `scfm metrics RUN` prints).
//!
//! The index names the next part number and carries the writer's own state (the
//! coordinator's per-worker marks of what is durably written), so a restarted writer
//! continues the numbering and knows what it wrote; a part written after the last index
//! (a crash between the two writes) is read back by [`PartWriter::open`].

mod record;

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::checkpoint::METRICS;
use crate::error::{Error, Result};
use crate::storage::Store;

pub use record::{Record, StepLine};

/// The folder of the parts under the checkpoint URL.
pub const DIR: &str = "metrics";
/// The index, under [`DIR`].
pub const INDEX: &str = "metrics/index.json";
/// The index format version.
const INDEX_VERSION: u32 = 1;
/// Parts fetched at once by the readers.
const READ_CONCURRENCY: usize = 8;

/// The key of part `n`.
pub fn part_key(n: u64) -> String {
    format!("{DIR}/part-{n:06}.jsonl")
}

/// The number of a part key (`metrics/part-000017.jsonl` → 17).
pub fn part_number(key: &str) -> Option<u64> {
    key.strip_prefix(DIR)?
        .strip_prefix("/part-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// `metrics/index.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Index {
    /// Format version (1).
    pub version: u32,
    /// The number of the next part (parts `0..parts` are covered by this index).
    pub parts: u64,
    /// The highest `step` of any line written.
    pub max_step: u64,
    /// The writer's own state as of the last part (opaque here).
    #[serde(default)]
    pub writer: serde_json::Value,
}

/// What [`PartWriter::open`] found of an earlier writer.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The writer state of the last index, if any.
    pub writer: Option<serde_json::Value>,
    /// The lines of parts written after that index (a crash between a part and its
    /// index), in order.
    pub unindexed: Vec<String>,
}

/// Writes the parts and the index of a run's metrics log. One writer per run at a time.
#[derive(Debug)]
pub struct PartWriter {
    store: Store,
    next_part: u64,
    max_step: u64,
}

/// The `step` of a line, if it has one.
fn step_of(v: &serde_json::Value) -> Option<u64> {
    v.get("step").and_then(serde_json::Value::as_u64)
}

impl PartWriter {
    /// Continues the log at `store`: the next part number and the highest step come from
    /// the index and any part written after it; an older scfm's `metrics.jsonl` makes the
    /// highest step unknown (`u64::MAX`), so that a resume marks its rollback.
    pub async fn open(store: Store) -> Result<(PartWriter, Recovered)> {
        let index = match store.get_opt(INDEX).await? {
            Some(b) => Some(
                serde_json::from_slice::<Index>(&b).map_err(|e| Error::Corrupt {
                    url: store.url_of(INDEX),
                    message: format!("not a metrics index: {e}"),
                })?,
            ),
            None => None,
        };
        let covered = index.as_ref().map_or(0, |i| i.parts);
        let mut w = PartWriter {
            next_part: covered,
            max_step: index.as_ref().map_or(0, |i| i.max_step),
            store,
        };
        let mut rec = Recovered {
            writer: index.map(|i| i.writer).filter(|v| !v.is_null()),
            unindexed: Vec::new(),
        };
        for (n, key) in numbered_parts(&w.store).await? {
            if n < covered {
                continue;
            }
            let text = w.store.get(&key).await?;
            for l in String::from_utf8_lossy(&text).lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(l)
                    && let Some(s) = step_of(&v)
                {
                    w.max_step = w.max_step.max(s);
                }
                rec.unindexed.push(l.to_string());
            }
            w.next_part = n + 1;
        }
        if covered == 0 && w.store.get_tail_opt(METRICS, 1).await?.is_some() {
            w.max_step = u64::MAX;
        }
        Ok((w, rec))
    }

    /// The number the next part gets.
    pub fn next_part(&self) -> u64 {
        self.next_part
    }

    /// The highest `step` of any line written (`u64::MAX`: unknown, an older log).
    pub fn max_step(&self) -> u64 {
        self.max_step
    }

    /// Writes `lines` (JSON objects, without newlines) as the next part, then the index
    /// with `writer` as the writer's state. Nothing is written for no lines. An error
    /// means the part was not written (the numbering stays; the caller keeps the lines).
    /// An index that cannot be written is only logged: the part counts all the same, and
    /// a later [`PartWriter::open`] reads it back.
    pub async fn write(&mut self, lines: &[String], writer: serde_json::Value) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        let mut max_step = self.max_step;
        for l in lines {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(l)
                && let Some(s) = step_of(&v)
            {
                max_step = max_step.max(s);
            }
            text.push_str(l);
            text.push('\n');
        }
        self.store
            .put(&part_key(self.next_part), Bytes::from(text))
            .await?;
        self.next_part += 1;
        self.max_step = max_step;
        let index = Index {
            version: INDEX_VERSION,
            parts: self.next_part,
            max_step: self.max_step,
            writer,
        };
        let bytes = serde_json::to_vec(&index).expect("the index serializes");
        if let Err(e) = self.store.put(INDEX, Bytes::from(bytes)).await {
            tracing::warn!(error = %e, "could not write the metrics index (the part is written; a restarted writer reads it back)");
        }
        Ok(())
    }
}

/// A metrics log with its pending lines, shared by a producer that appends lines and a
/// flusher that writes them as parts (a single process: the training thread and the
/// checkpoint upload thread).
#[derive(Debug)]
pub struct MetricsLog {
    pending: std::sync::Mutex<Vec<String>>,
    writer: tokio::sync::Mutex<PartWriter>,
}

impl MetricsLog {
    /// A log continuing with `writer`.
    pub fn new(writer: PartWriter) -> Self {
        MetricsLog {
            pending: std::sync::Mutex::default(),
            writer: tokio::sync::Mutex::new(writer),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a record (written at the next flush).
    pub fn push(&self, r: &Record) {
        self.lock().push(r.to_line());
    }

    /// Lines not yet written.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    /// The highest step written so far (`u64::MAX`: unknown, an older log).
    pub async fn max_step(&self) -> u64 {
        self.writer.lock().await.max_step()
    }

    /// Writes the pending lines as one part; on failure they stay pending (in order, before
    /// any appended meanwhile). Returns the number of lines written.
    pub async fn flush(&self) -> Result<usize> {
        let mut w = self.writer.lock().await;
        let lines = std::mem::take(&mut *self.lock());
        match w.write(&lines, serde_json::Value::Null).await {
            Ok(()) => Ok(lines.len()),
            Err(e) => {
                let mut p = self.lock();
                let newer = std::mem::replace(&mut *p, lines);
                p.extend(newer);
                Err(e)
            }
        }
    }
}

/// The keys holding a run's metrics lines, in order: an older scfm's `metrics.jsonl` (when
/// present), then the parts by number.
pub async fn log_keys(store: &Store) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    if store.get_tail_opt(METRICS, 1).await?.is_some() {
        keys.push(METRICS.to_string());
    }
    keys.extend(numbered_parts(store).await?.into_iter().map(|(_, k)| k));
    Ok(keys)
}

/// The parts present, by number.
async fn numbered_parts(store: &Store) -> Result<Vec<(u64, String)>> {
    let mut parts: Vec<(u64, String)> = store
        .list(DIR)
        .await?
        .into_iter()
        .filter_map(|k| Some((part_number(&k)?, k)))
        .collect();
    parts.sort();
    Ok(parts)
}

/// Reads `keys` (a few at a time, in order), handing each object's text to `f` with its key.
pub async fn for_each_part(
    store: &Store,
    keys: &[String],
    mut f: impl FnMut(&str, &str) -> Result<()>,
) -> Result<()> {
    let mut got = futures::stream::iter(keys.iter().map(|k| {
        let store = store.clone();
        async move { (k, store.get(k).await) }
    }))
    .buffered(READ_CONCURRENCY);
    while let Some((k, bytes)) = got.next().await {
        f(k, &String::from_utf8_lossy(&bytes?))?;
    }
    Ok(())
}

/// The lines of a log that count, in order: a `rollback` line drops every earlier line
/// whose `step` is above its `to_step` (and stays itself, so readers see that it happened).
#[derive(Debug, Default)]
pub struct Effective {
    lines: Vec<(Option<u64>, serde_json::Value)>,
}

impl Effective {
    /// Adds the next line; an error says why it is not a JSON object.
    pub fn push_line(&mut self, line: &str) -> std::result::Result<(), String> {
        if line.trim().is_empty() {
            return Ok(());
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        if !v.is_object() {
            return Err("not a JSON object".into());
        }
        self.push(v);
        Ok(())
    }

    /// Adds the next parsed line.
    pub fn push(&mut self, v: serde_json::Value) {
        if let Some(to) = rollback_to(&v) {
            self.lines.retain(|(s, _)| s.is_none_or(|s| s <= to));
        }
        self.lines.push((step_of(&v), v));
    }

    /// The lines that count.
    pub fn into_lines(self) -> Vec<serde_json::Value> {
        self.lines.into_iter().map(|(_, v)| v).collect()
    }
}

/// `to_step` of a `rollback` line.
pub fn rollback_to(v: &serde_json::Value) -> Option<u64> {
    if v.get("event").and_then(serde_json::Value::as_str) != Some("rollback") {
        return None;
    }
    v.get("to_step").and_then(serde_json::Value::as_u64)
}

/// The lines of the run at `store` that count ([`Effective`]), or `None` when it has no
/// metrics log. A line that is not a JSON object is an error naming its object and line.
pub async fn read_effective(store: &Store) -> Result<Option<Vec<serde_json::Value>>> {
    let keys = log_keys(store).await?;
    if keys.is_empty() {
        return Ok(None);
    }
    let mut eff = Effective::default();
    for_each_part(store, &keys, |key, text| {
        for (i, l) in text.lines().enumerate() {
            eff.push_line(l).map_err(|message| Error::Corrupt {
                url: format!("{} line {}", store.url_of(key), i + 1),
                message,
            })?;
        }
        Ok(())
    })
    .await?;
    Ok(Some(eff.into_lines()))
}

/// The last lines of the log at `store`: whole parts from the newest back until one holds
/// a step line or `max_bytes` are read (the newest part alone is cut to its last
/// `max_bytes`, its first, partial line dropped). `None` when there is no log. Rollbacks
/// are not applied: the newest step line is the run's latest step either way.
pub async fn read_tail(store: &Store, max_bytes: u64) -> Result<Option<Vec<serde_json::Value>>> {
    let keys = log_keys(store).await?;
    if keys.is_empty() {
        return Ok(None);
    }
    let mut chunks: Vec<Vec<serde_json::Value>> = Vec::new();
    let mut read = 0u64;
    for key in keys.iter().rev() {
        let Some(t) = store.get_tail_opt(key, max_bytes - read).await? else {
            continue;
        };
        read += t.bytes.len() as u64;
        let whole = t.bytes.len() as u64 >= t.size;
        let text = String::from_utf8_lossy(&t.bytes);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .skip(usize::from(!whole))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let has_step = lines.iter().any(|v| v["event"] == "step");
        chunks.push(lines);
        if has_step || !whole || read >= max_bytes {
            break;
        }
    }
    Ok(Some(chunks.into_iter().rev().flatten().collect()))
}

/// Highest `(generation, step)` per worker among step lines, for a writer that continues
/// an earlier one's log.
pub fn worker_marks<'a>(
    lines: impl IntoIterator<Item = &'a serde_json::Value>,
) -> BTreeMap<String, (u64, u64)> {
    let mut marks = BTreeMap::new();
    for v in lines {
        if v["event"] != "step" {
            continue;
        }
        let (Some(w), Some(s)) = (v["worker"].as_str(), step_of(v)) else {
            continue;
        };
        let g = v["generation"].as_u64().unwrap_or(0);
        let e = marks.entry(w.to_string()).or_insert((g, s));
        *e = (*e).max((g, s));
    }
    marks
}

#[cfg(test)]
mod tests;
