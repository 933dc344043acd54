//! Checkpoints in object storage, against a real S3-compatible server (s3s-fs, started
//! here) and the local-disk store: save/resume round trips, falling back to the previous
//! checkpoint when one fails verification, and a store that dies mid-upload.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use scfm_tests::{
    S3Server, bin, dataset, json_lines, lines, prepared_dataset, repo_root, run_on_small_disk,
    run_with_timeout, wait_exit, wait_log,
};

const TINY: &str = "  preset: minimal\n  hidden: 32\n  n_layers: 1\n  n_heads: 2\n  ffn_dim: 64\n  max_seq_len: 64";

fn config(dir: &Path, name: &str, url: &str, every: u64, max_steps: u64) -> PathBuf {
    let cfg = format!(
        "data:\n  path: {}\nmodel:\n{TINY}\ntraining:\n  batch_size: 16\n  max_steps: {max_steps}\n  warmup_steps: 2\n  eval_every: 1000\n  log_every: 1000\n  threads: 1\ncheckpoint:\n  url: {url}\n  every_steps: {every}\n  keep_last: 10\n",
        prepared_dataset(dir).display()
    );
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, cfg).unwrap();
    p
}

fn train(cfg: &Path, extra: &[&str], env: &[(String, String)]) -> Output {
    run_with_timeout(
        Command::new(bin("scfm-worker"))
            .args(["train", "--json", "--config"])
            .arg(cfg)
            .args(extra)
            .envs(env.iter().cloned()),
        Duration::from_secs(300),
    )
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "training failed:\n{err}");
    err
}

/// Losses per step and the final parameter fingerprint.
fn outcome(o: &Output) -> (Vec<(u64, String)>, String) {
    let lines = json_lines(o);
    let steps = lines
        .iter()
        .filter(|l| l["event"] == "step")
        .map(|l| (l["step"].as_u64().unwrap(), l["loss"].to_string()))
        .collect();
    let fp = lines
        .iter()
        .find(|l| l["event"] == "done")
        .map(|l| l["summary"]["fingerprint"].as_str().unwrap().to_string())
        .expect("done line");
    (steps, fp)
}

/// The same run on S3, stopped and resumed, ends bit-identical to an uninterrupted run
/// on local disk.
#[test]
fn s3_checkpoints_resume_bitwise_like_local_disk() {
    let d = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&d.path().join("s3"), "scfm");
    let local = config(
        d.path(),
        "local",
        d.path().join("local").to_str().unwrap(),
        3,
        8,
    );
    let (full, fp) = outcome(&train(&local, &[], &[]));
    assert_eq!(full.len(), 8);
    let remote = config(d.path(), "remote", "s3://scfm/runs/a", 3, 8);
    ok(&train(&remote, &["--stop-after", "4"], &s3.env()));
    assert!(d.path().join("s3/scfm/runs/a/latest.json").is_file());
    let o = train(&remote, &["--resume"], &s3.env());
    let err = ok(&o);
    assert!(
        err.contains("resumed from s3://scfm/runs/a/ckpt-000000004"),
        "{err}"
    );
    let (tail, fp2) = outcome(&o);
    assert_eq!(tail, full[4..].to_vec());
    assert_eq!(fp2, fp);
}

fn corrupt_latest_falls_back(url: &str, part_path: &Path, env: &[(String, String)], d: &Path) {
    corrupt_latest_falls_back_with(url, part_path, env, d, false);
}

/// Two runs leave checkpoints at steps 4 and 6; the model part of step 6 is damaged
/// (truncated, or with `same_size` its second half's bytes changed, which only the hash
/// read while loading can tell), and `--resume` continues from step 4 to the same end.
fn corrupt_latest_falls_back_with(
    url: &str,
    part_path: &Path,
    env: &[(String, String)],
    d: &Path,
    same_size: bool,
) {
    let cfg = config(d, "run", url, 2, 8);
    let reference = config(d, "ref", d.join("ref").to_str().unwrap(), 100, 8);
    let (_, fp) = outcome(&train(&reference, &[], &[]));
    // Two runs, so that steps 4 and 6 are each a run's last checkpoint (one that waits
    // for its upload to land; a checkpoint handed over while another uploads may be
    // superseded by the next).
    ok(&train(&cfg, &["--stop-after", "4"], env));
    ok(&train(&cfg, &["--resume", "--stop-after", "2"], env));
    // Damage the model of the newest checkpoint (step 6).
    let mut bytes = std::fs::read(part_path).unwrap();
    if same_size {
        let n = bytes.len();
        for b in &mut bytes[n / 2..] {
            *b ^= 0x5a;
        }
        std::fs::write(part_path, &bytes).unwrap();
    } else {
        std::fs::write(part_path, &bytes[..bytes.len() / 2]).unwrap();
    }
    let o = train(&cfg, &["--resume"], env);
    let err = ok(&o);
    assert!(err.contains("ckpt-000000004 at step 4"), "{err}");
    assert!(
        err.contains("failed verification") && err.contains("ckpt-000000006/model.safetensors"),
        "{err}"
    );
    assert_eq!(outcome(&o).1, fp, "resumed from step 4: same end");
}

#[test]
fn a_corrupt_checkpoint_is_skipped_for_the_previous_one_on_local_disk() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    let part = ck.join("ckpt-000000006/model.safetensors");
    corrupt_latest_falls_back(ck.to_str().unwrap(), &part, &[], d.path());
}

/// A part of the right size with other bytes passes the size check and fails only as it
/// loads (its hash is known at its end, after values were written): the previous
/// checkpoint is loaded over them and the run ends as an undamaged one.
#[test]
fn a_same_size_corrupt_part_falls_back_to_the_previous_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    let part = ck.join("ckpt-000000006/model.safetensors");
    corrupt_latest_falls_back_with(ck.to_str().unwrap(), &part, &[], d.path(), true);
}

#[test]
fn a_corrupt_checkpoint_is_skipped_for_the_previous_one_on_s3() {
    let d = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&d.path().join("s3"), "scfm");
    let part = d
        .path()
        .join("s3/scfm/run/ckpt-000000006/model.safetensors");
    corrupt_latest_falls_back("s3://scfm/run", &part, &s3.env(), d.path());
}

/// The S3 server is killed for good while checkpoints are uploading (one per step), with
/// a 2 s retry window: the run fails for want of its last checkpoint, naming it and the
/// one that stays current, `latest.json` names a complete checkpoint, and once the server
/// is back the run resumes from it.
#[test]
fn the_store_dying_mid_upload_leaves_latest_json_valid() {
    let d = tempfile::tempdir().unwrap();
    let mut s3 = S3Server::start(&d.path().join("s3"), "scfm");
    let cfg = config(d.path(), "run", "s3://scfm/run", 1, 200);
    let mut env = s3.env();
    env.extend(
        [
            ("SCFM_STORE_RETRY_TIMEOUT_S", "2"),
            ("SCFM_STORE_TIMEOUT_S", "5"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut child = Command::new(bin("scfm-worker"))
        .args(["train", "--json", "--config"])
        .arg(&cfg)
        .envs(env.iter().cloned())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (_out, _t1) = lines(child.stdout.take().unwrap());
    let (err, t2) = lines(child.stderr.take().unwrap());
    // Once a checkpoint landed (training runs ahead of the uploads: a checkpoint waiting
    // for the one under way is superseded by the next), while the run is far from its end.
    // Landed as the worker saw it: `latest.json` on the server's disk is not enough, since
    // a kill before the server answers leaves the worker unsure whether it was written.
    let root = d.path().join("s3/scfm/run");
    let mut seen = Vec::new();
    wait_log(
        &err,
        &mut seen,
        "checkpoint saved",
        Duration::from_secs(120),
    );
    s3.kill();
    let status = wait_exit(
        &mut child,
        Duration::from_secs(180),
        "training after the store died",
    );
    let _ = t2.join();
    let stderr: Vec<String> = seen.into_iter().chain(err.try_iter()).collect();
    assert!(
        !status.success(),
        "the run cannot finish without its last checkpoint"
    );
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("latest.json")).unwrap()).unwrap();
    let dir = latest["dir"].as_str().unwrap().to_string();
    let step = latest["step"].as_u64().unwrap();
    assert!(step >= 1, "{latest}");
    let failure = "checkpoint s3://scfm/run/ckpt-000000200: not stored within 2 s";
    // What latest.json names is what the worker says stays current, or the one whose
    // latest.json write the dying server did not answer.
    let stays = format!("s3://scfm/run/{dir} stays current");
    let unsure = format!("latest.json naming s3://scfm/run/{dir}, which got no answer");
    assert!(
        stderr
            .iter()
            .any(|l| l.contains(failure) && (l.contains(&stays) || l.contains(&unsure))),
        "no `{failure} … {stays}`: {stderr:#?}"
    );
    let _s3 = S3Server::start_on(&d.path().join("s3"), "scfm", s3.port);
    let o = train(&cfg, &["--resume"], &env);
    let e = ok(&o);
    assert!(
        e.contains(&format!("resumed from s3://scfm/run/{dir}")),
        "{e}"
    );
    assert_eq!(outcome(&o).0.last().unwrap().0, 200);
}

/// The S3 server is down for 20 s in the middle of a run's checkpoint uploads (killed, then
/// restarted on the same port and folder), with the default retry window (60 s):
/// training goes on meanwhile, the uploads are retried until the server is back, the
/// run's last checkpoint lands and verifies, and the run resumes from it to the same end
/// as an uninterrupted run.
#[test]
fn a_20_s_store_outage_loses_no_checkpoint() {
    const OUTAGE: Duration = Duration::from_secs(20);
    let d = tempfile::tempdir().unwrap();
    let reference = config(
        d.path(),
        "ref",
        d.path().join("ref").to_str().unwrap(),
        100,
        24,
    );
    let (_, fp) = outcome(&train(&reference, &[], &[]));
    let mut s3 = S3Server::start(&d.path().join("s3"), "scfm");
    let cfg = config(d.path(), "run", "s3://scfm/run", 1, 24);
    let env = s3.env();
    let mut child = Command::new(bin("scfm-worker"))
        .args(["train", "--json", "--stop-after", "16", "--config"])
        .arg(&cfg)
        .envs(env.iter().cloned())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, _t1) = lines(child.stdout.take().unwrap());
    let (err, t2) = lines(child.stderr.take().unwrap());
    let step_of = |l: &str| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
        (v["event"] == "step").then(|| v["step"].as_u64()).flatten()
    };
    loop {
        let l = out
            .recv_timeout(Duration::from_secs(120))
            .expect("training printed no step 4");
        if step_of(&l) >= Some(4) {
            break;
        }
    }
    // Step 4's checkpoint is being handed over now (printed before it is saved).
    s3.kill();
    let down = std::time::Instant::now();
    // Training goes on while the store is down: the last step comes before it is back.
    let mut last = 4;
    while last < 16 {
        let left = OUTAGE.saturating_sub(down.elapsed());
        let Ok(l) = out.recv_timeout(left) else {
            panic!("training stalled at step {last} while the store was down");
        };
        last = step_of(&l).unwrap_or(last);
    }
    std::thread::sleep(OUTAGE.saturating_sub(down.elapsed()));
    let _s3 = S3Server::start_on(&d.path().join("s3"), "scfm", s3.port);
    let status = wait_exit(
        &mut child,
        Duration::from_secs(120),
        "training after the store came back",
    );
    let _ = t2.join();
    let stderr: Vec<String> = err.try_iter().collect();
    assert!(status.success(), "{stderr:#?}");
    assert!(
        stderr.iter().any(|l| l.contains("failed; retrying")),
        "no retry was logged: {stderr:#?}"
    );
    assert!(
        !stderr
            .iter()
            .any(|l| l.contains("checkpoint upload failed")),
        "{stderr:#?}"
    );
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("s3/scfm/run/latest.json")).unwrap())
            .unwrap();
    assert_eq!(latest["dir"], "ckpt-000000016", "{latest}");
    let o = train(&cfg, &["--resume"], &env);
    let e = ok(&o);
    assert!(
        e.contains("resumed from s3://scfm/run/ckpt-000000016 at step 16"),
        "{e}"
    );
    let (tail, fp2) = outcome(&o);
    assert_eq!(tail.first().map(|s| s.0), Some(17));
    assert_eq!(fp2, fp, "the resumed run ends as the uninterrupted one");
}

/// `scfm prepare` into S3 (shards go through a temporary file) writes the same shards as
/// into a local directory (written in place), and training streams them from S3 through
/// the verified shard cache.
#[test]
fn prepare_into_s3_matches_local_and_trains_from_it() {
    let d = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&d.path().join("s3"), "scfm");
    let local = prepared_dataset(d.path());
    let out = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("prepare")
            .arg(scfm_tests::dataset("mouse10k.h5ad"))
            .args(["--out", "s3://scfm/prep", "--settings"])
            .arg(scfm_tests::repo_root().join("configs/prepare-demo.yaml"))
            .envs(s3.env()),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shards = |p: &Path| -> Vec<(String, u64)> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(p.join("dataset.json")).unwrap()).unwrap();
        v["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["sha256"].as_str().unwrap().to_string(),
                    s["bytes"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    // s3s-fs keeps a bucket as a folder.
    let remote = d.path().join("s3/scfm/prep");
    let want = shards(&local);
    assert!(!want.is_empty());
    assert_eq!(shards(&remote), want);
    let cfg = format!(
        "data:\n  path: s3://scfm/prep\n  cache_dir: {}\nmodel:\n{TINY}\ntraining:\n  batch_size: 16\n  max_steps: 3\n  eval_every: 1000\n  threads: 1\ncheckpoint:\n  url: {}\n",
        d.path().join("cache").display(),
        d.path().join("ckpt").display()
    );
    let p = d.path().join("s3data.yaml");
    std::fs::write(&p, cfg).unwrap();
    let (steps, _) = outcome(&train(&p, &[], &s3.env()));
    assert_eq!(steps.len(), 3);
    // The shards it read came through the cache, named by their checksum.
    let cached = want
        .iter()
        .filter(|(sha, _)| d.path().join(format!("cache/{sha}.h5ad")).is_file())
        .count();
    assert!(cached >= 1, "no shard in the cache under its sha256");

    // A shard cache on a full disk (a real 256 KiB tmpfs; a shard is ~600 KB): training
    // fails naming the shard and the cause, and leaves nothing partial in the cache.
    let (disk, saved) = (d.path().join("small-cache"), d.path().join("small-saved"));
    let cfg = format!(
        "data:\n  path: s3://scfm/prep\n  cache_dir: {}\nmodel:\n{TINY}\ntraining:\n  batch_size: 16\n  max_steps: 3\n  eval_every: 1000\n  threads: 1\ncheckpoint:\n  url: {}\n",
        disk.display(),
        d.path().join("ckpt-small").display()
    );
    let p = d.path().join("small-cache.yaml");
    std::fs::write(&p, cfg).unwrap();
    let env: String = s3
        .env()
        .iter()
        .map(|(k, v)| format!("{k}='{v}' "))
        .collect();
    let cmd = format!(
        "{env}{} train --json --config {}",
        bin("scfm-worker").display(),
        p.display()
    );
    if let Some(out) = run_on_small_disk(&disk, 256, &cmd, &saved, Duration::from_secs(300)) {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "training with a full cache succeeded"
        );
        assert!(
            err.contains("caching shard s3://scfm/prep/shards/shard-")
                && err.contains("No space left on device"),
            "{err}"
        );
        let left = files_under(&saved);
        assert!(left.is_empty(), "left in the cache: {left:?}");
    }
}

/// The files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .flat_map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&e.path()),
            _ => vec![e.path()],
        })
        .collect()
}

/// `scfm prepare` onto a disk that fills up (a real 1 MiB tmpfs; the dataset needs ~2.4
/// MB): it fails naming the shard it could not write and the cause, leaves no
/// `dataset.json` (nothing points at missing shards) and no temporary shard file.
#[test]
fn prepare_on_a_full_disk_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, saved) = (dir.path().join("disk"), dir.path().join("saved"));
    let cmd = format!(
        "{} prepare {} --out {}/ds --settings {}",
        bin("scfm").display(),
        dataset("mouse10k.h5ad").display(),
        disk.display(),
        repo_root().join("configs/prepare-demo.yaml").display()
    );
    let Some(out) = run_on_small_disk(&disk, 1024, &cmd, &saved, Duration::from_secs(300)) else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "prepare on a full disk succeeded");
    assert!(
        err.contains("shard-0000") && err.to_lowercase().contains("no space left"),
        "{err}"
    );
    let left = files_under(&saved);
    assert!(
        !left.iter().any(|p| p.ends_with("dataset.json")),
        "dataset.json left behind: {left:?}"
    );
    assert!(
        !left.iter().any(|p| p.to_string_lossy().contains(".tmp-")),
        "temporary files left behind: {left:?}"
    );
}

/// On the S3 server: a 20 MiB object goes up as a multipart upload with no request over one
/// part, and comes back once, in blocks, with the SHA-256 of what went up.
#[test]
fn s3_streams_large_objects_in_parts_and_reads_them_once() {
    use scfm_common::storage::{PART_BYTES, READ_BLOCK, Store, sha256_hex};
    use std::sync::Arc;
    let d = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&d.path().join("s3"), "scfm");
    scfm_common::install_crypto_provider();
    let backend = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{}", s3.port))
        .with_allow_http(true)
        .with_bucket_name("scfm")
        .with_region("us-east-1")
        .with_access_key_id(S3Server::KEY)
        .with_secret_access_key(S3Server::SECRET)
        .build()
        .unwrap();
    let (store, rec) =
        Store::from_backend(Arc::new(backend), "runs/a", "s3://scfm/runs/a").recorded();
    let data: Vec<u8> = (0..20 << 20).map(|i: usize| (i * 31 % 253) as u8).collect();
    let rt = scfm_common::runtime::Rt::new().unwrap();
    let copy = data.clone();
    let put = rt
        .block_on(
            store.put_streamed("ckpt-000000001/model.safetensors", move || {
                Ok(std::io::Cursor::new(copy.clone()))
            }),
        )
        .unwrap();
    assert_eq!(
        (put.size, put.sha256.as_str()),
        (data.len() as u64, sha256_hex(&data).as_str())
    );
    let seen = rec.requests();
    assert_eq!(seen.multipart_uploads, 1, "{seen:?}");
    assert!(
        seen.parts >= 3 && seen.largest_payload() <= PART_BYTES,
        "{seen:?}"
    );
    assert_eq!(
        std::fs::metadata(
            d.path()
                .join("s3/scfm/runs/a/ckpt-000000001/model.safetensors")
        )
        .unwrap()
        .len(),
        data.len() as u64
    );
    rec.reset();
    let mut reader = store.get_streamed("ckpt-000000001/model.safetensors");
    let back = rt
        .block_on(async {
            while let Some(b) = reader.next().await? {
                assert!(b.len() <= READ_BLOCK);
            }
            reader.finish().await
        })
        .unwrap();
    assert_eq!(back, put);
    assert_eq!(rec.requests().gets_of("model.safetensors"), 1);
    assert_eq!(
        rt.block_on(store.size_opt("ckpt-000000001/model.safetensors"))
            .unwrap(),
        Some(data.len() as u64)
    );
}
