use super::*;

fn m(worker: &str, generation: u64, step: u64) -> pb::StepMetrics {
    pb::StepMetrics {
        worker_id: worker.into(),
        generation,
        step,
        val_loss: f64::NAN,
        ..Default::default()
    }
}

fn store() -> (tempfile::TempDir, Store) {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path().to_str().unwrap()).unwrap();
    (d, s)
}

/// `(generation, step)` of the counting step lines of the log, in order.
async fn logged(store: &Store) -> Vec<(u64, u64)> {
    metrics_log::read_effective(store)
        .await
        .unwrap()
        .unwrap_or_default()
        .iter()
        .filter(|v| v["event"] == "step")
        .map(|v| {
            (
                v["generation"].as_u64().unwrap(),
                v["step"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `scfm status` sees the latest step (a new generation's step replaces a rolled-back
/// one), the latest validation loss, the step rate, and what the log held at start.
#[tokio::test]
async fn progress_follows_the_latest_step_and_validation() {
    let (_d, store) = store();
    let sink = MetricsSink::open(store.clone(), 1000, Start::From(0))
        .await
        .unwrap();
    assert!(sink.progress().last.is_none());
    for s in 1..=3 {
        let mut x = m("a", 1, s);
        (x.loss, x.total_steps, x.world_size) = (5.0 - s as f64, 10, 2);
        if s == 2 {
            x.val_loss = 4.5;
        }
        sink.record(&x);
        sink.record(&pb::StepMetrics {
            worker_id: "b".into(),
            val_loss: f64::NAN,
            ..x
        });
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let p = sink.progress();
    let last = p.last.unwrap();
    assert_eq!((last.step, last.loss, last.total_steps), (3, 2.0, Some(10)));
    assert_eq!(p.val, Some((2, 4.5)));
    assert!(p.steps_per_s.is_some_and(|r| r > 0.0));
    // Generation 2 continues from step 2: its step 3 is the latest; the rate restarts.
    sink.record(&m("a", 2, 3));
    let p = sink.progress();
    assert_eq!(
        p.last.as_ref().map(|l| (l.generation, l.step)),
        Some((2, 3))
    );
    assert!(p.steps_per_s.is_none());
    sink.flush().await.unwrap();
    // A coordinator resuming at step 2 knows step 2's losses from the log.
    let again = MetricsSink::open(store, 1000, Start::From(2))
        .await
        .unwrap();
    let p = again.progress();
    let last = p.last.unwrap();
    assert_eq!((last.generation, last.step, last.loss), (0, 2, 3.0));
    assert_eq!(p.val, Some((2, 4.5)));
    assert_eq!(again.last_step(), 2);
}

/// A survivor finished step 4 of generation 1 before the ring broke; generation 2
/// continues from step 3, so that step 4 (and a late report of it) does not count.
#[tokio::test]
async fn steps_rolled_back_by_a_new_generation_do_not_count() {
    let (_d, store) = store();
    let sink = MetricsSink::open(store.clone(), 1000, Start::From(0))
        .await
        .unwrap();
    for s in 1..=3 {
        sink.record(&m("a", 1, s));
        sink.record(&m("b", 1, s));
    }
    sink.record(&m("a", 1, 4));
    // Already written when generation 2 starts: a rollback line discounts it.
    sink.flush().await.unwrap();
    sink.generation_formed(2, Instant::now());
    sink.record(&m("b", 2, 4));
    sink.record(&m("a", 1, 4)); // late
    sink.record(&m("a", 2, 4));
    sink.flush().await.unwrap();
    let got = logged(&store).await;
    assert_eq!(
        got,
        vec![
            (1, 1),
            (1, 1),
            (1, 2),
            (1, 2),
            (1, 3),
            (1, 3),
            (2, 4),
            (2, 4)
        ]
    );
    let all = metrics_log::read_effective(&store).await.unwrap().unwrap();
    assert!(all.iter().any(|v| v["event"] == "recovered"));
    assert!(all.iter().any(|v| metrics_log::rollback_to(v) == Some(3)));
    // A relaunch resuming from a checkpoint at step 2 discounts steps 3 and 4.
    let again = MetricsSink::open(store.clone(), 1000, Start::From(2))
        .await
        .unwrap();
    again.record(&m("w0000", 1, 3));
    again.flush().await.unwrap();
    assert_eq!(
        logged(&store).await,
        vec![(1, 1), (1, 1), (1, 2), (1, 2), (1, 3)]
    );
}

/// Many synthetic steps: after each flush nothing is held, and each flush uploads one
/// new part with exactly the lines that came since the previous one (never the whole
/// log again), every line once.
#[tokio::test]
async fn memory_stays_flat_and_each_flush_uploads_only_new_lines() {
    let (d, store) = store();
    let sink = MetricsSink::open(store.clone(), 1_000_000, Start::From(0))
        .await
        .unwrap();
    let (workers, steps, per_flush) = (4u64, 20_000u64, 500u64);
    for s in 1..=steps {
        for w in 0..workers {
            let mut x = m(&format!("w{w:04}"), 1, s);
            x.loss = 1.0 / s as f64;
            assert_eq!(sink.record(&x), Taken::Recorded);
        }
        if s % per_flush == 0 {
            let (n, bytes) = sink.pending();
            assert_eq!(n as u64, per_flush * workers);
            assert!(bytes < (per_flush * workers * 1024) as usize);
            sink.flush().await.unwrap();
            assert_eq!(sink.pending(), (0, 0), "nothing held after a flush");
        }
    }
    let parts = store.list(metrics_log::DIR).await.unwrap();
    let parts: Vec<&String> = parts
        .iter()
        .filter(|k| metrics_log::part_number(k).is_some())
        .collect();
    assert_eq!(parts.len() as u64, steps / per_flush);
    let mut sizes = Vec::new();
    for k in &parts {
        let text = std::fs::read_to_string(d.path().join(k)).unwrap();
        assert_eq!(text.lines().count() as u64, per_flush * workers, "{k}");
        sizes.push(text.len());
    }
    // Uploads per flush stay the same size from the first flush to the last.
    let (first, last) = (sizes[0] as f64, sizes[sizes.len() - 1] as f64);
    assert!(last < first * 1.1, "part sizes grew: {first} -> {last}");
    let got = logged(&store).await;
    assert_eq!(got.len() as u64, steps * workers);
    assert!(!d.path().join("metrics.jsonl").exists());
}

/// Resent reports are dropped by the worker's mark; acknowledgements follow what is
/// written; a coordinator that adopts the job knows its predecessor's marks, also those
/// of a part whose index was never written.
#[tokio::test]
async fn resends_are_deduplicated_across_a_restart() {
    let (_d, store) = store();
    let sink = MetricsSink::open(store.clone(), 1000, Start::From(0))
        .await
        .unwrap();
    let rx = sink.subscribe();
    for s in 1..=10 {
        assert_eq!(sink.record(&m("w0000", 1, s)), Taken::Recorded);
    }
    assert_eq!(sink.durable_mark("w0000"), None, "nothing written yet");
    assert_eq!(sink.received_mark("w0000"), Some((1, 10)));
    sink.flush().await.unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(sink.durable_mark("w0000"), Some((1, 10)));
    for s in 5..=12 {
        let want = if s <= 10 {
            Taken::Duplicate
        } else {
            Taken::Recorded
        };
        assert_eq!(sink.record(&m("w0000", 1, s)), want, "step {s}");
    }
    sink.flush().await.unwrap();
    // The coordinator dies; a report of step 13 was written in a part whose index was not.
    drop(sink);
    let line = format!("{}\n", step_line(&m("w0000", 1, 13)).to_line());
    store
        .put(&metrics_log::part_key(2), bytes::Bytes::from(line))
        .await
        .unwrap();
    let again = MetricsSink::open(store.clone(), 1000, Start::Adopt)
        .await
        .unwrap();
    assert_eq!(again.durable_mark("w0000"), Some((1, 13)));
    for s in 11..=14 {
        let want = if s <= 13 {
            Taken::Duplicate
        } else {
            Taken::Recorded
        };
        assert_eq!(again.record(&m("w0000", 1, s)), want, "step {s}");
    }
    again.flush().await.unwrap();
    let steps: Vec<u64> = logged(&store).await.iter().map(|x| x.1).collect();
    assert_eq!(steps, (1..=14).collect::<Vec<_>>());
}

/// A backlog that cannot be written is bounded: beyond it reports are refused (the
/// workers keep them), and a flush that fails keeps the lines.
#[tokio::test]
async fn a_failing_store_bounds_the_backlog() {
    let (d, store) = store();
    let mut sink = MetricsSink::open(store.clone(), 1000, Start::From(0))
        .await
        .unwrap();
    sink.max_pending = 4096;
    std::fs::write(d.path().join("metrics"), b"in the way").unwrap();
    let mut refused = None;
    for s in 1..=1000 {
        match sink.record(&m("w0000", 1, s)) {
            Taken::Recorded => {}
            Taken::Full => {
                refused = Some(s);
                break;
            }
            Taken::Duplicate => panic!("step {s} taken for a duplicate"),
        }
    }
    let refused = refused.expect("the backlog was never refused");
    assert!(sink.flush().await.is_err());
    assert_eq!(sink.durable_mark("w0000"), None);
    assert_eq!(sink.pending().0 as u64, refused - 1);
    std::fs::remove_file(d.path().join("metrics")).unwrap();
    sink.flush().await.unwrap();
    assert_eq!(sink.record(&m("w0000", 1, refused)), Taken::Recorded);
    sink.flush().await.unwrap();
    assert_eq!(logged(&store).await.len() as u64, refused);
}
