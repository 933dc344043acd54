use super::*;

fn store() -> (tempfile::TempDir, Store) {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path().to_str().unwrap()).unwrap();
    (d, s)
}

fn step(worker: &str, generation: u64, step: u64) -> Record {
    Record::Step(StepLine {
        worker: Some(worker.into()),
        generation,
        step,
        epoch: 0,
        loss: 1.0,
        mgem: 1.0,
        contrastive: 0.5,
        gepc: 0.0,
        grad_norm: 1.0,
        lr: 1e-3,
        cells_per_s: 10.0,
        data_wait_s: 0.0,
        compute_s: 0.1,
        allreduce_s: 0.0,
        allreduce_wait_s: 0.0,
        step_s: 0.1,
        val_loss: None,
        offset: 0,
        step_cells: 8,
        rank: 0,
        world_size: 1,
        total_steps: 10,
    })
}

fn steps_of(lines: &[serde_json::Value]) -> Vec<u64> {
    lines
        .iter()
        .filter(|v| v["event"] == "step")
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

/// Each write is one new part holding only its lines; the index carries the numbering
/// and the writer's state, and a part written after the last index is read back.
#[tokio::test]
async fn parts_are_numbered_and_a_reopened_writer_continues() {
    let (d, s) = store();
    let (mut w, rec) = PartWriter::open(s.clone()).await.unwrap();
    assert_eq!((w.next_part(), w.max_step()), (0, 0));
    assert!(rec.writer.is_none() && rec.unindexed.is_empty());
    let lines = |a: u64, b: u64| -> Vec<String> {
        (a..=b).map(|i| step("w0000", 1, i).to_line()).collect()
    };
    w.write(&lines(1, 3), serde_json::json!({"m": 3}))
        .await
        .unwrap();
    w.write(&[], serde_json::json!({"m": 9})).await.unwrap();
    w.write(&lines(4, 5), serde_json::json!({"m": 5}))
        .await
        .unwrap();
    let p0 = std::fs::read_to_string(d.path().join("metrics/part-000000.jsonl")).unwrap();
    let p1 = std::fs::read_to_string(d.path().join("metrics/part-000001.jsonl")).unwrap();
    assert_eq!((p0.lines().count(), p1.lines().count()), (3, 2));
    assert!(!d.path().join("metrics/part-000002.jsonl").exists());
    // A part whose index was never written (the writer died between the two).
    s.put(
        &part_key(2),
        Bytes::from(format!("{}\n", step("w0001", 1, 7).to_line())),
    )
    .await
    .unwrap();
    let (w, rec) = PartWriter::open(s.clone()).await.unwrap();
    assert_eq!((w.next_part(), w.max_step()), (3, 7));
    assert_eq!(rec.writer, Some(serde_json::json!({"m": 5})));
    assert_eq!(rec.unindexed.len(), 1);
    let all = read_effective(&s).await.unwrap().unwrap();
    assert_eq!(steps_of(&all), vec![1, 2, 3, 4, 5, 7]);
    let marks = worker_marks(&all);
    assert_eq!(marks["w0000"], (1, 5));
    assert_eq!(marks["w0001"], (1, 7));
    assert_eq!(part_number("metrics/part-000017.jsonl"), Some(17));
    assert_eq!(part_number("metrics/index.json"), None);
}

/// A rollback line drops the earlier lines of later steps, wherever they are, and
/// nothing after it; an older scfm's whole `metrics.jsonl` is read first.
#[tokio::test]
async fn rollbacks_apply_across_parts_and_the_legacy_file_comes_first() {
    let (_d, s) = store();
    let legacy: String = (1..=4)
        .map(|i| format!("{}\n", step("w0000", 1, i).to_line()))
        .collect();
    s.put(METRICS, Bytes::from(legacy)).await.unwrap();
    let (mut w, _) = PartWriter::open(s.clone()).await.unwrap();
    assert_eq!(w.max_step(), u64::MAX, "an older log's steps are unknown");
    let rollback = Record::Rollback {
        to_step: 2,
        generation: 0,
        reason: "resume".into(),
    };
    let mut lines = vec![
        Record::Generation {
            generation: 1,
            world_size: 1,
            hold: false,
            ready_after_s: 0.0,
        }
        .to_line(),
        rollback.to_line(),
    ];
    lines.extend((3..=5).map(|i| step("w0000", 1, i).to_line()));
    w.write(&lines, serde_json::Value::Null).await.unwrap();
    let all = read_effective(&s).await.unwrap().unwrap();
    assert_eq!(steps_of(&all), vec![1, 2, 3, 4, 5]);
    assert!(all.iter().any(|v| v["event"] == "generation"));
    assert!(all.iter().any(|v| rollback_to(v) == Some(2)));
    let tail = read_tail(&s, 1 << 20).await.unwrap().unwrap();
    assert_eq!(steps_of(&tail).last(), Some(&5));
    // A malformed line is named by its object and line.
    s.put(
        &part_key(1),
        Bytes::from_static(b"{\"event\":\"step\"}\n[1]\n"),
    )
    .await
    .unwrap();
    let e = read_effective(&s).await.unwrap_err().to_string();
    assert!(
        e.contains("metrics/part-000001.jsonl line 2") && e.contains("not a JSON object"),
        "{e}"
    );
    let (_d2, empty) = store();
    assert!(read_effective(&empty).await.unwrap().is_none());
    assert!(read_tail(&empty, 100).await.unwrap().is_none());
}

/// The tail reader goes back over parts without step lines, and reads only the end of a
/// large newest part.
#[tokio::test]
async fn the_tail_is_the_newest_part_or_more_until_a_step() {
    let (_d, s) = store();
    let (mut w, _) = PartWriter::open(s.clone()).await.unwrap();
    let many: Vec<String> = (1..=200).map(|i| step("w0000", 1, i).to_line()).collect();
    w.write(&many, serde_json::Value::Null).await.unwrap();
    let ev = Record::Checkpoint {
        step: 200,
        stall_s: 0.1,
    };
    w.write(&[ev.to_line()], serde_json::Value::Null)
        .await
        .unwrap();
    let tail = read_tail(&s, 4096).await.unwrap().unwrap();
    let got = steps_of(&tail);
    assert_eq!(got.last(), Some(&200));
    assert!(
        got.len() < 50,
        "only the end of the big part: {}",
        got.len()
    );
    assert_eq!(tail.last().unwrap()["event"], "checkpoint");
}

/// Lines that could not be written stay pending, in order, before newer ones.
#[tokio::test]
async fn a_failed_flush_keeps_the_lines() {
    let (d, s) = store();
    let (w, _) = PartWriter::open(s.clone()).await.unwrap();
    let log = MetricsLog::new(w);
    log.push(&step("w0000", 0, 1));
    // A file where the parts' folder belongs makes the write fail.
    std::fs::write(d.path().join("metrics"), b"in the way").unwrap();
    assert!(log.flush().await.is_err());
    log.push(&step("w0000", 0, 2));
    assert_eq!(log.pending(), 2);
    std::fs::remove_file(d.path().join("metrics")).unwrap();
    assert_eq!(log.flush().await.unwrap(), 2);
    assert_eq!(log.flush().await.unwrap(), 0);
    assert_eq!(log.max_step().await, 2);
    let all = read_effective(&s).await.unwrap().unwrap();
    assert_eq!(steps_of(&all), vec![1, 2]);
}

/// Records round-trip through their lines, NaN included (written as null).
#[test]
fn records_roundtrip_with_nan_as_null() {
    let mut r = step("w0001", 2, 5);
    if let Record::Step(s) = &mut r {
        s.loss = f64::NAN;
        s.val_loss = Some(3.5);
    }
    let line = r.to_line();
    assert!(line.starts_with("{\"event\":\"step\""), "{line}");
    assert!(line.contains("\"loss\":null"), "{line}");
    let Record::Step(back) = serde_json::from_str::<Record>(&line).unwrap() else {
        panic!("not a step")
    };
    assert!(back.loss.is_nan());
    assert_eq!(
        (back.val_loss, back.step, r.step()),
        (Some(3.5), 5, Some(5))
    );
    let single = Record::Step(StepLine {
        worker: None,
        ..back
    });
    assert!(!single.to_line().contains("worker"));
    let rb = Record::Rollback {
        to_step: 4,
        generation: 3,
        reason: "generation".into(),
    };
    let v: serde_json::Value = serde_json::from_str(&rb.to_line()).unwrap();
    assert_eq!(rollback_to(&v), Some(4));
    assert_eq!(rb.step(), None);
}
