//! Streamed transactions (protocol version 2): a transaction too large to
//! keep in the sender's memory goes out in blocks while it is still in
//! progress, and ends with STREAM COMMIT or STREAM ABORT.
//!
//! ```text
//!  STREAM START (xid, first) [SUBXACT] [RELATION] INSERT ... STREAM STOP
//!  BEGIN ... COMMIT                      (other transactions, whole)
//!  STREAM START (xid) ... STREAM STOP    (more of the same transaction)
//!  STREAM COMMIT (xid, LSNs, time)   or  STREAM ABORT (xid, subxid)
//! ```
//!
//! Blocks of different transactions may alternate with each other and
//! with whole transactions; a block itself is never interrupted. Inside a
//! block, SUBXACT names the (sub)transaction the changes after it belong
//! to (the block's transaction until the first SUBXACT), so that the
//! receiver can drop the changes of a subtransaction that later aborts
//! (STREAM ABORT with that subtransaction's xid). Only sent to a client
//! that asked for them with the startup option `streaming 'true'`.

use bytes::BufMut;

use crate::reader::{Reader, Result};
use crate::txn::{Origin, put_origin, read_origin};
use crate::varint::{put_ivarint, put_uvarint};
use crate::{Lsn, Timestamp, Xid, tag};

const START_FIRST: u8 = 0x01;
const COMMIT_HAS_ORIGIN: u8 = 0x01;

/// STREAM START: a block of an in-progress transaction's changes follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamStart {
    /// The (top-level) transaction's id on the sending node.
    pub xid: Xid,
    /// Whether this is the transaction's first block.
    pub first: bool,
}

/// STREAM COMMIT: the streamed transaction committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCommit {
    /// The transaction's id on the sending node.
    pub xid: Xid,
    /// The LSN of its commit record.
    pub commit_lsn: Lsn,
    /// The LSN just past the commit record.
    pub end_lsn: Lsn,
    /// Commit time (PostgreSQL `TimestampTz`).
    pub commit_time: Timestamp,
    /// Where the transaction was first committed, when not on the sending
    /// node.
    pub origin: Option<Origin>,
}

/// STREAM ABORT: a streamed transaction, or one of its subtransactions,
/// rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAbort {
    /// The top-level transaction's id.
    pub xid: Xid,
    /// The aborted (sub)transaction: equal to `xid` when the whole
    /// transaction aborted.
    pub subxid: Xid,
}

/// Appends a STREAM START message.
pub fn write_stream_start<B: BufMut + ?Sized>(buf: &mut B, m: &StreamStart) {
    buf.put_u8(tag::STREAM_START);
    buf.put_u8(if m.first { START_FIRST } else { 0 });
    put_uvarint(buf, m.xid.into());
}

pub(crate) fn read_stream_start(r: &mut Reader<'_>) -> Result<StreamStart> {
    let flags = r.flags("STREAM START flags", START_FIRST)?;
    let xid = r.u32("xid")?;
    Ok(StreamStart {
        xid,
        first: flags & START_FIRST != 0,
    })
}

/// Appends a STREAM STOP message.
pub fn write_stream_stop<B: BufMut + ?Sized>(buf: &mut B) {
    buf.put_u8(tag::STREAM_STOP);
}

/// Appends a SUBXACT message: the changes after it belong to `xid`.
pub fn write_subxact<B: BufMut + ?Sized>(buf: &mut B, xid: Xid) {
    buf.put_u8(tag::SUBXACT);
    put_uvarint(buf, xid.into());
}

pub(crate) fn read_subxact(r: &mut Reader<'_>) -> Result<Xid> {
    r.u32("subxact xid")
}

/// Appends a STREAM COMMIT message.
pub fn write_stream_commit<B: BufMut + ?Sized>(buf: &mut B, m: &StreamCommit) {
    buf.put_u8(tag::STREAM_COMMIT);
    buf.put_u8(if m.origin.is_some() {
        COMMIT_HAS_ORIGIN
    } else {
        0
    });
    put_uvarint(buf, m.xid.into());
    put_uvarint(buf, m.commit_lsn);
    put_ivarint(buf, m.end_lsn.wrapping_sub(m.commit_lsn) as i64);
    buf.put_i64(m.commit_time);
    put_origin(buf, m.origin);
}

pub(crate) fn read_stream_commit(r: &mut Reader<'_>) -> Result<StreamCommit> {
    let flags = r.flags("STREAM COMMIT flags", COMMIT_HAS_ORIGIN)?;
    let xid = r.u32("xid")?;
    let commit_lsn = r.uvarint()?;
    let delta = r.ivarint()?;
    let commit_time = r.i64_be()?;
    let origin = read_origin(r, flags & COMMIT_HAS_ORIGIN != 0)?;
    Ok(StreamCommit {
        xid,
        commit_lsn,
        end_lsn: commit_lsn.wrapping_add(delta as u64),
        commit_time,
        origin,
    })
}

/// Appends a STREAM ABORT message.
pub fn write_stream_abort<B: BufMut + ?Sized>(buf: &mut B, m: &StreamAbort) {
    buf.put_u8(tag::STREAM_ABORT);
    put_uvarint(buf, m.xid.into());
    put_uvarint(buf, m.subxid.into());
}

pub(crate) fn read_stream_abort(r: &mut Reader<'_>) -> Result<StreamAbort> {
    let xid = r.u32("xid")?;
    let subxid = r.u32("subxid")?;
    Ok(StreamAbort { xid, subxid })
}
