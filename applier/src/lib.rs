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
mod fault;
pub mod origin;
mod peer;
pub mod status;
pub mod stream;

/// A database error as an operator needs it: severity, SQLSTATE, message,
/// detail, hint and where, rather than tokio-postgres's bare "db error".
pub(crate) fn describe_db_error(err: &tokio_postgres::Error) -> String {
    let Some(db) = err.as_db_error() else {
        return err.to_string();
    };
    let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    if let Some(detail) = db.detail() {
        text.push_str(&format!(" (detail: {detail})"));
    }
    if let Some(hint) = db.hint() {
        text.push_str(&format!(" (hint: {hint})"));
    }
    if let Some(at) = db.where_() {
        text.push_str(&format!(" (where: {at})"));
    }
    text
}
