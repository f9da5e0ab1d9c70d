//! The streaming replication client: one walsender connection per peer.
//!
//! tokio-postgres cannot open replication connections, so this is a small
//! client of its own on tokio and postgres-protocol (whose message parser
//! and builders it reuses). It speaks just enough of the protocol to run
//! the replication commands and to stream from a logical slot with any
//! output plugin options.
//!
//! ```text
//!  applier                                        peer (walsender)
//!  ───────                                        ────────────────
//!  ReplicationClient::connect ── StartupMessage(replication=database) ──▶
//!                             ◀── Authentication* (trust/password/MD5/SCRAM)
//!                             ◀── ParameterStatus*, BackendKeyData, ReadyForQuery
//!  identify_system / create_replication_slot / simple_query
//!                             ── Query ──▶  ◀── RowDescription, DataRow*, CommandComplete, ReadyForQuery
//!  start_replication          ── Query(START_REPLICATION SLOT s LOGICAL X/Y (opts)) ──▶
//!                             ◀── CopyBothResponse
//!  ReplicationStream          ◀── CopyData(XLogData 'w' | keepalive 'k') ...
//!    next_event / send_status_update ── CopyData(status update 'r') ──▶
//!  stop                       ── CopyDone ──▶  ◀── CopyData* (discarded), CopyDone
//!                             ◀── CommandComplete, ReadyForQuery  (idle client again,
//!                                  for commands; streaming again needs a new connection)
//! ```
//!
//! Invariants: the slot's confirmed position only moves when the caller
//! reports a flush position, so nothing here can lose a transaction; a
//! stream that failed is never reused; every error says whether a
//! reconnect can help ([`StreamError::is_transient`]).
//!
//! Protocol references: "Streaming Replication Protocol"
//! (protocol-replication.html) and "Message Formats"
//! (protocol-message-formats.html) in the PostgreSQL 15 documentation.

mod conn;
mod error;
mod lsn;
mod message;
mod replication;
pub(crate) mod transport;

pub(crate) use conn::db_error as db_error_of;
pub use conn::{CreateSlot, ReplicationClient, SlotInfo, SlotSnapshot, SystemIdentity};
pub use error::{DbError, SQLSTATE_DUPLICATE_OBJECT, SQLSTATE_UNDEFINED_OBJECT, StreamError};
pub use lsn::{Lsn, ParseLsnError};
pub use message::ReplicationEvent;
pub(crate) use message::quote_literal;
pub use replication::ReplicationStream;
