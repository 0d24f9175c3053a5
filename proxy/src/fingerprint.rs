//! Credential fingerprints: a keyed hash (HMAC-SHA256) of a provider key, so that a pool can be chosen
//! per key without the key itself ever being stored, logged or put in the configuration.

use http::HeaderMap;
use ring::hmac;

/// The prefix of every fingerprint.
pub const PREFIX: &str = "fp_";
/// Hex digits kept from the HMAC (128 bits).
pub const HEX_LEN: usize = 32;

/// A fingerprint key.
pub struct Fingerprinter {
    key: hmac::Key,
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter(<redacted>)")
    }
}

impl Fingerprinter {
    /// A fingerprinter keyed with `key`.
    pub fn new(key: &[u8]) -> Self {
        Fingerprinter { key: hmac::Key::new(hmac::HMAC_SHA256, key) }
    }

    /// The fingerprint of one credential (the bare key, without `Bearer `).
    pub fn fingerprint(&self, credential: &[u8]) -> String {
        let tag = hmac::sign(&self.key, credential);
        let mut out = String::with_capacity(PREFIX.len() + HEX_LEN);
        out.push_str(PREFIX);
        for b in &tag.as_ref()[..HEX_LEN / 2] {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// The fingerprint of the request's credential: `x-api-key`, else `Authorization` (a `Bearer`
    /// prefix is ignored, so the same key fingerprints alike in both headers).
    pub fn of_request(&self, headers: &HeaderMap) -> Option<String> {
        credential(headers).map(|c| self.fingerprint(c))
    }
}

/// The credential bytes of a request, if it carries one.
pub fn credential(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("x-api-key") {
        return Some(v.as_bytes().trim_ascii());
    }
    let v = headers.get(http::header::AUTHORIZATION)?.as_bytes().trim_ascii();
    let bare = match v.get(..7) {
        Some(p) if p.eq_ignore_ascii_case(b"bearer ") => v[7..].trim_ascii(),
        _ => v,
    };
    Some(bare)
}

/// True for a string shaped like a fingerprint.
pub fn is_fingerprint(s: &str) -> bool {
    s.strip_prefix(PREFIX).is_some_and(|h| {
        h.len() == HEX_LEN && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_fingerprint_in_either_header() {
        let f = Fingerprinter::new(b"0123456789abcdef");
        let mut a = HeaderMap::new();
        a.insert("x-api-key", "sk-ant-secret".parse().unwrap());
        let mut b = HeaderMap::new();
        b.insert("authorization", "Bearer sk-ant-secret".parse().unwrap());
        let fa = f.of_request(&a).unwrap();
        assert_eq!(Some(fa.clone()), f.of_request(&b));
        assert!(is_fingerprint(&fa), "{fa}");
        assert!(!fa.contains("secret"));
        // Another key gives another fingerprint.
        assert_ne!(Fingerprinter::new(b"fedcba9876543210").fingerprint(b"sk-ant-secret"), fa);
        assert_eq!(f.of_request(&HeaderMap::new()), None);
    }
}
