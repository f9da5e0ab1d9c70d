//! `bdr-applier`: the per-node daemon that streams committed changes from
//! every peer and applies them locally, and the administrative commands.
//!
//! ```text
//!   daemon ── one task per peer ──> peer: stream (replication connection)
//!                                    │  protocol messages
//!                                    v
//!                                  apply (local connection bound to the
//!                                         peer's replication origin)
//! ```
//!
//! Modules by domain: [`stream`] speaks PostgreSQL's streaming replication
//! protocol, `apply` turns protocol messages into local SQL, [`origin`]
//! keeps exactly-once progress, [`catalog`] reads the node table, `peer`
//! runs one peer's stream with retries, [`daemon`] runs them all,
//! [`config`] gathers settings, [`status`] reports.

mod apply;
pub mod catalog;
pub mod config;
pub mod daemon;
pub mod origin;
mod peer;
pub mod status;
pub mod stream;
