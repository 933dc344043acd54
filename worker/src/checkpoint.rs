//! Checkpoints in object storage: model and optimizer as safetensors, state as JSON.
//!
//! Layout under the checkpoint URL:
//! ```text
//! ckpt-<step:09>/model.safetensors      parameters by PyTorch name (loads with safetensors.torch)
//! ckpt-<step:09>/optimizer.safetensors  exp_avg.<name>, exp_avg_sq.<name>
//! ckpt-<step:09>/state.json             step, data cursor, RNG seed, digests, sha256 of each part
//! latest.json                           {"step", "dir", "state_sha256"}, written last
//! ```
//! Every part is uploaded (streamed, a multipart upload) and read back (streamed) for its
//! checksum before `state.json`, which records each part's SHA-256 and size, and
//! `latest.json` is written only after that, so a crash mid-save leaves the previous
//! checkpoint current. Saving is two halves: [`Snapshot::encode`] writes the tensors in
//! blocks into spill files (next to training), [`upload`] streams those to the store
//! (slow; run in the background by [`crate::upload::Uploader`]); neither holds the encoded
//! model in memory. Which checkpoint a resume uses is decided by
//! [`scfm_common::checkpoint::select_verified`] (the newest whose manifest and part sizes
//! check out); [`load_into`] then reads each part once, streamed into the tensors, and
//! checks its SHA-256 as it reads.

use std::collections::HashMap;

use bytes::Bytes;
use safetensors::tensor::{Dtype, TensorView};
use scfm_common::checkpoint::{LATEST, StateFile, Verified, checkpoint_dirs, open_part};
pub use scfm_common::checkpoint::{Latest, dir_for};
use scfm_common::storage::Store;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::error::{Result, WorkerError};
use crate::fence::Fence;
use crate::optim::AdamW;
use crate::params::{FlatParams, Slot};

mod stream;

pub use stream::{BLOCK_ELEMS, Body, Part};
use stream::{Range, Target, encode_part, read_part_into};

/// Everything besides tensors that a resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Epoch of the next step.
    pub epoch: u64,
    /// Cells of that epoch consumed before the next step.
    pub position: usize,
    /// Run seed (every random stream derives from it and the step/epoch/cell).
    pub seed: u64,
    /// Digest of the model and data settings; a resume with other settings is refused.
    pub config_digest: String,
    /// Best validation loss so far.
    pub best_val: Option<f64>,
    /// Evaluations since the best one (early stopping).
    pub evals_since_best: usize,
    /// Validation loss at this checkpoint, if evaluated.
    pub val_loss: Option<f64>,
    /// The model configuration, as JSON.
    pub model: serde_json::Value,
    /// Number of genes in the vocabulary.
    pub n_genes: usize,
    /// The model, data and batch settings the run was started with (a resume with other
    /// settings is refused, naming the differences).
    #[serde(default)]
    pub settings: serde_json::Value,
}

impl TrainState {
    /// Records a validation loss; returns true when early stopping should end the run
    /// (`patience` evaluations in a row without a strictly lower loss than the best).
    pub fn observe_val(&mut self, val: f64, patience: Option<usize>) -> bool {
        self.val_loss = Some(val);
        if self.best_val.is_none_or(|b| val < b) {
            self.best_val = Some(val);
            self.evals_since_best = 0;
        } else {
            self.evals_since_best += 1;
        }
        patience.is_some_and(|p| self.evals_since_best >= p)
    }
}

/// Named tensors read from safetensors: name → (shape, values).
pub type NamedVecs = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Serializes named fp32 tensors as safetensors bytes.
pub fn tensors_to_safetensors(
    named: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(named.len());
    for (name, t) in named {
        let t = t.to_device(Device::Cpu).contiguous();
        let v: Vec<f32> = Vec::<f32>::try_from(&t.reshape([-1]))?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let shape = t.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, s, b)| {
            Ok((
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b)
                    .map_err(|e| WorkerError::Internal(e.to_string()))?,
            ))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, metadata)
        .map_err(|e| WorkerError::Internal(format!("safetensors: {e}")))
}

/// Reads named fp32 tensors (as flat `Vec<f32>` with shapes) from safetensors bytes.
pub fn safetensors_to_vecs(bytes: &[u8], what: &str) -> Result<NamedVecs> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| WorkerError::Checkpoint {
        url: what.into(),
        message: format!("not valid safetensors: {e}"),
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(WorkerError::Checkpoint {
                url: what.into(),
                message: format!("tensor `{name}` is {:?}, expected F32", view.dtype()),
            });
        }
        let v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), v));
    }
    Ok(out)
}

fn slot_ranges(slots: &[Slot], flat: &Tensor, prefix: &str) -> Vec<Range> {
    slots
        .iter()
        .map(|s| Range {
            name: format!("{prefix}{}", s.name),
            flat: flat.shallow_clone(),
            offset: s.offset,
            numel: s.numel,
            shape: s.shape.iter().map(|&d| d as usize).collect(),
        })
        .collect()
}

/// The checkpoint part holding the gene vocabulary (`token_id  gene_id  gene_symbol`).
pub const VOCAB_PART: &str = "vocab.tsv";

/// A checkpoint serialized (the tensors into spill files), ready to upload.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Its directory key.
    pub dir: String,
    /// Its state.
    pub state: TrainState,
    /// Its parts.
    pub parts: Vec<Part>,
}

/// The tensors and state a checkpoint is made of, shared with training (no copy): the
/// flat parameters and AdamW moments must not change until they are encoded — the
/// trainer waits for that (`Uploader::wait_snapshot`) before it writes them again.
pub struct Snapshot {
    /// Parameter layout in the flat buffers.
    pub slots: Vec<Slot>,
    /// Flat parameters (a shallow clone).
    pub flat: Tensor,
    /// AdamW first moments (a shallow clone).
    pub exp_avg: Tensor,
    /// AdamW second moments (a shallow clone).
    pub exp_avg_sq: Tensor,
    /// AdamW step count.
    pub opt_step: u64,
    /// Training state.
    pub state: TrainState,
    /// The gene vocabulary as `vocab.tsv` text, stored as a part so that the model can be
    /// used (`scfm embed`, `scfm export`) without the training data.
    pub vocab: Option<Bytes>,
}

impl Snapshot {
    /// Takes a snapshot of the trainer's tensors without copying them.
    pub fn of(params: &FlatParams, opt: &AdamW, state: &TrainState) -> Self {
        Snapshot {
            slots: params.slots.clone(),
            flat: params.flat.shallow_clone(),
            exp_avg: opt.exp_avg.shallow_clone(),
            exp_avg_sq: opt.exp_avg_sq.shallow_clone(),
            opt_step: opt.step,
            state: state.clone(),
            vocab: None,
        }
    }

    /// Adds the vocabulary part.
    pub fn with_vocab(mut self, vocab: Option<Bytes>) -> Self {
        self.vocab = vocab;
        self
    }

    /// Serializes it: the tensors are copied out in blocks of [`BLOCK_ELEMS`] values into
    /// spill files (anonymous temporary files in `TMPDIR`, gone with the last handle).
    pub fn encode(&self) -> Result<Encoded> {
        let mut enc = encode_parts(
            &self.slots,
            [&self.flat, &self.exp_avg, &self.exp_avg_sq],
            self.opt_step,
            &self.state,
        )?;
        if let Some(v) = &self.vocab {
            enc.parts.push(Part::memory(VOCAB_PART, v.clone()));
        }
        Ok(enc)
    }
}

/// Serializes `[parameters, exp_avg, exp_avg_sq]` laid out by `slots`, and the state.
fn encode_parts(
    slots: &[Slot],
    [flat, exp_avg, exp_avg_sq]: [&Tensor; 3],
    opt_step: u64,
    state: &TrainState,
) -> Result<Encoded> {
    // One metadata key: safetensors writes its metadata map in hash order, so several
    // keys would make otherwise identical checkpoints differ byte for byte.
    let scfm =
        serde_json::json!({"model": state.model, "n_genes": state.n_genes, "step": state.step});
    let meta = HashMap::from([("scfm".to_string(), scfm.to_string())]);
    let model = encode_part(
        "model.safetensors",
        &slot_ranges(slots, flat, ""),
        Some(meta),
    )?;
    let mut opt_ranges = slot_ranges(slots, exp_avg, "exp_avg.");
    opt_ranges.extend(slot_ranges(slots, exp_avg_sq, "exp_avg_sq."));
    let optim = encode_part(
        "optimizer.safetensors",
        &opt_ranges,
        Some(HashMap::from([("step".to_string(), opt_step.to_string())])),
    )?;
    Ok(Encoded {
        dir: dir_for(state.step),
        state: state.clone(),
        parts: vec![model, optim],
    })
}

/// Uploads an encoded checkpoint: every part streamed (a multipart upload in parts of
/// [`scfm_common::storage::PART_BYTES`]), read back streamed and verified; then
/// `state.json` with the parts' SHA-256 and sizes; then `latest.json`. Returns the
/// directory key.
///
/// If a part or `state.json` cannot be written (a full disk, a refused upload), what was
/// written of this checkpoint is deleted again (best effort), so nothing half-written
/// stays behind and a full disk gets its space back; `latest.json` still names the
/// previous checkpoint.
pub async fn upload(store: &Store, enc: &Encoded) -> Result<String> {
    try_upload(store, store, enc, None)
        .await
        .map_err(|f| f.error)
}

/// A failed [`try_upload`]: the error, and the keys it wrote that could not be removed.
#[derive(Debug)]
pub struct UploadFailed {
    /// Why it failed.
    pub error: WorkerError,
    /// Keys of this checkpoint that are still in the store.
    pub left: Vec<String>,
    /// The write of `latest.json` naming it failed without an answer (a store that died
    /// mid-request): it may have taken effect.
    pub unsure: bool,
}

/// [`upload`], removing what a failed upload wrote through `cleanup` (the same store,
/// typically with a short retry window: the store may be down) and returning the keys it
/// could not remove.
pub async fn try_upload(
    store: &Store,
    cleanup: &Store,
    enc: &Encoded,
    fence: Option<&Fence>,
) -> std::result::Result<String, UploadFailed> {
    let dir = &enc.dir;
    let fenced = async || match fence {
        Some(f) => f.check(store).await,
        None => None,
    };
    if let Some(reason) = fenced().await {
        return Err(UploadFailed {
            error: WorkerError::Ended(reason),
            left: Vec::new(),
            unsure: false,
        });
    }
    let mut written = Vec::new();
    let uploaded = match upload_files(store, enc, &mut written).await {
        // Checked again just before `latest.json` would name it: the upload takes time.
        Ok(sha) => match fenced().await {
            Some(reason) => Err(WorkerError::Ended(reason)),
            None => Ok(sha),
        },
        Err(e) => Err(e),
    };
    let state_sha = match uploaded {
        Ok(sha) => sha,
        Err(error) => {
            // Only what was written (a dead store is not asked again for the rest).
            let mut left = Vec::new();
            for key in written {
                if let Err(d) = cleanup.delete(&key).await {
                    tracing::warn!(url = %store.url_of(&key), error = %d, "could not remove a part of a failed checkpoint yet");
                    left.push(key);
                }
            }
            return Err(UploadFailed {
                error,
                left,
                unsure: false,
            });
        }
    };
    let latest = Latest {
        step: enc.state.step,
        dir: dir.clone(),
        state_sha256: state_sha,
    };
    let put = store
        .put(
            LATEST,
            Bytes::from(serde_json::to_vec_pretty(&latest).expect("latest serializes")),
        )
        .await;
    match put {
        Ok(()) => Ok(dir.clone()),
        // The parts are complete and verified: a later try rewrites them, and retention
        // removes them otherwise.
        Err(e) => Err(UploadFailed {
            error: e.into(),
            left: Vec::new(),
            unsure: true,
        }),
    }
}

/// Writes and verifies the parts of `enc`, then its `state.json`, adding each key to
/// `written` once it is stored; returns the sha256 of `state.json`.
async fn upload_files(store: &Store, enc: &Encoded, written: &mut Vec<String>) -> Result<String> {
    let dir = &enc.dir;
    let mut files = HashMap::new();
    let mut sizes = HashMap::new();
    for part in &enc.parts {
        let key = format!("{dir}/{}", part.name);
        let put = store.put_streamed(&key, part.opener()).await?;
        written.push(key.clone());
        if put.sha256 != part.sha256 || put.size != part.size {
            return Err(WorkerError::Checkpoint {
                url: store.url_of(&key),
                message: format!(
                    "the bytes uploaded (sha256 {}, {} bytes) are not those encoded (sha256 {}, {} bytes): the spill file changed",
                    put.sha256, put.size, part.sha256, part.size
                ),
            });
        }
        let back = store.get_streamed(&key).finish().await?;
        if back != put {
            return Err(WorkerError::Checkpoint {
                url: store.url_of(&key),
                message: format!(
                    "read-back checksum differs from what was written (sha256 {}, {} bytes read back)",
                    back.sha256, back.size
                ),
            });
        }
        files.insert(part.name.clone(), put.sha256);
        sizes.insert(part.name.clone(), put.size);
    }
    let state_bytes = serde_json::to_vec_pretty(&StateFile {
        state: serde_json::to_value(&enc.state).expect("state serializes"),
        files,
        sizes,
    })
    .expect("state serializes");
    let state_sha = scfm_common::storage::sha256_hex(&state_bytes);
    let key = format!("{dir}/state.json");
    store.put(&key, Bytes::from(state_bytes)).await?;
    written.push(key);
    Ok(state_sha)
}

/// Writes a checkpoint and then `latest.json` (encode + upload); returns the directory key.
pub async fn save(
    store: &Store,
    params: &FlatParams,
    opt: &AdamW,
    state: &TrainState,
) -> Result<String> {
    upload(store, &Snapshot::of(params, opt, state).encode()?).await
}

/// Reads `latest.json`, if any.
pub async fn latest(store: &Store) -> Result<Option<Latest>> {
    match store.get_opt(LATEST).await? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| WorkerError::Checkpoint {
                url: store.url_of(LATEST),
                message: format!("malformed: {e}"),
            }),
    }
}

/// The trainer's state in a checkpoint's `state.json`.
pub fn state_of(store: &Store, v: &Verified) -> Result<TrainState> {
    serde_json::from_value(v.state.state.clone()).map_err(|e| WorkerError::Checkpoint {
        url: store.url_of(&format!("{}/state.json", v.dir)),
        message: format!("malformed state: {e}"),
    })
}

fn targets(slots: &[Slot], flat: &Tensor, prefix: &str) -> HashMap<String, Target> {
    slots
        .iter()
        .map(|s| {
            (
                format!("{prefix}{}", s.name),
                Target {
                    flat: flat.shallow_clone(),
                    offset: s.offset,
                    shape: s.shape.iter().map(|&d| d as usize).collect(),
                },
            )
        })
        .collect()
}

/// Loads the checkpoint `v` (chosen by
/// [`scfm_common::checkpoint::select_verified`] or checked by
/// [`scfm_common::checkpoint::verify_dir`]) into the flat parameters and AdamW's moments
/// and step; returns its state. Each part is downloaded once, in blocks written straight
/// into the tensors, and checked against its SHA-256 and size as it is read; every
/// parameter must be present with its shape (checked before any value is written). On an
/// error (naming the part) the tensors may hold a mix of old and new values.
pub async fn load_into(
    store: &Store,
    v: &Verified,
    params: &FlatParams,
    opt: &mut AdamW,
) -> Result<TrainState> {
    let state = state_of(store, v)?;
    let mut part = open_part(store, &v.dir, &v.state, "model.safetensors")?;
    read_part_into(&mut part, &targets(&params.slots, &params.flat, "")).await?;
    let mut want = targets(&params.slots, &opt.exp_avg, "exp_avg.");
    want.extend(targets(&params.slots, &opt.exp_avg_sq, "exp_avg_sq."));
    let mut part = open_part(store, &v.dir, &v.state, "optimizer.safetensors")?;
    let meta = read_part_into(&mut part, &want).await?;
    opt.step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| WorkerError::Checkpoint {
            url: part.url().to_string(),
            message: "has no `step` metadata".into(),
        })?;
    Ok(state)
}

/// Deletes all but the newest `keep_last` checkpoints and `keep_also` (the best).
pub async fn retain(store: &Store, keep_last: usize, keep_also: Option<&str>) -> Result<()> {
    let keys = store.list("").await?;
    let dirs = checkpoint_dirs(store).await?;
    let n = dirs.len();
    for d in dirs.iter().take(n.saturating_sub(keep_last)) {
        if Some(d.as_str()) == keep_also {
            continue;
        }
        for k in keys.iter().filter(|k| k.starts_with(&format!("{d}/"))) {
            store.delete(k).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::optim::AdamWConfig;
    use tch::nn;

    /// A two-tensor model with an updated optimizer and a state at step 7.
    pub(crate) fn setup() -> (nn::VarStore, FlatParams, AdamW, TrainState) {
        setup_with(&[3, 2])
    }

    /// [`setup`] with a weight of shape `weight`.
    fn setup_with(weight: &[i64]) -> (nn::VarStore, FlatParams, AdamW, TrainState) {
        let vs = nn::VarStore::new(Device::Cpu);
        let _a = (&vs.root() / "layer").var(
            "weight",
            weight,
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
        let _b = (&vs.root() / "layer").var("bias", &[3], nn::Init::Const(0.5));
        let mut p = FlatParams::new(&vs);
        p.attach_grads();
        let mut opt = AdamW::new(
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            &p,
        );
        let _ = p.grad.shallow_clone().fill_(0.3);
        opt.update(&p, 0.1);
        let state = TrainState {
            step: 7,
            epoch: 1,
            position: 64,
            seed: 3,
            config_digest: "d".into(),
            best_val: Some(1.0),
            evals_since_best: 0,
            val_loss: None,
            model: serde_json::json!({}),
            n_genes: 2,
            settings: serde_json::json!({"model": {}}),
        };
        (vs, p, opt, state)
    }

    #[tokio::test]
    async fn save_load_restore_roundtrip_and_corruption_is_detected() {
        use scfm_common::checkpoint::verify_dir;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let (_vs, p, opt, state) = setup();
        let d = save(&store, &p, &opt, &state).await.unwrap();
        let latest = latest(&store).await.unwrap().unwrap();
        assert_eq!((latest.step, latest.dir.as_str()), (7, d.as_str()));
        // The bytes are those safetensors::serialize writes for the same tensors.
        let named: Vec<(String, Tensor)> = p
            .slots
            .iter()
            .map(|s| (s.name.clone(), p.view(s)))
            .collect();
        let scfm =
            serde_json::json!({"model": state.model, "n_genes": state.n_genes, "step": state.step});
        let meta = HashMap::from([("scfm".to_string(), scfm.to_string())]);
        let path = dir.path().join(&d).join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes, tensors_to_safetensors(&named, Some(meta)).unwrap());
        let v = verify_dir(&store, &d, Some(&latest.state_sha256))
            .await
            .unwrap();
        let (_vs2, p2, mut opt2, _) = setup();
        let _ = p2.flat.shallow_clone().fill_(0.0);
        let loaded = load_into(&store, &v, &p2, &mut opt2).await.unwrap();
        assert_eq!(loaded, state);
        assert_eq!(p2.to_vec(), p.to_vec());
        assert!(opt2.exp_avg_sq.equal(&opt.exp_avg_sq) && opt2.exp_avg.equal(&opt.exp_avg));
        assert_eq!(opt2.step, 1);

        // Other bytes of the same size fail their checksum where they are read, naming
        // the part.
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let e = load_into(&store, &v, &p2, &mut opt2)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("does not match"),
            "{e}"
        );
        // A truncated part fails its size check without being downloaded.
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let e = verify_dir(&store, &d, Some(&latest.state_sha256))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("state.json records"),
            "{e}"
        );
        // A state.json that is not the one latest.json names is refused.
        let e = verify_dir(&store, &d, Some("0000"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("differs from latest.json"), "{e}");
    }

    /// A checkpoint larger than one upload part: no request carries more than a part,
    /// choosing it downloads no part, and loading it downloads each part once.
    #[tokio::test]
    async fn a_large_checkpoint_streams_in_parts_and_each_part_is_read_once() {
        use scfm_common::checkpoint::select_verified;
        use scfm_common::storage::PART_BYTES;
        let dir = tempfile::tempdir().unwrap();
        let (store, rec) = Store::open(dir.path().to_str().unwrap())
            .unwrap()
            .recorded();
        // 3 M values: a 12 MB model part and a 24 MB optimizer part.
        let (_vs, p, opt, state) = setup_with(&[3000, 1000]);
        let d = save(&store, &p, &opt, &state).await.unwrap();
        let seen = rec.requests();
        assert!(seen.multipart_uploads >= 2, "{seen:?}");
        assert!(seen.largest_payload() <= PART_BYTES, "{seen:?}");
        let size = std::fs::metadata(dir.path().join(&d).join("optimizer.safetensors"))
            .unwrap()
            .len();
        assert!(size > 2 * PART_BYTES as u64, "{size}");
        rec.reset();
        let v = select_verified(&store).await.unwrap().unwrap();
        assert_eq!(rec.requests().gets_of(".safetensors"), 0);
        let (_vs2, p2, mut opt2, _) = setup_with(&[3000, 1000]);
        load_into(&store, &v, &p2, &mut opt2).await.unwrap();
        let seen = rec.requests();
        for part in ["model.safetensors", "optimizer.safetensors"] {
            assert_eq!(seen.gets_of(&format!("{d}/{part}")), 1, "{part}: {seen:?}");
        }
        assert_eq!(p2.to_vec(), p.to_vec());
        assert!(opt2.exp_avg_sq.equal(&opt.exp_avg_sq));
    }

    #[test]
    fn early_stopping_counts_evaluations_without_improvement() {
        let (_vs, _p, _o, mut s) = setup();
        s.best_val = None;
        let seq = [(3.0, false), (2.0, false), (2.5, false), (2.0, true)];
        for (v, stop) in seq {
            assert_eq!(s.observe_val(v, Some(2)), stop, "at {v}");
        }
        assert_eq!((s.best_val, s.evals_since_best), (Some(2.0), 2));
        assert!(!s.observe_val(1.0, Some(2)) && s.evals_since_best == 0);
        assert!(!s.observe_val(5.0, None));
    }

    #[tokio::test]
    async fn retention_keeps_last_n_and_the_best() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let (_vs, p, opt, mut state) = setup();
        for step in [1, 2, 3, 4, 5] {
            state.step = step;
            save(&store, &p, &opt, &state).await.unwrap();
        }
        retain(&store, 2, Some(&dir_for(2))).await.unwrap();
        let mut dirs: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ckpt-"))
            .collect();
        dirs.sort();
        assert_eq!(dirs, vec![dir_for(2), dir_for(4), dir_for(5)]);
    }
}
