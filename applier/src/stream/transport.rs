//! Message framing over a TCP or Unix socket.
//!
//! Every backend message is `Byte1 tag, Int32 length (including itself),
//! body` (protocol-message-formats.html). Bytes are read into one growing
//! buffer; a complete message is split off it, so message bodies (and the
//! XLogData payloads inside them) are `Bytes` that share that allocation
//! instead of being copied.
//!
//! Parsing is delegated to `postgres_protocol::message::backend::Message`,
//! except for `CopyBothResponse` (`W`), which it does not know and which is
//! recognised here first.

use std::fmt;
use std::io;
use std::path::Path;

use bytes::{Buf, BytesMut};
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};

use super::error::StreamError;
use super::message::{COPY_BOTH_RESPONSE_TAG, parse_copy_both_response};

/// PostgreSQL never builds a message larger than `MaxAllocSize` (1 GiB);
/// anything claiming more is a corrupt stream, not a reason to allocate.
const MAX_MESSAGE_LEN: usize = 1 << 30;
/// How much free space to make before each socket read.
const READ_CHUNK: usize = 64 * 1024;

/// A byte stream the client can talk over.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// A message received from the server.
pub(super) enum Backend {
    /// `CopyBothResponse`: the server switched to streaming.
    CopyBoth,
    /// Any message postgres-protocol can parse.
    Message(Message),
}

/// A framed connection: the socket plus its read and write buffers.
pub(crate) struct Transport {
    sock: Box<dyn Socket>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("buffered_in", &self.rbuf.len())
            .field("buffered_out", &self.wbuf.len())
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Connects over TCP, with Nagle's algorithm off: status updates are
    /// small and should leave at once.
    pub(super) async fn tcp(host: &str, port: u16) -> io::Result<Self> {
        let sock = TcpStream::connect((host, port)).await?;
        sock.set_nodelay(true)?;
        Ok(Self::new(Box::new(sock)))
    }

    /// Connects to the Unix socket `dir/.s.PGSQL.port`, PostgreSQL's naming.
    pub(super) async fn unix(dir: &Path, port: u16) -> io::Result<Self> {
        let sock = UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?;
        Ok(Self::new(Box::new(sock)))
    }

    fn new(sock: Box<dyn Socket>) -> Self {
        Transport {
            sock,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
        }
    }

    /// The outgoing buffer, for postgres-protocol's frontend builders.
    pub(super) fn out(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Writes everything queued in the outgoing buffer.
    pub(super) async fn flush(&mut self) -> Result<(), StreamError> {
        self.sock.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        self.sock.flush().await?;
        Ok(())
    }

    /// Receives the next complete message.
    ///
    /// Cancel-safe: the only await is the socket read, and bytes read are
    /// kept in the buffer, so dropping this future loses nothing.
    pub(super) async fn recv(&mut self) -> Result<Backend, StreamError> {
        loop {
            if let Some(msg) = self.try_parse()? {
                return Ok(msg);
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            if self.sock.read_buf(&mut self.rbuf).await? == 0 {
                // Also in the middle of a message: a cut connection, not a
                // malformed one, so the caller reconnects.
                return Err(StreamError::ConnectionClosed);
            }
        }
    }

    /// Splits the connection into a reader of backend messages (what was
    /// already read stays in it) and the socket's writing half.
    pub(crate) fn split(self) -> (Reader, WriteHalf<Box<dyn Socket>>) {
        let (read, write) = tokio::io::split(self.sock);
        (
            Reader {
                sock: read,
                rbuf: self.rbuf,
            },
            write,
        )
    }

    /// Splits one complete message off the read buffer, if there is one.
    fn try_parse(&mut self) -> Result<Option<Backend>, StreamError> {
        try_parse(&mut self.rbuf)
    }
}

/// The reading half of a [`Transport`].
pub(crate) struct Reader {
    sock: ReadHalf<Box<dyn Socket>>,
    rbuf: BytesMut,
}

impl Reader {
    /// Receives the next complete message (`CopyBothResponse` is an error).
    pub(crate) async fn recv(&mut self) -> Result<Message, StreamError> {
        loop {
            match try_parse(&mut self.rbuf)? {
                Some(Backend::Message(msg)) => return Ok(msg),
                Some(Backend::CopyBoth) => {
                    return Err(StreamError::protocol("unexpected CopyBothResponse"));
                }
                None => {}
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            if self.sock.read_buf(&mut self.rbuf).await? == 0 {
                return Err(StreamError::ConnectionClosed);
            }
        }
    }
}

/// Splits one complete message off `rbuf`, if there is one.
fn try_parse(rbuf: &mut BytesMut) -> Result<Option<Backend>, StreamError> {
    if rbuf.len() < 5 {
        return Ok(None);
    }
    let tag = rbuf[0];
    let len = u32::from_be_bytes([rbuf[1], rbuf[2], rbuf[3], rbuf[4]]);
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if !(4..=MAX_MESSAGE_LEN).contains(&len) {
        return Err(StreamError::protocol(format!(
            "message {:?} has an invalid length {len}",
            char::from(tag)
        )));
    }
    if tag == COPY_BOTH_RESPONSE_TAG {
        if rbuf.len() < len + 1 {
            rbuf.reserve(len + 1 - rbuf.len());
            return Ok(None);
        }
        let mut frame = rbuf.split_to(len + 1);
        frame.advance(5);
        parse_copy_both_response(&frame)?;
        return Ok(Some(Backend::CopyBoth));
    }
    match Message::parse(rbuf) {
        Ok(Some(msg)) => Ok(Some(Backend::Message(msg))),
        Ok(None) => Ok(None),
        Err(e) => Err(StreamError::protocol(format!(
            "cannot parse message {:?}: {e}",
            char::from(tag)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn feed(bytes: &'static [u8]) -> Transport {
        let (client, mut server) = tokio::io::duplex(64);
        tokio::spawn(async move {
            let _ = server.write_all(bytes).await;
        });
        Transport::new(Box::new(client))
    }

    #[tokio::test]
    async fn reads_copy_both_then_copy_data_across_small_reads() {
        let mut t = feed(b"W\0\0\0\x07\0\0\0d\0\0\0\x07abc").await;
        assert!(matches!(t.recv().await, Ok(Backend::CopyBoth)));
        match t.recv().await {
            Ok(Backend::Message(Message::CopyData(body))) => assert_eq!(body.data(), b"abc"),
            _ => panic!("expected CopyData"),
        }
        assert!(matches!(t.recv().await, Err(StreamError::ConnectionClosed)));
    }

    #[tokio::test]
    async fn rejects_absurd_lengths_and_reports_cut_connections() {
        let mut t = feed(b"d\x7f\xff\xff\xff").await;
        assert!(matches!(t.recv().await, Err(StreamError::Protocol(_))));
        let mut t = feed(b"d\0\0\0\x02").await;
        assert!(matches!(t.recv().await, Err(StreamError::Protocol(_))));
        let mut t = feed(b"d\0\0\0\x09ab").await;
        assert!(matches!(t.recv().await, Err(StreamError::ConnectionClosed)));
    }
}
