//! The `bdr` extension: a logical decoding output plugin plus the
//! extension's SQL functions, in one shared library (`bdr.so`).
//!
//! The library is loaded through `shared_preload_libraries = 'bdr'` and is
//! named as the output plugin of every slot that serves a peer
//! (`pg_create_logical_replication_slot(name, 'bdr')`).
//!
//! ```text
//!  WAL -> reorderbuffer -> output.rs (callbacks) -> stream.rs (state)
//!                              relation.rs (RELATION, per-table cache)
//!                              datum.rs (column values)  -> protocol bytes
//! ```

use pgrx::prelude::*;

mod apply;
mod datum;
mod guard;
mod inspect;
mod node;
mod output;
mod pg;
mod raw;
mod relation;
mod startup;
mod stream;
mod waits;
mod writers;

pgrx::pg_module_magic!();

/// Library load: the settings and hooks of [`guard`] and [`writers`],
/// and, when the library is being preloaded, the shared memory hooks.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guard::init();
    writers::init();
    // SAFETY: _PG_init runs once per process, before any query; the hooks
    // are chained as PostgreSQL's own modules chain them.
    unsafe {
        if pg_sys::process_shared_preload_libraries_in_progress {
            PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(shmem_request);
            PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
            pg_sys::shmem_startup_hook = Some(shmem_startup);
        }
    }
}

static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// Asks for the shared memory of [`writers`] and [`waits`].
#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: called by the postmaster while it sizes shared memory.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(writers::shmem_bytes());
        pg_sys::RequestAddinShmemSpace(waits::shmem_bytes());
    }
}

/// Sets up the shared memory of [`writers`] and [`waits`].
#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: called once shared memory exists.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        writers::attach();
        waits::attach();
    }
}

/// The extension's version, as installed by `CREATE EXTENSION bdr`.
#[pg_extern]
fn bdr_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// This node's id (see `node.rs`) as a `bigint` with the same 64 bits.
#[pg_extern]
fn local_node_id() -> i64 {
    node::local_node_id() as i64
}

/// `bdr.xact_origin(xid) RETURNS oid`: the replication origin of the
/// transaction's commit (0 for a local one), or NULL when its commit
/// record is not known (in progress, aborted, frozen, or older than the
/// commit timestamp data). What `(pg_xact_commit_timestamp_origin(xid)).roident`
/// gives, without building a record per call: the applier checks it for
/// every row it updates or deletes. An origin of one of the applier's
/// further apply sessions for a peer (`bdr_<peer>_<n>`) is given as the
/// peer's own (`bdr_<peer>`): both hold that peer's transactions. A plain
/// version-1 C function, since pgrx's argument conversion does not take
/// `xid`.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_xact_origin() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// See [`pg_finfo_xact_origin`].
///
/// # Safety
/// Called by PostgreSQL's function manager with one non-null `xid`
/// argument (the function is STRICT).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn xact_origin(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the function manager passes a valid call with one argument.
    let fcinfo = unsafe { &mut *fcinfo };
    // SAFETY: nargs is 1 (the SQL signature).
    let arg = unsafe { fcinfo.args.as_slice(1) }[0].value;
    let xid = pg_sys::TransactionId::from_inner(arg.value() as u32);
    let mut ts: pg_sys::TimestampTz = 0;
    let mut origin: pg_sys::RepOriginId = 0;
    // SAFETY: a lookup in the commit timestamp SLRU; errors (commit
    // timestamps off, invalid xid) are raised as PostgreSQL ERRORs.
    if unsafe { pg_sys::TransactionIdGetCommitTsData(xid, &mut ts, &mut origin) } {
        // SAFETY: catalog lookups in a transaction.
        pg_sys::Datum::from(u32::from(unsafe { peer_origin(origin) }))
    } else {
        fcinfo.isnull = true;
        pg_sys::Datum::from(0usize)
    }
}

/// The peer's own replication origin when `origin` is one of the
/// applier's further origins for that peer (`bdr_<16 hex digits>_<n>`),
/// else `origin`.
///
/// Answers are kept per backend (a row search asks for every row last
/// written through another session's origin) and forgotten whenever
/// `pg_replication_origin` changes, as its catalog cache entries are.
///
/// # Safety
/// Must run in a backend, in a transaction.
pub(crate) unsafe fn peer_origin(origin: pg_sys::RepOriginId) -> pg_sys::RepOriginId {
    if origin == 0 {
        return origin;
    }
    PEERS.with(|memo| {
        // SAFETY: per the contract.
        unsafe {
            memo.get_or_look_up(
                origin,
                &[
                    pg_sys::SysCacheIdentifier::REPLORIGIDENT,
                    pg_sys::SysCacheIdentifier::REPLORIGNAME,
                ],
                Some(forget_peer_origins),
                || look_up_peer_origin(origin),
            )
        }
    })
}

thread_local! {
    /// [`peer_origin`]'s answers: (origin, peer's origin).
    static PEERS: pg::CatalogMemo<pg_sys::RepOriginId, pg_sys::RepOriginId> =
        const { pg::CatalogMemo::new() };
}

/// A change to `pg_replication_origin` (an origin created or dropped,
/// here or in another session): the kept answers may be stale.
#[pg_guard]
unsafe extern "C-unwind" fn forget_peer_origins(
    _arg: pg_sys::Datum,
    _cache: std::ffi::c_int,
    _hash: u32,
) {
    PEERS.with(pg::CatalogMemo::forget);
}

/// [`peer_origin`] from the catalog.
///
/// # Safety
/// As for [`peer_origin`].
unsafe fn look_up_peer_origin(origin: pg_sys::RepOriginId) -> pg_sys::RepOriginId {
    let mut name: *mut std::ffi::c_char = std::ptr::null_mut();
    // SAFETY: per the contract; the name is palloc'd by the lookup.
    unsafe {
        if !pg_sys::replorigin_by_oid(origin, true, &mut name) || name.is_null() {
            return origin;
        }
        let bytes = std::ffi::CStr::from_ptr(name).to_bytes();
        let Some(peer) = node::lane_origin_peer(bytes) else {
            return origin;
        };
        let Ok(peer) = std::ffi::CString::new(peer) else {
            return origin;
        };
        match pg_sys::replorigin_by_name(peer.as_ptr(), true) {
            0 => origin,
            id => id,
        }
    }
}
