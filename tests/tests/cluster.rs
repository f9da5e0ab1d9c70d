//! The harness itself and the first real-cluster checks: nodes start with
//! the bdr library preloaded, the extension installs, and a slot using the
//! bdr output plugin decodes changes.

use std::time::Duration;

use bdr_tests::Node;

fn started(name: &str) -> Node {
    let mut node = Node::init(name);
    node.start();
    node
}

#[test]
fn three_nodes_preload_bdr_and_create_the_extension() {
    let nodes: Vec<Node> = ["a", "b", "c"].into_iter().map(started).collect();
    let mut ports: Vec<u16> = nodes.iter().map(Node::port).collect();
    ports.dedup();
    assert_eq!(ports.len(), 3, "every node has its own port");
    for node in &nodes {
        assert_eq!(node.safe_psql("SHOW shared_preload_libraries"), "bdr");
        assert_eq!(node.safe_psql("SHOW wal_level"), "logical");
        assert_eq!(node.safe_psql("SHOW track_commit_timestamp"), "on");
        node.safe_psql("CREATE EXTENSION bdr");
        assert_eq!(
            node.safe_psql("SELECT extversion FROM pg_extension WHERE extname = 'bdr'"),
            "0.1.0"
        );
        assert_eq!(node.safe_psql("SELECT bdr.bdr_version()"), "0.1.0");
        // The server runs as an unprivileged user, never as root.
        let pid = node.postmaster_pid().expect("running postmaster");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .expect("Uid line");
        assert_ne!(
            uid.split_whitespace().next(),
            Some("0"),
            "postmaster runs as root"
        );
    }
}

#[test]
fn bdr_slot_decodes_committed_changes() {
    let node = started("decode");
    node.safe_psql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    node.safe_psql("SELECT pg_create_logical_replication_slot('s', 'bdr')");
    node.safe_psql("INSERT INTO t VALUES (1, 'one'), (2, 'two')");
    node.safe_psql("UPDATE t SET v = 'uno' WHERE id = 1");
    node.safe_psql("DELETE FROM t WHERE id = 2");
    node.safe_psql("BEGIN; INSERT INTO t VALUES (3, 'rolled back'); ROLLBACK");

    // Without options (an operator peeking by hand) the plugin uses
    // inspection defaults. Each transaction is one row: STARTUP opens the
    // stream; three committed transactions, RELATION before the table's
    // first change; the rolled-back insert is never decoded.
    let peek = "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL)";
    let mut client = node.connect();
    let frames: Vec<Vec<u8>> = client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL)",
            &[],
        )
        .expect("peeking the slot")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let tags: Vec<String> = frames
        .iter()
        .map(|f| {
            bdr_protocol::Messages::new(f)
                .map(|m| m.unwrap_or_else(|e| panic!("frame {f:?}: {e}")).tag() as char)
                .collect()
        })
        .collect();
    assert_eq!(tags.join("|"), "SBRIIC|BUC|BDC");
    // Peeking does not consume; getting does.
    assert_eq!(node.safe_psql(peek), "3");
    node.safe_psql("SELECT count(*) FROM pg_logical_slot_get_binary_changes('s', NULL, NULL)");
    assert_eq!(node.safe_psql(peek), "0");
}

#[test]
fn unlisted_plugins_are_still_refused_and_bdr_is_allowed() {
    let node = started("plugins");
    let allowed =
        node.safe_psql("SELECT setting FROM pg_settings WHERE name = 'output_plugin_libraries'");
    if !allowed.is_empty() {
        assert!(
            allowed.contains("bdr"),
            "output_plugin_libraries = {allowed}"
        );
    }
    let err = node
        .psql("SELECT pg_create_logical_replication_slot('x', 'no_such_plugin')")
        .expect_err("an unknown plugin cannot decode");
    assert!(
        err.contains("no_such_plugin"),
        "error names the plugin: {err}"
    );
}

#[test]
fn survives_kill9_and_restarts() {
    let mut node = started("crash");
    node.safe_psql("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)");
    let old = node.postmaster_pid().expect("running postmaster");
    node.kill9();
    assert!(
        node.psql("SELECT 1").is_err(),
        "the server is down after kill9"
    );
    let from = node.log_position();
    node.start();
    node.wait_for_log("database system is ready to accept connections", from);
    assert!(
        node.read_log_since(from)
            .contains("was not properly shut down"),
        "the restart ran crash recovery"
    );
    assert_ne!(node.postmaster_pid(), Some(old));
    assert_eq!(node.safe_psql("SELECT count(*) FROM t"), "100");
    node.stop_immediate();
    node.start();
    node.restart();
    assert_eq!(node.safe_psql("SELECT count(*) FROM t"), "100");
}

#[test]
fn poll_timeout_reports_what_it_last_saw() {
    let node = started("poll");
    let failure = std::panic::catch_unwind(|| {
        node.poll_query_until_within("SELECT 41", "42", Duration::from_millis(300));
    })
    .expect_err("polling for a value that never comes times out");
    let message = failure
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(message.contains("timed out"), "{message}");
    assert!(
        message.contains("Ok(\"41\")"),
        "shows the last result: {message}"
    );
    node.poll_query_until("SELECT 6 * 7", "42");
}

#[test]
fn xact_origin_is_the_commit_timestamp_origin() {
    let node = started("xorigin");
    node.safe_psql("CREATE EXTENSION bdr");
    node.safe_psql("CREATE TABLE o (id int PRIMARY KEY)");
    node.safe_psql("INSERT INTO o VALUES (1)");
    node.safe_psql("SELECT pg_replication_origin_create('bdr_00000000000000aa')");
    node.safe_psql(
        "SELECT pg_replication_origin_session_setup('bdr_00000000000000aa');
         INSERT INTO o VALUES (2)",
    );
    assert_eq!(
        node.safe_psql(
            "SELECT string_agg(concat_ws(':', id, bdr.xact_origin(xmin),
                                         (pg_xact_commit_timestamp_origin(xmin)).roident), ','
                               ORDER BY id) FROM o"
        ),
        "1:0:0,2:1:1"
    );
    // Unknown: a frozen xid, and the current transaction's own.
    assert_eq!(
        node.safe_psql(
            "SELECT bdr.xact_origin('2'::xid) IS NULL,
                    bdr.xact_origin(pg_current_xact_id()::text::xid) IS NULL"
        ),
        "t|t"
    );
}

#[test]
fn the_writer_cache_holds_transactions_committed_through_an_origin() {
    let mut node = started("wcache");
    node.safe_psql("CREATE EXTENSION bdr");
    assert_eq!(
        node.safe_psql(
            "SELECT current_setting('bdr.writer_cache_size'), size FROM pg_shmem_allocations \
              WHERE name = 'bdr writer cache'"
        ),
        "1048576|8388608"
    );
    node.safe_psql("CREATE TABLE w (id int PRIMARY KEY, v int)");
    node.safe_psql("SELECT pg_replication_origin_create('bdr_00000000000000aa')");
    let through_origin = |node: &Node, sql: &str| {
        node.safe_psql(&format!(
            "SELECT pg_replication_origin_session_setup('bdr_00000000000000aa'); {sql}"
        ))
    };
    node.safe_psql("INSERT INTO w VALUES (1, 0)");
    through_origin(&node, "INSERT INTO w VALUES (2, 0)");
    // Rolled back: the row is gone, and so is its transaction.
    through_origin(&node, "BEGIN; INSERT INTO w VALUES (3, 0); ROLLBACK");
    // Row 4 is written by the transaction's subtransaction, whose id the
    // cache does not hold (the commit timestamp data has it).
    through_origin(
        &node,
        "BEGIN; INSERT INTO w VALUES (5, 0); SAVEPOINT s; INSERT INTO w VALUES (4, 0); COMMIT",
    );
    // format() writes NULL as nothing.
    let origins = "SELECT string_agg(format('%s:%s:%s', id, bdr.writer_cache_origin(xmin), \
                                            bdr.xact_origin(xmin)), ',' ORDER BY id) FROM w";
    assert_eq!(node.safe_psql(origins), "1::0,2:1:1,4::1,5:1:1");
    // The cache lives in shared memory: empty after a restart, where the
    // commit timestamp data still answers.
    node.restart();
    assert_eq!(node.safe_psql(origins), "1::0,2::1,4::1,5::1");
    // Off: no shared memory, nothing held.
    node.append_conf("bdr.writer_cache_size = 0");
    node.restart();
    through_origin(&node, "UPDATE w SET v = 1 WHERE id = 2");
    assert_eq!(node.safe_psql(origins), "1::0,2::1,4::1,5::1");
    assert_eq!(
        node.safe_psql("SELECT count(*) FROM pg_shmem_allocations WHERE name = 'bdr writer cache'"),
        "0"
    );
}

#[test]
fn apply_require_row_fails_client_changes_that_touch_no_row() {
    use postgres::error::SqlState;
    let node = started("guard");
    node.safe_psql("CREATE TABLE g (id int PRIMARY KEY, v text); INSERT INTO g VALUES (1, 'x')");
    let mut c = node.connect();
    // Off by default.
    assert_eq!(
        c.execute("UPDATE g SET v = 'y' WHERE id = 2", &[]).unwrap(),
        0
    );
    c.batch_execute("SET bdr.apply_require_row = on").unwrap();
    assert_eq!(
        c.execute("UPDATE g SET v = 'y' WHERE id = 1", &[]).unwrap(),
        1
    );
    // Bind/Execute, as the applier sends them, and a simple query.
    for sql in [
        "UPDATE g SET v = 'y' WHERE id = 2",
        "DELETE FROM g WHERE id = 2",
    ] {
        let e = c.execute(sql, &[]).unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::NO_DATA_FOUND), "{sql}: {e}");
        let e = c.batch_execute(sql).unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::NO_DATA_FOUND), "{sql}: {e}");
    }
    // INSERTs, and statements run by functions, are not checked.
    c.batch_execute("INSERT INTO g SELECT 3, 'z' WHERE false")
        .unwrap();
    c.batch_execute("DO $$ BEGIN UPDATE g SET v = 'w' WHERE id = 2; END $$")
        .unwrap();
    assert_eq!(
        node.safe_psql("SELECT string_agg(id || v, ',') FROM g"),
        "1y"
    );
    // Only a superuser sets it.
    c.batch_execute("RESET bdr.apply_require_row; CREATE ROLE plain; SET ROLE plain")
        .unwrap();
    let e = c
        .batch_execute("SET bdr.apply_require_row = on")
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
}

#[test]
fn apply_check_progress_raises_unless_the_origin_is_there() {
    use postgres::error::SqlState;
    let node = started("check");
    node.safe_psql("CREATE EXTENSION bdr");
    node.safe_psql("CREATE TABLE c (id int PRIMARY KEY)");
    node.safe_psql("SELECT pg_replication_origin_create('bdr_00000000000000cc')");
    let mut c = node.connect();
    let check = |c: &mut postgres::Client, lsn: &str| {
        c.batch_execute(&format!("SELECT bdr.apply_check_progress('{lsn}')"))
    };
    // Bound the applier's way: no origin yet.
    let e = c
        .execute(
            "SELECT bdr.apply_check_progress($1::text::pg_lsn)",
            &[&"0/0"],
        )
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
        "{e}"
    );
    let message = e.as_db_error().map(|d| d.message().to_owned());
    assert!(
        message
            .as_deref()
            .unwrap_or("")
            .contains("no replication origin"),
        "{message:?}"
    );
    c.batch_execute("SELECT pg_replication_origin_session_setup('bdr_00000000000000cc')")
        .unwrap();
    check(&mut c, "0/0").unwrap();
    c.batch_execute(
        "BEGIN;
         SELECT pg_replication_origin_xact_setup('1/A0', now());
         INSERT INTO c VALUES (1);
         COMMIT",
    )
    .unwrap();
    check(&mut c, "1/A0").unwrap();
    let e = check(&mut c, "1/9F").unwrap_err();
    assert_eq!(
        e.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
        "{e}"
    );
    assert_eq!(
        e.as_db_error().map(|d| d.message()),
        Some("the replication origin of this session is at 1/A0, not at 1/9F")
    );
}
