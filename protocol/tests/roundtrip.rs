//! Property tests: every message decodes back to itself, consumes exactly
//! its own bytes, and every strict prefix of it asks for more bytes.

use bdr_protocol::{
    Begin, Column, Commit, Datum, DatumFormats, Delete, Insert, LogicalMessage, MAX_LENGTH,
    Message, Messages, OldKind, OldTuple, Origin, QualifiedName, Relation, ReplicaIdentity,
    Startup, StreamAbort, StreamCommit, StreamStart, Truncate, TupleWriter, Update, decode,
    write_insert_header, write_update_header,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Strings and byte strings live for the whole test run, so that
/// generated messages can borrow them like decoded messages borrow input.
fn leaked_str(max: usize) -> impl Strategy<Value = &'static str> {
    proptest::string::string_regex(&format!("(?s).{{0,{max}}}"))
        .expect("valid regex")
        .prop_map(|s| &*Box::leak(s.into_boxed_str()))
}

fn leaked_bytes(max: usize) -> impl Strategy<Value = &'static [u8]> {
    vec(any::<u8>(), 0..=max).prop_map(|v| &*Box::leak(v.into_boxed_slice()))
}

fn datum() -> impl Strategy<Value = Datum<'static>> {
    prop_oneof![
        Just(Datum::Null),
        Just(Datum::UnchangedToast),
        leaked_bytes(40).prop_map(Datum::Binary),
        leaked_str(40).prop_map(Datum::Text),
        (leaked_str(20), 0..=(MAX_LENGTH as u32 - 100))
            .prop_map(|(text, spaces)| Datum::PaddedText { text, spaces }),
        any::<i64>().prop_map(Datum::Int),
    ]
}

fn tuple() -> impl Strategy<Value = Vec<Datum<'static>>> {
    vec(datum(), 0..12)
}

fn old_tuple() -> impl Strategy<Value = OldTuple<'static>> {
    (
        prop_oneof![Just(OldKind::Key), Just(OldKind::Full)],
        tuple(),
    )
        .prop_map(|(kind, tuple)| OldTuple { kind, tuple })
}

fn startup() -> impl Strategy<Value = Startup<'static>> {
    (
        any::<u64>(),
        leaked_str(20),
        any::<u32>(),
        leaked_str(10),
        0u8..4,
    )
        .prop_map(
            |(node_id, node_name, pg_version_num, database_encoding, bits)| Startup {
                proto_version: 1,
                node_id,
                node_name,
                pg_version_num,
                database_encoding,
                datum_formats: DatumFormats::from_bits(bits).expect("defined bits"),
            },
        )
}

fn begin() -> impl Strategy<Value = Begin> {
    let origin = proptest::option::of(
        (any::<u64>(), any::<u64>()).prop_map(|(node_id, lsn)| Origin { node_id, lsn }),
    );
    (any::<u32>(), any::<u64>(), any::<i64>(), origin).prop_map(
        |(xid, final_lsn, commit_time, origin)| Begin {
            xid,
            final_lsn,
            commit_time,
            origin,
        },
    )
}

fn column() -> impl Strategy<Value = Column<'static>> {
    let type_name = proptest::option::of(
        (leaked_str(10), leaked_str(10)).prop_map(|(schema, name)| QualifiedName { schema, name }),
    );
    (
        any::<bool>(),
        leaked_str(20),
        any::<u32>(),
        type_name,
        any::<i32>(),
    )
        .prop_map(|(key, name, type_oid, type_name, typmod)| Column {
            key,
            name,
            type_oid,
            type_name,
            typmod,
        })
}

fn relation() -> impl Strategy<Value = Relation<'static>> {
    let identity = prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ];
    (
        any::<u32>(),
        leaked_str(20),
        leaked_str(20),
        identity,
        vec(column(), 0..8),
    )
        .prop_map(
            |(rel_id, schema, name, replica_identity, columns)| Relation {
                rel_id,
                schema,
                name,
                replica_identity,
                columns,
            },
        )
}

fn message() -> impl Strategy<Value = Message<'static>> {
    prop_oneof![
        startup().prop_map(Message::Startup),
        begin().prop_map(Message::Begin),
        (any::<u64>(), any::<u64>()).prop_map(|(commit_lsn, end_lsn)| Message::Commit(Commit {
            commit_lsn,
            end_lsn
        })),
        relation().prop_map(Message::Relation),
        (any::<u32>(), tuple()).prop_map(|(rel_id, new)| Message::Insert(Insert { rel_id, new })),
        (any::<u32>(), proptest::option::of(old_tuple()), tuple())
            .prop_map(|(rel_id, old, new)| Message::Update(Update { rel_id, old, new })),
        (any::<u32>(), old_tuple())
            .prop_map(|(rel_id, old)| Message::Delete(Delete { rel_id, old })),
        (any::<bool>(), any::<bool>(), vec(any::<u32>(), 0..10)).prop_map(
            |(cascade, restart_identity, rel_ids)| Message::Truncate(Truncate {
                cascade,
                restart_identity,
                rel_ids
            })
        ),
        (
            any::<bool>(),
            any::<u64>(),
            leaked_str(20),
            leaked_bytes(60)
        )
            .prop_map(|(transactional, lsn, prefix, content)| Message::Logical(
                LogicalMessage {
                    transactional,
                    lsn,
                    prefix,
                    content
                }
            )),
        (any::<u32>(), any::<bool>())
            .prop_map(|(xid, first)| Message::StreamStart(StreamStart { xid, first })),
        Just(Message::StreamStop),
        any::<u32>().prop_map(Message::Subxact),
        (begin(), any::<u64>()).prop_map(|(b, end_lsn)| Message::StreamCommit(StreamCommit {
            xid: b.xid,
            commit_lsn: b.final_lsn,
            end_lsn,
            commit_time: b.commit_time,
            origin: b.origin,
        })),
        (any::<u32>(), any::<u32>())
            .prop_map(|(xid, subxid)| Message::StreamAbort(StreamAbort { xid, subxid })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn message_round_trips(message in message()) {
        let bytes = message.to_vec();
        prop_assert_eq!(bytes[0], message.tag());
        prop_assert_eq!(decode(&bytes), Ok(Some((message.clone(), bytes.len()))));
        // Trailing bytes belong to the next message and are not consumed.
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"junk");
        prop_assert_eq!(decode(&longer), Ok(Some((message, bytes.len()))));
    }

    #[test]
    fn every_prefix_needs_more_bytes(message in message()) {
        let bytes = message.to_vec();
        for len in 0..bytes.len() {
            prop_assert_eq!(decode(&bytes[..len]), Ok(None), "prefix of {} bytes", len);
        }
    }

    #[test]
    fn frames_of_several_messages_iterate(messages in vec(message(), 0..8)) {
        let mut frame = bytes::BytesMut::new();
        for message in &messages {
            message.encode(&mut frame);
        }
        let decoded: Result<Vec<_>, _> = Messages::new(&frame).collect();
        prop_assert_eq!(decoded, Ok(messages));
    }

    #[test]
    fn tuple_writer_matches_slice_encoding(rel_id in any::<u32>(), old in old_tuple(), new in tuple()) {
        let mut incremental = Vec::new();
        write_update_header(&mut incremental, rel_id, Some(old.kind));
        for tuple in [&old.tuple, &new] {
            let mut writer = TupleWriter::new(&mut incremental, tuple.len());
            for datum in tuple {
                writer.datum(*datum);
            }
            prop_assert!(writer.finish().is_ok());
        }
        let message = Message::Update(Update { rel_id, old: Some(old), new });
        prop_assert_eq!(incremental, message.to_vec());
    }

    #[test]
    fn text_trimmed_keeps_the_value(text in "[a-z ]{0,12}") {
        let expanded = match Datum::text_trimmed(&text) {
            Datum::Text(t) => t.to_owned(),
            Datum::PaddedText { text, spaces } => format!("{text}{}", " ".repeat(spaces as usize)),
            other => panic!("unexpected {other:?}"),
        };
        prop_assert_eq!(expanded, text);
    }
}

#[test]
fn tuple_writer_reports_a_wrong_column_count() {
    let mut buf = Vec::new();
    write_insert_header(&mut buf, 1);
    let mut writer = TupleWriter::new(&mut buf, 2);
    writer.int(1);
    assert_eq!(
        writer.finish(),
        Err(bdr_protocol::EncodeError::ColumnCount {
            announced: 2,
            written: 1
        })
    );
}
