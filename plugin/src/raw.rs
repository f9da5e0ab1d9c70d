//! PostgreSQL functions called without pgrx's guard around each call.
//!
//! pgrx calls every server function through a guard (`sigsetjmp`, a
//! thread check, PostgreSQL's exception stack saved and restored): some
//! 100 instructions, against a few dozen for many of the calls on the
//! apply path, and applying the small transaction of workload 1a made 75
//! such calls. The functions below are the same ones, declared without
//! it, for runs of calls on that path made inside one guard:
//! [`guarded`].
//!
//! An ERROR raised in one of them jumps straight to the guard that
//! encloses it, past every frame in between: those frames must own
//! nothing that needs dropping, and nothing in the guarded closure may
//! panic (a panic cannot leave it). Hence only raw pointers, plain
//! values and borrowed slices inside; no `Vec`, no `String`, no
//! indexing that could go out of bounds, no `raise`.

use pgrx::pg_sys::{
    self, Bitmapset, BulkInsertStateData, CommandId, EPQState, EState, Index, List, Plan, Relation,
    ResultRelInfo, TupleDesc, TupleTableSlot, TupleTableSlotOps,
};
use std::ffi::{c_char, c_int, c_void};

/// Runs `f`, made of the functions of this module and plain Rust, with
/// one guard: an ERROR raised in it becomes a Rust panic here, as with
/// any guarded call.
///
/// # Safety
/// As the module says: `f` owns nothing that needs dropping and cannot
/// panic; in a backend's main thread.
#[inline(always)]
pub unsafe fn guarded<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: per the contract.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(f) }
}

unsafe extern "C-unwind" {
    pub fn CreateExecutorState() -> *mut EState;
    pub fn FreeExecutorState(estate: *mut EState);
    pub fn palloc0(size: usize) -> *mut c_void;
    pub fn repalloc(pointer: *mut c_void, size: usize) -> *mut c_void;
    pub fn lappend(list: *mut List, datum: *mut c_void) -> *mut List;
    pub fn list_free(list: *mut List);
    pub fn ExecInitRangeTable(estate: *mut EState, range_table: *mut List);
    pub fn EvalPlanQualInit(
        epqstate: *mut EPQState,
        parentestate: *mut EState,
        subplan: *mut Plan,
        auxrowmarks: *mut List,
        epq_param: c_int,
    );
    pub fn EvalPlanQualEnd(epqstate: *mut EPQState);
    pub fn AfterTriggerBeginQuery();
    pub fn AfterTriggerEndQuery(estate: *mut EState);
    pub fn table_close(relation: Relation, lockmode: c_int);
    pub fn index_close(relation: Relation, lockmode: c_int);
    pub fn ExecGetTriggerOldSlot(
        estate: *mut EState,
        rri: *mut ResultRelInfo,
    ) -> *mut TupleTableSlot;
    pub fn ExecGetTriggerNewSlot(
        estate: *mut EState,
        rri: *mut ResultRelInfo,
    ) -> *mut TupleTableSlot;
    pub fn InitResultRelInfo(
        rri: *mut ResultRelInfo,
        rel: Relation,
        index: Index,
        partition_root_rri: *mut ResultRelInfo,
        instrument_options: c_int,
    );
    pub fn ExecOpenIndices(rri: *mut ResultRelInfo, speculative: bool);
    pub fn ExecCloseIndices(rri: *mut ResultRelInfo);
    pub fn table_slot_create(rel: Relation, reglist: *mut *mut List) -> *mut TupleTableSlot;
    pub fn ExecInitExtraTupleSlot(
        estate: *mut EState,
        tupledesc: TupleDesc,
        tts_ops: *const TupleTableSlotOps,
    ) -> *mut TupleTableSlot;
    pub fn ExecResetTupleTable(tuple_table: *mut List, should_free: bool);
    pub fn GetCurrentCommandId(used: bool) -> CommandId;
    pub fn CommandCounterIncrement();
    pub fn MemoryContextReset(context: pg_sys::MemoryContext);
    pub fn ExecStoreVirtualTuple(slot: *mut TupleTableSlot) -> *mut TupleTableSlot;
    pub fn slot_getsomeattrs_int(slot: *mut TupleTableSlot, attnum: c_int);
    pub fn bms_add_member(a: *mut Bitmapset, x: c_int) -> *mut Bitmapset;
    pub fn ExecSimpleRelationInsert(
        rri: *mut ResultRelInfo,
        estate: *mut EState,
        slot: *mut TupleTableSlot,
    );
    pub fn ExecSimpleRelationUpdate(
        rri: *mut ResultRelInfo,
        estate: *mut EState,
        epqstate: *mut EPQState,
        searchslot: *mut TupleTableSlot,
        slot: *mut TupleTableSlot,
    );
    pub fn ExecSimpleRelationDelete(
        rri: *mut ResultRelInfo,
        estate: *mut EState,
        epqstate: *mut EPQState,
        searchslot: *mut TupleTableSlot,
    );
    pub fn ExecInsertIndexTuples(
        rri: *mut ResultRelInfo,
        slot: *mut TupleTableSlot,
        estate: *mut EState,
        update: bool,
        no_dup_err: bool,
        spec_conflict: *mut bool,
        arbiter_indexes: *mut List,
    ) -> *mut List;
    pub fn ExecConstraints(rri: *mut ResultRelInfo, slot: *mut TupleTableSlot, estate: *mut EState);
    pub fn ExecPartitionCheck(
        rri: *mut ResultRelInfo,
        slot: *mut TupleTableSlot,
        estate: *mut EState,
        emit_error: bool,
    ) -> bool;
    pub fn CreateTupleDescCopy(tupdesc: TupleDesc) -> TupleDesc;
    pub fn ExecAllocTableSlot(
        tuple_table: *mut *mut List,
        desc: TupleDesc,
        tts_ops: *const TupleTableSlotOps,
    ) -> *mut TupleTableSlot;
    pub fn table_slot_callbacks(rel: Relation) -> *const TupleTableSlotOps;
    pub fn GetTransactionSnapshot() -> pg_sys::Snapshot;
    pub fn PushActiveSnapshot(snapshot: pg_sys::Snapshot);
    pub fn PopActiveSnapshot();
    pub fn SPI_commit();
    pub fn index_beginscan(
        heap: Relation,
        index: Relation,
        snapshot: pg_sys::Snapshot,
        nkeys: c_int,
        norderbys: c_int,
    ) -> pg_sys::IndexScanDesc;
    pub fn index_rescan(
        scan: pg_sys::IndexScanDesc,
        keys: pg_sys::ScanKey,
        nkeys: c_int,
        orderbys: pg_sys::ScanKey,
        norderbys: c_int,
    );
    pub fn index_getnext_slot(
        scan: pg_sys::IndexScanDesc,
        direction: pg_sys::ScanDirection::Type,
        slot: *mut TupleTableSlot,
    ) -> bool;
    pub fn index_endscan(scan: pg_sys::IndexScanDesc);
    pub fn XactLockTableWait(
        xid: pg_sys::TransactionId,
        rel: Relation,
        ctid: pg_sys::ItemPointer,
        oper: pg_sys::XLTW_Oper::Type,
    );
    pub fn GetLatestSnapshot() -> pg_sys::Snapshot;
    // PostgreSQL's static inline functions, as pgrx compiles them.
    #[link_name = "ExecCopySlot__pgrx_cshim"]
    pub fn ExecCopySlot(
        dstslot: *mut TupleTableSlot,
        srcslot: *mut TupleTableSlot,
    ) -> *mut TupleTableSlot;
    #[link_name = "ExecMaterializeSlot__pgrx_cshim"]
    pub fn ExecMaterializeSlot(slot: *mut TupleTableSlot);
    #[link_name = "slot_getsysattr__pgrx_cshim"]
    pub fn slot_getsysattr(
        slot: *mut TupleTableSlot,
        attnum: c_int,
        isnull: *mut bool,
    ) -> pg_sys::Datum;
    #[link_name = "table_tuple_lock__pgrx_cshim"]
    pub fn table_tuple_lock(
        rel: Relation,
        tid: pg_sys::ItemPointer,
        snapshot: pg_sys::Snapshot,
        slot: *mut TupleTableSlot,
        cid: CommandId,
        mode: pg_sys::LockTupleMode::Type,
        wait_policy: pg_sys::LockWaitPolicy::Type,
        flags: u8,
        tmfd: *mut pg_sys::TM_FailureData,
    ) -> pg_sys::TM_Result::Type;
    #[link_name = "ExecClearTuple__pgrx_cshim"]
    pub fn ExecClearTuple(slot: *mut TupleTableSlot) -> *mut TupleTableSlot;
    #[link_name = "list_nth__pgrx_cshim"]
    pub fn list_nth(list: *const List, n: c_int) -> *mut c_void;
    #[link_name = "table_tuple_insert__pgrx_cshim"]
    pub fn table_tuple_insert(
        rel: Relation,
        slot: *mut TupleTableSlot,
        cid: CommandId,
        options: c_int,
        bistate: *mut BulkInsertStateData,
    );
    #[link_name = "table_multi_insert__pgrx_cshim"]
    pub fn table_multi_insert(
        rel: Relation,
        slots: *mut *mut TupleTableSlot,
        nslots: c_int,
        cid: CommandId,
        options: c_int,
        bistate: *mut BulkInsertStateData,
    );
}

/// `slot_getallattrs`: every column of `slot` deformed.
///
/// # Safety
/// Inside [`guarded`]; `slot` valid.
#[inline]
pub unsafe fn slot_getallattrs(slot: *mut TupleTableSlot) {
    // SAFETY: per the contract.
    unsafe {
        let natts = (*(*slot).tts_tupleDescriptor).natts;
        if c_int::from((*slot).tts_nvalid) < natts {
            slot_getsomeattrs_int(slot, natts);
        }
    }
}

/// A zeroed node of type `T` with its `tag`, in the current memory
/// context (`makeNode`).
///
/// # Safety
/// Inside [`guarded`]; `T` a node type whose tag is `tag`.
#[inline]
pub unsafe fn make_node<T>(tag: pg_sys::NodeTag) -> *mut T {
    // SAFETY: per the contract; palloc0 returns zeroed memory of the size
    // asked; every node starts with its tag.
    unsafe {
        let node = palloc0(std::mem::size_of::<T>()).cast::<T>();
        *node.cast::<pg_sys::NodeTag>() = tag;
        node
    }
}

/// The client connection's functions (`libpq/libpq.h`), of which the
/// plugin uses `is_send_pending` alone.
#[repr(C)]
pub struct PQcommMethods {
    pub comm_reset: Option<unsafe extern "C-unwind" fn()>,
    pub flush: Option<unsafe extern "C-unwind" fn() -> c_int>,
    pub flush_if_writable: Option<unsafe extern "C-unwind" fn() -> c_int>,
    pub is_send_pending: Option<unsafe extern "C-unwind" fn() -> bool>,
    pub putmessage: Option<unsafe extern "C-unwind" fn(c_char, *const c_char, usize) -> c_int>,
    pub putmessage_noblock: Option<unsafe extern "C-unwind" fn(c_char, *const c_char, usize)>,
}

unsafe extern "C" {
    pub static PqCommMethods: *const PQcommMethods;
}

/// Whether output waits in the connection's buffer for the socket to
/// take it (`pq_is_send_pending`).
///
/// # Safety
/// In a backend with a client connection.
pub unsafe fn send_pending() -> bool {
    // SAFETY: per the contract; the methods are set at connection start.
    unsafe {
        (*PqCommMethods)
            .is_send_pending
            .is_some_and(|pending| pending())
    }
}
