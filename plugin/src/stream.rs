//! The state of one decoding stream (one decoding context: a walsender's
//! `START_REPLICATION`, or one SQL-level slot function call), and the
//! translation of each decoded event into protocol messages.
//!
//! ```text
//!  begin_cb   -> remember: BEGIN not sent yet
//!  change_cb  -> [STARTUP] [BEGIN] [RELATION] INSERT/UPDATE/DELETE
//!  truncate_cb-> [STARTUP] [BEGIN] [RELATION...] TRUNCATE
//!  message_cb -> [STARTUP] [BEGIN] MESSAGE   (transactional)
//!                [STARTUP] MESSAGE           (non-transactional)
//!  commit_cb  -> COMMIT, or nothing if BEGIN was never sent
//!
//!  stream_start_cb  -> [STARTUP] STREAM START
//!  stream change, truncate, message -> [SUBXACT] as above, without BEGIN
//!  stream_stop_cb   -> STREAM STOP
//!  stream_commit_cb -> STREAM COMMIT;  stream_abort_cb -> STREAM ABORT
//! ```
//!
//! Streaming (protocol version 2, startup option `streaming 'true'`):
//! PostgreSQL hands a transaction over in blocks while it is in progress
//! once the changes it holds in memory pass `logical_decoding_work_mem`,
//! instead of writing them to disk and sending them after the commit
//! (reorderbuffer.c, ReorderBufferCheckMemoryLimit). Inside a block,
//! SUBXACT precedes a change whenever the (sub)transaction it belongs to
//! differs from the previous change's.
//!
//! Invariants:
//! - STARTUP is the first message of every stream, written just before the
//!   first other message (a stream that only sees skipped transactions
//!   writes nothing at all).
//! - BEGIN is written lazily, before the transaction's first message, so a
//!   transaction with nothing to send (catalog-only, or all of its changes
//!   filtered) produces no output, as in pgoutput.c.
//! - A transaction's messages are encoded one after the other into one
//!   reusable buffer and written together (`OutputPluginPrepareWrite` /
//!   `OutputPluginWrite`, one copy into `ctx->out`) at its COMMIT, or
//!   whenever [`BATCH_BYTES`] have gathered: messages delimit themselves,
//!   so a write holds any number of them, and a small transaction costs
//!   the walsender one write instead of one per message. A
//!   non-transactional MESSAGE is written at once.
//! - In a walsender that has WAL to read beyond the current page, a
//!   committed transaction stays in the buffer for the ones after it
//!   ([`Stream::may_hold`]): each write costs the walsender a `send`, and
//!   a backlog of small transactions goes out some 8 KB of WAL at a time
//!   instead of one transaction per write. What is held is written before
//!   the reader reads another page ([`read_page`]), so before the
//!   walsender waits for WAL or sends a keepalive from there, and before a
//!   skipped transaction's progress (which may send one). The keepalive
//!   the walsender sends between records when the client has been silent
//!   for half of `wal_sender_timeout` asks for a reply and can pass held
//!   transactions, as can the answer to a client that asks for a reply:
//!   the applier (`applier/src/peer.rs`) never asks, and takes the
//!   position of a keepalive that asks as everything sent only when it
//!   comes twice in a row, with no data in between. The walsender
//!   decodes no record between the two, which it does only once caught
//!   up (nothing held then) or while the socket is full, and nothing is
//!   held then either: a transaction is held only while the socket takes
//!   what was written, and the first keepalive has left once the client
//!   answers it.
//! - Everything a change allocates in PostgreSQL (detoasted values, send
//!   and output function results, names) lives in `change_cxt`, which is
//!   reset after every change, so memory does not grow with the size of a
//!   transaction.
//! - The state lives as long as the decoding context's memory context
//!   (`ctx->context`): it is dropped when that context is deleted, also
//!   when decoding ends with an ERROR and the shutdown callback never runs.

use bdr_protocol::{
    Begin, Commit, LogicalMessage, NodeId, OldKind, Origin, ReplicaIdentity, Startup, StreamAbort,
    StreamCommit, StreamStart, write_begin, write_commit, write_delete_header, write_insert_header,
    write_logical_message, write_startup, write_stream_abort, write_stream_commit,
    write_stream_start, write_stream_stop, write_subxact, write_truncate, write_update_header,
};
use pgrx::{PgSqlErrorCode, pg_sys};

use crate::datum::write_tuple;
use crate::node;
use crate::pg;
use crate::relation::{RelCache, RelEntry};
use crate::startup::{self, Agreed};

/// Buffers larger than this are shrunk after use, so one huge row does
/// not pin its size for the rest of the stream.
const MAX_KEPT_BUFFER: usize = 1 << 20;

/// Encoded messages are written once they reach this size, even before
/// their transaction's COMMIT.
const BATCH_BYTES: usize = 64 << 10;

/// The per-stream state, in `ctx->output_plugin_private`.
#[derive(Debug)]
pub struct Stream {
    agreed: Agreed,
    node_id: NodeId,
    node_name: String,
    database_encoding: String,
    pg_version_num: u32,
    utf8_db: bool,
    startup_sent: bool,
    begin_sent: bool,
    /// Encoding buffer, reused for every message.
    buf: Vec<u8>,
    /// Deformed tuple, reused for every tuple.
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    /// Relation ids of one TRUNCATE, reused.
    rel_ids: Vec<u32>,
    /// Node ids of the replication origins seen, by origin id.
    origins: Vec<(u16, NodeId)>,
    relations: RelCache,
    change_cxt: pg_sys::MemoryContext,
    guc_level: Option<i32>,
    /// Inside a block of a streamed transaction: the (sub)transaction of
    /// the last change written.
    streaming_xid: Option<u32>,
    /// Where the change being written started in `buf`, until it is
    /// complete (an ERROR can stop a streamed change half-way).
    change_start: Option<usize>,
    /// The WAL reader's own page callback, when [`Stream::wrap_reader`]
    /// put [`read_page`] in its place (in a walsender).
    page_read: pg_sys::XLogPageReadCB,
    /// Whether `buf` ends with committed transactions not written yet.
    held: bool,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.relations.deactivate();
    }
}

impl Stream {
    /// Creates the stream for `ctx` (its options already agreed) in
    /// `ctx->context`, and returns it pinned there.
    ///
    /// # Safety
    /// `ctx` must be the live decoding context, in its start-up callback.
    pub unsafe fn create(ctx: &mut pg_sys::LogicalDecodingContext, agreed: Agreed) -> *mut Stream {
        let utf8_db = pg::database_is_utf8();
        let binary = agreed
            .negotiated
            .datum_formats
            .contains(bdr_protocol::DatumFormats::BINARY);
        // SAFETY: ctx->context lives until FreeDecodingContext.
        let (change_cxt, cache_cxt) = unsafe {
            (
                pg::new_context(ctx.context, c"bdr change"),
                pg::new_context(ctx.context, c"bdr relations"),
            )
        };
        let stream = Stream {
            agreed,
            node_id: node::local_node_id(),
            node_name: startup::local_node_name(),
            database_encoding: startup::database_encoding(),
            pg_version_num: startup::server_version_num(),
            utf8_db,
            startup_sent: false,
            begin_sent: false,
            buf: Vec::with_capacity(8192),
            values: Vec::new(),
            nulls: Vec::new(),
            rel_ids: Vec::new(),
            origins: Vec::new(),
            relations: RelCache::new(cache_cxt, utf8_db, binary),
            change_cxt,
            guc_level: startup::pin_settings(),
            streaming_xid: None,
            change_start: None,
            page_read: None,
            held: false,
        };
        let ptr = pgrx::PgMemoryContexts::For(ctx.context).leak_and_drop_on_delete(stream);
        // SAFETY: the box behind ptr never moves until it is dropped, and
        // Drop deactivates the cache.
        unsafe { (*ptr).relations.activate() };
        ptr
    }

    /// Whether changes from other origins are sent.
    pub fn forwards_origins(&self) -> bool {
        self.agreed.options.forward_origins
    }

    /// The shutdown callback: restores the session settings. The rest is
    /// freed with the decoding context.
    pub fn shutdown(&mut self) {
        startup::unpin_settings(self.guc_level.take());
        self.relations.deactivate();
    }

    /// A message is complete in `self.buf`: written out once the batch is
    /// large enough.
    unsafe fn end_message(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) {
        if self.buf.len() >= BATCH_BYTES {
            // SAFETY: per the caller.
            unsafe { self.flush(ctx) };
        }
    }

    /// Writes the messages in `self.buf` to the client, if any.
    unsafe fn flush(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) {
        if self.buf.is_empty() {
            return;
        }
        let len = i32::try_from(self.buf.len()).unwrap_or_else(|_| {
            pg::raise(
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!(
                    "bdr: message of {} bytes is too large to send",
                    self.buf.len()
                ),
                None,
            )
        });
        // SAFETY: ctx is live; out is its output StringInfo, prepared by
        // OutputPluginPrepareWrite.
        unsafe {
            pg_sys::OutputPluginPrepareWrite(ctx, true);
            pg_sys::appendBinaryStringInfo((*ctx).out, self.buf.as_ptr().cast(), len);
            pg_sys::OutputPluginWrite(ctx, true);
        }
        self.buf.clear();
        self.held = false;
        // What a change half-way written still has in the buffer starts
        // at its beginning now.
        if self.change_start.is_some() {
            self.change_start = Some(0);
        }
        if self.buf.capacity() > MAX_KEPT_BUFFER {
            self.buf.shrink_to(MAX_KEPT_BUFFER / 16);
        }
    }

    unsafe fn ensure_startup(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) {
        if self.startup_sent {
            return;
        }
        let startup = Startup {
            proto_version: self.agreed.negotiated.proto_version,
            node_id: self.node_id,
            node_name: &self.node_name,
            pg_version_num: self.pg_version_num,
            database_encoding: &self.database_encoding,
            datum_formats: self.agreed.negotiated.datum_formats,
        };
        write_startup(&mut self.buf, &startup);
        // SAFETY: per the caller.
        unsafe { self.end_message(ctx) };
        self.startup_sent = true;
    }

    /// The begin callback: BEGIN waits for the first message.
    pub fn begin(&mut self) {
        self.begin_sent = false;
    }

    unsafe fn ensure_begin(
        &mut self,
        ctx: *mut pg_sys::LogicalDecodingContext,
        txn: *mut pg_sys::ReorderBufferTXN,
    ) {
        if self.begin_sent || self.streaming_xid.is_some() {
            return;
        }
        // SAFETY: per the caller.
        unsafe { self.ensure_startup(ctx) };
        // SAFETY: txn is the transaction being decoded.
        let (xid, final_lsn, commit_time, origin) = unsafe {
            let t = &*txn;
            (
                t.xid,
                t.final_lsn,
                t.xact_time.commit_time,
                self.txn_origin(txn),
            )
        };
        let begin = Begin {
            xid: xid.into(),
            final_lsn,
            commit_time,
            origin,
        };
        write_begin(&mut self.buf, &begin);
        // SAFETY: per the caller.
        unsafe { self.end_message(ctx) };
        self.begin_sent = true;
    }

    /// Where committed transaction `txn` came from, unless it was made on
    /// this node.
    ///
    /// # Safety
    /// `txn` is a live transaction of the reorder buffer.
    unsafe fn txn_origin(&mut self, txn: *mut pg_sys::ReorderBufferTXN) -> Option<Origin> {
        // SAFETY: per the contract.
        let (origin_id, lsn) = unsafe { ((*txn).origin_id, (*txn).origin_lsn) };
        (origin_id != pg_sys::InvalidRepOriginId as u16).then(|| Origin {
            node_id: self.origin_node_id(origin_id),
            lsn,
        })
    }

    /// The node id of replication origin `origin_id` (see
    /// [`node::origin_node_id`]); an origin dropped since the change was
    /// made is identified by the hash of its numeric id.
    fn origin_node_id(&mut self, origin_id: u16) -> NodeId {
        if let Some(&(_, id)) = self.origins.iter().find(|(o, _)| *o == origin_id) {
            return id;
        }
        let mut name: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: catalog lookup in the decoding transaction; missing_ok.
        let found = unsafe { pg_sys::replorigin_by_oid(origin_id, true, &mut name) };
        let id = if found {
            // SAFETY: found implies a palloc'd NUL-terminated name.
            node::origin_node_id(&unsafe { pg::cstr_to_string(name, self.utf8_db) })
        } else {
            node::fnv1a64(origin_id.to_string().as_bytes())
        };
        self.origins.push((origin_id, id));
        id
    }

    /// The commit callback.
    pub unsafe fn commit(
        &mut self,
        ctx: *mut pg_sys::LogicalDecodingContext,
        txn: *mut pg_sys::ReorderBufferTXN,
    ) {
        let sent = self.begin_sent;
        if !sent && self.held {
            // Under synchronous replication the walsender answers a
            // skipped transaction with a keepalive at its end: what is
            // held must go out before it.
            // SAFETY: per the caller.
            unsafe { self.flush(ctx) };
        }
        // Lets the walsender confirm progress past skipped transactions
        // (logical.c, OutputPluginUpdateProgress).
        // SAFETY: ctx is live.
        unsafe { pg_sys::OutputPluginUpdateProgress(ctx, !sent) };
        if !sent {
            return;
        }
        // SAFETY: txn is the committing transaction.
        let (commit_lsn, end_lsn) = unsafe { ((*txn).final_lsn, (*txn).end_lsn) };
        write_commit(
            &mut self.buf,
            &Commit {
                commit_lsn,
                end_lsn,
            },
        );
        self.begin_sent = false;
        // SAFETY: per the caller.
        unsafe {
            if self.buf.len() < BATCH_BYTES && self.may_hold(ctx) {
                self.held = true;
            } else {
                self.flush(ctx);
            }
        }
    }

    /// Whether a committed transaction may wait in `buf` for the next
    /// one: in a walsender ([`Stream::wrap_reader`]; not in the SQL
    /// functions, which stop at a fixed end and never write what is
    /// left), while flushed WAL goes on past the page the reader is in
    /// and the socket takes what was written. The walsender then decodes
    /// the next record at once, and has to read another page before it
    /// catches up and waits for WAL, where [`read_page`] writes what is
    /// held first.
    ///
    /// # Safety
    /// `ctx` is the live decoding context, in an output callback.
    unsafe fn may_hold(&self, ctx: *mut pg_sys::LogicalDecodingContext) -> bool {
        // SAFETY: per the contract; output_writer_private is set by the
        // SQL functions only, and the reader lives as long as ctx.
        unsafe {
            self.page_read.is_some()
                && (*ctx).output_writer_private.is_null()
                && !crate::raw::send_pending()
                && pg_sys::GetFlushRecPtr(std::ptr::null_mut())
                    > next_page((*(*ctx).reader).EndRecPtr)
        }
    }

    /// Puts [`read_page`] in front of the WAL reader's page callback, so
    /// that transactions may be held ([`Stream::may_hold`]).
    ///
    /// # Safety
    /// `ctx` is the live decoding context, in a walsender.
    pub unsafe fn wrap_reader(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) {
        // SAFETY: per the contract; the reader lives as long as ctx.
        unsafe {
            let reader = (*ctx).reader;
            self.page_read = (*reader).routine.page_read;
            (*reader).routine.page_read = Some(read_page);
        }
    }

    /// Writes held transactions, outside any output callback.
    unsafe fn write_held(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) {
        if !self.held {
            return;
        }
        // SAFETY: ctx is live; writes are accepted for this one call.
        unsafe {
            let accept = (*ctx).accept_writes;
            (*ctx).accept_writes = true;
            self.flush(ctx);
            (*ctx).accept_writes = accept;
        }
    }

    /// The stream start callback: a block of `txn`'s changes follows.
    pub unsafe fn stream_start(
        &mut self,
        ctx: *mut pg_sys::LogicalDecodingContext,
        txn: *mut pg_sys::ReorderBufferTXN,
    ) {
        // SAFETY: per the caller.
        unsafe { self.ensure_startup(ctx) };
        // SAFETY: txn is the streamed top-level transaction.
        let (xid, flags) = unsafe { (u32::from((*txn).xid), (*txn).txn_flags) };
        let first = flags & pg_sys::RBTXN_IS_STREAMED == 0;
        write_stream_start(&mut self.buf, &StreamStart { xid, first });
        self.streaming_xid = Some(xid);
        self.change_start = None;
        // SAFETY: per the caller.
        unsafe { self.end_message(ctx) };
    }

    /// The stream stop callback: the block ends and goes out.
    pub unsafe fn stream_stop(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) {
        if let Some(start) = self.change_start.take() {
            // An ERROR stopped a change half-way (the transaction aborted
            // while it was being decoded): drop its partial output, and
            // any RELATION written with it.
            self.buf.truncate(start);
            self.relations.forget_sent();
        }
        write_stream_stop(&mut self.buf);
        self.streaming_xid = None;
        // SAFETY: per the caller.
        unsafe { self.flush(ctx) };
    }

    /// The stream abort callback: a streamed transaction or one of its
    /// subtransactions rolled back.
    pub unsafe fn stream_abort(
        &mut self,
        ctx: *mut pg_sys::LogicalDecodingContext,
        txn: *mut pg_sys::ReorderBufferTXN,
    ) {
        // SAFETY: per the caller.
        unsafe { self.ensure_startup(ctx) };
        // SAFETY: txn and its top-level transaction are live.
        let (xid, subxid) = unsafe {
            let top = if (*txn).toptxn.is_null() {
                txn
            } else {
                (*txn).toptxn
            };
            (u32::from((*top).xid), u32::from((*txn).xid))
        };
        write_stream_abort(&mut self.buf, &StreamAbort { xid, subxid });
        // SAFETY: per the caller.
        unsafe { self.flush(ctx) };
    }

    /// The stream commit callback: the streamed transaction committed.
    pub unsafe fn stream_commit(
        &mut self,
        ctx: *mut pg_sys::LogicalDecodingContext,
        txn: *mut pg_sys::ReorderBufferTXN,
    ) {
        // SAFETY: ctx is live.
        unsafe {
            pg_sys::OutputPluginUpdateProgress(ctx, false);
            self.ensure_startup(ctx);
        }
        // SAFETY: txn is the committing transaction.
        let (xid, commit_lsn, end_lsn, commit_time, origin) = unsafe {
            let t = &*txn;
            (
                t.xid,
                t.final_lsn,
                t.end_lsn,
                t.xact_time.commit_time,
                self.txn_origin(txn),
            )
        };
        let commit = StreamCommit {
            xid: xid.into(),
            commit_lsn,
            end_lsn,
            commit_time,
            origin,
        };
        write_stream_commit(&mut self.buf, &commit);
        // SAFETY: per the caller.
        unsafe { self.flush(ctx) };
    }

    /// Inside a streamed block, SUBXACT if `change` belongs to another
    /// (sub)transaction than the change before it.
    unsafe fn ensure_subxact(&mut self, change: *mut pg_sys::ReorderBufferChange) {
        let Some(current) = self.streaming_xid else {
            return;
        };
        // SAFETY: a queued change always has its transaction.
        let xid = u32::from(unsafe { (*(*change).txn).xid });
        if xid != current {
            write_subxact(&mut self.buf, xid);
            self.streaming_xid = Some(xid);
        }
    }

    /// Whether `rel` belongs to the extension's own catalog, which every
    /// node keeps for itself (see `RelEntry::local_only`).
    ///
    /// # Safety
    /// `rel` is an open relation, inside a decoding callback.
    unsafe fn is_local_only(&mut self, rel: pg_sys::Relation) -> bool {
        // SAFETY: per the caller.
        unsafe { self.relations.refresh(rel).local_only }
    }

    /// Sends RELATION for `rel` if the stream has not seen its current
    /// description; returns the entry.
    unsafe fn relation(
        &mut self,
        ctx: *mut pg_sys::LogicalDecodingContext,
        rel: pg_sys::Relation,
    ) -> *mut RelEntry {
        // SAFETY: per the caller.
        let (entry, send) = unsafe { self.relations.get(rel) };
        let entry: *mut RelEntry = entry;
        if send {
            // SAFETY: entry points into the cache, which flush does not touch.
            if let Some(bytes) = unsafe { &(*entry).sent } {
                self.buf.extend_from_slice(bytes);
            }
            // SAFETY: per the caller.
            unsafe { self.end_message(ctx) };
        }
        entry
    }

    /// The change callback: INSERT, UPDATE or DELETE of one row.
    pub unsafe fn change(
        &mut self,
        ctx: *mut pg_sys::LogicalDecodingContext,
        txn: *mut pg_sys::ReorderBufferTXN,
        rel: pg_sys::Relation,
        change: *mut pg_sys::ReorderBufferChange,
    ) {
        use pg_sys::ReorderBufferChangeType as Kind;
        // SAFETY: the change callback's arguments are live for the call.
        let (action, tp) = unsafe { ((*change).action, (*change).data.tp) };
        let kind = match action {
            Kind::REORDER_BUFFER_CHANGE_INSERT => "INSERT",
            Kind::REORDER_BUFFER_CHANGE_UPDATE => "UPDATE",
            Kind::REORDER_BUFFER_CHANGE_DELETE => "DELETE",
            _ => return,
        };
        // SAFETY: per the caller.
        if unsafe { self.is_local_only(rel) } {
            return;
        }
        // SAFETY: change_cxt lives as long as the stream.
        let previous = unsafe { pg::switch_to(self.change_cxt) };
        // SAFETY: per the caller.
        unsafe {
            self.change_start = Some(self.buf.len());
            self.ensure_begin(ctx, txn);
            self.ensure_subxact(change);
            let entry = &mut *self.relation(ctx, rel);
            let desc = (*rel).rd_att;
            match action {
                Kind::REORDER_BUFFER_CHANGE_INSERT => {
                    let new = require(tp.newtuple, kind, entry);
                    write_insert_header(&mut self.buf, entry.rel_id);
                    self.tuple(entry, desc, new);
                }
                Kind::REORDER_BUFFER_CHANGE_UPDATE => {
                    let new = require(tp.newtuple, kind, entry);
                    let old = old_kind(entry, kind, !tp.oldtuple.is_null());
                    write_update_header(&mut self.buf, entry.rel_id, old);
                    if old.is_some() {
                        self.tuple(entry, desc, tp.oldtuple);
                    }
                    self.tuple(entry, desc, new);
                }
                _ => {
                    let old = require(tp.oldtuple, kind, entry);
                    let old_kind = old_kind(entry, kind, true).unwrap_or(OldKind::Key);
                    write_delete_header(&mut self.buf, entry.rel_id, old_kind);
                    self.tuple(entry, desc, old);
                }
            }
            self.change_start = None;
            self.end_message(ctx);
            pg::switch_to(previous);
            pg_sys::MemoryContextReset(self.change_cxt);
        }
    }

    /// Appends one tuple of `entry`'s relation.
    unsafe fn tuple(
        &mut self,
        entry: &mut RelEntry,
        desc: pg_sys::TupleDesc,
        tuple: *mut pg_sys::ReorderBufferTupleBuf,
    ) {
        // SAFETY: tuple is a decoded tuple of the relation desc describes.
        unsafe {
            let natts = (*desc).natts as usize;
            self.values.resize(natts, pg_sys::Datum::from(0));
            self.nulls.resize(natts, true);
            pg_sys::heap_deform_tuple(
                &mut (*tuple).tuple,
                desc,
                self.values.as_mut_ptr(),
                self.nulls.as_mut_ptr(),
            );
            if let Err(n) = write_tuple(
                &mut self.buf,
                &mut entry.columns,
                &self.values,
                &self.nulls,
                self.utf8_db,
            ) {
                pg::raise(
                    PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
                    format!(
                        "bdr: value of column \"{}\" of table \"{}\" cannot be converted to UTF-8",
                        entry.column_name(n),
                        entry.display_name
                    ),
                    None,
                );
            }
        }
    }

    /// The truncate callback.
    pub unsafe fn truncate(
        &mut self,
        ctx: *mut pg_sys::LogicalDecodingContext,
        txn: *mut pg_sys::ReorderBufferTXN,
        relations: &[pg_sys::Relation],
        change: *mut pg_sys::ReorderBufferChange,
    ) {
        // SAFETY: per the caller.
        let replicated: Vec<pg_sys::Relation> = relations
            .iter()
            .copied()
            .filter(|&rel| unsafe { !self.is_local_only(rel) })
            .collect();
        if replicated.is_empty() {
            return;
        }
        // SAFETY: change_cxt lives as long as the stream.
        let previous = unsafe { pg::switch_to(self.change_cxt) };
        // SAFETY: per the caller.
        unsafe {
            self.change_start = Some(self.buf.len());
            self.ensure_begin(ctx, txn);
            self.ensure_subxact(change);
            let mut rel_ids = std::mem::take(&mut self.rel_ids);
            rel_ids.clear();
            for rel in replicated {
                rel_ids.push((*self.relation(ctx, rel)).rel_id);
            }
            let flags = (*change).data.truncate;
            write_truncate(&mut self.buf, flags.cascade, flags.restart_seqs, &rel_ids);
            self.rel_ids = rel_ids;
            self.change_start = None;
            self.end_message(ctx);
            pg::switch_to(previous);
            pg_sys::MemoryContextReset(self.change_cxt);
        }
    }

    /// The message callback (`pg_logical_emit_message`).
    pub unsafe fn message(
        &mut self,
        ctx: *mut pg_sys::LogicalDecodingContext,
        txn: *mut pg_sys::ReorderBufferTXN,
        lsn: pg_sys::XLogRecPtr,
        transactional: bool,
        prefix: &str,
        content: &[u8],
    ) {
        // SAFETY: per the caller.
        unsafe {
            if transactional {
                self.ensure_begin(ctx, txn);
            } else {
                self.ensure_startup(ctx);
            }
        }
        write_logical_message(
            &mut self.buf,
            &LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            },
        );
        // SAFETY: per the caller.
        unsafe {
            if transactional {
                self.end_message(ctx);
            } else {
                self.flush(ctx);
            }
        }
    }
}

/// The tuple a change must carry, or an ERROR naming the table.
fn require(
    tuple: *mut pg_sys::ReorderBufferTupleBuf,
    kind: &str,
    entry: &RelEntry,
) -> *mut pg_sys::ReorderBufferTupleBuf {
    if tuple.is_null() {
        no_identity(kind, entry);
    }
    tuple
}

/// Which old tuple an UPDATE (`has_old`: the key changed, or FULL) or a
/// DELETE carries. A table without a replica identity cannot have its
/// updates and deletes replicated: see [`no_identity`].
fn old_kind(entry: &RelEntry, kind: &str, has_old: bool) -> Option<OldKind> {
    if !entry.has_identity() {
        no_identity(kind, entry);
    }
    match (has_old, entry.identity) {
        (false, _) => None,
        (true, ReplicaIdentity::Full) => Some(OldKind::Full),
        (true, _) => Some(OldKind::Key),
    }
}

/// Refuses an UPDATE or DELETE of a table without replica identity.
///
/// An ERROR, not a skipped change: skipping would silently let the peers
/// diverge, while the ERROR stops the stream at this change until the
/// operator decides (the same refusal PostgreSQL's own publications make,
/// there at the writing statement: CheckCmdReplicaIdentity, execReplication.c).
fn no_identity(kind: &str, entry: &RelEntry) -> ! {
    pg::raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "bdr: cannot replicate {kind} on table \"{}\" because it has no replica identity",
            entry.display_name
        ),
        Some(
            "Give the table a primary key or set REPLICA IDENTITY FULL or USING INDEX; \
             changes already written are not affected, so to go on, the slot must be advanced \
             past this transaction (pg_replication_slot_advance), skipping it."
                .into(),
        ),
    )
}

/// The start of the WAL page after the one `lsn` is in.
fn next_page(lsn: pg_sys::XLogRecPtr) -> pg_sys::XLogRecPtr {
    let page = u64::from(pg_sys::XLOG_BLCKSZ);
    (lsn / page + 1) * page
}

/// The WAL reader's page callback in a walsender: writes what is held
/// before the reader reads on. The walsender waits for WAL only in this
/// callback (or once the reader has caught up, which
/// [`Stream::may_hold`] rules out without a callback in between), and
/// the keepalives it sends there carry the position decoded so far: the
/// transactions before it must be on the wire first.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn read_page(
    state: *mut pg_sys::XLogReaderState,
    target_page: pg_sys::XLogRecPtr,
    req_len: std::ffi::c_int,
    target_rec: pg_sys::XLogRecPtr,
    read_buf: *mut std::ffi::c_char,
) -> std::ffi::c_int {
    // SAFETY: the reader's private data is its decoding context.
    unsafe {
        let ctx = (*state)
            .private_data
            .cast::<pg_sys::LogicalDecodingContext>();
        let stream = (*ctx).output_plugin_private.cast::<Stream>();
        (*stream).write_held(ctx);
        let read = (*stream).page_read.expect("wrapped");
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            read(state, target_page, req_len, target_rec, read_buf)
        })
    }
}
