//! The `bdr` extension: a logical decoding output plugin plus the
//! extension's SQL functions, in one shared library (`bdr.so`).
//!
//! The library is loaded through `shared_preload_libraries = 'bdr'` and is
//! named as the output plugin of every slot that serves a peer
//! (`pg_create_logical_replication_slot(name, 'bdr')`).

use pgrx::prelude::*;

mod output;

pgrx::pg_module_magic!();

/// The extension's version, as installed by `CREATE EXTENSION bdr`.
#[pg_extern]
fn bdr_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
