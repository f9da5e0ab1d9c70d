//! Conflicts, one pair per test: the same row written on two nodes before
//! either saw the other's change. The conflict is forced by stopping
//! node b's applier while both nodes write (a first, so b's commit is the
//! later one), then restarting it. Each test checks the converged data on
//! every node and the history rows of the nodes that met the conflict.

use bdr_tests::{Mesh, Node};

const SCHEMA: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text);
CREATE TABLE u (id int PRIMARY KEY, email text UNIQUE, v text);
CREATE TABLE m (id int PRIMARY KEY, v text, n int);
CREATE FUNCTION merge_m(kind bdr.conflict_type, l jsonb, r jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE
    AS $$ SELECT jsonb_build_object('id', l -> 'id', 'v', least(l ->> 'v', r ->> 'v'),
                                    'n', greatest((l ->> 'n')::int, (r ->> 'n')::int)) $$;
CREATE TABLE k (id int PRIMARY KEY, big text, n int);
CREATE FUNCTION remote_k(kind bdr.conflict_type, l jsonb, r jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE AS $$ SELECT r $$;";

/// The conflicts node `n` recorded: `type|resolution` per line, in order.
fn history(n: &Node) -> String {
    n.safe_psql("SELECT conflict_type || '|' || resolution FROM bdr.conflict_history ORDER BY id")
}

/// A two-node mesh where `seed` was written on a and reached b.
fn pair(seed: &str) -> Mesh {
    let mesh = Mesh::new(&["a", "b"], SCHEMA);
    if !seed.is_empty() {
        mesh.node("a").safe_psql(seed);
        mesh.wait_for_catchup();
    }
    mesh
}

/// Runs `on_a` on a, then `on_b` on b, while b applies nothing; then lets
/// b catch up and waits for both directions.
fn concurrently(mesh: &mut Mesh, on_a: &str, on_b: &str) {
    mesh.applier("b").stop();
    mesh.node("a").safe_psql(on_a);
    mesh.node("b").safe_psql(on_b);
    mesh.applier("b").restart();
    mesh.wait_for_catchup();
}

#[test]
fn insert_insert_later_commit_wins_on_both_nodes() {
    let mut mesh = pair("");
    concurrently(
        &mut mesh,
        "INSERT INTO t VALUES (1, 'a')",
        "INSERT INTO t VALUES (1, 'b')",
    );
    assert_eq!(mesh.assert_same("SELECT id, v FROM t"), "1|b");
    assert_eq!(history(mesh.node("a")), "insert_exists|apply_remote");
    assert_eq!(history(mesh.node("b")), "insert_exists|keep_local");
    // The history row carries both versions and who wrote them.
    let a = mesh.node("a");
    assert_eq!(
        a.safe_psql(
            "SELECT relation, key, local_row ->> 'v', remote_row ->> 'v',
                    local_origin = bdr.local_node_id(),
                    local_commit_time < remote_commit_time,
                    remote_node_id = (SELECT node_id FROM bdr.nodes WHERE node_name = 'b')
               FROM bdr.conflict_history"
        ),
        "public.t|{\"id\": 1}|a|b|t|t|t"
    );
    assert_eq!(
        a.safe_psql(
            "SELECT remote_node_name, relation, conflict_type, conflicts FROM bdr.conflict_stats"
        ),
        "b|public.t|insert_exists|1"
    );
}

#[test]
fn update_update_later_commit_wins_on_both_nodes() {
    let mut mesh = pair("INSERT INTO t VALUES (1, 'seed')");
    concurrently(
        &mut mesh,
        "UPDATE t SET v = 'a' WHERE id = 1",
        "UPDATE t SET v = 'b' WHERE id = 1",
    );
    assert_eq!(mesh.assert_same("SELECT id, v FROM t"), "1|b");
    assert_eq!(
        history(mesh.node("a")),
        "update_origin_differs|apply_remote"
    );
    assert_eq!(history(mesh.node("b")), "update_origin_differs|keep_local");
}

#[test]
fn update_delete_the_row_stays_deleted() {
    let mut mesh = pair("INSERT INTO t VALUES (1, 'seed'), (2, 'seed')");
    // The update is the later commit, and still the delete wins.
    concurrently(
        &mut mesh,
        "DELETE FROM t WHERE id = 1",
        "UPDATE t SET v = 'b' WHERE id = 1",
    );
    assert_eq!(mesh.assert_same("SELECT id, v FROM t"), "2|seed");
    assert_eq!(history(mesh.node("a")), "update_missing|skip");
    assert_eq!(
        history(mesh.node("b")),
        "delete_origin_differs|apply_remote"
    );
}

#[test]
fn delete_delete_is_recorded_and_skipped() {
    let mut mesh = pair("INSERT INTO t VALUES (1, 'seed'), (2, 'seed')");
    concurrently(
        &mut mesh,
        "DELETE FROM t WHERE id = 1",
        "DELETE FROM t WHERE id = 1",
    );
    assert_eq!(mesh.assert_same("SELECT id, v FROM t"), "2|seed");
    assert_eq!(history(mesh.node("a")), "delete_missing|skip");
    assert_eq!(history(mesh.node("b")), "delete_missing|skip");
}

#[test]
fn secondary_unique_key_the_older_row_is_removed_everywhere() {
    let mut mesh = pair("");
    concurrently(
        &mut mesh,
        "INSERT INTO u VALUES (1, 'x@example.org', 'a')",
        "INSERT INTO u VALUES (2, 'x@example.org', 'b')",
    );
    assert_eq!(
        mesh.assert_same("SELECT id, email, v FROM u"),
        "2|x@example.org|b"
    );
    assert_eq!(history(mesh.node("a")), "insert_exists|apply_remote");
    assert_eq!(history(mesh.node("b")), "insert_exists|keep_local");
    assert_eq!(
        mesh.node("a")
            .safe_psql("SELECT detail FROM bdr.conflict_history"),
        "unique index u_email_key"
    );
}

#[test]
fn update_exists_the_losing_row_is_removed_everywhere() {
    let mut mesh = pair("INSERT INTO u VALUES (1, 'x@example.org', 'seed')");
    concurrently(
        &mut mesh,
        "UPDATE u SET email = 'z@example.org' WHERE id = 1",
        "INSERT INTO u VALUES (2, 'z@example.org', 'b')",
    );
    assert_eq!(
        mesh.assert_same("SELECT id, email, v FROM u ORDER BY id"),
        "2|z@example.org|b"
    );
    assert_eq!(history(mesh.node("a")), "insert_exists|apply_remote");
    assert_eq!(history(mesh.node("b")), "update_exists|keep_local");
}

#[test]
fn multiple_unique_conflicts_resolve_against_every_row() {
    let mut mesh = pair("");
    // Neither node applies while b writes two rows, then a writes one
    // that holds the key of the first and the email of the second.
    mesh.applier("a").stop();
    mesh.applier("b").stop();
    mesh.node("b")
        .safe_psql("INSERT INTO u VALUES (1, 'x@example.org', 'b1'), (2, 'y@example.org', 'b2')");
    mesh.node("a")
        .safe_psql("INSERT INTO u VALUES (1, 'y@example.org', 'a')");
    mesh.applier("a").restart();
    mesh.applier("b").restart();
    mesh.wait_for_catchup();
    // a's row is the latest: on b it replaces both rows, on a it stays.
    assert_eq!(
        mesh.assert_same("SELECT id, email, v FROM u ORDER BY id"),
        "1|y@example.org|a"
    );
    assert_eq!(
        history(mesh.node("a")),
        "insert_exists|keep_local\ninsert_exists|keep_local"
    );
    assert_eq!(
        history(mesh.node("b")),
        "multiple_unique_conflicts|apply_remote"
    );
}

/// Writes `rows` on `node` as if a transaction of origin `origin` had
/// committed them at `time` (the way the applier applies a remote
/// transaction).
fn write_as_origin(node: &Node, origin: &str, time: &str, rows: &str) {
    let mut client = node.connect();
    client
        .batch_execute(&format!(
            "SELECT pg_replication_origin_create('{origin}')
              WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = '{origin}');
             SELECT pg_replication_origin_session_setup('{origin}');
             BEGIN;
             SELECT pg_replication_origin_xact_setup('0/1', '{time}');
             INSERT INTO t VALUES {rows};
             COMMIT;
             SELECT pg_replication_origin_session_reset();"
        ))
        .expect("writing through a replication origin");
}

#[test]
fn equal_commit_times_break_on_node_id_the_same_way_on_every_node() {
    let mut mesh = Mesh::new(&["a", "b", "c"], SCHEMA);
    mesh.applier("a").stop();
    mesh.applier("b").stop();
    let c = mesh.node("c");
    c.safe_psql("INSERT INTO t VALUES (1, 'c'), (2, 'c')");
    let time = c.safe_psql("SELECT pg_xact_commit_timestamp(xmin) FROM t WHERE id = 1");
    // On a and b, rows with the same keys last written at the very same
    // time by the highest and the lowest possible node id.
    for name in ["a", "b"] {
        let n = mesh.node(name);
        write_as_origin(n, "bdr_7fffffffffffffff", &time, "(1, 'highest id')");
        write_as_origin(n, "bdr_8000000000000000", &time, "(2, 'lowest id')");
    }
    mesh.applier("a").restart();
    mesh.applier("b").restart();
    mesh.wait_for_catchup();
    for name in ["a", "b"] {
        let n = mesh.node(name);
        assert_eq!(
            n.safe_psql("SELECT id, v FROM t ORDER BY id"),
            "1|highest id\n2|c",
            "node {name}"
        );
        assert_eq!(
            n.safe_psql(
                "SELECT key ->> 'id', resolution, local_commit_time = remote_commit_time,
                        to_hex(local_origin)
                   FROM bdr.conflict_history ORDER BY key ->> 'id'"
            ),
            "1|keep_local|t|7fffffffffffffff\n2|apply_remote|t|8000000000000000",
            "node {name}"
        );
    }
}

#[test]
fn first_update_wins_keeps_the_earlier_row() {
    let mut mesh = pair("");
    for n in &mesh.nodes {
        n.safe_psql("SELECT bdr.set_conflict_resolver('public.t', 'first_update_wins')");
    }
    concurrently(
        &mut mesh,
        "INSERT INTO t VALUES (1, 'a')",
        "INSERT INTO t VALUES (1, 'b')",
    );
    assert_eq!(mesh.assert_same("SELECT id, v FROM t"), "1|a");
    assert_eq!(history(mesh.node("a")), "insert_exists|keep_local");
    assert_eq!(history(mesh.node("b")), "insert_exists|apply_remote");
}

#[test]
fn history_can_be_turned_off_and_conflicts_are_still_logged() {
    let mut mesh = pair("");
    mesh.node("a")
        .safe_psql("SELECT bdr.set_conflict_history(false)");
    concurrently(
        &mut mesh,
        "INSERT INTO t VALUES (1, 'a')",
        "INSERT INTO t VALUES (1, 'b')",
    );
    assert_eq!(mesh.assert_same("SELECT id, v FROM t"), "1|b");
    assert_eq!(history(mesh.node("a")), "");
    assert_eq!(history(mesh.node("b")), "insert_exists|keep_local");
    mesh.applier("a").wait_for_log(
        "conflict type=insert_exists relation=public.t resolution=apply_remote \
         resolver=last_update_wins peer=b",
    );
    assert!(!mesh.applier("a").log().contains("'b'"));
}

#[test]
fn error_resolver_stops_the_peer_until_an_operator_acts() {
    let mut mesh = pair("");
    for n in &mesh.nodes {
        n.safe_psql("SELECT bdr.set_conflict_resolver('public.t', 'error')");
    }
    mesh.applier("b").stop();
    mesh.node("a").safe_psql("INSERT INTO t VALUES (1, 'a')");
    mesh.node("b")
        .safe_psql("INSERT INTO t VALUES (1, 'b'), (2, 'b')");
    mesh.node("b").safe_psql("INSERT INTO t VALUES (3, 'b')");
    mesh.applier("b").restart();
    for name in ["a", "b"] {
        mesh.applier(name).wait_for_log(
            "conflict insert_exists on relation public.t and the table's conflict resolver is 'error'",
        );
    }
    // Nothing of the conflicting transactions, nor of what follows, was
    // applied; the conflict is recorded once however often apply retries.
    assert_eq!(mesh.node("a").safe_psql("SELECT count(*) FROM t"), "1");
    for n in &mesh.nodes {
        assert_eq!(history(n), "insert_exists|error");
    }
    // The operator lets b's row win on both nodes.
    mesh.node("a")
        .safe_psql("SELECT bdr.set_conflict_resolver('public.t', 'apply_remote')");
    mesh.node("b")
        .safe_psql("SELECT bdr.set_conflict_resolver('public.t', 'keep_local')");
    mesh.wait_for_catchup();
    assert_eq!(
        mesh.assert_same("SELECT id, v FROM t ORDER BY id"),
        "1|b\n2|b\n3|b"
    );
}

#[test]
fn partitions_are_told_apart_when_resolving() {
    // The first row of each partition has the same ctid.
    let mut mesh = Mesh::new(
        &["a", "b"],
        "CREATE TABLE p (id int, part int, v text, PRIMARY KEY (id, part)) PARTITION BY LIST (part);
         CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1);
         CREATE TABLE p2 PARTITION OF p FOR VALUES IN (2);",
    );
    mesh.node("a")
        .safe_psql("INSERT INTO p VALUES (1, 1, 'seed'), (1, 2, 'seed')");
    mesh.wait_for_catchup();
    concurrently(
        &mut mesh,
        "UPDATE p SET v = 'a' WHERE id = 1 AND part = 1",
        "UPDATE p SET v = 'b' WHERE id = 1 AND part = 1",
    );
    assert_eq!(
        mesh.assert_same("SELECT tableoid::regclass, id, part, v FROM p ORDER BY part"),
        "p1|1|1|b\np2|1|2|seed"
    );
    assert_eq!(
        history(mesh.node("a")),
        "update_origin_differs|apply_remote"
    );
}

#[test]
fn handler_merges_both_versions_the_same_way_on_both_nodes() {
    let mut mesh = pair("INSERT INTO m VALUES (1, 'x', 0)");
    for n in ["a", "b"] {
        let node = mesh.node(n);
        let err = node
            .psql("SELECT bdr.set_conflict_handler('m', 'lower(text)')")
            .unwrap_err();
        assert!(
            err.contains("must take (bdr.conflict_type, jsonb, jsonb)"),
            "{err}"
        );
        node.safe_psql(
            "SELECT bdr.set_conflict_handler('m', 'merge_m(bdr.conflict_type, jsonb, jsonb)')",
        );
    }
    concurrently(
        &mut mesh,
        "UPDATE m SET v = 'b', n = 5 WHERE id = 1; INSERT INTO m VALUES (2, 'y', 2)",
        "UPDATE m SET v = 'a', n = 3 WHERE id = 1; INSERT INTO m VALUES (2, 'z', 7)",
    );
    // Each node handed its own row and the other's to the handler, which
    // picks the same merge from either side.
    assert_eq!(
        mesh.assert_same("SELECT id, v, n FROM m ORDER BY id"),
        "1|a|5\n2|y|7"
    );
    for n in ["a", "b"] {
        assert_eq!(
            mesh.node(n).safe_psql(
                "SELECT conflict_type || '|' || resolution || '|' || detail
                   FROM bdr.conflict_history ORDER BY id"
            ),
            "update_origin_differs|merge|handler merge_m\ninsert_exists|merge|handler merge_m",
            "node {n}"
        );
    }
    // Without the handler the resolver decides again.
    mesh.node("a")
        .safe_psql("SELECT bdr.set_conflict_handler('m', NULL)");
    assert_eq!(
        mesh.node("a").safe_psql(
            "SELECT resolver || '|' || (handler IS NULL) FROM bdr.table_conflict_resolvers"
        ),
        "last_update_wins|true"
    );
}

#[test]
fn every_pair_converges_on_three_nodes() {
    let mut mesh = Mesh::new(&["a", "b", "c"], SCHEMA);
    mesh.node("a")
        .safe_psql("INSERT INTO t VALUES (10, 'seed'), (20, 'seed'), (30, 'seed')");
    mesh.wait_for_catchup();
    // a and b apply nothing while b, then a write the same rows; c keeps
    // applying, so it meets both versions in whatever order they come.
    mesh.applier("a").stop();
    mesh.applier("b").stop();
    mesh.node("b").safe_psql(
        "INSERT INTO t VALUES (1, 'b');
         UPDATE t SET v = 'b' WHERE id = 10;
         UPDATE t SET v = 'b' WHERE id = 20;
         DELETE FROM t WHERE id = 30;
         INSERT INTO u VALUES (1, 'x@example.org', 'b');
         INSERT INTO u VALUES (11, 'm@example.org', 'b1'), (12, 'n@example.org', 'b2')",
    );
    mesh.node("a").safe_psql(
        "INSERT INTO t VALUES (1, 'a');
         UPDATE t SET v = 'a' WHERE id = 10;
         DELETE FROM t WHERE id = 20;
         DELETE FROM t WHERE id = 30;
         INSERT INTO u VALUES (2, 'x@example.org', 'a');
         INSERT INTO u VALUES (11, 'n@example.org', 'a')",
    );
    mesh.applier("a").restart();
    mesh.applier("b").restart();
    mesh.wait_for_catchup();
    // a's commit is the later one: its versions win, the delete wins
    // over the update, and the rows holding a's unique keys are gone.
    assert_eq!(
        mesh.assert_same("SELECT id, v FROM t ORDER BY id"),
        "1|a\n10|a"
    );
    assert_eq!(
        mesh.assert_same("SELECT id, email, v FROM u ORDER BY id"),
        "2|x@example.org|a\n11|n@example.org|a"
    );
    assert_eq!(
        history(mesh.node("a")),
        "insert_exists|keep_local\nupdate_origin_differs|keep_local\nupdate_missing|skip\n\
         delete_missing|skip\ninsert_exists|keep_local\ninsert_exists|keep_local\n\
         insert_exists|keep_local"
    );
    assert_eq!(
        history(mesh.node("b")),
        "insert_exists|apply_remote\nupdate_origin_differs|apply_remote\n\
         delete_origin_differs|apply_remote\ndelete_missing|skip\ninsert_exists|apply_remote\n\
         multiple_unique_conflicts|apply_remote"
    );
    let on_c = history(mesh.node("c"));
    assert!(on_c.lines().count() >= 4, "c met both versions:\n{on_c}");
}

#[test]
fn handler_rows_keep_the_columns_they_leave_out() {
    // A large value stored out of line travels as "unchanged" in an UPDATE
    // that does not touch it: the remote row the handler gets lacks it.
    let mut mesh = pair(
        "ALTER TABLE k ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO k VALUES (1, repeat('x', 10000), 0)",
    );
    for n in ["a", "b"] {
        mesh.node(n).safe_psql(
            "SELECT bdr.set_conflict_handler('k', 'remote_k(bdr.conflict_type, jsonb, jsonb)')",
        );
    }
    concurrently(
        &mut mesh,
        "UPDATE k SET n = 1 WHERE id = 1",
        "UPDATE k SET n = 2 WHERE id = 1",
    );
    // Each node took the other's n; big is kept on both.
    assert_eq!(
        mesh.node("a").safe_psql("SELECT n, length(big) FROM k"),
        "2|10000"
    );
    assert_eq!(
        mesh.node("b").safe_psql("SELECT n, length(big) FROM k"),
        "1|10000"
    );
}

/// Ten transactions from a (rows 11 to 20, 'a'), which reach b as a
/// backlog after `on_b` ran on b; the rows of t once both caught up, and
/// b's applier log (debug).
fn backlog_after(on_b: &str) -> (Mesh, String, String) {
    let mut mesh = pair("");
    mesh.applier("b").stop();
    for id in 11..=20 {
        mesh.node("a")
            .safe_psql(&format!("INSERT INTO t VALUES ({id}, 'a')"));
    }
    mesh.node("b").safe_psql(on_b);
    mesh.applier("b")
        .restart_with_env(&[("RUST_LOG", "info,bdr_applier=debug")]);
    mesh.wait_for_catchup();
    let rows = mesh.assert_same("SELECT string_agg(id || v, ',' ORDER BY id) FROM t");
    let log = mesh.applier("b").log();
    (mesh, rows, log)
}

#[test]
fn a_conflict_among_batched_transactions_applies_each_other_one_once() {
    // Ten transactions from a reach b as a backlog, many to one call of
    // the server's apply procedure; the sixth meets b's own row. Those
    // before it commit in that call, and only the sixth and later are
    // applied again: another application of an earlier one would find
    // its row there and be recorded as a conflict too.
    let (mesh, rows, log) = backlog_after("INSERT INTO t VALUES (16, 'b')");
    assert_eq!(rows, "11a,12a,13a,14a,15a,16b,17a,18a,19a,20a");
    assert_eq!(history(mesh.node("b")), "insert_exists|keep_local", "{log}");
    assert!(log.contains("batch failed"), "{log}");
}

#[test]
fn a_batch_behind_a_failed_one_applies_nothing() {
    // The first transaction of the backlog goes out as a batch of its own
    // and takes a second in the server (a trigger of b's) before it meets
    // b's own row; the next one goes out behind it meanwhile. That second
    // batch must not commit: were it to, the origin's progress would pass
    // the failed transaction, which would then never be applied (no
    // conflict recorded, b's row never sent back over).
    let (mesh, rows, log) = backlog_after(
        "INSERT INTO t VALUES (11, 'b');
         CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.id = 11 THEN PERFORM pg_sleep(1); END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER slow BEFORE INSERT ON t
             FOR EACH ROW EXECUTE FUNCTION slow();
         ALTER TABLE t ENABLE ALWAYS TRIGGER slow;",
    );
    assert_eq!(rows, "11b,12a,13a,14a,15a,16a,17a,18a,19a,20a");
    assert_eq!(history(mesh.node("b")), "insert_exists|keep_local", "{log}");
    assert!(
        log.contains("a batch behind a failed one did not apply"),
        "{log}"
    );
}

#[test]
fn a_conflict_waiting_for_a_local_lock_keeps_the_stream_from_the_peer() {
    // The test clusters end a replication connection whose client is
    // silent for 5 s (wal_sender_timeout); here the applier spends 8 s on
    // one failed batch applied again, waiting to record its conflict.
    let mut mesh = pair("INSERT INTO t VALUES (1, 'a')");
    mesh.node("b")
        .safe_psql("UPDATE t SET v = 'b' WHERE id = 1");
    mesh.wait_for_catchup();
    let mut lock = mesh.node("b").connect();
    lock.batch_execute("BEGIN; LOCK TABLE bdr.conflict_history IN EXCLUSIVE MODE")
        .unwrap();
    mesh.node("a")
        .safe_psql("UPDATE t SET v = 'a2' WHERE id = 1");
    mesh.node("b").poll_query_until(
        "SELECT count(*) FROM pg_locks WHERE NOT granted \
            AND relation = 'bdr.conflict_history'::regclass",
        "1",
    );
    std::thread::sleep(std::time::Duration::from_secs(8));
    lock.batch_execute("COMMIT").unwrap();
    mesh.wait_for_catchup();
    assert_eq!(mesh.assert_same("SELECT id, v FROM t"), "1|a2");
    assert_eq!(
        history(mesh.node("b")),
        "update_origin_differs|apply_remote"
    );
    let log = mesh.applier("b").log();
    assert!(
        !log.contains("apply from peer stopped"),
        "b's stream from a broke:\n{log}"
    );
    let server = mesh.node("a").log_tail(200);
    assert!(
        !server.contains("replication timeout"),
        "a's walsender gave up on b:\n{server}"
    );
}
