//! Pure encoding and decoding for the replication client: no I/O here.
//!
//! Layouts follow "Streaming Replication Protocol" (protocol-replication.html)
//! for the messages carried inside `CopyData`, and "Message Formats"
//! (protocol-message-formats.html) for `CopyBothResponse` and the error
//! fields. All integers are big-endian, as everywhere in the protocol.
//!
//! Replication commands are parsed by the walsender's own grammar
//! (`src/backend/replication/repl_gram.y` and `repl_scanner.l`): names are
//! identifiers (double quotes allowed, `""` for a quote) and option values
//! are single-quoted string constants (`''` for a quote, no backslash
//! escapes), so [`quote_ident`] and [`quote_literal`] follow SQL's rules.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::{DbError, StreamError};
use super::lsn::Lsn;

/// `w`: XLogData, WAL data (for logical replication: one output plugin
/// message) sent by the server.
pub const XLOG_DATA_TAG: u8 = b'w';
/// `k`: Primary keepalive message sent by the server.
pub const PRIMARY_KEEPALIVE_TAG: u8 = b'k';
/// `r`: Standby status update sent by the client.
pub const STANDBY_STATUS_UPDATE_TAG: u8 = b'r';
/// `W`: CopyBothResponse, which postgres-protocol's parser does not know.
pub const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// Byte1 tag + Int64 walStart + Int64 walEnd + Int64 sendTime.
const XLOG_DATA_HEADER_LEN: usize = 1 + 8 + 8 + 8;
/// Byte1 tag + Int64 walEnd + Int64 sendTime + Byte1 replyRequested.
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;
/// Byte1 tag + 3 x Int64 LSN + Int64 clientTime + Byte1 replyRequested.
pub const STATUS_UPDATE_LEN: usize = 1 + 8 * 4 + 1;

/// Seconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01 00:00 UTC.
const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;

/// One message from the server while streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// A chunk of output from the logical decoding plugin. `data` shares the
    /// receive buffer (no copy).
    XLogData {
        /// The WAL position the walsender tags this message with (its
        /// decoding context's `write_location`): for a change, the change's
        /// LSN; for a transaction's last message (the commit callback's),
        /// the transaction's end LSN, which is the position to report as
        /// flushed once that transaction is durably applied.
        wal_start: Lsn,
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock when the message was sent.
        send_time: SystemTime,
        /// The output plugin's bytes.
        data: Bytes,
    },
    /// The server is alive; answer with a status update if
    /// `reply_requested`, or the server disconnects after
    /// `wal_sender_timeout`.
    Keepalive {
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock when the message was sent.
        send_time: SystemTime,
        /// Whether the server asks for an immediate status update.
        reply_requested: bool,
    },
}

/// Converts microseconds since 2000-01-01 (the protocol's clock) to a
/// `SystemTime`. Values that do not fit saturate at the PostgreSQL epoch.
pub fn pg_time_to_system(micros: i64) -> SystemTime {
    let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS);
    let offset = Duration::from_micros(micros.unsigned_abs());
    let t = if micros >= 0 {
        epoch.checked_add(offset)
    } else {
        epoch.checked_sub(offset)
    };
    t.unwrap_or(epoch)
}

/// Converts a `SystemTime` to microseconds since 2000-01-01.
pub fn system_to_pg_time(t: SystemTime) -> i64 {
    let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS);
    let micros = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    match t.duration_since(epoch) {
        Ok(after) => micros(after),
        Err(before) => -micros(before.duration()),
    }
}

/// Decodes the body of a `CopyData` message received while streaming.
///
/// XLogData: `Byte1('w') Int64 walStart Int64 walEnd Int64 sendTime Byten`.
/// Primary keepalive: `Byte1('k') Int64 walEnd Int64 sendTime Byte1 reply`.
pub fn parse_copy_data(body: Bytes) -> Result<ReplicationEvent, StreamError> {
    let Some(&tag) = body.first() else {
        return Err(StreamError::protocol(
            "empty CopyData message while streaming",
        ));
    };
    match tag {
        XLOG_DATA_TAG => {
            if body.len() < XLOG_DATA_HEADER_LEN {
                return Err(truncated("XLogData", XLOG_DATA_HEADER_LEN, body.len()));
            }
            let mut header = &body[1..XLOG_DATA_HEADER_LEN];
            let wal_start = Lsn(header.get_u64());
            let wal_end = Lsn(header.get_u64());
            let send_time = pg_time_to_system(header.get_i64());
            let data = body.slice(XLOG_DATA_HEADER_LEN..);
            Ok(ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            })
        }
        PRIMARY_KEEPALIVE_TAG => {
            if body.len() != KEEPALIVE_LEN {
                return Err(truncated("primary keepalive", KEEPALIVE_LEN, body.len()));
            }
            let mut rest = &body[1..];
            let wal_end = Lsn(rest.get_u64());
            let send_time = pg_time_to_system(rest.get_i64());
            let reply_requested = rest.get_u8() != 0;
            Ok(ReplicationEvent::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            })
        }
        other => Err(StreamError::protocol(format!(
            "unknown replication message tag {:?} in CopyData",
            char::from(other)
        ))),
    }
}

fn truncated(what: &str, need: usize, have: usize) -> StreamError {
    StreamError::protocol(format!("{what} message has {have} bytes, expected {need}"))
}

/// Encodes a standby status update (the body of a `CopyData` message):
/// `Byte1('r') Int64 write Int64 flush Int64 apply Int64 clientTime
/// Byte1 replyRequested`.
pub fn encode_status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now: SystemTime,
    reply_requested: bool,
) -> Bytes {
    let mut buf = BytesMut::with_capacity(STATUS_UPDATE_LEN);
    buf.put_u8(STANDBY_STATUS_UPDATE_TAG);
    buf.put_u64(write.0);
    buf.put_u64(flush.0);
    buf.put_u64(apply.0);
    buf.put_i64(system_to_pg_time(now));
    buf.put_u8(u8::from(reply_requested));
    buf.freeze()
}

/// Validates the body of a `CopyBothResponse`:
/// `Int8 format Int16 ncolumns Int16[ncolumns] formats`.
pub fn parse_copy_both_response(mut body: &[u8]) -> Result<(), StreamError> {
    let bad = || StreamError::protocol("malformed CopyBothResponse");
    if body.len() < 3 {
        return Err(bad());
    }
    let _format = body.get_u8();
    let ncolumns = usize::try_from(body.get_i16()).map_err(|_| bad())?;
    if body.len() != ncolumns * 2 {
        return Err(bad());
    }
    Ok(())
}

/// Collects the fields of an `ErrorResponse` or `NoticeResponse`.
pub fn db_error_from_fields<V: AsRef<[u8]>>(fields: impl IntoIterator<Item = (u8, V)>) -> DbError {
    let mut err = DbError::default();
    let mut localized_severity = String::new();
    for (code, value) in fields {
        let value = String::from_utf8_lossy(value.as_ref()).into_owned();
        match code {
            b'S' => localized_severity = value,
            b'V' => err.severity = value,
            b'C' => err.code = value,
            b'M' => err.message = value,
            b'D' => err.detail = Some(value),
            b'H' => err.hint = Some(value),
            b'W' => err.context = Some(value),
            _ => {}
        }
    }
    if err.severity.is_empty() {
        err.severity = localized_severity;
    }
    err
}

/// Quotes an identifier for a replication command: always in double
/// quotes, embedded double quotes doubled, so case and punctuation (as in
/// `include-xids`) survive the walsender's scanner.
pub fn quote_ident(name: &str) -> Result<String, StreamError> {
    reject_nul(name)?;
    if name.is_empty() {
        return Err(StreamError::InvalidArgument("empty identifier".into()));
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// Quotes a string constant: single quotes, embedded quotes doubled.
/// Backslashes are not special in the replication grammar.
pub fn quote_literal(value: &str) -> Result<String, StreamError> {
    reject_nul(value)?;
    Ok(format!("'{}'", value.replace('\'', "''")))
}

fn reject_nul(s: &str) -> Result<(), StreamError> {
    if s.contains('\0') {
        return Err(StreamError::InvalidArgument(format!(
            "{s:?} contains a NUL byte"
        )));
    }
    Ok(())
}

/// Builds `START_REPLICATION SLOT "slot" LOGICAL X/Y ("opt" 'value', ...)`.
pub fn start_replication_command(
    slot: &str,
    start: Lsn,
    options: &[(&str, &str)],
) -> Result<String, StreamError> {
    let mut cmd = format!(
        "START_REPLICATION SLOT {} LOGICAL {start}",
        quote_ident(slot)?
    );
    if !options.is_empty() {
        let opts = options
            .iter()
            .map(|(name, value)| Ok(format!("{} {}", quote_ident(name)?, quote_literal(value)?)))
            .collect::<Result<Vec<_>, StreamError>>()?;
        cmd.push_str(" (");
        cmd.push_str(&opts.join(", "));
        cmd.push(')');
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xlog_fixture() -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(0x0000_0001_0000_0010);
        b.put_u64(0x0000_0001_0000_0100);
        b.put_i64(1_000_000); // 2000-01-01 00:00:01
        b.extend_from_slice(b"BEGIN 42");
        b.freeze()
    }

    #[test]
    fn parses_xlog_data_without_copying_payload() {
        let body = xlog_fixture();
        let base = body.as_ptr();
        let ev = parse_copy_data(body).expect("valid XLogData");
        let ReplicationEvent::XLogData {
            wal_start,
            wal_end,
            send_time,
            data,
        } = ev
        else {
            panic!("expected XLogData, got {ev:?}");
        };
        assert_eq!(wal_start, "1/10".parse().unwrap());
        assert_eq!(wal_end, "1/100".parse().unwrap());
        assert_eq!(send_time, UNIX_EPOCH + Duration::from_secs(946_684_801));
        assert_eq!(&data[..], b"BEGIN 42");
        // The payload points into the original buffer, 25 bytes in.
        assert_eq!(data.as_ptr(), base.wrapping_add(25));
    }

    #[test]
    fn parses_empty_xlog_payload() {
        let body = xlog_fixture().slice(..25);
        let ev = parse_copy_data(body).expect("header only is valid");
        assert!(matches!(ev, ReplicationEvent::XLogData { ref data, .. } if data.is_empty()));
    }

    #[test]
    fn parses_keepalive() {
        let fixture: &[u8] = &[
            b'k', 0, 0, 0, 0x16, 0xB3, 0x74, 0xD8, 0x48, // walEnd 16/B374D848
            0, 0, 0, 0, 0, 0, 0, 0, // sendTime: the PostgreSQL epoch
            1, // reply requested
        ];
        let ev = parse_copy_data(Bytes::from_static(fixture)).expect("valid keepalive");
        assert_eq!(
            ev,
            ReplicationEvent::Keepalive {
                wal_end: "16/B374D848".parse().unwrap(),
                send_time: UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS),
                reply_requested: true,
            }
        );
    }

    #[test]
    fn rejects_truncated_and_unknown_messages() {
        assert!(parse_copy_data(Bytes::new()).is_err());
        assert!(parse_copy_data(xlog_fixture().slice(..24)).is_err());
        assert!(parse_copy_data(Bytes::from_static(&[b'k', 0, 0])).is_err());
        let mut long = BytesMut::from(&[b'k'; KEEPALIVE_LEN + 1][..]);
        long[0] = b'k';
        assert!(parse_copy_data(long.freeze()).is_err());
        let err = parse_copy_data(Bytes::from_static(b"zzz")).unwrap_err();
        assert!(matches!(err, StreamError::Protocol(_)));
        assert!(!err.is_transient());
    }

    #[test]
    fn status_update_bytes_are_exact() {
        let now =
            UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS) + Duration::from_micros(258);
        let got = encode_status_update(Lsn(0x1_0000_0002), Lsn(3), Lsn(0), now, true);
        let want: &[u8] = &[
            b'r', //
            0, 0, 0, 1, 0, 0, 0, 2, // write 1/2
            0, 0, 0, 0, 0, 0, 0, 3, // flush 0/3
            0, 0, 0, 0, 0, 0, 0, 0, // apply 0/0
            0, 0, 0, 0, 0, 0, 1, 2, // clock: 258 us after 2000-01-01
            1, // reply requested
        ];
        assert_eq!(&got[..], want);
        assert_eq!(got.len(), STATUS_UPDATE_LEN);
        let no_reply = encode_status_update(Lsn(0), Lsn(0), Lsn(0), now, false);
        assert_eq!(no_reply[STATUS_UPDATE_LEN - 1], 0);
    }

    #[test]
    fn converts_clock_both_ways() {
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(pg_time_to_system(system_to_pg_time(t)), t);
        assert_eq!(system_to_pg_time(UNIX_EPOCH), -946_684_800_000_000);
        assert_eq!(pg_time_to_system(-946_684_800_000_000), UNIX_EPOCH);
    }

    #[test]
    fn copy_both_response_is_validated() {
        assert!(parse_copy_both_response(&[0, 0, 0]).is_ok());
        assert!(parse_copy_both_response(&[0, 0, 1, 0, 0]).is_ok());
        assert!(parse_copy_both_response(&[0, 0, 2, 0, 0]).is_err());
        assert!(parse_copy_both_response(&[0, 0]).is_err());
        assert!(parse_copy_both_response(&[0, 0xFF, 0xFF]).is_err());
    }

    #[test]
    fn error_fields_are_collected() {
        let fields: Vec<(u8, &[u8])> = vec![
            (b'S', b"FEHLER"),
            (b'V', b"ERROR"),
            (b'C', b"42704"),
            (b'M', b"replication slot \"s\" does not exist"),
            (b'X', b"ignored"),
        ];
        let e = db_error_from_fields(fields);
        assert_eq!(e.severity, "ERROR");
        assert_eq!(e.code, "42704");
        assert_eq!(e.message, "replication slot \"s\" does not exist");
        assert_eq!(e.detail, None);
        let only_localized = db_error_from_fields(vec![(b'S', &b"FATAL"[..])]);
        assert_eq!(only_localized.severity, "FATAL");
    }

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(quote_ident("include-xids").unwrap(), "\"include-xids\"");
        assert_eq!(quote_ident("we\"ird").unwrap(), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's").unwrap(), "'it''s'");
        assert_eq!(quote_literal(r"a\b").unwrap(), r"'a\b'");
        assert_eq!(quote_literal("").unwrap(), "''");
        assert!(quote_ident("").is_err());
        assert!(quote_ident("a\0b").is_err());
        assert!(quote_literal("a\0b").is_err());
    }

    #[test]
    fn builds_start_replication() {
        let cmd = start_replication_command(
            "bdr_slot",
            "16/B374D848".parse().unwrap(),
            &[("include-xids", "0"), ("node", "o'brien")],
        )
        .unwrap();
        assert_eq!(
            cmd,
            "START_REPLICATION SLOT \"bdr_slot\" LOGICAL 16/B374D848 \
             (\"include-xids\" '0', \"node\" 'o''brien')"
        );
        let bare = start_replication_command("s", Lsn::INVALID, &[]).unwrap();
        assert_eq!(bare, "START_REPLICATION SLOT \"s\" LOGICAL 0/0");
    }
}
