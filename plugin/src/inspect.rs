//! Looking into a slot from SQL: `bdr.decode_changes(bytea[])` turns the
//! binary rows of `pg_logical_slot_peek_binary_changes` (one protocol
//! message per row) into readable rows, with the same decoder the applier
//! uses (`bdr_protocol::Messages`). `bdr.peek_changes` (SQL, in
//! `sql/bdr--0.1.0.sql`) peeks a slot without consuming it and feeds this.
//!
//! Rendering: row images are JSON objects keyed by column name, in column
//! order. Integer datums are JSON numbers; text datums are JSON strings;
//! binary datums are read back with the column type's receive function
//! and shown as its output text (a JSON string); NULL is `null`; an
//! unchanged TOAST value is `{"unchanged_toast": true}` (an object, which
//! no other value renders as). Each row also carries the origin node and
//! commit time of the transaction it belongs to (from its BEGIN).

use std::collections::HashMap;
use std::ffi::CStr;
use std::fmt::Write;

use bdr_protocol::{Datum, Message, Messages, Relation};
use pgrx::prelude::*;
use pgrx::{PgSqlErrorCode, pg_sys};

use crate::pg;

/// ord, kind, relation, old, new, origin, commit_time.
type Row = (
    i32,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<TimestampWithTimeZone>,
);

/// Decodes protocol messages, one or more per array element; `ord` is the
/// 1-based index of the element a row comes from.
// The row type must be spelled out for pg_extern's SQL mapping.
#[allow(clippy::type_complexity)]
#[pg_extern]
fn decode_changes(
    data: Array<'_, &[u8]>,
) -> TableIterator<
    'static,
    (
        name!(ord, i32),
        name!(kind, String),
        name!(relation, Option<String>),
        name!(old, Option<String>),
        name!(new, Option<String>),
        name!(origin, Option<i64>),
        name!(commit_time, Option<TimestampWithTimeZone>),
    ),
> {
    let mut decoder = Decoder::default();
    let mut rows = Vec::new();
    for (index, frame) in data.iter().enumerate() {
        let frame: Option<&[u8]> = frame;
        let Some(frame) = frame else { continue };
        let ord = i32::try_from(index + 1).unwrap_or(i32::MAX);
        for message in Messages::new(frame) {
            let message = message.unwrap_or_else(|err| {
                pg::raise(
                    PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                    format!("bdr: element {ord} is not a valid bdr protocol message: {err}"),
                    None,
                )
            });
            rows.push(decoder.row(ord, &message));
        }
    }
    TableIterator::new(rows)
}

/// What later messages need from earlier ones.
#[derive(Default)]
struct Decoder {
    /// RELATION by id: (display name, column names and type OIDs).
    relations: HashMap<u32, (String, Vec<(String, u32)>)>,
    origin: Option<i64>,
    commit_time: Option<i64>,
}

impl Decoder {
    fn row(&mut self, ord: i32, message: &Message<'_>) -> Row {
        let (kind, relation, old, new) = match message {
            Message::Startup(s) => (
                "startup",
                None,
                None,
                Some(format!(
                    "{{\"proto_version\": {}, \"node_id\": {}, \"node_name\": {}, \"pg_version_num\": {}, \
                 \"database_encoding\": {}, \"datum_formats\": {}}}",
                    s.proto_version,
                    s.node_id as i64,
                    json_str(s.node_name),
                    s.pg_version_num,
                    json_str(s.database_encoding),
                    json_str(&s.datum_formats.to_string())
                )),
            ),
            Message::Begin(b) => {
                self.origin = b.origin.map(|o| o.node_id as i64);
                self.commit_time = Some(b.commit_time);
                let origin_lsn = b.origin.map_or("null".into(), |o| json_str(&lsn(o.lsn)));
                let new = format!(
                    "{{\"xid\": {}, \"final_lsn\": {}, \"origin_lsn\": {origin_lsn}}}",
                    b.xid,
                    json_str(&lsn(b.final_lsn))
                );
                ("begin", None, None, Some(new))
            }
            Message::Commit(c) => {
                let new = format!(
                    "{{\"commit_lsn\": {}, \"end_lsn\": {}}}",
                    json_str(&lsn(c.commit_lsn)),
                    json_str(&lsn(c.end_lsn))
                );
                ("commit", None, None, Some(new))
            }
            Message::Relation(r) => {
                let new = self.relation(r);
                (
                    "relation",
                    Some(qualified(r.schema, r.name)),
                    None,
                    Some(new),
                )
            }
            Message::Insert(i) => (
                "insert",
                self.name(i.rel_id),
                None,
                Some(self.tuple(i.rel_id, &i.new)),
            ),
            Message::Update(u) => {
                let old = u.old.as_ref().map(|o| self.tuple(u.rel_id, &o.tuple));
                (
                    "update",
                    self.name(u.rel_id),
                    old,
                    Some(self.tuple(u.rel_id, &u.new)),
                )
            }
            Message::Delete(d) => (
                "delete",
                self.name(d.rel_id),
                Some(self.tuple(d.rel_id, &d.old.tuple)),
                None,
            ),
            Message::Truncate(t) => {
                let names: Vec<String> = t.rel_ids.iter().filter_map(|id| self.name(*id)).collect();
                let new = format!(
                    "{{\"cascade\": {}, \"restart_identity\": {}}}",
                    t.cascade, t.restart_identity
                );
                ("truncate", Some(names.join(", ")), None, Some(new))
            }
            Message::Logical(m) => {
                let content = match std::str::from_utf8(m.content) {
                    Ok(text) => json_str(text),
                    Err(_) => json_str(&format!("\\x{}", hex(m.content))),
                };
                let new = format!(
                    "{{\"transactional\": {}, \"lsn\": {}, \"content\": {content}}}",
                    m.transactional,
                    json_str(&lsn(m.lsn))
                );
                ("message", Some(m.prefix.to_owned()), None, Some(new))
            }
            Message::StreamStart(m) => {
                let new = format!("{{\"xid\": {}, \"first\": {}}}", m.xid, m.first);
                ("stream_start", None, None, Some(new))
            }
            Message::StreamStop => ("stream_stop", None, None, None),
            Message::Subxact(xid) => ("subxact", None, None, Some(format!("{{\"xid\": {xid}}}"))),
            Message::StreamCommit(c) => {
                let origin_lsn = c.origin.map_or("null".into(), |o| json_str(&lsn(o.lsn)));
                let new = format!(
                    "{{\"xid\": {}, \"commit_lsn\": {}, \"end_lsn\": {}, \"origin_lsn\": {origin_lsn}}}",
                    c.xid,
                    json_str(&lsn(c.commit_lsn)),
                    json_str(&lsn(c.end_lsn))
                );
                self.origin = c.origin.map(|o| o.node_id as i64);
                self.commit_time = Some(c.commit_time);
                ("stream_commit", None, None, Some(new))
            }
            Message::StreamAbort(a) => {
                let new = format!("{{\"xid\": {}, \"subxid\": {}}}", a.xid, a.subxid);
                ("stream_abort", None, None, Some(new))
            }
        };
        let in_txn = !matches!(
            message,
            Message::Startup(_)
                | Message::StreamStart(_)
                | Message::StreamStop
                | Message::Subxact(_)
                | Message::StreamAbort(_)
        ) && !matches!(message, Message::Logical(m) if !m.transactional);
        let (origin, time) = if in_txn {
            (self.origin, self.commit_time)
        } else {
            (None, None)
        };
        if matches!(message, Message::Commit(_) | Message::StreamCommit(_)) {
            self.origin = None;
            self.commit_time = None;
        }
        let time = time.and_then(|t| TimestampWithTimeZone::try_from(t).ok());
        (ord, kind.to_owned(), relation, old, new, origin, time)
    }

    fn relation(&mut self, r: &Relation<'_>) -> String {
        let columns: Vec<(String, u32)> = r
            .columns
            .iter()
            .map(|c| (c.name.to_owned(), c.type_oid))
            .collect();
        let mut json = format!(
            "{{\"rel_id\": {}, \"replica_identity\": \"{}\", \"columns\": [",
            r.rel_id,
            r.replica_identity.code() as char
        );
        for (n, c) in r.columns.iter().enumerate() {
            let type_name = c
                .type_name
                .map_or("null".into(), |t| json_str(&qualified(t.schema, t.name)));
            let sep = if n == 0 { "" } else { ", " };
            let _ = write!(
                json,
                "{sep}{{\"name\": {}, \"type_oid\": {}, \"type_name\": {type_name}, \"typmod\": {}, \"key\": {}}}",
                json_str(c.name),
                c.type_oid,
                c.typmod,
                c.key
            );
        }
        json.push_str("]}");
        self.relations
            .insert(r.rel_id, (qualified(r.schema, r.name), columns));
        json
    }

    fn name(&self, rel_id: u32) -> Option<String> {
        Some(
            self.relations
                .get(&rel_id)
                .map_or_else(|| format!("<relation {rel_id}>"), |r| r.0.clone()),
        )
    }

    fn tuple(&self, rel_id: u32, tuple: &[Datum<'_>]) -> String {
        let columns = self
            .relations
            .get(&rel_id)
            .map(|r| r.1.as_slice())
            .unwrap_or(&[]);
        let mut json = String::from("{");
        for (n, datum) in tuple.iter().enumerate() {
            let (name, type_oid) = columns
                .get(n)
                .map_or((format!("column {}", n + 1), 0), |c| c.clone());
            let value = match datum {
                Datum::Null => "null".into(),
                Datum::UnchangedToast => "{\"unchanged_toast\": true}".into(),
                Datum::Int(v) => v.to_string(),
                Datum::Text(t) => json_str(t),
                Datum::PaddedText { text, spaces } => {
                    json_str(&format!("{text}{}", " ".repeat(*spaces as usize)))
                }
                Datum::Binary(bytes) => json_str(&binary_to_text(bytes, type_oid, &name)),
            };
            let sep = if n == 0 { "" } else { ", " };
            let _ = write!(json, "{sep}{}: {value}", json_str(&name));
        }
        json.push('}');
        json
    }
}

/// A binary datum of type `type_oid` as its text output: the receive
/// function, then the output function (as COPY BINARY does).
fn binary_to_text(bytes: &[u8], type_oid: u32, column: &str) -> String {
    let oid = pg_sys::Oid::from(type_oid);
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    // SAFETY: catalog lookups and fmgr calls in the calling transaction;
    // the StringInfo is palloc'd, NUL-terminated by appendBinaryStringInfo.
    unsafe {
        let (mut receive, mut ioparam, mut output, mut varlena) = (
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            false,
        );
        pg_sys::getTypeBinaryInputInfo(oid, &mut receive, &mut ioparam);
        pg_sys::getTypeOutputInfo(oid, &mut output, &mut varlena);
        let buf = pg_sys::makeStringInfo();
        pg_sys::appendBinaryStringInfo(buf, bytes.as_ptr().cast(), len);
        let value = pg_sys::OidReceiveFunctionCall(receive, buf, ioparam, -1);
        if (*buf).cursor != (*buf).len {
            pg::raise(
                PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION,
                format!("bdr: incorrect binary data format in column \"{column}\""),
                None,
            );
        }
        let text = pg_sys::OidOutputFunctionCall(output, value);
        CStr::from_ptr(text).to_string_lossy().into_owned()
    }
}

fn qualified(schema: &str, name: &str) -> String {
    let quote = |s: &str| {
        let plain = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !s.as_bytes()[0].is_ascii_digit();
        if plain {
            s.to_owned()
        } else {
            format!("\"{}\"", s.replace('"', "\"\""))
        }
    };
    format!("{}.{}", quote(schema), quote(name))
}

fn lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A JSON string literal.
fn json_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
