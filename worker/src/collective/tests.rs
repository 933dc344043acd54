//! Tests of the collectives: one thread per rank over 127.0.0.1, every join bounded.

use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use super::*;

/// Socket timeout of the tests.
pub(super) const TIMEOUT: Duration = Duration::from_secs(2);

/// How long a test waits for a rank before declaring a hang.
pub(super) const JOIN: Duration = Duration::from_secs(15);

/// The ring key of the tests' job.
pub(super) fn key() -> RingKey {
    RingKey::derive(Some("test-token"), "test-run")
}

/// Binds `w` listeners on 127.0.0.1:0 and returns them with their addresses.
pub(super) fn listeners(w: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<_> = (0..w)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

/// Runs `f(rank, ring)` on one thread per rank, rank `r` listening on `ls[r]`, knowing the
/// ring addresses `peers[r]`, with configuration `configs[r]`; returns the results in
/// rank order, and panics if a rank does not finish within [`JOIN`].
pub(super) fn spawn_ranks<R, F>(
    ls: Vec<TcpListener>,
    peers: Vec<Vec<SocketAddr>>,
    configs: Vec<RingConfig>,
    f: F,
) -> Vec<Result<R, CollectiveError>>
where
    R: Send + 'static,
    F: Fn(usize, RingCollective) -> Result<R, CollectiveError> + Send + Sync + 'static,
{
    let w = ls.len();
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel();
    let ranks = ls.into_iter().zip(peers).zip(configs).enumerate();
    for (rank, ((listener, addrs), config)) in ranks {
        let (tx, f) = (tx.clone(), f.clone());
        thread::spawn(move || {
            let result = RingCollective::new(rank, w, addrs, listener, config)
                .and_then(|ring| f(rank, ring));
            let _ = tx.send((rank, result));
        });
    }
    let mut out: Vec<Option<Result<R, CollectiveError>>> = (0..w).map(|_| None).collect();
    for _ in 0..w {
        let (rank, result) = rx.recv_timeout(JOIN).expect("a rank hung");
        out[rank] = Some(result);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Runs `f(rank, ring)` on `w` ranks with per-rank generations, one thread each, and
/// returns the results in rank order; panics if a rank does not finish within [`JOIN`].
pub(super) fn run_gens<R, F>(
    gens: &[u64],
    config: RingConfig,
    f: F,
) -> Vec<Result<R, CollectiveError>>
where
    R: Send + 'static,
    F: Fn(usize, RingCollective) -> Result<R, CollectiveError> + Send + Sync + 'static,
{
    let (ls, addrs) = listeners(gens.len());
    let configs = gens
        .iter()
        .map(|&generation| RingConfig {
            generation,
            ..config.clone()
        })
        .collect();
    spawn_ranks(ls, vec![addrs; gens.len()], configs, f)
}

/// [`run_gens`] with generation 7 everywhere, all results unwrapped.
fn run<R, F>(w: usize, config: RingConfig, f: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(usize, RingCollective) -> Result<R, CollectiveError> + Send + Sync + 'static,
{
    run_gens(&vec![7; w], config, f)
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

/// Deterministic values in [-1, 1) for `rank`.
pub(super) fn data(rank: usize, n: usize) -> Vec<f32> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (rank as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

pub(super) fn config() -> RingConfig {
    RingConfig::new(key(), 7, TIMEOUT)
}

/// Mean over ranks: each element within `W·ε·Σ|x_k| / W` of the exact mean (computed in
/// f64), where ε is f32's machine epsilon — W−1 rounded additions and one rounded division,
/// each off by at most ε/2 of a magnitude bounded by Σ|x_k| — and bitwise equal on all ranks.
#[test]
fn all_reduce_mean_is_correct_and_bitwise_identical() {
    for bucket in [DEFAULT_BUCKET_BYTES, 12] {
        for w in 1..=5 {
            for n in [0usize, 1, 3, 7, 1000, 1_000_003] {
                if bucket == 12 && n > 1000 {
                    continue;
                }
                let outs = run(
                    w,
                    config().with_bucket_bytes(bucket),
                    move |rank, mut ring| {
                        let mut buf = data(rank, n);
                        ring.all_reduce_mean(&mut buf)?;
                        Ok(buf)
                    },
                );
                let inputs: Vec<Vec<f32>> = (0..w).map(|r| data(r, n)).collect();
                for i in 0..n {
                    let exact = inputs.iter().map(|x| x[i] as f64).sum::<f64>() / w as f64;
                    let abs = inputs.iter().map(|x| (x[i] as f64).abs()).sum::<f64>();
                    let tol = f32::EPSILON as f64 * abs;
                    let got = outs[0][i] as f64;
                    assert!(
                        (got - exact).abs() <= tol,
                        "w={w} n={n} i={i}: {got} vs {exact}"
                    );
                }
                for (r, out) in outs.iter().enumerate() {
                    assert_eq!(out.len(), n);
                    let same = out
                        .iter()
                        .zip(&outs[0])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "w={w} n={n}: rank {r} differs bitwise from rank 0");
                }
            }
        }
    }
}

#[test]
fn local_collective_is_identity() {
    let mut c = LocalCollective::new();
    let mut buf = data(0, 5);
    let orig = buf.clone();
    c.all_reduce_mean(&mut buf).unwrap();
    assert_eq!(buf, orig);
    let mut s = [1.5f64, -2.0];
    c.all_reduce_sum_f64(&mut s).unwrap();
    assert_eq!(s, [1.5, -2.0]);
    assert_eq!(c.all_gather(&orig).unwrap(), orig);
    c.broadcast(&mut buf, 0).unwrap();
    assert!(c.broadcast(&mut buf, 1).is_err());
    c.barrier().unwrap();
    assert_eq!((c.rank(), c.world_size()), (0, 1));
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for w in 1..=4 {
        for n in [0usize, 1, 5, 1000] {
            let outs = run(w, config(), move |rank, mut ring| {
                ring.all_gather(&data(rank, n))
            });
            let expect: Vec<f32> = (0..w).flat_map(|r| data(r, n)).collect();
            assert!(outs.iter().all(|o| *o == expect), "w={w} n={n}");
        }
    }
}

#[test]
fn broadcast_copies_root_everywhere() {
    for w in 1..=4 {
        for root in 0..w {
            for n in [0usize, 1, 1000, 300_001] {
                let cfg = config().with_bucket_bytes(64 << 10);
                let outs = run(w, cfg, move |rank, mut ring| {
                    let mut buf = data(rank, n);
                    ring.broadcast(&mut buf, root)?;
                    Ok(buf)
                });
                let expect = data(root, n);
                assert!(outs.iter().all(|o| *o == expect), "w={w} root={root} n={n}");
            }
        }
    }
}

#[test]
fn broadcast_bytes_copies_any_length_exactly() {
    for w in [1, 3] {
        for n in [0usize, 1, 70_000] {
            let outs = run(w, config(), move |rank, mut ring| {
                let mut buf: Vec<u8> = if rank == w - 1 {
                    (0..n).map(|i| (i * 31 % 256) as u8).collect()
                } else {
                    vec![9; 5]
                };
                ring.broadcast_bytes(&mut buf, w - 1)?;
                Ok(buf)
            });
            let expect: Vec<u8> = (0..n).map(|i| (i * 31 % 256) as u8).collect();
            assert!(outs.iter().all(|o| *o == expect), "w={w} n={n}");
        }
    }
}

#[test]
fn f64_sums_and_barrier_and_mixed_sequence() {
    for w in 1..=5 {
        let outs = run(w, config(), move |rank, mut ring| {
            let mut s = vec![rank as f64 + 0.25, 1.0, -(rank as f64) * 1e-3];
            ring.all_reduce_sum_f64(&mut s)?;
            ring.barrier()?;
            let mut empty: [f64; 0] = [];
            ring.all_reduce_sum_f64(&mut empty)?;
            // A sequence of different operations on the same ring.
            let mut g = data(rank, 33);
            ring.all_reduce_mean(&mut g)?;
            let gathered = ring.all_gather(&g[..4])?;
            ring.broadcast(&mut g, w - 1)?;
            ring.barrier()?;
            Ok((s, g, gathered))
        });
        let wf = w as f64;
        let expect = [
            wf * 0.25 + wf * (wf - 1.0) / 2.0,
            wf,
            -1e-3 * wf * (wf - 1.0) / 2.0,
        ];
        for (s, g, gathered) in &outs {
            for (a, b) in s.iter().zip(expect) {
                assert!((a - b).abs() < 1e-12, "w={w}: {a} vs {b}");
            }
            assert_eq!(
                s.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                outs[0].0.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(g, &outs[0].1);
            assert_eq!(gathered.len(), 4 * w);
            assert!(gathered.chunks(4).all(|c| c == &outs[0].1[..4]));
        }
    }
}

/// Asserts that every rank but `skip` failed within the deadline.
fn assert_all_failed(results: &[Result<Duration, CollectiveError>], skip: usize) {
    for (rank, r) in results.iter().enumerate() {
        if rank == skip {
            continue;
        }
        match r {
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("all_reduce_mean") && msg.contains("rank "),
                    "rank {rank}: {msg}"
                );
            }
            Ok(t) => panic!("rank {rank} succeeded after {t:?}"),
        }
    }
}

#[test]
fn peer_dropping_sockets_mid_collective_fails_fast() {
    peer_dropping_sockets_fails_fast(config());
}

/// A rank that drops its ring after a barrier makes its neighbours' all-reduce fail fast,
/// naming it (with `config`, plain or TLS).
pub(super) fn peer_dropping_sockets_fails_fast(config: RingConfig) {
    let start = Instant::now();
    let results = run_gens(&[7; 4], config, |rank, mut ring| {
        ring.barrier()?;
        if rank == 2 {
            // Handshake and barrier done: drop both sockets.
            drop(ring);
            return Ok(Duration::ZERO);
        }
        let t = Instant::now();
        let mut buf = data(rank, 1_000_003);
        ring.all_reduce_mean(&mut buf)?;
        Ok(t.elapsed())
    });
    assert_all_failed(&results, 2);
    // A neighbour of rank 2 names it (which one sees it first is a race).
    let names_2 = [1, 3].iter().any(|&r| {
        results[r]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("rank 2")
    });
    assert!(names_2, "{results:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn silent_peer_times_out_and_ring_stays_broken() {
    silent_peer_times_out(config());
}

/// A rank that keeps its sockets open but never calls the collective makes the others
/// time out within their deadlines, and their ring stays broken (with `config`, plain or
/// TLS).
pub(super) fn silent_peer_times_out(config: RingConfig) {
    let start = Instant::now();
    let done = Arc::new(Barrier::new(3));
    let results = run_gens(&[7; 3], config, move |rank, mut ring| {
        if rank == 2 {
            // Keeps its sockets open but never calls the collective, until the others failed.
            done.wait();
            return Ok(Duration::ZERO);
        }
        let t = Instant::now();
        let mut buf = data(rank, 1_000_003);
        let first = ring.all_reduce_mean(&mut buf);
        let elapsed = t.elapsed();
        let again = ring.barrier();
        done.wait();
        assert!(
            elapsed < TIMEOUT * 3 + Duration::from_secs(2),
            "rank {rank} took {elapsed:?}"
        );
        assert!(ring.is_broken());
        let again = again.unwrap_err();
        assert!(
            matches!(
                again,
                CollectiveError::Broken {
                    op: Op::Barrier,
                    ..
                }
            ),
            "{again}"
        );
        first.map(|()| elapsed)
    });
    let timed_out = results
        .iter()
        .filter(|r| matches!(r, Err(CollectiveError::Timeout { .. })))
        .count();
    assert_all_failed(&results, 2);
    assert!(timed_out >= 1, "{results:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
}

/// Two ranks of different generations (both holding the key) refuse each other: the
/// newer one drops the older one's connection as a leftover of a failed ring, and the
/// older one refuses the newer one's hello as a generation mismatch.
#[test]
fn generation_mismatch_is_refused() {
    let results = run_gens(&[1, 2], config(), |_, _| Ok(()));
    assert!(results.iter().all(Result::is_err), "{results:?}");
    // Whichever rank completes its exchange first names the mismatch (the other may see
    // that rank give up and close first).
    let named = results.iter().any(|r| {
        let e = r.as_ref().unwrap_err();
        matches!(e, CollectiveError::Handshake { .. })
            && e.to_string().contains("generation mismatch")
    });
    assert!(named, "{results:?}");
}

#[test]
fn length_mismatch_is_detected() {
    let results = run_gens(&[7; 2], config(), |rank, mut ring| {
        ring.all_reduce_mean(&mut vec![0.0; 10 + rank])
    });
    assert!(results.iter().all(Result::is_err));
    let mismatch = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .find(|e| matches!(e, CollectiveError::Mismatch { .. }));
    let e = mismatch.expect("one rank reports a mismatch").to_string();
    assert!(e.contains("elements"), "{e}");
}

#[test]
fn invalid_arguments_are_refused() {
    let (mut ls, addrs) = listeners(2);
    let cfg = config();
    let e = RingCollective::new(2, 2, addrs.clone(), ls.pop().unwrap(), cfg.clone()).unwrap_err();
    assert!(matches!(e, CollectiveError::InvalidArgument { .. }), "{e}");
    let e = RingCollective::new(0, 3, addrs, ls.pop().unwrap(), cfg.clone()).unwrap_err();
    assert!(matches!(e, CollectiveError::InvalidArgument { .. }), "{e}");
    let (mut ls, addrs) = listeners(1);
    let mut solo = RingCollective::new(0, 1, addrs, ls.pop().unwrap(), cfg).unwrap();
    assert!(matches!(
        solo.broadcast(&mut [1.0], 1),
        Err(CollectiveError::InvalidArgument { .. })
    ));
    assert_eq!(solo.all_gather(&[1.0, 2.0]).unwrap(), vec![1.0, 2.0]);
}

#[test]
fn unreachable_peer_times_out_at_connect() {
    let (mut ls, mut addrs) = listeners(2);
    // Rank 1 never starts: its port is closed, so rank 0's connects are refused.
    drop(ls.pop());
    addrs[1] = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let start = Instant::now();
    let e = RingCollective::new(0, 2, addrs, ls.pop().unwrap(), config()).unwrap_err();
    assert!(
        start.elapsed() < TIMEOUT + Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    assert!(e.to_string().contains("rank 1"), "{e}");
}

/// Runs the loopback benchmark (slow; `cargo test --release -- --ignored bench`).
/// `SCFM_BENCH_MB` sets the buffer size in MB (default 64).
#[test]
#[ignore]
fn bench_bus_bandwidth_loopback() {
    let mb: usize = std::env::var("SCFM_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let rows = bench_bus_bandwidth(&[2, 4], &[mb << 20]);
    for row in &rows {
        assert!(row.error.is_none(), "{row:?}");
        assert!(
            row.busbw > 0.0 && row.tcp_bound > 0.0 && row.tcp_concurrent > 0.0,
            "{row:?}"
        );
        eprintln!(
            "W={} {} MiB: {:.1} ms  algbw {:.2} GB/s  busbw {:.2} GB/s  tcp bound {:.2} GB/s \
             ({:.2} GB/s per stream with {} streams at once)",
            row.world_size,
            row.bytes >> 20,
            row.seconds * 1e3,
            row.algbw / 1e9,
            row.busbw / 1e9,
            row.tcp_bound / 1e9,
            row.tcp_concurrent / 1e9,
            row.world_size
        );
    }
}
