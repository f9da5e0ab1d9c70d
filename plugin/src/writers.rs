//! The writer cache: the replication origin of recent transactions that
//! committed through one, by transaction id, in shared memory.
//!
//! Before it updates or deletes a row, the apply path checks that the
//! row's last writer committed through the change's origin (`apply::find`):
//! the origin of the row's `xmin`, kept by PostgreSQL in the commit
//! timestamp data (`track_commit_timestamp`). That data is cached in 16
//! pages of 819 transactions each in PostgreSQL 15, a size no setting
//! changes: once the rows a peer updates were last written by transactions
//! spread over more than some 13,000 transaction ids (the usual case after
//! a while), nearly every look-up reads its page from the file system
//! again, under the cache's lock.
//!
//! Here every transaction that commits with a replication origin set up
//! in its session (what PostgreSQL records as its commit's origin: the
//! applier's sessions, and any other apply process on the node) stores its
//! 64-bit transaction id and that origin in a slot of a shared array
//! chosen by the id, `bdr.writer_cache_size` slots (one per transaction
//! remembered, 8 bytes each), at the end of its commit. A slot holds the
//! latest such transaction that maps to it; one word, written and read
//! without a lock.
//!
//! The cache only ever says "this transaction committed through this
//! origin", which is what the commit timestamp data says for it (the
//! same value, stored by the same commit). [`writer_of`] answers only
//! for a transaction id whose slot holds it, epoch included: an id the
//! cache does not hold (a local transaction, one whose slot was taken
//! since, anything after a restart) is looked up in the commit timestamp
//! data as before. `apply::find` uses a hit only to let a change through
//! (the writer is the change's origin); any other writer is looked up
//! again there, so that a transaction whose commit timestamp data was
//! removed since behaves as without the cache.
//!
//! The array exists only when the library is loaded through
//! `shared_preload_libraries` (as the output plugin requires) and the
//! setting is not 0.

use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Slots of the array: transactions remembered. 1,048,576 slots are 8 MiB
/// of shared memory.
pub static SIZE: GucSetting<i32> = GucSetting::<i32>::new(1 << 20);

/// The largest setting: 512 MiB of shared memory.
const MAX_SIZE: i32 = 1 << 26;

/// The name of the shared memory area.
const AREA: &std::ffi::CStr = c"bdr writer cache";

/// The low 48 bits of a full transaction id (the epoch modulo 65,536 and
/// the 32-bit id) above the 16-bit origin: a slot's word. 0 is an empty
/// slot (no transaction has the full id 0).
const ID_BITS: u32 = 48;

/// The array, set up by the shared memory start-up hook in the postmaster
/// and inherited by every backend; null without one.
static mut SLOTS: *const AtomicU64 = std::ptr::null();
/// Its length in slots.
static mut LEN: usize = 0;

unsafe extern "C" {
    /// The setting `track_commit_timestamp` (commit_ts.h); not in pgrx's bindings.
    static track_commit_timestamp: bool;
}

/// Registers the setting and, when the library is being preloaded, the
/// commit callback (the array is made by [`attach`], from the library's
/// shared memory hook). Called by `_PG_init`.
pub fn init() {
    GucRegistry::define_int_guc(
        c"bdr.writer_cache_size",
        c"Transactions applied with a replication origin whose origin is kept in shared memory.",
        c"Spares the commit timestamp data a look-up for each row the applier updates or deletes. 8 bytes each; 0 turns the cache off.",
        &SIZE,
        0,
        MAX_SIZE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    // SAFETY: _PG_init runs once per process, before any query.
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress || SIZE.get() == 0 {
            return;
        }
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
    }
}

/// The shared memory the array takes (0 with the cache off).
pub fn shmem_bytes() -> usize {
    SIZE.get().max(0) as usize * size_of::<AtomicU64>()
}

/// Makes or finds the array, unless the cache is off.
///
/// # Safety
/// Must run in the library's shared memory start-up hook.
pub unsafe fn attach() {
    let bytes = shmem_bytes();
    if bytes == 0 {
        return;
    }
    // SAFETY: per the contract.
    unsafe {
        let area = crate::pg::shared_area(AREA, bytes, |area| {
            std::ptr::write_bytes(area.cast::<u8>(), 0, bytes);
        });
        SLOTS = area.cast::<AtomicU64>();
        LEN = SIZE.get() as usize;
    }
}

/// The slot of the 32-bit transaction id `xid`.
///
/// # Safety
/// The array must exist (`SLOTS` not null).
unsafe fn slot(xid: u32) -> &'static AtomicU64 {
    // SAFETY: per the contract; the index is below LEN.
    unsafe { &*SLOTS.add(xid as usize % LEN) }
}

/// At the end of every commit: a transaction with an id that committed
/// with a replication origin set up in its session is stored.
#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    if event != pg_sys::XactEvent::XACT_EVENT_COMMIT {
        return;
    }
    // SAFETY: backend globals; the transaction's id is still set while
    // the commit callbacks run (CommitTransaction clears it after them),
    // and the array exists (the callback is registered with it).
    unsafe {
        // What RecordTransactionCommit stores as the commit's origin.
        let origin = pg_sys::replorigin_session_origin;
        if u32::from(origin) == pg_sys::InvalidRepOriginId
            || u32::from(origin) == pg_sys::DoNotReplicateId
            || !track_commit_timestamp
            || SLOTS.is_null()
        {
            return;
        }
        let full = pg_sys::GetTopFullTransactionIdIfAny().value;
        if full == 0 {
            return;
        }
        slot(full as u32).store(word(full, origin), Ordering::Relaxed);
    }
}

fn word(full: u64, origin: pg_sys::RepOriginId) -> u64 {
    (full << (64 - ID_BITS)) | u64::from(origin)
}

/// The origin transaction `xid` committed through, when the cache holds
/// it; `None` when it does not (ask the commit timestamp data).
///
/// # Safety
/// Must run in a backend; `xid` is the `xmin` of a row version that is
/// not frozen (assigned, so within 2^31 of the next transaction id).
pub unsafe fn writer_of(xid: pg_sys::TransactionId) -> Option<pg_sys::RepOriginId> {
    let xid = xid.into_inner();
    // SAFETY: per the contract; reading the next id takes XidGenLock
    // shared.
    unsafe {
        if SLOTS.is_null() || xid < pg_sys::FirstNormalTransactionId.into_inner() {
            return None;
        }
        let held = slot(xid).load(Ordering::Relaxed);
        if held == 0 || held >> 16 & 0xFFFF_FFFF != u64::from(xid) {
            return None;
        }
        let next = pg_sys::ReadNextFullTransactionId().value;
        // The epoch of `xid`: that of the next id, or the one before when
        // the 32-bit id wrapped around in between.
        let mut epoch = next >> 32;
        if xid > next as u32 {
            epoch = epoch.wrapping_sub(1);
        }
        let full = (epoch << 32) | u64::from(xid);
        (held >> 16 == full & ((1 << ID_BITS) - 1)).then_some(held as u16)
    }
}

/// `bdr.writer_cache_origin(xid) RETURNS oid`: the replication origin the
/// writer cache holds for the transaction, NULL when it holds none (a
/// local transaction, one not applied since the server started, one
/// whose slot another took, the cache off). For inspection; the apply
/// path uses [`writer_of`] itself.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_writer_cache_origin() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// See [`pg_finfo_writer_cache_origin`].
///
/// # Safety
/// Called by PostgreSQL's function manager with one non-null `xid`
/// argument (the function is STRICT).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn writer_cache_origin(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the function manager passes a valid call with one argument.
    let fcinfo = unsafe { &mut *fcinfo };
    // SAFETY: nargs is 1 (the SQL signature).
    let arg = unsafe { fcinfo.args.as_slice(1) }[0].value;
    let xid = pg_sys::TransactionId::from_inner(arg.value() as u32);
    // SAFETY: in a backend; an xid that is not a row's is looked up the
    // same way (at worst its epoch is taken wrongly, and it is not found).
    match unsafe { writer_of(xid) } {
        Some(origin) => pg_sys::Datum::from(u32::from(origin)),
        None => {
            fcinfo.isnull = true;
            pg_sys::Datum::from(0usize)
        }
    }
}
