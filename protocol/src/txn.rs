//! Transaction boundaries (BEGIN, COMMIT) and logical decoding messages
//! (MESSAGE, from `pg_logical_emit_message`).
//!
//! The commit timestamp travels once per transaction, in BEGIN, where the
//! receiver needs it before applying anything (replication origin set-up,
//! conflict resolution); COMMIT carries the commit LSN and the end LSN as
//! a delta from it (usually one byte).

use bytes::BufMut;

use crate::reader::{Reader, Result};
use crate::varint::{put_ivarint, put_len_prefixed, put_uvarint};
use crate::{Lsn, NodeId, Timestamp, Xid, tag};

const BEGIN_HAS_ORIGIN: u8 = 0x01;
const MESSAGE_TRANSACTIONAL: u8 = 0x01;

/// The node on which a transaction was first committed, and its LSN there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The origin node's identity.
    pub node_id: NodeId,
    /// The commit LSN of the transaction on the origin node.
    pub lsn: Lsn,
}

/// BEGIN: the start of a transaction's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The transaction id on the sending node.
    pub xid: Xid,
    /// The LSN of the transaction's commit record on the sending node.
    pub final_lsn: Lsn,
    /// Commit time: microseconds since 2000-01-01 00:00 UTC
    /// (PostgreSQL `TimestampTz`).
    pub commit_time: Timestamp,
    /// Where the transaction was first committed, when it was not on the
    /// sending node (`None`: it is the sending node's own transaction).
    pub origin: Option<Origin>,
}

/// COMMIT: the end of a transaction's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// The LSN of the commit record (equal to BEGIN's `final_lsn`).
    pub commit_lsn: Lsn,
    /// The LSN just past the commit record: where the receiver's progress
    /// moves once the transaction is applied.
    pub end_lsn: Lsn,
}

/// MESSAGE: a logical decoding message (`pg_logical_emit_message`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogicalMessage<'a> {
    /// Emitted as part of a transaction (between BEGIN and COMMIT) rather
    /// than immediately.
    pub transactional: bool,
    /// The LSN of the message record.
    pub lsn: Lsn,
    /// The prefix given by the emitter, identifying the message's owner.
    pub prefix: &'a str,
    /// The message's payload.
    pub content: &'a [u8],
}

/// Appends a BEGIN message.
pub fn write_begin<B: BufMut + ?Sized>(buf: &mut B, begin: &Begin) {
    buf.put_u8(tag::BEGIN);
    buf.put_u8(if begin.origin.is_some() {
        BEGIN_HAS_ORIGIN
    } else {
        0
    });
    put_uvarint(buf, begin.final_lsn);
    buf.put_i64(begin.commit_time);
    put_uvarint(buf, begin.xid.into());
    put_origin(buf, begin.origin);
}

/// Appends an origin's fields, if there is one (its presence is a flag
/// of the message).
pub(crate) fn put_origin<B: BufMut + ?Sized>(buf: &mut B, origin: Option<Origin>) {
    if let Some(origin) = origin {
        put_uvarint(buf, origin.node_id);
        put_uvarint(buf, origin.lsn);
    }
}

/// Reads an origin's fields when `present`.
pub(crate) fn read_origin(r: &mut Reader<'_>, present: bool) -> Result<Option<Origin>> {
    if !present {
        return Ok(None);
    }
    Ok(Some(Origin {
        node_id: r.uvarint()?,
        lsn: r.uvarint()?,
    }))
}

/// Reads a BEGIN message's body (after the tag).
pub(crate) fn read_begin(r: &mut Reader<'_>) -> Result<Begin> {
    let flags = r.flags("BEGIN flags", BEGIN_HAS_ORIGIN)?;
    let final_lsn = r.uvarint()?;
    let commit_time = r.i64_be()?;
    let xid = r.u32("xid")?;
    let origin = read_origin(r, flags & BEGIN_HAS_ORIGIN != 0)?;
    Ok(Begin {
        xid,
        final_lsn,
        commit_time,
        origin,
    })
}

/// Appends a COMMIT message.
pub fn write_commit<B: BufMut + ?Sized>(buf: &mut B, commit: &Commit) {
    buf.put_u8(tag::COMMIT);
    put_uvarint(buf, commit.commit_lsn);
    // Signed and wrapping so that any pair of LSNs encodes; in practice
    // the end LSN is a few dozen bytes past the commit LSN.
    put_ivarint(buf, commit.end_lsn.wrapping_sub(commit.commit_lsn) as i64);
}

/// Reads a COMMIT message's body (after the tag).
pub(crate) fn read_commit(r: &mut Reader<'_>) -> Result<Commit> {
    let commit_lsn = r.uvarint()?;
    let delta = r.ivarint()?;
    Ok(Commit {
        commit_lsn,
        end_lsn: commit_lsn.wrapping_add(delta as u64),
    })
}

/// Appends a MESSAGE message.
pub fn write_logical_message<B: BufMut + ?Sized>(buf: &mut B, message: &LogicalMessage<'_>) {
    buf.put_u8(tag::MESSAGE);
    buf.put_u8(if message.transactional {
        MESSAGE_TRANSACTIONAL
    } else {
        0
    });
    put_uvarint(buf, message.lsn);
    put_len_prefixed(buf, message.prefix.as_bytes());
    put_len_prefixed(buf, message.content);
}

/// Reads a MESSAGE message's body (after the tag).
pub(crate) fn read_logical_message<'a>(r: &mut Reader<'a>) -> Result<LogicalMessage<'a>> {
    let flags = r.flags("MESSAGE flags", MESSAGE_TRANSACTIONAL)?;
    let lsn = r.uvarint()?;
    let prefix = r.str("message prefix")?;
    let content = r.bytes("message content")?;
    Ok(LogicalMessage {
        transactional: flags & MESSAGE_TRANSACTIONAL != 0,
        lsn,
        prefix,
        content,
    })
}
