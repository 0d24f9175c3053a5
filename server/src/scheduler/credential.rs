//! Resume credentials: an HMAC-SHA256, under the daemon's [`LeaseKey`], of what identifies a lease.
//!
//! `Granted` hands the grantee `hex(HMAC(key, tag ‖ lease id ‖ fencing token ‖ pool ‖ holder))`, and a
//! resume must present it. The daemon stores nothing per lease: it recomputes the MAC from the resume's
//! fields and compares in constant time. So a credential stays verifiable after a restart that keeps
//! the key, and a resume can only name a (lease, token, pool) that this daemon issued: nobody else can
//! move a live lease or re-create one with a made-up id or fencing token.

use std::fmt;

use ring::hmac;

use super::ids::{FencingToken, LeaseId, PoolId};

/// Domain separation: a MAC under this key means nothing in any other protocol, and a future format
/// changes the tag.
const TAG: &[u8] = b"slotd resume credential v1\0";

/// The daemon's secret key for resume credentials. Its `Debug` shows nothing of the key.
#[derive(Clone)]
pub struct LeaseKey(hmac::Key);

impl LeaseKey {
    /// Length of the key, in bytes.
    pub const LEN: usize = 32;

    /// The key made of these bytes (for example read from the key file).
    pub fn from_bytes(bytes: &[u8; Self::LEN]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// A fresh random key, from the OS's generator.
    pub fn random() -> Self {
        Self::from_bytes(&rand::random())
    }

    fn message(lease: LeaseId, token: FencingToken, pool: &PoolId, holder: &str) -> Vec<u8> {
        let (pool, holder) = (pool.as_str().as_bytes(), holder.as_bytes());
        let mut m = Vec::with_capacity(TAG.len() + 16 + 8 + 8 + pool.len() + holder.len());
        m.extend_from_slice(TAG);
        m.extend_from_slice(&lease.0.to_be_bytes());
        m.extend_from_slice(&token.0.to_be_bytes());
        // Length-prefixed, so no two (pool, holder) pairs encode alike.
        for field in [pool, holder] {
            m.extend_from_slice(&(field.len() as u32).to_be_bytes());
            m.extend_from_slice(field);
        }
        m
    }

    /// The credential of this lease.
    pub fn credential(
        &self,
        lease: LeaseId,
        token: FencingToken,
        pool: &PoolId,
        holder: &str,
    ) -> ResumeCredential {
        let tag = hmac::sign(&self.0, &Self::message(lease, token, pool, holder));
        ResumeCredential(hex(tag.as_ref()))
    }

    /// Whether `presented` is the credential of this lease (compared in constant time).
    pub fn verify(
        &self,
        presented: &ResumeCredential,
        lease: LeaseId,
        token: FencingToken,
        pool: &PoolId,
        holder: &str,
    ) -> bool {
        let Some(tag) = unhex(&presented.0) else { return false };
        hmac::verify(&self.0, &Self::message(lease, token, pool, holder), &tag).is_ok()
    }
}

impl fmt::Debug for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseKey(<redacted>)")
    }
}

/// A lease's resume credential: a secret, so its `Debug` is redacted; only the wire conversion of
/// `Granted` reads it ([`ResumeCredential::expose`]).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ResumeCredential(String);

impl ResumeCredential {
    /// Longest credential accepted from the wire, in bytes (a real one is 64).
    pub const MAX_LEN: usize = 128;

    /// Wraps what a client presented (unchecked; [`LeaseKey::verify`] checks it).
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The credential itself, for the one message that carries it to its grantee.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ResumeCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeCredential(<redacted>)")
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > ResumeCredential::MAX_LEN {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    s.as_bytes().chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_verifies_only_for_its_own_lease_and_key() {
        let key = LeaseKey::from_bytes(&[7; 32]);
        let p = PoolId::new("p");
        let c = key.credential(LeaseId(1), FencingToken(5), &p, "h");
        assert_eq!(c.expose().len(), 64);
        assert!(key.verify(&c, LeaseId(1), FencingToken(5), &p, "h"));
        assert!(!key.verify(&c, LeaseId(2), FencingToken(5), &p, "h"));
        assert!(!key.verify(&c, LeaseId(1), FencingToken(6), &p, "h"));
        assert!(!key.verify(&c, LeaseId(1), FencingToken(5), &PoolId::new("q"), "h"));
        assert!(!key.verify(&c, LeaseId(1), FencingToken(5), &p, "x"));
        // The length prefix keeps field boundaries apart.
        let ab = key.credential(LeaseId(1), FencingToken(5), &PoolId::new("ab"), "c");
        assert!(!key.verify(&ab, LeaseId(1), FencingToken(5), &PoolId::new("a"), "bc"));
        // Another key, or a malformed or empty credential, never verifies.
        let other = LeaseKey::from_bytes(&[8; 32]);
        assert!(!other.verify(&c, LeaseId(1), FencingToken(5), &p, "h"));
        let upper = ResumeCredential::new(c.expose().to_uppercase());
        assert!(key.verify(&upper, LeaseId(1), FencingToken(5), &p, "h"), "hex is case-insensitive");
        for bad in ["", "zz", "abc", &"0".repeat(64), &"0".repeat(200), "é"] {
            assert!(!key.verify(&ResumeCredential::new(bad), LeaseId(1), FencingToken(5), &p, "h"), "{bad}");
        }
    }

    #[test]
    fn debug_shows_no_secret() {
        let key = LeaseKey::from_bytes(&[7; 32]);
        let c = key.credential(LeaseId(1), FencingToken(5), &PoolId::new("p"), "h");
        assert_eq!(format!("{key:?}"), "LeaseKey(<redacted>)");
        assert!(!format!("{c:?}").contains(c.expose()));
    }
}
