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
    std::fs::write(
        dir.join("d.h5ad"),
        b"placeholder: the coordinator never reads the data",
    )
    .unwrap();
    let text = "run_id: rpc\ndata: {path: d.h5ad}\ncluster: {max_workers: 1, coordinator: '127.0.0.1:0'}\ncheckpoint: {url: ckpt}\nauth: {token: s3cret}\n";
    let p = dir.join("job.yaml");
    std::fs::write(&p, text).unwrap();
    Manifest::load(&p).unwrap()
}

fn register(version: u32) -> tonic::Request<pb::RegisterRequest> {
    tonic::Request::new(pb::RegisterRequest {
        protocol_version: version,
        ring_addr: "127.0.0.1:9".into(),
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

#[tokio::test]
async fn tokens_versions_and_capacity_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let coord = tokio::time::timeout(T, Coordinator::start(&m))
        .await
        .unwrap()
        .unwrap();
    let url = format!("http://{}", coord.addr);
    let mut c = tokio::time::timeout(T, pb::coordinator_client::CoordinatorClient::connect(url))
        .await
        .unwrap()
        .unwrap();

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
    let done = pb::DoneRequest {
        worker_id: ok.worker_id,
        step: 0,
        checkpoint: String::new(),
        failed: false,
        error: String::new(),
        preempted: false,
    };
    tokio::time::timeout(
        T,
        c.report_done(with_token(tonic::Request::new(done), "s3cret")),
    )
    .await
    .unwrap()
    .unwrap();
    tokio::time::timeout(T, coord.wait())
        .await
        .unwrap()
        .unwrap();
}
