//! Streamed transactions: a large transaction that the peer sends in
//! blocks while it is still in progress (protocol version 2, startup
//! option `streaming`; see PROTOCOL.md). The peer then neither writes it
//! to disk nor decodes all of it before the first change goes out, and
//! the applier can apply it while the peer is still decoding.
//!
//! ```text
//!  STREAM START (first) -> a spool file; applied as it arrives when alone
//!  changes in a block   -> appended to the spool (and applied, if so)
//!  STREAM STOP          -> the block ends
//!  STREAM ABORT         -> the spool (or a subtransaction's part) dropped;
//!                          a transaction applied as it arrived rolled back
//!  STREAM COMMIT        -> COMMIT of the one applied as it arrived, or the
//!                          spool applied now, as a whole transaction
//! ```
//!
//! Every block is appended to a spool file of its transaction (an
//! anonymous temporary file, gone with the process), so memory does not
//! grow with the transaction. When a streamed transaction starts while no
//! other one is open and apply is pipelined (and not parallel), it is
//! also applied as it arrives ("direct"): a local transaction on the
//! first session (the replication origin moves there, as for any large
//! transaction), with the changes pipelined as in a large transaction.
//! Its COMMIT records the commit LSN and time that STREAM COMMIT brings,
//! so the origin's progress still commits atomically with the rows.
//!
//! Applying as it arrives stops, and the local transaction is rolled
//! back, as soon as anything would need the transaction's commit time or
//! another local transaction: a change that conflicts or fails (the
//! conflict path resolves by commit time), a whole transaction or a block
//! of another streamed transaction arriving in between (they commit first
//! on the peer, so they must commit first here), a subtransaction's abort,
//! or a commit that names another origin node. The transaction is then
//! applied from its spool when STREAM COMMIT arrives, exactly as a
//! transaction sent whole, conflicts included. Nothing of a streamed
//! transaction commits before its STREAM COMMIT, so a crash or a lost
//! connection loses nothing: the peer streams it again from its start.
//!
//! RELATION messages inside a block are taken at once (later whole
//! transactions may rely on them) and spooled, so that the spool, applied
//! later, reads its changes with the descriptions they were sent with;
//! after that, the descriptions last received outside the spool are
//! taken again.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use bdr_protocol::{
    Begin, Commit, Message, Messages, RelId, StreamAbort, StreamCommit, StreamStart, Xid, tag,
};
use bytes::Bytes;
use tracing::debug;

use super::{Applier, ApplyError};

/// The streamed transactions of one stream.
#[derive(Debug, Default)]
pub(super) struct Streams {
    /// The spool of each streamed transaction not ended yet.
    open: HashMap<Xid, Spool>,
    /// The block being received: its transaction, and the (sub)transaction
    /// of the changes that follow.
    block: Option<(Xid, Xid)>,
    /// The transaction applied as it arrives, if any.
    direct: Option<Xid>,
    /// The last RELATION received for each relation, outside a spool
    /// being applied: what the peer takes this node to know.
    relations: HashMap<RelId, Bytes>,
}

/// The messages of one streamed transaction, in a temporary file: each a
/// 4-byte little-endian length and its bytes.
#[derive(Debug)]
struct Spool {
    file: BufWriter<File>,
    len: u64,
    /// Where each subtransaction's first change is.
    subxacts: Vec<(Xid, u64)>,
}

impl Spool {
    fn new() -> std::io::Result<Spool> {
        Ok(Spool {
            file: BufWriter::with_capacity(64 << 10, tempfile::tempfile()?),
            len: 0,
            subxacts: Vec::new(),
        })
    }

    fn append(&mut self, raw: &[u8]) -> std::io::Result<()> {
        // A message is little more than bdr_protocol::MAX_LENGTH (1 GiB)
        // at most, well within 32 bits.
        let len = u32::try_from(raw.len()).map_err(std::io::Error::other)?;
        self.file.write_all(&len.to_le_bytes())?;
        self.file.write_all(raw)?;
        self.len += 4 + u64::from(len);
        Ok(())
    }

    /// Notes where `subxid`'s changes start, before the first of them.
    fn mark(&mut self, subxid: Xid) {
        if !self.subxacts.iter().any(|(x, _)| *x == subxid) {
            self.subxacts.push((subxid, self.len));
        }
    }

    /// Drops `subxid`'s changes: everything from its first change on
    /// (subtransactions started later are inside it), but for RELATION
    /// messages. Whether it had any.
    fn drop_subxact(&mut self, subxid: Xid) -> std::io::Result<bool> {
        let Some(&(_, at)) = self.subxacts.iter().find(|(x, _)| *x == subxid) else {
            return Ok(false);
        };
        self.file.flush()?;
        let file = self.file.get_mut();
        file.seek(SeekFrom::Start(at))?;
        let mut tail = Reader {
            file: BufReader::new(&mut *file),
            left: self.len - at,
        };
        let mut relations = Vec::new();
        while let Some(raw) = tail.next()? {
            if raw.first() == Some(&tag::RELATION) {
                relations.push(raw);
            }
        }
        file.set_len(at)?;
        file.seek(SeekFrom::Start(at))?;
        self.len = at;
        self.subxacts.retain(|&(_, start)| start < at);
        for raw in relations {
            self.append(&raw)?;
        }
        Ok(true)
    }

    /// The spooled messages, from the first.
    fn into_reader(self) -> std::io::Result<Reader<File>> {
        let mut file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Reader {
            file: BufReader::with_capacity(64 << 10, file),
            left: self.len,
        })
    }
}

/// Reads spooled messages.
struct Reader<F: Read> {
    file: BufReader<F>,
    left: u64,
}

impl<F: Read> Reader<F> {
    fn next(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.file.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len);
        let mut raw = vec![0u8; len as usize];
        self.file.read_exact(&mut raw)?;
        self.left = self.left.saturating_sub(4 + u64::from(len));
        Ok(Some(Bytes::from(raw)))
    }
}

impl Streams {
    /// Notes a RELATION message as the peer's latest description.
    pub(super) fn note_relation(&mut self, raw: &Bytes, msg: &Message<'_>) {
        if let Message::Relation(m) = msg {
            self.relations.insert(m.rel_id, raw.clone());
        }
    }

    /// Whether [`Applier::streamed`] has anything to do with `msg`: a
    /// message of streaming, one inside a block of a streamed
    /// transaction, or the BEGIN of a whole transaction while one is
    /// applied as it arrives.
    pub(super) fn involved(&self, msg: &Message<'_>) -> bool {
        matches!(
            msg,
            Message::StreamStart(_)
                | Message::StreamStop
                | Message::Subxact(_)
                | Message::StreamCommit(_)
                | Message::StreamAbort(_)
        ) || self.block.is_some()
            || (matches!(msg, Message::Begin(_)) && self.direct.is_some())
    }
}

impl Applier {
    /// Takes the messages of streamed transactions (and notes what a
    /// whole transaction's arrival means for one applied as it arrives);
    /// whether `msg` was taken. Only called for a message it is
    /// [`Streams::involved`] with, after [`Streams::note_relation`].
    pub(super) async fn streamed(
        &mut self,
        frame: &Bytes,
        raw: &Bytes,
        msg: &Message<'_>,
    ) -> Result<bool, ApplyError> {
        match msg {
            Message::StreamStart(m) => {
                self.stream_start(m).await?;
                return Ok(true);
            }
            Message::StreamStop => {
                if self.streams.block.take().is_none() {
                    return Err(ApplyError::UnexpectedStreamed(msg.tag()));
                }
                return Ok(true);
            }
            Message::Subxact(xid) => {
                let Some((_, sub)) = self.streams.block.as_mut() else {
                    return Err(ApplyError::UnexpectedStreamed(msg.tag()));
                };
                *sub = *xid;
                return Ok(true);
            }
            Message::StreamCommit(m) => {
                self.stream_commit(m).await?;
                return Ok(true);
            }
            Message::StreamAbort(m) => {
                self.stream_abort(m).await?;
                return Ok(true);
            }
            _ => {}
        }
        let Some((top, sub)) = self.streams.block else {
            // A whole transaction commits before the one applied as it
            // arrives: that one waits for its commit.
            if matches!(msg, Message::Begin(_)) && self.streams.direct.is_some() {
                self.abandon_direct().await?;
            }
            return Ok(false);
        };
        let Some(spool) = self.streams.open.get_mut(&top) else {
            return Err(ApplyError::UnexpectedStreamed(msg.tag()));
        };
        if sub != top && !matches!(msg, Message::Relation(_)) {
            spool.mark(sub);
        }
        spool.append(raw).map_err(ApplyError::Spool)?;
        if self.streams.direct == Some(top) {
            self.dispatch_other(frame, raw.clone(), msg).await?;
        } else if matches!(msg, Message::Relation(_)) {
            self.dispatch(msg).await?;
        }
        Ok(true)
    }

    async fn stream_start(&mut self, m: &StreamStart) -> Result<(), ApplyError> {
        if self.streams.block.is_some() {
            return Err(ApplyError::UnexpectedStreamed(tag::STREAM_START));
        }
        let known = self.streams.open.contains_key(&m.xid);
        if m.first == known {
            return Err(ApplyError::StreamedOutOfOrder {
                xid: m.xid,
                what: if known {
                    "a first block of a transaction already started"
                } else {
                    "a block of a transaction whose first block never came"
                },
            });
        }
        if m.first {
            self.streams
                .open
                .insert(m.xid, Spool::new().map_err(ApplyError::Spool)?);
        }
        self.streams.block = Some((m.xid, m.xid));
        match self.streams.direct {
            Some(xid) if xid == m.xid => {}
            // Blocks of two transactions alternate: neither is applied as
            // it arrives.
            Some(_) => self.abandon_direct().await?,
            // With parallel apply, a transaction commits through the
            // origin of the session it is dealt to: from its spool.
            None if m.first
                && self.streams.open.len() == 1
                && self.pipelined
                && !self.batch.as_ref().is_some_and(|b| b.parallel()) =>
            {
                self.go_direct(m.xid).await?;
            }
            None => {}
        }
        Ok(())
    }

    /// Starts applying streamed transaction `xid` as it arrives.
    async fn go_direct(&mut self, xid: Xid) -> Result<(), ApplyError> {
        self.leave_wire().await?;
        if self.txn.is_some() {
            return Ok(());
        }
        // Commit LSN and time come with STREAM COMMIT.
        let begin = Message::Begin(Begin {
            xid,
            final_lsn: 0,
            commit_time: 0,
            origin: None,
        });
        let raw = Bytes::from(begin.to_vec());
        self.dispatch_pipelined(&raw, raw.clone(), &begin).await?;
        self.streams.direct = Some(xid);
        debug!(xid, "applying a streamed transaction as it arrives");
        Ok(())
    }

    /// Whether a transaction is applied as it arrives.
    pub(super) fn applying_direct(&self) -> bool {
        self.streams.direct.is_some()
    }

    /// Rolls back the transaction applied as it arrives: it is applied
    /// from its spool at its commit instead.
    pub(super) async fn abandon_direct(&mut self) -> Result<(), ApplyError> {
        let Some(xid) = self.streams.direct.take() else {
            return Ok(());
        };
        self.forget_held();
        self.pipe.drain().await?;
        let why = self.pipe.failed().map(str::to_owned);
        let stale = self.pipe.failed_stale();
        self.pipe.clear();
        if self.txn.take().is_some() {
            self.client.batch_execute("ROLLBACK").await?;
        }
        debug!(
            xid,
            why = why.as_deref().unwrap_or("another transaction came first"),
            "the streamed transaction is applied at its commit instead"
        );
        if stale {
            self.remap_relations(why.as_deref().unwrap_or_default())
                .await?;
        }
        Ok(())
    }

    async fn stream_abort(&mut self, m: &StreamAbort) -> Result<(), ApplyError> {
        if self.streams.block.is_some() {
            return Err(ApplyError::UnexpectedStreamed(tag::STREAM_ABORT));
        }
        let direct = self.streams.direct == Some(m.xid);
        if m.xid == m.subxid {
            if self.streams.open.remove(&m.xid).is_none() {
                return Err(ApplyError::StreamedOutOfOrder {
                    xid: m.xid,
                    what: "an abort of a transaction that never started",
                });
            }
            debug!(xid = m.xid, "streamed transaction aborted");
            if direct {
                self.abandon_direct().await?;
            }
            return Ok(());
        }
        let Some(spool) = self.streams.open.get_mut(&m.xid) else {
            return Err(ApplyError::StreamedOutOfOrder {
                xid: m.xid,
                what: "an abort of a subtransaction of a transaction that never started",
            });
        };
        if spool.drop_subxact(m.subxid).map_err(ApplyError::Spool)? && direct {
            self.abandon_direct().await?;
        }
        Ok(())
    }

    async fn stream_commit(&mut self, m: &StreamCommit) -> Result<(), ApplyError> {
        if self.streams.block.is_some() {
            return Err(ApplyError::UnexpectedStreamed(tag::STREAM_COMMIT));
        }
        let Some(spool) = self.streams.open.remove(&m.xid) else {
            return Err(ApplyError::StreamedOutOfOrder {
                xid: m.xid,
                what: "a commit of a transaction that never started",
            });
        };
        let commit = Commit {
            commit_lsn: m.commit_lsn,
            end_lsn: m.end_lsn,
        };
        if self.streams.direct == Some(m.xid) {
            match (m.origin, self.txn.as_mut()) {
                (None, Some(open)) => {
                    open.commit_time = m.commit_time;
                    open.remote.version.commit_time = m.commit_time;
                    open.remote.commit_lsn = m.commit_lsn;
                    // As COMMIT of a whole transaction: what is held back
                    // goes out first.
                    let msg = Message::Commit(commit);
                    let raw = Bytes::from(msg.to_vec());
                    self.dispatch_pipelined(&raw, raw.clone(), &msg).await?;
                    if self.streams.direct.take().is_some() {
                        debug!(xid = m.xid, "streamed transaction committed as it arrived");
                        return Ok(());
                    }
                }
                // Its rows carry the wrong origin, or nothing is open.
                _ => self.abandon_direct().await?,
            }
        }
        debug!(
            xid = m.xid,
            bytes = spool.len,
            "applying a streamed transaction from its spool"
        );
        let begin = Begin {
            xid: m.xid,
            final_lsn: m.commit_lsn,
            commit_time: m.commit_time,
            origin: m.origin,
        };
        self.apply_raw(Bytes::from(Message::Begin(begin).to_vec()))
            .await?;
        let mut spooled_relations: HashMap<RelId, Bytes> = HashMap::new();
        let mut reader = spool.into_reader().map_err(ApplyError::Spool)?;
        while let Some(raw) = reader.next().map_err(ApplyError::Spool)? {
            if raw.first() == Some(&tag::RELATION)
                && let Some(Ok(Message::Relation(r))) = Messages::new(&raw).next()
            {
                spooled_relations.insert(r.rel_id, raw.clone());
            }
            self.apply_raw(raw).await?;
        }
        self.apply_raw(Bytes::from(Message::Commit(commit).to_vec()))
            .await?;
        // The descriptions the peer takes this node to know.
        for (rel_id, spooled) in spooled_relations {
            if let Some(last) = self.streams.relations.get(&rel_id).cloned()
                && last != spooled
                && let Some(msg) = Messages::new(&last).next()
            {
                self.dispatch(&msg?).await?;
            }
        }
        Ok(())
    }

    /// Applies one message, as if it had come whole.
    async fn apply_raw(&mut self, raw: Bytes) -> Result<(), ApplyError> {
        let Some(msg) = Messages::new(&raw).next() else {
            return Ok(());
        };
        let msg = msg?;
        self.apply(&raw, raw.clone(), &msg).await
    }

    /// Forgets the streamed transactions (a new stream starts).
    pub(super) fn forget_streams(&mut self) {
        self.streams = Streams::default();
    }
}

#[cfg(test)]
mod tests {
    use bdr_protocol::{Column, Datum, Insert, Relation, ReplicaIdentity};

    use super::*;

    fn insert(id: i64) -> Vec<u8> {
        Message::Insert(Insert {
            rel_id: 1,
            new: vec![Datum::Int(id)],
        })
        .to_vec()
    }

    fn relation(name: &'static str) -> Vec<u8> {
        Message::Relation(Relation {
            rel_id: 1,
            schema: "public",
            name,
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                key: true,
                name: "id",
                type_oid: 20,
                type_name: None,
                typmod: -1,
            }],
        })
        .to_vec()
    }

    fn read_all(spool: Spool) -> Vec<Vec<u8>> {
        let mut reader = spool.into_reader().unwrap();
        let mut out = Vec::new();
        while let Some(raw) = reader.next().unwrap() {
            out.push(raw.to_vec());
        }
        out
    }

    #[test]
    fn a_spool_gives_back_its_messages_in_order() {
        let mut spool = Spool::new().unwrap();
        let messages: Vec<Vec<u8>> = (0..1000).map(insert).collect();
        for m in &messages {
            spool.append(m).unwrap();
        }
        assert_eq!(read_all(spool), messages);
    }

    #[test]
    fn dropping_a_subtransaction_keeps_what_came_before_and_its_relations() {
        let mut spool = Spool::new().unwrap();
        spool.append(&insert(1)).unwrap();
        spool.mark(700);
        spool.append(&insert(2)).unwrap();
        spool.append(&relation("t2")).unwrap();
        // A subtransaction inside 700.
        spool.mark(701);
        spool.append(&insert(3)).unwrap();
        // Unknown or already dropped: nothing happens.
        assert!(!spool.drop_subxact(999).unwrap());
        assert!(spool.drop_subxact(700).unwrap());
        assert!(!spool.drop_subxact(701).unwrap(), "701 was inside 700");
        spool.append(&insert(4)).unwrap();
        assert_eq!(
            read_all(spool),
            [insert(1), relation("t2"), insert(4)],
            "the subtransaction's changes are gone, its RELATION stays"
        );
    }
}
