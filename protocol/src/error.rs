//! Decoding errors.
//!
//! Every offset is a byte offset into the buffer given to the decoder
//! ([`crate::decode`]) or into the frame being iterated
//! ([`crate::Messages`]), pointing at the start of the field at fault.
//!
//! [`DecodeError::Truncated`] is the only error that more input can cure:
//! [`crate::decode`] reports it as `Ok(None)` ("need more bytes"), while
//! [`crate::Messages`], which iterates a complete frame, reports it as an
//! error. Every other variant means the bytes are malformed and no amount
//! of further input makes them valid.

use thiserror::Error;

/// Why bytes could not be decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ends inside a message: at least `needed` more bytes are
    /// required to read the field starting at `offset`.
    #[error("input ends inside a message: need at least {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },

    /// The first byte of a message is not a known message tag.
    #[error("unknown message tag {tag:#04x} at offset {offset}")]
    UnknownTag { tag: u8, offset: usize },

    /// A varint is longer than 10 bytes or its value exceeds 64 bits.
    #[error("varint overflows 64 bits at offset {offset}")]
    VarintOverflow { offset: usize },

    /// A varint is padded with a trailing zero byte (non-minimal form).
    #[error("overlong (non-minimal) varint at offset {offset}")]
    VarintOverlong { offset: usize },

    /// A length or count is beyond the protocol's limit, so it cannot be
    /// valid whatever follows.
    #[error(
        "{field} of {len} at offset {offset} is beyond the limit \
         ({remaining} bytes of input remain)"
    )]
    LengthTooLarge {
        field: &'static str,
        len: u64,
        remaining: usize,
        offset: usize,
    },

    /// An integer field does not fit its type (e.g. an xid above `u32::MAX`).
    #[error("{field} value {value} at offset {offset} is out of range")]
    OutOfRange {
        field: &'static str,
        value: u64,
        offset: usize,
    },

    /// A text field is not valid UTF-8.
    #[error("{field} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str, offset: usize },

    /// A flag byte, enumeration code or datum header holds a value the
    /// protocol does not define.
    #[error("invalid {field} {value:#x} at offset {offset}")]
    InvalidValue {
        field: &'static str,
        value: u64,
        offset: usize,
    },

    /// A version number outside the range this crate implements.
    #[error("unsupported {what} version {version} at offset {offset} (supported: {min}..{max})")]
    UnsupportedVersion {
        what: &'static str,
        version: u64,
        min: u32,
        max: u32,
        offset: usize,
    },
}

impl DecodeError {
    /// True when more input could complete the message (the buffer ends
    /// inside it); false when the bytes are malformed.
    pub fn is_truncated(&self) -> bool {
        matches!(self, DecodeError::Truncated { .. })
    }

    /// The offset of the field at fault.
    pub fn offset(&self) -> usize {
        match *self {
            DecodeError::Truncated { offset, .. }
            | DecodeError::UnknownTag { offset, .. }
            | DecodeError::VarintOverflow { offset }
            | DecodeError::VarintOverlong { offset }
            | DecodeError::LengthTooLarge { offset, .. }
            | DecodeError::OutOfRange { offset, .. }
            | DecodeError::InvalidUtf8 { offset, .. }
            | DecodeError::InvalidValue { offset, .. }
            | DecodeError::UnsupportedVersion { offset, .. } => offset,
        }
    }
}

/// Why a tuple could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// A [`crate::TupleWriter`] was finished after a different number of
    /// columns than it announced. The bytes written are not a valid tuple.
    #[error("tuple announced {announced} columns but {written} were written")]
    ColumnCount { announced: usize, written: usize },
}
