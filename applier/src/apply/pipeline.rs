//! Statements in flight on the apply connection.
//!
//! A pipelined statement is sent as soon as it is built, without waiting
//! for the previous one to finish: the server works through the queue
//! while the applier decodes and binds the next change. Results come back
//! in order and are checked as they arrive and at the latest before the
//! transaction's COMMIT is sent. A change that touched no row (a
//! conflict) or failed marks the restart point's work as *failed*; the
//! applier then rolls back to the restart point and applies the same
//! messages again one statement at a time, where the conflict path sees
//! each result before the next change runs (see [`super::Applier`]).
//!
//! The restart point is the transaction's BEGIN, or a savepoint set once
//! the messages kept for a replay reach [`CHUNK_BYTES`], so a large
//! transaction never keeps more than that.
//!
//! A COMMIT in flight carries the end LSN it applies up to; it counts as
//! applied only once the server confirmed it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use bdr_protocol::Lsn;
use bytes::Bytes;

use super::ApplyError;

/// The bytes of kept messages after which a savepoint becomes the new
/// restart point, unless `BDR_APPLY_CHUNK_BYTES` says otherwise (tests
/// use a small value to exercise savepoints with small transactions).
pub(super) const CHUNK_BYTES: usize = 8 << 20;

pub(super) fn chunk_bytes() -> usize {
    static VALUE: OnceLock<usize> = OnceLock::new();
    *VALUE.get_or_init(|| {
        std::env::var("BDR_APPLY_CHUNK_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CHUNK_BYTES)
    })
}

/// Statements in flight after which the oldest are awaited before more
/// are sent, so the server's replies never pile up unread.
const MAX_IN_FLIGHT: usize = 4096;

/// A statement's reply: the number of rows it touched.
pub(super) type Reply = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>;

/// What a statement's reply must show.
#[derive(Debug, Clone, Copy)]
pub(super) enum Expect {
    /// A change: at least this many rows touched.
    Rows(u64),
    /// Success.
    Done,
    /// Success, or the COMMIT that follows would silently roll back: a
    /// failure is an error of its own, like a failed COMMIT.
    Must,
    /// A COMMIT: success makes the stream applied up to this LSN.
    Commit(Lsn),
}

struct InFlight {
    reply: Reply,
    expect: Expect,
}

/// The statements in flight and the messages since the restart point.
#[derive(Default)]
pub(super) struct Pipeline {
    in_flight: VecDeque<InFlight>,
    /// The messages of the open transaction since the restart point, each
    /// a slice of the frame it came in.
    kept: Vec<Bytes>,
    kept_bytes: usize,
    /// Whether the restart point is a savepoint (otherwise the BEGIN).
    at_savepoint: bool,
    /// Why the work since the restart point must be applied again.
    failed: Option<String>,
    /// Whether that failure may come from a stale description of a local
    /// table (see [`super::STALE`]).
    stale: bool,
    /// The latest end LSN whose COMMIT the server confirmed, not yet
    /// taken, and how many commits that covers.
    confirmed: Option<Lsn>,
    confirmed_count: u64,
    /// A COMMIT or what it needs failed: no later COMMIT counts (none is
    /// sent after it, but the failed transaction's own COMMIT reports
    /// success when it rolls back).
    poisoned: bool,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("in_flight", &self.in_flight.len())
            .field("kept", &self.kept.len())
            .field("at_savepoint", &self.at_savepoint)
            .field("failed", &self.failed)
            .finish()
    }
}

impl Pipeline {
    /// Sends the statement behind `reply` (its first poll sends it) and
    /// checks whatever replies are already in.
    pub(super) fn push(&mut self, mut reply: Reply, expect: Expect) -> Result<(), ApplyError> {
        let mut cx = Context::from_waker(Waker::noop());
        match reply.as_mut().poll(&mut cx) {
            Poll::Ready(result) => self.check(expect, result)?,
            Poll::Pending => self.in_flight.push_back(InFlight { reply, expect }),
        }
        while let Some(front) = self.in_flight.front_mut() {
            let Poll::Ready(result) = front.reply.as_mut().poll(&mut cx) else {
                break;
            };
            let expect = front.expect;
            self.in_flight.pop_front();
            self.check(expect, result)?;
        }
        Ok(())
    }

    /// Whether any statement is in flight.
    pub(super) fn busy(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Whether the window of statements in flight is full.
    pub(super) fn full(&self) -> bool {
        self.in_flight.len() >= MAX_IN_FLIGHT
    }

    /// Awaits the oldest statement in flight and checks its reply. Cancel
    /// safe: the reply stays queued until it is in.
    pub(super) async fn settle_one(&mut self) -> Result<(), ApplyError> {
        let Some(front) = self.in_flight.front_mut() else {
            return Ok(());
        };
        let result = std::future::poll_fn(|cx| front.reply.as_mut().poll(cx)).await;
        let expect = front.expect;
        self.in_flight.pop_front();
        self.check(expect, result)
    }

    /// Awaits every statement in flight. An error is a COMMIT that failed.
    pub(super) async fn drain(&mut self) -> Result<(), ApplyError> {
        let mut first_error = None;
        while self.busy() {
            if let Err(e) = self.settle_one().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Awaits the oldest statements until the window has room.
    pub(super) async fn make_room(&mut self) -> Result<(), ApplyError> {
        while self.in_flight.len() > MAX_IN_FLIGHT / 2 {
            self.settle_one().await?;
        }
        Ok(())
    }

    fn check(
        &mut self,
        expect: Expect,
        result: Result<u64, tokio_postgres::Error>,
    ) -> Result<(), ApplyError> {
        match (expect, result) {
            (Expect::Commit(lsn), Ok(_)) => self.confirm(lsn),
            (Expect::Commit(_) | Expect::Must, Err(e)) => {
                self.poisoned = true;
                return Err(ApplyError::CommitFailed(e));
            }
            (Expect::Rows(want), Ok(got)) if got < want => {
                self.fail(|| format!("a change touched {got} of {want} rows"));
            }
            (_, Ok(_)) => {}
            (_, Err(e)) => {
                if self.failed.is_none() {
                    self.stale = e.code().is_some_and(|c| super::STALE.contains(&c.code()));
                }
                self.fail(|| crate::describe_db_error(&e));
            }
        }
        Ok(())
    }

    /// Marks the work since the restart point as to be applied again.
    pub(super) fn fail(&mut self, why: impl FnOnce() -> String) {
        if self.failed.is_none() {
            self.failed = Some(why());
        }
    }

    /// Records a commit the server confirmed.
    pub(super) fn confirm(&mut self, lsn: Lsn) {
        self.confirm_many(lsn, 1);
    }

    /// Records `commits` confirmed COMMITs, the last ending at `lsn` (one
    /// call of `bdr.apply_transactions` commits several).
    pub(super) fn confirm_many(&mut self, lsn: Lsn, commits: u64) {
        if self.poisoned {
            return;
        }
        self.confirmed = Some(self.confirmed.map_or(lsn, |c| c.max(lsn)));
        self.confirmed_count += commits;
    }

    /// The latest confirmed end LSN and the number of commits since the
    /// last call.
    pub(super) fn take_confirmed(&mut self) -> Option<(Lsn, u64)> {
        let lsn = self.confirmed.take()?;
        Some((lsn, std::mem::take(&mut self.confirmed_count)))
    }

    /// Marks that a COMMIT may have gone wrong: no later COMMIT counts.
    pub(super) fn poison(&mut self) {
        self.poisoned = true;
    }

    /// Whether a COMMIT failed.
    pub(super) fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// Why the work since the restart point must be applied again.
    pub(super) fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// A new transaction: its BEGIN is the restart point.
    pub(super) fn begin(&mut self, message: Bytes) {
        self.clear();
        self.keep(message);
    }

    /// Keeps a message of the open transaction for a replay.
    pub(super) fn keep(&mut self, message: Bytes) {
        self.kept_bytes += message.len();
        self.kept.push(message);
    }

    /// Whether the failure may come from a stale description of a local
    /// table.
    pub(super) fn failed_stale(&self) -> bool {
        self.failed.is_some() && self.stale
    }

    /// Whether the kept messages reached the size of a chunk.
    pub(super) fn chunk_full(&self) -> bool {
        self.kept_bytes >= chunk_bytes()
    }

    /// Takes the messages since the restart point for a replay; returns
    /// them and whether the restart point is a savepoint.
    pub(super) fn take_kept(&mut self) -> (Vec<Bytes>, bool) {
        let at_savepoint = self.at_savepoint;
        let kept = std::mem::take(&mut self.kept);
        self.clear();
        (kept, at_savepoint)
    }

    /// The work so far is checked: a savepoint (already sent) is the new
    /// restart point.
    pub(super) fn savepoint(&mut self) {
        self.clear();
        self.at_savepoint = true;
    }

    /// Whether a savepoint is the restart point.
    pub(super) fn at_savepoint(&self) -> bool {
        self.at_savepoint
    }

    /// Forgets the restart point: the transaction ended.
    pub(super) fn clear(&mut self) {
        self.kept.clear();
        self.kept_bytes = 0;
        self.at_savepoint = false;
        self.failed = None;
        self.stale = false;
    }
}
