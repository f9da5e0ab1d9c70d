//! The batched apply connection: the extended query protocol spoken
//! directly, so that many statements (and many transactions) go out
//! before one Sync.
//!
//! tokio-postgres ends every statement with a Sync, and the server answers
//! each Sync with ReadyForQuery and a write to the socket: with a few
//! statements per remote transaction, those writes were the largest part
//! of the server's work. Here the caller decides where the Syncs go.
//!
//! ```text
//!  applier                                   local server
//!  [Parse] Bind Execute ... Bind Execute Sync ──▶
//!                       ◀── [ParseComplete] BindComplete CommandComplete ...
//!                       ◀── (ErrorResponse: the rest is skipped up to the Sync)
//!                       ◀── ReadyForQuery
//! ```
//!
//! A reader task turns the replies into [`Event`]s, and a writer task
//! writes what the caller hands it. Reading on its own task means a large
//! batch can be written while the server answers, without either side
//! blocking on a full socket buffer; writing on its own task means the
//! caller never waits for a server that is not reading (with parallel
//! apply, one session's server may wait for a transaction that the
//! applier has yet to send to the other).

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use postgres_protocol::IsNull;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_postgres::config::Config;
use tokio_postgres::types::{ToSql, Type};
use tracing::{debug, trace};

use super::param::Param;
use crate::stream::{DbError, ReplicationClient, StreamError};

/// A reply that matters to the batch.
#[derive(Debug)]
pub(crate) enum Event {
    /// A statement finished: the rows it touched (0 for utility commands).
    Complete(u64),
    /// A statement failed; the server skips the rest up to the next Sync.
    Error(DbError),
    /// A Sync was reached; the transaction status (`I`dle, in a
    /// `T`ransaction block, or in a `E`failed one).
    Ready(u8),
}

/// One ordinary session on the local node, spoken to directly.
pub(super) struct Wire {
    /// Encoded, not yet written.
    out: BytesMut,
    /// To the writer task, which owns the socket's writing half.
    writer: mpsc::UnboundedSender<Bytes>,
    events: mpsc::UnboundedReceiver<Result<Event, StreamError>>,
    /// Statement names by SQL text, for statements parsed on this session.
    statements: HashMap<String, String>,
    /// The Parse messages among the unwritten bytes: where they start and
    /// their text (dropping those bytes drops the statements too).
    unsent_parses: Vec<(usize, String)>,
    /// The number in the last statement name given out.
    next_name: u64,
    /// The reader task; it owns the socket's reading half, so the session
    /// only closes once it stops.
    reader: tokio::task::JoinHandle<()>,
    /// The writer task.
    writing: tokio::task::JoinHandle<()>,
    /// The server process id of the session.
    pid: Option<i32>,
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.reader.abort();
        self.writing.abort();
    }
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("unsent", &self.out.len())
            .field("statements", &self.statements.len())
            .finish_non_exhaustive()
    }
}

impl Wire {
    /// Opens a session with `config` and starts its reader.
    pub(super) async fn connect(config: &Config) -> Result<Wire, StreamError> {
        let client = ReplicationClient::connect_session(config).await?;
        let pid = client.backend_pid();
        let (mut reader, mut write_half) = client.into_transport().split();
        let (writer, mut to_write) = mpsc::unbounded_channel::<Bytes>();
        let writing = tokio::spawn(async move {
            while let Some(mut buf) = to_write.recv().await {
                let written = async {
                    write_half.write_all_buf(&mut buf).await?;
                    write_half.flush().await
                }
                .await;
                if let Err(e) = written {
                    debug!(error = %e, "batched apply session: writing failed");
                    return;
                }
            }
        });
        let (tx, events) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let event = match reader.recv().await {
                    Ok(msg) => match to_event(msg) {
                        Some(event) => Ok(event),
                        None => continue,
                    },
                    Err(e) => Err(e),
                };
                let end = event.is_err();
                if tx.send(event).is_err() || end {
                    return;
                }
            }
        });
        Ok(Wire {
            out: BytesMut::with_capacity(64 * 1024),
            writer,
            writing,
            events,
            statements: HashMap::new(),
            unsent_parses: Vec::new(),
            next_name: 0,
            reader,
            pid,
        })
    }

    /// The server process id of the session, if the server told it.
    pub(super) fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// Bytes encoded and not yet written.
    pub(super) fn unsent(&self) -> usize {
        self.out.len()
    }

    /// Writes the encoded bytes up to `at`, after `first` (a statement
    /// and its parameters, parsed once per session) when given and
    /// followed by a Sync; the rest stays encoded.
    pub(super) async fn send_batch(
        &mut self,
        at: usize,
        first: Option<(&str, &[Param<'_>])>,
    ) -> Result<(), StreamError> {
        let mut head = BytesMut::new();
        if let Some((sql, params)) = first {
            // Written now, ahead of everything unsent: its Parse is not
            // among the unsent ones.
            self.encode_execute(sql, params, &mut head)?;
        }
        let tail = self.out.split_off(at);
        frontend::sync(&mut self.out);
        trace!(bytes = head.len() + self.out.len(), "sending batch");
        let batch = self.out.split();
        self.out.unsplit(tail);
        let sent = self
            .write(head.freeze())
            .and_then(|()| self.write(batch.freeze()));
        sent?;
        self.unsent_parses.retain_mut(|(start, _)| {
            let kept = *start >= at;
            *start = start.saturating_sub(at);
            kept
        });
        Ok(())
    }

    /// Drops the encoded bytes from `len` on (never written), and the
    /// statements they would have parsed.
    pub(super) fn truncate(&mut self, len: usize) {
        self.out.truncate(len);
        for (start, sql) in &self.unsent_parses {
            if *start >= len {
                self.statements.remove(sql);
            }
        }
        self.unsent_parses.retain(|(start, _)| *start < len);
    }

    /// Encodes the execution of `sql` with `params` (binary, as the
    /// statements of the other apply paths take them), parsing it first
    /// if this session has not yet.
    pub(super) fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<(), StreamError> {
        let at = self.out.len();
        let mut out = std::mem::take(&mut self.out);
        let parsed = self.encode_execute(sql, params, &mut out);
        self.out = out;
        if parsed? {
            self.unsent_parses.push((at, sql.to_owned()));
        }
        Ok(())
    }

    /// Encodes into `out` the execution of `sql` with `params`, after its
    /// Parse if this session has not parsed it yet; whether it did.
    fn encode_execute(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        out: &mut BytesMut,
    ) -> Result<bool, StreamError> {
        if let Some(name) = self.statements.get(sql) {
            bind_execute(name, params, out)?;
            return Ok(false);
        }
        self.next_name += 1;
        let name = format!("bdr_{}", self.next_name);
        frontend::parse(&name, sql, std::iter::empty(), out).map_err(StreamError::Io)?;
        bind_execute(&name, params, out)?;
        self.statements.insert(sql.to_owned(), name);
        Ok(true)
    }

    /// Encodes the execution of a statement that is not kept (TRUNCATE).
    pub(super) fn execute_once(&mut self, sql: &str) -> Result<(), StreamError> {
        encode_once(sql, &mut self.out)
    }

    /// Writes everything in the buffer.
    async fn send(&mut self) -> Result<(), StreamError> {
        trace!(bytes = self.out.len(), "sending batch");
        let all = self.out.split().freeze();
        self.write(all)
    }

    /// Hands `bytes` to the writer task.
    fn write(&self, bytes: Bytes) -> Result<(), StreamError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.writer.send(bytes).map_err(|_| {
            StreamError::Io(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the batched apply session's writer stopped",
            ))
        })
    }

    /// The next reply (cancel safe).
    pub(super) async fn next_event(&mut self) -> Result<Event, StreamError> {
        match self.events.recv().await {
            Some(event) => event,
            None => Err(StreamError::ConnectionClosed),
        }
    }

    /// Runs `sql` with the simple query protocol, with nothing in flight,
    /// and waits for its end.
    pub(super) async fn simple(&mut self, sql: &str) -> Result<(), StreamError> {
        debug!(sql, "batched apply session");
        self.round_trip(|out| frontend::query(sql, out).map_err(StreamError::Io))
            .await
    }

    /// Runs `sql` with the extended query protocol, as batches do, with
    /// nothing in flight, and waits for its end.
    pub(super) async fn extended(&mut self, sql: &str) -> Result<(), StreamError> {
        self.round_trip(|out| {
            encode_once(sql, out)?;
            frontend::sync(out);
            Ok(())
        })
        .await
    }

    /// Writes what `encode` encodes (ending in a Sync or a simple query),
    /// and waits for the ReadyForQuery; the first error is the result.
    async fn round_trip(
        &mut self,
        encode: impl FnOnce(&mut BytesMut) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        // Encoded statements wait: they must not go out without their Sync.
        let pending = self.out.split();
        let sent = match encode(&mut self.out) {
            Ok(()) => self.send().await,
            Err(e) => Err(e),
        };
        self.out.clear();
        self.out.unsplit(pending);
        sent?;
        let mut error = None;
        loop {
            match self.next_event().await? {
                Event::Complete(_) => {}
                Event::Error(e) => error = error.or(Some(e)),
                Event::Ready(_) => break,
            }
        }
        match error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Forgets the statements parsed on this session, on the server too
    /// (after a failed batch, whose Parse messages may not have run).
    pub(super) async fn forget_statements(&mut self) -> Result<(), StreamError> {
        self.statements.clear();
        self.unsent_parses.clear();
        self.simple("DEALLOCATE ALL").await
    }
}

/// Encodes Parse of the unnamed statement, Bind and Execute.
fn encode_once(sql: &str, out: &mut BytesMut) -> Result<(), StreamError> {
    frontend::parse("", sql, std::iter::empty(), out).map_err(StreamError::Io)?;
    bind_execute("", &[], out)
}

/// Encodes Bind (each parameter in its own format, text or binary, as the
/// other apply paths send them) and Execute of the named statement.
fn bind_execute(name: &str, params: &[Param<'_>], out: &mut BytesMut) -> Result<(), StreamError> {
    let bound = frontend::bind(
        "",
        name,
        params.iter().map(|p| i16::from(!p.is_text())),
        params,
        |p, buf| match p.to_sql(&Type::ANY, buf)? {
            tokio_postgres::types::IsNull::Yes => Ok(IsNull::Yes),
            tokio_postgres::types::IsNull::No => Ok(IsNull::No),
        },
        std::iter::empty(),
        out,
    );
    match bound {
        Ok(()) => {}
        Err(frontend::BindError::Conversion(e)) => {
            return Err(StreamError::protocol(format!("binding a value: {e}")));
        }
        Err(frontend::BindError::Serialization(e)) => return Err(StreamError::Io(e)),
    }
    frontend::execute("", 0, out).map_err(StreamError::Io)
}

/// The event of a backend message; `None` for those the batch ignores.
fn to_event(msg: Message) -> Option<Event> {
    match msg {
        Message::CommandComplete(body) => {
            // "UPDATE 3", "INSERT 0 3", "BEGIN": the last word, if a number.
            let tag = body.tag().unwrap_or("");
            let rows = tag
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Some(Event::Complete(rows))
        }
        Message::EmptyQueryResponse => Some(Event::Complete(0)),
        Message::ErrorResponse(body) => {
            Some(Event::Error(crate::stream::db_error_of(body.fields())))
        }
        Message::ReadyForQuery(body) => {
            trace!("ready");
            Some(Event::Ready(body.status()))
        }
        Message::NoticeResponse(body) => {
            let notice = crate::stream::db_error_of(body.fields());
            debug!(notice = %notice, "batched apply session");
            None
        }
        // ParseComplete, BindComplete, RowDescription, DataRow (of SELECTs
        // such as the origin set-up), ParameterStatus, ...
        _ => None,
    }
}
