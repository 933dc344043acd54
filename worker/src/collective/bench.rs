//! Bus-bandwidth benchmark of the ring all-reduce over loopback, reported as nccl-tests
//! does: `algbw = bytes / time` and `busbw = algbw * 2 (n - 1) / n`, next to the loopback
//! TCP bound (one large socket copy between two threads) measured in the same run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::{Collective, CollectiveError, RingCollective, RingConfig};

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
    /// Loopback TCP bound, bytes per second, measured once per call of the benchmark.
    pub tcp_bound: f64,
    /// Why the measurement failed, if it did (the numbers are then 0).
    pub error: Option<String>,
}

/// Bytes copied through one loopback socket to measure the TCP bound.
const TCP_BOUND_BYTES: usize = 256 << 20;

/// Runs ring all-reduce (mean, default bucket size) over loopback for every world size and
/// buffer size (rounded down to whole f32 elements) and reports algorithm and bus
/// bandwidth next to the loopback TCP bound. Prints nothing.
pub fn bench_bus_bandwidth(world_sizes: &[usize], sizes_bytes: &[usize]) -> Vec<BenchRow> {
    let tcp_bound = loopback_tcp_bound(TCP_BOUND_BYTES).unwrap_or(0.0);
    let mut rows = Vec::new();
    for &w in world_sizes {
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
                error: None,
            };
            match time_all_reduce(w, n, iterations) {
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

/// Seconds per all-reduce of `n` f32 over `w` ranks, the slowest rank's average.
fn time_all_reduce(w: usize, n: usize, iterations: usize) -> Result<f64, String> {
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
        let (tx, peers) = (tx.clone(), peers.clone());
        thread::spawn(move || {
            let run = || -> Result<f64, CollectiveError> {
                let config = RingConfig::new(0, Duration::from_secs(60));
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

/// Bytes per second of one `total`-byte copy through a loopback socket between two threads.
fn loopback_tcp_bound(total: usize) -> std::io::Result<f64> {
    const BLOCK: usize = 4 << 20;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let writer = thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_write_timeout(Some(Duration::from_secs(60)))?;
        let block = vec![0x5au8; BLOCK];
        let mut left = total;
        while left > 0 {
            let k = left.min(BLOCK);
            s.write_all(&block[..k])?;
            left -= k;
        }
        Ok(())
    });
    let (mut s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut block = vec![0u8; BLOCK];
    let mut got = 0;
    let start = Instant::now();
    while got < total {
        match s.read(&mut block)? {
            0 => break,
            k => got += k,
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    writer
        .join()
        .map_err(|_| std::io::Error::other("writer thread panicked"))??;
    Ok(got as f64 / seconds)
}
