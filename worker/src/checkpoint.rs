//! Checkpoints in object storage: model and optimizer as safetensors, state as JSON.
//!
//! Layout under the checkpoint URL:
//! ```text
//! ckpt-<step:09>/model.safetensors      parameters by PyTorch name (loads with safetensors.torch)
//! ckpt-<step:09>/optimizer.safetensors  exp_avg.<name>, exp_avg_sq.<name>
//! ckpt-<step:09>/state.json             step, data cursor, RNG seed, digests, sha256 of each part
//! latest.json                           {"step", "dir", "state_sha256"}, written last
//! ```
//! Every part is uploaded and read back for its checksum before `state.json`, and
//! `latest.json` is written only after that, so a crash mid-save leaves the previous
//! checkpoint current. Saving is two halves: [`encode`] copies the tensors on the training
//! thread (fast), [`upload`] stores them (slow; run in the background by
//! [`crate::upload::Uploader`]). Which checkpoint a resume uses is decided by
//! [`scfm_common::checkpoint::select_verified`]: the newest that verifies.

use std::collections::HashMap;

use bytes::Bytes;
use safetensors::tensor::{Dtype, TensorView};
use scfm_common::checkpoint::{LATEST, StateFile, Verified, checkpoint_dirs, verify_dir};
pub use scfm_common::checkpoint::{Latest, dir_for};
use scfm_common::storage::{Store, sha256_hex};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::error::{Result, WorkerError};
use crate::optim::AdamW;
use crate::params::{FlatParams, Slot};

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

fn slot_tensors(slots: &[Slot], flat: &Tensor, prefix: &str) -> Vec<(String, Tensor)> {
    slots
        .iter()
        .map(|s| {
            (
                format!("{prefix}{}", s.name),
                flat.narrow(0, s.offset, s.numel).view(s.shape.as_slice()),
            )
        })
        .collect()
}

/// The checkpoint part holding the gene vocabulary (`token_id  gene_id  gene_symbol`).
pub const VOCAB_PART: &str = "vocab.tsv";

/// A checkpoint serialized in memory, ready to upload.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Its directory key.
    pub dir: String,
    /// Its state.
    pub state: TrainState,
    /// Parts by file name.
    pub parts: Vec<(String, Bytes)>,
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

    /// Serializes it (copies the tensors out).
    pub fn encode(&self) -> Result<Encoded> {
        let mut enc = encode_parts(
            &self.slots,
            [&self.flat, &self.exp_avg, &self.exp_avg_sq],
            self.opt_step,
            &self.state,
        )?;
        if let Some(v) = &self.vocab {
            enc.parts.push((VOCAB_PART.into(), v.clone()));
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
    let model = tensors_to_safetensors(&slot_tensors(slots, flat, ""), Some(meta))?;
    let mut opt_named = slot_tensors(slots, exp_avg, "exp_avg.");
    opt_named.extend(slot_tensors(slots, exp_avg_sq, "exp_avg_sq."));
    let optim = tensors_to_safetensors(
        &opt_named,
        Some(HashMap::from([("step".to_string(), opt_step.to_string())])),
    )?;
    Ok(Encoded {
        dir: dir_for(state.step),
        state: state.clone(),
        parts: vec![
            ("model.safetensors".into(), Bytes::from(model)),
            ("optimizer.safetensors".into(), Bytes::from(optim)),
        ],
    })
}

/// Uploads an encoded checkpoint: every part, read back and verified; then `state.json`;
/// then `latest.json`. Returns the directory key.
///
/// If a part or `state.json` cannot be written (a full disk, a refused upload), what was
/// written of this checkpoint is deleted again (best effort), so nothing half-written
/// stays behind and a full disk gets its space back; `latest.json` still names the
/// previous checkpoint.
pub async fn upload(store: &Store, enc: &Encoded) -> Result<String> {
    try_upload(store, store, enc).await.map_err(|f| f.error)
}

/// A failed [`try_upload`]: the error, and the keys it wrote that could not be removed.
#[derive(Debug)]
pub struct UploadFailed {
    /// Why it failed.
    pub error: WorkerError,
    /// Keys of this checkpoint that are still in the store.
    pub left: Vec<String>,
}

/// [`upload`], removing what a failed upload wrote through `cleanup` (the same store,
/// typically with a short retry window: the store may be down) and returning the keys it
/// could not remove.
pub async fn try_upload(
    store: &Store,
    cleanup: &Store,
    enc: &Encoded,
) -> std::result::Result<String, UploadFailed> {
    let dir = &enc.dir;
    let mut written = Vec::new();
    let state_sha = match upload_files(store, enc, &mut written).await {
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
            return Err(UploadFailed { error, left });
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
        }),
    }
}

/// Writes and verifies the parts of `enc`, then its `state.json`, adding each key to
/// `written` once it is stored; returns the sha256 of `state.json`.
async fn upload_files(store: &Store, enc: &Encoded, written: &mut Vec<String>) -> Result<String> {
    let dir = &enc.dir;
    let mut files = HashMap::new();
    for (name, bytes) in &enc.parts {
        let key = format!("{dir}/{name}");
        let sha = sha256_hex(bytes);
        store.put(&key, bytes.clone()).await?;
        written.push(key.clone());
        let back = store.get(&key).await?;
        if sha256_hex(&back) != sha {
            return Err(WorkerError::Checkpoint {
                url: store.url_of(&key),
                message: "read-back checksum differs from what was written".into(),
            });
        }
        files.insert(name.clone(), sha);
    }
    let state_bytes = serde_json::to_vec_pretty(&StateFile {
        state: serde_json::to_value(&enc.state).expect("state serializes"),
        files,
    })
    .expect("state serializes");
    let state_sha = sha256_hex(&state_bytes);
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

/// A verified checkpoint read back from storage.
#[derive(Debug)]
pub struct Loaded {
    /// Its state.
    pub state: TrainState,
    /// Parameters by name.
    pub model: NamedVecs,
    /// Optimizer moments by `exp_avg.<name>` / `exp_avg_sq.<name>`.
    pub optimizer: NamedVecs,
    /// Optimizer step count.
    pub opt_step: u64,
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

/// Loads and verifies the checkpoint in `dir` (checksums of every part).
pub async fn load(store: &Store, dir: &str, expect_state_sha: Option<&str>) -> Result<Loaded> {
    let v = verify_dir(store, dir, expect_state_sha).await?;
    decode(store, v)
}

/// Decodes a verified checkpoint.
pub fn decode(store: &Store, v: Verified) -> Result<Loaded> {
    let dir = v.dir.as_str();
    let err = |key: &str, message: String| WorkerError::Checkpoint {
        url: store.url_of(key),
        message,
    };
    let state_key = format!("{dir}/state.json");
    let state: TrainState = serde_json::from_value(v.state.state.clone())
        .map_err(|e| err(&state_key, format!("malformed state: {e}")))?;
    let part = |name: &str| {
        v.parts
            .get(name)
            .ok_or_else(|| err(&state_key, format!("lists no {name}")))
    };
    let opt_bytes = part("optimizer.safetensors")?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(opt_bytes).map_err(|e| err(dir, e.to_string()))?;
    let opt_step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| err(dir, "optimizer.safetensors has no `step` metadata".into()))?;
    Ok(Loaded {
        model: safetensors_to_vecs(
            part("model.safetensors")?,
            &store.url_of(&format!("{dir}/model.safetensors")),
        )?,
        optimizer: safetensors_to_vecs(
            opt_bytes,
            &store.url_of(&format!("{dir}/optimizer.safetensors")),
        )?,
        opt_step,
        state,
    })
}

/// Copies a loaded checkpoint's tensors into the flat buffers; every parameter must be
/// present with its shape.
pub fn restore(loaded: &Loaded, params: &FlatParams, opt: &mut AdamW) -> Result<()> {
    let n = params.numel() as usize;
    let mut p = vec![0f32; n];
    let mut m = vec![0f32; n];
    let mut v = vec![0f32; n];
    for s in &params.slots {
        let want: Vec<usize> = s.shape.iter().map(|&d| d as usize).collect();
        for (map, key, dst) in [
            (&loaded.model, s.name.clone(), &mut p),
            (&loaded.optimizer, format!("exp_avg.{}", s.name), &mut m),
            (&loaded.optimizer, format!("exp_avg_sq.{}", s.name), &mut v),
        ] {
            let (shape, vals) = map.get(&key).ok_or_else(|| WorkerError::Checkpoint {
                url: key.clone(),
                message: "missing from checkpoint".into(),
            })?;
            if shape != &want {
                return Err(WorkerError::Checkpoint {
                    url: key,
                    message: format!("shape {shape:?} but model has {want:?}"),
                });
            }
            dst[s.offset as usize..(s.offset + s.numel) as usize].copy_from_slice(vals);
        }
    }
    params.load_vec(&p);
    tch::no_grad(|| {
        opt.exp_avg
            .copy_(&Tensor::from_slice(&m).to_device(params.device()));
        opt.exp_avg_sq
            .copy_(&Tensor::from_slice(&v).to_device(params.device()));
    });
    opt.step = loaded.opt_step;
    Ok(())
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
        let vs = nn::VarStore::new(Device::Cpu);
        let _a = (&vs.root() / "layer").var(
            "weight",
            &[3, 2],
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
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let (_vs, p, opt, state) = setup();
        let d = save(&store, &p, &opt, &state).await.unwrap();
        let latest = latest(&store).await.unwrap().unwrap();
        assert_eq!((latest.step, latest.dir.as_str()), (7, d.as_str()));
        let loaded = load(&store, &d, Some(&latest.state_sha256)).await.unwrap();
        assert_eq!(loaded.state, state);
        assert_eq!(loaded.opt_step, 1);
        let (_vs2, p2, mut opt2, _) = setup();
        let _ = p2.flat.shallow_clone().fill_(0.0);
        restore(&loaded, &p2, &mut opt2).unwrap();
        assert_eq!(p2.to_vec(), p.to_vec());
        assert!(opt2.exp_avg_sq.equal(&opt.exp_avg_sq) && opt2.step == 1);

        // A truncated part fails its checksum and names the file.
        let path = dir.path().join(&d).join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let e = load(&store, &d, Some(&latest.state_sha256))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("does not match"),
            "{e}"
        );
        // A state.json that is not the one latest.json names is refused.
        let e = load(&store, &d, Some("0000"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("differs from latest.json"), "{e}");
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
