//! Errors of the replication client, classified by what the caller must do.
//!
//! A *transient* error means "drop this connection, wait, reconnect and
//! resume from the last flushed position": the network failed, the server
//! is shutting down or restarting, or it is out of a resource such as
//! connection slots. Everything else is *permanent*: retrying the same
//! request will fail the same way (wrong password, missing slot, an option
//! the output plugin rejects, a protocol violation) and the peer must be
//! stopped with the reason recorded.

use std::fmt;
use std::io;

/// An `ErrorResponse` (or `NoticeResponse`) sent by the server.
///
/// Field codes are those of "Error and Notice Message Fields" in the
/// protocol documentation (protocol-error-fields.html).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbError {
    /// Severity, not localized (`V`), falling back to the localized one (`S`).
    pub severity: String,
    /// SQLSTATE code (`C`), five characters such as `42704`.
    pub code: String,
    /// Primary message (`M`).
    pub message: String,
    /// Optional detail (`D`).
    pub detail: Option<String>,
    /// Optional hint (`H`).
    pub hint: Option<String>,
    /// Context in which the error occurred (`W`).
    pub context: Option<String>,
}

impl DbError {
    /// Whether retrying after a reconnect can succeed.
    ///
    /// Transient: class 08 (connection exception), class 53 (insufficient
    /// resources, e.g. `too_many_connections`), 57P01 `admin_shutdown`,
    /// 57P02 `crash_shutdown`, 57P03 `cannot_connect_now` (server starting
    /// up or in recovery), and 55006 `object_in_use`, which is what a
    /// walsender answers when the slot is still held by the previous
    /// connection that the server has not yet noticed is gone
    /// ("replication slot ... is active for PID ...").
    pub fn is_transient(&self) -> bool {
        let code = self.code.as_str();
        code.starts_with("08")
            || code.starts_with("53")
            || matches!(code, "57P01" | "57P02" | "57P03" | "55006")
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for DbError {}

/// SQLSTATE `duplicate_object`, e.g. "replication slot ... already exists".
pub const SQLSTATE_DUPLICATE_OBJECT: &str = "42710";
/// SQLSTATE `undefined_object`, e.g. "replication slot ... does not exist".
pub const SQLSTATE_UNDEFINED_OBJECT: &str = "42704";

/// Everything that can go wrong on a replication connection.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection string could not be parsed or is incomplete.
    #[error("invalid connection string: {0}")]
    Config(String),
    /// Reading from or writing to the socket failed, or connecting did.
    #[error("i/o error on replication connection")]
    Io(#[from] io::Error),
    /// The server closed the connection without an error message.
    #[error("replication connection closed by the server")]
    ConnectionClosed,
    /// Connecting and authenticating took longer than `connect_timeout`.
    #[error("timed out connecting to the server")]
    ConnectTimeout,
    /// The server answered with an `ErrorResponse` (boxed: it is large and
    /// rare, and `Result`s on the streaming path should stay small).
    #[error("server error: {0}")]
    Db(Box<DbError>),
    /// The client cannot complete authentication (no password given,
    /// unsupported method, server signature did not verify).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The server sent something the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A name or value cannot be sent (e.g. it contains a NUL byte).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl From<DbError> for StreamError {
    fn from(e: DbError) -> Self {
        StreamError::Db(Box::new(e))
    }
}

impl StreamError {
    /// Whether the caller should reconnect with backoff (`true`) or stop
    /// replicating from this peer and report the error (`false`).
    pub fn is_transient(&self) -> bool {
        match self {
            StreamError::Io(_) | StreamError::ConnectionClosed | StreamError::ConnectTimeout => {
                true
            }
            StreamError::Db(db) => db.is_transient(),
            StreamError::Config(_)
            | StreamError::Auth(_)
            | StreamError::Protocol(_)
            | StreamError::InvalidArgument(_) => false,
        }
    }

    /// The server's error, if this is one.
    pub fn db_error(&self) -> Option<&DbError> {
        match self {
            StreamError::Db(db) => Some(db),
            _ => None,
        }
    }

    /// The server's SQLSTATE, if this is a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        self.db_error().map(|db| db.code.as_str())
    }

    pub(crate) fn protocol(what: impl Into<String>) -> Self {
        StreamError::Protocol(what.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(code: &str) -> StreamError {
        DbError {
            severity: "ERROR".into(),
            code: code.into(),
            message: "m".into(),
            ..DbError::default()
        }
        .into()
    }

    #[test]
    fn network_and_shutdown_errors_are_transient() {
        assert!(StreamError::Io(io::Error::from(io::ErrorKind::ConnectionReset)).is_transient());
        assert!(StreamError::ConnectionClosed.is_transient());
        assert!(StreamError::ConnectTimeout.is_transient());
        for code in [
            "08006", "08001", "08P01", "53300", "53100", "57P01", "57P02", "57P03",
        ] {
            assert!(db(code).is_transient(), "{code} should be transient");
        }
        assert!(
            db("55006").is_transient(),
            "slot still active after a reconnect"
        );
    }

    #[test]
    fn request_errors_are_permanent() {
        // 28P01 wrong password, 42704 slot missing, 22023 bad plugin option,
        // 42710 slot exists, 42501 not allowed to replicate, 57014 canceled.
        for code in [
            "28P01", "28000", "42704", "22023", "42710", "42501", "57014", "XX000",
        ] {
            assert!(!db(code).is_transient(), "{code} should be permanent");
        }
        assert!(!StreamError::Auth("no password".into()).is_transient());
        assert!(!StreamError::protocol("unexpected message").is_transient());
        assert!(!StreamError::Config("host missing".into()).is_transient());
        assert!(!StreamError::InvalidArgument("nul".into()).is_transient());
    }

    #[test]
    fn exposes_sqlstate() {
        assert_eq!(db("42704").sqlstate(), Some("42704"));
        assert_eq!(StreamError::ConnectionClosed.sqlstate(), None);
    }

    #[test]
    fn display_includes_detail_and_hint() {
        let e = DbError {
            severity: "ERROR".into(),
            code: "22023".into(),
            message: "option \"foo\" = \"bar\" is unknown".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
            context: None,
        };
        assert_eq!(
            e.to_string(),
            "ERROR 22023: option \"foo\" = \"bar\" is unknown (detail: d) (hint: h)"
        );
    }
}
