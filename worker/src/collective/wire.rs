//! Wire format of the ring: the hello message, message headers, deadline-bounded socket
//! reads and writes, and the casts between element slices and bytes.
//!
//! Everything travels little-endian. A message is a 40-byte [`Header`] followed by `len`
//! payload bytes.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use super::Op;
use super::auth::NONCE_LEN;

/// Version of the ring wire protocol; peers with another version are refused.
/// 2: the hello carries a nonce and the handshake authenticates both sides
/// (`super::handshake`).
pub const PROTOCOL_VERSION: u32 = 2;

/// First bytes of every hello.
const MAGIC: u32 = u32::from_le_bytes(*b"scRG");

/// Size of an encoded [`Hello`].
pub(crate) const HELLO_LEN: usize = 24 + NONCE_LEN;

/// The bytes of a hello that every version shares: magic and version.
pub(crate) const HELLO_PREFIX_LEN: usize = 8;

/// Size of an encoded [`Header`].
pub(crate) const HEADER_LEN: usize = 40;

/// Element types that travel over the ring as little-endian bytes.
///
/// # Safety
/// Implementors must be plain old data: no padding, every bit pattern valid, and an
/// alignment of at most 8 (the alignment of the `u64` receive buffers).
pub(crate) unsafe trait Elem: Copy + Default + Send + Sync + 'static {
    /// Converts between the native and the little-endian representation (an involution).
    fn swap_le(self) -> Self;
    /// `self + other`.
    fn add(self, other: Self) -> Self;
    /// `self / n`.
    fn div_count(self, n: usize) -> Self;
}

// SAFETY: f32 is 4 bytes, alignment 4, no padding, every bit pattern is a valid f32.
unsafe impl Elem for f32 {
    fn swap_le(self) -> Self {
        f32::from_bits(self.to_bits().to_le())
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
    fn div_count(self, n: usize) -> Self {
        self / n as f32
    }
}

// SAFETY: f64 is 8 bytes, alignment 8, no padding, every bit pattern is a valid f64.
unsafe impl Elem for f64 {
    fn swap_le(self) -> Self {
        f64::from_bits(self.to_bits().to_le())
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
    fn div_count(self, n: usize) -> Self {
        self / n as f64
    }
}

/// The bytes of an element slice (native byte order).
pub(crate) fn as_bytes<T: Elem>(s: &[T]) -> &[u8] {
    // SAFETY: `T: Elem` has no padding, so all `size_of_val(s)` bytes are initialised;
    // `u8` has alignment 1; the lifetime is tied to `s`.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// The bytes of a word buffer, for reading into it.
pub(crate) fn words_bytes_mut(w: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no padding and any byte pattern is a valid u64; u8 has alignment 1;
    // the length is exact and the exclusive borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(w)) }
}

/// The first `n` elements of type `T` stored in a word buffer.
pub(crate) fn words_as<T: Elem>(w: &[u64], n: usize) -> &[T] {
    assert!(n * std::mem::size_of::<T>() <= std::mem::size_of_val(w));
    const { assert!(std::mem::align_of::<T>() <= std::mem::align_of::<u64>()) };
    // SAFETY: in bounds (asserted), suitably aligned (T's alignment is at most u64's,
    // asserted at compile time), every bit pattern is a valid T (Elem contract).
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<T>(), n) }
}

/// Number of u64 words needed to hold `bytes` bytes.
pub(crate) fn words_for(bytes: usize) -> usize {
    bytes.div_ceil(8)
}

/// The hello that opens each side of a ring connection: the connecting rank's, then the
/// accepting rank's answer, each with a fresh nonce that the other side's tag covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    magic: u32,
    version: u32,
    /// Sender's rank.
    pub rank: u32,
    /// Sender's world size.
    pub world: u32,
    /// Sender's membership generation.
    pub generation: u64,
    /// Sender's fresh random challenge.
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    /// Our own hello.
    pub fn new(rank: usize, world: usize, generation: u64, nonce: [u8; NONCE_LEN]) -> Self {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            rank: rank as u32,
            world: world as u32,
            generation,
            nonce,
        }
    }

    /// Little-endian encoding.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.rank.to_le_bytes());
        b[12..16].copy_from_slice(&self.world.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..].copy_from_slice(&self.nonce);
        b
    }

    /// Inverse of [`Hello::encode`].
    pub fn decode(b: &[u8; HELLO_LEN]) -> Self {
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[24..]);
        Hello {
            magic: u32_at(b, 0),
            version: u32_at(b, 4),
            rank: u32_at(b, 8),
            world: u32_at(b, 12),
            generation: u64_at(b, 16),
            nonce,
        }
    }

    /// Checks the first [`HELLO_PREFIX_LEN`] bytes of a hello (magic and version), before
    /// the rest is read: a peer of another version sends a hello of another length.
    pub fn check_prefix(b: &[u8; HELLO_PREFIX_LEN]) -> Result<(), PrefixError> {
        if let Some(e) = tls_record(b) {
            return Err(e);
        }
        let (magic, version) = (u32_at(b, 0), u32_at(b, 4));
        if magic != MAGIC {
            return Err(PrefixError::NotScfm(format!(
                "bad magic {magic:#010x}: not an scfm ring peer"
            )));
        }
        if version != PROTOCOL_VERSION {
            return Err(PrefixError::Version(format!(
                "ring protocol version mismatch: peer speaks {version}, we speak {PROTOCOL_VERSION}"
            )));
        }
        Ok(())
    }

    /// Whether this hello comes from an scfm peer of an earlier generation than `ours`.
    pub fn is_stale_for(&self, ours: &Hello) -> bool {
        self.magic == MAGIC && self.generation < ours.generation
    }

    /// Checks a peer's hello against ours and the rank we expect it to have.
    pub fn check(&self, ours: &Hello, expected_rank: usize) -> Result<(), String> {
        if self.magic != MAGIC {
            return Err(format!(
                "bad magic {:#010x}: not an scfm ring peer",
                self.magic
            ));
        }
        if self.version != ours.version {
            return Err(format!(
                "protocol version mismatch: peer speaks {}, we speak {}",
                self.version, ours.version
            ));
        }
        if self.generation != ours.generation {
            return Err(format!(
                "generation mismatch: peer is at generation {}, we are at generation {}",
                self.generation, ours.generation
            ));
        }
        if self.world != ours.world {
            return Err(format!(
                "world size mismatch: peer has {}, we have {}",
                self.world, ours.world
            ));
        }
        if self.rank as usize != expected_rank {
            return Err(format!(
                "rank mismatch: peer says it is rank {}, expected rank {expected_rank}",
                self.rank
            ));
        }
        Ok(())
    }
}

/// Bytes that begin every TLS record header a peer may send first: its content type
/// (alert 21 or handshake 22) and the major version 3.
pub(crate) const TLS_RECORD_PREFIX_LEN: usize = 2;

/// The refusal of a peer whose first bytes are a TLS record (a ring that runs over TLS
/// meeting one that does not), if they are one; only the first
/// [`TLS_RECORD_PREFIX_LEN`] bytes are looked at.
pub(crate) fn tls_record(b: &[u8]) -> Option<PrefixError> {
    let what = match b.get(..TLS_RECORD_PREFIX_LEN)? {
        [21, 3] => "a TLS alert",
        [22, 3] => "a TLS handshake",
        _ => return None,
    };
    Some(PrefixError::NotScfm(format!(
        "the peer sent {what} instead of a ring hello: its ring runs over TLS and this \
         one's does not (auth.tls.ring must be the same for every worker of a job)"
    )))
}

/// Why the first bytes of a hello were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PrefixError {
    /// Not an scfm ring peer at all.
    NotScfm(String),
    /// An scfm ring peer of another wire version (another build).
    Version(String),
}

impl std::fmt::Display for PrefixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrefixError::NotScfm(s) | PrefixError::Version(s) => f.write_str(s),
        }
    }
}

/// Header of every data message. `seq` counts operations, `msg` counts messages on this
/// link within the operation; `count` and `root` are the operation's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// Operation.
    pub op: Op,
    /// Message index within the operation on this link.
    pub msg: u32,
    /// Operation sequence number (same on all ranks).
    pub seq: u64,
    /// Element count argument of the operation.
    pub count: u64,
    /// Root argument (broadcast), otherwise 0.
    pub root: u32,
    /// Payload bytes.
    pub len: u64,
}

impl Header {
    /// Little-endian encoding.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.op.code().to_le_bytes());
        b[4..8].copy_from_slice(&self.msg.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..28].copy_from_slice(&self.root.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes a header received while `self` was expected; `Err` describes the difference.
    pub fn check_received(&self, b: &[u8; HEADER_LEN]) -> Result<(), String> {
        let code = u32_at(b, 0);
        let Some(op) = Op::from_code(code) else {
            return Err(format!("unknown operation code {code} (corrupt stream?)"));
        };
        let (msg, seq, count, root, len) = (
            u32_at(b, 4),
            u64_at(b, 8),
            u64_at(b, 16),
            u32_at(b, 24),
            u64_at(b, 32),
        );
        if op != self.op || seq != self.seq {
            return Err(format!(
                "peer is in {op} (operation #{seq}) while we are in {} (operation #{})",
                self.op, self.seq
            ));
        }
        if count != self.count {
            return Err(format!(
                "peer passed {count} elements, we passed {}",
                self.count
            ));
        }
        if root != self.root {
            return Err(format!("peer uses root {root}, we use root {}", self.root));
        }
        if msg != self.msg || len != self.len {
            return Err(format!(
                "got message {msg} of {len} bytes, expected message {} of {} bytes",
                self.msg, self.len
            ));
        }
        Ok(())
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Whether an I/O error is a socket timeout.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Time left until `deadline`, or a `TimedOut` error when it has passed.
pub(crate) fn left(deadline: Instant) -> io::Result<std::time::Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        Err(ErrorKind::TimedOut.into())
    } else {
        Ok(d)
    }
}

/// Writes all of `bytes`, every `write` call bounded by the time left until `deadline`.
pub(crate) fn write_all_by(
    s: &mut TcpStream,
    mut bytes: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    while !bytes.is_empty() {
        s.set_write_timeout(Some(left(deadline)?))?;
        match s.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fills `buf`, every `read` call bounded by the time left until `deadline`.
pub(crate) fn read_exact_by(
    s: &mut TcpStream,
    mut buf: &mut [u8],
    deadline: Instant,
) -> io::Result<()> {
    while !buf.is_empty() {
        s.set_read_timeout(Some(left(deadline)?))?;
        match s.read(buf) {
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed by peer",
                ));
            }
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
