//! Applying one peer's stream of changes to the local database.
//!
//! ```text
//!  BEGIN     -> BEGIN
//!  RELATION  -> match to the local table, drop its old statements
//!  INSERT/UPDATE/DELETE -> prepared statement, values bound as sent;
//!               no row touched -> the conflict path (resolve.rs)
//!  TRUNCATE  -> TRUNCATE of the local tables
//!  MESSAGE   -> the message dispatcher
//!  COMMIT    -> pg_replication_origin_xact_setup(end lsn, commit time);
//!               COMMIT: the origin's progress moves in the same commit
//! ```
//!
//! The connection is bound to this node's replication origin for the peer
//! (see [`crate::origin`]) and runs with `session_replication_role =
//! replica`, so triggers and foreign keys behave as on a replica. Each
//! remote transaction is one local transaction whose origin LSN and
//! commit timestamp are the remote ones: the progress commits atomically
//! with the data, and the rows keep the remote commit time (conflict
//! resolution compares the same values on every node).
//!
//! Conflicts are detected without an extra round trip: each change's
//! statement only touches a row last written by the change's own origin
//! (and, for UPDATE, whose new values hit no other row's unique key;
//! INSERT uses `ON CONFLICT DO NOTHING`). When it touches none, the
//! conflict path looks at the local row, resolves and records (see
//! [`conflict`], `resolve`, `record` and `docs/conflicts.md`).
//!
//! Pipelined (the default): a transaction's statements are sent without
//! waiting for each other, and their results are checked before its
//! COMMIT goes out; the COMMIT itself is confirmed while the next
//! transaction is already being sent. When a change touched no row or
//! failed, everything since the restart point (the BEGIN, or a savepoint
//! for a large transaction) is rolled back and the same messages are
//! applied again one statement at a time, where the conflict path sees
//! each change's result before the next change runs. The outcome is the
//! one of applying one statement at a time; only the round trips are
//! fewer (see [`pipeline`]). Consecutive INSERTs into one table go out as
//! multi-row INSERTs (up to [`RUN_ROWS`] rows) without ON CONFLICT: one
//! that hits a unique key fails, and the transaction is applied again one
//! statement at a time, where each INSERT has its ON CONFLICT clause.
//!
//! Statements doomed by an earlier failure in the same transaction fail
//! too ("current transaction is aborted"); so that a conflict does not
//! fill the server log with such errors, a pipelining session sets
//! `log_min_messages = log` (errors are logged by the applier, recorded
//! in `bdr.conflict_history`, and logged by the server again when the
//! replay meets them: it runs with the server's setting).
//!
//! Batched (the default with pipelining): whole transactions go out on a
//! second session, many per round trip, their row changes applied by the
//! server itself (`bdr.apply_changes`) where the table allows, and a
//! failed one (with everything after it) is applied again on this session
//! as above; see [`batch`].
//!
//! Streamed (large, in-progress) transactions are spooled, and applied
//! as they arrive when nothing comes between their blocks; see
//! [`streamed`].
//!
//! One handler per message kind, dispatched from one `match`, like
//! PostgreSQL's apply worker.

mod batch;
mod conflict;
mod param;
mod pipeline;
mod record;
mod relation;
mod resolve;
pub(crate) mod sql;
mod streamed;
mod wire;

use std::collections::HashMap;
use std::sync::Arc;

use bdr_protocol::{
    Begin, Commit, Datum, DecodeError, Delete, Insert, LogicalMessage, Lsn, Message, Messages,
    NodeId, RelId, Truncate, Update,
};
use bytes::Bytes;
use tokio_postgres::{Client, Statement};
use tracing::{debug, info};

use conflict::Version;
use param::{Param, ParamError};
use pipeline::{Expect, Pipeline, Reply};
use record::{ConflictRecord, RemoteTxn};
use relation::{MappedRelation, RelationMap};

/// Why a change could not be applied. Each names what is at fault; the
/// peer task adds the peer and the LSN.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("relation {relation} does not exist on this node")]
    MissingTable { relation: String },
    #[error("column {column} of relation {relation} does not exist on this node")]
    MissingColumn { relation: String, column: String },
    #[error(
        "column {column} of relation {relation} has type {remote} on the peer but {local} here"
    )]
    TypeMismatch {
        relation: String,
        column: String,
        remote: String,
        local: String,
    },
    #[error(
        "column {column} of relation {relation} is generated on this node and cannot be written"
    )]
    GeneratedColumn { relation: String, column: String },
    #[error("relation {relation} has no replica identity key to find rows by")]
    NoKey { relation: String },
    #[error("a change refers to relation id {0}, which no RELATION message defined")]
    UnknownRelation(RelId),
    #[error("tuple of relation {relation} has {got} columns, its RELATION message {expected}")]
    ColumnCount {
        relation: String,
        got: usize,
        expected: usize,
    },
    #[error("column {column} of relation {relation}: {source}")]
    Value {
        relation: String,
        column: String,
        source: ParamError,
    },
    #[error("{0} message outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("BEGIN of xid {0} while a transaction is open")]
    NestedBegin(u32),
    #[error("unexpected STARTUP message in the middle of the stream")]
    UnexpectedStartup,
    #[error("unexpected message of a streamed transaction (tag '{}') outside of one", *.0 as char)]
    UnexpectedStreamed(u8),
    #[error("streamed transaction {xid}: {what}")]
    StreamedOutOfOrder { xid: u32, what: &'static str },
    #[error("spool file of a streamed transaction: {0}")]
    Spool(std::io::Error),
    #[error(
        "conflict {} on relation {} and the table's conflict resolver is 'error': apply from this peer stops until an operator resolves it (change the local row, or the resolver with bdr.set_conflict_resolver); see bdr.conflict_history",
        .0.kind, .0.relation
    )]
    ConflictStop(Box<ConflictRecord>),
    #[error(
        "committing a remote transaction failed, so it is applied again from the last committed one: {}",
        crate::describe_db_error(.0)
    )]
    CommitFailed(tokio_postgres::Error),
    #[error("batched apply session: {0}")]
    Wire(#[from] crate::stream::StreamError),
    #[error("batched apply went wrong: {0}")]
    Batch(String),
    /// Not a failure: a transaction dealt to parallel apply's second
    /// session has a change that goes out as a statement, so it is handed
    /// over to the first session (see `batch`).
    #[error("a transaction of parallel apply's second session has a change sent as a statement")]
    NeedsStatements,
    #[error("a kept message no longer decodes: {0}")]
    Replay(#[from] DecodeError),
    #[error("{}", crate::describe_db_error(.0))]
    Database(#[from] tokio_postgres::Error),
}

impl ApplyError {
    /// Whether the error is already in the conflict history (a conflict
    /// whose resolver is `error`).
    pub(crate) fn is_recorded(&self) -> bool {
        matches!(self, ApplyError::ConflictStop(_))
    }

    /// The relation the error is about, for the log.
    pub(crate) fn relation(&self) -> Option<&str> {
        match self {
            ApplyError::MissingTable { relation }
            | ApplyError::MissingColumn { relation, .. }
            | ApplyError::TypeMismatch { relation, .. }
            | ApplyError::GeneratedColumn { relation, .. }
            | ApplyError::NoKey { relation }
            | ApplyError::ColumnCount { relation, .. }
            | ApplyError::Value { relation, .. } => Some(relation),
            ApplyError::ConflictStop(record) => Some(&record.relation),
            _ => None,
        }
    }
}

/// A reply to what is in flight (see [`Applier::next_settled`]).
pub(crate) struct Settled(Settling);

enum Settling {
    Pipe(Result<(), ApplyError>),
    /// A reply of batched session 0 or 1.
    Batch(Result<(usize, wire::Event), ApplyError>),
    Send,
    /// No reply for a while after a failure (parallel apply).
    Cancel,
}

/// The remote transaction being applied.
#[derive(Debug, Clone)]
struct OpenTxn {
    xid: u32,
    /// The remote commit time, recorded with the commit.
    commit_time: i64,
    /// Who wrote it, as conflicts need it.
    remote: RemoteTxn,
}

/// Which remote transaction an error happened in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TxnSummary {
    pub(crate) xid: u32,
    /// Its commit LSN on the sending node.
    pub(crate) commit_lsn: Lsn,
    pub(crate) commit_time: i64,
    /// The node where it first committed.
    pub(crate) origin: NodeId,
}

/// The nodes at both ends of a stream.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    pub(crate) local: NodeId,
    pub(crate) peer: NodeId,
    pub(crate) peer_name: std::sync::Arc<str>,
}

/// Applies the stream of one peer through one local connection.
#[derive(Debug)]
pub(crate) struct Applier {
    client: Arc<Client>,
    /// Whether statements are pipelined.
    pipelined: bool,
    /// The batched apply session, when transactions are batched.
    batch: Option<batch::Batch>,
    /// Whether the server's log of this session's errors is off while
    /// pipelining (see the module documentation).
    quiet: bool,
    pipe: Pipeline,
    /// Pipelined INSERTs waiting to go out as one statement.
    run: Option<InsertRun>,
    /// Pipelined row changes waiting to go out as one call of
    /// `bdr.apply_changes`, and the call, once prepared.
    held: batch::ServerChanges,
    apply_changes: Option<Statement>,
    relations: RelationMap,
    txn: Option<OpenTxn>,
    xact_setup: Statement,
    /// Reads (and makes durable) the progress of the peer's origin.
    progress: Statement,
    ends: Endpoints,
    /// The local replication origin id of each origin node met so far:
    /// rows written by that node's transactions carry it.
    origin_ids: HashMap<NodeId, u32>,
    /// Transactions the peer streams while they are in progress.
    streams: streamed::Streams,
}

/// Records the remote end LSN and commit time in the session's
/// replication origin; the transaction's COMMIT follows.
const XACT_SETUP: &str =
    "SELECT pg_catalog.pg_replication_origin_xact_setup($1::pg_lsn, $2::timestamptz)";

/// The end LSN of the peer's last transaction committed here, once the
/// local WAL is flushed up to its commit (the function flushes it).
const DURABLE_PROGRESS: &str = crate::origin::PEER_PROGRESS;

/// SQLSTATEs of a failure that may come from a description of a local
/// table that no longer holds: `bdr.apply_changes` finds the table or
/// index changed (object_not_in_prerequisite_state) or gone (an internal
/// error), a statement names a table or column no longer there. After
/// one, the relations are mapped again before anything is applied again:
/// were a local table created again, everything sent to the server would
/// fail the same way until the peer sent its RELATION again.
const STALE: [&str; 4] = ["55000", "XX000", "42P01", "42703"];

/// The most rows one multi-row INSERT carries (a power of two).
const RUN_ROWS: usize = 64;

/// The most parameters a statement may have (the protocol counts them in
/// 16 bits).
const MAX_PARAMS: usize = 65_535;

/// Consecutive INSERTs into one relation, not sent yet.
#[derive(Debug)]
struct InsertRun {
    rel_id: RelId,
    rows: usize,
    params: Vec<Param<'static>>,
}

impl InsertRun {
    /// The run as multi-row INSERTs of `width` columns: as few statements
    /// as the binary digits of the row count (64 + 8 + 1 rows, ...), so
    /// that a handful of statements per relation serve every run. Each is
    /// its row count and parameters.
    fn into_statements(self, width: usize) -> Vec<(usize, Vec<Param<'static>>)> {
        let mut params = self.params.into_iter();
        let mut left = self.rows;
        let mut out = Vec::with_capacity(left.count_ones() as usize);
        while left > 0 {
            let rows = 1 << left.ilog2();
            out.push((rows, params.by_ref().take(rows * width).collect()));
            left -= rows;
        }
        out
    }
}

impl Applier {
    /// Wraps a connection already bound to the peer's replication origin
    /// (see [`crate::origin::bind_session`]).
    /// With `batched`, the connection settings of a second session that
    /// applies in batches (see [`batch`]), the first one taking over
    /// around conflicts.
    pub(crate) async fn new(
        client: Client,
        ends: Endpoints,
        pipelined: bool,
        batched: Option<&tokio_postgres::Config>,
        parallel: bool,
        at: crate::origin::Progress,
    ) -> Result<Self, ApplyError> {
        let xact_setup = client.prepare(XACT_SETUP).await?;
        let progress = client.prepare(DURABLE_PROGRESS).await?;
        let quiet = pipelined && quiet_errors(&client, true).await;
        let mut origin_ids = HashMap::new();
        origin_ids.insert(ends.local, 0);
        let batch = match batched {
            Some(config) => batch::Batch::open(config, crate::origin::name_for(ends.peer)).await?,
            None => None,
        };
        let mut applier = Applier {
            client: Arc::new(client),
            quiet,
            xact_setup,
            progress,
            pipelined,
            batch,
            pipe: Pipeline::default(),
            run: None,
            held: batch::ServerChanges::default(),
            apply_changes: None,
            relations: RelationMap::default(),
            txn: None,
            ends,
            origin_ids,
            streams: streamed::Streams::default(),
        };
        if applier.batch.is_some() {
            applier.origin_to_wire().await?;
        }
        let lane = crate::origin::lane_name_for(applier.ends.peer);
        // Transactions between the two origins' progress were dealt to the
        // two sessions: they are applied (or not) as they were dealt.
        let uneven = at.uneven();
        if uneven && !parallel {
            info!(
                peer = %applier.ends.peer_name,
                "parallel apply did not stop cleanly: applying on two sessions until the next clean stop"
            );
        }
        if let (Some(b), Some(config), true) = (applier.batch.as_mut(), batched, parallel || uneven)
        {
            b.open_lane(config, &applier.client, &lane, at).await?;
        }
        match applier.batch.as_mut() {
            Some(b) if b.parallel() => {}
            _ if uneven => {
                return Err(ApplyError::Batch(format!(
                    "the origins {} and {lane} are at {} and {}: a second batched session is needed to apply what follows, and it cannot open (see the warnings above)",
                    crate::origin::name_for(applier.ends.peer),
                    at.own,
                    at.lane.unwrap_or(at.own)
                )));
            }
            batch => {
                if let Some(b) = batch {
                    b.set_progress(at);
                }
                // Not in use: its progress would be stale next time.
                applier
                    .client
                    .execute(crate::origin::FORGET_PROGRESS, &[&lane])
                    .await?;
            }
        }
        Ok(applier)
    }

    /// The local replication origin id of rows written by `node`'s
    /// transactions; one that no row can carry when this node has no
    /// origin for it.
    async fn origin_id(&mut self, node: NodeId) -> Result<u32, ApplyError> {
        match self.origin_ids.get(&node) {
            Some(id) => Ok(*id),
            // Once per node: boxed, the BEGIN of every transaction awaits
            // this future.
            None => Box::pin(self.look_up_origin_id(node)).await,
        }
    }

    /// Looks up (and remembers) the local replication origin for `node`.
    async fn look_up_origin_id(&mut self, node: NodeId) -> Result<u32, ApplyError> {
        let row = self
            .client
            .query_opt(
                "SELECT roident FROM pg_catalog.pg_replication_origin WHERE roname = $1",
                &[&crate::origin::name_for(node)],
            )
            .await?;
        match row {
            Some(r) => {
                let id: u32 = r.get(0);
                self.origin_ids.insert(node, id);
                Ok(id)
            }
            None => Ok(u32::MAX),
        }
    }

    /// Forgets stream state: a new stream starts without relations and
    /// outside any transaction. Statements in flight are awaited (a
    /// COMMIT among them may still be confirmed, see [`Self::take_confirmed`])
    /// and an open local transaction is rolled back.
    pub(crate) async fn reset(&mut self) -> Result<(), ApplyError> {
        self.finish_batch().await;
        self.relations.clear();
        self.forget_streams();
        self.forget_held();
        let drained = self.pipe.drain().await;
        self.pipe.clear();
        // A failed commit leaves its transaction open (and aborted). One
        // open on the batched session ends with that session.
        let on_wire = self.batch.as_ref().is_some_and(batch::Batch::on_wire);
        if (self.txn.take().is_some() && !on_wire) || self.pipe.poisoned() {
            self.client.batch_execute("ROLLBACK").await?;
        }
        drained
    }

    /// The latest end LSN up to which the stream is applied (committed, not
    /// yet known flushed), if a COMMIT was confirmed since the last call,
    /// and how many were.
    pub(crate) fn take_confirmed(&mut self) -> Option<(Lsn, u64)> {
        self.pipe.take_confirmed()
    }

    /// Makes what was applied from the peer durable and returns how far
    /// that is: the end LSN of the last remote transaction committed here
    /// (0 before the first). Apply sessions commit without waiting
    /// for the WAL flush (`synchronous_commit = off`, as the built-in
    /// apply worker), so this, not a confirmed COMMIT, is what the peer may
    /// forget. Runs on the first session, behind what is in flight there;
    /// the future does not borrow the applier.
    pub(crate) fn durable_progress(
        &self,
    ) -> impl Future<Output = Result<Lsn, tokio_postgres::Error>> + Send + 'static {
        let client = Arc::clone(&self.client);
        let statement = self.progress.clone();
        let origin = crate::origin::name_for(self.ends.peer);
        async move {
            let row = client.query_one(&statement, &[&origin]).await?;
            let progress: Option<tokio_postgres::types::PgLsn> = row.try_get(0)?;
            Ok(progress.map_or(0, u64::from))
        }
    }

    /// Whether statements are in flight, or a batch waits to go out.
    pub(crate) fn busy(&self) -> bool {
        self.pipe.busy() || self.batch.as_ref().is_some_and(batch::Batch::busy)
    }

    /// Awaits the next reply to what is in flight (cancel safe); hand it
    /// to [`Self::on_settled`].
    pub(crate) async fn next_settled(&mut self) -> Settled {
        if let Some(b) = self.batch.as_mut() {
            if b.can_send() {
                return Settled(Settling::Send);
            }
            if b.recovering() {
                match tokio::time::timeout(batch::CANCEL_AGAIN, b.next_event()).await {
                    Ok(Some(event)) => return Settled(Settling::Batch(event)),
                    Ok(None) => {}
                    Err(_) => return Settled(Settling::Cancel),
                }
            } else if let Some(event) = b.next_event().await {
                return Settled(Settling::Batch(event));
            }
            if b.busy() {
                return Settled(Settling::Send);
            }
        }
        Settled(Settling::Pipe(self.pipe.settle_one().await))
    }

    /// Acts on a reply: confirms a COMMIT, sends the next batch, applies a
    /// failed batch again. An error is a COMMIT that failed or a session
    /// that broke.
    pub(crate) async fn on_settled(&mut self, settled: Settled) -> Result<(), ApplyError> {
        match settled.0 {
            Settling::Pipe(result) => result,
            Settling::Batch(event) => {
                // A failed batch is applied again here, conflicts and all.
                match self.on_batch_event(event?).await {
                    Err(ApplyError::ConflictStop(record)) => Box::pin(self.stop_for(record)).await,
                    other => other,
                }
            }
            Settling::Send => match self.batch.as_mut() {
                Some(b) => b.send_ready().await,
                None => Ok(()),
            },
            Settling::Cancel => self.cancel_sessions().await,
        }
    }

    /// The remote transaction being applied.
    pub(crate) fn current_txn(&self) -> Option<TxnSummary> {
        self.txn.as_ref().map(|t| TxnSummary {
            xid: t.xid,
            commit_lsn: t.remote.commit_lsn,
            commit_time: t.commit_time,
            origin: t.remote.version.node,
        })
    }

    /// Whether a remote transaction is being applied.
    pub(crate) fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Applies one message; `raw` is its bytes, a slice of `frame`. A
    /// conflict that stops apply rolls the transaction back and is
    /// recorded on its own.
    ///
    /// Called for every message: the paths most messages never take
    /// (streamed transactions, a batch applied again, a conflict that
    /// stops apply) are boxed futures, so that this one stays small (the
    /// caller moves it, several kilobytes otherwise, for each message).
    pub(crate) async fn handle(
        &mut self,
        frame: &Bytes,
        raw: Bytes,
        msg: &Message<'_>,
    ) -> Result<(), ApplyError> {
        self.streams.note_relation(&raw, msg);
        if self.streams.involved(msg) && Box::pin(self.streamed(frame, &raw, msg)).await? {
            return Ok(());
        }
        self.apply(frame, raw, msg).await
    }

    /// Applies one message of a whole transaction (or between them).
    async fn apply(
        &mut self,
        frame: &Bytes,
        raw: Bytes,
        msg: &Message<'_>,
    ) -> Result<(), ApplyError> {
        let result = if self.batch.is_some() {
            self.dispatch_batched(frame, raw, msg).await
        } else {
            Box::pin(self.dispatch_other(frame, raw, msg)).await
        };
        match result {
            Err(ApplyError::ConflictStop(record)) => Box::pin(self.stop_for(record)).await,
            other => other,
        }
    }

    /// A conflict that stops apply: rolls back the transaction that
    /// `record`'s conflict stops and records the conflict on its own; the
    /// error to stop with.
    async fn stop_for(&mut self, record: Box<ConflictRecord>) -> Result<(), ApplyError> {
        self.forget_held();
        self.pipe.drain().await?;
        self.pipe.clear();
        if self.txn.take().is_some() {
            self.client.batch_execute("ROLLBACK").await?;
        }
        record.report(&self.client).await?;
        Err(ApplyError::ConflictStop(record))
    }

    /// Applies one message on the first session, pipelined or not.
    async fn dispatch_other(
        &mut self,
        frame: &Bytes,
        raw: Bytes,
        msg: &Message<'_>,
    ) -> Result<(), ApplyError> {
        if self.pipelined {
            self.dispatch_pipelined(frame, raw, msg).await
        } else {
            self.dispatch(msg).await
        }
    }

    /// Pipelined apply of one message (see the module documentation).
    async fn dispatch_pipelined(
        &mut self,
        frame: &Bytes,
        raw: Bytes,
        msg: &Message<'_>,
    ) -> Result<(), ApplyError> {
        if self.txn.is_none() {
            if let Message::Begin(m) = msg {
                self.open_txn(m).await?;
                self.pipe.begin(raw);
                let reply = self.simple("BEGIN");
                return self.pipe.push(reply, Expect::Done);
            }
            // Outside a transaction (nothing our plugin sends): one at a
            // time.
            self.pipe.drain().await?;
            return self.dispatch(msg).await;
        }
        self.pipe.keep(raw.clone());
        let held = match change_of(msg) {
            Some((what, rel_id)) => self.server_applies(what, rel_id).map(|h| (rel_id, h)),
            None => Ok((0, None)),
        };
        let result = match held {
            Err(e) => Err(e),
            Ok((rel_id, Some(origin))) => self.hold(rel_id, &raw, origin).await,
            Ok((_, None)) => {
                // Anything else sends the changes held for the server, and
                // anything but another INSERT the INSERTs held back.
                let flushed = match (self.flush_held().await, msg) {
                    (Ok(()), Message::Insert(_)) => Ok(()),
                    (Ok(()), _) => self.flush_inserts().await,
                    (e, _) => e,
                };
                match (flushed, msg) {
                    (Err(e), _) => Err(e),
                    (Ok(()), Message::Commit(m)) => return self.pipelined_commit(m).await,
                    (Ok(()), Message::Insert(m)) => self.pipelined_insert(frame, m).await,
                    (Ok(()), Message::Update(m)) => self.pipelined_update(frame, m).await,
                    (Ok(()), Message::Delete(m)) => self.pipelined_delete(frame, m).await,
                    (Ok(()), Message::Truncate(m)) => self.pipelined_truncate(m),
                    (Ok(()), Message::Logical(m)) => {
                        self.handle_message(m);
                        Ok(())
                    }
                    (Ok(()), _) => {
                        // Needs answers from the server (or is an error): after
                        // everything in flight is checked.
                        self.pipe.drain().await?;
                        if self.pipe.failed().is_some() {
                            return self.replay().await;
                        }
                        self.dispatch(msg).await
                    }
                }
            }
        };
        match result {
            Err(e @ ApplyError::CommitFailed(_)) => return Err(e),
            // Anything else is applied again one statement at a time,
            // where a real error comes back with its context.
            Err(e) => self.pipe.fail(|| e.to_string()),
            Ok(()) => {}
        }
        if self.pipe.failed().is_some() {
            return self.replay().await;
        }
        if self.pipe.chunk_full() {
            let flushed = match self.flush_inserts().await {
                Ok(()) => self.flush_held().await,
                e => e,
            };
            if let Err(e) = flushed {
                self.pipe.fail(|| e.to_string());
            }
            self.pipe.drain().await?;
            if self.pipe.failed().is_some() {
                return self.replay().await;
            }
            self.new_restart_point().await?;
        } else if self.pipe.full() {
            self.pipe.make_room().await?;
        }
        Ok(())
    }

    /// Holds a change of `rel_id` for `bdr.apply_changes` (after the
    /// INSERTs held back for a statement); enough of them go out.
    async fn hold(
        &mut self,
        rel_id: RelId,
        raw: &[u8],
        origin: Option<u32>,
    ) -> Result<(), ApplyError> {
        self.flush_inserts().await?;
        self.held.add(rel_id, raw, origin);
        if self.held.len() >= batch::PIPE_CALL_BYTES {
            self.flush_held().await?;
        }
        Ok(())
    }

    /// Sends the changes held for `bdr.apply_changes` as one call (the
    /// transaction's COMMIT records its end LSN).
    async fn flush_held(&mut self) -> Result<(), ApplyError> {
        if self.held.is_empty() {
            return Ok(());
        }
        let stmt = match &self.apply_changes {
            Some(stmt) => stmt.clone(),
            None => {
                let stmt = self.client.prepare(batch::APPLY_CHANGES).await?;
                self.apply_changes.insert(stmt).clone()
            }
        };
        let (changes, origin) = self.held.take_call(&self.relations);
        debug!(
            bytes = changes.len(),
            "pipelined changes go to bdr.apply_changes"
        );
        let params = vec![
            Param::Shared {
                bytes: changes,
                spaces: 0,
                text: false,
            },
            Param::Null,
            Param::Null,
            origin.map_or(Param::Null, Param::four_bytes),
        ];
        self.pipe
            .push(execute(&self.client, stmt, params), Expect::Done)
    }

    /// Forgets the changes held back, INSERTs and those for the server.
    fn forget_held(&mut self) {
        self.run = None;
        self.held.clear();
    }

    /// A simple-protocol statement as a pipelined reply.
    fn simple(&self, sql: &'static str) -> Reply {
        let client = self.client.clone();
        Box::pin(async move { client.batch_execute(sql).await.map(|()| 0) })
    }

    /// Everything so far is checked: a savepoint becomes the restart
    /// point, and the messages kept so far are dropped.
    async fn new_restart_point(&mut self) -> Result<(), ApplyError> {
        let sql = if self.pipe.at_savepoint() {
            "RELEASE SAVEPOINT bdr_restart; SAVEPOINT bdr_restart"
        } else {
            "SAVEPOINT bdr_restart"
        };
        self.client.batch_execute(sql).await?;
        self.pipe.savepoint();
        Ok(())
    }

    /// Rolls back to the restart point and applies the messages kept
    /// since then one statement at a time.
    async fn replay(&mut self) -> Result<(), ApplyError> {
        if self.applying_direct() {
            // A streamed transaction is applied whole at its commit
            // instead (see [`streamed`]).
            return self.abandon_direct().await;
        }
        // Its rows are among the kept messages.
        self.forget_held();
        self.pipe.drain().await?;
        let why = self.pipe.failed().unwrap_or_default().to_owned();
        let stale = self.pipe.failed_stale();
        let (kept, at_savepoint) = self.pipe.take_kept();
        debug!(
            why,
            messages = kept.len(),
            "applying again one statement at a time"
        );
        if at_savepoint {
            self.client
                .batch_execute("ROLLBACK TO SAVEPOINT bdr_restart")
                .await?;
        } else {
            self.client.batch_execute("ROLLBACK").await?;
            self.txn = None;
        }
        if stale {
            self.remap_relations(&why).await?;
        }
        if self.quiet {
            quiet_errors(&self.client, false).await;
        }
        for raw in &kept {
            if let Some(msg) = Messages::new(raw).next() {
                self.dispatch(&msg?).await?;
            }
        }
        if self.quiet {
            quiet_errors(&self.client, true).await;
        }
        if self.txn.is_some() {
            self.new_restart_point().await?;
        }
        Ok(())
    }

    /// Maps every relation again after a failure with one of the
    /// [`STALE`] SQLSTATEs (`why`).
    async fn remap_relations(&mut self, why: &str) -> Result<(), ApplyError> {
        debug!(why, "mapping the relations again");
        self.relations.remap(&self.client).await
    }

    /// Checks what is in flight, then sends the commit: the origin's
    /// progress and COMMIT, confirmed later (see [`Self::take_confirmed`]).
    async fn pipelined_commit(&mut self, m: &Commit) -> Result<(), ApplyError> {
        self.pipe.drain().await?;
        if self.pipe.failed().is_some() {
            return self.replay().await;
        }
        let Some(open) = self.txn.take() else {
            return Err(ApplyError::OutsideTransaction("COMMIT"));
        };
        let [setup, commit] = self.commit_replies(m.end_lsn, open.commit_time);
        // Both must succeed: a failed setup aborts the transaction, and
        // COMMIT then rolls it back without an error.
        self.pipe.push(setup, Expect::Must)?;
        self.pipe.push(commit, Expect::Commit(m.end_lsn))?;
        self.pipe.clear();
        Ok(())
    }

    /// Adds the row to the run of INSERTs into its relation; a full run
    /// goes out.
    async fn pipelined_insert(&mut self, frame: &Bytes, m: &Insert<'_>) -> Result<(), ApplyError> {
        self.require_txn("INSERT")?;
        if self.run.as_ref().is_some_and(|r| r.rel_id != m.rel_id) {
            self.flush_inserts().await?;
        }
        if self.add_to_run(frame, m)? {
            self.flush_inserts().await?;
        }
        Ok(())
    }

    /// Adds the row to the run of INSERTs (a run of `m`'s relation, the
    /// caller sees to that); whether the run is full.
    fn add_to_run(&mut self, frame: &Bytes, m: &Insert<'_>) -> Result<bool, ApplyError> {
        let rel = self.relations.get(m.rel_id)?;
        let row = bind_columns(rel, &m.new, |_| true)?;
        let most = run_rows(rel.columns.len());
        let run = self.run.get_or_insert_with(|| InsertRun {
            rel_id: m.rel_id,
            rows: 0,
            params: Vec::with_capacity(row.len() * most),
        });
        run.params.extend(row.iter().map(|p| p.to_shared(frame)));
        run.rows += 1;
        Ok(run.rows >= most)
    }

    /// Sends the INSERTs held back (see [`InsertRun::into_statements`]).
    async fn flush_inserts(&mut self) -> Result<(), ApplyError> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        let rel = self.relations.get(run.rel_id)?;
        for (rows, params) in run.into_statements(rel.columns.len()) {
            let stmt = rel.insert_rows(&self.client, rows).await?;
            self.pipe.push(
                execute(&self.client, stmt, params),
                Expect::Rows(rows as u64),
            )?;
        }
        Ok(())
    }

    async fn pipelined_update(&mut self, frame: &Bytes, m: &Update<'_>) -> Result<(), ApplyError> {
        let remote = self.require_txn("UPDATE")?;
        let rel = self.relations.get(m.rel_id)?;
        let u = update_values(rel, m)?;
        let origin = Param::four_bytes(remote.roident);
        let params = shared(u.new.iter().chain(&u.key).chain([&origin]), frame);
        let stmt = rel.update(&self.client, &u.set, u.key_changes).await?;
        let reply = execute(&self.client, stmt, params);
        self.pipe.push(reply, Expect::Rows(1))
    }

    async fn pipelined_delete(&mut self, frame: &Bytes, m: &Delete<'_>) -> Result<(), ApplyError> {
        let remote = self.require_txn("DELETE")?;
        let rel = self.relations.get(m.rel_id)?;
        let key = delete_key(rel, m)?;
        let origin = Param::four_bytes(remote.roident);
        let params = shared(key.iter().chain([&origin]), frame);
        let stmt = rel.delete(&self.client).await?;
        let reply = execute(&self.client, stmt, params);
        self.pipe.push(reply, Expect::Rows(1))
    }

    fn pipelined_truncate(&mut self, m: &Truncate) -> Result<(), ApplyError> {
        self.require_txn("TRUNCATE")?;
        let sql = self.truncate_sql(m)?;
        let client = self.client.clone();
        let reply: Reply = Box::pin(async move { client.batch_execute(&sql).await.map(|()| 0) });
        self.pipe.push(reply, Expect::Done)
    }

    async fn dispatch(&mut self, msg: &Message<'_>) -> Result<(), ApplyError> {
        match msg {
            Message::Begin(m) => self.handle_begin(m).await?,
            Message::Commit(m) => self.handle_commit(m).await?,
            Message::Relation(m) => {
                let mapped = MappedRelation::map(&self.client, m).await?;
                self.relations.define(m.rel_id, mapped);
            }
            Message::Insert(m) => self.handle_insert(m).await?,
            Message::Update(m) => self.handle_update(m).await?,
            Message::Delete(m) => self.handle_delete(m).await?,
            Message::Truncate(m) => self.handle_truncate(m).await?,
            Message::Logical(m) => self.handle_message(m),
            Message::Startup(_) => return Err(ApplyError::UnexpectedStartup),
            Message::StreamStart(_)
            | Message::StreamStop
            | Message::Subxact(_)
            | Message::StreamCommit(_)
            | Message::StreamAbort(_) => return Err(ApplyError::UnexpectedStreamed(msg.tag())),
        }
        Ok(())
    }

    async fn handle_begin(&mut self, m: &Begin) -> Result<(), ApplyError> {
        self.open_txn(m).await?;
        if let Err(e) = self.client.batch_execute("BEGIN").await {
            self.txn = None;
            return Err(e.into());
        }
        Ok(())
    }

    /// Starts applying remote transaction `m` (the caller sends BEGIN).
    async fn open_txn(&mut self, m: &Begin) -> Result<(), ApplyError> {
        if let Some(open) = &self.txn {
            return Err(ApplyError::NestedBegin(open.xid));
        }
        let origin = m.origin.map_or(self.ends.peer, |o| o.node_id);
        let roident = self.origin_id(origin).await?;
        self.txn = Some(OpenTxn {
            xid: m.xid,
            commit_time: m.commit_time,
            remote: RemoteTxn {
                version: Version {
                    commit_time: m.commit_time,
                    node: origin,
                },
                roident,
                commit_lsn: m.final_lsn,
                xid: m.xid,
                peer: self.ends.peer_name.clone(),
                local_node: self.ends.local,
            },
        });
        Ok(())
    }

    /// Records the remote commit in the origin, then commits: the origin's
    /// progress becomes the transaction's end LSN atomically with its rows.
    /// The end LSN (not the commit record's start) is what a restart asks
    /// the peer to stream from: the peer skips every transaction whose
    /// commit record starts before it, this one included.
    async fn handle_commit(&mut self, m: &Commit) -> Result<(), ApplyError> {
        let Some(open) = &self.txn else {
            return Err(ApplyError::OutsideTransaction("COMMIT"));
        };
        // Both statements go out in one round trip.
        let [setup, commit] = self.commit_replies(m.end_lsn, open.commit_time);
        tokio::try_join!(setup, commit)?;
        self.txn = None;
        self.pipe.confirm(m.end_lsn);
        Ok(())
    }

    /// Records the remote end LSN and commit time in the session's
    /// replication origin, then COMMIT. pg_lsn and timestamptz in binary
    /// are 8 big-endian bytes: the remote values are recorded exactly.
    fn commit_replies(&self, end_lsn: Lsn, commit_time: i64) -> [Reply; 2] {
        let params = vec![
            Param::eight_bytes(end_lsn),
            Param::eight_bytes(commit_time as u64),
        ];
        [
            execute(&self.client, self.xact_setup.clone(), params),
            self.simple("COMMIT"),
        ]
    }

    /// The open remote transaction's writer, for conflicts.
    fn require_txn(&self, what: &'static str) -> Result<RemoteTxn, ApplyError> {
        match &self.txn {
            Some(open) => Ok(open.remote.clone()),
            None => Err(ApplyError::OutsideTransaction(what)),
        }
    }

    async fn handle_insert(&mut self, m: &Insert<'_>) -> Result<(), ApplyError> {
        let remote = self.require_txn("INSERT")?;
        let rel = self.relations.get(m.rel_id)?;
        let params = bind_columns(rel, &m.new, |_| true)?;
        let stmt = rel.insert(&self.client).await?;
        if self.client.execute_raw(&stmt, params.iter()).await? == 0 {
            resolve::insert_conflict(&self.client, rel, &remote, &params).await?;
        }
        Ok(())
    }

    async fn handle_update(&mut self, m: &Update<'_>) -> Result<(), ApplyError> {
        let remote = self.require_txn("UPDATE")?;
        let rel = self.relations.get(m.rel_id)?;
        let UpdateParams {
            set,
            new,
            key,
            key_changes,
        } = update_values(rel, m)?;
        let origin = Param::four_bytes(remote.roident);
        let stmt = rel.update(&self.client, &set, key_changes).await?;
        let params: Vec<&Param<'_>> = new.iter().chain(&key).chain([&origin]).collect();
        if self.client.execute_raw(&stmt, params).await? == 0 {
            let set_cols: Vec<usize> = (0..set.len()).filter(|i| set[*i]).collect();
            let values = resolve::UpdateValues {
                set_cols: &set_cols,
                new: &new,
                key: &key,
            };
            resolve::update_conflict(&self.client, rel, &remote, &values).await?;
        }
        Ok(())
    }

    async fn handle_delete(&mut self, m: &Delete<'_>) -> Result<(), ApplyError> {
        let remote = self.require_txn("DELETE")?;
        let rel = self.relations.get(m.rel_id)?;
        let key = delete_key(rel, m)?;
        let origin = Param::four_bytes(remote.roident);
        let stmt = rel.delete(&self.client).await?;
        let params: Vec<&Param<'_>> = key.iter().chain([&origin]).collect();
        if self.client.execute_raw(&stmt, params).await? == 0 {
            resolve::delete_conflict(&self.client, rel, &remote, &key).await?;
        }
        Ok(())
    }

    async fn handle_truncate(&mut self, m: &Truncate) -> Result<(), ApplyError> {
        self.require_txn("TRUNCATE")?;
        let stmt = self.truncate_sql(m)?;
        self.client.batch_execute(&stmt).await?;
        Ok(())
    }

    fn truncate_sql(&mut self, m: &Truncate) -> Result<String, ApplyError> {
        let mut tables = Vec::with_capacity(m.rel_ids.len());
        for id in &m.rel_ids {
            tables.push(self.relations.get(*id)?.table.clone());
        }
        Ok(sql::truncate(&tables, m.restart_identity, m.cascade))
    }

    /// Logical decoding messages are for coordination (schema changes
    /// later); none is acted on yet.
    fn handle_message(&mut self, m: &LogicalMessage<'_>) {
        debug!(
            prefix = m.prefix,
            len = m.content.len(),
            transactional = m.transactional,
            "message"
        );
    }
}

/// Which columns an UPDATE sets (all but unchanged TOAST values), their
/// new values, the key values that find the row, and whether the key
/// changes.
struct UpdateParams<'a> {
    set: Vec<bool>,
    new: Vec<Param<'a>>,
    key: Vec<Param<'a>>,
    key_changes: bool,
}

fn update_values<'a>(rel: &MappedRelation, m: &Update<'a>) -> Result<UpdateParams<'a>, ApplyError> {
    require_key(rel)?;
    let set: Vec<bool> = m.new.iter().map(|d| *d != Datum::UnchangedToast).collect();
    let new = bind_columns(rel, &m.new, |i| set.get(i).copied().unwrap_or(false))?;
    // Without an old key the key did not change (the stream sends it
    // when it does); a full old row tells by comparison.
    let (old, key_changes) = match &m.old {
        None => (&m.new, false),
        Some(o) => (
            &o.tuple,
            rel.key.iter().any(|&i| o.tuple.get(i) != m.new.get(i)),
        ),
    };
    let key = bind_key(rel, old)?;
    Ok(UpdateParams {
        set,
        new,
        key,
        key_changes,
    })
}

/// The key values that find a DELETE's row.
fn delete_key<'a>(rel: &MappedRelation, m: &Delete<'a>) -> Result<Vec<Param<'a>>, ApplyError> {
    require_key(rel)?;
    bind_key(rel, &m.old.tuple)
}

fn require_key(rel: &MappedRelation) -> Result<(), ApplyError> {
    if rel.key.is_empty() {
        return Err(ApplyError::NoKey {
            relation: rel.display.clone(),
        });
    }
    Ok(())
}

/// Turns the server's log of this session's errors off (`quiet`) or back
/// to the server's setting; whether that worked (it needs superuser).
async fn quiet_errors(client: &Client, quiet: bool) -> bool {
    let sql = if quiet {
        "SET log_min_messages = log"
    } else {
        "SET log_min_messages TO DEFAULT"
    };
    match client.batch_execute(sql).await {
        Ok(()) => true,
        Err(e) => {
            debug!(error = %e, "log_min_messages unchanged");
            false
        }
    }
}

/// The kind and relation of a row change; `None` for other messages.
fn change_of(msg: &Message<'_>) -> Option<(&'static str, RelId)> {
    match msg {
        Message::Insert(m) => Some(("INSERT", m.rel_id)),
        Message::Update(m) => Some(("UPDATE", m.rel_id)),
        Message::Delete(m) => Some(("DELETE", m.rel_id)),
        _ => None,
    }
}

/// A prepared statement as a pipelined reply.
fn execute(client: &Arc<Client>, stmt: Statement, params: Vec<Param<'static>>) -> Reply {
    let client = client.clone();
    Box::pin(async move { client.execute_raw(&stmt, params).await })
}

/// The most rows of `width` columns one INSERT carries: a power of two.
fn run_rows(width: usize) -> usize {
    let most = (MAX_PARAMS / width.max(1)).clamp(1, RUN_ROWS);
    1 << most.ilog2()
}

/// Parameters that share `frame` instead of borrowing it.
fn shared<'p, 'a: 'p>(
    params: impl IntoIterator<Item = &'p Param<'a>>,
    frame: &Bytes,
) -> Vec<Param<'static>> {
    params.into_iter().map(|p| p.to_shared(frame)).collect()
}

fn check_width(rel: &MappedRelation, tuple: &[Datum<'_>]) -> Result<(), ApplyError> {
    if tuple.len() == rel.columns.len() {
        return Ok(());
    }
    Err(ApplyError::ColumnCount {
        relation: rel.display.clone(),
        got: tuple.len(),
        expected: rel.columns.len(),
    })
}

/// The parameters for the columns of `tuple` picked by `keep`, in column
/// order.
fn bind_columns<'a>(
    rel: &MappedRelation,
    tuple: &[Datum<'a>],
    keep: impl Fn(usize) -> bool,
) -> Result<Vec<Param<'a>>, ApplyError> {
    check_width(rel, tuple)?;
    tuple
        .iter()
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(i, d)| bind(rel, i, d))
        .collect()
}

/// The parameters for the key columns of `tuple`.
fn bind_key<'a>(rel: &MappedRelation, tuple: &[Datum<'a>]) -> Result<Vec<Param<'a>>, ApplyError> {
    check_width(rel, tuple)?;
    rel.key.iter().map(|&i| bind(rel, i, &tuple[i])).collect()
}

fn bind<'a>(rel: &MappedRelation, i: usize, d: &Datum<'a>) -> Result<Param<'a>, ApplyError> {
    let col = &rel.columns[i];
    Param::from_datum(d, col.remote_type).map_err(|source| ApplyError::Value {
        relation: rel.display.clone(),
        column: col.name.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_runs_are_powers_of_two_within_the_parameter_limit() {
        assert_eq!(run_rows(0), RUN_ROWS);
        assert_eq!(run_rows(3), RUN_ROWS);
        assert_eq!(run_rows(1_500), 32);
        assert_eq!(run_rows(1_664), 32);
        assert_eq!(run_rows(40_000), 1);
        for width in 1..=1_664 {
            let rows = run_rows(width);
            assert!(
                rows.is_power_of_two() && rows * width <= MAX_PARAMS,
                "{width}"
            );
        }
    }
}
