//! A bounds-checked cursor over an input buffer.
//!
//! Every read checks the remaining input first and reports a
//! [`DecodeError`] carrying the offset of the field; nothing here indexes
//! out of bounds, panics, or allocates. Lengths and counts are compared
//! with the protocol limit (malformed if above) and then with the
//! remaining input (truncated if above) before anything is sliced, so a
//! length of 2^62 is an error and never a huge allocation or slice.

use crate::error::DecodeError;
use crate::varint::{VarintError, read_uvarint, unzigzag};

/// Largest length of any byte or text field, and largest element count:
/// PostgreSQL's `MaxAllocSize` (1 GiB - 1), which bounds any datum.
pub const MAX_LENGTH: u64 = 0x3fff_ffff;

pub(crate) type Result<T> = std::result::Result<T, DecodeError>;

#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `buf` starting at `pos`; offsets are relative to `buf`.
    pub(crate) fn new(buf: &'a [u8], pos: usize) -> Self {
        Reader {
            buf,
            pos: pos.min(buf.len()),
        }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            offset: self.pos,
            needed,
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        let byte = *self.buf.get(self.pos).ok_or_else(|| self.truncated(1))?;
        self.pos += 1;
        Ok(byte)
    }

    /// Reads `n` bytes; `n` must already be known to be within limits.
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.truncated(n - self.remaining()));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    pub(crate) fn i64_be(&mut self) -> Result<i64> {
        let bytes = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(i64::from_be_bytes(array))
    }

    pub(crate) fn uvarint(&mut self) -> Result<u64> {
        let offset = self.pos;
        match read_uvarint(&self.buf[self.pos..]) {
            Ok((value, len)) => {
                self.pos += len;
                Ok(value)
            }
            Err(VarintError::Incomplete) => Err(self.truncated(1)),
            Err(VarintError::Overflow) => Err(DecodeError::VarintOverflow { offset }),
            Err(VarintError::Overlong) => Err(DecodeError::VarintOverlong { offset }),
        }
    }

    pub(crate) fn ivarint(&mut self) -> Result<i64> {
        self.uvarint().map(unzigzag)
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32> {
        let offset = self.pos;
        let value = self.uvarint()?;
        u32::try_from(value).map_err(|_| DecodeError::OutOfRange {
            field,
            value,
            offset,
        })
    }

    pub(crate) fn i32(&mut self, field: &'static str) -> Result<i32> {
        let offset = self.pos;
        let value = self.ivarint()?;
        i32::try_from(value).map_err(|_| DecodeError::OutOfRange {
            field,
            value: value as u64,
            offset,
        })
    }

    /// Checks a length or count read at `offset` against `limit` and then
    /// against the remaining input, assuming each unit takes at least
    /// `min_unit` bytes.
    pub(crate) fn check_len(
        &self,
        field: &'static str,
        len: u64,
        limit: u64,
        min_unit: usize,
        offset: usize,
    ) -> Result<usize> {
        let remaining = self.remaining();
        if len > limit {
            return Err(DecodeError::LengthTooLarge {
                field,
                len,
                remaining,
                offset,
            });
        }
        // len <= MAX_LENGTH, so these fit in usize on 32 and 64 bits.
        let needed = (len as usize).saturating_mul(min_unit);
        if needed > remaining {
            return Err(self.truncated(needed - remaining));
        }
        Ok(len as usize)
    }

    /// Reads a varint count of items each at least `min_unit` bytes long.
    pub(crate) fn count(
        &mut self,
        field: &'static str,
        limit: u64,
        min_unit: usize,
    ) -> Result<usize> {
        let offset = self.pos;
        let len = self.uvarint()?;
        self.check_len(field, len, limit, min_unit, offset)
    }

    /// Reads `len` raw bytes whose length was read at `offset`.
    pub(crate) fn bytes_of_len(
        &mut self,
        field: &'static str,
        len: u64,
        offset: usize,
    ) -> Result<&'a [u8]> {
        let len = self.check_len(field, len, MAX_LENGTH, 1, offset)?;
        self.take(len)
    }

    /// Reads `len` bytes of UTF-8 text whose length was read at `offset`.
    pub(crate) fn str_of_len(
        &mut self,
        field: &'static str,
        len: u64,
        offset: usize,
    ) -> Result<&'a str> {
        let start = self.pos;
        let bytes = self.bytes_of_len(field, len, offset)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 {
            field,
            offset: start,
        })
    }

    /// Reads a varint length followed by that many bytes.
    pub(crate) fn bytes(&mut self, field: &'static str) -> Result<&'a [u8]> {
        let offset = self.pos;
        let len = self.uvarint()?;
        self.bytes_of_len(field, len, offset)
    }

    /// Reads a varint length followed by that many bytes of UTF-8.
    pub(crate) fn str(&mut self, field: &'static str) -> Result<&'a str> {
        let offset = self.pos;
        let len = self.uvarint()?;
        self.str_of_len(field, len, offset)
    }

    /// Reads a flag byte, rejecting bits outside `allowed`.
    pub(crate) fn flags(&mut self, field: &'static str, allowed: u8) -> Result<u8> {
        let offset = self.pos;
        let flags = self.u8()?;
        if flags & !allowed != 0 {
            return Err(DecodeError::InvalidValue {
                field,
                value: flags.into(),
                offset,
            });
        }
        Ok(flags)
    }
}
