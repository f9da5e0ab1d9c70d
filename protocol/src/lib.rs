//! The wire format spoken between the `bdr` output plugin and `bdr-applier`.
//!
//! Pure Rust: no PostgreSQL, no I/O. See `PROTOCOL.md` for the layouts.
