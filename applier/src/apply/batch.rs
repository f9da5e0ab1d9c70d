//! Batched apply: many remote transactions per round trip.
//!
//! Pipelining (see [`super::pipeline`]) still waits, for every remote
//! transaction, for the replies to its changes before sending its COMMIT,
//! and tokio-postgres ends every statement with a Sync, each answered by
//! the server with a write of its own. Batched apply sends whole
//! transactions, COMMITs included, on a session of its own ([`Wire`]), with
//! one Sync per batch:
//!
//! ```text
//!  changes; origin set-up; COMMIT; changes; ...; COMMIT; Sync
//! ```
//!
//! Row changes of tables that suit it do not even go out as statements:
//! the transaction's changes, as received, are one call of the bdr
//! library's `bdr.apply_changes` (`plugin/src/apply.rs`), which applies
//! them in the server as PostgreSQL's apply worker does and records the
//! origin's progress, followed by the COMMIT:
//!
//! ```text
//!  SELECT bdr.apply_changes(changes, end lsn, commit time, origin); COMMIT; ...
//! ```
//!
//! A transaction none of whose changes went out as a statement does not
//! even need its own statements: such transactions go out together as one
//! `CALL bdr.apply_transactions(transactions)`, which applies and commits
//! each in turn, in the server. When one of them fails, those before it
//! are committed, and the origin's progress says how far that is.
//!
//! Either function raises an error where a statement would have touched no
//! row or hit a unique key, so the fallback below is the same (from the
//! first transaction not committed). A table suits them when
//! the remote rows carry all its columns and none is generated; UPDATE and
//! DELETE also need a unique index on the replica identity (see
//! `relation::in_server`). Other changes (and TRUNCATE) go out as
//! statements, after a call with the changes before them.
//!
//! There is no BEGIN, one statement less per transaction: in the extended
//! protocol the statements before a Sync run in one implicit transaction,
//! and a COMMIT ends it (with a warning that the session does not send:
//! `client_min_messages = error`). A batch holds whole transactions only,
//! since a Sync would commit the implicit transaction too.
//!
//! A change that finds no row (or hits a conflict) cannot be looked at
//! before its COMMIT goes out, so the server checks it: the session runs
//! with `bdr.apply_require_row = on` (an UPDATE or DELETE that touched no
//! row is an error), and multi-row INSERTs have no ON CONFLICT (a unique
//! key hit is an error). After an error the server skips everything up to
//! the Sync: the failed transaction and every later one in the batch do
//! not commit (those before it did, as the origin's progress shows). Once
//! the batch's ReadyForQuery is in, those transactions
//! are applied again, one statement at a time, through the conflict path
//! on the applier's other session, and batching resumes at the next
//! transaction. The replication origin (whose progress commits with each
//! transaction) is bound to whichever session applies.
//!
//! Two batches may be in flight, so that the server finds the next one
//! waiting when it ends one: while it works through them, the next one is
//! encoded, and goes out when the first is answered. A batch behind
//! another starts with `bdr.apply_check_progress(lsn)`, the end LSN of
//! the last transaction before it: unless the session's replication
//! origin is there, that is, unless every transaction of the batch before
//! committed, it raises and the server skips the whole batch. So a failed
//! transaction (even a COMMIT that fails on its own, a deferred
//! constraint, which leaves no aborted transaction block behind) is never
//! followed by a later one committing, which would carry the origin's
//! progress past it. Once both batches are answered, everything from the
//! failed transaction on is applied again, as above. Without that
//! function (an older bdr library), one batch is in flight at a time.
//!
//! Messages are kept until their transaction's COMMIT is confirmed. A
//! transaction whose kept messages grow past the chunk size of
//! [`super::pipeline`] is handed over, before any of it was sent, to the
//! pipelined path, which bounds memory with savepoints.
//!
//! Parallel apply (`parallel_apply`, off by default): a second batched
//! session, the lane, with a replication origin of its own
//! (`bdr_<peer>_1`), takes about half of the transactions: each is dealt
//! by its transaction id on the peer ([`crate::origin::lane_of`]), so
//! that the same transaction goes to the same session however often it
//! is sent. Each session commits its own transactions in the peer's
//! order, so its origin's progress says which of them are committed;
//! between the two, commits are not ordered. A transaction that touches
//! a key (relation and replica identity values) of a transaction of the
//! other session not known committed waits, before it applies anything,
//! until that one has committed (`plugin/src/apply.rs`). Only the first
//! session sends statements: a transaction sent as statements there
//! first waits for the lane's last one, and the lane's next transaction
//! waits for it; a transaction dealt to the lane that needs a statement
//! is handed over to the applier's other session, bound to the lane's
//! origin, once both batched sessions have nothing in flight. Every transaction up to
//! the lower progress of the two origins is committed: the stream
//! resumes there, and a transaction whose session's origin is past it is
//! skipped. The peer hears as flushed the last point up to which every
//! transaction is committed. Rows written through either origin are the
//! peer's: the server's search and `bdr.xact_origin` take the lane's (by
//! its name) as the peer's. After a failure on either session, both are
//! cancelled (a transaction may wait for the failed one for ever), again
//! every [`CANCEL_AGAIN`] until their batches are all answered; then
//! every transaction not committed is applied again as above, each
//! through its own session's origin. At a clean stop, the origin behind
//! is brought up to the other one once everything before is committed;
//! after an unclean stop the applier applies on two sessions, whatever
//! the setting, until the next clean stop. Local readers may see a
//! transaction of the peer before an earlier one that touches none of
//! its rows.

use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

use bdr_protocol::apply::{
    After, LocalRelation, Transaction, start_transactions, write_changes_head, write_transaction,
};
use bdr_protocol::{Lsn, Message, Messages, RelId};
use bytes::Bytes;
use tracing::{debug, info, warn};

use super::param::Param;
use super::relation::Shape;
use super::wire::{Event, Wire};
use super::{Applier, ApplyError, delete_key, update_values};

/// What a statement's reply must show.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Success.
    Done,
    /// A change: this many rows (fewer is an error raised by the server).
    Rows(u64),
    /// A COMMIT: success makes the stream applied up to this LSN.
    Commit(Lsn),
}

/// A reply awaited.
#[derive(Debug, Clone, Copy)]
enum Tag {
    /// A statement of transaction `seq`.
    Stmt { seq: u64, kind: Kind },
    /// The end of a batch.
    Sync,
}

/// The first failure in the batches in flight.
#[derive(Debug)]
struct Failure {
    /// The transaction that failed.
    seq: u64,
    why: String,
    /// The error's SQLSTATE.
    code: String,
}

/// The messages of one remote transaction, kept until its COMMIT is
/// confirmed.
#[derive(Debug)]
struct KeptTxn {
    seq: u64,
    /// The session it is dealt to (see [`crate::origin::lane_of`]).
    lane: usize,
    /// Whether it is known committed (or was before: skipped).
    committed: bool,
    /// Its end LSN, once its COMMIT is encoded.
    end_lsn: Option<Lsn>,
    messages: Vec<Bytes>,
    bytes: usize,
}

/// The batched apply session and its bookkeeping.
#[derive(Debug)]
pub(super) struct Batch {
    wire: Wire,
    /// Replies awaited for what was written, in order.
    sent: VecDeque<Tag>,
    /// Replies the encoded, unwritten statements will bring.
    unsent: Vec<Tag>,
    /// Where the open transaction starts in the unwritten bytes and tags.
    open_at: Option<(usize, usize)>,
    /// Batches written whose ReadyForQuery is not in yet.
    in_flight: usize,
    /// How many batches may be in flight: two when the server can check
    /// that a batch continues where the one before it ended
    /// ([`CHECK_PROGRESS`]), else one.
    depth: usize,
    /// The first failure in the batch in flight: its transaction and why.
    failed: Option<Failure>,
    /// Messages of the transactions not confirmed yet, oldest first.
    kept: VecDeque<KeptTxn>,
    next_seq: u64,
    /// Whether the replication origins are bound to the batched
    /// sessions (otherwise the one of session [`Batch::other`] is bound
    /// to the applier's other session, which applies meanwhile).
    on_wire: bool,
    /// The session whose origin the applier's other session has while
    /// the batched ones are left.
    other: usize,
    origin: String,
    /// The session the open transaction is dealt to.
    open_lane: usize,
    /// Each session's origin's progress, as last read: a transaction
    /// dealt to a session whose origin is past it is not applied again.
    progress: [Lsn; 2],
    /// Whether the open transaction is one already committed, skipped.
    skipping: bool,
    /// Whether row changes go to `bdr.apply_changes` (see [`ServerChanges`]).
    in_server: bool,
    /// The open transaction's changes waiting for that function.
    server: ServerChanges,
    /// Whether transactions whose changes all go to the server go out
    /// together, as one call of `bdr.apply_transactions`.
    calls: bool,
    /// Complete transactions waiting for that call.
    call: PendingCall,
    /// The transaction status at the last ReadyForQuery.
    status: u8,
    /// The second batched session of parallel apply, when open.
    par: Option<Parallel>,
    /// Unwritten bytes after which the applier waits for a batch in
    /// flight: [`MAX_UNSENT`], down to [`MIN_UNSENT`] after a failure and
    /// doubled at each batch that goes through (see [`MIN_UNSENT`]).
    limit: usize,
}

/// The second batched session of parallel apply: it applies the
/// transactions dealt to it, each a whole call of
/// `bdr.apply_transactions`, with a replication origin of its own.
#[derive(Debug)]
struct Lane {
    wire: Wire,
    /// Replies awaited, in order.
    sent: VecDeque<Tag>,
    in_flight: usize,
    /// Its first failure, until both sessions are settled.
    failed: Option<Failure>,
    /// Complete transactions waiting for its next call.
    call: PendingCall,
    /// The transaction status at its last ReadyForQuery.
    status: u8,
}

/// A batched session of parallel apply: its replication origin id (which
/// a transaction waiting for one of its own names) and its server
/// process id (to cancel it after a failure).
#[derive(Debug, Clone, Copy)]
struct Seat {
    roident: u32,
    pid: i32,
}

/// Parallel apply's state (see the module documentation).
#[derive(Debug)]
struct Parallel {
    lane: Lane,
    /// The name of the lane's replication origin.
    lane_origin: String,
    /// The first batched session's seat (`[0]`) and the lane's (`[1]`).
    seats: [Seat; 2],
    /// The end LSN of the last transaction dealt to the lane, unless
    /// every transaction before is known committed.
    lane_last: Option<Lsn>,
    /// A transaction sent as statements on the first session, which the
    /// next transaction of the lane waits for.
    fence: Option<Lsn>,
    /// For each key (relation and key values, hashed), the last
    /// transaction to touch it: its sequence number, session and end LSN
    /// (the keys are hashes already: a fast hash of them).
    keys: FxHashMap<u64, (u64, usize, Lsn)>,
    /// The keys the open transaction touches.
    open_keys: Vec<u64>,
    /// Whether the sessions were cancelled since the last failure.
    cancelled: bool,
    /// How many keys may be noted before those of committed transactions
    /// are dropped.
    prune_at: usize,
}

impl Parallel {
    /// Notes the open transaction's keys as those of transaction `seq`
    /// (dealt to `lane`, ending at `end_lsn`); `oldest` is the first
    /// transaction not known committed.
    fn note(&mut self, seq: u64, lane: usize, end_lsn: Lsn, oldest: u64) {
        for k in self.open_keys.drain(..) {
            self.keys.insert(k, (seq, lane, end_lsn));
        }
        if self.keys.len() > self.prune_at {
            self.keys.retain(|_, (s, _, _)| *s >= oldest);
            // Twice what is left: pruning stays linear in the keys noted.
            self.prune_at = MAX_KEYS.max(2 * self.keys.len());
        }
        if lane == 1 {
            self.lane_last = Some(end_lsn);
        }
    }

    /// What the open transaction, complete and dealt to `lane`, waits for
    /// before it applies: the last transaction of the other session not
    /// known committed that touched one of its keys, or a transaction
    /// sent as statements before it. Notes its keys.
    fn depend(&mut self, seq: u64, lane: usize, end_lsn: Lsn, oldest: u64) -> Option<After> {
        let other = 1 - lane;
        let mut on = self
            .open_keys
            .iter()
            .filter_map(|k| self.keys.get(k))
            .filter(|(s, l, _)| *l == other && *s >= oldest)
            .map(|(_, _, end)| *end)
            .max();
        if lane == 1 {
            on = on.max(self.fence.take());
        }
        self.note(seq, lane, end_lsn, oldest);
        on.map(|end_lsn| After {
            origin: self.seats[other].roident,
            end_lsn,
        })
    }
}

/// Marks the transactions of session `lane` up to `seq` committed: the
/// session commits its own in order.
fn mark_committed(kept: &mut VecDeque<KeptTxn>, lane: usize, seq: u64) {
    for t in kept.iter_mut() {
        if t.seq > seq {
            break;
        }
        if t.lane == lane {
            t.committed = true;
        }
    }
}

/// Drops the committed transactions from the front of `kept`: the end
/// LSN of the last one and how many, if any. Every transaction up to
/// there is committed, on either session.
fn take_committed(kept: &mut VecDeque<KeptTxn>) -> Option<(Lsn, u64)> {
    let mut last = None;
    let mut commits = 0;
    while let Some(t) = kept.front() {
        if !t.committed {
            break;
        }
        last = t.end_lsn.or(last);
        commits += 1;
        kept.pop_front();
    }
    last.map(|lsn| (lsn, commits))
}

/// One batched session's replies awaited and state (see [`Batch::side`]).
struct Side<'a> {
    sent: &'a mut VecDeque<Tag>,
    failed: &'a mut Option<Failure>,
    in_flight: &'a mut usize,
    status: &'a mut u8,
}

/// The end LSN of the last COMMIT among replies awaited: where a session's
/// origin is once its batches in flight are all committed.
fn last_commit(sent: &VecDeque<Tag>) -> Option<Lsn> {
    sent.iter().rev().find_map(|t| match t {
        Tag::Stmt {
            kind: Kind::Commit(lsn),
            ..
        } => Some(*lsn),
        _ => None,
    })
}

/// Unbinds the session's replication origin.
const ORIGIN_RESET: &str = "SELECT pg_catalog.pg_replication_origin_session_reset()";

/// Keys remembered before those of committed transactions are dropped.
const MAX_KEYS: usize = 1 << 16;

/// How long, after a failure, a session still applying is given before
/// it is cancelled again (it may wait for a transaction that failed).
pub(super) const CANCEL_AGAIN: std::time::Duration = std::time::Duration::from_millis(200);

/// The wait of a transaction sent as statements for the one before it,
/// applied by the lane (see `plugin/src/apply.rs`).
const APPLY_WAIT: &str = "SELECT bdr.apply_wait($1::oid, $2::pg_lsn)";

/// Complete transactions that go out as one `CALL bdr.apply_transactions`
/// (see `plugin/src/apply.rs`): each commits in the server in turn, with no
/// statement of its own. A transaction goes there when nothing of it went
/// out as a statement; the call goes out before the next statement, or
/// with the batch.
#[derive(Debug, Default)]
struct PendingCall {
    /// The procedure's argument (`bdr_protocol::apply::write_transaction`).
    buf: Vec<u8>,
    /// The last transaction in it: its sequence number and end LSN.
    last: Option<(u64, Lsn)>,
}

/// The procedure that applies and commits many transactions.
const APPLY_TRANSACTIONS: &str = "CALL bdr.apply_transactions($1::bytea)";

/// The function that raises unless the session's replication origin is
/// at the given LSN (the end of the batch before).
const CHECK_PROGRESS: &str = "SELECT bdr.apply_check_progress($1::pg_lsn)";

/// Bytes of transactions after which the pending call is encoded.
const CALL_BYTES: usize = 1 << 20;

/// Row changes of the open transaction that the server applies itself
/// (`bdr.apply_changes`, in the bdr library) instead of one statement per
/// change: the stream messages as received, and the relations they refer
/// to. They go out as one call at the transaction's COMMIT, or before
/// anything of the transaction that goes out as a statement.
///
/// The pipelined path (large transactions) sends them the same way, a call
/// per [`PIPE_CALL_BYTES`], without the end LSN: its COMMIT records it.
#[derive(Debug, Default)]
pub(super) struct ServerChanges {
    relations: Vec<RelId>,
    messages: Vec<u8>,
    /// The origin whose rows the changes may update or delete (NULL when
    /// conflicts are not detected).
    origin: Option<u32>,
    /// The call's argument, reused.
    payload: Vec<u8>,
}

/// Bytes of changes after which the pipelined path sends its call.
pub(super) const PIPE_CALL_BYTES: usize = 256 << 10;

impl ServerChanges {
    /// Keeps a change (`raw`, as received) of `rel_id`.
    pub(super) fn add(&mut self, rel_id: RelId, raw: &[u8], origin: Option<u32>) {
        if !self.relations.contains(&rel_id) {
            self.relations.push(rel_id);
        }
        self.messages.extend_from_slice(raw);
        self.origin = origin;
    }

    /// Whether no change is kept.
    pub(super) fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }

    /// Bytes of changes kept.
    pub(super) fn len(&self) -> usize {
        self.messages.len()
    }

    /// Forgets the kept changes.
    pub(super) fn clear(&mut self) {
        self.relations.clear();
        self.messages.clear();
    }

    /// The call's arguments for the kept changes, which it forgets: the
    /// encoded changes and the origin (see [`Self::encode`]).
    pub(super) fn take_call(
        &mut self,
        relations: &super::relation::RelationMap,
    ) -> (Bytes, Option<u32>) {
        self.encode(relations);
        (Bytes::from(std::mem::take(&mut self.payload)), self.origin)
    }

    /// Encodes the kept changes into `payload` as `bdr.apply_changes` takes
    /// them (the relations they refer to described first), and forgets them.
    fn encode(&mut self, relations: &super::relation::RelationMap) {
        let ServerChanges {
            relations: ids,
            messages,
            payload,
            ..
        } = self;
        payload.clear();
        let described: Vec<&LocalRelation> = ids
            .iter()
            .filter_map(|id| relations.peek(*id).and_then(|r| r.local.as_ref()))
            .collect();
        write_changes_head(payload, described.into_iter());
        payload.extend_from_slice(messages);
        ids.clear();
        messages.clear();
    }
}

/// The call of the bdr library's apply function.
pub(super) const APPLY_CHANGES: &str =
    "SELECT bdr.apply_changes($1::bytea, $2::pg_lsn, $3::timestamptz, $4::oid)";

/// Whether `probe`, an empty call of a function of the bdr library,
/// succeeds on the batched session; if not, warns with what is done
/// instead.
async fn callable(wire: &mut Wire, probe: &str, instead: &str) -> bool {
    match wire.simple(probe).await {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, probe, "a function of the bdr library cannot be called (is the bdr extension up to date?): {instead}");
            false
        }
    }
}

/// Whether the batched session hands row changes to `bdr.apply_changes`:
/// unless `BDR_APPLY_IN_SERVER=off`, which the benchmark sets to measure
/// the statements it replaces.
fn apply_in_server() -> bool {
    std::env::var("BDR_APPLY_IN_SERVER").map_or(true, |v| v != "off")
}

/// Unwritten bytes after which the applier waits for the batch in flight
/// before encoding more.
const MAX_UNSENT: usize = 4 << 20;

/// The limit of unwritten bytes after a failed batch: a transaction or
/// two. Everything sent behind a failed transaction is skipped by the
/// server, then encoded and sent again; with batches of [`MAX_UNSENT`]
/// (tens of thousands of small transactions) a conflict every few
/// transactions, as after a partition, made each conflict cost that much
/// again. From there the limit doubles with every batch that goes
/// through, back to [`MAX_UNSENT`] after 13.
const MIN_UNSENT: usize = 512;

/// The error `bdr.apply_require_row` raises (no_data_found).
const NO_ROW: &str = "P0002";

impl Batch {
    /// Opens the batched session and checks that it refuses a change that
    /// touches no row; `None` (with a warning) when it does not, as with an
    /// older bdr library.
    pub(super) async fn open(
        config: &tokio_postgres::Config,
        origin: String,
    ) -> Result<Option<Batch>, ApplyError> {
        let mut wire = Wire::connect(config).await?;
        wire.simple(crate::origin::APPLY_SETTINGS).await?;
        // COMMIT warns that no transaction block is open (see above).
        wire.simple("SET client_min_messages = error").await?;
        // A setting for superusers, which the applier's user may not be.
        let checked = match wire.simple("SET bdr.apply_require_row = on").await {
            Ok(()) => wire.extended("DELETE FROM bdr.nodes WHERE false").await,
            Err(e) => Err(e),
        };
        match checked {
            Err(crate::stream::StreamError::Db(e)) if e.code == NO_ROW => {}
            other => {
                warn!(
                    result = ?other,
                    "bdr.apply_require_row cannot be turned on (is the bdr library up to date, the applier's user a superuser?): applying without batches"
                );
                return Ok(None);
            }
        }
        // Conflicts fail statements on purpose: not worth a server log line.
        if let Err(e) = wire.simple("SET log_min_messages = log").await {
            debug!(error = %e, "log_min_messages unchanged");
        }
        // Empty calls: the functions are there and may be called.
        let in_server = apply_in_server()
            && callable(
                &mut wire,
                "SELECT bdr.apply_changes('\\x0100'::bytea, NULL, NULL, NULL)",
                "changes go out as statements",
            )
            .await;
        let calls = in_server
            && callable(
                &mut wire,
                "CALL bdr.apply_transactions('\\x01'::bytea)",
                "each transaction goes out as statements",
            )
            .await;
        let depth = if callable(
            &mut wire,
            "SELECT 'bdr.apply_check_progress(pg_lsn)'::pg_catalog.regprocedure",
            "one batch in flight at a time",
        )
        .await
        {
            2
        } else {
            1
        };
        Ok(Some(Batch {
            wire,
            sent: VecDeque::new(),
            unsent: Vec::new(),
            open_at: None,
            in_flight: 0,
            depth,
            limit: MAX_UNSENT,
            failed: None,
            kept: VecDeque::new(),
            next_seq: 0,
            on_wire: false,
            other: 0,
            origin,
            open_lane: 0,
            progress: [0; 2],
            skipping: false,
            in_server,
            server: ServerChanges::default(),
            calls,
            call: PendingCall::default(),
            status: b'I',
            par: None,
        }))
    }

    /// Opens the lane of parallel apply (see the module documentation):
    /// a second batched session bound to the replication origin `name`
    /// (created if missing, at the first origin's progress). Without
    /// calls of `bdr.apply_transactions`, or with a bdr library that
    /// cannot make a transaction wait for one on another session, nothing
    /// opens (with a warning).
    pub(super) async fn open_lane(
        &mut self,
        config: &tokio_postgres::Config,
        client: &tokio_postgres::Client,
        name: &str,
        progress: crate::origin::Progress,
    ) -> Result<(), ApplyError> {
        if !self.calls {
            return Ok(());
        }
        let mut wire = Wire::connect(config).await?;
        if !callable(
            &mut wire,
            "SELECT 'bdr.apply_wait(oid, pg_lsn)'::pg_catalog.regprocedure",
            "applying on one batched session",
        )
        .await
        {
            return Ok(());
        }
        let (Some(pid0), Some(pid1)) = (self.wire.pid(), wire.pid()) else {
            warn!(
                "the server did not tell a session's process id: applying on one batched session"
            );
            return Ok(());
        };
        client
            .execute(crate::origin::CREATE_ORIGIN, &[&name])
            .await?;
        if progress.lane.is_none() && progress.own != crate::stream::Lsn::INVALID {
            // Everything up to there is applied: nothing dealt to the
            // lane before is applied again (an origin never advanced
            // counts as missing, should this not get through).
            client
                .execute(
                    crate::origin::ADVANCE_ORIGIN,
                    &[&name, &progress.own.to_string()],
                )
                .await?;
        }
        wire.simple(crate::origin::APPLY_SETTINGS).await?;
        wire.simple("SET client_min_messages = error").await?;
        if let Err(e) = wire.simple("SET log_min_messages = log").await {
            debug!(error = %e, "log_min_messages unchanged");
        }
        wire.simple(&format!(
            "SELECT pg_catalog.pg_replication_origin_session_setup({})",
            crate::stream::quote_literal(name)?
        ))
        .await?;
        let roident = async |origin: &str| -> Result<u32, ApplyError> {
            let row = client
                .query_one(
                    "SELECT roident FROM pg_catalog.pg_replication_origin WHERE roname = $1",
                    &[&origin],
                )
                .await?;
            Ok(row.get(0))
        };
        let seats = [
            Seat {
                roident: roident(&self.origin).await?,
                pid: pid0,
            },
            Seat {
                roident: roident(name).await?,
                pid: pid1,
            },
        ];
        self.par = Some(Parallel {
            lane: Lane {
                wire,
                sent: VecDeque::new(),
                in_flight: 0,
                failed: None,
                call: PendingCall::default(),
                status: b'I',
            },
            lane_origin: name.to_owned(),
            seats,
            lane_last: None,
            fence: None,
            keys: FxHashMap::default(),
            open_keys: Vec::new(),
            cancelled: false,
            prune_at: MAX_KEYS,
        });
        self.set_progress(progress);
        Ok(())
    }

    /// Whether parallel apply's second session is open.
    pub(super) fn parallel(&self) -> bool {
        self.par.is_some()
    }

    /// Takes in the origins' progress read when the stream starts.
    pub(super) fn set_progress(&mut self, progress: crate::origin::Progress) {
        let own = progress.own.0;
        self.progress = [own, progress.lane.map_or(own, |l| l.0)];
    }

    /// Session `lane` confirmed the COMMIT of transaction `seq`, ending
    /// at `lsn`: the commits to confirm, if any (see [`take_committed`]).
    /// Without parallel apply every COMMIT confirms itself.
    fn commit_confirmed(&mut self, lane: usize, seq: u64, lsn: Lsn) -> Option<(Lsn, u64)> {
        mark_committed(&mut self.kept, lane, seq);
        take_committed(&mut self.kept).or(self.par.is_none().then_some((lsn, 1)))
    }

    /// Batched session `lane`'s wire and replication origin.
    fn wire_and_origin(&mut self, lane: usize) -> (&mut Wire, &str) {
        match (lane, self.par.as_mut()) {
            (1, Some(p)) => (&mut p.lane.wire, p.lane_origin.as_str()),
            _ => (&mut self.wire, self.origin.as_str()),
        }
    }

    /// Whether replies are awaited or a batch is ready to go, on either
    /// session.
    pub(super) fn busy(&self) -> bool {
        self.in_flight > 0
            || self.ready_to_send()
            || self
                .par
                .as_ref()
                .is_some_and(|p| p.lane.in_flight > 0 || p.lane.call.last.is_some())
    }

    /// Whether complete transactions wait and may go out now on either
    /// session: fewer batches than the depth are in flight there, and
    /// none failed.
    pub(super) fn can_send(&self) -> bool {
        self.main_can_send() || self.lane_can_send()
    }

    fn main_can_send(&self) -> bool {
        self.in_flight < self.depth && !self.failing() && self.ready_to_send()
    }

    fn lane_can_send(&self) -> bool {
        !self.failing()
            && self
                .par
                .as_ref()
                .is_some_and(|p| p.lane.in_flight < self.depth && p.lane.call.last.is_some())
    }

    /// Whether a session failed and the batches in flight are being
    /// settled before everything not committed is applied again.
    fn failing(&self) -> bool {
        self.failed.is_some() || self.par.as_ref().is_some_and(|p| p.lane.failed.is_some())
    }

    /// Batches in flight on both sessions.
    fn all_in_flight(&self) -> usize {
        self.in_flight + self.par.as_ref().map_or(0, |p| p.lane.in_flight)
    }

    /// The bookkeeping of session `lane` (0: the first batched session,
    /// 1: the lane).
    fn side(&mut self, lane: usize) -> Side<'_> {
        match (lane, self.par.as_mut()) {
            (1, Some(p)) => Side {
                sent: &mut p.lane.sent,
                failed: &mut p.lane.failed,
                in_flight: &mut p.lane.in_flight,
                status: &mut p.lane.status,
            },
            _ => Side {
                sent: &mut self.sent,
                failed: &mut self.failed,
                in_flight: &mut self.in_flight,
                status: &mut self.status,
            },
        }
    }

    /// Whether a session failed while the other one may still wait for a
    /// transaction that will not commit (see [`Applier::cancel_sessions`]).
    pub(super) fn recovering(&self) -> bool {
        self.par.is_some() && self.failing() && self.all_in_flight() > 0
    }

    /// Notes the keys that a row change of the open transaction touches,
    /// for dealing the transaction to a session (parallel apply only).
    fn note_keys(
        &mut self,
        msg: &Message<'_>,
        relations: &mut super::relation::RelationMap,
    ) -> Result<(), ApplyError> {
        let Some(p) = self.par.as_mut() else {
            return Ok(());
        };
        let (rel_id, tuples): (RelId, [Option<&[bdr_protocol::Datum<'_>]>; 2]) = match msg {
            Message::Insert(m) => (m.rel_id, [Some(&m.new), None]),
            Message::Update(m) => (
                m.rel_id,
                [Some(&m.new), m.old.as_ref().map(|o| &o.tuple[..])],
            ),
            Message::Delete(m) => (m.rel_id, [Some(&m.old.tuple), None]),
            _ => return Ok(()),
        };
        let rel = relations.get(rel_id)?;
        let keyless = rel.key.is_empty();
        if keyless && matches!(msg, Message::Insert(_)) {
            // A row no other change can find by key.
            return Ok(());
        }
        for tuple in tuples.into_iter().flatten() {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            rel_id.hash(&mut h);
            // Without a key, every row of the relation counts as one.
            for &i in &rel.key {
                tuple.get(i).hash(&mut h);
            }
            p.open_keys.push(h.finish());
        }
        Ok(())
    }

    /// Whether complete transactions wait to be written.
    fn ready_to_send(&self) -> bool {
        self.call.last.is_some()
            || match self.open_at {
                Some((_, tags)) => tags > 0,
                None => !self.unsent.is_empty(),
            }
    }

    /// Adds the open transaction, complete, to the pending call when
    /// nothing of it went out as a statement; whether it did.
    fn add_to_call(
        &mut self,
        end_lsn: Lsn,
        commit_time: i64,
        relations: &super::relation::RelationMap,
    ) -> Result<bool, ApplyError> {
        let Some((_, tags)) = self.open_at else {
            return Ok(false);
        };
        if !self.calls || tags != self.unsent.len() {
            return Ok(false);
        }
        self.server.encode(relations);
        let seq = self.open_seq();
        let lane = self.open_lane;
        let oldest = self.kept.front().map_or(seq, |t| t.seq);
        let after = self
            .par
            .as_mut()
            .and_then(|p| p.depend(seq, lane, end_lsn, oldest));
        let ordered = self.par.is_some();
        let call = match (lane, self.par.as_mut()) {
            (1, Some(p)) => &mut p.lane.call,
            _ => &mut self.call,
        };
        if call.buf.is_empty() {
            start_transactions(&mut call.buf);
        }
        write_transaction(
            &mut call.buf,
            &Transaction {
                end_lsn,
                commit_time,
                origin: self.server.origin,
                after,
                ordered,
                changes: &self.server.payload,
            },
        );
        call.last = Some((seq, end_lsn));
        self.open_at = None;
        if lane == 0 && self.call.buf.len() >= CALL_BYTES.min(self.limit) {
            self.flush_call()?;
        }
        Ok(true)
    }

    /// Before the first statement of a transaction sent as statements
    /// (on the first session): a wait for the last transaction dealt to
    /// the lane to commit, so that it follows every transaction before it.
    fn wait_first(&mut self) -> Result<(), ApplyError> {
        let Some(p) = self.par.as_mut() else {
            return Ok(());
        };
        let Some(lsn) = p.lane_last else {
            return Ok(());
        };
        if self.open_at.is_none() {
            return Ok(());
        }
        let seat = p.seats[1];
        p.lane_last = None;
        self.wire.execute(
            APPLY_WAIT,
            &[Param::four_bytes(seat.roident), Param::eight_bytes(lsn)],
        )?;
        self.unsent.push(Tag::Stmt {
            seq: self.open_seq(),
            kind: Kind::Done,
        });
        Ok(())
    }

    /// Encodes the pending call, if any, ahead of the open transaction
    /// (which has nothing encoded yet: a statement of it encodes the call
    /// first).
    fn flush_call(&mut self) -> Result<(), ApplyError> {
        let Some((seq, lsn)) = self.call.last.take() else {
            return Ok(());
        };
        debug_assert!(
            self.open_at.is_none_or(
                |(bytes, tags)| bytes == self.wire.unsent() && tags == self.unsent.len()
            )
        );
        self.wire
            .execute(APPLY_TRANSACTIONS, &[Param::Binary(&self.call.buf)])?;
        self.call.buf.clear();
        self.unsent.push(Tag::Stmt {
            seq,
            kind: Kind::Commit(lsn),
        });
        if self.open_at.is_some() {
            self.open_at = Some((self.wire.unsent(), self.unsent.len()));
        }
        Ok(())
    }

    /// Whether the replication origin is bound to the batched session.
    pub(super) fn on_wire(&self) -> bool {
        self.on_wire
    }

    /// Writes the complete transactions waiting, on each session that
    /// may send.
    pub(super) async fn send_ready(&mut self) -> Result<(), ApplyError> {
        if self.main_can_send() {
            self.send().await?;
        }
        if self.lane_can_send() {
            self.lane_send().await?;
        }
        Ok(())
    }

    /// Writes the lane's pending call, with a Sync: behind a batch in
    /// flight there, after the check that that one committed all of its
    /// transactions.
    async fn lane_send(&mut self) -> Result<(), ApplyError> {
        let Some(p) = self.par.as_mut() else {
            return Ok(());
        };
        let lane = &mut p.lane;
        let Some((seq, lsn)) = lane.call.last.take() else {
            return Ok(());
        };
        let behind = last_commit(&lane.sent);
        lane.wire
            .execute(APPLY_TRANSACTIONS, &[Param::Binary(&lane.call.buf)])?;
        lane.call.buf.clear();
        let check = behind.map(|lsn| [Param::eight_bytes(lsn)]);
        let at = lane.wire.unsent();
        lane.wire
            .send_batch(at, check.as_ref().map(|p| (CHECK_PROGRESS, &p[..])))
            .await?;
        if check.is_some() {
            lane.sent.push_back(Tag::Stmt {
                seq,
                kind: Kind::Done,
            });
        }
        lane.sent.push_back(Tag::Stmt {
            seq,
            kind: Kind::Commit(lsn),
        });
        lane.sent.push_back(Tag::Sync);
        lane.in_flight += 1;
        Ok(())
    }

    /// The next reply of either session (cancel safe), with the session
    /// (0: the first, 1: the lane); `None` when none is awaited.
    pub(super) async fn next_event(&mut self) -> Option<Result<(usize, Event), ApplyError>> {
        let main = self.in_flight > 0;
        let lane = self.par.as_mut().filter(|p| p.lane.in_flight > 0);
        let event = match (main, lane) {
            (false, None) => return None,
            (true, None) => self.wire.next_event().await.map(|e| (0, e)),
            (false, Some(p)) => p.lane.wire.next_event().await.map(|e| (1, e)),
            (true, Some(p)) => tokio::select! {
                e = self.wire.next_event() => e.map(|e| (0, e)),
                e = p.lane.wire.next_event() => e.map(|e| (1, e)),
            },
        };
        Some(event.map_err(ApplyError::from))
    }

    fn open_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Keeps a message of the open transaction (others are not applied
    /// again, and need not be: RELATION is taken in at once).
    fn keep(&mut self, raw: Bytes) {
        if self.open_at.is_none() {
            return;
        }
        if let Some(t) = self.kept.back_mut() {
            t.bytes += raw.len();
            t.messages.push(raw);
        }
    }

    /// The bytes kept for the open transaction.
    fn open_bytes(&self) -> usize {
        match (self.open_at, self.kept.back()) {
            (Some(_), Some(t)) => t.bytes,
            _ => 0,
        }
    }

    /// Drops everything encoded and not written: the open transaction is
    /// applied elsewhere.
    fn drop_unsent(&mut self) {
        self.wire.truncate(0);
        self.unsent.clear();
        self.open_at = None;
        self.server.clear();
        self.call.buf.clear();
        self.call.last = None;
        if let Some(p) = self.par.as_mut() {
            p.lane.call.buf.clear();
            p.lane.call.last = None;
            p.lane_last = None;
            p.fence = None;
            p.open_keys.clear();
            p.keys.clear();
        }
    }

    fn stmt(&mut self, sql: &str, params: &[Param<'_>], kind: Kind) -> Result<(), ApplyError> {
        self.flush_call()?;
        self.wait_first()?;
        self.wire.execute(sql, params)?;
        self.unsent.push(Tag::Stmt {
            seq: self.open_seq(),
            kind,
        });
        Ok(())
    }

    /// Writes the complete transactions encoded so far, with a Sync; the
    /// open one stays behind.
    async fn send(&mut self) -> Result<(), ApplyError> {
        debug_assert!(self.in_flight < self.depth && !self.failing());
        self.flush_call()?;
        let (bytes, tags) = self
            .open_at
            .unwrap_or((self.wire.unsent(), self.unsent.len()));
        if tags == 0 {
            return Ok(());
        }
        // Behind a batch in flight, the server first checks that it
        // committed all of its transactions: their last end LSN is the
        // origin's progress.
        let after = last_commit(&self.sent);
        let check = after.map(|lsn| [Param::eight_bytes(lsn)]);
        self.wire
            .send_batch(bytes, check.as_ref().map(|p| (CHECK_PROGRESS, &p[..])))
            .await?;
        if check.is_some() {
            let Some(Tag::Stmt { seq, .. }) = self.unsent.first() else {
                unreachable!("a batch starts with a statement");
            };
            self.sent.push_back(Tag::Stmt {
                seq: *seq,
                kind: Kind::Done,
            });
        }
        let tail_tags = self.unsent.split_off(tags);
        self.sent.extend(self.unsent.drain(..));
        self.sent.push_back(Tag::Sync);
        self.unsent = tail_tags;
        if self.open_at.is_some() {
            self.open_at = Some((0, 0));
        }
        self.in_flight += 1;
        Ok(())
    }
}

impl Applier {
    /// Batched apply of one message (see the module documentation).
    pub(super) async fn dispatch_batched(
        &mut self,
        frame: &Bytes,
        raw: Bytes,
        msg: &Message<'_>,
    ) -> Result<(), ApplyError> {
        let b = self.batch.as_mut().expect("batched");
        if b.skipping {
            return Box::pin(self.skip(msg)).await;
        }
        if !b.on_wire {
            if !(matches!(msg, Message::Begin(_)) && self.txn.is_none()) {
                return Box::pin(self.dispatch_other(frame, raw, msg)).await;
            }
            self.origin_to_wire().await?;
        }
        let result = self.encode(frame, raw, msg).await;
        let b = self.batch.as_mut().expect("batched");
        match result {
            // The session broke, or outside a transaction there is
            // nothing to hand over.
            Err(e) if matches!(e, ApplyError::Wire(_)) || b.open_at.is_none() => return Err(e),
            Err(ApplyError::NeedsStatements) => return Box::pin(self.hand_over(false)).await,
            // Applied again one statement at a time, where the error comes
            // back with its context (or turns out to be a conflict).
            Err(e) => {
                debug!(error = %e, "cannot batch this transaction");
                return Box::pin(self.hand_over(true)).await;
            }
            Ok(()) => {}
        }
        if b.open_bytes() >= super::pipeline::chunk_bytes() {
            return Box::pin(self.hand_over(false)).await;
        }
        b.send_ready().await?;
        // Until a batch in flight is answered and what waits goes out.
        while self.batch.as_ref().is_some_and(|b| {
            (b.in_flight > 0 && b.wire.unsent() >= b.limit)
                || b.par
                    .as_ref()
                    .is_some_and(|p| p.lane.in_flight > 0 && p.lane.call.buf.len() >= b.limit)
        }) {
            self.settle_batch_one().await?;
            if let Some(b) = self.batch.as_mut() {
                b.send_ready().await?;
            }
        }
        Ok(())
    }

    /// Encodes one message of a transaction into the batch.
    async fn encode(
        &mut self,
        frame: &Bytes,
        raw: Bytes,
        msg: &Message<'_>,
    ) -> Result<(), ApplyError> {
        if let Message::Begin(m) = msg {
            let b = self.batch.as_mut().expect("batched");
            let lane = if b.par.is_some() {
                crate::origin::lane_of(m.xid)
            } else {
                0
            };
            if m.final_lsn < b.progress[lane] {
                // Committed before the stream started (or the failure):
                // its session's origin is past it.
                debug!(xid = m.xid, lane, "skipping a transaction committed before");
                b.kept.push_back(KeptTxn {
                    seq: b.next_seq,
                    lane,
                    committed: false,
                    end_lsn: None,
                    bytes: 0,
                    messages: Vec::new(),
                });
                b.next_seq += 1;
                b.skipping = true;
                return Ok(());
            }
            self.open_txn(m).await?;
            let b = self.batch.as_mut().expect("batched");
            b.kept.push_back(KeptTxn {
                seq: b.next_seq,
                lane,
                committed: false,
                end_lsn: None,
                bytes: raw.len(),
                // BEGIN, the changes, COMMIT: room for the common
                // transaction of two changes without growing.
                messages: {
                    let mut m = Vec::with_capacity(4);
                    m.push(raw);
                    m
                },
            });
            b.next_seq += 1;
            b.open_lane = lane;
            b.open_at = Some((b.wire.unsent(), b.unsent.len()));
            if let Some(p) = b.par.as_mut() {
                p.open_keys.clear();
            }
            // The implicit transaction starts with the first statement.
            return Ok(());
        }
        let b = self.batch.as_mut().expect("batched");
        b.keep(raw.clone());
        b.note_keys(msg, &mut self.relations)?;
        if let Some((what, rel_id)) = super::change_of(msg)
            && self.keep_for_server(what, rel_id, &raw)?
        {
            return Ok(());
        }
        let b = self.batch.as_mut().expect("batched");
        if b.open_lane != 0
            && matches!(
                msg,
                Message::Insert(_) | Message::Update(_) | Message::Delete(_) | Message::Truncate(_)
            )
        {
            // Statements go out on the first session, which commits with
            // the other origin.
            return Err(ApplyError::NeedsStatements);
        }
        // Whatever goes out as a statement goes after the changes before it.
        if !matches!(msg, Message::Commit(_)) {
            self.flush_server(None)?;
        }
        if !matches!(msg, Message::Insert(_)) {
            self.flush_batched_inserts()?;
        }
        match msg {
            Message::Begin(_) => unreachable!(),
            Message::Commit(m) => {
                let Some(open) = self.txn.take() else {
                    return Err(ApplyError::OutsideTransaction("COMMIT"));
                };
                let b = self.batch.as_mut().expect("batched");
                if let Some(t) = b.kept.back_mut() {
                    t.end_lsn = Some(m.end_lsn);
                }
                if b.add_to_call(m.end_lsn, open.commit_time, &self.relations)? {
                    return Ok(());
                }
                if !self.flush_server(Some((m.end_lsn, open.commit_time)))? {
                    let params = [
                        Param::eight_bytes(m.end_lsn),
                        Param::eight_bytes(open.commit_time as u64),
                    ];
                    let b = self.batch.as_mut().expect("batched");
                    b.stmt(super::XACT_SETUP, &params, Kind::Done)?;
                }
                let b = self.batch.as_mut().expect("batched");
                b.stmt("COMMIT", &[], Kind::Commit(m.end_lsn))?;
                b.open_at = None;
                // Applied as statements on the first batched session: the
                // lane's next transaction waits for it (its changes are
                // not all known by key).
                let seq = b.open_seq();
                let oldest = b.kept.front().map_or(seq, |t| t.seq);
                if let Some(p) = b.par.as_mut() {
                    p.note(seq, 0, m.end_lsn, oldest);
                    p.fence = Some(m.end_lsn);
                }
                Ok(())
            }
            Message::Insert(m) => {
                self.require_txn("INSERT")?;
                if self.run.as_ref().is_some_and(|r| r.rel_id != m.rel_id) {
                    self.flush_batched_inserts()?;
                }
                if self.add_to_run(frame, m)? {
                    self.flush_batched_inserts()?;
                }
                Ok(())
            }
            Message::Update(m) => {
                let remote = self.require_txn("UPDATE")?;
                let rel = self.relations.get(m.rel_id)?;
                let u = update_values(rel, m)?;
                let origin = Param::four_bytes(remote.roident);
                let sql = rel.sql(Shape::Update(u.set, u.key_changes));
                let params: Vec<Param<'_>> =
                    u.new.into_iter().chain(u.key).chain([origin]).collect();
                let b = self.batch.as_mut().expect("batched");
                b.stmt(&sql, &params, Kind::Rows(1))
            }
            Message::Delete(m) => {
                let remote = self.require_txn("DELETE")?;
                let rel = self.relations.get(m.rel_id)?;
                let key = delete_key(rel, m)?;
                let origin = Param::four_bytes(remote.roident);
                let sql = rel.sql(Shape::Delete);
                let params: Vec<Param<'_>> = key.into_iter().chain([origin]).collect();
                let b = self.batch.as_mut().expect("batched");
                b.stmt(&sql, &params, Kind::Rows(1))
            }
            Message::Truncate(m) => {
                self.require_txn("TRUNCATE")?;
                let sql = self.truncate_sql(m)?;
                let b = self.batch.as_mut().expect("batched");
                b.flush_call()?;
                b.wait_first()?;
                b.wire.execute_once(&sql)?;
                let seq = b.open_seq();
                b.unsent.push(Tag::Stmt {
                    seq,
                    kind: Kind::Done,
                });
                Ok(())
            }
            Message::Relation(m) => {
                // Boxed: rare, and every message awaits this future.
                let mapped =
                    Box::pin(super::relation::MappedRelation::map(&self.client, m)).await?;
                self.relations.define(m.rel_id, mapped);
                Ok(())
            }
            Message::Logical(m) => {
                self.handle_message(m);
                Ok(())
            }
            Message::Startup(_) => Err(ApplyError::UnexpectedStartup),
            Message::StreamStart(_)
            | Message::StreamStop
            | Message::Subxact(_)
            | Message::StreamCommit(_)
            | Message::StreamAbort(_) => Err(ApplyError::UnexpectedStreamed(msg.tag())),
        }
    }

    /// A message of a transaction skipped (committed before): only
    /// descriptions of relations are taken in, and its COMMIT counts it
    /// as applied.
    async fn skip(&mut self, msg: &Message<'_>) -> Result<(), ApplyError> {
        match msg {
            Message::Relation(m) => {
                let mapped = super::relation::MappedRelation::map(&self.client, m).await?;
                self.relations.define(m.rel_id, mapped);
            }
            Message::Commit(m) => {
                let b = self.batch.as_mut().expect("batched");
                b.skipping = false;
                if let Some(t) = b.kept.back_mut() {
                    t.end_lsn = Some(m.end_lsn);
                    t.committed = true;
                }
                if let Some((lsn, commits)) = take_committed(&mut b.kept) {
                    self.pipe.confirm_many(lsn, commits);
                }
            }
            Message::Begin(m) => return Err(ApplyError::NestedBegin(m.xid)),
            _ => {}
        }
        Ok(())
    }

    /// Keeps a row change for `bdr.apply_changes` when its relation
    /// suits it; whether it did.
    fn keep_for_server(
        &mut self,
        what: &'static str,
        rel_id: RelId,
        raw: &[u8],
    ) -> Result<bool, ApplyError> {
        let Some(origin) = self.server_applies(what, rel_id)? else {
            return Ok(false);
        };
        // INSERTs held back for a statement went first.
        self.flush_batched_inserts()?;
        let b = self.batch.as_mut().expect("batched");
        b.server.add(rel_id, raw, origin);
        Ok(true)
    }

    /// Whether `bdr.apply_changes` may apply a `what` change of `rel_id`
    /// (the batched session found it callable, the table suits it): if so,
    /// the origin whose rows it may change (`None`: any).
    pub(super) fn server_applies(
        &mut self,
        what: &'static str,
        rel_id: RelId,
    ) -> Result<Option<Option<u32>>, ApplyError> {
        if !self.batch.as_ref().is_some_and(|b| b.in_server) {
            return Ok(None);
        }
        let remote = self.require_txn(what)?;
        // Without an index to find rows by, INSERTs only.
        let suits = match &self.relations.get(rel_id)?.local {
            Some(local) => local.index != 0 || what == "INSERT",
            None => false,
        };
        Ok(suits.then(|| super::sql::detect_conflicts().then_some(remote.roident)))
    }

    /// Encodes the call of `bdr.apply_changes` with the changes kept for
    /// it, recording the transaction's end LSN and commit time when `end`
    /// is given; whether there was anything to call it with.
    fn flush_server(&mut self, end: Option<(Lsn, i64)>) -> Result<bool, ApplyError> {
        let Some(b) = self.batch.as_mut() else {
            return Ok(false);
        };
        if b.server.is_empty() {
            return Ok(false);
        }
        // Out of the batch while its payload is bound.
        let mut server = std::mem::take(&mut b.server);
        server.encode(&self.relations);
        let (lsn, time) = match end {
            Some((lsn, time)) => (Param::eight_bytes(lsn), Param::eight_bytes(time as u64)),
            None => (Param::Null, Param::Null),
        };
        let params = [
            Param::Binary(&server.payload),
            lsn,
            time,
            server.origin.map_or(Param::Null, Param::four_bytes),
        ];
        let b = self.batch.as_mut().expect("batched");
        let sent = b.stmt(APPLY_CHANGES, &params, Kind::Done);
        b.server = server;
        sent.map(|()| true)
    }

    /// Encodes the INSERTs held back (see [`Applier::flush_inserts`]).
    fn flush_batched_inserts(&mut self) -> Result<(), ApplyError> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        let rel = self.relations.get(run.rel_id)?;
        let b = self.batch.as_mut().expect("batched");
        for (rows, params) in run.into_statements(rel.columns.len()) {
            let sql = rel.sql(Shape::InsertRows(rows));
            b.stmt(&sql, &params, Kind::Rows(rows as u64))?;
        }
        Ok(())
    }

    /// Awaits one reply of the batches in flight and acts on it; after a
    /// failure, cancels what still applies (see [`Self::cancel_sessions`])
    /// when no reply comes for a while.
    pub(super) async fn settle_batch_one(&mut self) -> Result<(), ApplyError> {
        let b = self.batch.as_mut().expect("batched");
        if b.recovering() {
            match tokio::time::timeout(CANCEL_AGAIN, b.next_event()).await {
                Ok(Some(event)) => return self.on_batch_event(event?).await,
                Ok(None) => return Ok(()),
                Err(_) => return Box::pin(self.cancel_sessions()).await,
            }
        }
        match b.next_event().await {
            Some(event) => self.on_batch_event(event?).await,
            None => Ok(()),
        }
    }

    /// After a failure on one batched session of parallel apply: asks the
    /// server to cancel what either session is applying. A transaction
    /// after the failed one waits for it to commit, which it will not;
    /// everything not committed is applied again once both sessions are
    /// settled. Asked again every [`CANCEL_AGAIN`] while a session has not
    /// answered: a cancel that reaches a session between two batches is
    /// lost.
    pub(super) async fn cancel_sessions(&mut self) -> Result<(), ApplyError> {
        let Some(p) = self.batch.as_mut().and_then(|b| b.par.as_mut()) else {
            return Ok(());
        };
        p.cancelled = true;
        let pids = [p.seats[0].pid, p.seats[1].pid];
        debug!(
            ?pids,
            "a batched session failed: cancelling what the sessions apply"
        );
        for pid in pids {
            self.client
                .execute("SELECT pg_catalog.pg_cancel_backend($1)", &[&pid])
                .await?;
        }
        Ok(())
    }

    /// Acts on one reply of the batches in flight (of session `lane`: 0,
    /// the first batched session, or 1): a confirmed COMMIT, a failure
    /// (everything from its transaction on is applied again), the end of
    /// a batch (the next one goes out).
    pub(super) async fn on_batch_event(
        &mut self,
        (lane, event): (usize, Event),
    ) -> Result<(), ApplyError> {
        let b = self.batch.as_mut().expect("batched");
        let parallel = b.par.is_some();
        let Side {
            sent,
            failed,
            in_flight,
            status: last_status,
        } = b.side(lane);
        match event {
            Event::Complete(rows) => match sent.pop_front() {
                Some(Tag::Stmt {
                    kind: Kind::Rows(want),
                    ..
                }) if rows < want => {
                    // bdr.apply_require_row was checked when the session
                    // opened; a short count without an error means the
                    // transaction may have committed without the change.
                    self.pipe.poison();
                    Err(ApplyError::Batch(format!(
                        "a change touched {rows} of {want} rows without an error"
                    )))
                }
                Some(Tag::Stmt {
                    seq,
                    kind: Kind::Commit(lsn),
                }) => {
                    // Each session commits in the peer's order: every
                    // transaction of this session before it committed too.
                    if let Some((lsn, commits)) = b.commit_confirmed(lane, seq, lsn) {
                        self.pipe.confirm_many(lsn, commits);
                    }
                    Ok(())
                }
                Some(Tag::Stmt { .. }) => Ok(()),
                Some(Tag::Sync) | None => Err(ApplyError::Batch(
                    "a statement result arrived where none was expected".into(),
                )),
            },
            Event::Error(e) => {
                let first = match sent.pop_front() {
                    Some(Tag::Stmt { seq, .. }) => match failed {
                        None => {
                            *failed = Some(Failure {
                                seq,
                                why: e.to_string(),
                                code: e.code.clone(),
                            });
                            true
                        }
                        Some(first) => {
                            debug!(error = %e, failed = first.seq, "a batch behind a failed one did not apply");
                            false
                        }
                    },
                    _ => {
                        return Err(ApplyError::Batch(format!(
                            "an error arrived where none was expected: {e}"
                        )));
                    }
                };
                // The server skips the rest of the batch.
                while matches!(sent.front(), Some(Tag::Stmt { .. })) {
                    sent.pop_front();
                }
                if first && parallel && b.par.as_ref().is_some_and(|p| !p.cancelled) {
                    Box::pin(self.cancel_sessions()).await?;
                }
                Ok(())
            }
            Event::Ready(status) => {
                if !matches!(sent.pop_front(), Some(Tag::Sync)) {
                    return Err(ApplyError::Batch(
                        "the end of a batch arrived before its statements".into(),
                    ));
                }
                *in_flight -= 1;
                *last_status = status;
                if b.failing() {
                    if b.all_in_flight() > 0 {
                        // The batches behind the failed one fail their
                        // check of the origin's progress, the other
                        // session's are cancelled: once all are in, all
                        // is applied again from the first not committed.
                        return Ok(());
                    }
                    let main = b.failed.take();
                    let other = b.par.as_mut().and_then(|p| p.lane.failed.take());
                    if let Some(p) = b.par.as_mut() {
                        p.cancelled = false;
                    }
                    // The earlier of the two, when both failed.
                    let failure = [main, other]
                        .into_iter()
                        .flatten()
                        .min_by_key(|f| f.seq)
                        .expect("a session failed");
                    return Box::pin(self.recover(failure)).await;
                }
                if status != b'I' {
                    // Batches hold whole transactions, each ending in COMMIT.
                    return Err(ApplyError::Batch(format!(
                        "a batch left a transaction open (status {:?})",
                        char::from(status)
                    )));
                }
                b.limit = (2 * b.limit).min(MAX_UNSENT);
                b.send_ready().await
            }
        }
    }

    /// After a failed batch: rolls back what the server left open and
    /// applies every transaction not committed (from `failure`'s on when
    /// the origins' progress does not say) again, one statement at a time
    /// on the other session.
    async fn recover(&mut self, failure: Failure) -> Result<(), ApplyError> {
        let Failure { seq, why, code } = failure;
        let b = self.batch.as_mut().expect("batched");
        b.limit = MIN_UNSENT;
        // What was encoded since is applied again too, from its messages.
        b.drop_unsent();
        if b.status != b'I' {
            b.wire.simple("ROLLBACK").await?;
            b.status = b'I';
        }
        b.wire.forget_statements().await?;
        if let Some(p) = b.par.as_mut() {
            if p.lane.status != b'I' {
                p.lane.wire.simple("ROLLBACK").await?;
                p.lane.status = b'I';
            }
            p.lane.wire.forget_statements().await?;
        }
        if super::STALE.contains(&code.as_str()) {
            // Were a local table created again, every later batch would
            // fail the same way until the peer sent its RELATION again.
            self.remap_relations(&why).await?;
        }
        // A failed call of bdr.apply_transactions committed the
        // transactions before the one that failed: each session's origin
        // tells how far that is, for the transactions dealt to it.
        let progress = crate::origin::read_progress(&self.client, self.ends.peer).await?;
        let b = self.batch.as_mut().expect("batched");
        b.set_progress(progress);
        // A transaction being skipped stays so, after those applied again.
        let skipped = if std::mem::take(&mut b.skipping) {
            b.kept.pop_back()
        } else {
            None
        };
        let at = b.progress;
        for t in b.kept.iter_mut() {
            if t.end_lsn.is_some_and(|lsn| lsn <= at[t.lane]) {
                t.committed = true;
            }
        }
        if let Some((lsn, commits)) = take_committed(&mut b.kept) {
            self.pipe.confirm_many(lsn, commits);
        }
        let b = self.batch.as_mut().expect("batched");
        let (seq, lane) = b.kept.front().map_or((seq, 0), |t| (t.seq, t.lane));
        // The later ones go into batches again, where those committed
        // are skipped.
        let mut later: Vec<Bytes> = Vec::new();
        let mut failed: Vec<Bytes> = Vec::new();
        for t in b.kept.drain(..) {
            if t.seq == seq {
                failed = t.messages;
            } else if t.seq > seq {
                later.extend(t.messages);
            }
        }
        debug!(
            why,
            messages = failed.len(),
            later = later.len(),
            "batch failed: applying again one statement at a time"
        );
        self.forget_held();
        self.txn = None;
        self.origin_to_other(lane).await?;
        self.replay_messages(&failed, true).await?;
        // The transactions after it go into batches again.
        for raw in later {
            let Some(msg) = Messages::new(&raw).next() else {
                continue;
            };
            let msg = msg?;
            Box::pin(self.dispatch_batched(&raw, raw.clone(), &msg)).await?;
        }
        if let Some(mut t) = skipped {
            let b = self.batch.as_mut().expect("batched");
            t.seq = b.next_seq;
            b.next_seq += 1;
            b.kept.push_back(t);
            b.skipping = true;
        }
        Ok(())
    }

    /// Hands the open transaction over to the other session: the complete
    /// ones before it are sent and checked first, then its kept messages
    /// are applied there (one statement at a time when `serial`, to bring
    /// an error back with its context).
    async fn hand_over(&mut self, serial: bool) -> Result<(), ApplyError> {
        if !self.settle_batches().await? {
            // A batch failed, and applying its transactions again handed
            // this one over already.
            return Ok(());
        }
        let b = self.batch.as_mut().expect("batched");
        let Some(open) = b.kept.pop_back() else {
            return Ok(());
        };
        debug!(
            serial,
            messages = open.messages.len(),
            "handing the transaction over"
        );
        b.drop_unsent();
        self.forget_held();
        self.txn = None;
        self.origin_to_other(open.lane).await?;
        self.replay_messages(&open.messages, serial).await
    }

    /// Sends and settles every complete transaction of the batched
    /// session; whether the replication origin is still bound there (not
    /// when there is no such session, or a failure moved it).
    async fn settle_batches(&mut self) -> Result<bool, ApplyError> {
        loop {
            let Some(b) = self.batch.as_mut() else {
                return Ok(false);
            };
            if !b.on_wire {
                return Ok(false);
            }
            if b.all_in_flight() > 0 {
                self.settle_batch_one().await?;
            } else if b.ready_to_send()
                || b.par.as_ref().is_some_and(|p| p.lane.call.last.is_some())
            {
                b.send_ready().await?;
            } else {
                // Everything is committed.
                if let Some(p) = b.par.as_mut() {
                    p.lane_last = None;
                    p.fence = None;
                }
                return Ok(true);
            }
        }
    }

    /// Moves the replication origin to the other session once nothing is
    /// in flight on the batched one (the other session applies next).
    pub(super) async fn leave_wire(&mut self) -> Result<(), ApplyError> {
        if self.settle_batches().await? {
            self.origin_to_other(0).await?;
        }
        Ok(())
    }

    /// Applies `messages` on the other session: one statement at a time
    /// when `serial`, else as that session applies (pipelined or not).
    async fn replay_messages(
        &mut self,
        messages: &[Bytes],
        serial: bool,
    ) -> Result<(), ApplyError> {
        for raw in messages {
            let Some(msg) = Messages::new(raw).next() else {
                continue;
            };
            let msg = msg?;
            if serial {
                self.dispatch(&msg).await?;
            } else {
                self.dispatch_other(raw, raw.clone(), &msg).await?;
            }
        }
        if serial && self.pipelined && self.txn.is_some() {
            // The rest of the transaction is pipelined: from a savepoint.
            self.new_restart_point().await?;
        }
        Ok(())
    }

    /// Moves the replication origin of batched session `lane` from it to
    /// the other session (nothing is in flight on either batched one).
    async fn origin_to_other(&mut self, lane: usize) -> Result<(), ApplyError> {
        let b = self.batch.as_mut().expect("batched");
        let (wire, name) = b.wire_and_origin(lane);
        let name = name.to_owned();
        wire.simple(ORIGIN_RESET).await?;
        b.on_wire = false;
        b.other = if b.par.is_some() { lane } else { 0 };
        self.client
            .execute(
                "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
                &[&name],
            )
            .await?;
        Ok(())
    }

    /// Moves the replication origin the other session has back to its
    /// batched session, once the other one has nothing in flight.
    pub(super) async fn origin_to_wire(&mut self) -> Result<(), ApplyError> {
        self.pipe.drain().await?;
        self.pipe.clear();
        self.client.batch_execute(ORIGIN_RESET).await?;
        let b = self.batch.as_mut().expect("batched");
        let (wire, name) = b.wire_and_origin(b.other);
        let setup = format!(
            "SELECT pg_catalog.pg_replication_origin_session_setup({})",
            crate::stream::quote_literal(name)?
        );
        wire.simple(&setup).await?;
        b.on_wire = true;
        b.other = 0;
        Ok(())
    }

    /// Waits for the batch in flight (at the end of a session), so that
    /// nothing commits behind the next session's back.
    pub(super) async fn finish_batch(&mut self) {
        while let Some(b) = self.batch.as_mut() {
            if b.all_in_flight() == 0 {
                break;
            }
            let event = if b.par.is_some() {
                // A session may wait for a transaction of the other one
                // that failed.
                match tokio::time::timeout(CANCEL_AGAIN, b.next_event()).await {
                    Ok(event) => event,
                    Err(_) => {
                        if let Err(e) = self.cancel_sessions().await {
                            info!(error = %e, "cancelling the batched sessions failed");
                            break;
                        }
                        continue;
                    }
                }
            } else {
                b.next_event().await
            };
            let Some(event) = event else {
                break;
            };
            let b = self.batch.as_mut().expect("batched");
            match event {
                Ok((lane, event)) => {
                    let side = b.side(lane);
                    match event {
                        Event::Ready(_) => {
                            *side.in_flight -= 1;
                            while side
                                .sent
                                .pop_front()
                                .is_some_and(|t| !matches!(t, Tag::Sync))
                            {
                            }
                        }
                        Event::Complete(_) => {
                            if let Some(Tag::Stmt {
                                seq,
                                kind: Kind::Commit(lsn),
                            }) = side.sent.pop_front()
                                && let Some((lsn, commits)) = b.commit_confirmed(lane, seq, lsn)
                            {
                                self.pipe.confirm_many(lsn, commits);
                            }
                        }
                        Event::Error(_) => {
                            while matches!(side.sent.front(), Some(Tag::Stmt { .. })) {
                                side.sent.pop_front();
                            }
                        }
                    }
                }
                Err(e) => {
                    info!(error = %e, "batched apply session ended");
                    break;
                }
            }
        }
    }

    /// At a clean stop of parallel apply, once every transaction up to
    /// `applied` is committed: when neither origin is past it, the one
    /// behind is set to where the other is, so that the next start, with
    /// parallel apply on or off, resumes there with nothing to sort out.
    pub(crate) async fn even_out(&mut self, applied: Lsn) -> Result<(), ApplyError> {
        if self.batch.as_ref().is_none_or(|b| b.par.is_none()) {
            return Ok(());
        }
        let progress = crate::origin::read_progress(&self.client, self.ends.peer).await?;
        let Some(lane_at) = progress.lane else {
            return Ok(());
        };
        let high = lane_at.max(progress.own);
        if lane_at == progress.own || applied < high.0 {
            debug!(%lane_at, own = %progress.own, applied, "the origins stay apart");
            return Ok(());
        }
        let low = usize::from(lane_at < progress.own);
        let b = self.batch.as_mut().expect("batched");
        let held_here = !b.on_wire && b.other == low;
        let (wire, name) = b.wire_and_origin(low);
        let name = name.to_owned();
        if held_here {
            self.client.batch_execute(ORIGIN_RESET).await?;
        } else {
            wire.simple(ORIGIN_RESET).await?;
        }
        self.client
            .execute(crate::origin::ADVANCE_ORIGIN, &[&name, &high.to_string()])
            .await?;
        debug!(origin = name, lsn = %high, "origin brought up to the other one");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::{KeptTxn, mark_committed, take_committed};

    /// Transactions 0.. dealt to `lanes`, ending at 100, 200, ...
    fn kept(lanes: &[usize]) -> VecDeque<KeptTxn> {
        lanes
            .iter()
            .enumerate()
            .map(|(i, &lane)| KeptTxn {
                seq: i as u64,
                lane,
                committed: false,
                end_lsn: Some(100 * (i as u64 + 1)),
                messages: Vec::new(),
                bytes: 0,
            })
            .collect()
    }

    #[test]
    fn the_stream_is_applied_up_to_the_first_transaction_not_committed() {
        let mut k = kept(&[0, 1, 0, 1, 1, 0]);
        // The lane commits through transaction 3: 0 is not committed.
        mark_committed(&mut k, 1, 3);
        assert_eq!(take_committed(&mut k), None);
        // The first session through 2: 0 to 3 are, 4 (the lane's) not.
        mark_committed(&mut k, 0, 2);
        assert_eq!(take_committed(&mut k), Some((400, 4)));
        assert_eq!(k.front().map(|t| t.seq), Some(4));
        // The first session's 5 does not carry the lane's 4 with it.
        mark_committed(&mut k, 0, 5);
        assert_eq!(take_committed(&mut k), None);
        mark_committed(&mut k, 1, 4);
        assert_eq!(take_committed(&mut k), Some((600, 2)));
        assert!(k.is_empty());
    }
}
