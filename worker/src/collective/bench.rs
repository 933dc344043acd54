//! Bus-bandwidth benchmark of the ring all-reduce over loopback, reported as nccl-tests
//! does: `algbw = bytes / time` and `busbw = algbw * 2 (n - 1) / n`, next to two loopback
//! TCP bounds measured in the same run: one large socket copy between two threads (the
//! single-stream bound), and the per-stream throughput of W such copies at once (the
//! concurrent bound: on a ring all W ranks send and receive at the same time, and on
//! loopback all W "links" share the same CPUs and memory bus). [`bench_tls_cost`] puts the
//! ring over TLS next to the plain ring.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use super::{Collective, CollectiveError, RingCollective, RingConfig, RingKey, RingTls};

/// One measurement of [`bench_bus_bandwidth`].
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    /// Number of ranks (one thread each, in this process).
    pub world_size: usize,
    /// Buffer size in bytes (f32 elements × 4).
    pub bytes: usize,
    /// Timed all-reduce calls (after one warm-up call).
    pub iterations: usize,
    /// Seconds per all-reduce (the slowest rank's average).
    pub seconds: f64,
    /// Algorithm bandwidth, bytes per second: `bytes / seconds`.
    pub algbw: f64,
    /// Bus bandwidth, bytes per second: `algbw * 2 (n - 1) / n`.
    pub busbw: f64,
    /// Loopback TCP bound, bytes per second, measured once per call of the benchmark (best
    /// of 3): one socket stream between two threads, nothing else running.
    pub tcp_bound: f64,
    /// Concurrent loopback TCP bound, bytes per second per stream: `world_size` socket
    /// streams (a writer and a reader thread each) copying at the same time, measured once
    /// per world size (best of 3); 0 when it failed.
    pub tcp_concurrent: f64,
    /// Why the measurement failed, if it did (the numbers are then 0).
    pub error: Option<String>,
}

/// Bytes copied through each loopback socket to measure a TCP bound.
const TCP_BOUND_BYTES: usize = 256 << 20;

/// Each TCP bound is the best of this many measurements (a bound, and the machine may be
/// shared).
const TCP_BOUND_TRIES: usize = 3;

/// Best per-stream throughput of [`loopback_tcp_bound`] over [`TCP_BOUND_TRIES`] tries
/// (0 when all failed).
fn best_tcp_bound(streams: usize) -> f64 {
    (0..TCP_BOUND_TRIES)
        .filter_map(|_| loopback_tcp_bound(streams, TCP_BOUND_BYTES).ok())
        .fold(0.0, f64::max)
}

/// Runs ring all-reduce (mean, default bucket size) over loopback for every world size and
/// buffer size (rounded down to whole f32 elements) and reports algorithm and bus
/// bandwidth next to the two loopback TCP bounds. Prints nothing.
pub fn bench_bus_bandwidth(world_sizes: &[usize], sizes_bytes: &[usize]) -> Vec<BenchRow> {
    let tcp_bound = best_tcp_bound(1);
    let mut rows = Vec::new();
    for &w in world_sizes {
        let tcp_concurrent = best_tcp_bound(w);
        for &bytes in sizes_bytes {
            let n = bytes / size_of::<f32>();
            let iterations = ((512usize << 20) / bytes.max(1)).clamp(3, 50);
            let mut row = BenchRow {
                world_size: w,
                bytes: n * size_of::<f32>(),
                iterations,
                seconds: 0.0,
                algbw: 0.0,
                busbw: 0.0,
                tcp_bound,
                tcp_concurrent,
                error: None,
            };
            match time_all_reduce(w, n, iterations, None) {
                Ok(seconds) => {
                    row.seconds = seconds;
                    row.algbw = row.bytes as f64 / seconds;
                    row.busbw = row.algbw * 2.0 * (w as f64 - 1.0) / w as f64;
                }
                Err(e) => row.error = Some(e),
            }
            rows.push(row);
        }
    }
    rows
}

/// One round of [`bench_tls_cost`]: seconds per all-reduce (the slowest rank's average).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TlsCostRound {
    /// Over the plain ring.
    pub plain: f64,
    /// Over the ring with TLS.
    pub tls: f64,
}

/// The cost of TLS on the ring: all-reduce (mean, default bucket size) of `bytes` (rounded
/// down to whole f32) over `world` ranks on loopback, over the plain ring and over the
/// ring with `tls`, in `rounds` rounds that time both with `iterations` all-reduces each
/// (after a warm-up call), the plain ring first in even rounds and last in odd ones.
/// Prints nothing.
pub fn bench_tls_cost(
    world: usize,
    bytes: usize,
    iterations: usize,
    rounds: usize,
    tls: &RingTls,
) -> Result<Vec<TlsCostRound>, String> {
    let n = bytes / size_of::<f32>();
    let mut out = Vec::new();
    for round in 0..rounds {
        let (mut plain, mut over_tls) = (0.0, 0.0);
        for tls_now in [round % 2 == 1, round % 2 == 0] {
            if tls_now {
                over_tls = time_all_reduce(world, n, iterations, Some(tls.clone()))?;
            } else {
                plain = time_all_reduce(world, n, iterations, None)?;
            }
        }
        out.push(TlsCostRound {
            plain,
            tls: over_tls,
        });
    }
    Ok(out)
}

/// Seconds per all-reduce of `n` f32 over `w` ranks (over TLS with `tls`), the slowest
/// rank's average.
fn time_all_reduce(
    w: usize,
    n: usize,
    iterations: usize,
    tls: Option<RingTls>,
) -> Result<f64, String> {
    if w == 0 {
        return Err("world size 0".into());
    }
    let listeners = (0..w)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bind: {e}"))?;
    let peers = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<Vec<SocketAddr>, _>>()
        .map_err(|e| format!("local_addr: {e}"))?;
    let (tx, rx) = mpsc::channel();
    for (rank, listener) in listeners.into_iter().enumerate() {
        let (tx, peers, tls) = (tx.clone(), peers.clone(), tls.clone());
        thread::spawn(move || {
            let run = || -> Result<f64, CollectiveError> {
                let key = RingKey::derive(None, "bench-allreduce");
                let config = RingConfig::new(key, 0, Duration::from_secs(60)).with_tls(tls);
                let mut ring = RingCollective::new(rank, w, peers, listener, config)?;
                let mut buf = vec![1.0f32; n];
                ring.all_reduce_mean(&mut buf)?;
                ring.barrier()?;
                let start = Instant::now();
                for _ in 0..iterations {
                    ring.all_reduce_mean(&mut buf)?;
                }
                ring.barrier()?;
                Ok(start.elapsed().as_secs_f64() / iterations as f64)
            };
            let _ = tx.send(run().map_err(|e| format!("rank {rank}: {e}")));
        });
    }
    drop(tx);
    let mut slowest = 0.0f64;
    for _ in 0..w {
        let seconds = rx
            .recv_timeout(Duration::from_secs(600))
            .map_err(|e| format!("benchmark rank did not finish: {e}"))??;
        slowest = slowest.max(seconds);
    }
    Ok(slowest)
}

/// Bytes per second per stream of `streams` loopback socket streams copying `total` bytes
/// each at the same time (a writer and a reader thread per stream, all released together):
/// all bytes over the time until the last reader is done, divided by `streams`.
/// `streams = 1` is the single-stream bound. Streams 0 measures nothing (returns 0).
fn loopback_tcp_bound(streams: usize, total: usize) -> std::io::Result<f64> {
    const BLOCK: usize = 4 << 20;
    let timeout = Some(Duration::from_secs(60));
    let mut pairs = Vec::new();
    for _ in 0..streams {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let tx = TcpStream::connect(listener.local_addr()?)?;
        let (rx, _) = listener.accept()?;
        for s in [&tx, &rx] {
            s.set_nodelay(true)?;
            s.set_write_timeout(timeout)?;
            s.set_read_timeout(timeout)?;
        }
        pairs.push((tx, rx));
    }
    let start = Arc::new(Barrier::new(2 * streams + 1));
    let mut threads = Vec::new();
    for (mut tx, mut rx) in pairs {
        let go = start.clone();
        threads.push(thread::spawn(move || -> std::io::Result<usize> {
            let block = vec![0x5au8; BLOCK];
            go.wait();
            let mut left = total;
            while left > 0 {
                let k = left.min(BLOCK);
                tx.write_all(&block[..k])?;
                left -= k;
            }
            Ok(0)
        }));
        let go = start.clone();
        threads.push(thread::spawn(move || -> std::io::Result<usize> {
            let mut block = vec![0u8; BLOCK];
            go.wait();
            let mut got = 0;
            while got < total {
                match rx.read(&mut block)? {
                    0 => break,
                    k => got += k,
                }
            }
            Ok(got)
        }));
    }
    start.wait();
    let t = Instant::now();
    let mut got = 0;
    for h in threads {
        got += h
            .join()
            .map_err(|_| std::io::Error::other("copy thread panicked"))??;
    }
    let seconds = t.elapsed().as_secs_f64();
    Ok(got as f64 / seconds / streams.max(1) as f64)
}
