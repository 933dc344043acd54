//! Distributed embedding of a prepared dataset (`scfm local embed.yaml --workers 2`, i.e.
//! `scfm-worker embed-shards` per worker) on real cells: the parts listed in index.json,
//! concatenated, equal the one-process `scfm-worker embed` bit for bit with the same cell
//! names in the same order; a deleted and a corrupted part are redone alone on a rerun
//! (the others are kept, untouched) with the same result; a worker stopped by SIGTERM
//! exits 0 after a part and a rerun completes the same index.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use scfm_tests::{
    bin, dataset, lines, repo_root, run_with_timeout, sigterm, train_tiny_model, wait_exit,
};

const LIMIT: Duration = Duration::from_secs(600);

fn ok(o: &std::process::Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{what} failed:\n{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The demo data prepared into shards of 1000 cells (10 shards).
fn prepare(dir: &Path) -> PathBuf {
    let out = dir.join("prepared");
    let o = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("prepare")
            .arg(dataset("mouse10k.h5ad"))
            .args(["--out", s(&out), "--shard-cells", "1000", "--settings"])
            .arg(repo_root().join("configs/prepare-demo.yaml")),
        LIMIT,
    );
    ok(&o, "scfm prepare");
    out
}

/// `scfm local` on an embed manifest writing to `out`.
fn embed_local(dir: &Path, data: &Path, run: &Path, out: &Path) -> String {
    let m = dir.join("embed.yaml");
    std::fs::write(
        &m,
        format!(
            "run_id: embed-test\ndata: {{path: {}}}\nembed:\n  model: {}\n  out: {}\n  batch_size: 50\n  threads: 1\n  timeout_s: 500\ncluster: {{device: cpu, preempt_grace_s: 30}}\n",
            data.display(),
            run.display(),
            out.display()
        ),
    )
    .unwrap();
    let o = run_with_timeout(
        Command::new(bin("scfm")).args(["local", s(&m), "--workers", "2"]),
        LIMIT,
    );
    ok(&o, "scfm local (embed job)")
}

fn index(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("index.json")).expect("index.json")).unwrap()
}

/// Modification times of the parts.
fn mtimes(out: &Path) -> BTreeMap<String, SystemTime> {
    std::fs::read_dir(out.join("parts"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            (name, e.metadata().unwrap().modified().unwrap())
        })
        .collect()
}

fn python() -> String {
    std::env::var("SCFM_PYTHON")
        .unwrap_or_else(|_| repo_root().join(".venv/bin/python").display().to_string())
}

/// Checks in anndata that the parts of `out`'s index, concatenated, equal `one`.
fn assert_parts_equal(out: &Path, one: &Path) {
    let check = format!(
        r#"
import anndata as ad, numpy as np, json, os
out = {out:?}
idx = json.load(open(os.path.join(out, "index.json")))
one = ad.read_h5ad({one:?})
parts = [ad.read_h5ad(os.path.join(out, p["path"])) for p in idx["parts"]]
assert [p.n_obs for p in parts] == [p["n_cells"] for p in idx["parts"]]
e = np.concatenate([p.obsm["X_scfm"] for p in parts])
names = [n for p in parts for n in p.obs_names]
assert e.shape == one.obsm["X_scfm"].shape == (idx["n_cells"], idx["dim"]), (e.shape, one.obsm["X_scfm"].shape)
assert names == list(one.obs_names), "cell names or their order differ"
assert all(list(p.var_names) == list(one.var_names) for p in parts)
d = np.abs(e - one.obsm["X_scfm"]).max()
assert np.array_equal(e, one.obsm["X_scfm"]), f"embeddings differ (max |diff| {{d}})"
assert int(parts[0].uns["scfm"]["shard"]) == 0 and parts[0].uns["scfm"]["model_sha256"] == idx["model_sha256"]
print("ok", e.shape)
"#,
        out = s(out),
        one = s(one),
    );
    let o = run_with_timeout(Command::new(python()).arg("-c").arg(&check), LIMIT);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ok"),
        "anndata check failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn distributed_embed_equals_one_process_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepare(dir.path());
    let ds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("dataset.json")).unwrap()).unwrap();
    let n_shards = ds["shards"].as_array().unwrap().len();
    assert!(n_shards >= 3, "{n_shards} shards");
    let run = train_tiny_model(dir.path(), &data, 3);

    // One process.
    let one = dir.path().join("one.h5ad");
    let o = run_with_timeout(
        Command::new(bin("scfm-worker"))
            .args(["embed", s(&run), s(&data), "--out", s(&one)])
            .args(["--device", "cpu", "--threads", "1", "--batch-size", "50"]),
        LIMIT,
    );
    ok(&o, "one-process embed");

    // (i) Two workers: every shard once in the index, the same embedding.
    let out = dir.path().join("emb");
    let err = embed_local(dir.path(), &data, &run, &out);
    assert!(err.contains("[w0]") && err.contains("[w1]"), "{err}");
    let idx = index(&out);
    let shards: Vec<u64> = idx["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["shard"].as_u64().unwrap())
        .collect();
    assert_eq!(shards, (0..n_shards as u64).collect::<Vec<_>>());
    assert_eq!(idx["n_cells"], ds["n_cells"]);
    assert_eq!(idx["format"], "scfm-embedding-index");
    assert_parts_equal(&out, &one);
    let index_bytes = std::fs::read(out.join("index.json")).unwrap();

    // (ii) Resume: a deleted part and a corrupted one are redone, nothing else.
    let before = mtimes(&out);
    let part1 = std::fs::read(out.join("parts/part-000001.h5ad")).unwrap();
    std::fs::remove_file(out.join("parts/part-000001.h5ad")).unwrap();
    let p2 = out.join("parts/part-000002.h5ad");
    let mut bad = std::fs::read(&p2).unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&p2, &bad).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let err = embed_local(dir.path(), &data, &run, &out);
    assert_eq!(
        err.matches("skipping verified part").count(),
        n_shards - 2,
        "{err}"
    );
    assert_eq!(err.matches("wrote part").count(), 2, "{err}");
    let after = mtimes(&out);
    for (name, t) in &before {
        let redone = name.starts_with("part-000001.") || name.starts_with("part-000002.");
        assert_eq!(redone, after[name] != *t, "{name}: redone {redone}");
    }
    assert_eq!(
        std::fs::read(out.join("parts/part-000001.h5ad")).unwrap(),
        part1
    );
    assert_eq!(std::fs::read(out.join("index.json")).unwrap(), index_bytes);
    assert_parts_equal(&out, &one);

    // (iii) SIGTERM: the worker finishes its current part, exits 0, writes no index; a
    // rerun (as a 2-worker job) completes the same index.
    let out2 = dir.path().join("emb2");
    let mut w = Command::new(bin("scfm-worker"))
        .args(["embed-shards", s(&run), s(&data), "--out", s(&out2)])
        .args([
            "--rank",
            "0",
            "--world",
            "1",
            "--device",
            "cpu",
            "--threads",
            "1",
        ])
        .args(["--batch-size", "50"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (rx, _t) = lines(w.stderr.take().unwrap());
    let mut log = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(300))
            .unwrap_or_else(|_| panic!("no part written:\n{}", log.join("\n")));
        let wrote = line.contains("wrote part");
        log.push(line);
        if wrote {
            break;
        }
    }
    sigterm(&w);
    let status = wait_exit(&mut w, Duration::from_secs(120), "preempted embed-shards");
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        log.push(l);
    }
    let log = log.join("\n");
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("preempted"), "{log}");
    let done = log.matches("wrote part").count();
    eprintln!("SIGTERM after the first part: {done} of {n_shards} parts written");
    assert!((1..n_shards).contains(&done), "{done} parts:\n{log}");
    assert_eq!(
        std::fs::read_dir(out2.join("parts")).unwrap().count(),
        2 * done,
        "a part without its record or a partial file was left"
    );
    assert!(!out2.join("index.json").exists());
    let err = embed_local(dir.path(), &data, &run, &out2);
    assert_eq!(err.matches("skipping verified part").count(), done, "{err}");
    assert_eq!(std::fs::read(out2.join("index.json")).unwrap(), index_bytes);
}

#[test]
fn embed_manifest_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("embed.yaml");
    std::fs::write(
        &m,
        "run_id: e\ndata: {path: nowhere}\nembed: {model: x}\ntraining: {max_steps: 1}\n",
    )
    .unwrap();
    let o = run_with_timeout(
        Command::new(bin("scfm")).args(["local", s(&m), "--workers", "2"]),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("`training`") && err.contains("embed job"),
        "{err}"
    );
    std::fs::write(&m, "run_id: e\ndata: {path: nowhere}\nembed: {model: x}\n").unwrap();
    let o = run_with_timeout(
        Command::new(bin("scfm")).args(["validate", s(&m)]),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("data.path") && err.contains("not a prepared dataset"),
        "{err}"
    );
    let o = run_with_timeout(
        Command::new(bin("scfm")).args(["launch", s(&m)]),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is an embed job"),
        "{err}"
    );
}
