//! Who may reach a job, with real processes on 127.0.0.1: `scfm launch` refuses to listen
//! beyond loopback without a token, and strangers at a worker's ring port are refused
//! while the job trains on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use scfm_tests::{
    TINY, bin, launch_coordinator, lines, run_with_timeout, wait_exit, write_manifest,
};

/// `scfm launch` on a non-loopback address without a token exits at once with an error
/// that says how to set one (and listens nowhere); with a token it listens there.
#[test]
fn launch_refuses_a_non_loopback_address_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = "  max_workers: 2\n  coordinator: 0.0.0.0:0\n  join_timeout_s: 5";
    let m = write_manifest(d, &d.join("ckpt"), TINY, "  batch_size: 8", cluster);
    let out = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("launch")
            .arg(&m)
            .env("RUST_BACKTRACE", "0"),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "it must not listen"
    );
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0")
            && err.contains("the manifest has no token")
            && err.contains("token_env: SCFM_TOKEN"),
        "{err}"
    );

    let text = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, format!("{text}auth:\n  token: launch-test\n")).unwrap();
    let (mut coord, addr, _log) = launch_coordinator(&m);
    assert!(addr.starts_with("0.0.0.0:"), "{addr}");
    coord.kill().unwrap();
    coord.wait().unwrap();
}

/// A hello that claims rank `rank` of a world of `world` in `generation` (the ring's wire
/// format: magic `scRG`, version 2, rank, world, generation, a 32-byte nonce).
fn forged_hello(rank: u32, world: u32, generation: u64) -> Vec<u8> {
    let mut b = b"scRG".to_vec();
    for x in [2u32, rank, world] {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b.extend_from_slice(&generation.to_le_bytes());
    b.extend_from_slice(&[0x42; 32]);
    b
}

/// While the first generation of a two-worker job forms, strangers connect to worker 0's
/// ring port: one silent, one speaking HTTP, and one with a well-formed hello (claiming to
/// be rank 1 of generation 1) and a guessed answer to the challenge. Each is refused and
/// logged, the real peer's connection is accepted, and the job trains to its end.
#[test]
fn strangers_at_a_ring_port_are_refused_and_the_job_trains_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let training = "  batch_size: 8\n  max_steps: 6\n  eval_every: 1000\n  threads: 1";
    let m = write_manifest(
        d,
        &d.join("ckpt"),
        TINY,
        training,
        "  max_workers: 2\n  heartbeat_ms: 200",
    );
    let text = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, format!("{text}auth:\n  token: ring-test\n")).unwrap();
    let (mut coord, addr, log) = launch_coordinator(&m);
    let join = || {
        Command::new(bin("scfm-worker"))
            .args(["join", "--bind", "127.0.0.1", "--coordinator"])
            .arg(format!("http://{addr}"))
            .env("SCFM_TOKEN", "ring-test")
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut w0 = join();
    let (w0_log, r0) = lines(w0.stderr.take().unwrap());
    let mut w0_lines = Vec::new();
    let ring: SocketAddr = loop {
        let line = w0_log
            .recv_timeout(Duration::from_secs(120))
            .expect("worker 0 did not register");
        w0_lines.push(line.clone());
        if line.contains("registered")
            && let Some(at) = line.find("ring=")
        {
            let addr = line[at + 5..].split_whitespace().next().unwrap();
            break addr.parse().unwrap();
        }
    };

    // Generation 1 needs the second worker: these wait in worker 0's backlog until then.
    let dial = move || {
        let s = TcpStream::connect(ring).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
        s
    };
    let mut silent = dial();
    let mut http = dial();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let forger = std::thread::spawn(move || {
        let mut s = dial();
        s.write_all(&forged_hello(1, 2, 1)).unwrap();
        let mut challenge = [0u8; 56 + 32];
        s.read_exact(&mut challenge).expect("no challenge");
        s.write_all(&[0u8; 32]).unwrap();
        let mut verdict = [9u8; 1];
        s.read_exact(&mut verdict).expect("no verdict");
        verdict[0]
    });

    let mut w1 = join();
    let status = wait_exit(&mut coord, Duration::from_secs(300), "coordinator");
    let clog: Vec<String> = log.try_iter().collect();
    assert!(status.success(), "{}", clog.join("\n"));
    for w in [&mut w0, &mut w1] {
        let s = wait_exit(w, Duration::from_secs(60), "worker");
        assert!(s.success(), "worker exit {s}");
    }
    assert_eq!(forger.join().unwrap(), 1, "the forged hello is refused");
    for (what, s) in [("silent", &mut silent), ("http", &mut http)] {
        let mut rest = Vec::new();
        let closed = match s.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(closed && rest.is_empty(), "{what}: {rest:?}");
    }
    r0.join().unwrap();
    w0_lines.extend(w0_log.try_iter());
    let w0_text = w0_lines.join("\n");
    assert!(
        w0_text.contains("refused a ring connection") && w0_text.contains("authentication failed"),
        "{w0_text}"
    );
    assert!(w0_text.contains("bad magic"), "{w0_text}");
}
