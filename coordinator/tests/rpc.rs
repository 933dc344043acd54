//! The coordinator's gRPC edge over real TCP on 127.0.0.1: tokens and protocol versions
//! are checked, registrations beyond the cluster size are refused, and assignments wait
//! with a deadline.

use std::time::Duration;

use scfm_common::manifest::Manifest;
use scfm_common::rpc::{PROTOCOL_VERSION, TOKEN_HEADER, pb};
use scfm_coordinator::Coordinator;
use tonic::Code;
use tonic::metadata::MetadataValue;

const T: Duration = Duration::from_secs(20);

fn manifest(dir: &std::path::Path) -> Manifest {
    manifest_of(dir, 1)
}

fn manifest_of(dir: &std::path::Path, workers: usize) -> Manifest {
    std::fs::write(
        dir.join("d.h5ad"),
        b"placeholder: the coordinator never reads the data",
    )
    .unwrap();
    let text = format!(
        "run_id: rpc\ndata: {{path: d.h5ad}}\ncluster: {{max_workers: {workers}, coordinator: '127.0.0.1:0'}}\ncheckpoint: {{url: ckpt}}\nauth: {{token: s3cret}}\n"
    );
    let p = dir.join("job.yaml");
    std::fs::write(&p, text).unwrap();
    Manifest::load(&p).unwrap()
}

fn register(version: u32) -> tonic::Request<pb::RegisterRequest> {
    register_at(version, 9)
}

fn register_at(version: u32, port: u16) -> tonic::Request<pb::RegisterRequest> {
    tonic::Request::new(pb::RegisterRequest {
        protocol_version: version,
        ring_addr: format!("127.0.0.1:{port}"),
        hostname: "test".into(),
        pid: 1,
        device: "cpu".into(),
    })
}

fn with_token<R>(mut r: tonic::Request<R>, token: &str) -> tonic::Request<R> {
    r.metadata_mut()
        .insert(TOKEN_HEADER, MetadataValue::try_from(token).unwrap());
    r
}

/// A coordinator for `m` on 127.0.0.1, and a client connected to it.
async fn start(
    m: &Manifest,
) -> (
    Coordinator,
    pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
) {
    let coord = tokio::time::timeout(T, Coordinator::start(m))
        .await
        .unwrap()
        .unwrap();
    let url = format!("http://{}", coord.addr);
    let c = tokio::time::timeout(T, pb::coordinator_client::CoordinatorClient::connect(url))
        .await
        .unwrap()
        .unwrap();
    (coord, c)
}

#[tokio::test]
async fn tokens_versions_and_capacity_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let (coord, mut c) = start(&m).await;

    let e = tokio::time::timeout(T, c.register(register(PROTOCOL_VERSION)))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::Unauthenticated, "wrong or missing token")
    );
    let e = tokio::time::timeout(
        T,
        c.register(with_token(register(PROTOCOL_VERSION), "guess")),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = tokio::time::timeout(
        T,
        c.register(with_token(register(PROTOCOL_VERSION + 1), "s3cret")),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        format!(
            "protocol version {} does not match the coordinator's {PROTOCOL_VERSION}",
            PROTOCOL_VERSION + 1
        )
    );

    let ok = tokio::time::timeout(
        T,
        c.register(with_token(register(PROTOCOL_VERSION), "s3cret")),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert_eq!(ok.run_id, "rpc");
    let back = Manifest::parse(&ok.manifest_yaml, std::path::Path::new("x")).unwrap();
    assert_eq!(back.cluster.max_workers, 1);
    // max_workers = 1 joined: the job starts and this worker is rank 0 of 1.
    let a = tokio::time::timeout(
        T,
        c.get_assignment(with_token(
            tonic::Request::new(pb::AssignmentRequest {
                worker_id: ok.worker_id.clone(),
                after_generation: 0,
            }),
            "s3cret",
        )),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert_eq!(
        (a.generation, a.rank, a.world_size, a.peers),
        (1, 0, 1, vec!["127.0.0.1:9".to_string()])
    );
    // A second worker is refused: the cluster is full (max_workers = 1).
    let e = tokio::time::timeout(
        T,
        c.register(with_token(register(PROTOCOL_VERSION), "s3cret")),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::ResourceExhausted, "the cluster is full (1 workers)")
    );
    // Heartbeats with a wrong version are refused too.
    let hb = pb::HeartbeatRequest {
        protocol_version: 0,
        worker_id: ok.worker_id.clone(),
        generation: 1,
        step: 0,
    };
    let e = tokio::time::timeout(
        T,
        c.heartbeat(with_token(tonic::Request::new(hb), "s3cret")),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // The worker reports completion: the job is done and `wait` returns.
    report(&mut c, &ok.worker_id, false).await;
    tokio::time::timeout(T, coord.wait())
        .await
        .unwrap()
        .unwrap();
}

/// NCCL's unique id travels through the coordinator: rank 0 of the generation publishes
/// the id it made, rank 1 (already waiting for it) receives it; a wrong publisher, a stale
/// generation and a malformed id are refused with the reason.
#[tokio::test]
async fn nccl_id_goes_from_rank_zero_to_the_other_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest_of(dir.path(), 2);
    // Kept alive (not `_`) until the end of the test.
    let (_coord, mut c) = start(&m).await;
    let mut ids = Vec::new();
    for port in [9, 10] {
        let r = tokio::time::timeout(
            T,
            c.register(with_token(register_at(PROTOCOL_VERSION, port), "s3cret")),
        )
        .await
        .unwrap()
        .unwrap();
        ids.push(r.into_inner().worker_id);
    }
    let mut ranks = Vec::new();
    for id in &ids {
        let req = pb::AssignmentRequest {
            worker_id: id.clone(),
            after_generation: 0,
        };
        let a = tokio::time::timeout(
            T,
            c.get_assignment(with_token(tonic::Request::new(req), "s3cret")),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner();
        assert_eq!((a.generation, a.world_size), (1, 2));
        ranks.push(a.rank);
    }
    let (zero, one) = if ranks[0] == 0 {
        (ids[0].clone(), ids[1].clone())
    } else {
        (ids[1].clone(), ids[0].clone())
    };
    let ask = |worker: &str, generation: u64, id: Vec<u8>| {
        with_token(
            tonic::Request::new(pb::NcclIdRequest {
                worker_id: worker.to_string(),
                generation,
                id,
            }),
            "s3cret",
        )
    };
    // Rank 1 asks first and waits; rank 0 publishes; rank 1 gets it.
    let mut c1 = c.clone();
    let waiting = tokio::spawn({
        let req = ask(&one, 1, Vec::new());
        async move { c1.exchange_nccl_id(req).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id: Vec<u8> = (0..128u8).collect();
    let published = tokio::time::timeout(T, c.exchange_nccl_id(ask(&zero, 1, id.clone())))
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(published.id, id);
    let got = tokio::time::timeout(T, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(got.id, id);
    // Refusals name the problem.
    for (req, why) in [
        (
            ask(&one, 1, id.clone()),
            "only rank 0 publishes the NCCL id, not rank 1",
        ),
        (
            ask(&zero, 7, Vec::new()),
            "generation 7 is not the current one (1)",
        ),
        (ask(&zero, 1, vec![1; 5]), "an NCCL id has 128 bytes, not 5"),
    ] {
        let e = tokio::time::timeout(T, c.exchange_nccl_id(req))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::FailedPrecondition, why));
    }
    // Without the token nothing is exchanged.
    let req = tonic::Request::new(pb::NcclIdRequest {
        worker_id: zero.clone(),
        generation: 1,
        id: Vec::new(),
    });
    let e = tokio::time::timeout(T, c.exchange_nccl_id(req))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

/// Registers one worker (with the token) and returns its id.
async fn register_ok(
    c: &mut pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
) -> String {
    tokio::time::timeout(
        T,
        c.register(with_token(register(PROTOCOL_VERSION), "s3cret")),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner()
    .worker_id
}

/// Reports worker `id` done at step 3, failed (a broken connection) or not.
async fn report(
    c: &mut pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    id: &str,
    failed: bool,
) {
    let done = pb::DoneRequest {
        worker_id: id.to_string(),
        step: 3,
        checkpoint: String::new(),
        failed,
        error: if failed {
            "coordinator: no assignment: transport error (Unknown)".into()
        } else {
            String::new()
        },
        preempted: false,
    };
    tokio::time::timeout(
        T,
        c.report_done(with_token(tonic::Request::new(done), "s3cret")),
    )
    .await
    .unwrap()
    .unwrap();
}

/// A failure reported by a worker the job no longer has (lost after a partition, it
/// fails on its way out) is logged and ignored: the job goes on and completes. A
/// failure of a member still fails the job.
#[tokio::test]
async fn a_failure_reported_by_a_worker_no_longer_in_the_job_does_not_fail_it() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let (coord, mut c) = start(&m).await;
    let id = register_ok(&mut c).await;
    // "w0999" was never (or is no longer) a member.
    report(&mut c, "w0999", true).await;
    report(&mut c, &id, false).await;
    tokio::time::timeout(T, coord.wait())
        .await
        .unwrap()
        .expect("the job completes");

    // A member's failure fails the job, with its reason.
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let (coord, mut c) = start(&m).await;
    let id = register_ok(&mut c).await;
    report(&mut c, &id, true).await;
    let e = tokio::time::timeout(T, coord.wait())
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("transport error"), "{e}");
}
