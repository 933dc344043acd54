//! Forming the two connections of a ring rank, each authenticated by a challenge–response
//! handshake keyed by the job's [`RingKey`] before any data is read or sent:
//!
//! ```text
//! connector (rank r)                                 acceptor (rank r+1)
//!   hello_c: magic, version, rank, world, generation, nonce_c  -->
//!       <--  hello_a (same fields, a fresh nonce_a), tag(acceptor, hello_c, hello_a)
//!   tag(connector, hello_c, hello_a)  -->
//!       <--  verdict: 0 accepted, 1 refused
//! ```
//!
//! Each side checks the other's tag, which only a holder of the key can compute over its
//! own fresh nonce, and then the other's rank, world size and generation. The accepting
//! side handshakes with every incoming connection on a thread of its own, each within
//! [`PEER_HANDSHAKE`]: a connection that fails (a wrong key, a replayed hello, a stranger
//! that sends nothing or garbage, a leftover of an earlier generation) is dropped and
//! logged, and the left neighbour's connection is accepted meanwhile. Only a peer that
//! authenticated and then disagrees on the generation, world size or rank fails the ring.
//!
//! With TLS (`RingConfig::tls`), each connection first completes a TLS 1.3 handshake
//! (`super::tls`: the connector is the client, the acceptor the server) and the exchange
//! above runs inside it; the accepting side's TLS handshake counts towards the
//! connection's [`PEER_HANDSHAKE`].

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::auth::{self, MAC_LEN, RingKey, Role};
use super::link::Peer;
use super::ring::RingConfig;
use super::tls::{self, RingStream, RingTls};
use super::wire::{self, HELLO_LEN, HELLO_PREFIX_LEN, Hello, PrefixError, TLS_RECORD_PREFIX_LEN};
use super::{CollectiveError, Op};

/// How long one incoming connection may take to complete its handshake (at most the
/// ring's own deadline): the left neighbour answers at once, a stranger is dropped then.
pub(super) const PEER_HANDSHAKE: Duration = Duration::from_secs(5);

/// Incoming connections handshaking at once; further ones wait in the listen backlog.
const MAX_PENDING: usize = 16;

/// How often the accepting side looks for new connections and finished handshakes.
const POLL: Duration = Duration::from_millis(2);

/// The verdict byte of an accepted connection.
const ACCEPTED: u8 = 0;

/// The verdict byte of a refused connection.
const REFUSED: u8 = 1;

/// What a rank says about itself in its hellos.
#[derive(Debug, Clone, Copy)]
pub(super) struct Me {
    pub rank: usize,
    pub world: usize,
    pub generation: u64,
}

impl Me {
    fn hello(&self) -> io::Result<Hello> {
        Ok(Hello::new(
            self.rank,
            self.world,
            self.generation,
            auth::fresh_nonce()?,
        ))
    }
}

/// Connects to the right neighbour (over TLS when `config.tls` is set) and authenticates
/// both ways before `deadline`.
pub(super) fn connect_right(
    me: Me,
    right: Peer,
    config: &RingConfig,
    deadline: Instant,
) -> Result<RingStream, CollectiveError> {
    let (key, timeout) = (&config.key, config.timeout);
    let io = |e| right.err(Op::Handshake, timeout, e);
    let refused = |reason: String| CollectiveError::Handshake {
        peer: right.rank,
        addr: right.addr,
        reason,
    };
    let ours = me.hello().map_err(io)?;
    let s = connect_by(right.addr, deadline).map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    let mut s = match &config.tls {
        None => RingStream::Plain(s),
        Some(t) => tls::connect(s, t, deadline)
            .map_err(|e| tls::refusal(&e).map_or_else(|| io(e), refused))?,
    };
    let hc = ours.encode();
    s.write_all_by(&hc, deadline).map_err(io)?;
    let theirs = read_hello(&mut s, deadline)
        .map_err(io)?
        .map_err(|e| refused(e.to_string()))?;
    let ha = theirs.encode();
    let mut tag = [0u8; MAC_LEN];
    s.read_exact_by(&mut tag, deadline).map_err(io)?;
    if !key.verify(Role::Acceptor, &hc, &ha, &tag) {
        return Err(refused(
            "authentication failed: the peer does not hold this job's ring key (is every \
             worker given the job's token, SCFM_TOKEN or --token, and the same run?)"
                .into(),
        ));
    }
    s.write_all_by(&key.tag(Role::Connector, &hc, &ha), deadline)
        .map_err(io)?;
    theirs.check(&ours, right.rank).map_err(refused)?;
    let mut verdict = [0u8; 1];
    s.read_exact_by(&mut verdict, deadline).map_err(io)?;
    if verdict[0] != ACCEPTED {
        return Err(refused(
            "the peer refused our connection after authenticating it".into(),
        ));
    }
    Ok(s)
}

/// What became of one incoming connection.
enum Outcome {
    /// The left neighbour, authenticated and of this generation.
    Accepted(RingStream),
    /// Dropped; `quiet` for the expected case of a leftover of an earlier generation.
    Dropped { reason: String, quiet: bool },
    /// An authenticated peer that disagrees on the generation, world size or rank.
    Fatal(String),
}

/// Accepts the left neighbour on `listener` before `deadline` (over TLS when `config.tls`
/// is set), handshaking with every incoming connection on a thread of its own (see the
/// module documentation). Gives up early when `cancel` is set (the other connection of
/// this rank failed).
pub(super) fn accept_left(
    listener: &TcpListener,
    me: Me,
    left: Peer,
    config: &RingConfig,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<RingStream, CollectiveError> {
    let timeout = config.timeout;
    let io = |e| left.err(Op::Handshake, timeout, e);
    listener.set_nonblocking(true).map_err(io)?;
    let (tx, rx) = mpsc::channel::<(SocketAddr, Outcome)>();
    let mut pending = 0usize;
    // How many connections were refused, and the last one with why.
    let (mut refused, mut last_refused) = (0usize, None::<(SocketAddr, String)>);
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(io(io::Error::other(
                "gave up: the connection to the right neighbour failed",
            )));
        }
        while pending < MAX_PENDING {
            let (s, from) = match listener.accept() {
                Ok(c) => c,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    break;
                }
                Err(e) => return Err(io(e)),
            };
            let (tx, key, tls) = (tx.clone(), config.key.clone(), config.tls.clone());
            let by = deadline.min(Instant::now() + PEER_HANDSHAKE);
            thread::Builder::new()
                .name(format!("ring-hello-{}", me.rank))
                .spawn(move || {
                    let out = handshake_incoming(s, me, left.rank, &key, tls.as_ref(), by)
                        .unwrap_or_else(|e| Outcome::Dropped {
                            reason: io_reason(&e, by),
                            quiet: false,
                        });
                    // Logged here: the ring may have formed (and stopped listening for
                    // outcomes) before this connection's handshake ended.
                    if let Outcome::Dropped { reason, quiet } = &out {
                        let generation = me.generation;
                        if *quiet {
                            tracing::debug!(%from, generation, "dropped a ring connection: {reason}");
                        } else {
                            tracing::warn!(%from, generation, "refused a ring connection: {reason}");
                        }
                    }
                    let _ = tx.send((from, out));
                })
                .map_err(io)?;
            pending += 1;
        }
        match rx.recv_timeout(POLL) {
            Ok((_, Outcome::Accepted(s))) => return Ok(s),
            Ok((_, Outcome::Fatal(reason))) => {
                return Err(CollectiveError::Handshake {
                    peer: left.rank,
                    addr: left.addr,
                    reason,
                });
            }
            Ok((from, Outcome::Dropped { reason, .. })) => {
                pending -= 1;
                refused += 1;
                last_refused = Some((from, reason));
            }
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(match last_refused {
                None => io(ErrorKind::TimedOut.into()),
                Some((from, reason)) => CollectiveError::Handshake {
                    peer: left.rank,
                    addr: left.addr,
                    reason: format!(
                        "no authenticated connection from it within {timeout:?}; refused \
                         {refused} other connection(s), the last from {from}: {reason}"
                    ),
                },
            });
        }
    }
}

/// The accepting side's handshake with one incoming connection (TLS first when `tls` is
/// set), bounded by `deadline`.
fn handshake_incoming(
    s: TcpStream,
    me: Me,
    left_rank: usize,
    key: &RingKey,
    tls: Option<&RingTls>,
    deadline: Instant,
) -> io::Result<Outcome> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    let mut s = match tls {
        None => RingStream::Plain(s),
        Some(t) => match tls::accept(s, t, deadline) {
            Ok(s) => s,
            Err(e) => {
                let reason = tls::refusal(&e).ok_or(e)?;
                return Ok(Outcome::Dropped {
                    reason,
                    quiet: false,
                });
            }
        },
    };
    let ours = me.hello()?;
    let ha = ours.encode();
    let theirs = match read_hello(&mut s, deadline)? {
        Ok(h) => h,
        Err(e) => {
            if let PrefixError::Version(_) = e {
                // Our hello lets a peer of another build name the mismatch too.
                let _ = s.write_all_by(&ha, deadline);
            }
            return Ok(Outcome::Dropped {
                reason: e.to_string(),
                quiet: false,
            });
        }
    };
    let hc = theirs.encode();
    let mut answer = [0u8; HELLO_LEN + MAC_LEN];
    answer[..HELLO_LEN].copy_from_slice(&ha);
    answer[HELLO_LEN..].copy_from_slice(&key.tag(Role::Acceptor, &hc, &ha));
    s.write_all_by(&answer, deadline)?;
    let mut tag = [0u8; MAC_LEN];
    s.read_exact_by(&mut tag, deadline)?;
    let refuse = |s: &mut RingStream, out: Outcome| -> io::Result<Outcome> {
        let _ = s.write_all_by(&[REFUSED], deadline);
        Ok(out)
    };
    if !key.verify(Role::Connector, &hc, &ha, &tag) {
        let reason = format!(
            "authentication failed (a wrong key, or a replayed or forged hello claiming rank \
             {} of generation {})",
            theirs.rank, theirs.generation
        );
        return refuse(
            &mut s,
            Outcome::Dropped {
                reason,
                quiet: false,
            },
        );
    }
    if theirs.is_stale_for(&ours) {
        let reason = format!(
            "rank {} of the earlier generation {} (a leftover of a ring that failed)",
            theirs.rank, theirs.generation
        );
        return refuse(
            &mut s,
            Outcome::Dropped {
                reason,
                quiet: true,
            },
        );
    }
    if let Err(reason) = theirs.check(&ours, left_rank) {
        return refuse(&mut s, Outcome::Fatal(reason));
    }
    s.write_all_by(&[ACCEPTED], deadline)?;
    Ok(Outcome::Accepted(s))
}

/// Why an incoming connection's handshake failed on its socket.
fn io_reason(e: &io::Error, deadline: Instant) -> String {
    if wire::is_timeout(e) || Instant::now() >= deadline {
        format!("no complete handshake within {PEER_HANDSHAKE:?}")
    } else {
        format!("handshake i/o failed: {e}")
    }
}

/// Reads a hello: its first bytes (magic, version) are checked before the rest is read,
/// and its first two alone (a TLS record's, such as the alert of a TLS peer that refuses
/// our plain hello, before it closes the connection).
fn read_hello(s: &mut RingStream, deadline: Instant) -> io::Result<Result<Hello, PrefixError>> {
    let mut b = [0u8; HELLO_LEN];
    s.read_exact_by(&mut b[..TLS_RECORD_PREFIX_LEN], deadline)?;
    if let Some(e) = wire::tls_record(&b) {
        return Ok(Err(e));
    }
    s.read_exact_by(&mut b[TLS_RECORD_PREFIX_LEN..HELLO_PREFIX_LEN], deadline)?;
    let prefix: &[u8; HELLO_PREFIX_LEN] = b[..HELLO_PREFIX_LEN].try_into().expect("prefix");
    if let Err(e) = Hello::check_prefix(prefix) {
        return Ok(Err(e));
    }
    s.read_exact_by(&mut b[HELLO_PREFIX_LEN..], deadline)?;
    Ok(Ok(Hello::decode(&b)))
}

/// Connects to `addr`, retrying refused connections (the peer may not listen yet).
fn connect_by(addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionRefused | ErrorKind::Interrupted
                ) =>
            {
                if Instant::now() + Duration::from_millis(20) >= deadline {
                    return Err(e);
                }
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}
