//! Domain newtypes: pool, lease, session and request identities, priorities and fencing tokens.

use std::{borrow::Borrow, fmt, str::FromStr, sync::Arc};

/// Why a name, id or priority from untrusted input was refused.
///
/// Messages are lowercase and quote the offending value (cut to 64 bytes). The scheduler's
/// `Error` converts from this, so callers keep one error type and one gRPC mapping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A pool name that is empty, too long or has a character outside `[A-Za-z0-9._:/-]`.
    #[error("invalid pool name {0:?}: want 1..={max} bytes of [A-Za-z0-9._:/-]", max = PoolId::MAX_LEN)]
    PoolName(String),
    /// A lease id that is not 32 hex digits.
    #[error("invalid lease id {0:?}: want 32 hex digits")]
    LeaseId(String),
    /// A request id that is empty or too long.
    #[error("invalid request_id {0:?}: want 1..={max} bytes", max = RequestId::MAX_LEN)]
    RequestId(String),
    /// A priority above [`Priority::MAX`].
    #[error("priority {got} out of range 0..={max}")]
    PriorityOutOfRange {
        /// What was asked for.
        got: u32,
        /// The highest allowed.
        max: u8,
    },
}

/// How much of an invalid id an [`IdError`] quotes, in bytes.
const QUOTED_LEN: usize = 64;

/// The name of a pool, such as `"anthropic"` or `"openai-key-2"`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(Arc<str>);

impl PoolId {
    /// The longest pool name accepted, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Wraps a name without validating it; see [`PoolId::parse`] for input from the wire.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// Validates a pool name from untrusted input: 1..=128 bytes of `[A-Za-z0-9._:/-]`.
    pub fn parse(name: &str) -> Result<Self, IdError> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || "._:/-".contains(c);
        if name.is_empty() || name.len() > Self::MAX_LEN || !name.chars().all(ok_char) {
            return Err(IdError::PoolName(name.to_owned()));
        }
        Ok(Self::new(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for PoolId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl serde::Serialize for PoolId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for PoolId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PoolId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl From<&str> for PoolId {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

/// An unguessable lease id: 128 random bits, written as 32 lowercase hex digits.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub u128);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({self})")
    }
}

impl FromStr for LeaseId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let invalid = || IdError::LeaseId(truncate(s, QUOTED_LEN).to_owned());
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        // 32 hex digits always fit a u128; the check above makes this infallible.
        u128::from_str_radix(s, 16).map(LeaseId).map_err(|_| invalid())
    }
}

/// A request priority: [`Priority::MIN`]..=[`Priority::MAX`], higher is served first.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Priority(u8);

impl Priority {
    /// The lowest priority.
    pub const MIN: Priority = Priority(0);
    /// The highest priority.
    pub const MAX: Priority = Priority(9);
    /// The priority of a request that does not say.
    pub const DEFAULT: Priority = Priority(5);

    /// The numeric value.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u32> for Priority {
    type Error = IdError;

    fn try_from(p: u32) -> Result<Self, IdError> {
        if p > u32::from(Self::MAX.0) {
            return Err(IdError::PriorityOutOfRange { got: p, max: Self::MAX.0 });
        }
        Ok(Priority(p as u8))
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A fencing token: strictly increasing per pool, so a resource can reject a stale holder.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One Acquire stream, as the scheduler knows it.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct SessionId(pub u64);

/// A client-chosen request id, unique among one session's open requests.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(Arc<str>);

impl RequestId {
    /// The longest request id accepted, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validates a request id from untrusted input: 1..=128 bytes.
    pub fn parse(id: &str) -> Result<Self, IdError> {
        if id.is_empty() || id.len() > Self::MAX_LEN {
            return Err(IdError::RequestId(truncate(id, QUOTED_LEN).to_owned()));
        }
        Ok(Self(id.into()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Borrow<str> for RequestId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Shortens untrusted text before it goes into an error message.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
