//! Golden bytes: these fixtures freeze protocol versions 1 and 2 (the
//! streamed-transaction messages). A change to the encoding of any message
//! fails here; such a change needs a new protocol
//! version (see PROTOCOL.md), not an edit of these bytes.

mod common;

use bdr_protocol::{Message, Messages, decode};
use common::{golden_messages, hex, unhex};

/// (name, hex) for each message of `common::golden_messages`, spaced by
/// field for reading (see PROTOCOL.md for the layouts).
const GOLDEN: &[(&str, &str)] = &[
    (
        "startup",
        "53 01 01 07 06 6e6f64655f61 f49309 04 55544638 03",
    ),
    ("begin_local", "42 00 c8eeac0b 0002ca7de4193000 ee05"),
    (
        "begin_forwarded",
        "42 01 98d4808010 0002ca7de4193000 80d0acf30e 03 e0808018",
    ),
    ("commit", "43 c8eeac0b 60"),
    (
        "relation",
        "52 01 06 7075626c6963 10 706762656e63685f6163636f756e7473 64 04
         01 03 616964 17 01
         00 03 626964 17 01
         00 08 6162616c616e6365 17 01
         00 06 66696c6c6572 9208 b001",
    ),
    (
        "relation_user_type",
        "52 02 03 617070 05 6d6f6f6473 66 02
         01 02 6964 14 01
         02 04 6d6f6f64 868001 01 03 617070 04 6d6f6f64",
    ),
    ("insert", "49 01 04 05f2c001 0502 0500 04 54"),
    ("update", "55 01 4e 04 05f2c001 0502 05c143 04 54"),
    (
        "update_key_changed",
        "55 01 4b 04 05f2c001 00 00 00 04 05e2d006 0502 0500 0c 78 53",
    ),
    (
        "update_full",
        "55 02 4f 02 42 0000000000000009 1b 736164 02 42 0000000000000009 01",
    ),
    ("delete", "44 01 4b 04 05f2c001 00 00 00"),
    ("truncate", "54 01 03 01 02 ac02"),
    ("message", "4d 01 80eeac0b 03 626472 07 000168656c6c6f"),
    ("message_non_transactional", "4d 00 80f0ac0b 00 00"),
    // Protocol version 2.
    ("stream_start", "73 01 ee05"),
    ("stream_stop", "65"),
    ("subxact", "78 ef05"),
    ("stream_commit", "63 00 ee05 c8eeac0b 60 0002ca7de4193000"),
    ("stream_abort", "61 ee05 ef05"),
];

fn fixture(name: &str) -> Vec<u8> {
    let (_, text) = GOLDEN
        .iter()
        .find(|(n, _)| *n == name)
        .expect("fixture exists");
    unhex(text)
}

#[test]
fn every_sample_message_has_a_fixture() {
    let names: Vec<_> = golden_messages()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let fixtures: Vec<_> = GOLDEN.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, fixtures);
}

#[test]
fn encoding_matches_the_fixtures() {
    for (name, message) in golden_messages() {
        assert_eq!(
            hex(&message.to_vec()),
            hex(&fixture(name)),
            "encoding of {name} changed"
        );
    }
}

#[test]
fn fixtures_decode_to_the_messages() {
    for (name, message) in golden_messages() {
        let bytes = fixture(name);
        assert_eq!(
            decode(&bytes),
            Ok(Some((message, bytes.len()))),
            "decoding {name}"
        );
    }
}

#[test]
fn concatenated_fixtures_form_one_frame() {
    let frame: Vec<u8> = GOLDEN.iter().flat_map(|(name, _)| fixture(name)).collect();
    let decoded: Vec<Message<'_>> = Messages::new(&frame).collect::<Result<_, _>>().unwrap();
    let expected: Vec<Message<'_>> = golden_messages().into_iter().map(|(_, m)| m).collect();
    assert_eq!(decoded, expected);
}

/// The fuzzer's seed corpus holds every golden fixture and a frame of all
/// of them. When a fixture is added or changed, run this test with
/// `BDR_WRITE_SEED_CORPUS=1` to rewrite the corpus, then commit it.
#[test]
fn seed_corpus_matches_the_fixtures() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let write = std::env::var_os("BDR_WRITE_SEED_CORPUS").is_some();
    let mut frame = Vec::new();
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, _) in GOLDEN {
        expected.push(((*name).to_owned(), fixture(name)));
        frame.extend(fixture(name));
    }
    expected.push(("frame_of_all".to_owned(), frame));
    for (name, bytes) in expected {
        let path = dir.join(&name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "seed {}: {e}; rewrite with BDR_WRITE_SEED_CORPUS=1",
                path.display()
            )
        });
        assert_eq!(
            on_disk, bytes,
            "seed {name} is stale; rewrite with BDR_WRITE_SEED_CORPUS=1"
        );
    }
}
