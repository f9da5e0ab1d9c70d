//! One peer: stream its changes and apply them, retrying with backoff.
//!
//! ```text
//!  connect locally ─> bind origin (progress P) ─> connect to peer
//!     ─> create slot if missing ─> START_REPLICATION from P
//!     ─> STARTUP check ─> loop { XLogData -> apply; keepalive; status }
//! ```
//!
//! Local commits do not wait for the WAL flush (`synchronous_commit =
//! off`, as the built-in apply worker). Two positions are reported to the
//! peer: *applied* (write and apply), the end LSN of the last remote
//! transaction committed here, and *flushed* (what the peer may forget),
//! the same once durable: shortly after a commit the applier asks the
//! origin's progress with a flush (`pg_replication_origin_progress(origin,
//! true)`), one WAL flush for however many commits came before. When no
//! transaction is open, the position the peer says it has sent counts too:
//! nothing before it remains to be applied, and once the commits before it
//! are durable nothing before it is needed again. Flushed is never ahead
//! of what survives a crash here, and never stuck behind while idle.
//!
//! Any error ends the session: an open local transaction is rolled back
//! (nothing is applied by halves), the error is logged with the peer, LSN
//! and relation, and the session starts again after a backoff from the
//! origin's durable progress. Other peers are unaffected.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bdr_protocol::{DatumFormats, DecodeError, Message, Messages, NodeId, StartupOptions};
use bytes::Bytes;
use tokio::sync::watch;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::apply::{Applier, ApplyError, Endpoints, TxnSummary};
use crate::catalog::{LocalNode, Peer};
use crate::origin;
use crate::stream::{
    CreateSlot, Lsn, ReplicationClient, ReplicationEvent, ReplicationStream, SlotSnapshot,
    StreamError,
};

/// Status updates go out at least this often while streaming (keep it well
/// under the peer's `wal_sender_timeout`).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// After a commit, a status update goes out once this much time passed
/// since the last one (synchronous replication on the peer waits for it).
const STATUS_AFTER_COMMIT: Duration = Duration::from_millis(5);
/// How long after a commit its flush is asked for: commits within it
/// share one WAL flush; the peer learns the flush position this much
/// later than it would with a flush per commit.
const FLUSH_DELAY: Duration = Duration::from_millis(10);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why a session with a peer ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("local database: {}", crate::describe_db_error(.0))]
    Local(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("replication connection: {0}")]
    Stream(#[from] StreamError),
    #[error("at {lsn}: malformed message: {source}")]
    Decode { lsn: Lsn, source: DecodeError },
    #[error("at {lsn}{}: {source}", txn.map(|t| format!(" in remote xid {}", t.xid)).unwrap_or_default())]
    Apply {
        lsn: Lsn,
        txn: Option<TxnSummary>,
        source: ApplyError,
    },
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("the peer ended the stream")]
    Ended,
}

impl SessionError {
    fn relation(&self) -> Option<&str> {
        match self {
            SessionError::Apply { source, .. } => source.relation(),
            _ => None,
        }
    }
}

/// Runs the peer until `shutdown` turns true.
pub(crate) async fn run(local: Arc<LocalNode>, peer: Peer, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_FIRST;
    let mut last_recorded = None;
    loop {
        let started = Instant::now();
        let span = info_span!("peer", peer = %peer.name);
        let result = session(&local, &peer, &mut shutdown).instrument(span).await;
        if *shutdown.borrow() {
            return;
        }
        match result {
            Ok(()) => return,
            Err(err) => {
                error!(
                    peer = %peer.name,
                    relation = err.relation().unwrap_or(""),
                    error = %err,
                    retry_in = ?backoff,
                    "apply from peer stopped"
                );
                record_apply_error(&local, &peer, &err, &mut last_recorded).await;
            }
        }
        if started.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_FIRST;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

const INSERT_APPLY_ERROR: &str = "\
INSERT INTO bdr.conflict_history
    (local_node_id, remote_node_id, relation, conflict_type, resolution,
     remote_commit_time, remote_commit_lsn, remote_xid, detail)
SELECT $1::bigint, coalesce($2::bigint, n.node_id), $3::text, 'apply_error', 'error',
       '2000-01-01 00:00:00+00'::timestamptz + ($4::bigint::text || ' microseconds')::interval,
       $5::text::pg_lsn, $6::bigint, $7::text
  FROM bdr.nodes n WHERE n.node_name = $8::text";

/// Records an error that stopped apply from `peer` as an `apply_error`
/// row of `bdr.conflict_history`, unless it is the one recorded last
/// (the session retries it with backoff) or a conflict already recorded.
async fn record_apply_error(
    local: &LocalNode,
    peer: &Peer,
    err: &SessionError,
    last_recorded: &mut Option<String>,
) {
    let SessionError::Apply { lsn, txn, source } = err else {
        return;
    };
    let text = err.to_string();
    if source.is_recorded() || last_recorded.as_ref() == Some(&text) {
        return;
    }
    let relation = source.relation().unwrap_or("");
    let result = async {
        let client = connect_local(local).await?;
        let origin = txn.map(|t| t.origin as i64);
        let time = txn.map(|t| t.commit_time);
        let at = Lsn(txn.map_or(lsn.0, |t| t.commit_lsn)).to_string();
        let xid = txn.map(|t| i64::from(t.xid));
        client
            .execute(
                INSERT_APPLY_ERROR,
                &[
                    &(local.node_id as i64),
                    &origin,
                    &relation,
                    &time,
                    &at,
                    &xid,
                    &source.to_string(),
                    &peer.name,
                ],
            )
            .await?;
        Ok::<_, SessionError>(())
    }
    .await;
    match result {
        Ok(()) => *last_recorded = Some(text),
        Err(e) => warn!(peer = %peer.name, error = %e, "recording the apply error failed"),
    }
}

/// Whether pipelined apply also batches transactions (see
/// `apply/batch.rs`): unless `BDR_APPLY_BATCH=off`, which the benchmark
/// sets to measure pipelining alone.
fn batching_enabled() -> bool {
    std::env::var("BDR_APPLY_BATCH").map_or(true, |v| v != "off")
}

/// Whether the peer streams large transactions while they are in
/// progress (see `apply/streamed.rs`): unless `BDR_STREAMING=off`, which
/// the benchmark sets to measure what it buys.
fn streaming_enabled() -> bool {
    std::env::var("BDR_STREAMING").map_or(true, |v| v != "off")
}

async fn connect_local(local: &LocalNode) -> Result<tokio_postgres::Client, SessionError> {
    let (client, conn) = local.config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "local connection ended");
        }
    });
    Ok(client)
}

/// The peer's identity, asked over the replication connection.
async fn peer_node_id(repl: &mut ReplicationClient) -> Result<NodeId, SessionError> {
    let rows = repl.simple_query("SELECT bdr.local_node_id()").await?;
    let text = rows.first().and_then(|r| r.first().cloned().flatten());
    text.and_then(|t| t.parse::<i64>().ok())
        .map(|id| id as NodeId)
        .ok_or_else(|| SessionError::Handshake("bdr.local_node_id() returned no id".into()))
}

async fn session(
    local: &LocalNode,
    peer: &Peer,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let client = connect_local(local).await?;
    let mut config = peer.config.clone();
    config.application_name(&local.name);
    let mut repl = ReplicationClient::connect_config(&config).await?;
    let peer_id = peer_node_id(&mut repl).await?;
    if peer_id == local.node_id {
        return Err(SessionError::Handshake(format!(
            "the connection string of peer {} leads to this node itself",
            peer.name
        )));
    }
    crate::catalog::record_peer_id(&client, &peer.name, peer_id).await?;
    let progress = origin::bind_session(&client, peer_id).await?;
    let start = progress.start();
    let slot = origin::name_for(local.node_id);
    if let CreateSlot::Created(info) = repl
        .create_replication_slot(&slot, "bdr", SlotSnapshot::Nothing)
        .await?
    {
        info!(peer = %peer.name, slot, lsn = %info.consistent_point, "created slot on peer");
    }
    let mut options = StartupOptions::new(local.node_id, local.name.clone(), local.pg_version_num);
    options.datum_formats = DatumFormats::TEXT.union(DatumFormats::BINARY);
    options.streaming = streaming_enabled();
    let pairs = options.to_pairs();
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stream = repl.start_replication(&slot, start, &pairs).await?;
    info!(peer = %peer.name, lsn = %start, "streaming from peer");
    let ends = Endpoints {
        local: local.node_id,
        peer: peer_id,
        peer_name: peer.name.as_str().into(),
    };
    let batched = (local.apply_pipeline && batching_enabled()).then_some(&local.config);
    let applier = Applier::new(
        client,
        ends,
        local.apply_pipeline,
        batched,
        local.parallel_apply,
        progress,
    )
    .await
    .map_err(|source| SessionError::Apply {
        lsn: start,
        txn: None,
        source,
    })?;
    let mut state = Session {
        stream,
        applier,
        peer_id,
        committed: start,
        applied: start,
        flushed: start,
        sent: (start, start),
        idle_end: None,
        flush_at: None,
        flushing: None,
        last_status: Instant::now(),
        started: false,
        asked_at: None,
    };
    let result = state.stream_loop(peer, shutdown).await;
    state.finish(result).await
}

/// A flush asked of the local server (see [`Session::ask_flush`]).
struct Flushing {
    committed: Lsn,
    idle_end: Option<Lsn>,
    answer: Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>,
}

/// Completes at `at`, never when there is none.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The answer to the flush asked, never when none was.
async fn answer_of(flushing: &mut Option<Flushing>) -> Result<u64, tokio_postgres::Error> {
    match flushing {
        Some(f) => f.answer.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Runs `work`, a step of the apply, repeating the status update every
/// [`STATUS_INTERVAL`] while it lasts. A step may take long (a failed
/// batch applied again one statement at a time, conflicts and all, or a
/// wait for a local lock), the stream is not read meanwhile, and the peer's
/// walsender ends a connection whose client stays silent for its
/// `wal_sender_timeout`. Most steps are done at their first poll, without
/// a timer.
async fn keeping_alive<T>(
    stream: &mut ReplicationStream,
    positions: (Lsn, Lsn),
    sent: &mut (Lsn, Lsn),
    last_status: &mut Instant,
    work: impl Future<Output = T>,
) -> Result<T, StreamError> {
    let mut work = std::pin::pin!(work);
    if let Poll::Ready(out) = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await {
        return Ok(out);
    }
    loop {
        let due = tokio::time::Instant::from_std(*last_status + STATUS_INTERVAL);
        tokio::select! {
            biased;
            out = &mut work => return Ok(out),
            () = tokio::time::sleep_until(due) => {
                report(stream, positions, sent, last_status).await?;
            }
        }
    }
}

/// Sends a status update with `positions` (applied, flushed) and notes
/// them as sent, now. It never asks for a reply (see the keepalives in
/// `Session::stream_loop`).
async fn report(
    stream: &mut ReplicationStream,
    positions: (Lsn, Lsn),
    sent: &mut (Lsn, Lsn),
    last_status: &mut Instant,
) -> Result<(), StreamError> {
    let (applied, flushed) = positions;
    stream
        .send_status_update(applied, flushed, applied, false)
        .await?;
    *sent = positions;
    *last_status = Instant::now();
    Ok(())
}

/// A streaming session's state.
struct Session {
    stream: ReplicationStream,
    applier: Applier,
    peer_id: NodeId,
    /// The end LSN of the last remote transaction committed here.
    committed: Lsn,
    /// Applied: `committed`, or the end of the stream when idle.
    applied: Lsn,
    /// Durably applied: what the peer may forget.
    flushed: Lsn,
    /// The last positions reported (applied, flushed).
    sent: (Lsn, Lsn),
    /// An end of the stream seen while idle, with the commits before it
    /// not yet known durable: flushed may move there once they are.
    idle_end: Option<Lsn>,
    /// When to ask for the flush of the commits not yet known durable.
    flush_at: Option<tokio::time::Instant>,
    /// The flush asked for: what it will make durable (committed, and
    /// the idle end seen before it was asked) and the answer to come.
    flushing: Option<Flushing>,
    last_status: Instant,
    /// Whether the STARTUP message arrived.
    started: bool,
    /// The position of the last keepalive that asked for a reply, when
    /// no data came after it (see [`Session::stream_loop`]).
    asked_at: Option<Lsn>,
}

impl Session {
    async fn stream_loop(
        &mut self,
        peer: &Peer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        let mut tick = tokio::time::interval(STATUS_INTERVAL / 4);
        loop {
            let flush_at = self.flush_at.filter(|_| self.flushing.is_none());
            tokio::select! {
                event = self.stream.next_event() => match event? {
                    Some(ReplicationEvent::XLogData { wal_start, data, .. }) => {
                        self.asked_at = None;
                        self.handle_frame(wal_start, &data).await?;
                    }
                    Some(ReplicationEvent::Keepalive { wal_end, reply_requested, .. }) => {
                        // The bdr plugin holds committed transactions for
                        // the next ones while its walsender reads on
                        // (plugin/src/stream.rs). A keepalive that asks for
                        // no reply comes after everything before its
                        // position: the plugin writes what it holds before
                        // the walsender sends one (this session never asks
                        // for replies, which are answered with one). One
                        // that asks for a reply comes from a timer, between
                        // any two records; its position counts only when
                        // it comes again with no data in between: then the
                        // walsender had caught up, holding nothing (at its
                        // shutdown, it asks until the client confirms that
                        // position).
                        let all_sent = !reply_requested || self.asked_at == Some(wal_end);
                        if reply_requested {
                            self.asked_at = Some(wal_end);
                        }
                        if all_sent && !self.applier.in_transaction() && !self.applier.busy() {
                            self.reached_idle_end(wal_end);
                        }
                        if reply_requested {
                            self.send_status().await?;
                        }
                    }
                    None => return Err(SessionError::Ended),
                },
                // Replies to pipelined statements and batches, above all
                // the last COMMIT's once the stream goes quiet; a batch
                // waiting to go out goes.
                settled = self.applier.next_settled(), if self.applier.busy() => {
                    keeping_alive(
                        &mut self.stream,
                        (self.applied, self.flushed),
                        &mut self.sent,
                        &mut self.last_status,
                        self.applier.on_settled(settled),
                    )
                    .await?
                    .map_err(|source| SessionError::Apply {
                        lsn: self.flushed,
                        txn: None,
                        source,
                    })?;
                    self.note_confirmed().await?;
                }
                () = sleep_until_some(flush_at) => self.ask_flush(),
                durable = answer_of(&mut self.flushing) => {
                    let asked = self.flushing.take().expect("a flush was asked");
                    match durable {
                        Ok(durable) => {
                            self.on_durable(Lsn(durable), asked.committed, asked.idle_end);
                        }
                        Err(e) if e.is_closed() => return Err(e.into()),
                        // The first session may be in a transaction that a
                        // failed statement aborted (pipelined apply rolls it
                        // back and goes on): asked again shortly.
                        Err(e) => {
                            debug!(error = %e, "reading the durable position failed; asking again");
                            self.flush_at = Some(tokio::time::Instant::now() + FLUSH_DELAY);
                        }
                    }
                    if self.sent.1 != self.flushed {
                        self.send_status().await?;
                    }
                }
                _ = tick.tick() => {
                    // Also while a long transaction is being applied and the
                    // position does not move: the peer's walsender gives up
                    // on a client that stays silent for wal_sender_timeout,
                    // and its keepalive requests queue behind the data.
                    if self.sent != (self.applied, self.flushed)
                        || self.last_status.elapsed() >= STATUS_INTERVAL
                    {
                        self.send_status().await?;
                    }
                }
                _ = shutdown.changed() => {
                    info!(peer = %peer.name, lsn = %self.flushed, "stopping stream");
                    return Ok(());
                }
            }
        }
    }

    /// The peer has sent everything before `wal_end`, and every remote
    /// transaction received is committed here.
    fn reached_idle_end(&mut self, wal_end: Lsn) {
        self.applied = self.applied.max(wal_end);
        if self.committed <= self.flushed {
            self.flushed = self.flushed.max(wal_end);
        } else if wal_end > self.flushed {
            self.idle_end = Some(self.idle_end.map_or(wal_end, |e| e.max(wal_end)));
            self.flush_at = Some(tokio::time::Instant::now());
        }
    }

    /// Asks the local server to make the commits so far durable.
    fn ask_flush(&mut self) {
        self.flush_at = None;
        self.flushing = Some(Flushing {
            committed: self.committed,
            idle_end: self.idle_end,
            answer: Box::pin(self.applier.durable_progress()),
        });
    }

    /// The origin's progress is durable up to `durable`, and the flush
    /// was asked when the last commit was `committed` and the stream's
    /// idle end `idle_end`.
    fn on_durable(&mut self, durable: Lsn, committed: Lsn, idle_end: Option<Lsn>) {
        // Every commit confirmed before the flush was asked is durable
        // now: the flush went up to the last commit through each origin.
        let durable = durable.max(committed);
        self.flushed = self.flushed.max(durable);
        if durable >= committed
            && let Some(end) = idle_end
        {
            self.flushed = self.flushed.max(end);
        }
        // The origin may already count commits of the batch in flight.
        self.applied = self.applied.max(self.flushed);
        if self.idle_end.is_some_and(|e| e <= self.flushed) {
            self.idle_end = None;
        }
        if (self.committed > self.flushed || self.idle_end.is_some()) && self.flush_at.is_none() {
            self.flush_at = Some(tokio::time::Instant::now() + FLUSH_DELAY);
        }
    }

    async fn handle_frame(&mut self, lsn: Lsn, frame: &Bytes) -> Result<(), SessionError> {
        let mut messages = Messages::new(frame);
        loop {
            let start = messages.offset();
            let Some(msg) = messages.next() else {
                break;
            };
            let msg = msg.map_err(|source| SessionError::Decode { lsn, source })?;
            if let Message::Startup(s) = &msg
                && !self.started
            {
                if s.node_id != self.peer_id {
                    return Err(SessionError::Handshake(format!(
                        "peer reports node id {:016x}, expected {:016x}",
                        s.node_id, self.peer_id
                    )));
                }
                self.started = true;
                continue;
            }
            let raw = frame.slice(start..messages.offset());
            let handled = keeping_alive(
                &mut self.stream,
                (self.applied, self.flushed),
                &mut self.sent,
                &mut self.last_status,
                self.applier.handle(frame, raw, &msg),
            )
            .await?;
            if let Err(source) = handled {
                let txn = self.applier.current_txn();
                return Err(SessionError::Apply { lsn, txn, source });
            }
            self.note_confirmed().await?;
        }
        Ok(())
    }

    /// Takes in the commits the local server confirmed: the peer may
    /// forget what they applied.
    async fn note_confirmed(&mut self) -> Result<(), SessionError> {
        let Some((end, commits)) = self.applier.take_confirmed() else {
            return Ok(());
        };
        for _ in 0..commits {
            crate::fault::after_commit();
        }
        self.on_committed(Lsn(end));
        if self.last_status.elapsed() >= STATUS_AFTER_COMMIT {
            self.send_status().await?;
        }
        Ok(())
    }

    /// Remote transactions up to `end` are committed here.
    fn on_committed(&mut self, end: Lsn) {
        self.committed = self.committed.max(end);
        self.applied = self.applied.max(end);
        if self.committed > self.flushed && self.flush_at.is_none() {
            self.flush_at = Some(tokio::time::Instant::now() + FLUSH_DELAY);
        }
    }

    async fn send_status(&mut self) -> Result<(), SessionError> {
        report(
            &mut self.stream,
            (self.applied, self.flushed),
            &mut self.sent,
            &mut self.last_status,
        )
        .await?;
        Ok(())
    }

    /// Ends the session: rolls back a half-applied transaction, reports the
    /// final position and stops the stream cleanly when possible.
    async fn finish(mut self, result: Result<(), SessionError>) -> Result<(), SessionError> {
        if let Err(e) = self.applier.reset().await {
            warn!(error = %e, "rolling back the open transaction failed");
        }
        if let Some((end, _)) = self.applier.take_confirmed() {
            self.on_committed(Lsn(end));
        }
        if result.is_ok() {
            // The peer learns the final position, durable.
            let (committed, idle_end) = (self.committed, self.idle_end);
            let durable = self.applier.durable_progress().await?;
            self.on_durable(Lsn(durable), committed, idle_end);
            if let Err(e) = self.applier.even_out(committed.0).await {
                warn!(error = %e, "bringing parallel apply's origins together failed");
            }
            self.send_status().await?;
            self.stream.stop().await?;
        }
        result
    }
}
