//! The metrics stream of a real `scfm launch` process over TCP on 127.0.0.1: many
//! synthetic step reports leave the coordinator's memory flat, each line is uploaded once
//! (each flush writes a new part with the new lines only), acknowledgements follow what is
//! written, and resent reports are not logged twice.

use std::io::BufRead;
use std::time::{Duration, Instant};

use scfm_common::rpc::{PROTOCOL_VERSION, TOKEN_HEADER, pb};
use tonic::metadata::MetadataValue;

const T: Duration = Duration::from_secs(60);

fn with_token<R>(r: R) -> tonic::Request<R> {
    let mut r = tonic::Request::new(r);
    r.metadata_mut()
        .insert(TOKEN_HEADER, MetadataValue::try_from("s3cret").unwrap());
    r
}

/// The coordinator's resident memory (KiB), from `/proc`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A report as a worker sends it, with every field set.
fn report(worker: &str, step: u64) -> pb::StepMetrics {
    pb::StepMetrics {
        worker_id: worker.into(),
        generation: 1,
        step,
        loss: 5.0 / (1.0 + step as f64),
        mgem: 4.123456789,
        contrastive: 0.987654321,
        grad_norm: 1.5,
        lr: 1e-4,
        cells_per_s: 1234.5,
        data_wait_s: 0.001,
        allreduce_s: 0.002,
        allreduce_wait_s: 0.001,
        step_s: 0.1,
        epoch: step / 1000,
        val_loss: f64::NAN,
        offset: step * 64,
        step_cells: 64,
        rank: 0,
        world_size: 1,
        total_steps: 1_000_000,
        gepc: 0.5,
    }
}

/// Sends `steps` on one stream and closes it, waiting for the acknowledgement of the last.
async fn send(
    c: &mut pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    worker: &str,
    steps: std::ops::RangeInclusive<u64>,
) -> pb::MetricsAck {
    let last = *steps.end();
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut acks = tokio::time::timeout(
        T,
        c.stream_metrics(with_token(tokio_stream::wrappers::ReceiverStream::new(rx))),
    )
    .await
    .expect("the stream opens in time")
    .expect("the stream opens")
    .into_inner();
    let w = worker.to_string();
    let sender = tokio::spawn(async move {
        for s in steps {
            if tx.send(report(&w, s)).await.is_err() {
                return;
            }
        }
        // Closing our side asks the coordinator to write and acknowledge at once (as a
        // worker does when training ends), rather than at its next 5 s flush.
    });
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let a = tokio::time::timeout(left, acks.message())
            .await
            .expect("acknowledged in time")
            .expect("the stream stays up")
            .expect("the stream ends only after the acknowledgement");
        if a.step >= last {
            sender.abort();
            return a;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_steps_keep_memory_flat_and_upload_each_line_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("d.h5ad"), b"placeholder: never read").unwrap();
    let text = format!(
        "run_id: stream\ndata: {{path: {}}}\ncluster: {{max_workers: 1, coordinator: '127.0.0.1:0', worker_timeout_s: 600, join_timeout_s: 600}}\ncheckpoint: {{url: {}}}\nauth: {{token: s3cret}}\n",
        d.join("d.h5ad").display(),
        d.join("ckpt").display()
    );
    std::fs::write(d.join("job.yaml"), text).unwrap();
    let mut coord = std::process::Command::new(env!("CARGO_BIN_EXE_scfm"))
        .arg("launch")
        .arg(d.join("job.yaml"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = coord.id();
    // Killed whatever happens below.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = coord.stdout.take().unwrap();
    let _guard = Kill(coord);
    let (ltx, lrx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = ltx.send(l);
        }
    });
    let line = lrx
        .recv_timeout(T)
        .expect("the coordinator printed no address");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let mut c = tokio::time::timeout(
        T,
        pb::coordinator_client::CoordinatorClient::connect(format!("http://{addr}")),
    )
    .await
    .unwrap()
    .unwrap();
    let id = c
        .register(with_token(pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            ring_addr: "127.0.0.1:9".into(),
            hostname: "test".into(),
            pid: 1,
            device: "cpu".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .worker_id;

    // Warm up (allocator pools, buffers), then measure while 20 times as many arrive.
    let (warm, total, batch) = (20_000u64, 420_000u64, 20_000u64);
    let a = send(&mut c, &id, 1..=warm).await;
    assert_eq!((a.generation, a.step), (1, warm));
    let before = rss_kib(pid);
    let mut peak = before;
    let mut from = warm + 1;
    while from <= total {
        let to = (from + batch - 1).min(total);
        send(&mut c, &id, from..=to).await;
        peak = peak.max(rss_kib(pid));
        from = to + 1;
    }
    let grew_mib = (peak - before) as f64 / 1024.0;
    eprintln!(
        "coordinator RSS {:.1} MiB after {warm} reports, peak {:.1} MiB over {} more",
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        total - warm
    );
    // The lines of the measured reports alone are ~190 MB: holding them would show.
    assert!(
        grew_mib < 32.0,
        "the coordinator's memory grew by {grew_mib:.1} MiB over {} reports",
        total - warm
    );

    // A worker that lost its stream sends its unacknowledged reports again: the ones the
    // coordinator has are dropped, the new ones logged.
    let a = send(&mut c, &id, total - 99..=total + 10).await;
    assert_eq!(a.step, total + 10);

    // Every line uploaded once: the parts together hold each step exactly once, and no
    // part repeats another's lines.
    let mut parts: Vec<_> = std::fs::read_dir(d.join("ckpt/metrics"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    parts.sort();
    assert!(parts.len() >= 2, "{parts:?}");
    let mut seen = vec![0u8; (total + 11) as usize];
    let mut largest = 0;
    for p in &parts {
        let text = std::fs::read_to_string(p).unwrap();
        largest = largest.max(text.len());
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            if v["event"] == "step" {
                seen[v["step"].as_u64().unwrap() as usize] += 1;
            }
        }
    }
    let wrong: Vec<usize> = (1..seen.len()).filter(|&s| seen[s] != 1).collect();
    assert!(
        wrong.is_empty(),
        "{} steps not logged exactly once, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert!(
        largest < 16 << 20,
        "a part of {largest} bytes: flushes should write only new lines"
    );
    assert!(!d.join("ckpt/metrics.jsonl").exists());
}
