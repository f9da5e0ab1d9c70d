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

mod datum;
mod inspect;
mod node;
mod output;
mod pg;
mod relation;
mod startup;
mod stream;

pgrx::pg_module_magic!();

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
