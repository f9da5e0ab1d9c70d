//! Remote column values as statement parameters, in the format the stream
//! carried them.
//!
//! A binary datum is the type's send format and is bound in binary format,
//! so the server runs the type's receive function on it; a text datum is
//! bound in text format and goes through the type's input function. The
//! bytes are handed to the server as they came: no parsing, no copy beyond
//! the protocol buffer. The compact kinds of the protocol (`Int`,
//! `PaddedText`) are expanded back into those two forms.

use std::error::Error;

use bdr_protocol::{Datum, Oid};
use bytes::{BufMut, Bytes, BytesMut};
use tokio_postgres::types::{Format, IsNull, ToSql, Type, to_sql_checked};

/// Type OIDs of the integer types, whose values may travel as
/// [`Datum::Int`].
const INT2OID: Oid = 21;
const INT4OID: Oid = 23;
const INT8OID: Oid = 20;

/// One bound value.
#[derive(Debug, Clone)]
pub(crate) enum Param<'a> {
    Null,
    Binary(&'a [u8]),
    Text(&'a str),
    /// A fixed-width binary value of up to 8 bytes (an integer in its
    /// column type's width, an LSN, a timestamp), big-endian.
    Fixed {
        bytes: [u8; 8],
        width: usize,
    },
    /// Text followed by a run of spaces (`char(n)` padding).
    Padded {
        text: &'a str,
        spaces: u32,
    },
    /// A binary or text value that shares the received frame's buffer
    /// (see [`Param::to_shared`]), so it can outlive the borrow.
    Shared {
        bytes: Bytes,
        spaces: u32,
        text: bool,
    },
}

/// Why a datum cannot be bound.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ParamError {
    #[error(
        "an integer value was sent for a column of type oid {0}, which is not int2, int4 or int8"
    )]
    IntForNonInteger(Oid),
    #[error("integer value {value} does not fit the column's type oid {type_oid}")]
    IntOutOfRange { value: i64, type_oid: Oid },
    #[error("an unchanged TOAST value can only appear in the new row of an UPDATE")]
    UnexpectedUnchangedToast,
}

impl<'a> Param<'a> {
    /// An 8-byte binary value: `pg_lsn` and `timestamptz` travel this way.
    pub(crate) fn eight_bytes(value: u64) -> Param<'static> {
        Param::Fixed {
            bytes: value.to_be_bytes(),
            width: 8,
        }
    }

    /// A 4-byte binary value: an `oid`.
    pub(crate) fn four_bytes(value: u32) -> Param<'static> {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&value.to_be_bytes());
        Param::Fixed { bytes, width: 4 }
    }

    /// The same value without the borrow: the bytes become a reference-
    /// counted slice of `frame`, the buffer the value was decoded from
    /// (no copy). A value that is not inside `frame` is copied.
    pub(crate) fn to_shared(&self, frame: &Bytes) -> Param<'static> {
        let share = |b: &[u8]| {
            let range = frame.as_ptr_range();
            if b.is_empty() || (range.start <= b.as_ptr() && b.as_ptr_range().end <= range.end) {
                frame.slice_ref(b)
            } else {
                Bytes::copy_from_slice(b)
            }
        };
        match self {
            Param::Null => Param::Null,
            Param::Fixed { bytes, width } => Param::Fixed {
                bytes: *bytes,
                width: *width,
            },
            Param::Binary(b) => Param::Shared {
                bytes: share(b),
                spaces: 0,
                text: false,
            },
            Param::Text(t) => Param::Shared {
                bytes: share(t.as_bytes()),
                spaces: 0,
                text: true,
            },
            Param::Padded { text, spaces } => Param::Shared {
                bytes: share(text.as_bytes()),
                spaces: *spaces,
                text: true,
            },
            Param::Shared {
                bytes,
                spaces,
                text,
            } => Param::Shared {
                bytes: bytes.clone(),
                spaces: *spaces,
                text: *text,
            },
        }
    }

    /// The parameter for `datum` of a column whose remote type is
    /// `type_oid`.
    pub(crate) fn from_datum(datum: &Datum<'a>, type_oid: Oid) -> Result<Self, ParamError> {
        Ok(match *datum {
            Datum::Null => Param::Null,
            Datum::Binary(b) => Param::Binary(b),
            Datum::Text(t) => Param::Text(t),
            Datum::PaddedText { text, spaces } => Param::Padded { text, spaces },
            Datum::Int(value) => int_param(value, type_oid)?,
            Datum::UnchangedToast => return Err(ParamError::UnexpectedUnchangedToast),
        })
    }
}

fn int_param(value: i64, type_oid: Oid) -> Result<Param<'static>, ParamError> {
    let range = ParamError::IntOutOfRange { value, type_oid };
    let mut bytes = [0u8; 8];
    let width = match type_oid {
        INT2OID => {
            let v = i16::try_from(value).map_err(|_| range)?;
            bytes[..2].copy_from_slice(&v.to_be_bytes());
            2
        }
        INT4OID => {
            let v = i32::try_from(value).map_err(|_| range)?;
            bytes[..4].copy_from_slice(&v.to_be_bytes());
            4
        }
        INT8OID => {
            bytes.copy_from_slice(&value.to_be_bytes());
            8
        }
        other => return Err(ParamError::IntForNonInteger(other)),
    };
    Ok(Param::Fixed { bytes, width })
}

impl Param<'_> {
    /// Whether the value is in its type's text form (else binary; NULL
    /// counts as binary).
    pub(crate) fn is_text(&self) -> bool {
        matches!(
            self,
            Param::Text(_) | Param::Padded { .. } | Param::Shared { text: true, .. }
        )
    }
}

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self {
            Param::Null => return Ok(IsNull::Yes),
            Param::Binary(b) => out.put_slice(b),
            Param::Text(t) => out.put_slice(t.as_bytes()),
            Param::Fixed { bytes, width } => out.put_slice(&bytes[..*width]),
            Param::Padded { text, spaces } => {
                out.put_slice(text.as_bytes());
                out.put_bytes(b' ', *spaces as usize);
            }
            Param::Shared { bytes, spaces, .. } => {
                out.put_slice(bytes);
                out.put_bytes(b' ', *spaces as usize);
            }
        }
        Ok(IsNull::No)
    }

    /// The server checks the value against the column's type (its
    /// receive or input function rejects what does not fit), and the
    /// relation map has already compared the remote and local types.
    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        if self.is_text() {
            Format::Text
        } else {
            Format::Binary
        }
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(p: &Param<'_>) -> (Option<Vec<u8>>, bool) {
        let mut out = BytesMut::new();
        let null = matches!(
            p.to_sql(&Type::TEXT, &mut out).expect("encodes"),
            IsNull::Yes
        );
        let text = matches!(p.encode_format(&Type::TEXT), Format::Text);
        ((!null).then(|| out.to_vec()), text)
    }

    #[test]
    fn integers_take_the_column_width() {
        let p = Param::from_datum(&Datum::Int(-2), INT2OID).expect("fits");
        assert_eq!(encoded(&p), (Some(vec![0xff, 0xfe]), false));
        let p = Param::from_datum(&Datum::Int(258), INT4OID).expect("fits");
        assert_eq!(encoded(&p), (Some(vec![0, 0, 1, 2]), false));
        let p = Param::from_datum(&Datum::Int(1), INT8OID).expect("fits");
        assert_eq!(encoded(&p), (Some(vec![0, 0, 0, 0, 0, 0, 0, 1]), false));
        assert_eq!(
            Param::from_datum(&Datum::Int(70_000), INT2OID).unwrap_err(),
            ParamError::IntOutOfRange {
                value: 70_000,
                type_oid: INT2OID
            }
        );
        assert_eq!(
            Param::from_datum(&Datum::Int(1), 25).unwrap_err(),
            ParamError::IntForNonInteger(25)
        );
    }

    #[test]
    fn text_binary_and_null_keep_their_format() {
        let p = Param::from_datum(&Datum::Text("héllo"), 25).expect("text");
        assert_eq!(encoded(&p), (Some("héllo".as_bytes().to_vec()), true));
        let p = Param::from_datum(
            &Datum::PaddedText {
                text: "ab",
                spaces: 3,
            },
            1042,
        )
        .expect("text");
        assert_eq!(encoded(&p), (Some(b"ab   ".to_vec()), true));
        let p = Param::from_datum(&Datum::Binary(&[1, 2]), 17).expect("binary");
        assert_eq!(encoded(&p), (Some(vec![1, 2]), false));
        assert_eq!(
            encoded(&Param::from_datum(&Datum::Null, 23).expect("null")).0,
            None
        );
        assert_eq!(
            Param::from_datum(&Datum::UnchangedToast, 25).unwrap_err(),
            ParamError::UnexpectedUnchangedToast
        );
    }

    #[test]
    fn shared_values_encode_like_borrowed_ones_without_copying() {
        let frame = Bytes::from_static(b"xxhello\x01\x02ab");
        let params = [
            Param::Text(std::str::from_utf8(&frame[2..7]).expect("utf8")),
            Param::Binary(&frame[7..9]),
            Param::Padded {
                text: std::str::from_utf8(&frame[9..11]).expect("utf8"),
                spaces: 2,
            },
            Param::Null,
            Param::from_datum(&Datum::Int(7), INT4OID).expect("fits"),
            Param::Text(""),
            Param::Binary(b"elsewhere"),
        ];
        for p in &params {
            let shared = p.to_shared(&frame);
            assert_eq!(encoded(&shared), encoded(p), "{p:?}");
            if let (Param::Binary(b), Param::Shared { bytes, .. }) = (p, &shared)
                && frame.as_ptr_range().contains(&b.as_ptr())
            {
                assert_eq!(bytes.as_ptr(), b.as_ptr(), "shares the frame");
            }
        }
    }
}
