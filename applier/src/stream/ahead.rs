//! Reading a replication stream ahead of its consumer.
//!
//! A walsender that cannot write waits: while it sends a streamed
//! transaction's block, it decodes nothing. When the applier reads only as
//! fast as it applies, the walsender decodes the next block only once the
//! applier has nearly caught up, and the applier then waits for it. A task
//! of its own reads the stream into memory instead (up to
//! [`READ_AHEAD_BYTES`] of XLogData not yet taken), so the walsender
//! finishes sending and decodes on while the applier works through what
//! was read. Events keep their order; status updates and the stop go
//! through the same task, which owns the connection.
//!
//! ```text
//!  walsender ──▶ reader task ──(events, byte budget)──▶ consumer
//!            ◀──            ◀──(status updates, stop)──
//! ```

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::error::StreamError;
use super::lsn::Lsn;
use super::message::ReplicationEvent;
use super::replication::ReplicationStream;

/// The most XLogData bytes read but not yet taken by the consumer.
pub const READ_AHEAD_BYTES: usize = 32 << 20;

type Event = Result<Option<ReplicationEvent>, StreamError>;

enum Command {
    Status {
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    },
    Stop(oneshot::Sender<Result<(), StreamError>>),
}

/// A [`ReplicationStream`] read by a task of its own.
#[derive(Debug)]
pub struct ReadAhead {
    events: mpsc::UnboundedReceiver<(Event, Option<OwnedSemaphorePermit>)>,
    commands: mpsc::UnboundedSender<Command>,
    /// The budget of the event taken last, returned when the next one is
    /// asked for (the consumer is done with it then).
    taken: Option<OwnedSemaphorePermit>,
}

impl ReadAhead {
    /// Starts reading `stream` (on the current tokio runtime).
    pub fn spawn(stream: ReplicationStream) -> ReadAhead {
        let (event_tx, events) = mpsc::unbounded_channel();
        let (commands, command_rx) = mpsc::unbounded_channel();
        tokio::spawn(read(stream, event_tx, command_rx));
        ReadAhead {
            events,
            commands,
            taken: None,
        }
    }

    /// As [`ReplicationStream::next_event`] (cancel safe).
    pub async fn next_event(&mut self) -> Event {
        self.taken = None;
        match self.events.recv().await {
            Some((event, permit)) => {
                self.taken = permit;
                event
            }
            None => Err(StreamError::ConnectionClosed),
        }
    }

    /// As [`ReplicationStream::send_status_update`]; sent in order with
    /// the others, an error comes back as the next event.
    pub async fn send_status_update(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), StreamError> {
        self.commands
            .send(Command::Status {
                write,
                flush,
                apply,
                reply_requested,
            })
            .map_err(|_| StreamError::ConnectionClosed)
    }

    /// As [`ReplicationStream::stop`]; what was read ahead is dropped
    /// (never confirmed, so it is sent again on the next start).
    pub async fn stop(self) -> Result<(), StreamError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Stop(tx))
            .map_err(|_| StreamError::ConnectionClosed)?;
        rx.await.unwrap_or(Err(StreamError::ConnectionClosed))
    }
}

/// The reader task: forwards events while the budget allows, and carries
/// out commands between reads. Ends when the consumer is gone, or once
/// stopped.
async fn read(
    mut stream: ReplicationStream,
    events: mpsc::UnboundedSender<(Event, Option<OwnedSemaphorePermit>)>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let budget = Arc::new(Semaphore::new(READ_AHEAD_BYTES));
    let mut reading = true;
    loop {
        let command = tokio::select! {
            event = stream.next_event(), if reading => {
                let permit = match &event {
                    Ok(Some(ReplicationEvent::XLogData { data, .. })) => {
                        let bytes = data.len().clamp(1, READ_AHEAD_BYTES) as u32;
                        // Waits for room; commands go on meanwhile.
                        let acquire = budget.clone().acquire_many_owned(bytes);
                        tokio::pin!(acquire);
                        loop {
                            tokio::select! {
                                permit = &mut acquire => break permit.ok(),
                                command = commands.recv() => match command {
                                    Some(c) => match run(&mut stream, c).await {
                                        Ran::Went => {}
                                        Ran::Failed(e) => {
                                            let _ = events.send((Err(e), None));
                                            reading = false;
                                            break None;
                                        }
                                        Ran::Stopped => return,
                                    },
                                    None => return,
                                },
                            }
                        }
                    }
                    Ok(Some(_)) => None,
                    // The stream ended or failed: nothing more to read.
                    Ok(None) | Err(_) => {
                        reading = false;
                        None
                    }
                };
                if events.send((event, permit)).is_err() {
                    return;
                }
                continue;
            }
            command = commands.recv() => command,
        };
        let Some(command) = command else {
            return;
        };
        match run(&mut stream, command).await {
            Ran::Went => {}
            Ran::Failed(e) => {
                reading = false;
                if events.send((Err(e), None)).is_err() {
                    return;
                }
            }
            Ran::Stopped => return,
        }
    }
}

enum Ran {
    Went,
    Failed(StreamError),
    Stopped,
}

async fn run(stream: &mut ReplicationStream, command: Command) -> Ran {
    match command {
        Command::Status {
            write,
            flush,
            apply,
            reply_requested,
        } => match stream
            .send_status_update(write, flush, apply, reply_requested)
            .await
        {
            Ok(()) => Ran::Went,
            Err(e) => Ran::Failed(e),
        },
        Command::Stop(reply) => {
            let result = stream.stop_in_place().await;
            let _ = reply.send(result);
            Ran::Stopped
        }
    }
}
