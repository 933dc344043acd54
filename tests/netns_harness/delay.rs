//! A delay line in user space: latency, jitter and reordering of what one host sends,
//! on any kernel with TUN devices (this one has no `tc netem`).
//!
//! In host `i`'s namespace a TUN device [`DEVICE`] takes every packet the host itself
//! sends to the subnet: a policy rule sends locally made packets (`iif lo`) to a routing
//! table whose subnet route is the TUN device. A thread of the test process, which
//! entered the namespace (`setns`) to make the device, reads each packet, holds it for
//! its delay (`delay ± jitter`, uniform, as netem's default; a `reorder` fraction goes
//! at once, as netem's `reorder`) and writes it back into the device. The kernel then
//! forwards it out of `eth0` by the main table, where the bandwidth cap (`tbf`), packet
//! loss and partitions apply as before. What the host receives is not delayed here: a
//! delay on every host delays every link both ways.
//!
//! Stopping the line (or dropping it) closes the device, which takes its route with it;
//! the rule then finds nothing and the host sends on `eth0` directly again.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The TUN device of a delay line, in its host's namespace.
pub const DEVICE: &str = "dly0";
/// The routing table that sends the host's own packets into [`DEVICE`].
pub const TABLE: &str = "101";
/// The preference of the policy rule that selects [`TABLE`].
pub const RULE_PREF: &str = "100";
/// Packets held at most (netem's default limit is 1,000); beyond it they are dropped.
const LIMIT: usize = 10_000;
/// The longest the thread sleeps before it looks at its stop flag.
const TICK: Duration = Duration::from_millis(20);

/// What a delay line does to each packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Mean delay, ms.
    pub delay_ms: u32,
    /// Each packet's delay is uniform in `delay ± jitter` (clamped at 0), ms.
    pub jitter_ms: u32,
    /// This percentage of the packets, picked at random, is sent at once.
    pub reorder_pct: u32,
}

/// What a delay line has done so far.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets passed on.
    pub passed: AtomicU64,
    /// Packets passed on after a packet that came in later than them.
    pub reordered: AtomicU64,
    /// Packets dropped because [`LIMIT`] were held, or the device refused them.
    pub dropped: AtomicU64,
}

/// A running delay line (see the module documentation); dropping it stops it.
#[derive(Debug)]
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

/// Why a delay line could not start.
#[derive(Debug)]
pub enum StartError {
    /// This machine has no TUN devices (no `/dev/net/tun`, or not allowed).
    Unsupported(String),
    /// Another failure.
    Failed(String),
}

impl DelayLine {
    /// Makes [`DEVICE`] in network namespace `ns`, enables forwarding there, and starts passing packets with `shape`; random
    /// draws come from `seed`. Routing the host's packets into it is the caller's part.
    pub fn start(ns: &str, shape: Shape, seed: u64) -> Result<DelayLine, StartError> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let (ns2, stop2, counters2) = (ns.to_string(), stop.clone(), counters.clone());
        let thread = std::thread::Builder::new()
            .name(format!("delay-line {ns}"))
            .spawn(move || match open_device(&ns2) {
                Ok(fd) => {
                    let _ = tx.send(Ok(()));
                    pass_packets(fd, shape, seed, &stop2, &counters2);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|e| StartError::Failed(format!("cannot start a thread: {e}")))?;
        let started = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| {
                Err(StartError::Failed(
                    "the delay line did not start in 10 s".into(),
                ))
            });
        let line = DelayLine {
            stop,
            thread: Some(thread),
            counters,
        };
        started.map(|()| line)
    }

    /// What it has done so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The last OS error, as text.
fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Moves the calling thread into network namespace `ns` (named under `/run/netns`, as
/// `ip netns` makes them). Only that thread moves: sockets it then makes belong to `ns`,
/// whichever thread uses them later.
pub fn enter_namespace(ns: &str) -> Result<(), String> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: a valid namespace descriptor; setns changes the calling thread only.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(os_error(&format!("setns {path}")));
    }
    Ok(())
}

/// Moves this thread into namespace `ns`, makes the TUN device there and sets
/// the namespace's forwarding sysctls; returns the device (non-blocking).
fn open_device(ns: &str) -> Result<OwnedFd, StartError> {
    enter_namespace(ns).map_err(StartError::Failed)?;
    let path = CString::new("/dev/net/tun").expect("no NUL");
    // SAFETY: a NUL-terminated path.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(StartError::Unsupported(os_error("open /dev/net/tun")));
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `ifreq` is plain data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(DEVICE.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } != 0 {
        return Err(StartError::Unsupported(os_error("ioctl TUNSETIFF")));
    }
    // Packets written back come in from the device with the host's own source address:
    // forward them, and accept a local source there (no reverse-path filter).
    for (key, value) in [
        ("ipv4/conf/all/rp_filter", "0"),
        (&format!("ipv4/conf/{DEVICE}/rp_filter"), "0"),
        (&format!("ipv4/conf/{DEVICE}/accept_local"), "1"),
        ("ipv4/ip_forward", "1"),
    ] {
        // /proc/sys/net is the namespace of the thread that opens it: this one's.
        let file = format!("/proc/sys/net/{key}");
        std::fs::write(&file, value)
            .map_err(|e| StartError::Failed(format!("write {value} to {file}: {e}")))?;
    }
    Ok(fd)
}

/// xorshift64*: the line's random draws, reproducible from its seed.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// One packet's delay under `shape`.
fn draw_delay(shape: Shape, rng: &mut u64) -> Duration {
    if shape.reorder_pct > 0 && next_random(rng) % 100 < u64::from(shape.reorder_pct) {
        return Duration::ZERO;
    }
    let mean = i64::from(shape.delay_ms) * 1000;
    let jitter = i64::from(shape.jitter_ms) * 1000;
    let offset = if jitter > 0 {
        (next_random(rng) % (2 * jitter as u64 + 1)) as i64 - jitter
    } else {
        0
    };
    Duration::from_micros((mean + offset).max(0) as u64)
}

/// A held packet: due time, arrival number, bytes (ordered by time, then arrival).
type Held = Reverse<(Instant, u64, Vec<u8>)>;

/// The thread's loop: read what the host sends, release each packet when it is due,
/// until `stop`.
fn pass_packets(fd: OwnedFd, shape: Shape, seed: u64, stop: &AtomicBool, counters: &Counters) {
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut held: BinaryHeap<Held> = BinaryHeap::new();
    let mut arrivals = 0u64;
    let mut latest_released: Option<u64> = None;
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while held.peek().is_some_and(|Reverse((due, _, _))| *due <= now) {
            let Reverse((_, n, packet)) = held.pop().expect("peeked");
            // SAFETY: writes `packet.len()` bytes from a live buffer.
            let w = unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
            if w < 0 {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            counters.passed.fetch_add(1, Ordering::Relaxed);
            match latest_released {
                Some(l) if n < l => {
                    counters.reordered.fetch_add(1, Ordering::Relaxed);
                }
                _ => latest_released = Some(n),
            }
        }
        let wait = held
            .peek()
            .map_or(TICK, |Reverse((due, _, _))| {
                due.saturating_duration_since(now)
            })
            .min(TICK);
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up, so that a packet is never released early.
        let ms = wait.as_micros().div_ceil(1000) as libc::c_int;
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        loop {
            // SAFETY: reads at most `buf.len()` bytes into a live buffer.
            let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r <= 0 {
                break; // EAGAIN: nothing more for now
            }
            if held.len() >= LIMIT {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let due = Instant::now() + draw_delay(shape, &mut rng);
            held.push(Reverse((due, arrivals, buf[..r as usize].to_vec())));
            arrivals += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_uniform_around_the_mean_and_reordering_sends_at_once() {
        let mut rng = 7;
        let shape = Shape {
            delay_ms: 50,
            jitter_ms: 10,
            reorder_pct: 0,
        };
        let d: Vec<Duration> = (0..10_000).map(|_| draw_delay(shape, &mut rng)).collect();
        assert!(d.iter().all(|d| (40_000..=60_000).contains(&d.as_micros())));
        let mean = d.iter().map(Duration::as_secs_f64).sum::<f64>() / d.len() as f64;
        assert!((mean - 0.050).abs() < 0.0005, "{mean}");
        let reorder = Shape {
            reorder_pct: 25,
            ..shape
        };
        let at_once = (0..10_000)
            .filter(|_| draw_delay(reorder, &mut rng).is_zero())
            .count();
        assert!((2_300..=2_700).contains(&at_once), "{at_once}");
        let none = Shape {
            delay_ms: 5,
            jitter_ms: 0,
            reorder_pct: 0,
        };
        assert_eq!(draw_delay(none, &mut rng), Duration::from_millis(5));
    }
}
