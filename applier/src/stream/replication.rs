//! The CopyBoth phase: receiving decoded changes and reporting progress.
//!
//! After `START_REPLICATION` the server answers `CopyBothResponse` and from
//! then on both sides send `CopyData` messages ("Streaming Replication
//! Protocol", protocol-replication.html). Either side ends the stream with
//! `CopyDone`; once both have, the server finishes the command with
//! `CommandComplete` and `ReadyForQuery`, and the connection can run
//! another command, except a second `START_REPLICATION`: the walsender
//! keeps its "CopyDone seen" state and would end a new stream at once, so
//! restarting streaming takes a new connection (as pg_recvlogical does).

use std::time::SystemTime;

use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tracing::{debug, info, trace};

use super::conn::{ReplicationClient, db_error, unexpected};
use super::error::StreamError;
use super::lsn::Lsn;
use super::message::{
    ReplicationEvent, encode_status_update, parse_copy_data, start_replication_command,
};
use super::transport::Backend;

/// Where the stream is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// CopyBoth mode: events flow.
    Streaming,
    /// Both sides sent CopyDone and the command completed; the connection
    /// is idle again.
    Ended,
    /// The server reported an error or broke the protocol; the connection
    /// must be dropped.
    Failed,
}

/// A logical replication stream from one slot.
///
/// Dropping it without [`ReplicationStream::stop`] just closes the socket:
/// nothing is lost (the server resends everything after the last reported
/// flush position on the next start), but the server logs an unexpected EOF.
#[derive(Debug)]
pub struct ReplicationStream {
    client: ReplicationClient,
    slot: String,
    state: State,
}

impl ReplicationClient {
    /// `START_REPLICATION SLOT "slot" LOGICAL start ("name" 'value', ...)`.
    ///
    /// `start` of `0/0` means "from the slot's confirmed flush position";
    /// the server never sends transactions that committed before that
    /// position, whatever `start` says. The options go to the output
    /// plugin unchanged. An option the plugin rejects is a server error
    /// returned here, before streaming starts; the connection is dropped
    /// with it, so retrying needs a new one.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, StreamError> {
        // PostgreSQL's walsender (15 and later alike) does not reset its
        // "CopyDone sent/received" state for a second logical
        // START_REPLICATION: it would answer CopyBothResponse and end the
        // stream at once. Refuse instead of returning an empty stream.
        if self.has_streamed {
            return Err(StreamError::InvalidArgument(
                "the server streams once per connection: open a new one to restart".into(),
            ));
        }
        let command = start_replication_command(slot, start, options)?;
        debug!(peer = %self.peer(), command, "starting replication");
        frontend::query(&command, self.transport.out())
            .map_err(|e| StreamError::InvalidArgument(e.to_string()))?;
        self.transport.flush().await?;
        loop {
            match self.transport.recv().await? {
                Backend::CopyBoth => break,
                Backend::Message(msg) => match self.absorb_async(msg) {
                    None => {}
                    Some(Message::ErrorResponse(body)) => {
                        return Err(db_error(body.fields()).into());
                    }
                    Some(other) => return Err(unexpected(&other, "after START_REPLICATION")),
                },
            }
        }
        self.has_streamed = true;
        info!(peer = %self.peer(), slot, lsn = %start, "streaming started");
        Ok(ReplicationStream {
            client: self,
            slot: slot.to_owned(),
            state: State::Streaming,
        })
    }
}

impl ReplicationStream {
    /// The slot being streamed.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// The next XLogData or keepalive, or `None` once the server has ended
    /// the stream (it sent CopyDone, e.g. because it is shutting down).
    ///
    /// Cancel-safe while streaming (it only awaits the socket read), so it
    /// can sit in a `tokio::select!` next to a status-update timer.
    pub async fn next_event(&mut self) -> Result<Option<ReplicationEvent>, StreamError> {
        match self.state {
            State::Streaming => {}
            State::Ended => return Ok(None),
            State::Failed => {
                return Err(StreamError::protocol("replication stream already failed"));
            }
        }
        let result = self.next_event_inner().await;
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    async fn next_event_inner(&mut self) -> Result<Option<ReplicationEvent>, StreamError> {
        loop {
            let msg = match self.client.transport.recv().await? {
                Backend::CopyBoth => return Err(StreamError::protocol("second CopyBothResponse")),
                Backend::Message(msg) => msg,
            };
            match self.client.absorb_async(msg) {
                None => {}
                Some(Message::CopyData(body)) => {
                    let event = parse_copy_data(body.into_bytes())?;
                    trace!(peer = %self.client.peer(), slot = %self.slot, ?event, "event");
                    return Ok(Some(event));
                }
                Some(Message::CopyDone) => {
                    info!(peer = %self.client.peer(), slot = %self.slot, "server ended the stream");
                    self.send_copy_done().await?;
                    self.finish_command().await?;
                    self.state = State::Ended;
                    return Ok(None);
                }
                // Leaving COPY mode without CopyDone; not expected from a
                // logical walsender, but it means the same: no more events.
                Some(Message::CommandComplete(_)) => {
                    info!(peer = %self.client.peer(), slot = %self.slot, "server completed the stream");
                    self.finish_command().await?;
                    self.state = State::Ended;
                    return Ok(None);
                }
                Some(Message::ErrorResponse(body)) => return Err(db_error(body.fields()).into()),
                Some(other) => return Err(unexpected(&other, "while streaming")),
            }
        }
    }

    /// Sends a standby status update: the positions written, durably
    /// flushed and applied, and the client clock. The server treats
    /// `flush` as confirmed: it advances the slot's `confirmed_flush_lsn`
    /// and never resends transactions that committed before it. So only
    /// report as flushed what is durably applied. `reply_requested` asks
    /// the server for an immediate keepalive.
    ///
    /// Not cancel-safe: a partly written update breaks the stream, so do
    /// not race it against other futures.
    pub async fn send_status_update(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), StreamError> {
        if self.state != State::Streaming {
            return Err(StreamError::protocol(
                "status update on a stream that is not running",
            ));
        }
        let body = encode_status_update(write, flush, apply, SystemTime::now(), reply_requested);
        frontend::CopyData::new(body)?.write(self.client.transport.out());
        if let Err(e) = self.client.transport.flush().await {
            self.state = State::Failed;
            return Err(e);
        }
        debug!(
            peer = %self.client.peer(), slot = %self.slot,
            write = %write, flush = %flush, apply = %apply, "sent status update"
        );
        Ok(())
    }

    /// Ends streaming: sends CopyDone, discards the data still in flight
    /// (it was never confirmed, so it will be sent again on the next
    /// start), and waits for the server to complete the command. Returns
    /// the connection, idle and ready for another command (not another
    /// `START_REPLICATION`, see the module documentation).
    pub async fn stop(mut self) -> Result<ReplicationClient, StreamError> {
        match self.state {
            State::Ended => return Ok(self.client),
            State::Failed => {
                return Err(StreamError::protocol("replication stream already failed"));
            }
            State::Streaming => {}
        }
        self.send_copy_done().await?;
        let mut discarded = 0u64;
        loop {
            match self.client.recv().await? {
                Message::CopyData(_) => discarded += 1,
                Message::CopyDone => break,
                Message::ErrorResponse(body) => return Err(db_error(body.fields()).into()),
                other => return Err(unexpected(&other, "while stopping")),
            }
        }
        self.finish_command().await?;
        info!(peer = %self.client.peer(), slot = %self.slot, discarded, "streaming stopped");
        Ok(self.client)
    }

    async fn send_copy_done(&mut self) -> Result<(), StreamError> {
        frontend::copy_done(self.client.transport.out());
        self.client.transport.flush().await
    }

    /// After both CopyDones: `CommandComplete` (and, for timeline switches
    /// of physical replication only, a result set), then `ReadyForQuery`.
    async fn finish_command(&mut self) -> Result<(), StreamError> {
        let mut error = None;
        loop {
            match self.client.recv().await? {
                Message::ReadyForQuery(_) => break,
                Message::ErrorResponse(body) => error = Some(db_error(body.fields())),
                Message::CommandComplete(_)
                | Message::RowDescription(_)
                | Message::DataRow(_)
                // Data the server queued before it saw our CopyDone.
                | Message::CopyData(_) => {}
                other => return Err(unexpected(&other, "after CopyDone")),
            }
        }
        match error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}
