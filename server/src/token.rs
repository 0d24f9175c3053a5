//! [`Token`]: a secret bearer token (from the config, a file or the environment), compared in
//! constant time and never shown.

use std::{fmt, sync::Arc};

use subtle::ConstantTimeEq;

/// A secret token. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<[u8]>);

impl Token {
    /// A token from text (a file's contents or an env var): surrounding whitespace is trimmed; it
    /// must be non-empty visible ASCII, since it travels as HTTP/2 header text.
    pub fn new(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("token is empty".into());
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("token must be visible ASCII without spaces".into());
        }
        Ok(Self(Arc::from(t.as_bytes())))
    }

    /// Compares in time that does not depend on where the first difference is, so response timing
    /// does not leak the token byte by byte (only whether the lengths differ).
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.ct_eq(presented).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}
