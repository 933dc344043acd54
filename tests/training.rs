//! Single-process training on real data (10,000 mouse cells, raw 10x counts from
//! scanpy's sources): the loss falls, and stop + resume is bitwise identical to not
//! stopping.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use scfm_tests::{
    bin, dataset, json_lines, lines, metric_steps, run_on_small_disk, run_with_timeout, sigterm,
    wait_exit,
};

fn write_config(dir: &Path, ckpt: &Path, model: &str, training: &str) -> std::path::PathBuf {
    let cfg = format!(
        "data:\n  path: {}\n  validation_fraction: 0.05\nmodel:\n{model}\ntraining:\n{training}\ncheckpoint:\n  url: {}\n  every_steps: 1000\n  keep_last: 2\n",
        dataset("mouse10k.h5ad").display(),
        ckpt.display()
    );
    let p = dir.join("train.yaml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn train(config: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = run_with_timeout(
        Command::new(bin("scfm-worker"))
            .args(["train", "--json", "--config"])
            .arg(config)
            .args(extra),
        Duration::from_secs(600),
    );
    assert!(
        out.status.success(),
        "training failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&out)
}

fn steps(lines: &[serde_json::Value]) -> Vec<(u64, f64, String)> {
    lines
        .iter()
        .filter(|l| l["event"] == "step")
        .map(|l| {
            (
                l["step"].as_u64().unwrap(),
                l["mgem"].as_f64().unwrap(),
                l["loss"].to_string(),
            )
        })
        .collect()
}

// Binned expression: the MGEM loss starts at uniform guessing over the bins (see below).
const SMALL: &str = "  preset: minimal\n  hidden: 64\n  n_layers: 2\n  n_heads: 4\n  ffn_dim: 128\n  max_seq_len: 128\n  expression: binned";

#[test]
fn mgem_loss_falls_well_below_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &dir.path().join("ckpt"),
        SMALL,
        "  seed: 1\n  batch_size: 32\n  max_steps: 300\n  lr: 0.002\n  warmup_steps: 30\n  eval_every: 100\n  log_every: 50\n  threads: 2",
    );
    let lines = train(&cfg, &[]);
    let s = steps(&lines);
    assert_eq!(s.len(), 300);
    let mean = |xs: &[(u64, f64, String)]| xs.iter().map(|x| x.1).sum::<f64>() / xs.len() as f64;
    let start = mean(&s[..10]);
    let end = mean(&s[s.len() - 20..]);
    eprintln!("MGEM loss: first 10 steps {start:.4}, last 20 steps {end:.4}");
    // Uniform guessing over the 50 expressed bins is ln(50) = 3.91.
    assert!(start > 3.7, "start {start}");
    assert!(
        end < start - 0.5,
        "MGEM loss did not fall enough: {start:.4} -> {end:.4}"
    );
    let evals: Vec<f64> = lines
        .iter()
        .filter(|l| l["event"] == "eval")
        .map(|l| l["val_mgem"].as_f64().unwrap())
        .collect();
    assert!(
        evals.len() >= 3 && evals.last().unwrap() < &(start - 0.5),
        "validation MGEM {evals:?}"
    );
    assert!(dir.path().join("ckpt/latest.json").exists());
}

#[test]
fn stop_and_resume_is_bitwise_identical() {
    let training = "  seed: 7\n  batch_size: 16\n  max_steps: 12\n  warmup_steps: 3\n  eval_every: 4\n  threads: 2\n  augment:\n    gene_dropout: 0.2\n    noise_std: 0.1\n    cellmix_prob: 0.3";
    let model = "  preset: minimal\n  hidden: 32\n  n_layers: 2\n  ffn_dim: 64\n  max_seq_len: 64\n  dropout: 0.1";
    let a_dir = tempfile::tempdir().unwrap();
    let a = steps(&train(
        &write_config(a_dir.path(), &a_dir.path().join("ckpt"), model, training),
        &[],
    ));
    let b_dir = tempfile::tempdir().unwrap();
    let b_cfg = write_config(b_dir.path(), &b_dir.path().join("ckpt"), model, training);
    let b1 = steps(&train(&b_cfg, &["--stop-after", "5"]));
    assert_eq!(b1.len(), 5);
    let b2 = steps(&train(&b_cfg, &["--resume"]));
    assert_eq!(b2.first().map(|x| x.0), Some(6));
    let b: Vec<_> = b1.into_iter().chain(b2).collect();
    assert_eq!(a.len(), 12);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.0, &x.2), (y.0, &y.2), "loss differs at step {}", x.0);
    }
    let ma = std::fs::read(a_dir.path().join("ckpt/ckpt-000000012/model.safetensors")).unwrap();
    let mb = std::fs::read(b_dir.path().join("ckpt/ckpt-000000012/model.safetensors")).unwrap();
    assert!(ma == mb, "final parameters differ after resume");
    let oa = std::fs::read(
        a_dir
            .path()
            .join("ckpt/ckpt-000000012/optimizer.safetensors"),
    )
    .unwrap();
    let ob = std::fs::read(
        b_dir
            .path()
            .join("ckpt/ckpt-000000012/optimizer.safetensors"),
    )
    .unwrap();
    assert!(oa == ob, "final optimizer state differs after resume");
    // The resumed process appends to the metrics log: every step once, as uninterrupted.
    let logged = |d: &std::path::Path| -> Vec<(u64, String)> {
        metric_steps(&d.join("ckpt"))
            .iter()
            .filter(|l| l["event"] == "step")
            .map(|l| (l["step"].as_u64().unwrap(), l["loss"].to_string()))
            .collect()
    };
    let lb = logged(b_dir.path());
    assert_eq!(
        lb.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert_eq!(logged(a_dir.path()), lb, "the logged losses differ");
}

/// `scfm-worker train --resume --config CFG`, which must fail: its stderr.
fn resume_error(cfg: &Path) -> String {
    let out = run_with_timeout(
        Command::new(bin("scfm-worker"))
            .args(["train", "--resume", "--config"])
            .arg(cfg),
        Duration::from_secs(120),
    );
    assert!(
        !out.status.success(),
        "the resume of {} succeeded",
        cfg.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn resume_refuses_changed_model_and_missing_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let training = "  batch_size: 8\n  max_steps: 2\n  threads: 1";
    let model = "  preset: minimal\n  hidden: 32\n  ffn_dim: 64";
    let cfg = write_config(dir.path(), &ckpt, model, training);
    let err = resume_error(&cfg);
    assert!(
        err.contains("--resume given but there is no checkpoint"),
        "{err}"
    );
    train(&cfg, &[]);
    // Only a read-out setting differs: the run resumes, and its next checkpoint carries the
    // manifest's read-out (the settings a resume compares leave it out).
    let read_out = write_config(
        dir.path(),
        &ckpt,
        &format!("{model}\n  metric_weight: 0.25"),
        "  batch_size: 8\n  max_steps: 3\n  threads: 1",
    );
    assert_eq!(
        steps(&train(&read_out, &["--resume"])).first().map(|x| x.0),
        Some(3)
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("ckpt-000000003/state.json")).unwrap())
            .unwrap();
    let state = &state["state"];
    assert_eq!(state["model"]["metric_weight"], 0.25, "{state}");
    assert!(
        state["settings"]["model"].get("metric_weight").is_none(),
        "{state}"
    );
    let cfg = write_config(
        dir.path(),
        &ckpt,
        &format!("{model}\n  n_layers: 1"),
        training,
    );
    let err = resume_error(&cfg);
    assert!(
        err.contains("other settings (model.n_layers: 2 -> 1)") && err.contains("--fresh"),
        "{err}"
    );
    // --fresh discards the old checkpoints and starts over with the new settings.
    let out = run_with_timeout(
        Command::new(bin("scfm-worker"))
            .args(["train", "--fresh", "--config"])
            .arg(&cfg),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_config_is_rejected_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &dir.path().join("ckpt"),
        "  n_heads: 3",
        "  batch_size: 8",
    );
    let out = run_with_timeout(
        Command::new(bin("scfm-worker"))
            .args(["train", "--config"])
            .arg(&cfg),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid config `model.n_heads`: 3 heads do not divide hidden size 128"),
        "{err}"
    );
    assert!(
        !dir.path().join("ckpt").exists(),
        "nothing may be written for a bad config"
    );
}

/// SIGTERM to a single-process run: checkpoint at the next step, exit 0; `--resume`
/// continues and ends bit-identical to an uninterrupted run.
#[test]
fn sigterm_checkpoints_and_resume_matches() {
    let training = "  seed: 2\n  batch_size: 8\n  max_steps: 300\n  eval_every: 1000\n  threads: 1";
    let model = "  preset: minimal\n  hidden: 32\n  n_layers: 1\n  ffn_dim: 64\n  max_seq_len: 64";
    let a = tempfile::tempdir().unwrap();
    train(
        &write_config(a.path(), &a.path().join("ckpt"), model, training),
        &[],
    );
    let b = tempfile::tempdir().unwrap();
    let cfg = write_config(b.path(), &b.path().join("ckpt"), model, training);
    let mut child = Command::new(bin("scfm-worker"))
        .args(["train", "--json", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (rx, reader) = lines(child.stdout.take().unwrap());
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("no step output");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["event"] == "step" && v["step"].as_u64().is_some_and(|s| s >= 10) {
            break;
        }
    }
    sigterm(&child);
    let status = wait_exit(
        &mut child,
        Duration::from_secs(60),
        "training after SIGTERM",
    );
    reader.join().unwrap();
    assert!(status.success(), "SIGTERM must end in exit 0");
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.path().join("ckpt/latest.json")).unwrap()).unwrap();
    let stopped = latest["step"].as_u64().unwrap();
    assert!((10..300).contains(&stopped), "checkpoint at step {stopped}");
    train(&cfg, &["--resume"]);
    let fa = std::fs::read(a.path().join("ckpt/ckpt-000000300/model.safetensors")).unwrap();
    let fb = std::fs::read(b.path().join("ckpt/ckpt-000000300/model.safetensors")).unwrap();
    assert!(fa == fb, "resumed run ended with other parameters");
}

/// The bytes of the files under `dir` (recursively).
fn du(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => du(&e.path()),
                    _ => e.metadata().map_or(0, |m| m.len()),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A disk that fills up while checkpointing loses nothing: the checkpoint that did not fit
/// is removed again, `latest.json` still names the last good one, the run ends with an
/// error naming the checkpoint and the cause, and training resumes from what survived.
/// The disk is a real tmpfs of a checkpoint and a half, mounted in a private mount
/// namespace (`unshare`); where namespaces or mounts are not allowed the test says so and
/// skips.
#[test]
fn full_disk_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let training = "  seed: 3\n  batch_size: 8\n  max_steps: 6\n  eval_every: 1000\n  threads: 1";
    // The size of one checkpoint of this model, on an ordinary disk.
    let probe = dir.path().join("probe");
    let cfg = write_config(
        dir.path(),
        &probe,
        SMALL,
        "  batch_size: 8\n  max_steps: 1\n  threads: 1",
    );
    train(&cfg, &[]);
    let one = du(&probe.join("ckpt-000000001"));
    assert!(one > 1 << 20, "a checkpoint of {one} bytes");

    let (disk, saved) = (dir.path().join("disk"), dir.path().join("saved"));
    let cfg = write_config(dir.path(), &disk, SMALL, training);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("every_steps: 1000", "every_steps: 2")).unwrap();
    let cmd = format!(
        "{} train --json --config {}",
        bin("scfm-worker").display(),
        cfg.display()
    );
    let timeout = Duration::from_secs(300);
    let Some(out) = run_on_small_disk(&disk, one * 3 / 2 / 1024, &cmd, &saved, timeout) else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    // The run fails, saying which checkpoint did not fit and why.
    assert!(!out.status.success(), "training on a full disk succeeded");
    assert!(
        err.contains("No space left on device") && err.contains("ckpt-00000000"),
        "{err}"
    );
    // Steps went on after the failed checkpoint at step 4 (it is not fatal by itself).
    let steps: Vec<u64> = json_lines(&out)
        .iter()
        .filter(|l| l["event"] == "step")
        .filter_map(|l| l["step"].as_u64())
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
    // What survived: the checkpoint of step 2, named by latest.json, and nothing of the
    // checkpoints that did not fit.
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(saved.join("latest.json")).unwrap()).unwrap();
    assert_eq!(latest["step"], 2, "{latest}");
    for step in [4, 6] {
        let d = saved.join(format!("ckpt-{step:09}"));
        assert_eq!(du(&d), 0, "{} holds a partial checkpoint", d.display());
    }
    // It resumes from step 2 on an ordinary disk.
    let cfg = write_config(dir.path(), &saved, SMALL, training);
    let resumed = train(&cfg, &["--resume"]);
    let first = resumed.iter().find(|l| l["event"] == "step").unwrap();
    assert_eq!(first["step"], 3, "{first}");
}
