//! Malformed and incomplete input: every case yields "need more bytes" or
//! a precise error, never a panic or a wrong message.

mod common;

use bdr_protocol::{DecodeError, Messages, decode, tag};
use common::{golden_messages, unhex};

fn decode_hex(text: &str) -> Result<Option<usize>, DecodeError> {
    decode(&unhex(text)).map(|found| found.map(|(_, len)| len))
}

#[test]
fn every_truncation_of_every_golden_message_needs_more_bytes() {
    for (name, message) in golden_messages() {
        let bytes = message.to_vec();
        for len in 0..bytes.len() {
            let prefix = &bytes[..len];
            assert_eq!(decode(prefix), Ok(None), "{name} cut to {len} bytes");
            // In a complete frame, the same cut is an error, not a message.
            let mut frame = Messages::new(prefix);
            if len > 0 {
                let err = frame.next().expect("an item").expect_err("truncated");
                assert!(err.is_truncated(), "{name} cut to {len}: {err}");
            }
            assert!(frame.next().is_none());
        }
    }
}

#[test]
fn unknown_tags_are_rejected() {
    let tags = [
        tag::STARTUP,
        tag::BEGIN,
        tag::COMMIT,
        tag::RELATION,
        tag::INSERT,
        tag::UPDATE,
        tag::DELETE,
        tag::TRUNCATE,
        tag::MESSAGE,
        tag::STREAM_START,
        tag::STREAM_STOP,
        tag::SUBXACT,
        tag::STREAM_COMMIT,
        tag::STREAM_ABORT,
    ];
    for byte in 0..=u8::MAX {
        if !tags.contains(&byte) {
            assert_eq!(
                decode(&[byte]),
                Err(DecodeError::UnknownTag {
                    tag: byte,
                    offset: 0
                })
            );
        }
    }
    // In a frame, the offset counts from the frame's start.
    let frame = unhex("43 c8eeac0b 60 7a");
    let items: Vec<_> = Messages::new(&frame).collect();
    assert_eq!(items.len(), 2);
    assert_eq!(
        items[1],
        Err(DecodeError::UnknownTag {
            tag: b'z',
            offset: 6
        })
    );
}

#[test]
fn bad_varints_are_rejected() {
    // An INSERT whose relation id is padded with a zero byte.
    assert_eq!(
        decode_hex("49 8100 00"),
        Err(DecodeError::VarintOverlong { offset: 1 })
    );
    // Eleven bytes.
    assert_eq!(
        decode_hex("49 ffffffffffffffffffffff 00"),
        Err(DecodeError::VarintOverflow { offset: 1 })
    );
    // Ten bytes whose last carries bits beyond the 64th.
    assert_eq!(
        decode_hex("43 ffffffffffffffffff02 00"),
        Err(DecodeError::VarintOverflow { offset: 1 })
    );
    // Ten continuation bytes are an overflow even before more input arrives.
    assert_eq!(
        decode_hex("43 ffffffffffffffffffff"),
        Err(DecodeError::VarintOverflow { offset: 1 })
    );
}

#[test]
fn values_out_of_range_are_rejected() {
    // xid = 2^32 in a BEGIN.
    assert_eq!(
        decode_hex("42 00 01 0000000000000000 8080808010"),
        Err(DecodeError::OutOfRange {
            field: "xid",
            value: 1 << 32,
            offset: 11
        })
    );
    // Relation id 2^32 in an INSERT.
    assert_eq!(
        decode_hex("49 8080808010 00"),
        Err(DecodeError::OutOfRange {
            field: "relation id",
            value: 1 << 32,
            offset: 1
        })
    );
    // typmod 2^31 in a RELATION column (zigzag 2^32).
    assert_eq!(
        decode_hex("52 01 00 00 64 01 00 01 61 17 8080808010"),
        Err(DecodeError::OutOfRange {
            field: "typmod",
            value: 1 << 31,
            offset: 10
        })
    );
}

#[test]
fn overlong_lengths_are_errors_not_allocations() {
    // A MESSAGE prefix of 2^62 bytes.
    assert_eq!(
        decode_hex("4d 00 00 808080808080808040 00"),
        Err(DecodeError::LengthTooLarge {
            field: "message prefix",
            len: 1 << 62,
            remaining: 1,
            offset: 3,
        })
    );
    // A tuple of 2^40 columns.
    assert_eq!(
        decode_hex("49 01 808080808020 00"),
        Err(DecodeError::LengthTooLarge {
            field: "column count",
            len: 1 << 40,
            remaining: 1,
            offset: 2,
        })
    );
    // A binary datum of 2^59 bytes.
    assert_eq!(
        decode_hex("49 01 01 828080808080808040 ff"),
        Err(DecodeError::LengthTooLarge {
            field: "binary datum",
            len: 1 << 59,
            remaining: 1,
            offset: 3,
        })
    );
    // A TRUNCATE of 2^35 relations.
    assert!(matches!(
        decode_hex("54 00 8080808080 01"),
        Err(DecodeError::LengthTooLarge {
            field: "relation count",
            ..
        })
    ));
    // Padding that would make the value larger than any datum.
    assert!(matches!(
        decode_hex("49 01 01 04 8080808004"),
        Err(DecodeError::LengthTooLarge {
            field: "padding",
            ..
        })
    ));
}

#[test]
fn plausible_lengths_beyond_the_input_need_more_bytes() {
    // 1000 columns announced, 2 bytes present: more may come.
    assert_eq!(decode_hex("49 01 e807 00 00"), Ok(None));
    // A 100-byte text datum, 3 bytes present.
    assert_eq!(decode_hex("49 01 01 a306 616263"), Ok(None));
}

#[test]
fn invalid_utf8_is_rejected() {
    assert_eq!(
        decode_hex("52 01 06 7075626c6963 02 c328 64 00"),
        Err(DecodeError::InvalidUtf8 {
            field: "relation name",
            offset: 10
        })
    );
    assert_eq!(
        decode_hex("49 01 01 13 ff ff"),
        Err(DecodeError::InvalidUtf8 {
            field: "text datum",
            offset: 4
        })
    );
}

#[test]
fn undefined_codes_and_flags_are_rejected() {
    let invalid = |field, value, offset| {
        Err(DecodeError::InvalidValue {
            field,
            value,
            offset,
        })
    };
    assert_eq!(decode_hex("42 02"), invalid("BEGIN flags", 2, 1));
    assert_eq!(decode_hex("54 04 00"), invalid("TRUNCATE flags", 4, 1));
    assert_eq!(decode_hex("4d 02"), invalid("MESSAGE flags", 2, 1));
    assert_eq!(
        decode_hex("52 01 00 00 78 00"),
        invalid("replica identity", 0x78, 4)
    );
    assert_eq!(
        decode_hex("52 01 00 00 64 01 04 00 17 01"),
        invalid("column flags", 4, 6)
    );
    assert_eq!(
        decode_hex("55 01 58 00"),
        invalid("old tuple marker", 0x58, 2)
    );
    assert_eq!(
        decode_hex("44 01 4e 00"),
        invalid("old tuple marker", 0x4e, 2)
    );
    // Datum kinds 6 and 7 do not exist; null and integer carry no length.
    assert_eq!(decode_hex("49 01 01 06"), invalid("datum kind", 6, 3));
    assert_eq!(decode_hex("49 01 01 07"), invalid("datum kind", 7, 3));
    assert_eq!(decode_hex("49 01 01 08"), invalid("datum header", 8, 3));
    assert_eq!(
        decode_hex("49 01 01 0d 00"),
        invalid("datum header", 0x0d, 3)
    );
    assert_eq!(
        decode_hex("53 01 01 07 00 00 00 04"),
        invalid("datum formats", 4, 7)
    );
}

#[test]
fn unsupported_versions_are_rejected() {
    assert_eq!(
        decode_hex("53 02 01"),
        Err(DecodeError::UnsupportedVersion {
            what: "startup",
            version: 2,
            min: 1,
            max: 1,
            offset: 1
        })
    );
    assert_eq!(
        decode_hex("53 01 00"),
        Err(DecodeError::UnsupportedVersion {
            what: "protocol",
            version: 0,
            min: 1,
            max: 2,
            offset: 2
        })
    );
    let err = decode(&unhex("53 01 03")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported protocol version 3 at offset 2 (supported: 1..2)"
    );
}

#[test]
fn errors_read_well() {
    let err = decode(&unhex("4d 00 00 808080808080808040 00")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "message prefix of 4611686018427387904 at offset 3 is beyond the limit \
         (1 bytes of input remain)"
    );
    assert_eq!(
        DecodeError::UnknownTag {
            tag: b'z',
            offset: 6
        }
        .to_string(),
        "unknown message tag 0x7a at offset 6"
    );
}

/// The decoder's contracts on one input (the fuzz target checks the same).
fn check_contracts(data: &[u8]) {
    match decode(data) {
        Ok(Some((message, len))) => {
            assert!(len >= 1 && len <= data.len());
            assert_eq!(message.to_vec(), &data[..len], "encoding is not canonical");
        }
        Ok(None) => {}
        Err(err) => {
            assert!(!err.is_truncated());
            assert!(err.offset() <= data.len());
        }
    }
    for item in Messages::new(data) {
        if let Err(err) = item {
            assert!(err.offset() <= data.len());
        }
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn golden_bytes() -> impl Strategy<Value = Vec<u8>> {
        let all: Vec<Vec<u8>> = golden_messages().iter().map(|(_, m)| m.to_vec()).collect();
        proptest::sample::select(all)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        #[test]
        fn arbitrary_bytes_keep_the_contracts(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            check_contracts(&data);
        }

        #[test]
        fn mutated_golden_messages_keep_the_contracts(
            bytes in golden_bytes(),
            at in any::<prop::sample::Index>(),
            value in any::<u8>(),
            how in 0u8..3,
        ) {
            let mut data = bytes;
            let i = at.index(data.len());
            match how {
                0 => data[i] = value,
                1 => data.insert(i, value),
                _ => { data.remove(i); }
            }
            check_contracts(&data);
        }
    }
}
