//! The checkpoint layout in object storage and the choice of the checkpoint to resume
//! from, shared by the coordinator (which decides) and the workers (which load).
//!
//! ```text
//! <url>/ckpt-<step:09>/<part>        parts (model.safetensors, optimizer.safetensors)
//! <url>/ckpt-<step:09>/state.json    {"state": …, "files": {part: sha256}, "sizes": {part: bytes}}
//! <url>/latest.json                  {"step", "dir", "state_sha256"}, written last
//! ```
//! `state.json` is written only after every part was uploaded and read back matching its
//! SHA-256, so it is a verified manifest: [`select_verified`] trusts it and checks each
//! part's size (one HEAD request) instead of downloading the parts; the part's bytes are
//! checked against their SHA-256 where they are read, once ([`PartReader`]). Checkpoints
//! of older scfm releases, whose `state.json` lists no sizes, are hashed whole (streamed)
//! when they are chosen. [`select_verified`] tries `latest.json`'s checkpoint first, then
//! older ones, newest first; directories newer than `latest.json` are unfinished uploads
//! and never used.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::{ObjectReader, Store, sha256_hex};

/// Key of the pointer to the current checkpoint.
pub const LATEST: &str = "latest.json";
/// Key of an older scfm's whole metrics log (now parts under `metrics/`, see
/// [`crate::metrics_log`]).
pub const METRICS: &str = "metrics.jsonl";

/// `latest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latest {
    /// Step of the current checkpoint.
    pub step: u64,
    /// Its directory key.
    pub dir: String,
    /// sha256 of its `state.json`.
    pub state_sha256: String,
}

/// `state.json` of a checkpoint: the trainer's state (opaque here) and the parts' sha256
/// and sizes, written after the parts were stored and read back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    /// The trainer's state (step, data cursor, settings, …).
    pub state: serde_json::Value,
    /// sha256 of each part, by file name.
    pub files: HashMap<String, String>,
    /// Size in bytes of each part, by file name (empty in older checkpoints).
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub sizes: HashMap<String, u64>,
}

/// Directory key of the checkpoint at `step`.
pub fn dir_for(step: u64) -> String {
    format!("ckpt-{step:09}")
}

/// The step of a checkpoint directory key, if it is one.
pub fn step_of(dir: &str) -> Option<u64> {
    dir.strip_prefix("ckpt-")?.parse().ok()
}

/// Checkpoint directories present under the store, oldest first.
pub async fn checkpoint_dirs(store: &Store) -> Result<Vec<String>> {
    let mut dirs: Vec<String> = store
        .list("")
        .await?
        .iter()
        .filter_map(|k| k.split_once('/').map(|(d, _)| d))
        .filter(|d| step_of(d).is_some())
        .map(str::to_string)
        .collect();
    dirs.sort();
    dirs.dedup();
    Ok(dirs)
}

/// A checkpoint whose `state.json` matched and whose parts are all present with their
/// recorded sizes (or, for an older checkpoint without sizes, matched their SHA-256).
#[derive(Debug, Clone)]
pub struct Verified {
    /// Its directory key.
    pub dir: String,
    /// Its `state.json`.
    pub state: StateFile,
    /// Newer checkpoints passed over, each with the reason.
    pub skipped: Vec<String>,
}

fn corrupt(store: &Store, key: &str, message: String) -> Error {
    Error::Corrupt {
        url: store.url_of(key),
        message,
    }
}

fn mismatch(got: &crate::storage::Streamed, want: &str) -> String {
    format!(
        "sha256 {} ({} bytes) does not match state.json's {want} (truncated or corrupt)",
        got.sha256, got.size
    )
}

/// Checks the checkpoint in `dir` without downloading its parts: `state.json` (against
/// `state_sha`, from `latest.json`, when given) and each part's presence and size (HEAD
/// requests). A checkpoint whose `state.json` records no sizes (an older scfm) has its
/// parts hashed instead, streamed.
pub async fn verify_dir(store: &Store, dir: &str, state_sha: Option<&str>) -> Result<Verified> {
    let state_key = format!("{dir}/state.json");
    let Some(sb) = store.get_opt(&state_key).await? else {
        return Err(corrupt(
            store,
            &state_key,
            "missing (an unfinished checkpoint)".into(),
        ));
    };
    if let Some(want) = state_sha
        && sha256_hex(&sb) != want
    {
        return Err(corrupt(
            store,
            &state_key,
            format!(
                "sha256 {} differs from latest.json's {want}",
                sha256_hex(&sb)
            ),
        ));
    }
    let state: StateFile = serde_json::from_slice(&sb)
        .map_err(|e| corrupt(store, &state_key, format!("malformed: {e}")))?;
    let mut names: Vec<&String> = state.files.keys().collect();
    names.sort();
    for name in names {
        let key = format!("{dir}/{name}");
        match state.sizes.get(name) {
            Some(&want) => match store.size_opt(&key).await? {
                None => return Err(corrupt(store, &key, "missing".into())),
                Some(got) if got != want => {
                    return Err(corrupt(
                        store,
                        &key,
                        format!(
                            "{got} bytes, but state.json records {want} (truncated or overwritten)"
                        ),
                    ));
                }
                Some(_) => {}
            },
            None => {
                let got = open_part(store, dir, &state, name)?.reader.finish().await;
                let got = match got {
                    Err(Error::Store {
                        source: object_store::Error::NotFound { .. },
                        ..
                    }) => return Err(corrupt(store, &key, "missing".into())),
                    r => r?,
                };
                if got.sha256 != state.files[name] {
                    return Err(corrupt(store, &key, mismatch(&got, &state.files[name])));
                }
            }
        }
    }
    Ok(Verified {
        dir: dir.to_string(),
        state,
        skipped: Vec::new(),
    })
}

/// A part of a checkpoint being read once, in blocks, and checked against `state.json`
/// as it is read ([`open_part`]).
#[derive(Debug)]
pub struct PartReader {
    reader: ObjectReader,
    sha256: String,
    size: Option<u64>,
    read: u64,
}

/// Starts reading the part `name` of the checkpoint in `dir` whose `state.json` is
/// `state`; an error when `state.json` does not list it.
pub fn open_part(store: &Store, dir: &str, state: &StateFile, name: &str) -> Result<PartReader> {
    let Some(sha) = state.files.get(name) else {
        return Err(corrupt(
            store,
            &format!("{dir}/state.json"),
            format!("lists no {name}"),
        ));
    };
    Ok(PartReader {
        reader: store.get_streamed(&format!("{dir}/{name}")),
        sha256: sha.clone(),
        size: state.sizes.get(name).copied(),
        read: 0,
    })
}

impl PartReader {
    /// The next block of the part; `None` at its end, once its size and SHA-256 matched
    /// `state.json` (an error naming the part when they do not).
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        let url = self.reader.url().to_string();
        let err = |message: String| Error::Corrupt {
            url: url.clone(),
            message,
        };
        match self.reader.next().await {
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Err(err("missing".into())),
            Err(e) => Err(e),
            Ok(Some(b)) => {
                self.read += b.len() as u64;
                match self.size {
                    Some(want) if self.read > want => Err(err(format!(
                        "longer than the {want} bytes state.json records"
                    ))),
                    _ => Ok(Some(b)),
                }
            }
            Ok(None) => {
                let got = self.reader.finish().await?;
                if got.sha256 != self.sha256 {
                    return Err(err(mismatch(&got, &self.sha256)));
                }
                Ok(None)
            }
        }
    }

    /// The part's URL.
    pub fn url(&self) -> &str {
        self.reader.url()
    }

    /// Reads the whole part into memory, checked (for small parts, and for inference,
    /// which needs the model whole).
    pub async fn read_all(mut self) -> Result<Bytes> {
        let mut all = BytesMut::with_capacity(self.size.unwrap_or(0) as usize);
        while let Some(b) = self.next().await? {
            all.extend_from_slice(&b);
        }
        Ok(all.freeze())
    }
}

/// The newest checkpoint that verifies: `latest.json`'s, else the previous ones, newest
/// first. `Ok(None)` when there is no checkpoint at all; an error when there are some but
/// none verifies (the reasons are named; nothing is silently restarted from scratch).
pub async fn select_verified(store: &Store) -> Result<Option<Verified>> {
    select_verified_below(store, u64::MAX).await
}

/// As [`select_verified`], among the checkpoints of steps below `below` only: a process
/// whose load of a verified checkpoint failed (a part of the right size whose bytes do not
/// hash as recorded) falls back to the ones before it.
pub async fn select_verified_below(store: &Store, below: u64) -> Result<Option<Verified>> {
    let mut skipped = Vec::new();
    let latest = match store.get_opt(LATEST).await? {
        None => None,
        Some(b) => match serde_json::from_slice::<Latest>(&b) {
            Ok(l) => Some(l),
            Err(e) => {
                skipped.push(format!("{}: malformed ({e})", store.url_of(LATEST)));
                None
            }
        },
    };
    let dirs = checkpoint_dirs(store).await?;
    let mut candidates: Vec<(String, Option<String>)> = Vec::new();
    let newest = match &latest {
        Some(l) if l.step < below => {
            candidates.push((l.dir.clone(), Some(l.state_sha256.clone())));
            l.step
        }
        _ => below,
    };
    for d in dirs.iter().rev() {
        if step_of(d).is_some_and(|s| s < newest) {
            candidates.push((d.clone(), None));
        }
    }
    if candidates.is_empty() {
        return match skipped.is_empty() {
            true => Ok(None),
            false => Err(Error::Corrupt {
                url: store.url_of(LATEST),
                message: format!("no usable checkpoint: {}", skipped.join("; ")),
            }),
        };
    }
    for (dir, sha) in candidates {
        match verify_dir(store, &dir, sha.as_deref()).await {
            Ok(mut v) => {
                for s in &skipped {
                    tracing::warn!(skipped = %s, using = %store.url_of(&dir), "a newer checkpoint failed verification; using an older one");
                }
                v.skipped = skipped;
                return Ok(Some(v));
            }
            Err(e) => skipped.push(e.to_string()),
        }
    }
    Err(Error::Corrupt {
        url: store.url().to_string(),
        message: format!(
            "no checkpoint verifies: {}; start over with --fresh or use another checkpoint URL",
            skipped.join("; ")
        ),
    })
}

/// Where a run starts: the step and data cursor of a verified checkpoint, or zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumePoint {
    /// Optimizer steps done.
    pub step: u64,
    /// Data cursor: epoch.
    pub epoch: u64,
    /// Data cursor: position in the epoch's order.
    pub position: u64,
    /// The checkpoint directory (`None`: a fresh start).
    pub dir: Option<String>,
}

impl ResumePoint {
    /// The resume point of a verified checkpoint (its state's step, epoch, position).
    pub fn of(v: &Verified, store: &Store) -> Result<ResumePoint> {
        let s = &v.state.state;
        match (
            s["step"].as_u64(),
            s["epoch"].as_u64(),
            s["position"].as_u64(),
        ) {
            (Some(step), Some(epoch), Some(position)) => Ok(ResumePoint {
                step,
                epoch,
                position,
                dir: Some(v.dir.clone()),
            }),
            _ => Err(Error::Corrupt {
                url: store.url_of(&format!("{}/state.json", v.dir)),
                message: "lacks step/epoch/position".into(),
            }),
        }
    }
}

/// Deletes every checkpoint, `latest.json` and the metrics log (its parts and index, and an
/// older scfm's `metrics.jsonl`) under `store` (`--fresh`).
pub async fn discard_all(store: &Store) -> Result<usize> {
    store.delete(LATEST).await?;
    let mut n = 0;
    for k in store.list("").await? {
        let in_ckpt = k.split_once('/').is_some_and(|(d, _)| step_of(d).is_some());
        let metrics = k == METRICS || k.starts_with("metrics/");
        if in_ckpt || metrics {
            store.delete(&k).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// The field-by-field differences between two JSON objects (`prefix.key: old -> new`),
/// recursing into nested objects; empty when equal.
pub fn json_diff(prefix: &str, old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    use serde_json::Value::{Null, Object};
    match (old, new) {
        (Object(a), Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    json_diff(&p, a.get(k).unwrap_or(&Null), b.get(k).unwrap_or(&Null))
                })
                .collect()
        }
        _ if old == new => Vec::new(),
        _ => vec![format!("{prefix}: {old} -> {new}")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn put_ckpt(store: &Store, step: u64, model: &[u8]) -> Latest {
        put_ckpt_sized(store, step, model, false).await
    }

    /// A checkpoint with one part, `model.bin`, written streamed; `state.json` records its
    /// size when `sized` (an older scfm's does not).
    async fn put_ckpt_sized(store: &Store, step: u64, model: &[u8], sized: bool) -> Latest {
        let dir = dir_for(step);
        let bytes = model.to_vec();
        let put = store
            .put_streamed(&format!("{dir}/model.bin"), move || {
                Ok(std::io::Cursor::new(bytes.clone()))
            })
            .await
            .unwrap();
        assert_eq!(put.sha256, sha256_hex(model));
        let sf = StateFile {
            state: serde_json::json!({"step": step}),
            files: HashMap::from([("model.bin".to_string(), put.sha256)]),
            sizes: match sized {
                true => HashMap::from([("model.bin".to_string(), put.size)]),
                false => HashMap::new(),
            },
        };
        let sb = serde_json::to_vec(&sf).unwrap();
        let l = Latest {
            step,
            dir: dir.clone(),
            state_sha256: sha256_hex(&sb),
        };
        store
            .put(&format!("{dir}/state.json"), sb.into())
            .await
            .unwrap();
        store
            .put(LATEST, serde_json::to_vec(&l).unwrap().into())
            .await
            .unwrap();
        l
    }

    #[tokio::test]
    async fn falls_back_to_the_newest_checkpoint_that_verifies() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path().to_str().unwrap()).unwrap();
        assert!(select_verified(&s).await.unwrap().is_none());
        put_ckpt(&s, 10, b"ten").await;
        put_ckpt(&s, 20, b"twenty").await;
        assert_eq!(select_verified(&s).await.unwrap().unwrap().dir, dir_for(20));
        // Truncate step 20's part: step 10 is used, the reason is kept.
        std::fs::write(d.path().join("ckpt-000000020/model.bin"), b"twen").unwrap();
        let v = select_verified(&s).await.unwrap().unwrap();
        assert_eq!(v.dir, dir_for(10));
        let part = open_part(&s, &v.dir, &v.state, "model.bin").unwrap();
        assert_eq!(&part.read_all().await.unwrap()[..], b"ten");
        assert!(
            v.skipped[0].contains("ckpt-000000020/model.bin"),
            "{:?}",
            v.skipped
        );
        // An unfinished newer upload (no latest.json pointing at it) is ignored.
        s.put("ckpt-000000030/model.bin", Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(select_verified(&s).await.unwrap().unwrap().dir, dir_for(10));
        // Everything corrupt: an error naming the reasons, not a fresh start.
        std::fs::write(d.path().join("ckpt-000000010/model.bin"), b"").unwrap();
        let e = select_verified(&s).await.unwrap_err().to_string();
        assert!(
            e.contains("no checkpoint verifies") && e.contains("--fresh"),
            "{e}"
        );
        // The metrics log goes too (its parts, index and an older whole file).
        for k in ["metrics/part-000000.jsonl", "metrics/index.json", METRICS] {
            s.put(k, Bytes::from_static(b"{}\n")).await.unwrap();
        }
        assert_eq!(discard_all(&s).await.unwrap(), 8);
        assert!(select_verified(&s).await.unwrap().is_none());
        assert!(s.list("metrics").await.unwrap().is_empty());
    }

    /// With one part in flight, a part is read only once the one before it is stored:
    /// the store never has two parts of an upload at once, and the object is whole.
    #[tokio::test]
    async fn one_part_in_flight_uploads_one_part_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let base = Store::open(d.path().to_str().unwrap()).unwrap();
        let (s, rec) = base.with_parts_in_flight(1).recorded();
        assert_eq!(s.parts_in_flight(), 1);
        let n = 3 * crate::storage::PART_BYTES + 999;
        let body: Vec<u8> = (0..n).map(|i| (i * 13 % 251) as u8).collect();
        let b = bytes::Bytes::from(body.clone());
        let put = s
            .put_streamed("big", move || Ok(std::io::Cursor::new(b.clone())))
            .await
            .unwrap();
        assert_eq!(put.size, n as u64);
        assert_eq!(put.sha256, crate::storage::sha256_hex(&body));
        let seen = rec.requests();
        assert_eq!(seen.parts, 4, "{seen:?}");
        assert_eq!(seen.most_parts_uploading, 1, "{seen:?}");
        assert_eq!(s.get("big").await.unwrap(), body);
    }

    /// A part larger than one upload part is never sent whole, choosing the checkpoint
    /// downloads no part, and reading it downloads it once, checking it as it passes.
    #[tokio::test]
    async fn parts_stream_in_bounded_requests_and_are_read_once() {
        let d = tempfile::tempdir().unwrap();
        let (s, rec) = Store::open(d.path().to_str().unwrap()).unwrap().recorded();
        let model: Vec<u8> = (0..(2 * crate::storage::PART_BYTES + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        put_ckpt_sized(&s, 10, b"ten", true).await;
        put_ckpt_sized(&s, 20, &model, true).await;
        let seen = rec.requests();
        assert_eq!(seen.multipart_uploads, 1, "{seen:?}");
        assert!(
            seen.largest_payload() <= crate::storage::PART_BYTES,
            "{seen:?}"
        );
        rec.reset();
        let v = select_verified(&s).await.unwrap().unwrap();
        assert_eq!(v.dir, dir_for(20));
        let seen = rec.requests();
        assert_eq!(seen.gets_of("model.bin"), 0, "{seen:?}");
        let mut part = open_part(&s, &v.dir, &v.state, "model.bin").unwrap();
        let mut n = 0;
        while let Some(b) = part.next().await.unwrap() {
            assert!(b.len() <= crate::storage::READ_BLOCK);
            n += b.len();
        }
        assert_eq!(n, model.len());
        assert_eq!(rec.requests().gets_of("ckpt-000000020/model.bin"), 1);
        // The same size with other bytes: found where it is read, naming the part.
        let path = d.path().join("ckpt-000000020/model.bin");
        let mut bad = model.clone();
        bad[PART_MID] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let v = select_verified(&s).await.unwrap().unwrap();
        let e = open_part(&s, &v.dir, &v.state, "model.bin")
            .unwrap()
            .read_all()
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ckpt-000000020/model.bin") && e.contains("does not match"),
            "{e}"
        );
        // Truncated: its size gives it away without a download; step 10 is chosen.
        std::fs::write(&path, &model[..1000]).unwrap();
        rec.reset();
        let v = select_verified(&s).await.unwrap().unwrap();
        assert_eq!(v.dir, dir_for(10));
        assert!(
            v.skipped[0].contains("1000 bytes, but state.json records"),
            "{:?}",
            v.skipped
        );
        assert_eq!(rec.requests().gets_of(".bin"), 0);
    }

    const PART_MID: usize = crate::storage::PART_BYTES + 3;

    #[test]
    fn json_diff_names_changed_fields() {
        let a = serde_json::json!({"model": {"hidden": 128, "n_layers": 2}, "seed": 0});
        let b = serde_json::json!({"model": {"hidden": 256, "n_layers": 2}, "seed": 0, "x": 1});
        assert_eq!(
            json_diff("", &a, &b),
            vec!["model.hidden: 128 -> 256", "x: null -> 1"]
        );
        assert!(json_diff("", &a, &a).is_empty());
    }
}
