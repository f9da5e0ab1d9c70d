//! The binary send formats of PostgreSQL's fixed-width pass-by-value
//! types, read as the server's receive functions read them, for a
//! receiver that builds datums itself instead of calling one function per
//! value.
//!
//! Covered: `bool`, `float4`, `float8`, `date`, and `timestamp` /
//! `timestamptz` without a precision (type modifier -1). Values are
//! checked as `boolrecv`, `float4recv`, `float8recv`, `date_recv`,
//! `timestamp_recv` and `timestamptz_recv` check them: the exact width,
//! and for dates and timestamps the server's valid range (or infinity).
//! The datum is a 64-bit word laid out as `Datum` holds the type.

use crate::Oid;

/// The OID of `bool` (`BOOLOID`).
pub const BOOL_OID: Oid = 16;
/// The OID of `float4` (`FLOAT4OID`).
pub const FLOAT4_OID: Oid = 700;
/// The OID of `float8` (`FLOAT8OID`).
pub const FLOAT8_OID: Oid = 701;
/// The OID of `date` (`DATEOID`).
pub const DATE_OID: Oid = 1082;
/// The OID of `timestamp` (`TIMESTAMPOID`).
pub const TIMESTAMP_OID: Oid = 1114;
/// The OID of `timestamptz` (`TIMESTAMPTZOID`).
pub const TIMESTAMPTZ_OID: Oid = 1184;

/// The first valid timestamp: 4714-11-24 00:00 BC (`MIN_TIMESTAMP`), in
/// microseconds from 2000-01-01.
const MIN_TIMESTAMP: i64 = -211_813_488_000_000_000;
/// The first timestamp past the valid range: 294277-01-01 (`END_TIMESTAMP`).
const END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;
/// The first valid date, in days from 2000-01-01 (Julian day 0).
const MIN_DATE: i32 = -2_451_545;
/// The first date past the valid range (`DATE_END_JULIAN` from 2000-01-01).
const END_DATE: i32 = 2_145_031_949;

/// Why a value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ByValueError {
    /// Not the type's width.
    #[error("incorrect binary data format: {len} bytes for a value of type {type_oid}")]
    Width { type_oid: Oid, len: usize },
    /// A date outside the server's range.
    #[error("date out of range")]
    Date,
    /// A timestamp outside the server's range.
    #[error("timestamp out of range")]
    Timestamp,
}

/// The datum of the binary value `bytes` of type `type_oid` with type
/// modifier `typmod`; `None` when the type (or modifier) is not one this
/// module reads, so the type's receive function must.
pub fn datum(type_oid: Oid, typmod: i32, bytes: &[u8]) -> Option<Result<u64, ByValueError>> {
    let width = |n: usize| -> Result<(), ByValueError> {
        if bytes.len() == n {
            Ok(())
        } else {
            Err(ByValueError::Width {
                type_oid,
                len: bytes.len(),
            })
        }
    };
    let result = match type_oid {
        BOOL_OID => width(1).map(|()| u64::from(bytes[0] != 0)),
        // Float4GetDatum goes through Int32GetDatum, which sign-extends
        // (datumIsEqual compares the whole word).
        FLOAT4_OID => width(4).map(|()| i64::from(i32::from_be_bytes(four(bytes))) as u64),
        FLOAT8_OID => width(8).map(|()| u64::from_be_bytes(eight(bytes))),
        DATE_OID => width(4).and_then(|()| {
            let d = i32::from_be_bytes(four(bytes));
            let finite = d != i32::MIN && d != i32::MAX;
            if finite && !(MIN_DATE..END_DATE).contains(&d) {
                return Err(ByValueError::Date);
            }
            // Int32GetDatum sign-extends.
            Ok(i64::from(d) as u64)
        }),
        TIMESTAMP_OID | TIMESTAMPTZ_OID if typmod < 0 => width(8).and_then(|()| {
            let t = i64::from_be_bytes(eight(bytes));
            let finite = t != i64::MIN && t != i64::MAX;
            if finite && !(MIN_TIMESTAMP..END_TIMESTAMP).contains(&t) {
                return Err(ByValueError::Timestamp);
            }
            Ok(t as u64)
        }),
        _ => return None,
    };
    Some(result)
}

fn four(b: &[u8]) -> [u8; 4] {
    b.try_into().expect("width checked")
}

fn eight(b: &[u8]) -> [u8; 8] {
    b.try_into().expect("width checked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_send_formats() {
        assert_eq!(datum(BOOL_OID, -1, &[1]), Some(Ok(1)));
        assert_eq!(datum(BOOL_OID, -1, &[0]), Some(Ok(0)));
        let f = 1.5f32.to_bits().to_be_bytes();
        assert_eq!(
            datum(FLOAT4_OID, -1, &f),
            Some(Ok(u64::from(1.5f32.to_bits())))
        );
        let f = (-1.5f32).to_bits().to_be_bytes();
        assert_eq!(
            datum(FLOAT4_OID, -1, &f),
            Some(Ok(i64::from((-1.5f32).to_bits() as i32) as u64))
        );
        let f = (-2.25f64).to_bits().to_be_bytes();
        assert_eq!(datum(FLOAT8_OID, -1, &f), Some(Ok((-2.25f64).to_bits())));
        // 1999-12-31: day -1, sign-extended as Int32GetDatum does.
        assert_eq!(
            datum(DATE_OID, -1, &(-1i32).to_be_bytes()),
            Some(Ok(u64::MAX))
        );
        let t = 1_234_567i64.to_be_bytes();
        assert_eq!(datum(TIMESTAMPTZ_OID, -1, &t), Some(Ok(1_234_567)));
        assert_eq!(
            datum(TIMESTAMP_OID, -1, &(-5i64).to_be_bytes()),
            Some(Ok(-5i64 as u64))
        );
    }

    #[test]
    fn infinities_and_range_edges() {
        for t in [i64::MIN, i64::MAX, MIN_TIMESTAMP, END_TIMESTAMP - 1] {
            assert_eq!(
                datum(TIMESTAMPTZ_OID, -1, &t.to_be_bytes()),
                Some(Ok(t as u64))
            );
        }
        for t in [MIN_TIMESTAMP - 1, END_TIMESTAMP] {
            assert_eq!(
                datum(TIMESTAMP_OID, -1, &t.to_be_bytes()),
                Some(Err(ByValueError::Timestamp))
            );
        }
        for d in [i32::MIN, i32::MAX, MIN_DATE, END_DATE - 1] {
            assert!(matches!(datum(DATE_OID, -1, &d.to_be_bytes()), Some(Ok(_))));
        }
        for d in [MIN_DATE - 1, END_DATE] {
            assert_eq!(
                datum(DATE_OID, -1, &d.to_be_bytes()),
                Some(Err(ByValueError::Date))
            );
        }
    }

    #[test]
    fn wrong_widths_are_refused() {
        assert_eq!(
            datum(FLOAT8_OID, -1, &[0; 7]),
            Some(Err(ByValueError::Width {
                type_oid: FLOAT8_OID,
                len: 7
            }))
        );
        assert!(matches!(
            datum(BOOL_OID, -1, &[]),
            Some(Err(ByValueError::Width { .. }))
        ));
        assert!(matches!(
            datum(DATE_OID, -1, &[0; 8]),
            Some(Err(ByValueError::Width { .. }))
        ));
    }

    #[test]
    fn leaves_other_types_and_precisions_to_the_server() {
        // numeric, and timestamp(3): the receive function rounds.
        assert_eq!(datum(1700, -1, &[0; 8]), None);
        assert_eq!(datum(TIMESTAMPTZ_OID, 3, &[0; 8]), None);
        assert_eq!(datum(crate::INT8_OID, -1, &[0; 8]), None);
    }
}
