//! Tuple data: a column count, then one datum per column.
//!
//! Each datum starts with a varint header `(n << 3) | kind`. The kind says
//! how the column's value travels; `n` is the byte length of the value for
//! the kinds that carry bytes and zero otherwise:
//!
//! | kind | name            | after the header                          |
//! |------|-----------------|-------------------------------------------|
//! | 0    | null            | nothing                                   |
//! | 1    | unchanged TOAST | nothing                                   |
//! | 2    | binary          | `n` bytes: the type's send format         |
//! | 3    | text            | `n` bytes of UTF-8: the type's output     |
//! | 4    | padded text     | `n` bytes of UTF-8, varint space count    |
//! | 5    | integer         | zigzag varint                             |
//!
//! A null or an unchanged TOAST value therefore costs one byte, and a short
//! value one byte of overhead. Padded text is text followed by a run of
//! spaces that is counted rather than sent: blank-padded `char(n)` values
//! are mostly spaces. Integer carries an `int2`/`int4`/`int8` value (the
//! column's type, from RELATION, gives its width) in as few bytes as its
//! magnitude needs.
//!
//! [`TupleWriter`] appends a tuple column by column without building a
//! `Vec` of datums; [`put_tuple`] writes a slice of [`Datum`]s.

use bytes::BufMut;

use crate::Oid;
use crate::error::{DecodeError, EncodeError};
use crate::reader::{MAX_LENGTH, Reader, Result};
use crate::varint::{put_ivarint, put_uvarint};

/// The OID of `int2` (`INT2OID`).
pub const INT2_OID: Oid = 21;
/// The OID of `int4` (`INT4OID`).
pub const INT4_OID: Oid = 23;
/// The OID of `int8` (`INT8OID`).
pub const INT8_OID: Oid = 20;

/// Largest number of columns in a tuple: PostgreSQL's
/// `MaxTupleAttributeNumber`.
pub const MAX_COLUMNS: u64 = 1664;

const KIND_NULL: u64 = 0;
const KIND_UNCHANGED_TOAST: u64 = 1;
const KIND_BINARY: u64 = 2;
const KIND_TEXT: u64 = 3;
const KIND_PADDED_TEXT: u64 = 4;
const KIND_INT: u64 = 5;
const KIND_BITS: u32 = 3;
const KIND_MASK: u64 = (1 << KIND_BITS) - 1;

/// One column's value in a tuple. Borrowed: decoding does not copy the
/// value's bytes out of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Datum<'a> {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change and was not sent; the receiver
    /// keeps the value it has.
    UnchangedToast,
    /// The type's binary send format (`typsend`).
    Binary(&'a [u8]),
    /// The type's text output (`typoutput`), in UTF-8.
    Text(&'a str),
    /// Text followed by `spaces` space characters that were not sent (a
    /// blank-padded `char(n)` value). The value is `text` + `spaces` x `' '`.
    PaddedText { text: &'a str, spaces: u32 },
    /// The value of an `int2`, `int4` or `int8` column. Its binary send
    /// format is this value, big-endian, in the column type's width. The
    /// decoder does not know the column's type: a receiver must check that
    /// the value fits it, as [`IntSendFormat::new`] does.
    Int(i64),
}

impl<'a> Datum<'a> {
    /// Text, with a trailing run of two or more spaces sent as a count
    /// ([`Datum::PaddedText`]). Use for blank-padded `char(n)` output.
    pub fn text_trimmed(text: &'a str) -> Datum<'a> {
        let trimmed = text.trim_end_matches(' ');
        let spaces = text.len() - trimmed.len();
        match u32::try_from(spaces) {
            Ok(spaces) if spaces >= 2 => Datum::PaddedText {
                text: trimmed,
                spaces,
            },
            _ => Datum::Text(text),
        }
    }

    /// Appends this datum (header and value) to `buf`.
    pub fn encode<B: BufMut + ?Sized>(&self, buf: &mut B) {
        match *self {
            Datum::Null => put_uvarint(buf, KIND_NULL),
            Datum::UnchangedToast => put_uvarint(buf, KIND_UNCHANGED_TOAST),
            Datum::Binary(bytes) => put_value(buf, KIND_BINARY, bytes),
            Datum::Text(text) => put_value(buf, KIND_TEXT, text.as_bytes()),
            Datum::PaddedText { text, spaces } => {
                put_value(buf, KIND_PADDED_TEXT, text.as_bytes());
                put_uvarint(buf, spaces.into());
            }
            Datum::Int(value) => {
                put_uvarint(buf, KIND_INT);
                put_ivarint(buf, value);
            }
        }
    }
}

/// The binary send format of an integer value for a column of an
/// integer type: 2, 4 or 8 big-endian bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntSendFormat {
    bytes: [u8; 8],
    len: usize,
}

impl IntSendFormat {
    /// The value as `int2send`, `int4send` or `int8send` would produce it
    /// for a column of type `type_oid`; `None` if the type is not one of
    /// those or the value does not fit it.
    pub fn new(value: i64, type_oid: Oid) -> Option<Self> {
        let mut bytes = [0u8; 8];
        let len = match type_oid {
            INT2_OID => put_narrow::<2>(&mut bytes, i16::try_from(value).ok()?.to_be_bytes()),
            INT4_OID => put_narrow::<4>(&mut bytes, i32::try_from(value).ok()?.to_be_bytes()),
            INT8_OID => put_narrow::<8>(&mut bytes, value.to_be_bytes()),
            _ => return None,
        };
        Some(IntSendFormat { bytes, len })
    }

    /// The send format's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn put_narrow<const N: usize>(out: &mut [u8; 8], bytes: [u8; N]) -> usize {
    out[..N].copy_from_slice(&bytes);
    N
}

fn put_value<B: BufMut + ?Sized>(buf: &mut B, kind: u64, bytes: &[u8]) {
    put_uvarint(buf, ((bytes.len() as u64) << KIND_BITS) | kind);
    buf.put_slice(bytes);
}

/// Appends a whole tuple: the column count, then each datum.
pub fn put_tuple<B: BufMut + ?Sized>(buf: &mut B, columns: &[Datum<'_>]) {
    put_uvarint(buf, columns.len() as u64);
    for datum in columns {
        datum.encode(buf);
    }
}

/// Appends a tuple one column at a time, for encoders that produce each
/// value as they go (e.g. from PostgreSQL's output functions) and would
/// rather not collect them first.
///
/// ```
/// use bdr_protocol::TupleWriter;
/// let mut buf = Vec::new();
/// let mut tuple = TupleWriter::new(&mut buf, 3);
/// tuple.int(42).text("hello").null();
/// tuple.finish().unwrap();
/// ```
#[derive(Debug)]
pub struct TupleWriter<'b, B: BufMut + ?Sized> {
    buf: &'b mut B,
    announced: usize,
    written: usize,
}

impl<'b, B: BufMut + ?Sized> TupleWriter<'b, B> {
    /// Starts a tuple of `columns` columns: writes the column count.
    pub fn new(buf: &'b mut B, columns: usize) -> Self {
        put_uvarint(buf, columns as u64);
        TupleWriter {
            buf,
            announced: columns,
            written: 0,
        }
    }

    /// Appends one column.
    pub fn datum(&mut self, datum: Datum<'_>) -> &mut Self {
        datum.encode(self.buf);
        self.written += 1;
        self
    }

    /// Appends a NULL.
    pub fn null(&mut self) -> &mut Self {
        self.datum(Datum::Null)
    }

    /// Appends an unchanged TOAST marker.
    pub fn unchanged_toast(&mut self) -> &mut Self {
        self.datum(Datum::UnchangedToast)
    }

    /// Appends a value in its type's binary send format.
    pub fn binary(&mut self, bytes: &[u8]) -> &mut Self {
        self.datum(Datum::Binary(bytes))
    }

    /// Appends a value in its type's text output format.
    pub fn text(&mut self, text: &str) -> &mut Self {
        self.datum(Datum::Text(text))
    }

    /// Appends an `int2`/`int4`/`int8` value.
    pub fn int(&mut self, value: i64) -> &mut Self {
        self.datum(Datum::Int(value))
    }

    /// Columns written so far.
    pub fn written(&self) -> usize {
        self.written
    }

    /// Ends the tuple, checking that exactly the announced number of
    /// columns was written.
    pub fn finish(self) -> std::result::Result<(), EncodeError> {
        if self.written == self.announced {
            Ok(())
        } else {
            Err(EncodeError::ColumnCount {
                announced: self.announced,
                written: self.written,
            })
        }
    }
}

/// Reads one datum.
pub(crate) fn read_datum<'a>(r: &mut Reader<'a>) -> Result<Datum<'a>> {
    let offset = r.pos();
    let header = r.uvarint()?;
    let (kind, len) = (header & KIND_MASK, header >> KIND_BITS);
    if matches!(kind, KIND_NULL | KIND_UNCHANGED_TOAST | KIND_INT) && len != 0 {
        // These kinds carry no length; a non-zero one is a second encoding.
        return Err(DecodeError::InvalidValue {
            field: "datum header",
            value: header,
            offset,
        });
    }
    match kind {
        KIND_NULL => Ok(Datum::Null),
        KIND_UNCHANGED_TOAST => Ok(Datum::UnchangedToast),
        KIND_INT => Ok(Datum::Int(r.ivarint()?)),
        KIND_BINARY => Ok(Datum::Binary(r.bytes_of_len(
            "binary datum",
            len,
            offset,
        )?)),
        KIND_TEXT => Ok(Datum::Text(r.str_of_len("text datum", len, offset)?)),
        KIND_PADDED_TEXT => {
            let text = r.str_of_len("text datum", len, offset)?;
            let spaces_offset = r.pos();
            let spaces = r.uvarint()?;
            // The whole value must stay within a datum's size limit.
            let limit = MAX_LENGTH - text.len() as u64;
            r.check_len("padding", spaces, limit, 0, spaces_offset)?;
            Ok(Datum::PaddedText {
                text,
                spaces: spaces as u32,
            })
        }
        _ => Err(DecodeError::InvalidValue {
            field: "datum kind",
            value: kind,
            offset,
        }),
    }
}

/// Reads a tuple: a column count, then that many datums.
pub(crate) fn read_tuple<'a>(r: &mut Reader<'a>) -> Result<Vec<Datum<'a>>> {
    // Every datum takes at least one byte, so the count is checked
    // against the remaining input before the vector is sized from it.
    let count = r.count("column count", MAX_COLUMNS, 1)?;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        columns.push(read_datum(r)?);
    }
    Ok(columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_send_format_has_the_column_width() {
        let send = |value, oid| IntSendFormat::new(value, oid).map(|s| s.as_bytes().to_vec());
        assert_eq!(send(-2, INT2_OID), Some(vec![0xff, 0xfe]));
        assert_eq!(send(12345, INT4_OID), Some(vec![0, 0, 0x30, 0x39]));
        assert_eq!(send(1, INT8_OID), Some(vec![0, 0, 0, 0, 0, 0, 0, 1]));
        assert_eq!(send(40_000, INT2_OID), None);
        assert_eq!(send(1 << 31, INT4_OID), None);
        assert_eq!(send(1, 25), None);
    }
}
