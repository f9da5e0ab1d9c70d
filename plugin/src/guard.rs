//! `bdr.apply_require_row`: makes an UPDATE or DELETE that touched no row
//! an error, for the applier's batched apply.
//!
//! The applier sends many remote transactions, COMMITs included, before it
//! reads a single reply (see `applier/src/apply/batch.rs`). A change that
//! finds no row to update or delete is a conflict that must go through the
//! conflict path, and that must happen before the transaction commits. With
//! this setting on in the applier's session (it is off everywhere else), the
//! statement fails instead, so its transaction and everything sent after it
//! in the same batch never commit; the applier then applies them again one
//! statement at a time. Only statements sent by the client count (not those
//! run inside functions or triggers).

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// The setting; off unless a session turns it on.
pub static REQUIRE_ROW: GucSetting<bool> = GucSetting::<bool>::new(false);

/// The SQLSTATE of the error: no_data_found (P0002).
const NO_DATA_FOUND: PgSqlErrorCode = PgSqlErrorCode::ERRCODE_NO_DATA_FOUND;

static mut PREV_FINISH: pg_sys::ExecutorFinish_hook_type = None;

/// Registers the setting and the executor hook; called once per process.
pub fn init() {
    GucRegistry::define_bool_guc(
        c"bdr.apply_require_row",
        c"An UPDATE or DELETE sent by the client that touches no row is an error.",
        c"Set by bdr-applier in its own sessions; not meant for other sessions.",
        &REQUIRE_ROW,
        GucContext::Suset,
        GucFlags::default(),
    );
    // SAFETY: _PG_init runs once per process, before any query.
    unsafe {
        PREV_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_finish(query: *mut pg_sys::QueryDesc) {
    // SAFETY: the executor passes a live QueryDesc; the previous hook (or
    // the standard function) gets it unchanged.
    unsafe {
        match PREV_FINISH {
            Some(prev) => prev(query),
            None => pg_sys::standard_ExecutorFinish(query),
        }
    }
    if !REQUIRE_ROW.get() {
        return;
    }
    // SAFETY: as above; estate and dest are set from ExecutorStart on.
    let (operation, processed, dest) = unsafe {
        let q = &*query;
        (q.operation, (*q.estate).es_processed, (*q.dest).mydest)
    };
    // A statement of the client's: its results go to the client (simple
    // query protocol) or nowhere (an Execute message of an UPDATE or DELETE
    // without RETURNING, see PortalRunMulti); statements run by functions
    // and triggers go to SPI.
    let from_client = matches!(
        dest,
        pg_sys::CommandDest::DestRemote
            | pg_sys::CommandDest::DestRemoteExecute
            | pg_sys::CommandDest::DestNone
    );
    let change = matches!(
        operation,
        pg_sys::CmdType::CMD_UPDATE | pg_sys::CmdType::CMD_DELETE
    );
    if from_client && change && processed == 0 {
        crate::pg::raise(
            NO_DATA_FOUND,
            "bdr: the change touched no row (bdr.apply_require_row is on)".into(),
            None,
        );
    }
}
