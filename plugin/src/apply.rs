//! `bdr.apply_changes(changes, end_lsn, commit_time, origin)`: the row
//! changes of a remote transaction, applied by the receiving node's server
//! through the executor's replication routines (`execReplication.c`), as
//! PostgreSQL's apply worker applies them, instead of one SQL statement
//! per change.
//!
//! `bdr-applier` calls it in its batched session (see
//! `applier/src/apply/batch.rs`): one call per remote transaction, then
//! COMMIT. The argument (`bdr_protocol::apply`) carries the stream's
//! INSERT, UPDATE and DELETE messages unchanged and, per relation, the
//! local table, the unique index that finds rows by the replica identity,
//! and the local column of each remote column.
//!
//! Conflicts are not resolved here. Anything but the plain case is an
//! ERROR, which fails the call (and so the transaction and the rest of the
//! batch); the applier then applies the transaction again one statement
//! at a time, through its conflict path:
//!
//! - an UPDATE or DELETE that finds no row by its key, or a row last
//!   written by another origin than the change's (`no_data_found`, as
//!   `bdr.apply_require_row`); a row whose last writer is unknown (frozen,
//!   or written earlier in the same transaction) is applied to, as by the
//!   statements of the applier's no-conflict path;
//! - a row that another transaction changed and committed between the
//!   search and the write (the search locks the row only for tables with
//!   BEFORE ROW triggers, see `find`);
//! - a row that hits a unique key (unique_violation, from the index);
//! - a NULL key value, a value that does not fit its column, a relation
//!   whose table, columns or index no longer match the description.
//!
//! Each change runs in its own command (the next one sees it), with the
//! transaction's snapshot for constraints. The exception are runs of
//! INSERTs into a table without stored generated columns or row triggers
//! that fire in the session's replication role (foreign keys' do not):
//! they are held (up to [`HELD_ROWS`] rows or about [`HELD_BYTES`]) and
//! written together with `table_multi_insert`, as COPY FROM writes, one
//! WAL record per page, before any change that is not held (which could
//! see them) and at the end of the call. Triggers fire as they would for
//! the applier's statements (the session runs with
//! `session_replication_role = replica`), AFTER triggers at the end of
//! the call. With `end_lsn` given, the call also records the remote
//! transaction in the session's replication origin, as
//! `pg_replication_origin_xact_setup(end_lsn, commit_time)`.
//!
//! Only superusers may call it: it writes to tables without the checks of
//! SQL statements (privileges, row security, rules), as the apply worker
//! does.

use std::cell::RefCell;
use std::ffi::{CStr, c_char};

use bdr_protocol::apply::{LocalRelation, read_changes, read_transactions};
use bdr_protocol::by_value::{self, ByValueError};
use bdr_protocol::{Datum as Value, INT2_OID, INT4_OID, INT8_OID, Message, RelId};
use pgrx::PgSqlErrorCode;
use pgrx::pg_sys;
use rustc_hash::FxHashMap;

use crate::pg::{new_context, raise, switch_to};
use crate::raw;

/// How one column's values become datums: the type's receive and input
/// functions, looked up on first use and kept across calls.
struct ColumnIo {
    receive: Option<(Box<pg_sys::FmgrInfo>, pg_sys::Oid)>,
    input: Option<(Box<pg_sys::FmgrInfo>, pg_sys::Oid)>,
}

/// A relation as described by the applier, with its columns' functions.
struct Described {
    desc: LocalRelation,
    io: Vec<ColumnIo>,
}

thread_local! {
    /// The relations described so far, by stream relation id. Taken out
    /// for a call and put back after it: a call that fails starts the
    /// next one from scratch.
    static DESCRIBED: RefCell<FxHashMap<RelId, Described>> = RefCell::new(FxHashMap::default());
    /// Where the functions' lookups (and their caches) live.
    static CACHE_CXT: std::cell::Cell<pg_sys::MemoryContext> =
        const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// The table one described relation is applied to, open for the call.
struct Target {
    rel: pg_sys::Relation,
    rri: *mut pg_sys::ResultRelInfo,
    /// The range table entry, whose updated columns each UPDATE sets.
    rte: *mut pg_sys::RangeTblEntry,
    /// The local row found by key.
    local: *mut pg_sys::TupleTableSlot,
    /// The unique index that finds it; `None` for a table described
    /// without one (INSERTs only).
    finder: Option<Finder>,
    /// The row to write.
    new: *mut pg_sys::TupleTableSlot,
    natts: usize,
    /// INSERTs held for one multi-row insert; `None` for a table that
    /// takes its rows one at a time (see [`open_target`]).
    held: Option<Held>,
}

/// Rows of one table held for `table_multi_insert`, as COPY FROM holds
/// them: the heap gets them a page at a time (one WAL record per page
/// instead of one per row), then each gets its index entries in order.
struct Held {
    /// Slots of the table's own kind, reused from one flush to the next.
    slots: Vec<*mut pg_sys::TupleTableSlot>,
    /// Their row type: a copy of the table's, which slots do not pin (a
    /// thousand pins of one descriptor cost the resource owner a
    /// thousand probes each).
    tupdesc: pg_sys::TupleDesc,
    /// How many of them hold a row.
    rows: usize,
    /// The held rows' size in the stream, against [`HELD_BYTES`].
    bytes: usize,
}

/// A unique index that finds rows by key, one of those the table's
/// result relation opened.
struct Finder {
    index: pg_sys::Relation,
    /// Per index key column, in index order.
    keys: Vec<KeyColumn>,
    /// The scan's keys, filled in for each search.
    scan_keys: Vec<pg_sys::ScanKeyData>,
}

/// One key column of a [`Finder`]'s index.
struct KeyColumn {
    /// The table column it holds.
    attnum: i16,
    /// The function of its operator family's equality operator.
    equal: pg_sys::RegProcedure,
    collation: pg_sys::Oid,
}

/// At most this many rows are held for one multi-row insert...
const HELD_ROWS: usize = 1000;
/// ...and at most about this many bytes of their stream messages.
const HELD_BYTES: usize = 64 * 1024;

/// `TEXTOID` and `VARCHAROID`.
const TEXT_OID: u32 = 25;
const VARCHAR_OID: u32 = 1043;
const BPCHAR_OID: u32 = 1042;

const NO_ROW: PgSqlErrorCode = PgSqlErrorCode::ERRCODE_NO_DATA_FOUND;

/// `pg_finfo` record of [`apply_changes`]: a version-1 C function (its
/// arguments include `pg_lsn`, which pgrx does not convert).
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_apply_changes() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `bdr.apply_changes(changes bytea, end_lsn pg_lsn, commit_time
/// timestamptz, origin oid) RETURNS bigint`: applies the changes and
/// returns how many. `origin` is the replication origin id that rows
/// changed by an UPDATE or DELETE must have been last written by (NULL:
/// any). `end_lsn` and `commit_time`, when not NULL, are recorded with the
/// transaction's commit in the session's replication origin.
///
/// # Safety
/// Called by PostgreSQL's function manager with the four arguments of the
/// SQL signature.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn apply_changes(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the function manager passes a valid call with four
    // arguments (the SQL signature).
    let args = unsafe { (*fcinfo).args.as_slice(4) };
    let arg = |i: usize| (!args[i].isnull).then_some(args[i].value);
    require_superuser("bdr.apply_changes");
    // SAFETY: a bytea argument, detoasted into the call's memory.
    let bytes = unsafe { bytea_arg(&args[0], "bdr.apply_changes: the changes") };
    let origin = arg(3).map(|d| d.value() as u32);
    // SAFETY: runs in a backend, in a transaction (a SQL function call).
    let applied = unsafe {
        let mut exec = None;
        let applied = apply(
            &mut exec,
            pg_sys::CurrentMemoryContext,
            false,
            bytes,
            origin,
        );
        if let Some(e) = exec {
            e.close();
        }
        applied
    };
    if let Some(end_lsn) = arg(1) {
        record_commit(
            "bdr.apply_changes",
            end_lsn.value() as u64,
            arg(2).map_or(0, |d| d.value() as i64),
        );
    }
    pg_sys::Datum::from(applied)
}

/// Raises unless the current user is a superuser.
fn require_superuser(function: &str) {
    // SAFETY: a plain catalog check of the current user.
    if !unsafe { pg_sys::superuser() } {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("{function} may only be called by a superuser"),
            None,
        );
    }
}

/// The bytes of a bytea argument, detoasted into the current memory
/// context; NULL is an error naming `what`.
///
/// # Safety
/// `arg` must be a bytea argument of the current call.
unsafe fn bytea_arg<'a>(arg: &pg_sys::NullableDatum, what: &str) -> &'a [u8] {
    if arg.isnull {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("{what} are NULL"),
            None,
        );
    }
    // SAFETY: per the contract.
    unsafe {
        let v = pg_sys::pg_detoast_datum_packed(arg.value.cast_mut_ptr());
        std::slice::from_raw_parts(
            pgrx::varlena::vardata_any(v).cast::<u8>(),
            pgrx::varlena::varsize_any_exhdr(v),
        )
    }
}

/// Records the remote transaction's end LSN and commit time in the
/// session's replication origin, as `pg_replication_origin_xact_setup`:
/// they are written with the local commit.
fn record_commit(function: &str, end_lsn: u64, commit_time: i64) {
    // SAFETY: backend globals, read at the commit of this transaction.
    unsafe {
        if pg_sys::replorigin_session_origin == pg_sys::InvalidRepOriginId as u16 {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("{function}: no replication origin is configured in this session"),
                None,
            );
        }
        pg_sys::replorigin_session_origin_lsn = end_lsn;
        pg_sys::replorigin_session_origin_timestamp = commit_time;
    }
}

/// `pg_finfo` record of [`apply_check_progress`].
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_apply_check_progress() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `bdr.apply_check_progress(expected pg_lsn) RETURNS void` (STRICT):
/// raises unless the session's replication origin is at `expected`. The
/// applier's batched session runs it first in a batch sent while the one
/// before is still being applied, with the end LSN of that one's last
/// transaction: when any of them did not commit, the error makes the
/// server skip the whole batch up to its Sync.
///
/// # Safety
/// Called by PostgreSQL's function manager with one argument.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn apply_check_progress(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the function manager passes a valid call with one argument,
    // not NULL (STRICT); a pg_lsn is passed by value.
    let expected = unsafe { (*fcinfo).args.as_slice(1)[0].value.value() as u64 };
    require_superuser("bdr.apply_check_progress");
    // SAFETY: backend globals of this session's replication origin.
    let at = unsafe {
        if pg_sys::replorigin_session_origin == pg_sys::InvalidRepOriginId as u16 {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "bdr.apply_check_progress: no replication origin is configured in this session"
                    .into(),
                None,
            );
        }
        pg_sys::replorigin_session_get_progress(false)
    };
    if at != expected {
        let lsn = |l: u64| format!("{:X}/{:X}", l >> 32, l as u32);
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "the replication origin of this session is at {}, not at {}",
                lsn(at),
                lsn(expected)
            ),
            None,
        );
    }
    pg_sys::Datum::from(0usize)
}

/// `pg_finfo` record of [`apply_wait`].
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_apply_wait() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `bdr.apply_wait(origin oid, end_lsn pg_lsn) RETURNS void` (STRICT):
/// waits as a transaction of `bdr.apply_transactions` waits for the one
/// before it ([`wait_for`]), for a transaction that the applier sends as
/// statements.
///
/// # Safety
/// Called by PostgreSQL's function manager with two arguments.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn apply_wait(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the function manager passes a valid call with two
    // arguments, not NULL (STRICT); oid and pg_lsn are passed by value.
    let after = unsafe {
        let args = (*fcinfo).args.as_slice(2);
        bdr_protocol::apply::After {
            origin: args[0].value.value() as u32,
            end_lsn: args[1].value.value() as u64,
        }
    };
    require_superuser("bdr.apply_wait");
    // SAFETY: in a backend, in a transaction (a SQL function call).
    unsafe { wait_for(&after, &mut None) };
    pg_sys::Datum::from(0usize)
}

/// `pg_finfo` record of [`apply_transactions`].
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_apply_transactions() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `PROCEDURE bdr.apply_transactions(transactions bytea)`: applies and
/// commits remote transactions one after the other, each as
/// [`apply_changes`] with its end LSN and commit time, in one CALL: no
/// statement per transaction at all. A failure stops at the failed
/// transaction, rolled back; those before it stay committed, and the
/// replication origin's progress tells how far that is.
///
/// For sessions that apply one peer's transactions side by side, each
/// with a replication origin of its own: a transaction may name an
/// earlier one, applied by another session, to wait for before it
/// applies anything ([`wait_for`]): one it depends on (the commit of an
/// ordered one wakes such a wait). It holds no lock while it waits; each
/// session commits its own transactions in the peer's order.
/// Rows written through the other sessions' origins are the peer's as
/// much as rows of the transaction's own origin ([`find`]).
///
/// The tables stay open and locked from one transaction to the next
/// ([`Executor`]), until the call ends or a transaction sleeps for
/// another session's.
///
/// # Safety
/// Called by PostgreSQL's function manager with one argument, through
/// CALL.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn apply_transactions(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the function manager passes a valid call with one argument.
    let (arg, context) = unsafe { ((*fcinfo).args.as_slice(1)[0], (*fcinfo).context) };
    require_superuser("bdr.apply_transactions");
    // SAFETY: a CALL passes a CallContext node; anything else is not one.
    let nonatomic = unsafe {
        !context.is_null()
            && (*context).type_ == pg_sys::NodeTag::T_CallContext
            && !(*context.cast::<pg_sys::CallContext>()).atomic
    };
    if !nonatomic {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_TERMINATION,
            "bdr.apply_transactions commits: CALL it outside a transaction block".into(),
            None,
        );
    }
    // A copy that outlives the commits.
    // SAFETY: a bytea argument.
    let bytes: Vec<u8> =
        unsafe { bytea_arg(&arg, "bdr.apply_transactions: the transactions") }.to_vec();
    let txns = match read_transactions(&bytes) {
        Ok(t) => t,
        Err(e) => bad_input(format!("bdr.apply_transactions: {e}")),
    };
    if txns.is_empty() {
        return pg_sys::Datum::from(0usize);
    }
    // SAFETY: backend globals and SPI, in the CALL's non-atomic context:
    // SPI_commit ends the transaction and starts the next one, the
    // procedure's own memory context surviving.
    unsafe {
        if pg_sys::SPI_connect_ext(pg_sys::SPI_OPT_NONATOMIC as i32)
            != pg_sys::SPI_OK_CONNECT as i32
        {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "bdr.apply_transactions: SPI_connect failed".into(),
                None,
            );
        }
        let call_cxt = pg_sys::CurrentMemoryContext;
        let txn_cxt = new_context(call_cxt, c"bdr apply transaction");
        // Relation locks left by a call that failed, and released when
        // this one fails (the error unwinds through the guard, after the
        // executor's references are given back).
        release_session_relations();
        let _release = CallLocksGuard;
        let mut exec: Option<Executor> = None;
        let session = pg_sys::replorigin_session_origin;
        for t in &txns {
            let outer = switch_to(txn_cxt);
            // Before its first change, holding no lock of its own.
            if let Some(after) = &t.after {
                wait_for(after, &mut exec);
            }
            raw::guarded(|| raw::PushActiveSnapshot(raw::GetTransactionSnapshot()));
            apply(&mut exec, call_cxt, true, t.changes, t.origin);
            record_commit("bdr.apply_transactions", t.end_lsn, t.commit_time);
            raw::guarded(|| {
                raw::PopActiveSnapshot();
                switch_to(outer);
                raw::SPI_commit();
            });
            if t.ordered {
                crate::waits::committed(session, t.end_lsn);
            }
            raw::guarded(|| raw::MemoryContextReset(txn_cxt));
        }
        if let Some(e) = exec.take() {
            e.close();
        }
        pg_sys::SPI_finish();
    }
    pg_sys::Datum::from(0usize)
}

/// How many times [`spin_for`] looks at the other session's progress
/// before it sleeps, with [`SPIN_PAUSES`] spin-loop pauses in between
/// (some 200 microseconds in all on the benchmark machine).
const SPIN_LOOKS: usize = 200;
const SPIN_PAUSES: usize = 64;

/// Releases the session's relation locks when a call of
/// `bdr.apply_transactions` ends, by an error too.
struct CallLocksGuard;

impl Drop for CallLocksGuard {
    fn drop(&mut self) {
        // SAFETY: in the backend that took them.
        unsafe { release_session_relations() };
    }
}

thread_local! {
    /// The tables and indexes the session holds `RowExclusiveLock` on
    /// across the call's commits.
    static SESSION_RELATIONS: RefCell<Vec<pg_sys::LockRelId>> = const { RefCell::new(Vec::new()) };
}

/// Keeps the table `rri` opened, and the indexes opened with it, locked
/// for the session (`RowExclusiveLock`, what each transaction takes) until
/// the call of `bdr.apply_transactions` ends or [`wait_for`] sleeps. Each
/// later transaction of the call still opens and locks them, but finds
/// the lock held: no shared lock table work to take it, none to give it
/// back at its commit. DDL on those tables waits for the call's end
/// instead of the next commit.
///
/// # Safety
/// Must run in a backend, in a transaction; `rri` initialised for an
/// open table, its indexes opened.
unsafe fn hold_for_session(rri: *mut pg_sys::ResultRelInfo) {
    // SAFETY: per the contract; the arrays have the lengths the server
    // gives them.
    unsafe {
        let table = (*(*rri).ri_RelationDesc).rd_lockInfo.lockRelId;
        let held = SESSION_RELATIONS.with_borrow(|h| {
            h.iter()
                .any(|r| r.relId == table.relId && r.dbId == table.dbId)
        });
        if held {
            return;
        }
        let n = usize::try_from((*rri).ri_NumIndices).unwrap_or(0);
        let indexes = if n == 0 || (*rri).ri_IndexRelationDescs.is_null() {
            &[][..]
        } else {
            std::slice::from_raw_parts((*rri).ri_IndexRelationDescs, n)
        };
        let ids = std::iter::once(table).chain(indexes.iter().map(|&i| (*i).rd_lockInfo.lockRelId));
        for mut id in ids {
            pg_sys::LockRelationIdForSession(&mut id, pg_sys::RowExclusiveLock as i32);
            SESSION_RELATIONS.with_borrow_mut(|h| h.push(id));
        }
    }
}

/// Gives back the relation locks [`hold_for_session`] took.
///
/// # Safety
/// Must run in a backend.
unsafe fn release_session_relations() {
    for mut id in SESSION_RELATIONS.take() {
        // SAFETY: per the contract; the session holds it.
        unsafe { pg_sys::UnlockRelationIdForSession(&mut id, pg_sys::RowExclusiveLock as i32) };
    }
}

/// Waits until the transaction `after` names has committed: until its
/// session's replication origin is at its end LSN ([`spin_for`], then
/// [`sleep_for`]). Before it sleeps, it closes the call's executor `exec`
/// and gives back the tables this session holds ([`hold_for_session`]).
///
/// # Safety
/// Must run in a backend, inside a transaction that applied nothing yet.
unsafe fn wait_for(after: &bdr_protocol::apply::After, exec: &mut Option<Executor>) {
    // SAFETY: per the contract.
    unsafe {
        if !spin_for(after) {
            if let Some(e) = exec.take() {
                e.close();
            }
            release_session_relations();
            sleep_for(after);
        }
    }
}

/// The replication origin of the session a transaction waits for.
fn waited_origin(after: &bdr_protocol::apply::After) -> pg_sys::RepOriginId {
    let Ok(origin) = pg_sys::RepOriginId::try_from(after.origin) else {
        bad_input(format!(
            "bdr.apply_transactions: replication origin {} waited for does not exist",
            after.origin
        ));
    };
    // SAFETY: a backend global.
    if origin == unsafe { pg_sys::replorigin_session_origin } {
        bad_input(format!(
            "bdr.apply_transactions: a transaction waits for one of its own session (origin {origin})"
        ));
    }
    origin
}

/// Whether the transaction `after` names has committed, looking at its
/// session's replication origin for a short while ([`SPIN_LOOKS`]): the other
/// session is most often about to commit it, and waking a sleeping
/// process costs both more than that.
///
/// # Safety
/// Must run in a backend.
unsafe fn spin_for(after: &bdr_protocol::apply::After) -> bool {
    let origin = waited_origin(after);
    for _ in 0..SPIN_LOOKS {
        // SAFETY: per the contract.
        if unsafe { pg_sys::replorigin_get_progress(origin, false) } >= after.end_lsn {
            return true;
        }
        for _ in 0..SPIN_PAUSES {
            std::hint::spin_loop();
        }
    }
    false
}

/// Sleeps until the transaction `after` names has committed: on the
/// condition variable of its session's origin ([`crate::waits`]), which
/// that session broadcasts on when an ordered transaction commits at or
/// past the position a sleeper wants, looking at the origin again every
/// millisecond in any case (a transaction committed as statements wakes
/// nobody). The caller gives back the tables it holds first: that
/// transaction may need one of them (a TRUNCATE sent as a statement), and
/// this wait is not one the deadlock detector sees. A transaction that never commits (it failed,
/// its session is gone) is waited for until the call is cancelled.
///
/// # Safety
/// Must run in a backend, inside a transaction.
unsafe fn sleep_for(after: &bdr_protocol::apply::After) {
    let origin = waited_origin(after);
    let slot = crate::waits::slot(origin);
    let cv = slot.map_or(std::ptr::null_mut(), crate::waits::Slot::variable);
    // SAFETY: per the contract; an error while asleep (a cancel) ends the
    // sleep with the transaction (AbortTransaction cancels it).
    unsafe {
        if !cv.is_null() {
            pg_sys::ConditionVariablePrepareToSleep(cv);
        }
        loop {
            // Before each look: a commit that resets it wakes this one.
            if let Some(slot) = slot {
                slot.want(after.end_lsn);
            }
            if pg_sys::replorigin_get_progress(origin, false) >= after.end_lsn {
                break;
            }
            if cv.is_null() {
                pg_sys::WaitLatch(
                    pg_sys::MyLatch,
                    (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                        as i32,
                    1,
                    pg_sys::PG_WAIT_EXTENSION,
                );
                pg_sys::ResetLatch(pg_sys::MyLatch);
                pgrx::check_for_interrupts!();
            } else {
                pg_sys::ConditionVariableTimedSleep(cv, 1, pg_sys::PG_WAIT_EXTENSION);
            }
        }
        if !cv.is_null() {
            pg_sys::ConditionVariableCancelSleep();
        }
    }
}

/// The executor state changes are applied in: a range table entry and a
/// result relation per table, each opened when its first change comes
/// (the set-up of execReplication.c's callers), AFTER triggers queued for
/// each transaction.
///
/// `bdr.apply_transactions` keeps one for the whole call ("kept"): its
/// tables stay open from one transaction to the next (and locked for the
/// session, [`hold_for_session`]), so that a transaction of a table
/// already open only writes. Their relation cache references and the
/// pins of their slots' row types belong to a resource owner of the
/// executor's own, not the transaction's, which would give them back at
/// its commit; the lock each transaction's opens took is the
/// transaction's, given back at its commit as usual (the session's lock
/// stays). The executor's memory is the call's. Anything PostgreSQL opens
/// or pins on its own while it applies (an index scan, a buffer, a
/// snapshot, the buffer of a row left in a slot) stays the
/// transaction's, and every slot is emptied before the commit; the slots
/// the trigger code makes for a table with triggers are made when the
/// table opens, so that they are the executor's too.
struct Executor {
    estate: *mut pg_sys::EState,
    epq: Box<pg_sys::EPQState>,
    /// Memory of one change.
    row_cxt: pg_sys::MemoryContext,
    /// The open tables by stream relation id; the i-th is range table
    /// entry i + 1.
    targets: Vec<(RelId, Target)>,
    /// A kept executor's resource owner; null for one of a single
    /// transaction, whose tables are the transaction's.
    owner: pg_sys::ResourceOwner,
}

impl Executor {
    /// A new executor state in memory context `parent`, kept across
    /// transactions or not.
    ///
    /// # Safety
    /// Must run in a backend, in a transaction; `parent` outlives the
    /// executor.
    unsafe fn new(parent: pg_sys::MemoryContext, kept: bool) -> Self {
        // SAFETY: per the contract; EvalPlanQualInit fills in the zeroed
        // state; nothing in the guarded closure panics or owns anything.
        unsafe {
            let mut epq: Box<pg_sys::EPQState> = Box::new(std::mem::zeroed());
            let epq_state: *mut pg_sys::EPQState = &mut *epq;
            let owner = if kept {
                pg_sys::ResourceOwnerCreate(std::ptr::null_mut(), c"bdr apply".as_ptr())
            } else {
                std::ptr::null_mut()
            };
            let (estate, row_cxt) = raw::guarded(|| {
                let outer = switch_to(parent);
                let estate = raw::CreateExecutorState();
                switch_to((*estate).es_query_cxt);
                raw::ExecInitRangeTable(estate, std::ptr::null_mut());
                init_epq(epq_state, estate);
                switch_to(outer);
                (estate, (*estate).es_query_cxt)
            });
            let row_cxt = new_context(row_cxt, c"bdr apply change");
            Executor {
                estate,
                epq,
                row_cxt,
                targets: Vec::new(),
                owner,
            }
        }
    }

    fn kept(&self) -> bool {
        !self.owner.is_null()
    }

    /// The position in `targets` of the table of relation `desc`, opened
    /// if it is not yet.
    ///
    /// # Safety
    /// Must run in a backend, in a transaction.
    unsafe fn open(&mut self, desc: &LocalRelation) -> usize {
        if let Some(i) = self.targets.iter().position(|(id, _)| *id == desc.rel_id) {
            return i;
        }
        let (estate, epq_state, owner) = (self.estate, &raw mut *self.epq, self.owner);
        let kept = self.kept();
        let rti = self.targets.len() + 1;
        // SAFETY: per the contract; nothing in the guarded closures
        // panics or owns anything.
        unsafe {
            let saved = raw::guarded(|| {
                // EvalPlanQual keeps a slot per range table entry: made
                // again for one entry more (idle between changes).
                raw::EvalPlanQualEnd(epq_state);
                let outer = switch_to((*estate).es_query_cxt);
                let rte = raw::make_node::<pg_sys::RangeTblEntry>(pg_sys::NodeTag::T_RangeTblEntry);
                (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
                (*rte).relid = pg_sys::Oid::from(desc.table);
                (*rte).relkind = pg_sys::RELKIND_RELATION as c_char;
                (*rte).rellockmode = pg_sys::AccessShareLock as i32;
                (*estate).es_range_table = raw::lappend((*estate).es_range_table, rte.cast());
                (*estate).es_relations = raw::repalloc(
                    (*estate).es_relations.cast(),
                    rti * std::mem::size_of::<pg_sys::Relation>(),
                )
                .cast();
                *(*estate).es_relations.add(rti - 1) = std::ptr::null_mut();
                (*estate).es_range_table_size = rti as pg_sys::Index;
                init_epq(epq_state, estate);
                (outer, kept.then(|| switch_owner(owner)))
            });
            let target = open_target(estate, desc, rti, kept);
            let (outer, saved_owner) = saved;
            switch_to(outer);
            if let Some(o) = saved_owner {
                pg_sys::CurrentResourceOwner = o;
            }
            self.targets.push((desc.rel_id, target));
        }
        self.targets.len() - 1
    }

    /// Ends a transaction's use: its held rows written, its AFTER
    /// triggers fired, every slot emptied (the trigger code leaves rows,
    /// and their buffer pins, which are the transaction's, in its slots),
    /// its EvalPlanQual state given back.
    ///
    /// # Safety
    /// Must run in the transaction the changes were applied in.
    unsafe fn end_transaction(&mut self) {
        let (estate, epq_state, row_cxt) = (self.estate, &raw mut *self.epq, self.row_cxt);
        // SAFETY: per the contract.
        unsafe {
            let outer = switch_to((*estate).es_query_cxt);
            for (_, t) in &mut self.targets {
                flush(t, estate, row_cxt);
            }
            raw::guarded(|| {
                raw::AfterTriggerEndQuery(estate);
                let slots = (*estate).es_tupleTable;
                let n = if slots.is_null() { 0 } else { (*slots).length };
                for i in 0..n {
                    raw::ExecClearTuple(raw::list_nth(slots, i).cast());
                }
                raw::EvalPlanQualEnd(epq_state);
                switch_to(outer);
            });
        }
    }

    /// Closes the tables and frees the state, in a transaction that
    /// applied nothing since [`Executor::end_transaction`], or in the one
    /// transaction of an executor not kept.
    ///
    /// # Safety
    /// Must run in a transaction of the backend that made it.
    unsafe fn close(mut self) {
        let (estate, epq_state, owner) = (self.estate, &raw mut *self.epq, self.owner);
        let kept = self.kept();
        let targets = std::mem::take(&mut self.targets);
        // SAFETY: per the contract; nothing below panics or owns anything.
        unsafe {
            raw::guarded(|| {
                raw::EvalPlanQualEnd(epq_state);
                let saved = kept.then(|| switch_owner(owner));
                for (_, t) in &targets {
                    if kept {
                        // The locks of ExecOpenIndices went with the
                        // transaction that opened them.
                        let n = usize::try_from((*t.rri).ri_NumIndices).unwrap_or(0);
                        for i in 0..n {
                            raw::index_close(
                                *(*t.rri).ri_IndexRelationDescs.add(i),
                                pg_sys::NoLock as i32,
                            );
                        }
                    } else {
                        raw::ExecCloseIndices(t.rri);
                    }
                    raw::table_close(t.rel, pg_sys::NoLock as i32);
                }
                raw::ExecResetTupleTable((*estate).es_tupleTable, false);
                raw::FreeExecutorState(estate);
                if let Some(o) = saved {
                    pg_sys::CurrentResourceOwner = o;
                }
            });
        }
        drop(targets);
        // SAFETY: per the contract; nothing is left to the owner.
        unsafe { self.release_owner() };
    }

    /// Gives back what the executor's resource owner still has, and the
    /// owner.
    ///
    /// # Safety
    /// Must run in a backend.
    unsafe fn release_owner(&mut self) {
        let owner = std::mem::replace(&mut self.owner, std::ptr::null_mut());
        if owner.is_null() {
            return;
        }
        // SAFETY: per the contract; the owner is the executor's.
        unsafe {
            if pg_sys::CurrentResourceOwner == owner {
                pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
            }
            for phase in [
                pg_sys::ResourceReleasePhase::RESOURCE_RELEASE_BEFORE_LOCKS,
                pg_sys::ResourceReleasePhase::RESOURCE_RELEASE_LOCKS,
                pg_sys::ResourceReleasePhase::RESOURCE_RELEASE_AFTER_LOCKS,
            ] {
                pg_sys::ResourceOwnerRelease(owner, phase, false, false);
            }
            pg_sys::ResourceOwnerDelete(owner);
        }
    }
}

/// Sets up `epq` for `estate`'s range table, as execReplication.c's
/// callers do: no plan, no row marks.
///
/// # Safety
/// Inside [`raw::guarded`]; `estate` valid, current memory context its
/// query context.
#[inline]
unsafe fn init_epq(epq: *mut pg_sys::EPQState, estate: *mut pg_sys::EState) {
    // SAFETY: per the contract.
    unsafe {
        raw::EvalPlanQualInit(epq, estate, std::ptr::null_mut(), std::ptr::null_mut(), -1);
    }
}

/// Makes `owner` the current resource owner; the one before.
///
/// # Safety
/// Must run in a backend.
#[inline]
unsafe fn switch_owner(owner: pg_sys::ResourceOwner) -> pg_sys::ResourceOwner {
    // SAFETY: a backend global.
    unsafe {
        let before = pg_sys::CurrentResourceOwner;
        pg_sys::CurrentResourceOwner = owner;
        before
    }
}

impl Drop for Executor {
    /// A kept executor left by an error: the references and pins its
    /// owner has are given back (its memory goes with the call's).
    fn drop(&mut self) {
        // SAFETY: in the backend that made it.
        unsafe { self.release_owner() };
    }
}

/// Applies the changes of `bytes` in executor `exec` (made in `parent`,
/// kept across transactions or not, when there is none; made again when
/// a relation it has open is described differently); how many.
///
/// # Safety
/// Must run in a backend, inside a transaction; `parent` outlives the
/// executor.
unsafe fn apply(
    exec: &mut Option<Executor>,
    parent: pg_sys::MemoryContext,
    kept: bool,
    bytes: &[u8],
    origin: Option<u32>,
) -> i64 {
    let (relations, start, messages) = match read_changes(bytes) {
        Ok(parts) => parts,
        Err(e) => bad_input(format!("bdr.apply_changes: {e}")),
    };
    let mut described = DESCRIBED.take();
    // SAFETY: the cache context is created once, under TopMemoryContext.
    let cache_cxt = unsafe { cache_context() };
    if described.is_empty() {
        // Lookups left behind by a failed call.
        // SAFETY: nothing refers to the context's memory any more.
        unsafe { pg_sys::MemoryContextReset(cache_cxt) };
    }
    let mut redescribed = false;
    for r in &relations {
        if described.get(&r.rel_id).is_none_or(|d| d.desc != *r) {
            let io = r
                .columns
                .iter()
                .map(|_| ColumnIo {
                    receive: None,
                    input: None,
                })
                .collect();
            described.insert(
                r.rel_id,
                Described {
                    desc: r.clone(),
                    io,
                },
            );
            redescribed |= exec
                .as_ref()
                .is_some_and(|e| e.targets.iter().any(|(id, _)| *id == r.rel_id));
        }
    }
    // SAFETY: per the contract.
    unsafe {
        if redescribed && let Some(e) = exec.take() {
            // Opened for the description before.
            e.close();
        }
        let exec = exec.get_or_insert_with(|| Executor::new(parent, kept));
        let (estate, row_cxt) = (exec.estate, exec.row_cxt);
        let epq_state: *mut pg_sys::EPQState = &mut *exec.epq;
        let query_cxt = (*estate).es_query_cxt;
        let outer = raw::guarded(|| {
            raw::AfterTriggerBeginQuery();
            switch_to(query_cxt)
        });
        let mut applied = 0i64;
        let mut messages = messages;
        let mut n = 0usize;
        loop {
            let at = messages.offset();
            let Some(msg) = messages.next() else {
                break;
            };
            let size = messages.offset() - at;
            let msg = match msg {
                Ok(m) => m,
                Err(e) => bad_input(format!(
                    "bdr.apply_changes: change {n} (messages start at byte {start}): {e}"
                )),
            };
            let rel_id = match &msg {
                Message::Insert(m) => m.rel_id,
                Message::Update(m) => m.rel_id,
                Message::Delete(m) => m.rel_id,
                other => bad_input(format!(
                    "bdr.apply_changes: change {n} is a {:?} message, not a row change",
                    char::from(other.tag())
                )),
            };
            if !relations.iter().any(|r| r.rel_id == rel_id) {
                bad_input(format!(
                    "bdr.apply_changes: change {n} refers to relation id {rel_id}, which the changes do not describe"
                ));
            }
            let entry = described.get_mut(&rel_id).expect("described above");
            let i = exec.open(&entry.desc);
            let holds = matches!(msg, Message::Insert(_)) && exec.targets[i].1.held.is_some();
            if !holds {
                // Held rows go in before anything that could see them:
                // an UPDATE or DELETE, or a row a trigger sees go in.
                for (_, t) in &mut exec.targets {
                    flush(t, estate, row_cxt);
                }
            }
            let target = &mut exec.targets[i].1;
            // Whether the rows held for the table should go in now.
            let mut full = false;
            switch_to(row_cxt);
            match &msg {
                Message::Insert(m) => {
                    fill(target.new, target.natts, entry, &m.new, cache_cxt, false);
                    if holds {
                        full = hold(target, estate, size);
                    } else {
                        let (rri, new) = (target.rri, target.new);
                        raw::guarded(|| {
                            (*estate).es_output_cid = raw::GetCurrentCommandId(true);
                            raw::ExecSimpleRelationInsert(rri, estate, new);
                        });
                    }
                }
                Message::Update(m) => {
                    let key = m.old.as_ref().map_or(&m.new, |o| &o.tuple);
                    let lock = before_row_triggers(target.rri, false);
                    find(target, entry, key, origin, cache_cxt, lock, "UPDATE");
                    let (rri, rte, local, new) = (target.rri, target.rte, target.local, target.new);
                    let natts = target.natts;
                    let columns = &entry.desc.columns;
                    let updated = raw::guarded(|| {
                        raw::slot_getallattrs(local);
                        raw::ExecClearTuple(new);
                        std::ptr::copy_nonoverlapping(
                            (*local).tts_values,
                            (*new).tts_values,
                            natts,
                        );
                        std::ptr::copy_nonoverlapping(
                            (*local).tts_isnull,
                            (*new).tts_isnull,
                            natts,
                        );
                        let mut updated: *mut pg_sys::Bitmapset = std::ptr::null_mut();
                        for (c, v) in columns.iter().zip(&m.new) {
                            if !matches!(v, Value::UnchangedToast) {
                                updated = raw::bms_add_member(
                                    updated,
                                    i32::from(c.attnum)
                                        - pg_sys::FirstLowInvalidHeapAttributeNumber,
                                );
                            }
                        }
                        updated
                    });
                    set_values(new, entry, &m.new, cache_cxt, true);
                    raw::guarded(|| {
                        (*estate).es_output_cid = raw::GetCurrentCommandId(true);
                        raw::ExecStoreVirtualTuple(new);
                        // Per-column triggers and index hints see what is set.
                        (*rte).updatedCols = updated;
                        raw::ExecSimpleRelationUpdate(rri, estate, epq_state, local, new);
                        (*rte).updatedCols = std::ptr::null_mut();
                    });
                }
                Message::Delete(m) => {
                    let lock = before_row_triggers(target.rri, true);
                    let old = &m.old.tuple;
                    find(target, entry, old, origin, cache_cxt, lock, "DELETE");
                    let (rri, local) = (target.rri, target.local);
                    raw::guarded(|| {
                        (*estate).es_output_cid = raw::GetCurrentCommandId(true);
                        raw::ExecSimpleRelationDelete(rri, estate, epq_state, local);
                    });
                }
                _ => unreachable!("checked above"),
            }
            let insert = matches!(msg, Message::Insert(_));
            let (new, local) = (target.new, target.local);
            raw::guarded(|| {
                switch_to(query_cxt);
                raw::ExecClearTuple(new);
                if !insert {
                    raw::ExecClearTuple(local);
                }
                raw::MemoryContextReset(row_cxt);
                if !holds {
                    reset_per_tuple(estate);
                    // The next change sees this one.
                    raw::CommandCounterIncrement();
                }
            });
            if holds && full {
                flush(target, estate, row_cxt);
            }
            applied += 1;
            n += 1;
        }
        switch_to(outer);
        exec.end_transaction();
        DESCRIBED.set(described);
        applied
    }
}

/// Frees what the executor allocated for the last row.
///
/// # Safety
/// `estate` must be the call's executor state; inside [`raw::guarded`].
unsafe fn reset_per_tuple(estate: *mut pg_sys::EState) {
    // SAFETY: per the contract.
    unsafe {
        if let Some(econtext) = (*estate).es_per_tuple_exprcontext.as_mut() {
            raw::MemoryContextReset(econtext.ecxt_per_tuple_memory);
        }
    }
}

/// Holds the INSERT in `target.new` for the table's next multi-row
/// insert, after the checks `ExecSimpleRelationInsert` makes before it
/// writes (no row trigger of the table fires and it has no stored
/// generated columns: see [`open_target`]); whether the held rows should
/// go in now. `size` is the change's size in the stream.
///
/// # Safety
/// As for [`apply`], with `target` open and holding rows.
unsafe fn hold(target: &mut Target, estate: *mut pg_sys::EState, size: usize) -> bool {
    let (rel, rri, new) = (target.rel, target.rri, target.new);
    let held = target.held.as_mut().expect("a table that holds rows");
    // A slot to copy the row into: the next one held, or a new one.
    let next = held.slots.get(held.rows).copied();
    let tupdesc: *mut pg_sys::TupleDesc = &mut held.tupdesc;
    // SAFETY: per the contract; nothing below panics or owns anything.
    let slot = unsafe {
        raw::guarded(|| {
            if !(*(*rel).rd_att).constr.is_null() {
                raw::ExecConstraints(rri, new, estate);
            }
            if (*(*rel).rd_rel).relispartition {
                raw::ExecPartitionCheck(rri, new, estate, true);
            }
            let slot = match next {
                Some(slot) => slot,
                None => {
                    // Slots live as long as the call's executor state.
                    let outer = switch_to((*estate).es_query_cxt);
                    if (*tupdesc).is_null() {
                        *tupdesc = raw::CreateTupleDescCopy((*rel).rd_att);
                    }
                    let slot = raw::ExecAllocTableSlot(
                        &mut (*estate).es_tupleTable,
                        *tupdesc,
                        raw::table_slot_callbacks(rel),
                    );
                    switch_to(outer);
                    slot
                }
            };
            // A copy in the slot's own memory: the row's values are freed
            // with the row.
            raw::ExecCopySlot(slot, new);
            slot
        })
    };
    if next.is_none() {
        held.slots.push(slot);
    }
    held.rows += 1;
    held.bytes += size;
    held.rows >= HELD_ROWS || held.bytes >= HELD_BYTES
}

/// Writes the rows `target` holds in one `table_multi_insert` (a single
/// row as a plain insert), then their index entries row by row, as
/// `ExecSimpleRelationInsert` would have; the next change sees them.
///
/// # Safety
/// As for [`apply`], with `target` open; the current memory context is
/// the call's query context and `row_cxt` holds nothing in use.
unsafe fn flush(target: &mut Target, estate: *mut pg_sys::EState, row_cxt: pg_sys::MemoryContext) {
    let Some(held) = target.held.as_mut().filter(|h| h.rows > 0) else {
        return;
    };
    let (rel, rri, rows) = (target.rel, target.rri, held.rows);
    // Never more rows than slots (`hold` adds a slot first).
    let slots = &mut held.slots[..rows];
    // SAFETY: per the contract; the held slots are filled; nothing below
    // panics or owns anything.
    unsafe {
        raw::guarded(|| {
            let cid = raw::GetCurrentCommandId(true);
            (*estate).es_output_cid = cid;
            let outer = switch_to(row_cxt);
            if let [slot] = slots {
                // The common single-row transaction: a plain insert record.
                raw::table_tuple_insert(rel, *slot, cid, 0, std::ptr::null_mut());
            } else {
                raw::table_multi_insert(
                    rel,
                    slots.as_mut_ptr(),
                    rows as i32,
                    cid,
                    0,
                    std::ptr::null_mut(),
                );
            }
            for &mut slot in slots.iter_mut() {
                if (*rri).ri_NumIndices > 0 {
                    let recheck = raw::ExecInsertIndexTuples(
                        rri,
                        slot,
                        estate,
                        false,
                        false,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    );
                    raw::list_free(recheck);
                }
                reset_per_tuple(estate);
                raw::ExecClearTuple(slot);
            }
            switch_to(outer);
            raw::MemoryContextReset(row_cxt);
            raw::CommandCounterIncrement();
        });
    }
    held.rows = 0;
    held.bytes = 0;
}

/// Raises an error about the argument.
fn bad_input(message: String) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION,
        message,
        None,
    )
}

/// The context that keeps the functions' lookups.
///
/// # Safety
/// Must run in a backend.
unsafe fn cache_context() -> pg_sys::MemoryContext {
    CACHE_CXT.with(|c| {
        if c.get().is_null() {
            // SAFETY: TopMemoryContext lives as long as the backend.
            c.set(unsafe { new_context(pg_sys::TopMemoryContext, c"bdr apply functions") });
        }
        c.get()
    })
}

/// Opens the table of `desc` (range table index `rti`) for the
/// executor, after checking that it still is what the description says;
/// for a `kept` executor, locked for the session too.
///
/// # Safety
/// `estate` must be the executor's state, with range table entry `rti`,
/// current memory context its query context, current resource owner the
/// executor's.
unsafe fn open_target(
    estate: *mut pg_sys::EState,
    desc: &LocalRelation,
    rti: usize,
    kept: bool,
) -> Target {
    // SAFETY: per the contract; every pointer comes from the server.
    unsafe {
        let rel = pg_sys::table_open(
            pg_sys::Oid::from(desc.table),
            pg_sys::RowExclusiveLock as i32,
        );
        let name = || {
            let p = pg_sys::get_rel_name(pg_sys::Oid::from(desc.table));
            if p.is_null() {
                desc.table.to_string()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let stale = |why: String| -> ! {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("bdr.apply_changes: table {}: {why}", name()),
                None,
            )
        };
        if (*(*rel).rd_rel).relkind as u8 != pg_sys::RELKIND_RELATION {
            stale("not a plain table".into());
        }
        let tupdesc = (*rel).rd_att;
        let natts = (*tupdesc).natts as usize;
        let attrs = (*tupdesc).attrs.as_slice(natts);
        let mut key_attnums = Vec::new();
        for c in &desc.columns {
            let a = usize::from(c.attnum);
            let Some(att) = attrs.get(a - 1) else {
                stale(format!("has no column {a}"));
            };
            if att.attisdropped || att.attgenerated != 0 || u32::from(att.atttypid) != c.type_oid {
                stale(format!("column {a} is not the one described"));
            }
            if c.key {
                key_attnums.push(c.attnum as i16);
            }
        }
        let rri = raw::guarded(|| {
            let rri = raw::make_node::<pg_sys::ResultRelInfo>(pg_sys::NodeTag::T_ResultRelInfo);
            raw::InitResultRelInfo(rri, rel, rti as pg_sys::Index, std::ptr::null_mut(), 0);
            raw::ExecOpenIndices(rri, false);
            rri
        });
        if kept {
            hold_for_session(rri);
        }
        // The index must be a unique one of this table whose key columns
        // all are replica identity columns: the changes carry those
        // values only. Without one, INSERTs only (see `find`).
        let finder = (desc.index != 0).then(|| {
            let index = desc.index;
            finder(rri, index, &key_attnums)
                .unwrap_or_else(|| stale(format!("index {index} does not find rows by the key")))
        });
        let (rte, local, new) = raw::guarded(|| {
            (*estate).es_opened_result_relations =
                raw::lappend((*estate).es_opened_result_relations, rri.cast());
            let rte = raw::list_nth((*estate).es_range_table, rti as i32 - 1).cast();
            let local = raw::table_slot_create(rel, &mut (*estate).es_tupleTable);
            let new =
                raw::ExecInitExtraTupleSlot(estate, tupdesc, &raw const pg_sys::TTSOpsVirtual);
            if !(*rri).ri_TrigDesc.is_null() {
                // The trigger code's slots, made now rather than by the
                // first change that needs them (see `Executor`).
                raw::ExecGetTriggerOldSlot(estate, rri);
                raw::ExecGetTriggerNewSlot(estate, rri);
            }
            (rte, local, new)
        });
        // INSERTs go in many rows at a time unless something must see
        // each row as it goes in: a row trigger that fires in this
        // session's replication role, or a stored generated column to
        // compute.
        let constr = (*tupdesc).constr;
        let generated = !constr.is_null() && (*constr).has_generated_stored;
        let held = (!insert_trigger_fires(rri) && !generated).then(|| Held {
            slots: Vec::new(),
            tupdesc: std::ptr::null_mut(),
            rows: 0,
            bytes: 0,
        });
        Target {
            rel,
            rri,
            rte,
            local,
            finder,
            new,
            natts,
            held,
        }
    }
}

/// Whether the table has BEFORE ROW triggers for DELETE (`delete`) or
/// UPDATE, enabled or not: the executor then fetches and locks the row
/// for them.
///
/// # Safety
/// `rri` must be initialised for an open table.
unsafe fn before_row_triggers(rri: *mut pg_sys::ResultRelInfo, delete: bool) -> bool {
    // SAFETY: per the contract.
    unsafe {
        let desc = (*rri).ri_TrigDesc;
        !desc.is_null()
            && if delete {
                (*desc).trig_delete_before_row
            } else {
                (*desc).trig_update_before_row
            }
    }
}

/// Whether a row trigger of the table fires for an INSERT in this
/// session's replication role, as `TriggerEnabled` decides before any
/// WHEN clause: with `session_replication_role = replica` (the applier's)
/// the triggers enabled ALWAYS or REPLICA, otherwise ALWAYS or ORIGIN.
/// Foreign keys' triggers are ORIGIN ones. A transition table counts as
/// firing.
///
/// # Safety
/// `rri` must be initialised for an open table.
unsafe fn insert_trigger_fires(rri: *mut pg_sys::ResultRelInfo) -> bool {
    // SAFETY: per the contract; the trigger array has numtriggers entries.
    unsafe {
        let desc = (*rri).ri_TrigDesc;
        if desc.is_null() {
            return false;
        }
        if (*desc).trig_insert_new_table {
            return true;
        }
        let replica = std::ptr::addr_of!(pg_sys::SessionReplicationRole).read()
            == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32;
        let n = usize::try_from((*desc).numtriggers).unwrap_or(0);
        if n == 0 || (*desc).triggers.is_null() {
            return false;
        }
        std::slice::from_raw_parts((*desc).triggers, n)
            .iter()
            .any(|t| {
                let kind = t.tgtype as u32;
                let row_insert =
                    kind & pg_sys::TRIGGER_TYPE_ROW != 0 && kind & pg_sys::TRIGGER_TYPE_INSERT != 0;
                row_insert
                    && match t.tgenabled as u8 {
                        pg_sys::TRIGGER_DISABLED => false,
                        pg_sys::TRIGGER_FIRES_ON_ORIGIN => !replica,
                        pg_sys::TRIGGER_FIRES_ON_REPLICA => replica,
                        _ => true,
                    }
            })
    }
}

/// The [`Finder`] of `index`, if it is one of the indexes `rri` opened
/// (so locked as for the table's writes) and a valid, immediate unique
/// index on key columns only.
///
/// # Safety
/// `rri` must be initialised for an open table, its indexes opened.
unsafe fn finder(
    rri: *mut pg_sys::ResultRelInfo,
    index: u32,
    key_attnums: &[i16],
) -> Option<Finder> {
    // SAFETY: per the contract; the arrays have the lengths the server
    // gives them.
    unsafe {
        let n = usize::try_from((*rri).ri_NumIndices).unwrap_or(0);
        if n == 0 || (*rri).ri_IndexRelationDescs.is_null() {
            return None;
        }
        let idx = *std::slice::from_raw_parts((*rri).ri_IndexRelationDescs, n)
            .iter()
            .find(|&&i| u32::from((*i).rd_id) == index)?;
        let form = &*(*idx).rd_index;
        let nkeys = form.indnkeyatts as usize;
        let attnums = form.indkey.values.as_slice(nkeys);
        let usable = form.indisunique
            && form.indisvalid
            && form.indimmediate
            && nkeys > 0
            && attnums.iter().all(|k| key_attnums.contains(k));
        if !usable {
            return None;
        }
        let mut keys = Vec::with_capacity(nkeys);
        for (i, &attnum) in attnums.iter().enumerate() {
            // As the index's own scans compare: the equality operator of
            // the column's operator family for the opclass's input type.
            let family = *(*idx).rd_opfamily.add(i);
            let input = *(*idx).rd_opcintype.add(i);
            keys.push(KeyColumn {
                attnum,
                equal: equality_function(family, input)?,
                collation: *(*idx).rd_indcollation.add(i),
            });
        }
        Some(Finder {
            index: idx,
            keys,
            scan_keys: vec![std::mem::zeroed(); nkeys],
        })
    }
}

/// The function of the btree equality operator of operator family
/// `family` for type `input`, `None` if it has none; answers kept per
/// backend, forgotten when `pg_amop` or `pg_operator` changes.
///
/// # Safety
/// Must run in a backend, in a transaction.
unsafe fn equality_function(
    family: pg_sys::Oid,
    input: pg_sys::Oid,
) -> Option<pg_sys::RegProcedure> {
    EQUALITY.with(|memo| {
        // SAFETY: per the contract.
        unsafe {
            memo.get_or_look_up(
                (family, input),
                &[
                    pg_sys::SysCacheIdentifier::AMOPSTRATEGY,
                    pg_sys::SysCacheIdentifier::OPEROID,
                ],
                Some(forget_equality_functions),
                || {
                    let op = pg_sys::get_opfamily_member(
                        family,
                        input,
                        input,
                        pg_sys::BTEqualStrategyNumber as i16,
                    );
                    (op != pg_sys::InvalidOid).then(|| pg_sys::get_opcode(op))
                },
            )
        }
    })
}

thread_local! {
    /// [`equality_function`]'s answers, by (family, input type).
    static EQUALITY: crate::pg::CatalogMemo<(pg_sys::Oid, pg_sys::Oid), Option<pg_sys::RegProcedure>> =
        const { crate::pg::CatalogMemo::new() };
}

/// A change to `pg_amop` or `pg_operator`: the kept answers may be stale.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget_equality_functions(
    _arg: pg_sys::Datum,
    _cache: std::ffi::c_int,
    _hash: u32,
) {
    EQUALITY.with(crate::pg::CatalogMemo::forget);
}

/// Finds the local row whose key columns hold the key values of `tuple`,
/// last written by `origin`, by another of the applier's origins for the
/// same peer (`bdr_<peer>_<n>`, parallel apply's), or by an unknown
/// writer; anything else is an ERROR (see the module documentation).
///
/// The search is `RelationFindReplTupleByIndex`'s (a dirty snapshot,
/// waiting for a transaction that is writing the row and looking again)
/// without its row lock: the UPDATE or DELETE that follows waits for a
/// writer that came in between and fails if that one committed, and the
/// applier applies the transaction again through its statements. The
/// lock would cost every change a WAL record and a tuple header write.
/// With `lock` the row is locked as that function locks it: a table's
/// BEFORE ROW triggers lock the row again, and a row changed in between
/// would send them to an EvalPlanQual recheck, which needs a plan this
/// call does not have.
///
/// # Safety
/// As for [`apply`], with `target` open.
unsafe fn find(
    target: &mut Target,
    entry: &mut Described,
    tuple: &[Value<'_>],
    origin: Option<u32>,
    cache_cxt: pg_sys::MemoryContext,
    lock: bool,
    what: &str,
) {
    // SAFETY: per the contract.
    unsafe {
        check_width(entry, tuple);
        let (rel, natts) = (target.rel, target.natts);
        let Some(finder) = target.finder.as_mut() else {
            bad_input(format!(
                "bdr.apply_changes: {what} of table {}, described without an index to find rows by",
                (*rel).rd_id
            ));
        };
        let Described { desc, io } = entry;
        for (i, (c, v)) in desc.columns.iter().zip(tuple).enumerate() {
            if !c.key {
                continue;
            }
            if matches!(v, Value::Null | Value::UnchangedToast) {
                raise(
                    NO_ROW,
                    format!(
                        "bdr.apply_changes: {what} of table {} has no value for key column {}",
                        (*rel).rd_id,
                        c.attnum
                    ),
                    None,
                );
            }
            let at = c.attnum as i16;
            // Made once, for the index columns that hold it.
            let mut datum = None;
            for (k, key) in finder.keys.iter().enumerate() {
                if key.attnum != at {
                    continue;
                }
                let d = *datum.get_or_insert_with(|| {
                    let typmod = typmod(rel, natts, c.attnum);
                    to_datum(&mut io[i], c.type_oid, typmod, v, cache_cxt).0
                });
                pg_sys::ScanKeyInit(
                    &mut finder.scan_keys[k],
                    (k + 1) as pg_sys::AttrNumber,
                    pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                    key.equal,
                    d,
                );
                finder.scan_keys[k].sk_collation = key.collation;
            }
        }
        let nkeys = finder.keys.len() as i32;
        let (index, keys, local) = (finder.index, finder.scan_keys.as_mut_ptr(), target.local);
        let want_xmin = origin.is_some();
        // Whether a row was found, the result of a row lock that neither
        // succeeded nor met a concurrent change, the row's xmin (when
        // asked for and not NULL).
        let (found, failed, xmin) = raw::guarded(|| {
            let mut snapshot: pg_sys::SnapshotData = std::mem::zeroed();
            snapshot.snapshot_type = pg_sys::SnapshotType::SNAPSHOT_DIRTY;
            // The scan writes what it saw being written into the
            // snapshot: read it through the pointer the scan has.
            let dirty: pg_sys::Snapshot = &raw mut snapshot;
            let scan = raw::index_beginscan(rel, index, dirty, nkeys, 0);
            let mut failed = None;
            let found = loop {
                raw::index_rescan(scan, keys, nkeys, std::ptr::null_mut(), 0);
                // A unique index: one row at most is visible.
                if !raw::index_getnext_slot(
                    scan,
                    pg_sys::ScanDirection::ForwardScanDirection,
                    local,
                ) {
                    break false;
                }
                raw::ExecMaterializeSlot(local);
                // A transaction that is inserting or deleting the row:
                // wait for it to end and look again.
                let writer = if (*dirty).xmin.into_inner() != 0 {
                    (*dirty).xmin
                } else {
                    (*dirty).xmax
                };
                if writer.into_inner() != 0 {
                    raw::XactLockTableWait(
                        writer,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        pg_sys::XLTW_Oper::XLTW_None,
                    );
                    continue;
                }
                if !lock {
                    break true;
                }
                let mut failure: pg_sys::TM_FailureData = std::mem::zeroed();
                raw::PushActiveSnapshot(raw::GetLatestSnapshot());
                let locked = raw::table_tuple_lock(
                    rel,
                    &raw mut (*local).tts_tid,
                    raw::GetLatestSnapshot(),
                    local,
                    raw::GetCurrentCommandId(false),
                    pg_sys::LockTupleMode::LockTupleExclusive,
                    pg_sys::LockWaitPolicy::LockWaitBlock,
                    0,
                    &mut failure,
                );
                raw::PopActiveSnapshot();
                match locked {
                    pg_sys::TM_Result::TM_Ok => break true,
                    // Changed or deleted since it was found: look again.
                    pg_sys::TM_Result::TM_Updated | pg_sys::TM_Result::TM_Deleted => continue,
                    other => {
                        failed = Some(other);
                        break false;
                    }
                }
            };
            raw::index_endscan(scan);
            let mut xmin = None;
            if found && want_xmin {
                let mut null = false;
                let d =
                    raw::slot_getsysattr(local, pg_sys::MinTransactionIdAttributeNumber, &mut null);
                if !null {
                    xmin = Some(pg_sys::TransactionId::from_inner(d.value() as u32));
                }
            }
            (found, failed, xmin)
        });
        if let Some(other) = failed {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!(
                    "bdr.apply_changes: {what}: locking the row of table {} failed (table_tuple_lock result {other})",
                    (*rel).rd_id
                ),
                None,
            );
        }
        if !found {
            raise(
                NO_ROW,
                format!(
                    "bdr.apply_changes: {what}: no row of table {} has the key",
                    (*rel).rd_id
                ),
                None,
            );
        }
        let (Some(origin), Some(xid)) = (origin, xmin) else {
            return;
        };
        // The writer cache answers for most rows last written by a peer;
        // it is trusted only to let the change through (see writers.rs).
        if let Some(writer) = crate::writers::writer_of(xid)
            && (u32::from(writer) == origin || u32::from(crate::peer_origin(writer)) == origin)
        {
            return;
        }
        let mut ts: pg_sys::TimestampTz = 0;
        let mut writer: pg_sys::RepOriginId = 0;
        // The name of an origin not `origin` is looked up: it may be
        // another of the applier's for the same peer.
        if pg_sys::TransactionIdGetCommitTsData(xid, &mut ts, &mut writer)
            && u32::from(writer) != origin
            && u32::from(crate::peer_origin(writer)) != origin
        {
            raise(
                NO_ROW,
                format!(
                    "bdr.apply_changes: {what}: the row of table {} was last written by origin {writer}, not {origin}",
                    (*rel).rd_id,
                ),
                None,
            );
        }
    }
}

/// The declared type modifier of column `attnum` of `rel`, which has
/// `natts` columns.
///
/// # Safety
/// `rel` must be open and `attnum` within its columns.
unsafe fn typmod(rel: pg_sys::Relation, natts: usize, attnum: u16) -> i32 {
    // SAFETY: per the contract.
    unsafe {
        let tupdesc = (*rel).rd_att;
        (*tupdesc).attrs.as_slice(natts)[usize::from(attnum) - 1].atttypmod
    }
}

fn check_width(entry: &Described, tuple: &[Value<'_>]) {
    if tuple.len() != entry.desc.columns.len() {
        bad_input(format!(
            "bdr.apply_changes: a tuple of relation id {} has {} columns, its description {}",
            entry.desc.rel_id,
            tuple.len(),
            entry.desc.columns.len()
        ));
    }
}

/// Stores `tuple` in the empty virtual `slot` as a whole row: columns
/// the tuple does not carry are NULL.
///
/// # Safety
/// As for [`apply`]; `slot` has `natts` columns.
unsafe fn fill(
    slot: *mut pg_sys::TupleTableSlot,
    natts: usize,
    entry: &mut Described,
    tuple: &[Value<'_>],
    cache_cxt: pg_sys::MemoryContext,
    keep_unchanged: bool,
) {
    // SAFETY: per the contract.
    unsafe {
        pg_sys::ExecClearTuple(slot);
        for i in 0..natts {
            *(*slot).tts_isnull.add(i) = true;
        }
        set_values(slot, entry, tuple, cache_cxt, keep_unchanged);
        pg_sys::ExecStoreVirtualTuple(slot);
    }
}

/// Sets the columns of `slot` that `tuple` carries; an unchanged TOAST
/// value keeps the slot's value when `keep_unchanged`, else is an error.
///
/// # Safety
/// As for [`fill`].
unsafe fn set_values(
    slot: *mut pg_sys::TupleTableSlot,
    entry: &mut Described,
    tuple: &[Value<'_>],
    cache_cxt: pg_sys::MemoryContext,
    keep_unchanged: bool,
) {
    check_width(entry, tuple);
    // SAFETY: per the contract.
    unsafe {
        let tupdesc = (*slot).tts_tupleDescriptor;
        let natts = (*tupdesc).natts as usize;
        let attrs = (*tupdesc).attrs.as_slice(natts);
        let Described { desc, io } = entry;
        for (i, (c, v)) in desc.columns.iter().zip(tuple).enumerate() {
            let at = usize::from(c.attnum) - 1;
            if *v == Value::UnchangedToast {
                if keep_unchanged {
                    continue;
                }
                bad_input(format!(
                    "bdr.apply_changes: an INSERT into relation id {} leaves column {} unchanged",
                    desc.rel_id, c.attnum
                ));
            }
            let (d, null) = to_datum(&mut io[i], c.type_oid, attrs[at].atttypmod, v, cache_cxt);
            *(*slot).tts_values.add(at) = d;
            *(*slot).tts_isnull.add(at) = null;
        }
    }
}

/// The input or receive function of type `ty` as `lookup` names it
/// (`getTypeInputInfo`, `getTypeBinaryInputInfo`), looked up into
/// `cxt`, with its I/O parameter.
///
/// # Safety
/// Must run in a backend; `cxt` must outlive the lookup's use.
unsafe fn type_function(
    ty: pg_sys::Oid,
    lookup: unsafe fn(pg_sys::Oid, *mut pg_sys::Oid, *mut pg_sys::Oid),
    cxt: pg_sys::MemoryContext,
) -> (Box<pg_sys::FmgrInfo>, pg_sys::Oid) {
    // SAFETY: per the contract; a zeroed FmgrInfo is filled in by
    // fmgr_info_cxt.
    unsafe {
        let mut f: Box<pg_sys::FmgrInfo> = Box::new(std::mem::zeroed());
        let (mut func, mut ioparam) = (pg_sys::Oid::INVALID, pg_sys::Oid::INVALID);
        lookup(ty, &mut func, &mut ioparam);
        pg_sys::fmgr_info_cxt(func, &mut *f, cxt);
        (f, ioparam)
    }
}

/// A value as a datum of type `type_oid`: through the type's receive
/// function (binary values) or input function (text), as the server does
/// for a bound parameter; whether it is NULL. Common fixed-width binary
/// values (`bdr_protocol::by_value`), `text`/`varchar` without a length
/// limit and `char(n)` values of length n are made here directly, with
/// those functions' checks.
///
/// # Safety
/// Must run in a backend; the datum lives in the current memory context.
unsafe fn to_datum(
    io: &mut ColumnIo,
    type_oid: u32,
    typmod: i32,
    value: &Value<'_>,
    cache_cxt: pg_sys::MemoryContext,
) -> (pg_sys::Datum, bool) {
    let ty = pg_sys::Oid::from(type_oid);
    let mut text = |s: &str, spaces: usize| -> (pg_sys::Datum, bool) {
        if s.as_bytes().contains(&0) {
            raise(
                PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
                format!("bdr.apply_changes: a text value of type {type_oid} holds a NUL byte"),
                None,
            );
        }
        // SAFETY: per the contract.
        unsafe {
            if spaces == 0
                && (type_oid == TEXT_OID || (type_oid == VARCHAR_OID && typmod < 0))
                && crate::pg::database_is_utf8()
            {
                // What textin and varcharin (without a length) make of
                // it, without the copy to a C string.
                let t = pg_sys::cstring_to_text_with_len(s.as_ptr().cast(), s.len() as i32);
                return (pg_sys::Datum::from(t), false);
            }
            if type_oid == BPCHAR_OID && crate::pg::database_is_utf8() {
                // What bpcharin makes of a value that already has the
                // column's length in characters (as a value of the same
                // column type elsewhere has), or of any value for a column
                // without a length: the characters as they are.
                let chars = if s.is_ascii() {
                    s.len()
                } else {
                    s.chars().count()
                } + spaces;
                let length = usize::try_from(typmod - pg_sys::VARHDRSZ as i32).ok();
                if length.is_none_or(|n| n == chars) {
                    let len = s.len() + spaces;
                    let v = pg_sys::palloc(pg_sys::VARHDRSZ + len).cast::<pg_sys::varlena>();
                    pgrx::varlena::set_varsize_4b(v, (pg_sys::VARHDRSZ + len) as i32);
                    let data = v.cast::<u8>().add(pg_sys::VARHDRSZ);
                    std::ptr::copy_nonoverlapping(s.as_ptr(), data, s.len());
                    std::ptr::write_bytes(data.add(s.len()), b' ', spaces);
                    return (pg_sys::Datum::from(v), false);
                }
            }
            let (finfo, ioparam) = io
                .input
                .get_or_insert_with(|| type_function(ty, pg_sys::getTypeInputInfo, cache_cxt));
            let len = s.len() + spaces;
            let buf = pg_sys::palloc(len + 1).cast::<u8>();
            std::ptr::copy_nonoverlapping(s.as_ptr(), buf, s.len());
            std::ptr::write_bytes(buf.add(s.len()), b' ', spaces);
            *buf.add(len) = 0;
            let mut cstr = buf.cast::<c_char>();
            if !crate::pg::database_is_utf8() {
                cstr = pg_sys::pg_any_to_server(cstr, len as i32, pg_sys::pg_enc::PG_UTF8 as i32);
            }
            let d = pg_sys::InputFunctionCall(&mut **finfo, cstr, *ioparam, typmod);
            (d, false)
        }
    };
    match value {
        Value::Null => (pg_sys::Datum::from(0usize), true),
        Value::UnchangedToast => unreachable!("callers keep or refuse unchanged values"),
        Value::Text(s) => text(s, 0),
        Value::PaddedText { text: s, spaces } => text(s, *spaces as usize),
        Value::Int(v) => {
            let fits = match type_oid {
                INT2_OID => i16::try_from(*v).is_ok(),
                INT4_OID => i32::try_from(*v).is_ok(),
                INT8_OID => true,
                _ => false,
            };
            if !fits {
                bad_input(format!(
                    "bdr.apply_changes: integer {v} does not fit a column of type {type_oid}"
                ));
            }
            (pg_sys::Datum::from(*v), false)
        }
        Value::Binary(b) => {
            match by_value::datum(type_oid, typmod, b) {
                Some(Ok(d)) => return (pg_sys::Datum::from(d), false),
                Some(Err(e)) => raise(
                    match e {
                        ByValueError::Width { .. } => {
                            PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION
                        }
                        // 22008, which the server names datetime_value_out_of_range too.
                        _ => PgSqlErrorCode::ERRCODE_DATETIME_FIELD_OVERFLOW,
                    },
                    format!("bdr.apply_changes: {e}"),
                    None,
                ),
                None => {}
            }
            // SAFETY: per the contract.
            unsafe {
                let (finfo, ioparam) = io.receive.get_or_insert_with(|| {
                    type_function(ty, pg_sys::getTypeBinaryInputInfo, cache_cxt)
                });
                // Receive functions may expect a terminating NUL, as in a
                // Bind message.
                let data = pg_sys::palloc(b.len() + 1).cast::<u8>();
                std::ptr::copy_nonoverlapping(b.as_ptr(), data, b.len());
                *data.add(b.len()) = 0;
                let mut buf = pg_sys::StringInfoData {
                    data: data.cast(),
                    len: b.len() as i32,
                    maxlen: b.len() as i32 + 1,
                    cursor: 0,
                };
                let d = pg_sys::ReceiveFunctionCall(&mut **finfo, &mut buf, *ioparam, typmod);
                if buf.cursor != buf.len {
                    raise(
                        PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION,
                        format!(
                            "bdr.apply_changes: incorrect binary data format of a value of type {type_oid}"
                        ),
                        None,
                    );
                }
                (d, false)
            }
        }
    }
}
