//! The wire format spoken between the `bdr` output plugin and `bdr-applier`.
//!
//! Pure Rust: no PostgreSQL, no I/O. This crate is the only place that
//! defines the bytes; `PROTOCOL.md` beside it describes every layout.
//!
//! ```text
//!  plugin (origin node)                         applier (receiving node)
//!  StartupOptions::from_pairs / negotiate  <--  StartupOptions::to_pairs
//!  write_startup, write_begin, TupleWriter -->  decode / Messages
//! ```
//!
//! # Encoding
//!
//! Every message has a writer that appends it to any [`bytes::BufMut`]
//! (`Vec<u8>`, `BytesMut`, ...): [`write_begin`], [`write_commit`],
//! [`write_relation`], [`write_insert`], [`write_update`],
//! [`write_delete`], [`write_truncate`], [`write_logical_message`],
//! [`write_startup`], the streamed-transaction writers
//! ([`write_stream_start`], ...), or [`Message::encode`]. Writers take borrowed
//! values (`&str`, `&[u8]`, `&[Datum]`), so encoding a change allocates
//! nothing; [`TupleWriter`] with the `write_*_header` functions appends a
//! tuple column by column without even a slice of datums. Code that
//! writes into a PostgreSQL `StringInfo` can encode into a reused
//! `Vec<u8>` and append it with `appendBinaryStringInfo`.
//!
//! # Decoding
//!
//! [`decode`] reads the message at the start of a buffer and returns it
//! with its length, `None` if the buffer ends inside it, or a typed
//! [`DecodeError`] naming the offset and field at fault. [`Messages`]
//! iterates over a frame holding several messages. Decoded messages
//! borrow their text and bytes from the input (zero-copy).
//!
//! # Framing
//!
//! Messages are self-delimiting, so a sender may put any number of whole
//! messages in one frame (a CopyData payload); a message never spans two
//! frames.
//!
//! # Versions
//!
//! The startup handshake ([`STARTUP_VERSION`]) is versioned apart from the
//! stream messages ([`PROTOCOL_VERSIONS`]); see [`startup`].

pub mod apply;
pub mod by_value;
mod change;
mod error;
mod message;
mod reader;
mod relation;
pub mod startup;
mod streaming;
mod tuple;
mod txn;
pub mod varint;

pub use change::{
    Delete, Insert, OldKind, OldTuple, Truncate, Update, write_delete, write_delete_header,
    write_insert, write_insert_header, write_truncate, write_update, write_update_header,
};
pub use error::{DecodeError, EncodeError};
pub use message::{Message, Messages, decode};
pub use reader::MAX_LENGTH;
pub use relation::{
    Column, FIRST_NORMAL_OBJECT_ID, QualifiedName, Relation, ReplicaIdentity, write_relation,
    write_relation_parts,
};
pub use startup::{
    DatumFormats, Negotiated, Startup, StartupError, StartupOptions, VersionRange,
    negotiate_version, write_startup,
};
pub use streaming::{
    StreamAbort, StreamCommit, StreamStart, write_stream_abort, write_stream_commit,
    write_stream_start, write_stream_stop, write_subxact,
};
pub use tuple::{
    Datum, INT2_OID, INT4_OID, INT8_OID, IntSendFormat, MAX_COLUMNS, TupleWriter, put_tuple,
};
pub use txn::{
    Begin, Commit, LogicalMessage, Origin, write_begin, write_commit, write_logical_message,
};

/// A write-ahead log position (`XLogRecPtr`).
pub type Lsn = u64;
/// A transaction id (`TransactionId`).
pub type Xid = u32;
/// An object id (`Oid`).
pub type Oid = u32;
/// A relation's id within one stream (see [`Relation`]).
pub type RelId = u32;
/// A node's identity in the replication group.
pub type NodeId = u64;
/// A PostgreSQL `TimestampTz`: microseconds since 2000-01-01 00:00 UTC.
pub type Timestamp = i64;

/// The version of the startup options and of the STARTUP message.
pub const STARTUP_VERSION: u32 = 1;

/// The stream protocol versions this crate reads and writes.
pub const PROTOCOL_VERSIONS: VersionRange = VersionRange { min: 1, max: 2 };

/// Message tags: the first byte of every message.
pub mod tag {
    /// STARTUP, the server's reply to the startup options (version 1).
    pub const STARTUP: u8 = b'S';
    /// BEGIN (version 1).
    pub const BEGIN: u8 = b'B';
    /// COMMIT (version 1).
    pub const COMMIT: u8 = b'C';
    /// RELATION (version 1).
    pub const RELATION: u8 = b'R';
    /// INSERT (version 1).
    pub const INSERT: u8 = b'I';
    /// UPDATE (version 1).
    pub const UPDATE: u8 = b'U';
    /// DELETE (version 1).
    pub const DELETE: u8 = b'D';
    /// TRUNCATE (version 1).
    pub const TRUNCATE: u8 = b'T';
    /// MESSAGE, a logical decoding message (version 1).
    pub const MESSAGE: u8 = b'M';
    /// STREAM START, a block of an in-progress transaction (version 2).
    pub const STREAM_START: u8 = b's';
    /// STREAM STOP, the end of a block (version 2).
    pub const STREAM_STOP: u8 = b'e';
    /// SUBXACT, the subtransaction of the changes that follow (version 2).
    pub const SUBXACT: u8 = b'x';
    /// STREAM COMMIT (version 2).
    pub const STREAM_COMMIT: u8 = b'c';
    /// STREAM ABORT (version 2).
    pub const STREAM_ABORT: u8 = b'a';
}
