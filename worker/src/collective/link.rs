//! The transport of one ring rank: the socket to the right neighbour, written by the
//! calling thread, and the socket from the left neighbour, read by a receiver thread up to
//! [`POOL`] messages ahead into reused buffers. Sends and receives therefore overlap, and
//! two neighbours sending large chunks at the same time cannot deadlock.
//!
//! Deadlines: every socket write is bounded by the remaining time of its ring step, the
//! wait for every received message likewise, and every socket read by a backstop of
//! `(POOL + 1)` timeouts (reads run ahead of the step they belong to).
//!
//! Both connections are [`RingStream`]s: plain TCP, or TLS over it when the ring's
//! configuration has TLS settings (`super::tls`).

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::handshake::{self, Me};
use super::plan::{Action, Step};
use super::ring::RingConfig;
use super::tls::RingStream;
use super::wire::{self, Elem, HEADER_LEN, Header};
use super::{CollectiveError, Op};

/// Receive buffers in flight (read-ahead depth of the receiver thread).
const POOL: usize = 2;

/// Messages up to this payload size are written with their header in one `write`.
const SMALL_MSG: usize = 64 << 10;

/// A neighbour: its rank and listening address.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    pub rank: usize,
    pub addr: SocketAddr,
}

impl Peer {
    /// Turns an I/O error with this peer into a [`CollectiveError`].
    pub(super) fn err(&self, op: Op, after: Duration, e: io::Error) -> CollectiveError {
        let (peer, addr) = (self.rank, self.addr);
        if wire::is_timeout(&e) {
            CollectiveError::Timeout {
                peer,
                addr,
                op,
                after,
            }
        } else {
            CollectiveError::Io {
                peer,
                addr,
                op,
                source: e,
            }
        }
    }
}

/// A request to the receiver thread: read the next message, which must match `expect`.
struct RecvReq {
    expect: Header,
    buf: Vec<u64>,
}

type RecvResult = Result<Vec<u64>, CollectiveError>;

/// The two sockets of one rank and the receiver thread.
pub(super) struct Link {
    left: Peer,
    right: Peer,
    timeout: Duration,
    to_right: RingStream,
    /// The socket of the connection from the left neighbour, kept to shut it down; the
    /// receiver thread owns the connection.
    from_left: TcpStream,
    requests: Option<Sender<RecvReq>>,
    results: Receiver<RecvResult>,
    thread: Option<JoinHandle<()>>,
    pool: Vec<Vec<u64>>,
    scratch: Vec<u8>,
}

impl Link {
    /// Connects to the right neighbour and accepts the left one at the same time, each
    /// connection authenticated by the handshake of [`handshake`] (inside TLS when
    /// `config.tls` is set), and starts the receiver thread.
    pub(super) fn connect(
        rank: usize,
        world: usize,
        peers: &[SocketAddr],
        listener: &TcpListener,
        config: &RingConfig,
    ) -> Result<Link, CollectiveError> {
        let (op, t) = (Op::Handshake, config.timeout);
        let deadline = Instant::now() + t;
        let right = Peer {
            rank: (rank + 1) % world,
            addr: peers[(rank + 1) % world],
        };
        let left = Peer {
            rank: (rank + world - 1) % world,
            addr: peers[(rank + world - 1) % world],
        };
        let me = Me {
            rank,
            world,
            generation: config.generation,
        };
        // Both sides at once: every rank's connection to its right neighbour completes
        // only once that neighbour answers on its accepting side.
        let cancel = AtomicBool::new(false);
        let (to_right, from_left) = thread::scope(|scope| {
            let accepting = thread::Builder::new()
                .name(format!("ring-accept-{rank}"))
                .spawn_scoped(scope, || {
                    handshake::accept_left(listener, me, left, config, deadline, &cancel)
                })
                .map_err(|e| left.err(op, t, e))?;
            let to_right = handshake::connect_right(me, right, config, deadline);
            if to_right.is_err() {
                cancel.store(true, Ordering::Relaxed);
            }
            let from_left = accepting.join().unwrap_or_else(|_| {
                Err(left.err(op, t, io::Error::other("the accepting thread panicked")))
            });
            let refused = |e: &CollectiveError| matches!(e, CollectiveError::Handshake { .. });
            match (to_right, from_left) {
                (Ok(r), Ok(l)) => Ok((r, l)),
                (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
                // Both failed: a refused handshake says more than the other side giving up.
                (Err(r), Err(l)) => Err(if !refused(&r) && refused(&l) { l } else { r }),
            }
        })?;

        if config.tls.is_some() {
            tracing::info!(
                rank,
                generation = config.generation,
                "ring: {} to rank {} and from rank {}",
                to_right.describe(),
                right.rank,
                left.rank
            );
        }
        let reader = from_left;
        let from_left = reader.tcp().try_clone().map_err(|e| left.err(op, t, e))?;
        let (req_tx, req_rx) = mpsc::channel();
        let (res_tx, res_rx) = mpsc::channel();
        let backstop = t * (POOL as u32 + 1);
        let thread = thread::Builder::new()
            .name(format!("ring-recv-{rank}"))
            .spawn(move || receive_loop(reader, left, backstop, req_rx, res_tx))
            .map_err(|e| left.err(op, t, e))?;
        Ok(Link {
            left,
            right,
            timeout: t,
            to_right,
            from_left,
            requests: Some(req_tx),
            results: res_rx,
            thread: Some(thread),
            pool: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Runs `steps` on `buf`. `head` carries the operation, sequence number and arguments.
    pub(super) fn execute<T: Elem>(
        &mut self,
        head: Header,
        buf: &mut [T],
        steps: &[Step],
        world: usize,
    ) -> Result<(), CollectiveError> {
        let size = size_of::<T>();
        let mut recvs = steps
            .iter()
            .filter_map(|s| s.recv.as_ref())
            .map(|(r, _)| r.len() * size)
            .enumerate();
        for _ in 0..POOL {
            let Some((i, len)) = recvs.next() else { break };
            let words = self.pool.pop().unwrap_or_default();
            self.post(
                Header {
                    msg: i as u32,
                    len: len as u64,
                    ..head
                },
                words,
            )?;
        }
        let mut sent = 0u32;
        for step in steps {
            let deadline = Instant::now() + self.timeout;
            if let Some(range) = &step.send {
                let h = Header {
                    msg: sent,
                    len: (range.len() * size) as u64,
                    ..head
                };
                self.send(&h, &buf[range.clone()], deadline)
                    .map_err(|e| self.right.err(head.op, self.timeout, e))?;
                sent += 1;
            }
            if let Some((range, action)) = &step.recv {
                let words = self.wait(head.op, deadline)?;
                apply(
                    *action,
                    &mut buf[range.clone()],
                    wire::words_as::<T>(&words, range.len()),
                    world,
                );
                match recvs.next() {
                    Some((i, len)) => self.post(
                        Header {
                            msg: i as u32,
                            len: len as u64,
                            ..head
                        },
                        words,
                    )?,
                    None => self.pool.push(words),
                }
            }
        }
        Ok(())
    }

    /// Writes one message (header and payload) to the right neighbour.
    fn send<T: Elem>(&mut self, h: &Header, data: &[T], deadline: Instant) -> io::Result<()> {
        let bytes = size_of_val(data);
        self.scratch.clear();
        self.scratch.extend_from_slice(&h.encode());
        if cfg!(target_endian = "little") {
            if bytes <= SMALL_MSG {
                self.scratch.extend_from_slice(wire::as_bytes(data));
                return self.to_right.write_all_by(&self.scratch, deadline);
            }
            self.to_right.write_all_by(&self.scratch, deadline)?;
            return self.to_right.write_all_by(wire::as_bytes(data), deadline);
        }
        self.to_right.write_all_by(&self.scratch, deadline)?;
        for block in data.chunks(SMALL_MSG / size_of::<T>()) {
            self.scratch.clear();
            for x in block {
                self.scratch
                    .extend_from_slice(wire::as_bytes(std::slice::from_ref(&x.swap_le())));
            }
            self.to_right.write_all_by(&self.scratch, deadline)?;
        }
        Ok(())
    }

    /// Asks the receiver thread to read the next message into `buf`.
    fn post(&mut self, expect: Header, buf: Vec<u64>) -> Result<(), CollectiveError> {
        let sent = self
            .requests
            .as_ref()
            .is_some_and(|r| r.send(RecvReq { expect, buf }).is_ok());
        if sent {
            return Ok(());
        }
        // The receiver thread stopped: report the failure it left behind, if any.
        while let Ok(result) = self.results.try_recv() {
            result?;
        }
        Err(self.receiver_gone(expect.op))
    }

    /// Waits for the next received message until `deadline`.
    fn wait(&mut self, op: Op, deadline: Instant) -> RecvResult {
        match self
            .results
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(CollectiveError::Timeout {
                peer: self.left.rank,
                addr: self.left.addr,
                op,
                after: self.timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(self.receiver_gone(op)),
        }
    }

    fn receiver_gone(&self, op: Op) -> CollectiveError {
        let e = io::Error::other("receiver thread stopped after an earlier failure");
        self.left.err(op, self.timeout, e)
    }

    /// A handle that shuts both sockets down from another thread.
    pub(super) fn abort_handle(&self) -> io::Result<super::RingAbort> {
        Ok(super::RingAbort {
            sockets: vec![
                self.to_right.tcp().try_clone()?,
                self.from_left.try_clone()?,
            ],
            #[cfg(feature = "nccl")]
            nccl: None,
        })
    }

    /// Shuts both sockets down: the receiver thread and both neighbours see it at once.
    pub(super) fn abort(&self) {
        let _ = self.to_right.tcp().shutdown(Shutdown::Both);
        let _ = self.from_left.shutdown(Shutdown::Both);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.abort();
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Applies received (little-endian) elements to `dst`.
fn apply<T: Elem>(action: Action, dst: &mut [T], src: &[T], world: usize) {
    match action {
        Action::Copy if cfg!(target_endian = "little") => dst.copy_from_slice(src),
        Action::Copy => dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.swap_le()),
        Action::Add => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = d.add(s.swap_le())),
        Action::AddDiv => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = d.add(s.swap_le()).div_count(world)),
    }
}

/// Body of the receiver thread: serves read requests in order until the collective is
/// dropped or a read fails (after which the stream position is unknown).
fn receive_loop(
    mut s: RingStream,
    peer: Peer,
    backstop: Duration,
    requests: Receiver<RecvReq>,
    results: Sender<RecvResult>,
) {
    while let Ok(RecvReq { expect, mut buf }) = requests.recv() {
        let result = receive_one(&mut s, peer, backstop, &expect, &mut buf).map(|()| buf);
        let failed = result.is_err();
        if results.send(result).is_err() || failed {
            return;
        }
    }
}

fn receive_one(
    s: &mut RingStream,
    peer: Peer,
    backstop: Duration,
    expect: &Header,
    buf: &mut Vec<u64>,
) -> Result<(), CollectiveError> {
    let deadline = Instant::now() + backstop;
    let mut head = [0u8; HEADER_LEN];
    s.read_exact_by(&mut head, deadline)
        .map_err(|e| peer.err(expect.op, backstop, e))?;
    expect
        .check_received(&head)
        .map_err(|detail| CollectiveError::Mismatch {
            peer: peer.rank,
            addr: peer.addr,
            op: expect.op,
            detail,
        })?;
    let len = expect.len as usize;
    if buf.len() < wire::words_for(len) {
        buf.resize(wire::words_for(len), 0);
    }
    s.read_exact_by(&mut wire::words_bytes_mut(buf)[..len], deadline)
        .map_err(|e| peer.err(expect.op, backstop, e))
}
