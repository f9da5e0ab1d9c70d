//! The logical decoding output plugin `bdr`.
//!
//! PostgreSQL calls `_PG_output_plugin_init` when a slot created with the
//! `bdr` plugin starts decoding; the callbacks registered there translate
//! each decoded transaction into bytes written through
//! `OutputPluginPrepareWrite`/`OutputPluginWrite`.
//!
//! At this stage the plugin emits a minimal framing (transaction begin,
//! one record per row change, commit); the wire protocol defined by the
//! `bdr-protocol` crate replaces it.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// Entry point looked up by PostgreSQL by name when a slot using the
/// `bdr` plugin is decoded.
///
/// # Safety
/// Called by PostgreSQL with a valid, zeroed callbacks struct.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    // SAFETY: PostgreSQL passes a valid pointer to a struct it owns.
    let cb = unsafe { &mut *cb };
    cb.startup_cb = Some(startup);
    cb.begin_cb = Some(begin);
    cb.change_cb = Some(change);
    cb.commit_cb = Some(commit);
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    opt: *mut pg_sys::OutputPluginOptions,
    _is_init: bool,
) {
    // SAFETY: PostgreSQL passes a valid options struct.
    unsafe { (*opt).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT };
}

/// Writes one record: a tag byte and a big-endian u32.
unsafe fn write_record(ctx: *mut pg_sys::LogicalDecodingContext, tag: u8, value: u32, last: bool) {
    let mut buf = [0u8; 5];
    buf[0] = tag;
    buf[1..].copy_from_slice(&value.to_be_bytes());
    // SAFETY: ctx is the live decoding context; out is its StringInfo.
    unsafe {
        pg_sys::OutputPluginPrepareWrite(ctx, last);
        pg_sys::appendBinaryStringInfo((*ctx).out, buf.as_ptr().cast(), buf.len() as i32);
        pg_sys::OutputPluginWrite(ctx, last);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: valid pointers from PostgreSQL for the duration of the call.
    unsafe { write_record(ctx, b'B', (*txn).xid.into(), true) };
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    relation: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: valid pointers from PostgreSQL for the duration of the call.
    unsafe {
        let tag = match (*change).action {
            pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_INSERT => b'I',
            pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_UPDATE => b'U',
            pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_DELETE => b'D',
            _ => return,
        };
        write_record(ctx, tag, (*relation).rd_id.to_u32(), true);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: valid pointers from PostgreSQL for the duration of the call.
    unsafe { write_record(ctx, b'C', (*txn).xid.into(), true) };
}
