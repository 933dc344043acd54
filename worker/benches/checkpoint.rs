//! `cargo bench -p scfm-worker --bench checkpoint`: time and peak extra memory of saving
//! and resuming a `large`-preset-sized checkpoint (parameters + two AdamW moments, ~1.45
//! GB) to local disk and to an S3-compatible server (s3s-fs from `.cache/s3s`, started
//! here), by the streamed path (`checkpoint::save`, `select_verified`, `load_into`) and by
//! the whole-in-memory path of earlier releases (`legacy`: the same safetensors
//! encoding, one put and one read-back per part, every part downloaded and decoded whole
//! by the coordinator's choice and again by the worker, as that code did).
//!
//! `streamed` holds the default two upload parts in flight, `streamed-1` one
//! (`SCFM_STORE_PARTS_IN_FLIGHT=1`). Each child tunes glibc's allocator as the worker
//! binary does (`alloc::tune`).
//!
//! Each phase — save, the coordinator's choice, the worker's load — of each (path, store)
//! runs in a child process of its own, measured from a reset high-water mark
//! (`/proc/self/clear_refs`), so "extra" is the phase's peak RSS (`VmHWM`) minus the RSS
//! before it (the model and its moments, or the model to load into, are allocated first).
//!
//! Environment: `SCFM_CKPT_BENCH_PARAMS` (parameters, default the `large` preset with a
//! 20,000-gene vocabulary), `SCFM_CKPT_BENCH_ONLY` (`local` or `s3`), `SCFM_S3S_FS`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use scfm_common::checkpoint::{LATEST, Latest, StateFile, select_verified, verify_dir};
use scfm_common::config::ModelConfig;
use scfm_common::storage::{Store, sha256_hex};
use scfm_worker::checkpoint::{self, TrainState, safetensors_to_vecs, tensors_to_safetensors};
use scfm_worker::optim::{AdamW, AdamWConfig};
use scfm_worker::params::FlatParams;
use tch::{Device, Tensor, nn};

const CASE: &str = "SCFM_CKPT_BENCH_CASE";

fn status_kb(field: &str) -> u64 {
    scfm_common::alloc::proc_status_kib(field).unwrap_or(0)
}

/// Runs `f`, returning its seconds and its peak RSS above the RSS before it, in MiB.
fn measure<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64, f64)> {
    std::fs::write("/proc/self/clear_refs", "5").context("reset VmHWM")?;
    let before = status_kb("VmRSS");
    let t = Instant::now();
    let out = f()?;
    let secs = t.elapsed().as_secs_f64();
    let peak = status_kb("VmHWM");
    Ok((out, secs, peak.saturating_sub(before) as f64 / 1024.0))
}

fn model(n: i64, seed: i64) -> (nn::VarStore, FlatParams, AdamW) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let block = 1 << 20;
    let mut left = n;
    let mut i = 0;
    while left > 0 {
        let k = left.min(block);
        let _ = vs.root().var(
            &format!("t{i:04}"),
            &[k],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
        left -= k;
        i += 1;
    }
    let p = FlatParams::new(&vs);
    let opt = AdamW::new(
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        &p,
    );
    tch::no_grad(|| {
        opt.exp_avg.shallow_clone().copy_(&p.flat);
        opt.exp_avg_sq.shallow_clone().copy_(&p.flat.abs());
    });
    (vs, p, opt)
}

fn state() -> TrainState {
    TrainState {
        step: 100,
        epoch: 0,
        position: 0,
        seed: 0,
        config_digest: "bench".into(),
        best_val: None,
        evals_since_best: 0,
        val_loss: None,
        model: serde_json::json!({}),
        n_genes: 20_000,
        settings: serde_json::json!({}),
    }
}

/// The save of earlier releases: both parts encoded whole, each put whole and read back.
async fn legacy_save(store: &Store, p: &FlatParams, opt: &AdamW, st: &TrainState) -> Result<()> {
    let views = |flat: &Tensor, prefix: &str| -> Vec<(String, Tensor)> {
        p.slots
            .iter()
            .map(|s| {
                let v = flat.narrow(0, s.offset, s.numel).view(s.shape.as_slice());
                (format!("{prefix}{}", s.name), v)
            })
            .collect()
    };
    let model = tensors_to_safetensors(&views(&p.flat, ""), None)?;
    let mut o = views(&opt.exp_avg, "exp_avg.");
    o.extend(views(&opt.exp_avg_sq, "exp_avg_sq."));
    let meta = HashMap::from([("step".to_string(), opt.step.to_string())]);
    let optim = tensors_to_safetensors(&o, Some(meta))?;
    let dir = checkpoint::dir_for(st.step);
    let mut files = HashMap::new();
    for (name, bytes) in [
        ("model.safetensors", model),
        ("optimizer.safetensors", optim),
    ] {
        let key = format!("{dir}/{name}");
        let bytes = Bytes::from(bytes);
        let sha = sha256_hex(&bytes);
        store.put(&key, bytes).await?;
        anyhow::ensure!(sha256_hex(&store.get(&key).await?) == sha, "read-back");
        files.insert(name.to_string(), sha);
    }
    let sb = serde_json::to_vec_pretty(&StateFile {
        state: serde_json::to_value(st)?,
        files,
        sizes: HashMap::new(),
    })?;
    let latest = Latest {
        step: st.step,
        dir: dir.clone(),
        state_sha256: sha256_hex(&sb),
    };
    store.put(&format!("{dir}/state.json"), sb.into()).await?;
    store
        .put(LATEST, serde_json::to_vec(&latest)?.into())
        .await?;
    Ok(())
}

/// Every part downloaded whole and hashed (what the coordinator's choice and each
/// worker's load did in earlier releases).
async fn legacy_download(store: &Store) -> Result<HashMap<String, Bytes>> {
    let latest: Latest = serde_json::from_slice(&store.get(LATEST).await?)?;
    let sf: StateFile =
        serde_json::from_slice(&store.get(&format!("{}/state.json", latest.dir)).await?)?;
    let mut parts = HashMap::new();
    for (name, sha) in &sf.files {
        let b = store.get(&format!("{}/{name}", latest.dir)).await?;
        anyhow::ensure!(&sha256_hex(&b) == sha, "{name} corrupt");
        parts.insert(name.clone(), b);
    }
    Ok(parts)
}

/// The load of earlier releases: download, decode to vectors, copy into the tensors.
async fn legacy_load(store: &Store, p: &FlatParams, opt: &AdamW) -> Result<()> {
    let parts = legacy_download(store).await?;
    let model = safetensors_to_vecs(&parts["model.safetensors"], "model")?;
    let optim = safetensors_to_vecs(&parts["optimizer.safetensors"], "optimizer")?;
    let n = p.numel() as usize;
    let (mut a, mut m, mut v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    for s in &p.slots {
        let r = s.offset as usize..(s.offset + s.numel) as usize;
        a[r.clone()].copy_from_slice(&model[&s.name].1);
        m[r.clone()].copy_from_slice(&optim[&format!("exp_avg.{}", s.name)].1);
        v[r].copy_from_slice(&optim[&format!("exp_avg_sq.{}", s.name)].1);
    }
    p.load_vec(&a);
    tch::no_grad(|| {
        opt.exp_avg.shallow_clone().copy_(&Tensor::from_slice(&m));
        opt.exp_avg_sq
            .shallow_clone()
            .copy_(&Tensor::from_slice(&v));
    });
    Ok(())
}

fn run_case(case: &str, phase: &str, url: &str, n: i64) -> Result<()> {
    // The allocator settings of the worker binary, whose memory this stands for.
    scfm_common::alloc::tune();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = match case {
        "streamed-1" => Store::open(url)?.with_parts_in_flight(1),
        _ => Store::open(url)?,
    };
    let (_vs, p, mut opt) = model(n, if phase == "save" { 1 } else { 2 });
    let st = state();
    let legacy = case == "legacy";
    let ((), secs, extra) = measure(|| {
        rt.block_on(async {
            match (phase, legacy) {
                ("save", true) => legacy_save(&store, &p, &opt, &st).await,
                ("save", false) => checkpoint::save(&store, &p, &opt, &st)
                    .await
                    .map(|_| ())
                    .map_err(Into::into),
                ("choose", true) => legacy_download(&store).await.map(|_| ()),
                ("choose", false) => select_verified(&store)
                    .await
                    .map(|_| ())
                    .map_err(Into::into),
                (_, true) => legacy_load(&store, &p, &opt).await,
                (_, false) => {
                    let dir = checkpoint::dir_for(st.step);
                    let v = verify_dir(&store, &dir, None).await?;
                    checkpoint::load_into(&store, &v, &p, &mut opt).await?;
                    Ok(())
                }
            }
        })
    })?;
    if phase == "load" {
        let (_vs1, p1, opt1) = model(n, 1);
        anyhow::ensure!(p.flat.equal(&p1.flat), "loaded parameters differ");
        anyhow::ensure!(
            opt.exp_avg_sq.equal(&opt1.exp_avg_sq),
            "loaded moments differ"
        );
    }
    println!(
        "{}",
        serde_json::json!({"s": secs, "extra_mib": extra, "bytes": walk_size(url)})
    );
    Ok(())
}

/// Bytes of the checkpoint's parts (local stores only; 0 otherwise).
fn walk_size(url: &str) -> u64 {
    let dir = Path::new(url).join(checkpoint::dir_for(100));
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

struct S3 {
    child: std::process::Child,
    port: u16,
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_s3(dir: &Path) -> Result<S3> {
    let bin = std::env::var_os("SCFM_S3S_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/s3s/bin/s3s-fs"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    std::fs::create_dir_all(dir.join("bench"))?;
    let child = Command::new(&bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "bench", "--secret-key", "benchsecret"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "s3s-fs did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(S3 { child, port })
}

fn main() -> Result<()> {
    let n: i64 = match std::env::var("SCFM_CKPT_BENCH_PARAMS") {
        Ok(v) => v.parse()?,
        Err(_) => ModelConfig::preset("large")?.param_count(20_000) as i64,
    };
    if let Ok(case) = std::env::var(CASE) {
        let phase = std::env::var("SCFM_CKPT_BENCH_PHASE")?;
        return run_case(&case, &phase, &std::env::var("SCFM_CKPT_BENCH_URL")?, n);
    }
    let only = std::env::var("SCFM_CKPT_BENCH_ONLY").ok();
    let tmp = tempfile::tempdir()?;
    let s3 = start_s3(&tmp.path().join("s3"))?;
    let s3_env = [
        ("AWS_ACCESS_KEY_ID", "bench".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "benchsecret".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", s3.port)),
        ("AWS_ALLOW_HTTP", "true".to_string()),
    ];
    println!(
        "{n} parameters ({:.2} GB of tensors: parameters + 2 moments)",
        12.0 * n as f64 / 1e9
    );
    println!(
        "| path | store | save s | save extra MiB | choose s | choose extra MiB | load s | load extra MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for store in ["local", "s3"] {
        if only.as_deref().is_some_and(|o| o != store) {
            continue;
        }
        for case in ["legacy", "streamed", "streamed-1"] {
            let url = match store {
                "local" => tmp
                    .path()
                    .join(format!("local-{case}"))
                    .display()
                    .to_string(),
                _ => format!("s3://bench/{case}"),
            };
            let mut row = format!("| {case} | {store} |");
            for phase in ["save", "choose", "load"] {
                let out = Command::new(std::env::current_exe()?)
                    .env(CASE, case)
                    .env("SCFM_CKPT_BENCH_PHASE", phase)
                    .env("SCFM_CKPT_BENCH_URL", &url)
                    .env("SCFM_CKPT_BENCH_PARAMS", n.to_string())
                    .envs(s3_env.iter().cloned())
                    .stderr(Stdio::inherit())
                    .output()?;
                anyhow::ensure!(out.status.success(), "{case} {phase} on {store} failed");
                let line = String::from_utf8_lossy(&out.stdout);
                let j: serde_json::Value = serde_json::from_str(line.trim())
                    .with_context(|| format!("child output: {line}"))?;
                let f = |k: &str| j[k].as_f64().unwrap_or(f64::NAN);
                row += &format!(" {:.2} | {:.0} |", f("s"), f("extra_mib"));
            }
            println!("{row}");
            // Free the disk for the next case.
            if store == "local" {
                let _ = std::fs::remove_dir_all(&url);
            } else {
                let _ = std::fs::remove_dir_all(tmp.path().join("s3/bench").join(case));
            }
        }
    }
    Ok(())
}
