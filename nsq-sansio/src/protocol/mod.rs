//! Wire-level vocabulary: validated names, message ids, frames and commands.

pub(crate) mod command;
pub(crate) mod frame;
pub(crate) mod identify;
pub(crate) mod message;

use std::fmt;
use std::str::FromStr;

/// The four bytes a client sends first on every connection: two spaces, `V`, `2`.
pub const MAGIC_V2: &[u8; 4] = b"  V2";

/// The longest topic or channel name nsqd accepts, `#ephemeral` suffix included.
pub const MAX_NAME_LEN: usize = 64;

const EPHEMERAL_SUFFIX: &str = "#ephemeral";

/// Why a topic or channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty or longer than [`MAX_NAME_LEN`] bytes.
    #[error("{kind} name {name:?} must be 1 to 64 characters long (is {len})")]
    Length {
        /// `"topic"` or `"channel"`.
        kind: &'static str,
        /// The refused name.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The name holds a character outside `[.a-zA-Z0-9_-]` (apart from a `#ephemeral` suffix).
    #[error("{kind} name {name:?} may only hold [.a-zA-Z0-9_-] and an optional #ephemeral suffix")]
    Character {
        /// `"topic"` or `"channel"`.
        kind: &'static str,
        /// The refused name.
        name: String,
    },
}

fn validate(kind: &'static str, name: &str) -> Result<(), NameError> {
    let len = name.len();
    if len == 0 || len > MAX_NAME_LEN {
        return Err(NameError::Length { kind, name: name.to_owned(), len });
    }
    let stem = name.strip_suffix(EPHEMERAL_SUFFIX).unwrap_or(name);
    let valid = !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(NameError::Character { kind, name: name.to_owned() })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty(Box<str>);

        impl $ty {
            /// Validates `name`: 1 to 64 bytes of `[.a-zA-Z0-9_-]`, optionally ending in `#ephemeral`.
            pub fn new(name: impl AsRef<str>) -> Result<Self, NameError> {
                let name = name.as_ref();
                validate($kind, name)?;
                Ok(Self(name.into()))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Whether the name ends in `#ephemeral`: nsqd keeps no disk queue for it and deletes it
            /// once unused.
            pub fn is_ephemeral(&self) -> bool {
                self.0.ends_with(EPHEMERAL_SUFFIX)
            }
        }

        impl FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = NameError;
            fn try_from(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A validated nsqd topic name.
    ///
    /// ```
    /// use nsq_sansio::Topic;
    /// assert!(Topic::new("events").is_ok());
    /// assert!(Topic::new("events#ephemeral").unwrap().is_ephemeral());
    /// assert!(Topic::new("bad!topic").is_err());
    /// ```
    Topic,
    "topic"
);

name_type!(
    /// A validated nsqd channel name.
    ///
    /// ```
    /// use nsq_sansio::Channel;
    /// assert!(Channel::new("archive").is_ok());
    /// assert!(Channel::new("").is_err());
    /// ```
    Channel,
    "channel"
);

/// A message id: the 16 bytes nsqd assigns (ASCII hex in practice, but treated as opaque).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

/// Two words instead of a length and a run of bytes: a connection hashes each id twice
/// (delivery and answer), at every message.
impl std::hash::Hash for MessageId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let id = u128::from_le_bytes(self.0);
        state.write_u64(id as u64);
        state.write_u64((id >> 64) as u64);
    }
}

impl MessageId {
    /// The id's raw bytes, as they go on the wire in FIN, REQ and TOUCH.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in &self.0 {
            if b.is_ascii_graphic() {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl From<[u8; 16]> for MessageId {
    fn from(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_nsqd_rules() {
        let ok = ["a", "a.b_c-d", "x#ephemeral", &"a".repeat(64), &format!("{}#ephemeral", "a".repeat(54))];
        for name in ok {
            assert!(Topic::new(name).is_ok(), "{name}");
            assert!(Channel::new(name).is_ok(), "{name}");
        }
        let bad = ["", "bad!topic", "bad/topic", "#ephemeral", "a b", "a#eph", &"a".repeat(65), "é"];
        for name in bad {
            assert!(Topic::new(name).is_err(), "{name}");
            assert!(Channel::new(name).is_err(), "{name}");
        }
        assert!(matches!(Topic::new("bad!topic"), Err(NameError::Character { kind: "topic", .. })));
        assert!(matches!(Channel::new("a".repeat(65)), Err(NameError::Length { kind: "channel", len: 65, .. })));
    }

    #[test]
    fn message_id_displays_ascii() {
        let id = MessageId(*b"0123456789abcdef");
        assert_eq!(id.to_string(), "0123456789abcdef");
    }
}
