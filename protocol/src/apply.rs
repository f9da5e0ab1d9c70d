//! The argument of `bdr.apply_changes`: row changes of one remote
//! transaction that the receiving node's server applies itself.
//!
//! The applier hands the changes it received (stream messages, unchanged)
//! to a function of the bdr library in its own session, with what the
//! function needs to find each relation's local table: the local table,
//! the index that finds a row by the remote replica identity, and for each
//! remote column the local column and its type. The function applies them
//! through the executor's replication routines, as PostgreSQL's own apply
//! worker does, instead of one SQL statement per change.
//!
//! ```text
//!  changes    := version:u8 (1)  count:uvarint  relation{count}  message*
//!  relation   := rel_id:uvarint  table:uvarint (oid)  index:uvarint (oid)
//!                columns:uvarint  column{columns}
//!  column     := attnum:uvarint  type:uvarint (oid)  key:u8 (0 or 1)
//!  message    := one INSERT, UPDATE or DELETE message of the stream
//! ```
//!
//! `rel_id` is the stream's id of the relation (the changes refer to it);
//! columns are in the remote order, the order of tuple data. Each
//! relation the messages refer to is described once, before them.

use bytes::BufMut;

use crate::error::DecodeError;
use crate::reader::{MAX_LENGTH, Reader};
use crate::tuple::MAX_COLUMNS;
use crate::varint::put_uvarint;
use crate::{Messages, Oid, RelId};

/// The version of the layout above.
pub const CHANGES_VERSION: u8 = 1;

/// One remote column and the local column it is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalColumn {
    /// The local column's number (`attnum`, from 1).
    pub attnum: u16,
    /// The local column's type.
    pub type_oid: Oid,
    /// Whether the column is part of the remote replica identity, which
    /// finds the row of an UPDATE or DELETE.
    pub key: bool,
}

/// A remote relation and the local table its changes are applied to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRelation {
    /// The relation's id in the stream.
    pub rel_id: RelId,
    /// The local table's OID.
    pub table: Oid,
    /// The local unique index whose columns are the replica identity's;
    /// 0 when there is none (the changes are INSERTs only).
    pub index: Oid,
    /// In the remote column order.
    pub columns: Vec<LocalColumn>,
}

impl LocalRelation {
    /// Appends the relation's description.
    pub fn encode<B: BufMut + ?Sized>(&self, buf: &mut B) {
        put_uvarint(buf, u64::from(self.rel_id));
        put_uvarint(buf, u64::from(self.table));
        put_uvarint(buf, u64::from(self.index));
        put_uvarint(buf, self.columns.len() as u64);
        for c in &self.columns {
            put_uvarint(buf, u64::from(c.attnum));
            put_uvarint(buf, u64::from(c.type_oid));
            buf.put_u8(u8::from(c.key));
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let rel_id = r.u32("relation id")?;
        let table = r.u32("table oid")?;
        let index = r.u32("index oid")?;
        let count = r.count("column count", MAX_COLUMNS, 3)?;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            let offset = r.pos();
            let attnum = r.u32("attnum")?;
            let attnum =
                u16::try_from(attnum)
                    .ok()
                    .filter(|a| *a > 0)
                    .ok_or(DecodeError::OutOfRange {
                        field: "attnum",
                        value: attnum.into(),
                        offset,
                    })?;
            let type_oid = r.u32("type oid")?;
            let key = r.flags("key flag", 1)? == 1;
            columns.push(LocalColumn {
                attnum,
                type_oid,
                key,
            });
        }
        Ok(LocalRelation {
            rel_id,
            table,
            index,
            columns,
        })
    }
}

/// Writes the head of the argument: the version and the relations the
/// messages that follow refer to.
pub fn write_changes_head<'r, B: BufMut + ?Sized>(
    buf: &mut B,
    relations: impl ExactSizeIterator<Item = &'r LocalRelation>,
) {
    buf.put_u8(CHANGES_VERSION);
    put_uvarint(buf, relations.len() as u64);
    for r in relations {
        r.encode(buf);
    }
}

/// Reads the version byte that starts an argument, which must be
/// `version`.
fn read_version(r: &mut Reader<'_>, what: &'static str, version: u8) -> Result<(), DecodeError> {
    let offset = r.pos();
    let got = r.u8()?;
    if got != version {
        return Err(DecodeError::UnsupportedVersion {
            what,
            version: got.into(),
            min: version.into(),
            max: version.into(),
            offset,
        });
    }
    Ok(())
}

/// Reads the argument: its relations, the offset where its messages
/// start, and an iterator over them (offsets in their errors count from
/// that offset).
pub fn read_changes(buf: &[u8]) -> Result<(Vec<LocalRelation>, usize, Messages<'_>), DecodeError> {
    let mut r = Reader::new(buf, 0);
    read_version(&mut r, "changes", CHANGES_VERSION)?;
    let count = r.count("relation count", MAX_LENGTH, 4)?;
    let mut relations = Vec::with_capacity(count);
    for _ in 0..count {
        relations.push(LocalRelation::decode(&mut r)?);
    }
    let start = r.pos();
    Ok((relations, start, Messages::new(&buf[start..])))
}

/// The version of the argument of `bdr.apply_transactions`.
pub const TRANSACTIONS_VERSION: u8 = 1;

/// One remote transaction in the argument of `bdr.apply_transactions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction<'a> {
    /// Its end LSN on the sending node, recorded in the replication origin
    /// with its commit.
    pub end_lsn: u64,
    /// Its commit time, recorded with it.
    pub commit_time: i64,
    /// The replication origin whose rows its UPDATEs and DELETEs may
    /// change (`None`: any); the server takes the origins of the other
    /// sessions applying the same peer's transactions (`bdr_<peer>_<n>`)
    /// as this one.
    pub origin: Option<u32>,
    /// An earlier transaction it depends on, applied by another session:
    /// this one applies only once that one has committed.
    pub after: Option<After>,
    /// Whether a transaction of another session may wait for this one:
    /// its commit wakes such a transaction.
    pub ordered: bool,
    /// Its changes, in the layout of `bdr.apply_changes`'s argument.
    pub changes: &'a [u8],
}

/// A transaction applied by another session, which one waits for before
/// it applies: it has committed once the replication origin `origin`
/// (that session's) is at `end_lsn` or past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct After {
    pub origin: u32,
    pub end_lsn: u64,
}

/// The flags of a transaction.
const HAS_ORIGIN: u8 = 0x01;
const HAS_AFTER: u8 = 0x02;
const ORDERED: u8 = 0x08;

/// Starts the argument of `bdr.apply_transactions`:
///
/// ```text
///  transactions := version:u8 (1)  transaction*  (to the end)
///  transaction  := end_lsn:uvarint  commit_time:i64
///                  flags:u8 (0x01: origin, 0x02: after, 0x08: ordered)
///                  [origin:uvarint]
///                  [after_origin:uvarint  after_end_lsn:uvarint]
///                  changes:bytes (as apply_changes takes them)
/// ```
pub fn start_transactions<B: BufMut + ?Sized>(buf: &mut B) {
    buf.put_u8(TRANSACTIONS_VERSION);
}

/// Appends one transaction after [`start_transactions`].
pub fn write_transaction<B: BufMut + ?Sized>(buf: &mut B, txn: &Transaction<'_>) {
    put_uvarint(buf, txn.end_lsn);
    buf.put_i64(txn.commit_time);
    let mut flags = 0;
    if txn.origin.is_some() {
        flags |= HAS_ORIGIN;
    }
    if txn.after.is_some() {
        flags |= HAS_AFTER;
    }
    if txn.ordered {
        flags |= ORDERED;
    }
    buf.put_u8(flags);
    if let Some(origin) = txn.origin {
        put_uvarint(buf, u64::from(origin));
    }
    if let Some(after) = txn.after {
        put_uvarint(buf, u64::from(after.origin));
        put_uvarint(buf, after.end_lsn);
    }
    put_uvarint(buf, txn.changes.len() as u64);
    buf.put_slice(txn.changes);
}

/// Reads the argument of `bdr.apply_transactions`, every transaction.
pub fn read_transactions(buf: &[u8]) -> Result<Vec<Transaction<'_>>, DecodeError> {
    let mut r = Reader::new(buf, 0);
    read_version(&mut r, "transactions", TRANSACTIONS_VERSION)?;
    let mut out = Vec::new();
    while r.remaining() > 0 {
        let end_lsn = r.uvarint()?;
        let commit_time = r.i64_be()?;
        let flags = r.flags("transaction flags", HAS_ORIGIN | HAS_AFTER | ORDERED)?;
        let origin = if flags & HAS_ORIGIN != 0 {
            Some(r.u32("origin")?)
        } else {
            None
        };
        let after = if flags & HAS_AFTER != 0 {
            Some(After {
                origin: r.u32("after origin")?,
                end_lsn: r.uvarint()?,
            })
        } else {
            None
        };
        let changes = r.bytes("changes")?;
        out.push(Transaction {
            end_lsn,
            commit_time,
            origin,
            after,
            ordered: flags & ORDERED != 0,
            changes,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Datum, Message, write_delete, write_insert};

    /// Relation `rel_id` to table 16384 by index 16390: an int4 key
    /// column (attnum 1) and a column of type `second` (attnum 3).
    fn relation_with(rel_id: RelId, second: Oid) -> LocalRelation {
        LocalRelation {
            rel_id,
            table: 16_384,
            index: 16_390,
            columns: vec![
                LocalColumn {
                    attnum: 1,
                    type_oid: 23,
                    key: true,
                },
                LocalColumn {
                    attnum: 3,
                    type_oid: second,
                    key: false,
                },
            ],
        }
    }

    fn relation() -> LocalRelation {
        relation_with(7, 25)
    }

    #[test]
    fn relations_and_messages_read_back() {
        let rel = relation();
        let mut buf = Vec::new();
        write_changes_head(&mut buf, [&rel].into_iter());
        write_insert(&mut buf, 7, &[Datum::Int(1), Datum::Text("a")]);
        write_delete(
            &mut buf,
            7,
            crate::OldKind::Key,
            &[Datum::Int(1), Datum::Null],
        );
        let (relations, start, messages) = read_changes(&buf).unwrap();
        assert_eq!(relations, vec![rel]);
        assert!(start > 1);
        let messages: Vec<Message<'_>> = messages.map(Result::unwrap).collect();
        assert_eq!(messages.len(), 2);
        assert!(matches!(&messages[0], Message::Insert(m) if m.rel_id == 7));
        assert!(matches!(&messages[1], Message::Delete(m) if m.rel_id == 7));
    }

    #[test]
    fn transactions_read_back() {
        let mut buf = Vec::new();
        start_transactions(&mut buf);
        let txns = [
            Transaction {
                end_lsn: 0x1_6b37_4d48,
                commit_time: -5,
                origin: Some(3),
                after: Some(After {
                    origin: 4,
                    end_lsn: 0x1_6b37_4c00,
                }),
                ordered: true,
                changes: &[1, 0],
            },
            Transaction {
                end_lsn: 7,
                commit_time: 1_000_000,
                origin: None,
                after: None,
                ordered: false,
                changes: &[],
            },
        ];
        for t in &txns {
            write_transaction(&mut buf, t);
        }
        assert_eq!(read_transactions(&buf).unwrap(), txns);
        assert_eq!(read_transactions(&[1]).unwrap(), vec![]);
        let err = read_transactions(&buf[..buf.len() - 1]).unwrap_err();
        assert!(matches!(err, DecodeError::Truncated { .. }), "{err}");
        let mut bad = buf.clone();
        bad[0] = 2;
        assert!(read_transactions(&bad).is_err());
    }

    #[test]
    fn the_head_has_the_bytes_of_the_spec() {
        // PROTOCOL.md: relation 1 to table 16384 by index 16390, columns
        // aid int4 (key, attnum 1) and abalance int4 (attnum 3).
        let rel = relation_with(1, 23);
        let mut buf = Vec::new();
        write_changes_head(&mut buf, [&rel].into_iter());
        assert_eq!(
            buf,
            [
                0x01, 0x01, 0x01, 0x80, 0x80, 0x01, 0x86, 0x80, 0x01, 0x02, 0x01, 0x17, 0x01, 0x03,
                0x17, 0x00
            ]
        );
    }

    #[test]
    fn a_wrong_version_or_a_bad_column_is_named() {
        let mut buf = Vec::new();
        write_changes_head(&mut buf, [&relation()].into_iter());
        let mut other = buf.clone();
        other[0] = 9;
        let err = read_changes(&other).unwrap_err();
        assert!(
            err.to_string().contains("unsupported changes version 9"),
            "{err}"
        );
        // The first column's attnum (after version, count, rel_id 7,
        // table oid (3 bytes), index oid (3 bytes), column count) as 0.
        let at = 1 + 1 + 1 + 3 + 3 + 1;
        assert_eq!(buf[at], 1);
        buf[at] = 0;
        let err = read_changes(&buf).unwrap_err();
        assert_eq!(
            err,
            DecodeError::OutOfRange {
                field: "attnum",
                value: 0,
                offset: at
            }
        );
        let err = read_changes(&buf[..at]).unwrap_err();
        assert!(matches!(err, DecodeError::Truncated { .. }), "{err}");
    }
}
