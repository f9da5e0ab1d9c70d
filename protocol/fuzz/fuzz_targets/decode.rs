//! Decodes arbitrary bytes as a message and as a frame of messages.
//!
//! Beyond "no panic", it checks the decoder's contracts: a decoded message
//! takes between 1 and all of the input bytes, re-encodes to exactly those
//! bytes (the encoding is canonical), and every strict prefix of it asks
//! for more bytes; error offsets lie within the input; and iterating a
//! frame agrees with calling `decode` repeatedly.

#![no_main]

use bdr_protocol::{Messages, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(Some((message, len))) => {
            assert!(len >= 1 && len <= data.len());
            assert_eq!(message.to_vec(), &data[..len], "re-encoding differs");
            for cut in 0..len {
                assert_eq!(decode(&data[..cut]), Ok(None), "prefix of {cut} bytes");
            }
        }
        Ok(None) => {}
        Err(err) => {
            assert!(!err.is_truncated());
            assert!(
                err.offset() <= data.len(),
                "offset {} beyond input",
                err.offset()
            );
        }
    }

    let mut rest = data;
    let mut offset = 0;
    for item in Messages::new(data) {
        match item {
            Ok(message) => {
                let (expected, len) = decode(rest).expect("same bytes").expect("complete");
                assert_eq!(message, expected);
                rest = &rest[len..];
                offset += len;
            }
            Err(err) => {
                assert!(err.offset() >= offset && err.offset() <= data.len());
                break;
            }
        }
    }
});
