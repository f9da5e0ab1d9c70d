//! Opening a replication connection and running replication commands.
//!
//! The startup message carries `replication=database`, which makes the
//! server start a walsender bound to one database: it accepts the
//! replication commands of "Streaming Replication Protocol"
//! (protocol-replication.html) through the simple query protocol, and
//! answers them with ordinary `RowDescription`/`DataRow`/`CommandComplete`
//! messages, always in text format.

use std::collections::HashMap;

use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::{DataRowBody, ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio_postgres::config::{Config, Host, SslMode};
use tracing::{debug, info, trace, warn};

use super::error::{DbError, SQLSTATE_DUPLICATE_OBJECT, StreamError};
use super::lsn::Lsn;
use super::message::{db_error_from_fields, quote_ident, quote_literal};
use super::transport::{Backend, Transport};

/// libpq's default port.
const DEFAULT_PORT: u16 = 5432;

/// A walsender connection to one peer, idle between commands.
#[derive(Debug)]
pub struct ReplicationClient {
    pub(super) transport: Transport,
    peer: String,
    parameters: HashMap<String, String>,
    backend_pid: Option<i32>,
    /// Whether `START_REPLICATION` already ran on this connection.
    pub(super) has_streamed: bool,
}

/// What `IDENTIFY_SYSTEM` reports about the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique identifier (from `initdb`).
    pub system_id: u64,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// Database the connection is bound to (`None` for physical ones).
    pub dbname: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT` reports about a new slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Name of the slot as the server stored it.
    pub slot_name: String,
    /// First LSN whose transactions the slot will decode.
    pub consistent_point: Lsn,
    /// Exported snapshot, if one was asked for.
    pub snapshot_name: Option<String>,
    /// The slot's output plugin.
    pub output_plugin: Option<String>,
}

/// Outcome of [`ReplicationClient::create_replication_slot`]; "already
/// exists" is an outcome, not an error, so callers can create if missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateSlot {
    /// The slot was created.
    Created(SlotInfo),
    /// A slot of that name already existed (SQLSTATE 42710); it was left
    /// as it was, whatever its plugin.
    AlreadyExists,
}

/// What to do with the snapshot a new logical slot starts from
/// (`CREATE_REPLICATION_SLOT ... (SNAPSHOT '...')`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlotSnapshot {
    /// Export it for other sessions (e.g. an initial copy) until the next
    /// command on this connection.
    Export,
    /// Use it in the current transaction of this connection.
    Use,
    /// Do not keep it.
    #[default]
    Nothing,
}

impl ReplicationClient {
    /// Connects with a libpq-style connection string (`host=... port=...
    /// user=... password=... dbname=... application_name=...
    /// connect_timeout=...` or a `postgresql://` URI), parsed by
    /// tokio-postgres's `Config`. A host starting with `/` is a Unix socket
    /// directory. TLS is not supported: `sslmode=require` is refused.
    pub async fn connect(conninfo: &str) -> Result<Self, StreamError> {
        let config: Config = conninfo
            .parse()
            .map_err(|e: tokio_postgres::Error| StreamError::Config(e.to_string()))?;
        Self::connect_config(&config).await
    }

    /// Connects with an already parsed configuration, trying each host in
    /// turn and returning the last error if none accepts.
    pub async fn connect_config(config: &Config) -> Result<Self, StreamError> {
        Self::connect_mode(config, true).await
    }

    /// Connects with an already parsed configuration, as an ordinary
    /// (not replication) session: for [`crate::apply`]'s batched apply,
    /// which speaks the extended query protocol itself (see
    /// [`Self::into_transport`]).
    pub(crate) async fn connect_session(config: &Config) -> Result<Self, StreamError> {
        Self::connect_mode(config, false).await
    }

    /// The server process id of the connection (from its start-up).
    pub(crate) fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// The connection's framing, for a caller that speaks the protocol
    /// itself from here on.
    pub(crate) fn into_transport(self) -> Transport {
        self.transport
    }

    async fn connect_mode(config: &Config, replication: bool) -> Result<Self, StreamError> {
        if config.get_ssl_mode() == SslMode::Require {
            return Err(StreamError::Config(
                "sslmode=require: TLS is not supported".into(),
            ));
        }
        let user = config
            .get_user()
            .ok_or_else(|| StreamError::Config("user missing".into()))?;
        let targets = targets(config)?;
        let mut last_err = StreamError::Config("no host to connect to".into());
        for (host, port) in &targets {
            let attempt = Self::connect_host(config, user, host, *port, replication);
            let result = match config.get_connect_timeout() {
                Some(limit) => tokio::time::timeout(*limit, attempt)
                    .await
                    .unwrap_or(Err(StreamError::ConnectTimeout)),
                None => attempt.await,
            };
            match result {
                Ok(client) => return Ok(client),
                Err(e) if targets.len() > 1 => {
                    warn!(host = ?host, port, error = %e, "cannot connect, trying next host");
                    last_err = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err)
    }

    async fn connect_host(
        config: &Config,
        user: &str,
        host: &Host,
        port: u16,
        replication: bool,
    ) -> Result<Self, StreamError> {
        let (transport, peer) = match host {
            Host::Tcp(name) => (Transport::tcp(name, port).await?, format!("{name}:{port}")),
            Host::Unix(dir) => (
                Transport::unix(dir, port).await?,
                format!("{}:{port}", dir.display()),
            ),
        };
        let mut client = ReplicationClient {
            transport,
            peer,
            parameters: HashMap::new(),
            backend_pid: None,
            has_streamed: false,
        };
        client.startup(config, user, replication).await?;
        info!(
            replication,
            peer = %client.peer,
            user,
            server_version = client.parameter("server_version").unwrap_or("?"),
            backend_pid = client.backend_pid,
            "connection ready"
        );
        Ok(client)
    }

    /// Sends the startup message, authenticates, and waits for the first
    /// `ReadyForQuery` ("Start-up" in protocol-flow.html).
    async fn startup(
        &mut self,
        config: &Config,
        user: &str,
        replication: bool,
    ) -> Result<(), StreamError> {
        let dbname = config.get_dbname().unwrap_or(user);
        let mut params = vec![
            ("user", user),
            ("database", dbname),
            ("client_encoding", "UTF8"),
        ];
        if replication {
            params.push(("replication", "database"));
        }
        if let Some(app) = config.get_application_name() {
            params.push(("application_name", app));
        }
        if let Some(options) = config.get_options() {
            params.push(("options", options));
        }
        frontend::startup_message(params, self.transport.out()).map_err(invalid_argument)?;
        self.transport.flush().await?;
        self.authenticate(user, config.get_password()).await?;
        loop {
            match self.recv().await? {
                Message::BackendKeyData(body) => self.backend_pid = Some(body.process_id()),
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(db_error(body.fields()).into()),
                other => return Err(unexpected(&other, "during startup")),
            }
        }
    }

    /// Answers the server's authentication request, until `AuthenticationOk`.
    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
    ) -> Result<(), StreamError> {
        let need_password =
            || StreamError::Auth("the server asks for a password and none was given".into());
        match self.recv().await? {
            Message::AuthenticationOk => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                let password = password.ok_or_else(need_password)?;
                frontend::password_message(password, self.transport.out())
                    .map_err(invalid_argument)?;
            }
            Message::AuthenticationMd5Password(body) => {
                let password = password.ok_or_else(need_password)?;
                let hash = md5_hash(user.as_bytes(), password, body.salt());
                frontend::password_message(hash.as_bytes(), self.transport.out())
                    .map_err(invalid_argument)?;
            }
            Message::AuthenticationSasl(body) => {
                let password = password.ok_or_else(need_password)?;
                let mechanisms: Vec<String> = body
                    .mechanisms()
                    .map(|m| Ok(m.to_owned()))
                    .collect()
                    .map_err(|e| StreamError::protocol(format!("bad SASL mechanism list: {e}")))?;
                return self.authenticate_scram(password, &mechanisms).await;
            }
            Message::ErrorResponse(body) => return Err(db_error(body.fields()).into()),
            _ => {
                return Err(StreamError::Auth(
                    "unsupported authentication method".into(),
                ));
            }
        }
        self.transport.flush().await?;
        self.expect_auth_ok().await
    }

    /// SCRAM-SHA-256 without channel binding (there is no TLS to bind to),
    /// as described in "SASL Authentication" (sasl-authentication.html).
    async fn authenticate_scram(
        &mut self,
        password: &[u8],
        mechanisms: &[String],
    ) -> Result<(), StreamError> {
        if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
            return Err(StreamError::Auth(format!(
                "no supported SASL mechanism among {mechanisms:?}"
            )));
        }
        let scram_err = |e: std::io::Error| StreamError::Auth(format!("SCRAM: {e}"));
        let mut scram = ScramSha256::new(password, ChannelBinding::unsupported());
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), self.transport.out())
            .map_err(invalid_argument)?;
        self.transport.flush().await?;
        match self.recv().await? {
            Message::AuthenticationSaslContinue(body) => {
                scram.update(body.data()).map_err(scram_err)?
            }
            Message::ErrorResponse(body) => return Err(db_error(body.fields()).into()),
            _ => return Err(StreamError::protocol("expected AuthenticationSASLContinue")),
        }
        frontend::sasl_response(scram.message(), self.transport.out()).map_err(invalid_argument)?;
        self.transport.flush().await?;
        match self.recv().await? {
            // Verifies the server's signature: proof it knows the password too.
            Message::AuthenticationSaslFinal(body) => {
                scram.finish(body.data()).map_err(scram_err)?
            }
            Message::ErrorResponse(body) => return Err(db_error(body.fields()).into()),
            _ => return Err(StreamError::protocol("expected AuthenticationSASLFinal")),
        }
        self.expect_auth_ok().await
    }

    async fn expect_auth_ok(&mut self) -> Result<(), StreamError> {
        match self.recv().await? {
            Message::AuthenticationOk => Ok(()),
            Message::ErrorResponse(body) => Err(db_error(body.fields()).into()),
            _ => Err(StreamError::protocol("expected AuthenticationOk")),
        }
    }

    /// Receives the next message that is not asynchronous: notices are
    /// logged, parameter changes recorded, notifications dropped
    /// ("Asynchronous Operations" in protocol-flow.html). `CopyBothResponse`
    /// is a protocol violation here.
    pub(super) async fn recv(&mut self) -> Result<Message, StreamError> {
        loop {
            match self.transport.recv().await? {
                Backend::CopyBoth => {
                    return Err(StreamError::protocol("unexpected CopyBothResponse"));
                }
                Backend::Message(msg) => {
                    if let Some(msg) = self.absorb_async(msg) {
                        return Ok(msg);
                    }
                }
            }
        }
    }

    /// Handles an asynchronous message; returns any other message.
    pub(super) fn absorb_async(&mut self, msg: Message) -> Option<Message> {
        match msg {
            Message::NoticeResponse(body) => {
                let notice = db_error(body.fields());
                log_notice(&self.peer, &notice);
                None
            }
            Message::ParameterStatus(body) => {
                if let (Ok(name), Ok(value)) = (body.name(), body.value()) {
                    trace!(peer = %self.peer, name, value, "server parameter");
                    self.parameters.insert(name.to_owned(), value.to_owned());
                }
                None
            }
            Message::NotificationResponse(_) => None,
            other => Some(other),
        }
    }

    /// Where this connection goes (`host:port` or `socket-dir:port`), for logs.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// A run-time parameter the server reported (`server_version`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// Runs one command with the simple query protocol and returns the rows
    /// of its result in text form, `None` for NULL. A command that starts
    /// a COPY (such as `START_REPLICATION`, which has its own method) is a
    /// protocol violation here.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, StreamError> {
        debug!(peer = %self.peer, sql, "simple query");
        frontend::query(sql, self.transport.out()).map_err(invalid_argument)?;
        self.transport.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.recv().await? {
                Message::DataRow(body) => rows.push(decode_row(&body)?),
                Message::RowDescription(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse => {}
                Message::ErrorResponse(body) => error = Some(db_error(body.fields())),
                Message::ReadyForQuery(_) => break,
                other => return Err(unexpected(&other, "in a query response")),
            }
        }
        match error {
            Some(e) => Err(e.into()),
            None => Ok(rows),
        }
    }

    /// `IDENTIFY_SYSTEM`: the server's identity and current WAL position.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, StreamError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = single_row(&rows, 4, "IDENTIFY_SYSTEM")?;
        let field = |i: usize| row[i].as_deref().unwrap_or("");
        let bad =
            |what: &str| StreamError::protocol(format!("IDENTIFY_SYSTEM returned a bad {what}"));
        Ok(SystemIdentity {
            system_id: field(0).parse().map_err(|_| bad("systemid"))?,
            timeline: field(1).parse().map_err(|_| bad("timeline"))?,
            xlogpos: field(2).parse().map_err(|_| bad("xlogpos"))?,
            dbname: row[3].clone(),
        })
    }

    /// `CREATE_REPLICATION_SLOT "slot" LOGICAL "plugin" (SNAPSHOT '...')`.
    pub async fn create_replication_slot(
        &mut self,
        slot: &str,
        plugin: &str,
        snapshot: SlotSnapshot,
    ) -> Result<CreateSlot, StreamError> {
        let snapshot = match snapshot {
            SlotSnapshot::Export => "export",
            SlotSnapshot::Use => "use",
            SlotSnapshot::Nothing => "nothing",
        };
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL {} (SNAPSHOT {})",
            quote_ident(slot)?,
            quote_ident(plugin)?,
            quote_literal(snapshot)?
        );
        let rows = match self.simple_query(&sql).await {
            Ok(rows) => rows,
            Err(e) if e.sqlstate() == Some(SQLSTATE_DUPLICATE_OBJECT) => {
                info!(peer = %self.peer, slot, "replication slot already exists");
                return Ok(CreateSlot::AlreadyExists);
            }
            Err(e) => return Err(e),
        };
        let row = single_row(&rows, 4, "CREATE_REPLICATION_SLOT")?;
        let info = SlotInfo {
            slot_name: row[0].clone().unwrap_or_default(),
            consistent_point: row[1].as_deref().unwrap_or("").parse().map_err(|_| {
                StreamError::protocol("CREATE_REPLICATION_SLOT returned a bad consistent_point")
            })?,
            snapshot_name: row[2].clone(),
            output_plugin: row[3].clone(),
        };
        info!(peer = %self.peer, slot, lsn = %info.consistent_point, "created replication slot");
        Ok(CreateSlot::Created(info))
    }

    /// `DROP_REPLICATION_SLOT "slot" WAIT`: waits while another connection
    /// still uses the slot instead of failing. A missing slot is an error
    /// with SQLSTATE 42704.
    pub async fn drop_replication_slot(&mut self, slot: &str) -> Result<(), StreamError> {
        self.simple_query(&format!(
            "DROP_REPLICATION_SLOT {} WAIT",
            quote_ident(slot)?
        ))
        .await?;
        info!(peer = %self.peer, slot, "dropped replication slot");
        Ok(())
    }

    /// Says goodbye (`Terminate`) and closes the socket.
    pub async fn close(mut self) -> Result<(), StreamError> {
        frontend::terminate(self.transport.out());
        self.transport.flush().await
    }
}

/// The addresses to try in order, as libpq does: each `host` (or the
/// `hostaddr` at the same position, which takes precedence for connecting)
/// with the `port` at the same position, or the only port, or 5432.
fn targets(config: &Config) -> Result<Vec<(Host, u16)>, StreamError> {
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let count = hosts.len().max(addrs.len());
    if count == 0 {
        return Err(StreamError::Config("host missing".into()));
    }
    let ports = config.get_ports();
    (0..count)
        .map(|i| {
            let host = match (addrs.get(i), hosts.get(i)) {
                (Some(addr), _) => Host::Tcp(addr.to_string()),
                (None, Some(host)) => host.clone(),
                (None, None) => return Err(StreamError::Config("host missing".into())),
            };
            let port = match ports {
                [] => DEFAULT_PORT,
                [one] => *one,
                many => *many.get(i).ok_or_else(|| {
                    StreamError::Config("number of ports does not match number of hosts".into())
                })?,
            };
            Ok((host, port))
        })
        .collect()
}

fn single_row<'a>(
    rows: &'a [Vec<Option<String>>],
    columns: usize,
    command: &str,
) -> Result<&'a [Option<String>], StreamError> {
    match rows {
        [row] if row.len() >= columns => Ok(row),
        _ => Err(StreamError::protocol(format!(
            "{command} returned {} rows, expected one with {columns} columns",
            rows.len()
        ))),
    }
}

fn decode_row(body: &DataRowBody) -> Result<Vec<Option<String>>, StreamError> {
    let buf = body.buffer();
    body.ranges()
        .map(|range| {
            Ok(match range.and_then(|r| buf.get(r)) {
                None => None,
                Some(bytes) => Some(
                    std::str::from_utf8(bytes)
                        .map_err(|_| std::io::Error::other("non-UTF-8 text in DataRow"))?
                        .to_owned(),
                ),
            })
        })
        .collect()
        .map_err(|e| StreamError::protocol(format!("malformed DataRow: {e}")))
}

pub(crate) fn db_error(fields: ErrorFields<'_>) -> DbError {
    let mut pairs = Vec::new();
    let mut fields = fields;
    // A malformed field list still yields whatever was readable before it.
    while let Ok(Some(field)) = fields.next() {
        pairs.push((field.type_(), field.value_bytes().to_vec()));
    }
    db_error_from_fields(pairs)
}

pub(super) fn log_notice(peer: &str, notice: &DbError) {
    if notice.severity == "WARNING" {
        warn!(peer, sqlstate = %notice.code, detail = ?notice.detail, "server: {}", notice.message);
    } else {
        info!(peer, sqlstate = %notice.code, detail = ?notice.detail, "server: {}", notice.message);
    }
}

/// A protocol violation naming the message that was not expected.
pub(super) fn unexpected(msg: &Message, context: &str) -> StreamError {
    StreamError::protocol(format!("unexpected {} {context}", message_name(msg)))
}

/// The protocol documentation's name of a backend message, for errors.
fn message_name(msg: &Message) -> &'static str {
    match msg {
        Message::AuthenticationCleartextPassword => "AuthenticationCleartextPassword",
        Message::AuthenticationGss => "AuthenticationGSS",
        Message::AuthenticationKerberosV5 => "AuthenticationKerberosV5",
        Message::AuthenticationMd5Password(_) => "AuthenticationMD5Password",
        Message::AuthenticationOk => "AuthenticationOk",
        Message::AuthenticationScmCredential => "AuthenticationSCMCredential",
        Message::AuthenticationSspi => "AuthenticationSSPI",
        Message::AuthenticationGssContinue(_) => "AuthenticationGSSContinue",
        Message::AuthenticationSasl(_) => "AuthenticationSASL",
        Message::AuthenticationSaslContinue(_) => "AuthenticationSASLContinue",
        Message::AuthenticationSaslFinal(_) => "AuthenticationSASLFinal",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::BindComplete => "BindComplete",
        Message::CloseComplete => "CloseComplete",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoData => "NoData",
        Message::NoticeResponse(_) => "NoticeResponse",
        Message::NotificationResponse(_) => "NotificationResponse",
        Message::ParameterDescription(_) => "ParameterDescription",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::ParseComplete => "ParseComplete",
        Message::PortalSuspended => "PortalSuspended",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "message",
    }
}

fn invalid_argument(e: std::io::Error) -> StreamError {
    StreamError::InvalidArgument(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets_of(conninfo: &str) -> Result<Vec<(Host, u16)>, StreamError> {
        targets(&conninfo.parse().expect("parses"))
    }

    #[test]
    fn resolves_hosts_ports_and_sockets() {
        let t = targets_of("host=a,/run/pg port=5433,5434 user=u").expect("targets");
        assert_eq!(
            t,
            vec![
                (Host::Tcp("a".into()), 5433),
                (Host::Unix("/run/pg".into()), 5434)
            ]
        );
        let t = targets_of("host=a,b port=6000 user=u").expect("targets");
        assert_eq!(
            t,
            vec![(Host::Tcp("a".into()), 6000), (Host::Tcp("b".into()), 6000)]
        );
        let t = targets_of("host=name hostaddr=127.0.0.1 user=u").expect("targets");
        assert_eq!(t, vec![(Host::Tcp("127.0.0.1".into()), DEFAULT_PORT)]);
        let t = targets_of("postgresql://u@%2Ftmp%2Fs:7000/db").expect("targets");
        assert_eq!(t, vec![(Host::Unix("/tmp/s".into()), 7000)]);
    }

    #[test]
    fn incomplete_configs_are_permanent_errors() {
        assert!(matches!(targets_of("user=u"), Err(StreamError::Config(_))));
        assert!(matches!(
            targets_of("host=a,b,c port=1,2 user=u"),
            Err(StreamError::Config(_))
        ));
    }

    #[tokio::test]
    async fn refuses_bad_connection_strings_before_connecting() {
        for bad in [
            "host=a nonsense=1 user=u",
            "host=a",
            "host=a user=u sslmode=require",
        ] {
            let err = ReplicationClient::connect(bad).await.expect_err(bad);
            assert!(matches!(err, StreamError::Config(_)), "{bad}: {err}");
            assert!(!err.is_transient());
        }
    }
}
