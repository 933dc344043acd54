//! Tests of the ring's authentication over 127.0.0.1: connections with a wrong key,
//! replayed hellos and strangers are refused while the real ring forms and computes
//! correctly; ranks holding different keys refuse each other. Every wait is bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::auth::{MAC_LEN, Role};
use super::tests::{JOIN, TIMEOUT, config, data, listeners, spawn_ranks};
use super::wire::{HELLO_LEN, Hello};
use super::*;

/// What an intruder saw of its connection.
type Seen = Result<String, String>;

/// An intruder: given the victim's ring address, opens its connection(s) and reports
/// once they are open (so that they wait in the victim's backlog ahead of the real peer),
/// then plays its part and returns what it saw.
type Intruder = Box<dyn FnOnce(SocketAddr, mpsc::Sender<()>) -> Seen + Send>;

/// Opens a connection to `addr` with socket timeouts of [`JOIN`].
fn dial(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(JOIN)).unwrap();
    s.set_write_timeout(Some(JOIN)).unwrap();
    s
}

/// Reads until the peer closes the connection (or [`JOIN`] passes); the bytes read.
fn until_closed(s: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => Ok(got),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(got),
        Err(e) => Err(format!("not closed: {e} after {} bytes", got.len())),
    }
}

/// A hello that claims to be rank `rank` of world `world` in `generation`.
fn hello_bytes(rank: usize, world: usize, generation: u64) -> [u8; HELLO_LEN] {
    Hello::new(rank, world, generation, [7; 32]).encode()
}

/// Plays the connecting side of the handshake with `hello`, answering the challenge with
/// `answer(hello_c, hello_a)`; returns the verdict byte, or how the connection ended.
fn claim(
    s: &mut TcpStream,
    hello: &[u8; HELLO_LEN],
    answer: impl Fn(&[u8], &[u8]) -> Vec<u8>,
) -> Seen {
    s.write_all(hello).map_err(|e| e.to_string())?;
    let mut reply = [0u8; HELLO_LEN + MAC_LEN];
    s.read_exact(&mut reply)
        .map_err(|e| format!("no challenge: {e}"))?;
    s.write_all(&answer(hello, &reply[..HELLO_LEN]))
        .map_err(|e| e.to_string())?;
    let mut verdict = [0u8; 1];
    match s.read(&mut verdict) {
        Ok(1) => Ok(format!("verdict {}", verdict[0])),
        Ok(_) => Ok("closed".into()),
        Err(e) => Err(format!("no verdict: {e}")),
    }
}

/// Forms a ring of `w` ranks (generation 7) while `intruders` connect to rank `victim`
/// first; checks that the ring formed and all-reduces correctly, and returns what each
/// intruder saw.
fn ring_with_intruders(w: usize, victim: usize, intruders: Vec<Intruder>) -> Vec<Seen> {
    let (ls, addrs) = listeners(w);
    let (opened, all_open) = mpsc::channel();
    let n = intruders.len();
    let handles: Vec<_> = intruders
        .into_iter()
        .map(|f| {
            let (target, opened) = (addrs[victim], opened.clone());
            thread::spawn(move || f(target, opened))
        })
        .collect();
    for _ in 0..n {
        all_open
            .recv_timeout(JOIN)
            .expect("an intruder did not connect");
    }
    // The ring must form within its own deadline (TIMEOUT) while the intruders' handshakes
    // are pending or failing: a rank that waited for one of them would fail.
    let outs = spawn_ranks(
        ls,
        vec![addrs; w],
        vec![config(); w],
        move |rank, mut ring| {
            let mut buf = data(rank, 1000);
            ring.all_reduce_mean(&mut buf)?;
            Ok(buf)
        },
    );
    let outs: Vec<Vec<f32>> = outs
        .into_iter()
        .enumerate()
        .map(|(r, o)| o.unwrap_or_else(|e| panic!("rank {r} failed despite the intruders: {e}")))
        .collect();
    let inputs: Vec<Vec<f32>> = (0..w).map(|r| data(r, 1000)).collect();
    for (i, got) in outs[0].iter().enumerate() {
        let mean = inputs.iter().map(|x| x[i]).sum::<f32>() / w as f32;
        assert!((got - mean).abs() < 1e-5, "element {i}");
    }
    assert!(outs.iter().all(|o| *o == outs[0]));
    handles
        .into_iter()
        .map(|h| h.join().expect("intruder thread"))
        .collect()
}

/// A connection that claims to be the victim's left neighbour of this generation but
/// answers the challenge with a tag of another key is refused (verdict 1), and the real
/// neighbour's connection is accepted.
#[test]
fn a_wrong_key_is_refused_and_the_ring_forms() {
    let wrong: Intruder = Box::new(|addr, opened| {
        let mut s = dial(addr);
        opened.send(()).unwrap();
        let other = RingKey::derive(Some("another-token"), "test-run");
        claim(&mut s, &hello_bytes(0, 3, 7), |c, a| {
            other.tag(Role::Connector, c, a).to_vec()
        })
    });
    // The same token for another run is another key too.
    let other_run: Intruder = Box::new(|addr, opened| {
        let mut s = dial(addr);
        opened.send(()).unwrap();
        let other = RingKey::derive(Some("test-token"), "another-run");
        claim(&mut s, &hello_bytes(0, 3, 7), |c, a| {
            other.tag(Role::Connector, c, a).to_vec()
        })
    });
    let seen = ring_with_intruders(3, 1, vec![wrong, other_run]);
    for s in seen {
        assert_eq!(s.as_deref(), Ok("verdict 1"), "{s:?}");
    }
}

/// A TCP relay between rank 0 and rank 1 that records what rank 0 sends (its hello and
/// its answer to rank 1's challenge). Returns the relay's address and the recording.
fn recording_relay(to: SocketAddr) -> (SocketAddr, thread::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut from_client, _) = l.accept().unwrap();
        from_client.set_read_timeout(Some(JOIN)).unwrap();
        let mut to_server = dial(to);
        let (mut back_from, mut back_to) = (
            to_server.try_clone().unwrap(),
            from_client.try_clone().unwrap(),
        );
        let back = thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
        let mut recorded = Vec::new();
        let mut buf = [0u8; 64 << 10];
        while let Ok(n) = from_client.read(&mut buf) {
            if n == 0 || to_server.write_all(&buf[..n]).is_err() {
                break;
            }
            if recorded.len() < HELLO_LEN + MAC_LEN {
                recorded.extend_from_slice(&buf[..n]);
            }
        }
        let _ = to_server.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
        recorded.truncate(HELLO_LEN + MAC_LEN);
        recorded
    });
    (addr, h)
}

/// What rank 0 really sent rank 1 in a ring of generation 6 (through a relay), replayed
/// to rank 1 in generation 7 — as recorded, and with the generation rewritten to 7 — is
/// refused: its answer does not fit rank 1's fresh challenge.
#[test]
fn a_hello_replayed_from_an_earlier_generation_is_refused() {
    let (ls, addrs) = listeners(2);
    let (relay, recording) = recording_relay(addrs[1]);
    let old = RingConfig {
        generation: 6,
        ..config()
    };
    let peers = vec![vec![addrs[0], relay], addrs.clone()];
    let outs = spawn_ranks(ls, peers, vec![old.clone(), old], |_, mut ring| {
        ring.barrier()
    });
    assert!(outs.iter().all(Result::is_ok), "{outs:?}");
    let recorded = recording.join().unwrap();
    assert_eq!(
        recorded.len(),
        HELLO_LEN + MAC_LEN,
        "the relay saw the handshake"
    );
    assert_eq!(
        Hello::decode(recorded[..HELLO_LEN].try_into().unwrap()).generation,
        6
    );

    let replay = |rewrite: bool| -> Intruder {
        let mut bytes = recorded.clone();
        if rewrite {
            bytes[16..24].copy_from_slice(&7u64.to_le_bytes());
        }
        Box::new(move |addr, opened| {
            let mut s = dial(addr);
            opened.send(()).unwrap();
            let hello: [u8; HELLO_LEN] = bytes[..HELLO_LEN].try_into().unwrap();
            claim(&mut s, &hello, |_, _| bytes[HELLO_LEN..].to_vec())
        })
    };
    let seen = ring_with_intruders(2, 1, vec![replay(false), replay(true)]);
    for s in seen {
        assert_eq!(s.as_deref(), Ok("verdict 1"), "{s:?}");
    }
}

/// Strangers — one silent, one sending an HTTP request, one an old build's 24-byte hello,
/// one a well-formed hello and then a guessed tag — are all dropped while the real
/// neighbour's connection is accepted at once; the old build is told our version.
#[test]
fn strangers_are_dropped_without_holding_up_the_ring() {
    let silent: Intruder = Box::new(|addr, opened| {
        let mut s = dial(addr);
        opened.send(()).unwrap();
        until_closed(&mut s).map(|b| format!("closed after {} bytes", b.len()))
    });
    let http: Intruder = Box::new(|addr, opened| {
        let mut s = dial(addr);
        opened.send(()).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        until_closed(&mut s).map(|b| format!("closed after {} bytes", b.len()))
    });
    let old_build: Intruder = Box::new(|addr, opened| {
        let mut s = dial(addr);
        opened.send(()).unwrap();
        let mut hello = [0u8; 24];
        hello.copy_from_slice(&hello_bytes(0, 2, 7)[..24]);
        hello[4..8].copy_from_slice(&1u32.to_le_bytes());
        s.write_all(&hello).unwrap();
        let got = until_closed(&mut s)?;
        let version = u32::from_le_bytes(got.get(4..8).ok_or("no hello back")?.try_into().unwrap());
        Ok(format!("told version {version}"))
    });
    let guesser: Intruder = Box::new(|addr, opened| {
        let mut s = dial(addr);
        opened.send(()).unwrap();
        claim(&mut s, &hello_bytes(0, 2, 7), |_, _| vec![0x5a; MAC_LEN])
    });
    let seen = ring_with_intruders(2, 1, vec![silent, http, old_build, guesser]);
    assert_eq!(seen[0].as_deref(), Ok("closed after 0 bytes"), "{seen:?}");
    assert_eq!(seen[1].as_deref(), Ok("closed after 0 bytes"), "{seen:?}");
    assert_eq!(
        seen[2].as_deref(),
        Ok(format!("told version {}", wire::PROTOCOL_VERSION).as_str()),
        "{seen:?}"
    );
    assert_eq!(seen[3].as_deref(), Ok("verdict 1"), "{seen:?}");
}

/// Ranks that hold different keys (a worker given another job's token) fail to form the
/// ring within the deadline, and the authentication failure is named (by whichever rank
/// gets its neighbour's answer first: the other may see that rank give up and close).
#[test]
fn ranks_with_different_keys_refuse_each_other() {
    let (ls, addrs) = listeners(2);
    let other = RingConfig {
        key: RingKey::derive(Some("another-token"), "test-run"),
        ..config()
    };
    let start = Instant::now();
    let outs = spawn_ranks(ls, vec![addrs.clone(); 2], vec![config(), other], |_, _| {
        Ok(())
    });
    assert!(
        start.elapsed() < TIMEOUT + Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(outs.iter().all(Result::is_err), "{outs:?}");
    let named = outs.iter().any(|r| {
        let e = r.as_ref().unwrap_err();
        matches!(e, CollectiveError::Handshake { .. })
            && e.to_string().contains("authentication failed")
    });
    assert!(named, "{outs:?}");
}
