//! Stream start-up: the client's options, the version negotiation, the
//! STARTUP reply's content, and the session settings text output depends
//! on.
//!
//! Options are parsed and checked by the protocol crate
//! (`StartupOptions::from_pairs`, `negotiate`); a refusal is an ERROR
//! naming the option, raised before anything is decoded, so a misspelt or
//! incompatible client fails at `START_REPLICATION` time.
//!
//! No options at all: a walsender (a replication connection, i.e. a real
//! client) is refused, because every client must say which protocol
//! versions it reads and who it is. A SQL-level call
//! (`pg_logical_slot_peek_binary_changes(slot, NULL, NULL)` by an operator)
//! gets inspection defaults: the newest protocol version, text and binary
//! datums, no forwarding, client node id 0.
//!
//! Text output of dates, intervals and floats depends on `DateStyle`,
//! `IntervalStyle` and `extra_float_digits` (and bytea on `bytea_output`),
//! which a session may set to anything; the receiver parses text with its
//! own settings. The stream pins them once at start-up, not per value
//! (setting a GUC parses its value and is far too slow per datum): for the
//! whole session in a walsender (which serves nothing but this stream),
//! and inside a GUC nest level that shutdown pops (and an error's
//! transaction abort undoes) in a SQL-level call, so the caller's session
//! keeps its own settings.

use std::ffi::CStr;

use bdr_protocol::{Negotiated, StartupError, StartupOptions, startup::OPTION_NAMES};
use pgrx::{PgList, PgSqlErrorCode, pg_sys};

use crate::pg;

/// The settings that text output depends on, and their pinned values.
const PINNED_SETTINGS: [(&CStr, &CStr); 4] = [
    (c"DateStyle", c"ISO"),
    (c"IntervalStyle", c"postgres"),
    (c"extra_float_digits", c"3"),
    (c"bytea_output", c"hex"),
];

/// What the client asked for, checked and negotiated.
#[derive(Debug)]
pub struct Agreed {
    pub options: StartupOptions,
    pub negotiated: Negotiated,
}

/// The server's `server_version_num`.
pub fn server_version_num() -> u32 {
    // SAFETY: a built-in GUC, always present.
    let value = unsafe { pg_sys::GetConfigOption(c"server_version_num".as_ptr(), false, false) };
    if value.is_null() {
        return pg_sys::PG_VERSION_NUM;
    }
    // SAFETY: GetConfigOption returns a NUL-terminated string.
    let text = unsafe { CStr::from_ptr(value) }.to_string_lossy();
    text.parse().unwrap_or(pg_sys::PG_VERSION_NUM)
}

/// Parses and negotiates the options of `ctx`, or raises an ERROR.
///
/// # Safety
/// `ctx` must be the live decoding context.
pub unsafe fn agree(ctx: &pg_sys::LogicalDecodingContext) -> Agreed {
    // SAFETY: per the contract, the options are a List of DefElem.
    let pairs = unsafe { option_pairs(ctx) };
    let server_version = server_version_num();
    // SAFETY: a backend global, set at process start.
    let walsender = unsafe { pg_sys::am_walsender };
    let options = if pairs.is_empty() && !walsender {
        StartupOptions::new(0, "sql", server_version)
    } else {
        StartupOptions::from_pairs(&pairs).unwrap_or_else(|err| refuse(&err))
    };
    let negotiated = options
        .negotiate(server_version)
        .unwrap_or_else(|err| refuse(&err));
    Agreed {
        options,
        negotiated,
    }
}

/// The options as (name, value) pairs.
unsafe fn option_pairs(ctx: &pg_sys::LogicalDecodingContext) -> Vec<(String, String)> {
    // SAFETY: per agree's contract.
    let list = unsafe { PgList::<pg_sys::DefElem>::from_pg(ctx.output_plugin_options) };
    let mut pairs = Vec::with_capacity(list.len());
    for elem in list.iter_ptr() {
        // SAFETY: each element is a DefElem; defGetString raises a clear
        // ERROR for an option given without a value.
        unsafe {
            let name = CStr::from_ptr((*elem).defname)
                .to_string_lossy()
                .into_owned();
            let value = CStr::from_ptr(pg_sys::defGetString(elem))
                .to_string_lossy()
                .into_owned();
            pairs.push((name, value));
        }
    }
    pairs
}

fn refuse(err: &StartupError) -> ! {
    let (code, hint) = match err {
        StartupError::UnknownOption { .. } => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Some(format!("Valid options are: {}.", OPTION_NAMES.join(", "))),
        ),
        StartupError::MissingOption { .. } => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Some("A replication client must pass every required option; see bdr_protocol::StartupOptions.".into()),
        ),
        StartupError::UnsupportedStartupVersion { .. } | StartupError::VersionMismatch { .. } => {
            (PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, None)
        }
        _ => (PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, None),
    };
    pg::raise(code, format!("bdr: {err}"), hint)
}

/// Pins the settings text output depends on. Returns the GUC nest level
/// to pop at shutdown (`None` in a walsender, where they stay for the
/// session).
pub fn pin_settings() -> Option<i32> {
    // SAFETY: a backend global, set at process start.
    let walsender = unsafe { pg_sys::am_walsender };
    let (level, action) = if walsender {
        (None, pg_sys::GucAction::GUC_ACTION_SET)
    } else {
        // SAFETY: inside the calling transaction; popped by unpin_settings
        // or by the transaction's abort.
        let level = unsafe { pg_sys::NewGUCNestLevel() };
        (Some(level), pg_sys::GucAction::GUC_ACTION_SAVE)
    };
    for (name, value) in PINNED_SETTINGS {
        // SAFETY: valid names and values of user-settable GUCs; any
        // failure is raised as an ERROR (elevel ERROR).
        unsafe {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                action,
                true,
                pgrx::PgLogLevel::ERROR as i32,
                false,
            );
        }
    }
    level
}

/// Restores the settings that [`pin_settings`] changed in a SQL-level call.
pub fn unpin_settings(level: Option<i32>) {
    if let Some(level) = level {
        // SAFETY: pops the nest level pin_settings pushed, restoring the
        // saved values (as a function's SET clause does, fmgr.c).
        unsafe { pg_sys::AtEOXact_GUC(true, level) };
    }
}

/// The database's encoding name (e.g. `UTF8`).
pub fn database_encoding() -> String {
    // SAFETY: returns a static string.
    unsafe { CStr::from_ptr(pg_sys::GetDatabaseEncodingName()) }
        .to_string_lossy()
        .into_owned()
}

/// This node's name in STARTUP: `cluster_name/database` when
/// `cluster_name` is set, else the database name. (The node catalog will
/// name nodes; until then this is what an operator recognises.)
///
/// A walsender runs the start-up callback outside any transaction, so the
/// catalog lookup of the database's name gets a short transaction of its
/// own there.
pub fn local_node_name() -> String {
    // SAFETY: catalog access inside a transaction, started here when the
    // caller has none (and committed before returning; it writes nothing).
    let db = unsafe {
        let own_transaction = !pg_sys::IsTransactionState();
        let cxt = pg_sys::CurrentMemoryContext;
        if own_transaction {
            pg_sys::StartTransactionCommand();
        }
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        let db = pg::cstr_to_string(name, pg::database_is_utf8());
        if own_transaction {
            pg_sys::CommitTransactionCommand();
            // Committing leaves TopMemoryContext current (xact.c).
            pg::switch_to(cxt);
        }
        db
    };
    // SAFETY: a built-in GUC.
    let cluster = unsafe { pg_sys::GetConfigOption(c"cluster_name".as_ptr(), true, false) };
    // SAFETY: NUL-terminated when not NULL.
    let cluster = unsafe { pg::cstr_to_string(cluster, true) };
    if cluster.is_empty() {
        db
    } else {
        format!("{cluster}/{db}")
    }
}
