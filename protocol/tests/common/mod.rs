//! Sample messages shared by the golden, malformed-input and size tests.

#![allow(dead_code)]

use bdr_protocol::{
    Begin, Column, Commit, Datum, DatumFormats, Delete, Insert, LogicalMessage, Message, OldKind,
    OldTuple, Origin, QualifiedName, Relation, ReplicaIdentity, Startup, StreamAbort, StreamCommit,
    StreamStart, Truncate, Update,
};

/// 2024-11-15 12:00:00 UTC as a PostgreSQL timestamp.
pub const COMMIT_TIME: i64 = 785_592_000_000_000;

fn column(name: &'static str, type_oid: u32, typmod: i32, key: bool) -> Column<'static> {
    Column {
        key,
        name,
        type_oid,
        type_name: None,
        typmod,
    }
}

/// `pgbench_accounts`: aid int4 (key), bid int4, abalance int4, filler char(84).
pub fn pgbench_accounts() -> Relation<'static> {
    Relation {
        rel_id: 1,
        schema: "public",
        name: "pgbench_accounts",
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            column("aid", 23, -1, true),
            column("bid", 23, -1, false),
            column("abalance", 23, -1, false),
            // typmod of char(n) is n + 4 (VARHDRSZ).
            column("filler", 1042, 88, false),
        ],
    }
}

fn relation_with_user_type() -> Relation<'static> {
    Relation {
        rel_id: 2,
        schema: "app",
        name: "moods",
        replica_identity: ReplicaIdentity::Full,
        columns: vec![
            column("id", 20, -1, true),
            Column {
                key: false,
                name: "mood",
                type_oid: 16390,
                type_name: Some(QualifiedName {
                    schema: "app",
                    name: "mood",
                }),
                typmod: -1,
            },
        ],
    }
}

/// The row messages of a pgbench-like transaction and the rest of the
/// message kinds, each with a stable name.
pub fn golden_messages() -> Vec<(&'static str, Message<'static>)> {
    let aid_key = vec![Datum::Int(12345), Datum::Null, Datum::Null, Datum::Null];
    vec![
        (
            "startup",
            Message::Startup(Startup {
                proto_version: 1,
                node_id: 7,
                node_name: "node_a",
                pg_version_num: 150004,
                database_encoding: "UTF8",
                datum_formats: DatumFormats::TEXT.union(DatumFormats::BINARY),
            }),
        ),
        (
            "begin_local",
            Message::Begin(Begin {
                xid: 750,
                final_lsn: 0x16B_3748,
                commit_time: COMMIT_TIME,
                origin: None,
            }),
        ),
        (
            "begin_forwarded",
            Message::Begin(Begin {
                xid: 4_000_000_000,
                final_lsn: 0x1_0000_2A18,
                commit_time: COMMIT_TIME,
                origin: Some(Origin {
                    node_id: 3,
                    lsn: 0x300_0060,
                }),
            }),
        ),
        (
            "commit",
            Message::Commit(Commit {
                commit_lsn: 0x16B_3748,
                end_lsn: 0x16B_3778,
            }),
        ),
        ("relation", Message::Relation(pgbench_accounts())),
        (
            "relation_user_type",
            Message::Relation(relation_with_user_type()),
        ),
        (
            "insert",
            Message::Insert(Insert {
                rel_id: 1,
                new: vec![
                    Datum::Int(12345),
                    Datum::Int(1),
                    Datum::Int(0),
                    Datum::PaddedText {
                        text: "",
                        spaces: 84,
                    },
                ],
            }),
        ),
        (
            "update",
            Message::Update(Update {
                rel_id: 1,
                old: None,
                new: vec![
                    Datum::Int(12345),
                    Datum::Int(1),
                    Datum::Int(-4321),
                    Datum::PaddedText {
                        text: "",
                        spaces: 84,
                    },
                ],
            }),
        ),
        (
            "update_key_changed",
            Message::Update(Update {
                rel_id: 1,
                old: Some(OldTuple {
                    kind: OldKind::Key,
                    tuple: aid_key.clone(),
                }),
                new: vec![
                    Datum::Int(54321),
                    Datum::Int(1),
                    Datum::Int(0),
                    Datum::PaddedText {
                        text: "x",
                        spaces: 83,
                    },
                ],
            }),
        ),
        (
            "update_full",
            Message::Update(Update {
                rel_id: 2,
                old: Some(OldTuple {
                    kind: OldKind::Full,
                    tuple: vec![Datum::Binary(&[0, 0, 0, 0, 0, 0, 0, 9]), Datum::Text("sad")],
                }),
                new: vec![
                    Datum::Binary(&[0, 0, 0, 0, 0, 0, 0, 9]),
                    Datum::UnchangedToast,
                ],
            }),
        ),
        (
            "delete",
            Message::Delete(Delete {
                rel_id: 1,
                old: OldTuple {
                    kind: OldKind::Key,
                    tuple: aid_key,
                },
            }),
        ),
        (
            "truncate",
            Message::Truncate(Truncate {
                cascade: true,
                restart_identity: false,
                rel_ids: vec![1, 2, 300],
            }),
        ),
        (
            "message",
            Message::Logical(LogicalMessage {
                transactional: true,
                lsn: 0x16B_3700,
                prefix: "bdr",
                content: b"\x00\x01hello",
            }),
        ),
        (
            "message_non_transactional",
            Message::Logical(LogicalMessage {
                transactional: false,
                lsn: 0x16B_3800,
                prefix: "",
                content: b"",
            }),
        ),
        // Protocol version 2.
        (
            "stream_start",
            Message::StreamStart(StreamStart {
                xid: 750,
                first: true,
            }),
        ),
        ("stream_stop", Message::StreamStop),
        ("subxact", Message::Subxact(751)),
        (
            "stream_commit",
            Message::StreamCommit(StreamCommit {
                xid: 750,
                commit_lsn: 0x16B_3748,
                end_lsn: 0x16B_3778,
                commit_time: 0x0002_ca7d_e419_3000,
                origin: None,
            }),
        ),
        (
            "stream_abort",
            Message::StreamAbort(StreamAbort {
                xid: 750,
                subxid: 751,
            }),
        ),
    ]
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of a hex string; whitespace is ignored.
pub fn unhex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).expect("ascii"), 16).expect("hex"))
        .collect()
}
