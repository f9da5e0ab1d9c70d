//! The message enum, the decoder, and iteration over a frame.
//!
//! Messages are self-delimiting: a tag byte, then fields whose lengths
//! are either fixed or given by a varint before them. There is no length
//! prefix and no terminator, so messages can be concatenated: one
//! replication frame (a CopyData `w` payload) holds one or more whole
//! messages, and [`Messages`] walks them.
//!
//! ```text
//! frame: | B ... | R ... | I ... | I ... | C ... |
//!          ^decode -> (Begin, len) ^next message starts at offset len
//! ```

use bytes::BufMut;

use crate::change::{
    Delete, Insert, Truncate, Update, read_delete, read_insert, read_truncate, read_update,
    write_delete, write_insert, write_truncate, write_update,
};
use crate::error::DecodeError;
use crate::reader::{Reader, Result};
use crate::relation::{Relation, read_relation, write_relation};
use crate::startup::{Startup, read_startup, write_startup};
use crate::streaming::{
    StreamAbort, StreamCommit, StreamStart, read_stream_abort, read_stream_commit,
    read_stream_start, read_subxact, write_stream_abort, write_stream_commit, write_stream_start,
    write_stream_stop, write_subxact,
};
use crate::txn::{
    Begin, Commit, LogicalMessage, read_begin, read_commit, read_logical_message, write_begin,
    write_commit, write_logical_message,
};
use crate::{Xid, tag};

/// Any message of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Startup(Startup<'a>),
    Begin(Begin),
    Commit(Commit),
    Relation(Relation<'a>),
    Insert(Insert<'a>),
    Update(Update<'a>),
    Delete(Delete<'a>),
    Truncate(Truncate),
    Logical(LogicalMessage<'a>),
    StreamStart(StreamStart),
    StreamStop,
    /// The subtransaction the changes after it belong to.
    Subxact(Xid),
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
}

impl Message<'_> {
    /// The message's tag byte.
    pub fn tag(&self) -> u8 {
        match self {
            Message::Startup(_) => tag::STARTUP,
            Message::Begin(_) => tag::BEGIN,
            Message::Commit(_) => tag::COMMIT,
            Message::Relation(_) => tag::RELATION,
            Message::Insert(_) => tag::INSERT,
            Message::Update(_) => tag::UPDATE,
            Message::Delete(_) => tag::DELETE,
            Message::Truncate(_) => tag::TRUNCATE,
            Message::Logical(_) => tag::MESSAGE,
            Message::StreamStart(_) => tag::STREAM_START,
            Message::StreamStop => tag::STREAM_STOP,
            Message::Subxact(_) => tag::SUBXACT,
            Message::StreamCommit(_) => tag::STREAM_COMMIT,
            Message::StreamAbort(_) => tag::STREAM_ABORT,
        }
    }

    /// Appends the message to `buf` (a `Vec<u8>`, a `BytesMut`, or any
    /// other [`BufMut`]).
    pub fn encode<B: BufMut + ?Sized>(&self, buf: &mut B) {
        match self {
            Message::Startup(m) => write_startup(buf, m),
            Message::Begin(m) => write_begin(buf, m),
            Message::Commit(m) => write_commit(buf, m),
            Message::Relation(m) => write_relation(buf, m),
            Message::Insert(m) => write_insert(buf, m.rel_id, &m.new),
            Message::Update(m) => {
                let old = m.old.as_ref().map(|old| (old.kind, old.tuple.as_slice()));
                write_update(buf, m.rel_id, old, &m.new)
            }
            Message::Delete(m) => write_delete(buf, m.rel_id, m.old.kind, &m.old.tuple),
            Message::Truncate(m) => write_truncate(buf, m.cascade, m.restart_identity, &m.rel_ids),
            Message::Logical(m) => write_logical_message(buf, m),
            Message::StreamStart(m) => write_stream_start(buf, m),
            Message::StreamStop => write_stream_stop(buf),
            Message::Subxact(xid) => write_subxact(buf, *xid),
            Message::StreamCommit(m) => write_stream_commit(buf, m),
            Message::StreamAbort(m) => write_stream_abort(buf, m),
        }
    }

    /// The message's encoding as a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        self.encode(&mut buf);
        buf
    }
}

/// Reads one message starting at the reader's position.
fn read_message<'a>(r: &mut Reader<'a>) -> Result<Message<'a>> {
    let offset = r.pos();
    let message = match r.u8()? {
        tag::STARTUP => Message::Startup(read_startup(r)?),
        tag::BEGIN => Message::Begin(read_begin(r)?),
        tag::COMMIT => Message::Commit(read_commit(r)?),
        tag::RELATION => Message::Relation(read_relation(r)?),
        tag::INSERT => Message::Insert(read_insert(r)?),
        tag::UPDATE => Message::Update(read_update(r)?),
        tag::DELETE => Message::Delete(read_delete(r)?),
        tag::TRUNCATE => Message::Truncate(read_truncate(r)?),
        tag::MESSAGE => Message::Logical(read_logical_message(r)?),
        tag::STREAM_START => Message::StreamStart(read_stream_start(r)?),
        tag::STREAM_STOP => Message::StreamStop,
        tag::SUBXACT => Message::Subxact(read_subxact(r)?),
        tag::STREAM_COMMIT => Message::StreamCommit(read_stream_commit(r)?),
        tag::STREAM_ABORT => Message::StreamAbort(read_stream_abort(r)?),
        tag => return Err(DecodeError::UnknownTag { tag, offset }),
    };
    Ok(message)
}

/// Decodes the message at the start of `buf`.
///
/// - `Ok(Some((message, len)))`: a message taking the first `len` bytes;
///   the next message, if any, starts at `buf[len..]`.
/// - `Ok(None)`: `buf` is empty or ends inside a message; more bytes are
///   needed.
/// - `Err(_)`: the bytes are malformed; offsets in the error are relative
///   to `buf`.
///
/// The message borrows its text and byte fields from `buf`. Decoding
/// never panics, never reads outside `buf`, and sizes no allocation from
/// a length before checking it against the remaining input.
pub fn decode(buf: &[u8]) -> std::result::Result<Option<(Message<'_>, usize)>, DecodeError> {
    let mut reader = Reader::new(buf, 0);
    match read_message(&mut reader) {
        Ok(message) => Ok(Some((message, reader.pos()))),
        Err(DecodeError::Truncated { .. }) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Iterates over the messages of a complete frame.
///
/// Since the frame is complete, a frame that ends inside a message yields
/// [`DecodeError::Truncated`]. After an error the iterator is exhausted.
/// Offsets in errors are relative to the frame.
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    frame: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Messages<'a> {
    /// The messages of `frame`.
    pub fn new(frame: &'a [u8]) -> Self {
        Messages {
            frame,
            pos: 0,
            failed: false,
        }
    }

    /// The offset of the next message in the frame.
    pub fn offset(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = std::result::Result<Message<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.frame.len() {
            return None;
        }
        let mut reader = Reader::new(self.frame, self.pos);
        let result = read_message(&mut reader);
        match result {
            Ok(_) => self.pos = reader.pos(),
            Err(_) => self.failed = true,
        }
        Some(result)
    }
}

impl std::iter::FusedIterator for Messages<'_> {}
