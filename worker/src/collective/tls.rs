//! Optional TLS 1.3 on the ring's connections (manifest `auth.tls.ring`). The accepting rank
//! of every connection is the TLS server and presents the job's certificate and key (the
//! coordinator's, the same files as gRPC); the connecting rank is the client and verifies
//! that certificate against the job's CA for the configured server name. The handshake of
//! `super::handshake` then runs inside the TLS stream, so a connection is encrypted and
//! integrity-protected by TLS and authenticated by the job's ring key as before.
//!
//! rustls is driven here directly instead of through its `StreamOwned`: every socket call
//! gets the time left until the caller's deadline as its timeout, so a TLS handshake with a
//! silent peer, and every later read and write, ends by its deadline as on the plain path
//! (`StreamOwned`'s write may wait on a read, and reports a failed write of the records it
//! buffered only on the next call).
//! Each direction of a ring connection has one user after the handshake (the connecting
//! rank only writes, the accepting rank only reads), so a stream is owned by one thread;
//! a shutdown from another thread goes through a clone of its TCP socket. On the plain path
//! [`RingStream::Plain`] is the socket itself: no buffer and no copy are added.

use std::fmt;
use std::io::{self, ErrorKind, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};

use super::CollectiveError;
use super::wire;

/// The TLS settings of a ring (see the module documentation): built once per worker from
/// the job's PEM files and shared by every connection (cloning is cheap).
#[derive(Clone)]
pub struct RingTls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    domain: ServerName<'static>,
}

impl RingTls {
    /// Settings from PEM bytes: the accepting rank presents `cert_chain` and `key`; the
    /// connecting rank verifies them against `ca` for the server name `domain` (a DNS
    /// name or an IP address). TLS 1.3 only, rustls with the ring crypto provider; no
    /// session tickets or resumption (every connection is new). An error names the part
    /// that cannot be used.
    pub fn from_pem(
        cert_chain: &[u8],
        key: &[u8],
        ca: &[u8],
        domain: &str,
    ) -> Result<Self, CollectiveError> {
        let bad = |reason: String| CollectiveError::Tls { reason };
        let certs = CertificateDer::pem_slice_iter(cert_chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("the certificate chain is not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(bad("the certificate file holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| bad(format!("the key file holds no usable private key: {e}")))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca) {
            let ca = ca.map_err(|e| bad(format!("the CA file is not valid PEM: {e}")))?;
            roots
                .add(ca)
                .map_err(|e| bad(format!("the CA certificate cannot be used: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("the CA file holds no certificate".into()));
        }
        let domain = ServerName::try_from(domain.to_owned())
            .map_err(|e| bad(format!("`{domain}` is not a server name: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls13)
            .map_err(|e| bad(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad(format!("the certificate and key cannot be used: {e}")))?;
        // Nothing reads tickets: a ring connection is never resumed.
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(tls13)
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.resumption = rustls::client::Resumption::disabled();
        Ok(RingTls {
            client: Arc::new(client),
            server: Arc::new(server),
            domain,
        })
    }
}

impl fmt::Debug for RingTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingTls")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// Equal when built by the same [`RingTls::from_pem`] call (clones of one another).
impl PartialEq for RingTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.client, &other.client)
            && Arc::ptr_eq(&self.server, &other.server)
            && self.domain == other.domain
    }
}

impl Eq for RingTls {}

/// One ring connection: the TCP socket itself, or TLS over it.
pub(super) enum RingStream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl RingStream {
    /// The TCP socket (for a clone that shuts the connection down from another thread).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            RingStream::Plain(s) => s,
            RingStream::Tls(t) => &t.sock,
        }
    }

    /// What the connection runs over, for the logs: `TLS 1.3 (suite)` or `plain TCP`.
    pub fn describe(&self) -> String {
        match self {
            RingStream::Plain(_) => "plain TCP".into(),
            RingStream::Tls(t) => match t.conn.negotiated_cipher_suite() {
                Some(s) => format!("TLS 1.3 ({:?})", s.suite()),
                None => "TLS 1.3".into(),
            },
        }
    }

    /// Writes all of `bytes` by `deadline` (see [`wire::write_all_by`]).
    pub fn write_all_by(&mut self, bytes: &[u8], deadline: Instant) -> io::Result<()> {
        match self {
            RingStream::Plain(s) => wire::write_all_by(s, bytes, deadline),
            RingStream::Tls(t) => t.write_all_by(bytes, deadline),
        }
    }

    /// Fills `buf` by `deadline` (see [`wire::read_exact_by`]).
    pub fn read_exact_by(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
        match self {
            RingStream::Plain(s) => wire::read_exact_by(s, buf, deadline),
            RingStream::Tls(t) => t.read_exact_by(buf, deadline),
        }
    }
}

/// The connecting side: the TLS handshake as client over `sock`, done by `deadline`.
pub(super) fn connect(sock: TcpStream, tls: &RingTls, deadline: Instant) -> io::Result<RingStream> {
    let conn = ClientConnection::new(tls.client.clone(), tls.domain.clone())
        .map_err(|e| io::Error::new(ErrorKind::InvalidData, format!("TLS: {e}")))?;
    TlsStream::handshake(conn.into(), sock, deadline)
}

/// The accepting side: the TLS handshake as server over `sock`, done by `deadline`.
pub(super) fn accept(sock: TcpStream, tls: &RingTls, deadline: Instant) -> io::Result<RingStream> {
    let conn = ServerConnection::new(tls.server.clone())
        .map_err(|e| io::Error::new(ErrorKind::InvalidData, format!("TLS: {e}")))?;
    TlsStream::handshake(conn.into(), sock, deadline)
}

/// Why the peer refused a TLS handshake or does not speak TLS, when the handshake's error
/// `e` says so (a TLS error, or the connection closed or reset during the handshake);
/// `None` for a timeout or a local failure.
pub(super) fn refusal(e: &io::Error) -> Option<String> {
    let what = e.to_string();
    let what = what.strip_prefix("TLS: ").unwrap_or(&what);
    match e.kind() {
        ErrorKind::InvalidData if what.contains("invalid peer certificate") => Some(format!(
            "TLS handshake failed: {what} (the certificate must be signed by the CA of \
             --tls-ca and valid for the server name of --tls-domain)"
        )),
        ErrorKind::InvalidData if what.contains("corrupt message") => Some(format!(
            "TLS handshake failed: {what}; does the peer's ring run without TLS?"
        )),
        ErrorKind::InvalidData => Some(format!("TLS handshake failed: {what}")),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset => Some(format!(
            "TLS handshake failed: the peer closed the connection ({what}); does its ring \
             run without TLS?"
        )),
        _ => None,
    }
}

/// Bytes read from the socket at once: rustls itself takes at most 4 KiB per read, which
/// for the ring's megabytes would be a system call per 4 KiB (measured: more CPU time
/// than the copy out of this buffer).
const READ_AHEAD: usize = 128 << 10;

/// Encrypted records buffered for one write to the socket (rustls' default: 64 KiB;
/// 256 KiB took the least CPU time of 64 KiB, 256 KiB and 1 MiB in the ring benchmark).
const WRITE_BATCH: usize = 256 << 10;

/// A rustls connection over its TCP socket, every socket call bounded by a deadline.
pub(super) struct TlsStream {
    conn: Connection,
    sock: TcpStream,
    /// Bytes read from the socket ahead, `inbox[at..filled]` not yet handed to rustls.
    inbox: Box<[u8]>,
    at: usize,
    filled: usize,
}

impl TlsStream {
    /// Runs the TLS handshake of `conn` over `sock` by `deadline`.
    fn handshake(
        mut conn: Connection,
        sock: TcpStream,
        deadline: Instant,
    ) -> io::Result<RingStream> {
        conn.set_buffer_limit(Some(WRITE_BATCH));
        let mut t = TlsStream {
            conn,
            sock,
            inbox: vec![0; READ_AHEAD].into_boxed_slice(),
            at: 0,
            filled: 0,
        };
        while t.conn.is_handshaking() {
            t.flush_by(deadline)?;
            if !t.conn.is_handshaking() {
                break;
            }
            if !t.receive_by(deadline)? {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "closed during the handshake",
                ));
            }
        }
        // The client's Finished (and anything else queued).
        t.flush_by(deadline)?;
        Ok(RingStream::Tls(Box::new(t)))
    }

    /// Hands every queued TLS record to the socket by `deadline`.
    fn flush_by(&mut self, deadline: Instant) -> io::Result<()> {
        while self.conn.wants_write() {
            self.sock.set_write_timeout(Some(wire::left(deadline)?))?;
            match self.conn.write_tls(&mut self.sock) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Hands rustls the next bytes from the socket (read ahead by up to [`READ_AHEAD`]
    /// bytes, the read bounded by `deadline`) and processes them; `false` when the peer
    /// closed the connection. A TLS error is `InvalidData`, sent to the peer as an alert
    /// first (as far as the deadline allows).
    fn receive_by(&mut self, deadline: Instant) -> io::Result<bool> {
        while self.at == self.filled {
            self.sock.set_read_timeout(Some(wire::left(deadline)?))?;
            match io::Read::read(&mut self.sock, &mut self.inbox) {
                Ok(0) => return Ok(false),
                Ok(n) => (self.at, self.filled) = (0, n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let n = self.conn.read_tls(&mut &self.inbox[self.at..self.filled])?;
        if n == 0 {
            // rustls takes no more after the peer's close_notify.
            return Ok(false);
        }
        self.at += n;
        if let Err(e) = self.conn.process_new_packets() {
            let _ = self.flush_by(deadline);
            return Err(io::Error::new(ErrorKind::InvalidData, format!("TLS: {e}")));
        }
        Ok(true)
    }

    fn write_all_by(&mut self, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
        while !bytes.is_empty() {
            // Encrypts up to WRITE_BATCH bytes into records, written at once.
            let n = self.conn.writer().write(bytes)?;
            if n == 0 && !self.conn.wants_write() {
                return Err(ErrorKind::WriteZero.into());
            }
            bytes = &bytes[n..];
            self.flush_by(deadline)?;
        }
        Ok(())
    }

    fn read_exact_by(&mut self, mut buf: &mut [u8], deadline: Instant) -> io::Result<()> {
        while !buf.is_empty() {
            match io::Read::read(&mut self.conn.reader(), buf) {
                Ok(0) => return Err(closed()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            // A record rustls owes the peer (a key update's answer) goes out first.
            self.flush_by(deadline)?;
            if !self.receive_by(deadline)? {
                return Err(closed());
            }
        }
        Ok(())
    }
}

/// The error of a connection that the peer closed.
fn closed() -> io::Error {
    io::Error::new(ErrorKind::UnexpectedEof, "connection closed by peer")
}
