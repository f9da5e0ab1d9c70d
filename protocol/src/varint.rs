//! Variable-length integers: unsigned LEB128, and zigzag for signed values.
//!
//! An unsigned value is written 7 bits at a time, least significant group
//! first; every byte but the last has its high bit (0x80) set. A `u64`
//! takes 1 to 10 bytes. Signed values are first mapped by zigzag
//! (0, -1, 1, -2, 2 ... become 0, 1, 2, 3, 4 ...) so that small negative
//! numbers stay short.
//!
//! Decoding is strict, so that every value has exactly one encoding:
//! a varint longer than 10 bytes, or whose tenth byte carries bits beyond
//! the 64th, is an overflow; a varint of two or more bytes whose last byte
//! is zero (a padded, non-minimal form) is overlong. Both are malformed
//! input, distinct from a varint cut short by the end of the input.

use bytes::BufMut;

/// The longest encoding of a `u64`.
pub const MAX_VARINT_LEN: usize = 10;

/// Why a varint could not be read from a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarintError {
    /// The input ended before the last byte of the varint.
    Incomplete,
    /// More than 10 bytes, or a value that does not fit in 64 bits.
    Overflow,
    /// A non-minimal encoding (a trailing zero byte).
    Overlong,
}

/// Appends `value` as unsigned LEB128.
#[inline]
pub fn put_uvarint<B: BufMut + ?Sized>(buf: &mut B, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

/// Appends `value` zigzag-encoded as unsigned LEB128.
#[inline]
pub fn put_ivarint<B: BufMut + ?Sized>(buf: &mut B, value: i64) {
    put_uvarint(buf, zigzag(value));
}

/// Appends a varint length followed by the bytes themselves.
#[inline]
pub(crate) fn put_len_prefixed<B: BufMut + ?Sized>(buf: &mut B, bytes: &[u8]) {
    put_uvarint(buf, bytes.len() as u64);
    buf.put_slice(bytes);
}

/// Maps a signed value to an unsigned one so that small magnitudes stay small.
#[inline]
pub const fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

/// Inverse of [`zigzag`].
#[inline]
pub const fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// Number of bytes [`put_uvarint`] writes for `value`.
#[inline]
pub const fn uvarint_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Reads an unsigned LEB128 value from the start of `buf`.
///
/// Returns the value and the number of bytes it took. Never reads more
/// than [`MAX_VARINT_LEN`] bytes.
#[inline]
pub fn read_uvarint(buf: &[u8]) -> Result<(u64, usize), VarintError> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            // The tenth byte may only hold bit 63 and no continuation.
            return Err(VarintError::Overflow);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return Err(VarintError::Overlong);
            }
            return Ok((value, i + 1));
        }
    }
    Err(VarintError::Incomplete)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(value: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        put_uvarint(&mut buf, value);
        buf
    }

    #[test]
    fn known_encodings() {
        assert_eq!(encode(0), [0x00]);
        assert_eq!(encode(1), [0x01]);
        assert_eq!(encode(127), [0x7f]);
        assert_eq!(encode(128), [0x80, 0x01]);
        assert_eq!(encode(300), [0xac, 0x02]);
        assert_eq!(
            encode(u64::MAX),
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
    }

    #[test]
    fn lengths_match() {
        for shift in 0..64 {
            for value in [1u64 << shift, (1u64 << shift) - 1, (1u64 << shift) + 1] {
                assert_eq!(uvarint_len(value), encode(value).len(), "value {value}");
                assert_eq!(
                    read_uvarint(&encode(value)),
                    Ok((value, encode(value).len()))
                );
            }
        }
    }

    #[test]
    fn zigzag_maps_small_magnitudes_to_small_values() {
        assert_eq!(zigzag(0), 0);
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
        assert_eq!(zigzag(i64::MIN), u64::MAX);
        for v in [0, 1, -1, 63, -64, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    #[test]
    fn rejects_bad_forms() {
        assert_eq!(read_uvarint(&[]), Err(VarintError::Incomplete));
        assert_eq!(read_uvarint(&[0x80]), Err(VarintError::Incomplete));
        assert_eq!(read_uvarint(&[0x80, 0x00]), Err(VarintError::Overlong));
        assert_eq!(read_uvarint(&[0xff; 10]), Err(VarintError::Overflow));
        assert_eq!(read_uvarint(&[0xff; 11]), Err(VarintError::Overflow));
        let mut two_to_64 = vec![0x80; 9];
        two_to_64.push(0x02);
        assert_eq!(read_uvarint(&two_to_64), Err(VarintError::Overflow));
    }
}
