//! Pipelined apply has the outcome of applying one statement at a time.
//!
//! Node a writes; b (pipelined, the default) and c (one statement at a
//! time) stream from a only. Both start from the same local rows, some of
//! which conflict with a's changes: inside runs of INSERTs, before and
//! after UPDATEs and DELETEs of the same rows, on a secondary unique key,
//! and after the savepoint of a large transaction. Afterwards b and c
//! must hold the same rows and the same conflict history.

use bdr_tests::{ApplierProcess, Node, applier_command};

const SCHEMA: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text);
CREATE TABLE u (id int PRIMARY KEY, email text UNIQUE, v text);
CREATE TABLE w (id int PRIMARY KEY, v text);";

/// The local rows b and c hold before a's changes arrive.
const LOCAL: &str = "
INSERT INTO t SELECT g, 'local' FROM generate_series(1000, 1010) g;
INSERT INTO t VALUES (7000, 'local'), (30500, 'local');
INSERT INTO u VALUES (1, 'x@example.org', 'local');";

fn node(name: &str) -> Node {
    let mut n = Node::init(name);
    n.start();
    n.safe_psql("CREATE EXTENSION bdr");
    n.safe_psql(SCHEMA);
    applier_command(&n, &["init"]);
    n
}

#[test]
fn pipelined_apply_matches_one_statement_at_a_time() {
    let a = node("a");
    let b = node("b");
    let c = node("c");
    for n in [&b, &c] {
        n.safe_psql(LOCAL);
        applier_command(n, &["add-peer", "a", &a.connstr()]);
    }
    // b keeps few messages per restart point, so large transactions
    // pass savepoints; both log their replays.
    let mut pipelined = ApplierProcess::start(&b);
    pipelined.stop();
    pipelined.restart_with_env(&[
        ("BDR_APPLY_CHUNK_BYTES", "20000"),
        ("RUST_LOG", "info,bdr_applier=debug"),
    ]);
    let mut serial = ApplierProcess::start(&c);
    serial.stop();
    serial.restart_with_env(&[("BDR_APPLY_PIPELINE", "off")]);
    // Their slots exist once they stream: a's changes from here on reach
    // both.
    a.poll_query_until(
        "SELECT count(DISTINCT application_name) FROM pg_stat_replication
          WHERE state = 'streaming'",
        "2",
    );

    // A run of INSERTs with conflicting rows in its middle.
    a.safe_psql("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 2000) g");
    // Changes to rows that conflicted earlier in the same transaction,
    // a secondary key conflict, a TRUNCATE between INSERT runs.
    a.safe_psql(
        "BEGIN;
         INSERT INTO w VALUES (1, 'a');
         TRUNCATE w;
         INSERT INTO t VALUES (5000, 'a');
         INSERT INTO t VALUES (7000, 'a');
         UPDATE t SET v = 'a2' WHERE id = 1005;
         DELETE FROM t WHERE id = 1006;
         INSERT INTO u VALUES (2, 'x@example.org', 'a');
         UPDATE t SET v = 'a3' WHERE id BETWEEN 1 AND 100;
         INSERT INTO w SELECT g, 'a' FROM generate_series(1, 10) g;
         COMMIT",
    );
    // Small transactions, one of them conflicting.
    for i in 0..20 {
        a.safe_psql(&format!(
            "UPDATE t SET v = 'small {i}' WHERE id = {};
             INSERT INTO w VALUES ({}, 'small')",
            1000 + i % 12,
            100 + i
        ));
    }
    // A large transaction: its conflict comes after several savepoints.
    a.safe_psql(
        "BEGIN;
         INSERT INTO t SELECT g, 'big' FROM generate_series(20000, 31000) g;
         UPDATE t SET v = 'big2' WHERE id BETWEEN 30400 AND 30600;
         DELETE FROM t WHERE id BETWEEN 20000 AND 20100;
         COMMIT",
    );
    a.safe_psql("UPDATE t SET v = 'last' WHERE id = 30500");
    a.wait_until_applied_by("b");
    a.wait_until_applied_by("c");

    let rows = "SELECT count(*), md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM t";
    assert_eq!(
        b.safe_psql(rows),
        c.safe_psql(rows),
        "b:\n{}\nc:\n{}",
        pipelined.log(),
        serial.log()
    );
    for table in ["u", "w"] {
        let q = format!("SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM {table}");
        assert_eq!(b.safe_psql(&q), c.safe_psql(&q), "table {table}");
    }
    let history = "SELECT string_agg(concat_ws('|', conflict_type, resolution, relation, key,
                                                local_row, remote_row), E'\\n' ORDER BY id)
                     FROM bdr.conflict_history";
    let recorded = b.safe_psql(history);
    assert_eq!(recorded, c.safe_psql(history));
    assert!(
        recorded.lines().count() >= 14,
        "expected the forced conflicts:\n{recorded}"
    );
    assert_eq!(
        b.safe_psql("SELECT v FROM t WHERE id IN (1005, 7000, 30500) ORDER BY id"),
        "small 17\na\nlast"
    );
    let log = pipelined.log();
    assert!(
        log.contains("applying again one statement at a time"),
        "b never replayed:\n{log}"
    );
    // The statements doomed by a failed one do not each log an error.
    let server_log = std::fs::read_to_string(b.log_file()).expect("b's server log");
    assert!(
        !server_log.contains("current transaction is aborted"),
        "{server_log}"
    );
    pipelined.stop();
    serial.stop();
}
