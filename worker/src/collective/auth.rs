//! Authentication of ring connections: the key of a job's ring and the HMAC-SHA256 tags
//! of the challenge–response handshake (`super::handshake`).
//!
//! The key is `HMAC-SHA256(token, "scfm ring key v2\0" ‖ run_id)`: every worker of a job
//! holds the job's token (it presented it to the coordinator), so every member of a
//! generation derives the same key, and a connection from anyone without the token fails
//! the handshake before any data is read. A job without a token (loopback only) derives
//! the key from the run id alone: it then keeps strangers and other jobs' workers out of
//! the ring by mistake, not by secret.
//!
//! Each side's tag covers both hellos (ranks, world size, generation and the two fresh
//! nonces) under a label naming its role, so a tag answers one challenge of one
//! connection in one direction and cannot be replayed to another connection, another
//! generation, another peer or the other direction.

use std::fmt;
use std::io;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a handshake tag (HMAC-SHA256).
pub(crate) const MAC_LEN: usize = 32;

/// Bytes of a hello's nonce.
pub(crate) const NONCE_LEN: usize = 32;

/// Which side of a ring connection computes a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The rank that connects to its right neighbour.
    Connector,
    /// The rank that accepts its left neighbour.
    Acceptor,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Connector => b"scfm ring connector\0",
            Role::Acceptor => b"scfm ring acceptor\0",
        }
    }
}

/// The key that authenticates the ring connections of one job (see the module
/// documentation). Its `Debug` output hides the bytes; equality is constant-time.
#[derive(Clone)]
pub struct RingKey([u8; 32]);

impl RingKey {
    /// The ring key of the job `run_id` whose token is `token` (`None`: a job without a
    /// token, whose key is derived from the run id alone and is not secret).
    pub fn derive(token: Option<&str>, run_id: &str) -> Self {
        let mut m = HmacSha256::new_from_slice(token.unwrap_or("").as_bytes())
            .expect("HMAC takes keys of any length");
        m.update(b"scfm ring key v2\0");
        m.update(run_id.as_bytes());
        RingKey(m.finalize().into_bytes().into())
    }

    fn hmac(&self, role: Role, connector_hello: &[u8], acceptor_hello: &[u8]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        m.update(role.label());
        m.update(connector_hello);
        m.update(acceptor_hello);
        m
    }

    /// The tag `role` sends over the two encoded hellos of a connection.
    pub(crate) fn tag(
        &self,
        role: Role,
        connector_hello: &[u8],
        acceptor_hello: &[u8],
    ) -> [u8; MAC_LEN] {
        self.hmac(role, connector_hello, acceptor_hello)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `tag` is `role`'s tag over the two hellos (compared in constant time).
    pub(crate) fn verify(
        &self,
        role: Role,
        connector_hello: &[u8],
        acceptor_hello: &[u8],
        tag: &[u8],
    ) -> bool {
        self.hmac(role, connector_hello, acceptor_hello)
            .verify_slice(tag)
            .is_ok()
    }
}

impl fmt::Debug for RingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RingKey(<secret>)")
    }
}

impl PartialEq for RingKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for RingKey {}

/// A fresh random nonce from the operating system.
pub(crate) fn fresh_nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| io::Error::other(format!("no random nonce: {e}")))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_token_and_run() {
        let k = RingKey::derive(Some("t"), "run");
        assert_eq!(k, RingKey::derive(Some("t"), "run"));
        assert_ne!(k, RingKey::derive(Some("u"), "run"));
        assert_ne!(k, RingKey::derive(Some("t"), "run2"));
        assert_ne!(k, RingKey::derive(None, "run"));
        assert_eq!(format!("{k:?}"), "RingKey(<secret>)");
    }

    /// A reference value, so that the derivation cannot change unnoticed (peers of two
    /// builds must derive the same key), computed independently with Python's
    /// `hmac.new(b"tok", b"scfm ring key v2\0run", "sha256").hexdigest()`.
    #[test]
    fn derivation_is_hmac_sha256_of_the_run_id() {
        let k = RingKey::derive(Some("tok"), "run");
        assert_eq!(
            hex::encode(k.0),
            "b4401414de5a760ee767e12bc580ec11c7dc5b0903b3ed96e94838ecb0d24ab5"
        );
    }

    #[test]
    fn tags_are_bound_to_role_and_both_hellos() {
        let k = RingKey::derive(Some("t"), "run");
        let (c, a) = (b"connector hello", b"acceptor hello");
        let t = k.tag(Role::Connector, c, a);
        assert!(k.verify(Role::Connector, c, a, &t));
        assert!(
            !k.verify(Role::Acceptor, c, a, &t),
            "reflected to the other role"
        );
        assert!(!k.verify(Role::Connector, c, b"another challenge", &t));
        assert!(!k.verify(Role::Connector, b"another hello", a, &t));
        assert!(!RingKey::derive(Some("x"), "run").verify(Role::Connector, c, a, &t));
        assert!(!k.verify(Role::Connector, c, a, &t[..31]));
        assert_ne!(fresh_nonce().unwrap(), fresh_nonce().unwrap());
    }
}
