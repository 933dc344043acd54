//! Tests of the ring over TLS (`super::tls`) on 127.0.0.1, with test certificates made by
//! openssl as the gRPC TLS test makes them (`tests/cluster.rs`; P-256 keys here, RSA
//! there): results equal to the plain ring's, clear refusals between a TLS and a plain
//! rank, a certificate of another CA or another name refused, the ring key still checked
//! inside TLS, and every deadline kept. Every wait is bounded.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::auth::{MAC_LEN, Role};
use super::handshake::{self, Me};
use super::link::Peer;
use super::tests::{
    JOIN, TIMEOUT, config, data, listeners, peer_dropping_sockets_fails_fast, run_gens,
    silent_peer_times_out, spawn_ranks,
};
use super::wire::{HELLO_LEN, Hello};
use super::*;

/// Test certificates in a temporary folder: the job's CA (`ca`) and a certificate for
/// `localhost` and 127.0.0.1 signed by it (`server`), and another CA with a certificate for
/// the same names signed by that one (`rogue`).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
        std::fs::write(dir.path().join("ext.cnf"), ext).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        for ca in ["ca", "rogue-ca"] {
            let (key, pem, subj) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN=scfm-test-{ca}"),
            );
            let args = [&["req", "-x509"][..], &ec, &["-keyout", &key, "-out", &pem]];
            let rest = ["-days", "1", "-subj", &subj];
            openssl(&[&args.concat()[..], &rest].concat());
        }
        for (who, ca) in [("server", "ca"), ("rogue", "rogue-ca")] {
            let (key, csr, pem) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.pem"),
            );
            let req = [&["req"][..], &ec, &["-keyout", &key, "-out", &csr]].concat();
            openssl(&[&req[..], &["-subj", "/CN=localhost"]].concat());
            let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                "ext.cnf",
            ]);
        }
        Pki { dir }
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(file)).unwrap()
    }

    /// Settings that present `who`'s certificate and key and verify peers against the
    /// job's CA for `domain`.
    fn tls(&self, who: &str, domain: &str) -> RingTls {
        let (cert, key) = (format!("{who}.pem"), format!("{who}.key"));
        RingTls::from_pem(
            &self.read(&cert),
            &self.read(&key),
            &self.read("ca.pem"),
            domain,
        )
        .unwrap()
    }
}

/// The tests' configuration over TLS.
fn tls_config(tls: &RingTls) -> RingConfig {
    config().with_tls(Some(tls.clone()))
}

/// Every operation's result on one rank, as bits.
type Bits = (Vec<u32>, Vec<u32>, Vec<u32>, u64);

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// The same operations over the plain ring and over the TLS ring give the same bits on
/// every rank: all-reduce (several buckets, and tiny buckets), all-gather, broadcast,
/// the f64 sum and a barrier.
#[test]
fn tls_ring_results_are_bit_identical_to_the_plain_ring() {
    let pki = Pki::new();
    let tls = pki.tls("server", "localhost");
    for (w, bucket, n) in [
        (2, DEFAULT_BUCKET_BYTES, 1_000_003),
        (3, DEFAULT_BUCKET_BYTES, 3_000_017),
        (3, 12, 1000),
    ] {
        let work = move |rank: usize, mut ring: RingCollective| -> Result<Bits, CollectiveError> {
            let mut buf = data(rank, n);
            ring.all_reduce_mean(&mut buf)?;
            let gathered = ring.all_gather(&data(rank, 5))?;
            // Tiny buckets make one-element broadcast segments: a short buffer then.
            let mut b = data(rank, n.min(300_001));
            ring.broadcast(&mut b, w - 1)?;
            let mut s = [rank as f64 + 0.25];
            ring.all_reduce_sum_f64(&mut s)?;
            ring.barrier()?;
            Ok((bits(&buf), bits(&gathered), bits(&b), s[0].to_bits()))
        };
        let gens = vec![7; w];
        let plain = run_gens(&gens, config().with_bucket_bytes(bucket), work);
        let over_tls = run_gens(&gens, tls_config(&tls).with_bucket_bytes(bucket), work);
        let errors = |x: &[Result<Bits, CollectiveError>]| -> Vec<String> {
            x.iter()
                .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
                .collect()
        };
        assert!(
            errors(&plain).is_empty(),
            "w={w} n={n} plain: {:?}",
            errors(&plain)
        );
        assert!(
            errors(&over_tls).is_empty(),
            "w={w} n={n} TLS: {:?}",
            errors(&over_tls)
        );
        for (rank, (p, t)) in plain.iter().zip(&over_tls).enumerate() {
            let (p, t) = (p.as_ref().unwrap(), t.as_ref().unwrap());
            assert!(
                p == t,
                "w={w} n={n}: rank {rank} differs between plain and TLS"
            );
            assert!(t == over_tls[0].as_ref().unwrap(), "w={w}: rank {rank}");
        }
    }
}

/// What one side of a connection got, and how long it took.
type Side = (Result<(), CollectiveError>, Duration);

/// Rank 0 connects with `connector` to rank 1, which accepts with `acceptor` (a world of
/// 2, generation 7; each side's deadline is its config's timeout). Returns both sides.
fn pair(connector: RingConfig, acceptor: RingConfig) -> (Side, Side) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let me = |rank| Me {
        rank,
        world: 2,
        generation: 7,
    };
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (t, cancel) = (Instant::now(), AtomicBool::new(false));
        let peer = Peer { rank: 0, addr };
        let by = t + acceptor.timeout;
        let r = handshake::accept_left(&listener, me(1), peer, &acceptor, by, &cancel);
        let _ = tx.send((r.map(drop), t.elapsed()));
    });
    let t = Instant::now();
    let peer = Peer { rank: 1, addr };
    let c = handshake::connect_right(me(0), peer, &connector, t + connector.timeout);
    let c = (c.map(drop), t.elapsed());
    (c, rx.recv_timeout(JOIN).expect("the accepting side hung"))
}

/// Asserts that `side` was refused in the handshake with a reason containing `needle`,
/// within `within`.
fn assert_refused(side: &Side, needle: &str, within: Duration) {
    let (r, took) = side;
    match r {
        Err(e @ CollectiveError::Handshake { .. }) => {
            assert!(e.to_string().contains(needle), "`{needle}` not in: {e}")
        }
        other => panic!("not a refused handshake: {other:?}"),
    }
    assert!(*took < within, "took {took:?}: {r:?}");
}

/// A rank whose ring runs over TLS and one whose ring does not refuse each other: the
/// connecting side within its deadline (at once in practice), naming why; the accepting
/// side by its deadline, naming the refused connection and why.
#[test]
fn tls_and_plain_ranks_refuse_each_other_clearly() {
    let pki = Pki::new();
    let tls = tls_config(&pki.tls("server", "localhost"));
    let deadline = TIMEOUT + Duration::from_secs(1);

    // A TLS client against a plain acceptor: the acceptor sees a TLS handshake record.
    let (c, a) = pair(tls.clone(), config());
    assert_refused(&c, "TLS handshake failed", TIMEOUT);
    assert_refused(&a, "sent a TLS handshake instead of a ring hello", deadline);

    // A plain client against a TLS acceptor: the acceptor answers with a TLS alert.
    let (c, a) = pair(config(), tls);
    assert_refused(&c, "sent a TLS alert instead of a ring hello", TIMEOUT);
    assert_refused(&a, "TLS handshake failed", deadline);
}

/// A peer presenting a certificate that the job's CA did not sign, or one for another
/// server name, is refused by the connecting rank; the acceptor learns why from the alert.
#[test]
fn a_certificate_of_another_ca_or_name_is_refused() {
    let pki = Pki::new();
    let ours = tls_config(&pki.tls("server", "localhost"));
    let rogue = tls_config(&pki.tls("rogue", "localhost"));
    let deadline = TIMEOUT + Duration::from_secs(1);
    let (c, a) = pair(ours.clone(), rogue);
    assert_refused(&c, "invalid peer certificate: UnknownIssuer", TIMEOUT);
    assert_refused(&a, "received fatal alert", deadline);

    let elsewhere = tls_config(&pki.tls("server", "elsewhere.example"));
    let (c, _) = pair(elsewhere, ours);
    assert_refused(&c, "not valid for name", TIMEOUT);

    // The whole ring: rank 1 presents the rogue certificate.
    let (ls, addrs) = listeners(2);
    let configs = vec![
        tls_config(&pki.tls("server", "localhost")),
        tls_config(&pki.tls("rogue", "localhost")),
    ];
    let outs = spawn_ranks(ls, vec![addrs; 2], configs, |_, mut r| r.barrier());
    assert!(outs.iter().all(Result::is_err), "{outs:?}");
    let named = outs.iter().any(|r| {
        r.as_ref()
            .unwrap_err()
            .to_string()
            .contains("UnknownIssuer")
    });
    assert!(named, "{outs:?}");
}

/// A TLS handshake with a peer that accepts the connection and says nothing ends with a
/// timeout at the deadline, on the connecting and on the accepting side.
#[test]
fn a_tls_handshake_with_a_silent_peer_times_out() {
    let pki = Pki::new();
    let tls = tls_config(&pki.tls("server", "localhost"));
    // Connecting: the TCP connection completes in the backlog; nobody answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let t = Instant::now();
    let me = Me {
        rank: 0,
        world: 2,
        generation: 7,
    };
    let peer = Peer {
        rank: 1,
        addr: silent.local_addr().unwrap(),
    };
    let r = handshake::connect_right(me, peer, &tls, t + TIMEOUT);
    let took = t.elapsed();
    assert!(
        matches!(r, Err(CollectiveError::Timeout { .. })),
        "{:?}",
        r.map(drop)
    );
    assert!(took >= TIMEOUT - Duration::from_millis(100), "{took:?}");
    assert!(took < TIMEOUT + Duration::from_secs(1), "{took:?}");

    // Accepting: a stranger connects and sends nothing.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let _stranger = TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    let cancel = AtomicBool::new(false);
    let me = Me { rank: 1, ..me };
    let peer = Peer { rank: 0, addr };
    let r = handshake::accept_left(&listener, me, peer, &tls, t + TIMEOUT, &cancel);
    assert!(r.is_err());
    assert!(
        t.elapsed() < TIMEOUT + Duration::from_secs(1),
        "{:?}",
        t.elapsed()
    );
}

/// Inside TLS the ring key is still checked: ranks with different keys refuse each other
/// naming the authentication, and a stranger that completes the TLS handshake (it holds
/// the CA) but not the key is refused (verdict 1) while the real ring forms.
#[test]
fn the_ring_key_is_checked_inside_tls() {
    let pki = Pki::new();
    let tls = pki.tls("server", "localhost");
    let (ls, addrs) = listeners(2);
    let other = RingConfig {
        key: RingKey::derive(Some("another-token"), "test-run"),
        ..tls_config(&tls)
    };
    let start = Instant::now();
    let outs = spawn_ranks(ls, vec![addrs; 2], vec![tls_config(&tls), other], |_, _| {
        Ok(())
    });
    assert!(start.elapsed() < TIMEOUT + Duration::from_secs(2));
    assert!(outs.iter().all(Result::is_err), "{outs:?}");
    let named = outs.iter().any(|r| {
        let e = r.as_ref().unwrap_err();
        matches!(e, CollectiveError::Handshake { .. })
            && e.to_string().contains("authentication failed")
    });
    assert!(named, "{outs:?}");

    // A TLS stranger with a wrong key, connected to rank 1 before the ring forms.
    let (ls, addrs) = listeners(2);
    let (opened, is_open) = mpsc::channel();
    let (target, intruder_tls) = (addrs[1], tls.clone());
    let intruder = thread::spawn(move || stranger(target, &intruder_tls, opened));
    is_open
        .recv_timeout(JOIN)
        .expect("the stranger did not connect");
    let outs = spawn_ranks(
        ls,
        vec![addrs; 2],
        vec![tls_config(&tls); 2],
        |rank, mut r| {
            let mut buf = data(rank, 1000);
            r.all_reduce_mean(&mut buf)?;
            Ok(buf)
        },
    );
    let outs: Vec<Vec<f32>> = outs.into_iter().map(Result::unwrap).collect();
    assert_eq!(bits(&outs[0]), bits(&outs[1]));
    assert_eq!(intruder.join().unwrap(), Ok(1), "the stranger's verdict");
}

/// Connects to `addr`, says so on `opened`, completes the TLS handshake, claims to be
/// rank 0 of generation 7 with a tag of another key, and returns the verdict byte.
fn stranger(addr: SocketAddr, tls: &RingTls, opened: mpsc::Sender<()>) -> Result<u8, String> {
    let s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    opened.send(()).unwrap();
    let by = Instant::now() + JOIN;
    let mut s = super::tls::connect(s, tls, by).map_err(|e| e.to_string())?;
    let hc = Hello::new(0, 2, 7, [7; 32]).encode();
    s.write_all_by(&hc, by).map_err(|e| e.to_string())?;
    let mut reply = [0u8; HELLO_LEN + MAC_LEN];
    s.read_exact_by(&mut reply, by).map_err(|e| e.to_string())?;
    let wrong = RingKey::derive(Some("another-token"), "test-run");
    let tag = wrong.tag(Role::Connector, &hc, &reply[..HELLO_LEN]);
    s.write_all_by(&tag, by).map_err(|e| e.to_string())?;
    let mut verdict = [9u8; 1];
    match s.read_exact_by(&mut verdict, by) {
        Ok(()) => Ok(verdict[0]),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err("closed without a verdict".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The deadlines of the plain ring hold over TLS: a peer that drops its sockets makes
/// its neighbours fail fast, and a silent peer makes them time out.
#[test]
fn tls_ring_failures_keep_their_deadlines() {
    let pki = Pki::new();
    let tls = pki.tls("server", "localhost");
    peer_dropping_sockets_fails_fast(tls_config(&tls));
    silent_peer_times_out(tls_config(&tls));
}

/// Unusable settings are refused, naming the part.
#[test]
fn unusable_tls_files_are_refused() {
    let pki = Pki::new();
    let (cert, key, ca) = (
        pki.read("server.pem"),
        pki.read("server.key"),
        pki.read("ca.pem"),
    );
    let err = |c: &[u8], k: &[u8], a: &[u8], d: &str| {
        RingTls::from_pem(c, k, a, d).unwrap_err().to_string()
    };
    assert!(err(b"junk", &key, &ca, "localhost").contains("no certificate"));
    assert!(err(&cert, b"junk", &ca, "localhost").contains("private key"));
    assert!(err(&cert, &key, b"", "localhost").contains("the CA file"));
    assert!(err(&cert, &key, &ca, "not a name!").contains("not a server name"));
    let other_key = pki.read("rogue.key");
    assert!(err(&cert, &other_key, &ca, "localhost").contains("cannot be used"));
    assert!(RingTls::from_pem(&cert, &key, &ca, "127.0.0.1").is_ok());
}
