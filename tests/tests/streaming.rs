//! Large transactions that the peer streams while they are in progress
//! (protocol version 2): applied as they arrive when nothing comes
//! between their blocks, applied whole at their commit otherwise, never
//! visible before their commit, never applied twice, and gone when they
//! abort. The sending node streams past 64 kB of changes here.

use bdr_tests::Mesh;

const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, v text)";

/// The applier's log lines of streamed transactions.
const LOG: &str = "info,bdr_applier::apply::streamed=debug";

const DIRECT: &str = "applying a streamed transaction as it arrives";
const COMMITTED_DIRECT: &str = "streamed transaction committed as it arrived";
const FROM_SPOOL: &str = "applying a streamed transaction from its spool";

/// A two-node mesh where a streams every transaction past 64 kB, and b's
/// applier logs what it does with them.
fn mesh() -> Mesh {
    let mut mesh = Mesh::new(&["a", "b"], SCHEMA);
    let a = mesh.node("a");
    a.append_conf("logical_decoding_work_mem = '64kB'\n");
    a.reload();
    let b = mesh.applier("b");
    b.stop();
    b.restart_with_env(&[("RUST_LOG", LOG)]);
    mesh.wait_for_streaming();
    mesh
}

fn rows(from: i32, to: i32) -> String {
    format!("INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series({from}, {to}) g")
}

/// Rows of t on `node` in `from..=to`.
fn count(mesh: &Mesh, node: &str, from: i32, to: i32) -> String {
    mesh.node(node).safe_psql(&format!(
        "SELECT count(*) FROM t WHERE id BETWEEN {from} AND {to}"
    ))
}

/// How many transactions a's walsender for b streamed.
fn streamed_by_a(mesh: &Mesh) -> i64 {
    mesh.node("a")
        .safe_psql(
            "SELECT coalesce(sum(stream_txns), 0) FROM pg_stat_replication_slots
              WHERE slot_name LIKE 'bdr_%'",
        )
        .parse()
        .unwrap()
}

#[test]
fn a_large_transaction_is_applied_while_it_streams() {
    let mut mesh = mesh();
    let mut writer = mesh.node("a").connect();
    writer.batch_execute("BEGIN").unwrap();
    writer.batch_execute(&rows(1, 5000)).unwrap();
    // Applied on b while still in progress on a, and not visible there.
    mesh.applier("b").wait_for_log(DIRECT);
    assert_eq!(count(&mesh, "b", 1, 5000), "0");
    writer.batch_execute(&rows(5001, 10_000)).unwrap();
    writer.batch_execute("COMMIT").unwrap();
    // Aborted: nothing of it arrives.
    writer.batch_execute("BEGIN").unwrap();
    writer.batch_execute(&rows(20_001, 25_000)).unwrap();
    writer.batch_execute("ROLLBACK").unwrap();
    mesh.node("a").safe_psql(&rows(30_001, 30_001));
    mesh.wait_for_catchup();

    assert_eq!(mesh.assert_same("SELECT count(*) FROM t"), "10001");
    mesh.assert_same("SELECT sum(id), sum(length(v)) FROM t");
    assert_eq!(count(&mesh, "b", 20_001, 25_000), "0");
    let log = mesh.applier("b").log();
    assert!(log.contains(COMMITTED_DIRECT), "{log}");
    assert!(!log.contains(FROM_SPOOL), "{log}");
    assert!(log.contains("streamed transaction aborted"), "{log}");
    assert!(streamed_by_a(&mesh) >= 2, "a streamed both transactions");
    // Its origin's progress moved with it: b's rows are not sent back.
    assert_eq!(
        mesh.node("b")
            .safe_psql("SELECT count(*) FROM bdr.conflict_history"),
        "0"
    );
}

#[test]
fn streamed_transactions_with_others_in_between_are_applied_at_their_commit() {
    let mut mesh = mesh();
    let a_dsn = mesh.node("a").connstr();
    let mut writer = mesh.node("a").connect();
    writer.batch_execute("BEGIN").unwrap();
    writer.batch_execute(&rows(1, 5000)).unwrap();
    mesh.applier("b").wait_for_log(DIRECT);
    // Whole transactions commit in between, then another large one
    // streams and aborts.
    for i in 0..3 {
        mesh.node("a").safe_psql(&rows(900_001 + i, 900_001 + i));
    }
    let mut other = postgres::Client::connect(&a_dsn, postgres::NoTls).unwrap();
    other.batch_execute("BEGIN").unwrap();
    other.batch_execute(&rows(200_001, 205_000)).unwrap();
    other.batch_execute("ROLLBACK").unwrap();
    // A subtransaction of the first one rolls back after it streamed.
    writer
        .batch_execute(&format!(
            "SAVEPOINT s; {}; ROLLBACK TO SAVEPOINT s; {}",
            rows(100_001, 103_000),
            rows(5001, 6000)
        ))
        .unwrap();
    mesh.wait_for_catchup();
    assert_eq!(count(&mesh, "b", 900_001, 900_003), "3");
    assert_eq!(
        count(&mesh, "b", 1, 6000),
        "0",
        "not visible before its commit"
    );
    writer.batch_execute("COMMIT").unwrap();
    mesh.wait_for_catchup();

    assert_eq!(mesh.assert_same("SELECT count(*) FROM t"), "6003");
    mesh.assert_same("SELECT sum(id), sum(length(v)) FROM t");
    assert_eq!(count(&mesh, "b", 100_001, 205_000), "0");
    let log = mesh.applier("b").log();
    assert!(log.contains(FROM_SPOOL), "{log}");
    assert!(!log.contains(COMMITTED_DIRECT), "{log}");
}

#[test]
fn an_applier_killed_while_a_transaction_streams_applies_it_once() {
    let mut mesh = mesh();
    let mut writer = mesh.node("a").connect();
    writer.batch_execute("BEGIN").unwrap();
    writer.batch_execute(&rows(1, 5000)).unwrap();
    mesh.applier("b").wait_for_log(DIRECT);
    mesh.applier("b").kill9();
    writer.batch_execute(&rows(5001, 10_000)).unwrap();
    mesh.applier("b").restart_with_env(&[("RUST_LOG", LOG)]);
    writer.batch_execute("COMMIT").unwrap();
    mesh.wait_for_catchup();

    assert_eq!(mesh.assert_same("SELECT count(*) FROM t"), "10000");
    mesh.assert_same("SELECT sum(id), sum(length(v)) FROM t");
    assert_eq!(
        mesh.node("b")
            .safe_psql("SELECT count(*) FROM bdr.conflict_history"),
        "0",
        "nothing was applied twice"
    );
}

#[test]
fn a_conflict_in_a_streamed_transaction_is_resolved_at_its_commit() {
    let mut mesh = mesh();
    // b writes row 42 while a does not hear from b.
    mesh.applier("a").stop();
    mesh.node("b")
        .safe_psql("INSERT INTO t VALUES (42, 'written on b')");
    let mut writer = mesh.node("a").connect();
    writer.batch_execute("BEGIN").unwrap();
    writer.batch_execute(&rows(1, 5000)).unwrap();
    mesh.applier("b").wait_for_log(DIRECT);
    writer.batch_execute("COMMIT").unwrap();
    mesh.applier("a").restart();
    mesh.wait_for_catchup();

    assert_eq!(mesh.assert_same("SELECT count(*) FROM t"), "5000");
    // Both nodes keep the later write: a's transaction.
    assert_eq!(
        mesh.assert_same("SELECT v FROM t WHERE id = 42"),
        "x".repeat(100)
    );
    mesh.assert_same("SELECT sum(id), sum(length(v)) FROM t");
    let log = mesh.applier("b").log();
    assert!(log.contains(FROM_SPOOL), "{log}");
    assert_eq!(
        mesh.node("b")
            .safe_psql("SELECT count(*) FROM bdr.conflict_history"),
        "1"
    );
}
