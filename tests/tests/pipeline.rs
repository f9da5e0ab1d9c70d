//! Batched and pipelined apply have the outcome of applying one statement
//! at a time.
//!
//! Node a writes; b (batched and pipelined, the default), e (batched on
//! two sessions side by side, parallel apply), d (pipelined only) and c
//! (one statement at a time) stream from a only. All start from the same
//! local rows, some of which conflict with a's changes: inside runs of
//! INSERTs, before and after UPDATEs and DELETEs of the same rows, on a
//! secondary unique key, and after the savepoint of a large transaction.
//! b and e are stopped while a writes, so they meet the changes as a
//! backlog: batches of many transactions, with conflicts in their middle.
//! Afterwards b, c, d and e must hold the same rows and the same conflict
//! history.

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
fn batched_and_pipelined_apply_match_one_statement_at_a_time() {
    let a = node("a");
    let b = node("b");
    let c = node("c");
    let d = node("d");
    let e = node("e");
    for n in [&b, &c, &d, &e] {
        n.safe_psql(LOCAL);
        applier_command(n, &["add-peer", "a", &a.connstr()]);
    }
    // b and d keep few messages per restart point, so large transactions
    // pass savepoints (and leave b's batches); they log their replays.
    let small_chunks = ("BDR_APPLY_CHUNK_BYTES", "20000");
    let debug = ("RUST_LOG", "info,bdr_applier=debug");
    let mut batched = ApplierProcess::start(&b);
    let mut serial = ApplierProcess::start(&c);
    serial.stop();
    serial.restart_with_env(&[("BDR_APPLY_PIPELINE", "off")]);
    let mut pipelined = ApplierProcess::start(&d);
    pipelined.stop();
    pipelined.restart_with_env(&[small_chunks, debug, ("BDR_APPLY_BATCH", "off")]);
    let parallel_env = [small_chunks, debug, ("BDR_PARALLEL_APPLY", "on")];
    let mut parallel = ApplierProcess::start(&e);
    // Their slots exist once they stream: a's changes from here on reach
    // all four.
    a.poll_query_until(
        "SELECT count(DISTINCT application_name) FROM pg_stat_replication
          WHERE state = 'streaming'",
        "4",
    );
    batched.stop();
    parallel.stop();

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
    batched.restart_with_env(&[small_chunks, debug]);
    parallel.restart_with_env(&parallel_env);
    for n in ["b", "c", "d", "e"] {
        a.wait_until_applied_by(n);
    }

    let rows = "SELECT count(*), md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM t";
    let history = "SELECT string_agg(concat_ws('|', conflict_type, resolution, relation, key,
                                                local_row, remote_row), E'\\n' ORDER BY id)
                     FROM bdr.conflict_history";
    let recorded = c.safe_psql(history);
    for (n, applier) in [(&b, &batched), (&d, &pipelined), (&e, &parallel)] {
        assert_eq!(
            n.safe_psql(rows),
            c.safe_psql(rows),
            "{}:\n{}\nc:\n{}",
            n.name(),
            applier.log(),
            serial.log()
        );
        for table in ["u", "w"] {
            let q = format!("SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM {table}");
            assert_eq!(n.safe_psql(&q), c.safe_psql(&q), "table {table}");
        }
        assert_eq!(n.safe_psql(history), recorded, "history of {}", n.name());
        // The statements doomed by a failed one do not each log an error,
        // nor each batched COMMIT the warning that no block is open.
        let server_log = std::fs::read_to_string(n.log_file()).expect("server log");
        for noise in [
            "current transaction is aborted",
            "there is no transaction in progress",
        ] {
            assert!(!server_log.contains(noise), "{server_log}");
        }
    }
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
        "d never replayed:\n{log}"
    );
    // b met conflicts in the middle of batches and applied them again, and
    // handed the large transactions over to pipelined apply.
    let log = batched.log();
    assert!(
        log.contains("batch failed: applying again one statement at a time"),
        "b never applied a batch again:\n{log}"
    );
    assert!(
        log.contains("handing the transaction over"),
        "b never handed a transaction over:\n{log}"
    );
    // There the server applied the changes of tables that suit it.
    assert!(
        log.contains("pipelined changes go to bdr.apply_changes"),
        "b pipelined only statements:\n{log}"
    );
    // e dealt transactions to its second session, which has an origin
    // of its own, and applied failed batches again the same way.
    let log = parallel.log();
    assert!(
        log.contains("batch failed: applying again one statement at a time"),
        "e never applied a batch again:\n{log}"
    );
    assert_eq!(
        e.safe_psql(
            "SELECT count(*) FROM pg_replication_origin_status
              WHERE external_id LIKE 'bdr\\_%\\_1' AND remote_lsn > '0/0'"
        ),
        "1",
        "{log}"
    );
    for applier in [&mut batched, &mut pipelined, &mut serial, &mut parallel] {
        applier.stop();
    }
}
