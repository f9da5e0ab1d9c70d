//! The logical decoding output plugin `bdr`: PostgreSQL's callbacks, each
//! a thin shim over [`Stream`].
//!
//! PostgreSQL looks up `_PG_output_plugin_init` by name when a slot
//! created with the `bdr` plugin starts decoding (logical.c,
//! LoadOutputPlugin). Output is binary: protocol messages as defined by
//! the `bdr-protocol` crate, a transaction's messages in one write (see
//! [`Stream`]).
//!
//! Origin filtering: by default a stream carries only the changes made on
//! this node; changes that an applier (or any other replication origin)
//! wrote are filtered before they are even decoded
//! (`filter_by_origin_cb`, decode.c FilterByOrigin). With the startup
//! option `forward_origins 'true'` they are sent, and their BEGIN names the
//! origin node and the origin's commit LSN.
//!
//! Panics never cross into PostgreSQL: every callback is `#[pg_guard]`,
//! and errors are raised with `ereport` through `pg::raise`.

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::pg;
use crate::startup;
use crate::stream::Stream;

/// Entry point looked up by PostgreSQL by name.
///
/// # Safety
/// Called by PostgreSQL with a valid, zeroed callbacks struct.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    // SAFETY: PostgreSQL passes a valid pointer to a struct it owns.
    let cb = unsafe { &mut *cb };
    cb.startup_cb = Some(startup_cb);
    cb.begin_cb = Some(begin_cb);
    cb.change_cb = Some(change_cb);
    cb.truncate_cb = Some(truncate_cb);
    cb.message_cb = Some(message_cb);
    cb.commit_cb = Some(commit_cb);
    cb.filter_by_origin_cb = Some(filter_by_origin_cb);
    cb.shutdown_cb = Some(shutdown_cb);
    // Streaming of large in-progress transactions, used only when the
    // client asks for it (see `startup_cb`).
    cb.stream_start_cb = Some(stream_start_cb);
    cb.stream_stop_cb = Some(stream_stop_cb);
    cb.stream_abort_cb = Some(stream_abort_cb);
    cb.stream_commit_cb = Some(stream_commit_cb);
    cb.stream_change_cb = Some(change_cb);
    cb.stream_truncate_cb = Some(truncate_cb);
    cb.stream_message_cb = Some(message_cb);
}

/// The stream of `ctx`, or `None` while creating the slot (no stream).
unsafe fn stream<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> Option<&'a mut Stream> {
    // SAFETY: output_plugin_private is null or the Stream made at startup.
    unsafe { (*ctx).output_plugin_private.cast::<Stream>().as_mut() }
}

#[pg_guard]
unsafe extern "C-unwind" fn startup_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    opt: *mut pg_sys::OutputPluginOptions,
    is_init: bool,
) {
    // SAFETY: PostgreSQL passes valid pointers for the call.
    unsafe {
        (*opt).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT;
        (*opt).receive_rewrites = false;
        let ctx = &mut *ctx;
        ctx.output_plugin_private = std::ptr::null_mut();
        // Creating the slot decodes nothing and passes no options.
        if is_init {
            return;
        }
        let agreed = startup::agree(ctx);
        // PostgreSQL turns streaming on when the stream callbacks exist;
        // it stays on only for a client that asked for it.
        ctx.streaming &= agreed.options.streaming;
        let stream = Stream::create(ctx, agreed);
        ctx.output_plugin_private = stream.cast();
        if pg_sys::am_walsender {
            (*stream).wrap_reader(ctx);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown_cb(ctx: *mut pg_sys::LogicalDecodingContext) {
    // SAFETY: ctx is live for the call.
    if let Some(stream) = unsafe { stream(ctx) } {
        stream.shutdown();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn filter_by_origin_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    origin_id: pg_sys::RepOriginId,
) -> bool {
    // SAFETY: ctx is live for the call.
    let forward = unsafe { stream(ctx) }.is_some_and(|s| s.forwards_origins());
    !forward && origin_id != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId
}

#[pg_guard]
unsafe extern "C-unwind" fn begin_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: ctx is live for the call.
    if let Some(stream) = unsafe { stream(ctx) } {
        stream.begin();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn commit_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: valid pointers for the call.
    unsafe {
        if let Some(stream) = stream(ctx) {
            stream.commit(ctx, txn);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_start_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: valid pointers for the call.
    unsafe {
        if let Some(stream) = stream(ctx) {
            stream.stream_start(ctx, txn);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_stop_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: valid pointers for the call.
    unsafe {
        if let Some(stream) = stream(ctx) {
            stream.stream_stop(ctx);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_abort_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _abort_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: valid pointers for the call.
    unsafe {
        if let Some(stream) = stream(ctx) {
            stream.stream_abort(ctx, txn);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_commit_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: valid pointers for the call.
    unsafe {
        if let Some(stream) = stream(ctx) {
            stream.stream_commit(ctx, txn);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn change_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    relation: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: valid pointers for the call.
    unsafe {
        if let Some(stream) = stream(ctx) {
            stream.change(ctx, txn, relation, change);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn truncate_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: std::ffi::c_int,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: valid pointers for the call; relations has nrelations items.
    unsafe {
        let Some(stream) = stream(ctx) else { return };
        let count = usize::try_from(nrelations).unwrap_or(0);
        let relations = if count == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(relations, count)
        };
        stream.truncate(ctx, txn, relations, change);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn message_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    message_lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const std::ffi::c_char,
    message_size: pg_sys::Size,
    message: *const std::ffi::c_char,
) {
    // SAFETY: valid pointers for the call; message has message_size bytes.
    unsafe {
        let Some(stream) = stream(ctx) else { return };
        let prefix = pg::cstr_to_string(prefix, pg::database_is_utf8());
        let content = if message_size == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(message.cast::<u8>(), message_size)
        };
        stream.message(ctx, txn, message_lsn, transactional, &prefix, content);
    }
}
