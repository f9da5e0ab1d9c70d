//! The `bdr` output plugin behind a walsender, read with the applier's
//! streaming client: how it groups committed transactions into writes,
//! and what it writes before the walsender's keepalives.

mod plugin_support;

use std::time::{Duration, Instant};

use bdr_applier::stream::{Lsn, ReplicationClient, ReplicationEvent};
use bdr_protocol::Message;
use plugin_support::*;

/// One event of the stream, as the test keeps it.
#[derive(Debug)]
enum Seen {
    /// A CopyData: the end LSNs of the COMMITs in it.
    Write(Vec<Lsn>),
    /// A keepalive that asks for no reply, with its position.
    Idle(Lsn),
}

/// A backlog of small transactions followed by WAL that carries nothing
/// for the slot (another database's): the walsender reads on past each
/// COMMIT, so the plugin holds transactions for the next ones and writes
/// several at a time; the last ones must still go out without any later
/// transaction to push them, and before the keepalive the walsender sends
/// when it waits for more WAL, whose position covers them (the applier
/// takes it as everything sent).
#[tokio::test]
async fn held_transactions_go_out_before_the_walsender_waits() {
    let node = started("held");
    node.safe_psql("CREATE TABLE t (id int PRIMARY KEY)");
    node.safe_psql("CREATE DATABASE other");
    node.safe_psql("SELECT pg_create_logical_replication_slot('s', 'bdr')");
    const TXNS: usize = 200;
    node.safe_psql(&format!(
        "DO $$ BEGIN FOR i IN 1..{TXNS} LOOP \
             INSERT INTO t VALUES (i); COMMIT; \
         END LOOP; END $$"
    ));
    let last_commit: Lsn = node
        .safe_psql("SELECT pg_current_wal_lsn()")
        .parse()
        .unwrap();
    let (other, conn) = tokio_postgres::connect(&node.connstr_db("other"), tokio_postgres::NoTls)
        .await
        .expect("connection to the other database");
    tokio::spawn(conn);
    other
        .batch_execute(
            "CREATE TABLE pad (v text);
             INSERT INTO pad SELECT repeat(g::text, 300) FROM generate_series(1, 500) g",
        )
        .await
        .expect("WAL of another database");

    let options = client_options(&node);
    let options: Vec<(&str, &str)> = options
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let client = ReplicationClient::connect(&node.connstr())
        .await
        .expect("replication connection");
    let mut stream = client
        .start_replication("s", Lsn::INVALID, &options)
        .await
        .expect("START_REPLICATION");
    let mut seen = Vec::new();
    let mut commits = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while commits < TXNS {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, stream.next_event())
            .await
            .unwrap_or_else(|_| {
                panic!("{commits} of {TXNS} transactions arrived, then nothing: {seen:?}")
            })
            .expect("stream works")
            .expect("stream is open");
        match event {
            ReplicationEvent::XLogData { data, .. } => {
                let ends: Vec<Lsn> = decode(&[data.to_vec()])
                    .into_iter()
                    .filter_map(|m| match m {
                        Message::Commit(c) => Some(Lsn(c.end_lsn)),
                        _ => None,
                    })
                    .collect();
                commits += ends.len();
                seen.push(Seen::Write(ends));
            }
            ReplicationEvent::Keepalive {
                wal_end,
                reply_requested: false,
                ..
            } => seen.push(Seen::Idle(wal_end)),
            // The walsender gives up on a client that stays silent.
            ReplicationEvent::Keepalive { .. } => stream
                .send_status_update(Lsn::INVALID, Lsn::INVALID, Lsn::INVALID, false)
                .await
                .expect("status update"),
        }
    }
    let writes = seen.iter().filter(|s| matches!(s, Seen::Write(_))).count();
    assert!(
        writes < TXNS / 4,
        "{TXNS} transactions came in {writes} writes: {seen:?}"
    );
    let ends: Vec<Lsn> = seen
        .iter()
        .flat_map(|s| match s {
            Seen::Write(ends) => ends.clone(),
            Seen::Idle(_) => Vec::new(),
        })
        .collect();
    assert!(ends.iter().all(|e| *e <= last_commit), "{ends:?}");
    // Each keepalive that asks for no reply comes after every COMMIT
    // before its position.
    let mut arrived = 0;
    for s in &seen {
        match s {
            Seen::Write(e) => arrived += e.len(),
            Seen::Idle(pos) => {
                let covered = ends.iter().filter(|e| *e <= pos).count();
                assert!(
                    covered <= arrived,
                    "keepalive at {pos} covers {covered} transactions, {arrived} arrived before it"
                );
            }
        }
    }
    drop(stream);
}
