//! The coordinator's `Status` RPC over real TCP on 127.0.0.1: it needs the job's token
//! like every call, and it reports membership as workers join.

use std::time::Duration;

use scfm_common::manifest::Manifest;
use scfm_common::rpc::{PROTOCOL_VERSION, TOKEN_HEADER, pb};
use scfm_coordinator::Coordinator;
use scfm_coordinator::status::RunState;
use scfm_coordinator::status::live::{ClientOptions, query};
use tonic::metadata::MetadataValue;

const T: Duration = Duration::from_secs(20);

fn manifest(dir: &std::path::Path) -> Manifest {
    std::fs::write(dir.join("d.h5ad"), b"placeholder: never read").unwrap();
    let text = "run_id: st\ndata: {path: d.h5ad}\ncluster: {max_workers: 2, coordinator: '127.0.0.1:0'}\ncheckpoint: {url: ckpt}\nauth: {token: s3cret}\n";
    let p = dir.join("job.yaml");
    std::fs::write(&p, text).unwrap();
    Manifest::load(&p).unwrap()
}

fn opts(token: Option<&str>) -> ClientOptions {
    ClientOptions {
        token: token.map(str::to_string),
        tls_ca: None,
        tls_domain: None,
        timeout: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn status_needs_the_token_and_reports_membership() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let coord = tokio::time::timeout(T, Coordinator::start(&m))
        .await
        .unwrap()
        .unwrap();
    let url = format!("http://{}", coord.addr);

    for token in [None, Some("guess")] {
        let e = tokio::time::timeout(T, query(&url, &opts(token)))
            .await
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&url) && e.contains("refused") && e.contains("--token"),
            "{e}"
        );
    }
    let s = tokio::time::timeout(T, query(&url, &opts(Some("s3cret"))))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.state, RunState::Joining);
    assert_eq!((s.run_id.as_deref(), s.step), (Some("st"), 0));
    assert_eq!((s.workers_alive, s.generation), (Some(0), Some(0)));
    assert_eq!((s.checkpoint, s.total_steps, s.loss), (None, None, None));
    assert_eq!(s.source, url);

    // A worker joins: one alive, still joining (max_workers is 2).
    let mut c = tokio::time::timeout(
        T,
        pb::coordinator_client::CoordinatorClient::connect(url.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    let mut req = tonic::Request::new(pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        ring_addr: "127.0.0.1:9".into(),
        hostname: "test".into(),
        pid: 1,
        device: "cpu".into(),
    });
    req.metadata_mut()
        .insert(TOKEN_HEADER, MetadataValue::try_from("s3cret").unwrap());
    tokio::time::timeout(T, c.register(req))
        .await
        .unwrap()
        .unwrap();
    let s = tokio::time::timeout(T, query(&url, &opts(Some("s3cret"))))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s.state, s.workers_alive), (RunState::Joining, Some(1)));
    assert!(s.detail.unwrap().contains("1 of 2 workers joined"));

    // Another protocol version is refused, naming both versions.
    let mut req = tonic::Request::new(pb::StatusRequest {
        protocol_version: PROTOCOL_VERSION + 1,
    });
    req.metadata_mut()
        .insert(TOKEN_HEADER, MetadataValue::try_from("s3cret").unwrap());
    let e = tokio::time::timeout(T, c.status(req))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    coord.fail("test over".into());
    let _ = tokio::time::timeout(T, coord.wait()).await.unwrap();
    // Nobody listens any more: the error names the address, within the deadline.
    let e = tokio::time::timeout(T, query(&url, &opts(Some("s3cret"))))
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(e.contains(&url) && e.contains("cannot connect"), "{e}");
}
