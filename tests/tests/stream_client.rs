//! The streaming replication client against a real PostgreSQL 15, with
//! the built-in `test_decoding` plugin standing in for `bdr`.

use std::path::Path;
use std::time::{Duration, Instant};

use bdr_tests::Node;

use bdr_applier::stream::{
    self, CreateSlot, Lsn, ReplicationClient, ReplicationEvent, ReplicationStream, SlotSnapshot,
};

const APP_NAME: &str = "bdr_stream_test";
const SLOT: &str = "bdr_test_slot";
const WAIT: Duration = Duration::from_secs(30);
const OPTIONS: &[(&str, &str)] = &[("include-xids", "0"), ("skip-empty-xacts", "1")];

const SUPERUSER_PASSWORD: &str = "s3cret'pw";

/// A started node whose pg_hba.conf asks TCP clients for passwords;
/// the harness itself keeps using the trusted Unix socket.
struct Cluster {
    node: Node,
    port: u16,
}

impl Cluster {
    fn start(hba: &[&str]) -> Cluster {
        let mut node = Node::init("stream");
        node.start();
        let quoted = SUPERUSER_PASSWORD.replace('\'', "''");
        node.safe_psql(&format!("ALTER ROLE postgres PASSWORD '{quoted}'"));
        node.set_hba(hba);
        Cluster {
            port: node.port(),
            node,
        }
    }

    fn socket_dir(&self) -> &Path {
        self.node.socket_dir()
    }

    /// A keyword=value connection string for TCP on loopback.
    fn conninfo(&self, user: &str, password: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password='{}' dbname=postgres connect_timeout=10",
            self.port,
            password.replace('\\', "\\\\").replace('\'', "\\'")
        )
    }

    /// An ordinary (non-replication) superuser connection.
    async fn sql(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(
            &self.conninfo("postgres", SUPERUSER_PASSWORD),
            tokio_postgres::NoTls,
        )
        .await
        .expect("superuser connection");
        tokio::spawn(conn);
        client
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// The `replication` line is for physical replication; the logical
/// connections of these tests match the `all` line.
fn scram_hba() -> Vec<&'static str> {
    vec![
        "host replication all 127.0.0.1/32 scram-sha-256",
        "host all all 127.0.0.1/32 scram-sha-256",
    ]
}

/// One decoded transaction as test_decoding prints it.
#[derive(Debug)]
struct Txn {
    changes: Vec<String>,
    /// The LSN of the COMMIT message: the transaction's end, what a client
    /// confirms once the transaction is durably applied.
    commit_lsn: Lsn,
}

/// Reads events until `count` transactions have been seen, answering
/// keepalives with `confirmed` as the flush position.
async fn read_txns(stream: &mut ReplicationStream, count: usize, confirmed: Lsn) -> Vec<Txn> {
    let deadline = Instant::now() + WAIT;
    let mut txns = Vec::new();
    let mut changes = Vec::new();
    while txns.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, stream.next_event())
            .await
            .expect("transactions arrive in time")
            .expect("stream works")
            .expect("stream is open");
        match event {
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                let text = String::from_utf8(data.to_vec()).expect("test_decoding writes text");
                if text.starts_with("COMMIT") {
                    txns.push(Txn {
                        changes: std::mem::take(&mut changes),
                        commit_lsn: wal_start,
                    });
                } else if !text.starts_with("BEGIN") {
                    changes.push(text);
                }
            }
            ReplicationEvent::Keepalive {
                reply_requested, ..
            } => {
                if reply_requested {
                    stream
                        .send_status_update(confirmed, confirmed, confirmed, false)
                        .await
                        .expect("status update");
                }
            }
        }
    }
    txns
}

/// Streams for `how_long` with no writes, answering the keepalives the
/// server sends once half of `wal_sender_timeout` passes without a reply;
/// returns how many asked for a reply.
async fn answer_keepalives(
    stream: &mut ReplicationStream,
    how_long: Duration,
    confirmed: Lsn,
) -> usize {
    let deadline = Instant::now() + how_long;
    let mut answered = 0;
    while let Ok(event) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        stream.next_event(),
    )
    .await
    {
        match event
            .expect("stream survives idle periods")
            .expect("stream is open")
        {
            ReplicationEvent::Keepalive {
                reply_requested: true,
                wal_end,
                ..
            } => {
                assert!(wal_end >= confirmed);
                stream
                    .send_status_update(confirmed, confirmed, confirmed, false)
                    .await
                    .expect("status update");
                answered += 1;
            }
            ReplicationEvent::Keepalive { .. } => {}
            other => panic!("no writes, yet {other:?}"),
        }
    }
    answered
}

async fn wait_for(admin: &tokio_postgres::Client, sql: &str, want: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let rows = admin.query(sql, &[]).await.expect("poll query");
        let got: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        if got.iter().any(|g| g == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} returned {got:?}, never {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn confirmed_flush(admin: &tokio_postgres::Client) -> Lsn {
    let row = admin
        .query_one(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
            &[&SLOT],
        )
        .await
        .expect("slot row");
    row.get::<_, String>(0).parse().expect("an LSN")
}

#[tokio::test]
async fn streams_confirms_and_resumes() {
    init_tracing();
    let cluster = Cluster::start(&scram_hba());
    let admin = cluster.sql().await;
    let conninfo = format!(
        "{} application_name={APP_NAME}",
        cluster.conninfo("postgres", SUPERUSER_PASSWORD)
    );
    let mut client = ReplicationClient::connect(&conninfo)
        .await
        .expect("SCRAM connection");

    let ident = client.identify_system().await.expect("IDENTIFY_SYSTEM");
    assert_eq!(ident.dbname.as_deref(), Some("postgres"));
    assert_eq!(ident.timeline, 1);
    assert_ne!(ident.system_id, 0);
    assert!(!ident.xlogpos.is_invalid());

    let created = client
        .create_replication_slot(SLOT, "test_decoding", SlotSnapshot::Nothing)
        .await
        .expect("create slot");
    let CreateSlot::Created(info) = created else {
        panic!("slot was new, got {created:?}")
    };
    assert_eq!(info.slot_name, SLOT);
    assert_eq!(info.output_plugin.as_deref(), Some("test_decoding"));
    assert!(info.consistent_point >= ident.xlogpos);
    let again = client
        .create_replication_slot(SLOT, "test_decoding", SlotSnapshot::Nothing)
        .await;
    assert_eq!(
        again.expect("exists is not an error"),
        CreateSlot::AlreadyExists
    );

    let rows = client.simple_query("SHOW wal_level").await.expect("SHOW");
    assert_eq!(rows, vec![vec![Some("logical".to_owned())]]);

    admin
        .batch_execute("create table t (id int primary key, v text)")
        .await
        .expect("create table");
    // Two transactions (one simple query would be one implicit transaction).
    for sql in [
        "insert into t values (1, 'one')",
        "insert into t values (2, 'two')",
    ] {
        admin.batch_execute(sql).await.expect("write row");
    }

    let mut stream = client
        .start_replication(SLOT, Lsn::INVALID, OPTIONS)
        .await
        .expect("START_REPLICATION");
    wait_for(
        &admin,
        "select application_name from pg_stat_replication",
        APP_NAME,
    )
    .await;
    let txns = read_txns(&mut stream, 2, Lsn::INVALID).await;
    assert_eq!(txns[0].changes.len(), 1, "{txns:?}");
    assert!(
        txns[0].changes[0].contains("INSERT: id[integer]:1 v[text]:'one'"),
        "{txns:?}"
    );
    assert!(
        txns[1].changes[0].contains("INSERT: id[integer]:2 v[text]:'two'"),
        "{txns:?}"
    );
    let (first, second) = (txns[0].commit_lsn, txns[1].commit_lsn);
    assert!(first < second);

    // Confirm the first transaction only: the slot moves there, no further.
    stream
        .send_status_update(first, first, first, true)
        .await
        .expect("status update");
    let deadline = Instant::now() + WAIT;
    while confirmed_flush(&admin).await != first {
        assert!(
            Instant::now() < deadline,
            "confirmed_flush_lsn never reached {first}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), stream.next_event()).await;
    }
    assert!(confirmed_flush(&admin).await < second);

    // Idle for longer than wal_sender_timeout (5s): the server asks for
    // replies and keeps the connection only because they come.
    let answered = answer_keepalives(&mut stream, Duration::from_secs(6), first).await;
    assert!(answered >= 1, "the server never asked for a reply");
    assert_eq!(confirmed_flush(&admin).await, first);

    let client = stream.stop().await.expect("clean stop");
    assert_eq!(
        confirmed_flush(&admin).await,
        first,
        "stopping confirms nothing more"
    );
    let err = client
        .start_replication(SLOT, first, OPTIONS)
        .await
        .expect_err("the walsender streams once per connection");
    assert!(
        matches!(err, stream::StreamError::InvalidArgument(_)),
        "{err}"
    );

    // Resume from the confirmed position on a new connection: the
    // confirmed transaction is not sent again, the unconfirmed one is.
    admin
        .batch_execute("insert into t values (3, 'three')")
        .await
        .expect("third row");
    let client = ReplicationClient::connect(&conninfo)
        .await
        .expect("reconnect");
    let mut stream = client
        .start_replication(SLOT, first, OPTIONS)
        .await
        .expect("restart");
    let txns = read_txns(&mut stream, 2, first).await;
    let seen: Vec<&String> = txns.iter().flat_map(|t| &t.changes).collect();
    assert!(
        seen.iter().all(|c| !c.contains("'one'")),
        "confirmed txn resent: {seen:?}"
    );
    assert!(
        seen[0].contains("'two'") && seen[1].contains("'three'"),
        "{seen:?}"
    );
    assert_eq!(txns[0].commit_lsn, second);
    let last = txns[1].commit_lsn;
    stream
        .send_status_update(last, last, last, false)
        .await
        .expect("status update");
    let mut client = stream.stop().await.expect("clean stop");
    wait_for(
        &admin,
        "select confirmed_flush_lsn::text from pg_replication_slots",
        &last.to_string(),
    )
    .await;

    client.drop_replication_slot(SLOT).await.expect("drop slot");
    let err = client
        .drop_replication_slot(SLOT)
        .await
        .expect_err("slot is gone");
    assert_eq!(err.sqlstate(), Some(stream::SQLSTATE_UNDEFINED_OBJECT));
    assert!(!err.is_transient());
    client.close().await.expect("close");
}

#[tokio::test]
async fn bad_plugin_option_is_a_permanent_error() {
    init_tracing();
    let cluster = Cluster::start(&scram_hba());
    let conninfo = cluster.conninfo("postgres", SUPERUSER_PASSWORD);
    let mut client = ReplicationClient::connect(&conninfo)
        .await
        .expect("connect");
    client
        .create_replication_slot(SLOT, "test_decoding", SlotSnapshot::Nothing)
        .await
        .expect("create slot");
    let err = client
        .start_replication(SLOT, Lsn::INVALID, &[("foo", "bar")])
        .await
        .expect_err("test_decoding rejects unknown options");
    assert!(!err.is_transient(), "{err}");
    let db = err.db_error().expect("a server error");
    assert_eq!(db.code, "22023", "{db}");
    assert!(
        db.message.contains("foo") && db.message.contains("bar"),
        "{db}"
    );

    let err = ReplicationClient::connect(&cluster.conninfo("postgres", "wrong"))
        .await
        .expect_err("wrong password");
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    assert!(!err.is_transient());

    let client = ReplicationClient::connect(&conninfo)
        .await
        .expect("connect");
    let err = client
        .start_replication("no_such_slot", Lsn::INVALID, &[])
        .await
        .expect_err("missing slot");
    assert_eq!(
        err.sqlstate(),
        Some(stream::SQLSTATE_UNDEFINED_OBJECT),
        "{err}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn other_authentication_methods_and_unix_socket() {
    init_tracing();
    // A logical replication connection (replication=database) matches the
    // pg_hba.conf lines of its database, not the `replication` keyword,
    // which is for physical replication only.
    let cluster = Cluster::start(&[
        "host all md5user 127.0.0.1/32 md5",
        "host all pwuser 127.0.0.1/32 password",
        "host all trustuser 127.0.0.1/32 trust",
        "host all all 127.0.0.1/32 scram-sha-256",
    ]);
    let admin = cluster.sql().await;
    admin
        .batch_execute(
            "set password_encryption = 'md5';
             create role md5user login replication password 'md5 pass';
             reset password_encryption;
             create role pwuser login replication password 'plain pass';
             create role trustuser login replication;",
        )
        .await
        .expect("create roles");
    for (user, password) in [
        ("md5user", "md5 pass"),
        ("pwuser", "plain pass"),
        ("trustuser", ""),
    ] {
        let mut client = ReplicationClient::connect(&cluster.conninfo(user, password))
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let ident = client.identify_system().await.expect("IDENTIFY_SYSTEM");
        assert_eq!(ident.dbname.as_deref(), Some("postgres"));
        client.close().await.expect("close");
    }
    let err = ReplicationClient::connect(&cluster.conninfo("md5user", "nope"))
        .await
        .expect_err("wrong md5 password");
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");

    // A percent-encoded socket directory as the URI's host.
    let socket_dir = cluster
        .socket_dir()
        .display()
        .to_string()
        .replace('/', "%2F");
    let uri = format!(
        "postgresql://postgres@{socket_dir}:{}/postgres",
        cluster.port
    );
    let mut client = ReplicationClient::connect(&uri)
        .await
        .expect("Unix socket via URI");
    assert!(client.peer().starts_with('/'), "{}", client.peer());
    assert!(
        client
            .parameter("server_version")
            .is_some_and(|v| v.starts_with("15"))
    );
    client
        .identify_system()
        .await
        .expect("IDENTIFY_SYSTEM over the socket");
}
