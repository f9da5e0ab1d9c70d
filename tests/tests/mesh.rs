//! The mesh: changes made on any node reach every other node exactly once,
//! through the bdr plugin and bdr-applier, across restarts and crashes.

use std::thread;
use std::time::Duration;

use bdr_applier::origin::lane_of;
use bdr_tests::{Mesh, applier_command};

const SCHEMA: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text, n bigint);
CREATE TABLE log (node text, v text);
CREATE TABLE big (id bigint PRIMARY KEY, payload text);";

/// Content fingerprint of a table, the same on every node when they agree.
fn fingerprint(table: &str, order: &str) -> String {
    format!(
        "SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, ',' ORDER BY {order})), '') FROM {table} x"
    )
}

#[test]
fn two_nodes_replicate_every_change_kind_both_ways() {
    let mesh = Mesh::new(&["a", "b"], SCHEMA);
    let (a, b) = (mesh.node("a"), mesh.node("b"));
    a.safe_psql("INSERT INTO t SELECT g, 'a' || g, g FROM generate_series(1, 100) g");
    b.safe_psql("INSERT INTO t SELECT g, 'b' || g, g FROM generate_series(101, 200) g");
    mesh.wait_for_catchup();
    assert_eq!(mesh.assert_same("SELECT count(*) FROM t"), "200");
    // Applied rows keep the writer's commit time and carry its origin.
    let times = "SELECT string_agg(DISTINCT pg_xact_commit_timestamp(xmin)::text, ',')
                   FROM t WHERE id <= 100";
    assert_eq!(b.safe_psql(times), a.safe_psql(times));
    assert_eq!(
        b.safe_psql(
            "SELECT count(*) FROM t
              WHERE id <= 100 AND (pg_xact_commit_timestamp_origin(xmin)).roident <> 0"
        ),
        "100"
    );

    a.safe_psql("UPDATE t SET v = 'updated on a', n = n * 2 WHERE id BETWEEN 150 AND 160");
    b.safe_psql("DELETE FROM t WHERE id <= 10");
    b.safe_psql("UPDATE t SET id = id + 1000 WHERE id = 50");
    mesh.wait_for_catchup();
    mesh.assert_same(&fingerprint("t", "id"));
    assert_eq!(
        a.safe_psql("SELECT count(*) FROM t WHERE v = 'updated on a'"),
        "11"
    );
    assert_eq!(b.safe_psql("SELECT v FROM t WHERE id = 1050"), "a50");

    b.safe_psql("TRUNCATE t");
    mesh.wait_for_catchup();
    assert_eq!(mesh.assert_same("SELECT count(*) FROM t"), "0");
}

#[test]
fn three_nodes_apply_each_change_once_and_never_loop() {
    let mesh = Mesh::new(&["a", "b", "c"], SCHEMA);
    for n in &mesh.nodes {
        n.safe_psql(&format!(
            "INSERT INTO log VALUES ('{0}', 'from {0}')",
            n.name()
        ));
    }
    mesh.wait_for_catchup();
    // A second round: anything that looped would have arrived by now.
    mesh.wait_for_catchup();
    let expected = "a|from a\nb|from b\nc|from c";
    assert_eq!(
        mesh.assert_same("SELECT node, v FROM log ORDER BY node"),
        expected
    );
    // Every node applied exactly one transaction from each peer.
    for n in &mesh.nodes {
        assert_eq!(
            n.safe_psql("SELECT count(*) FROM pg_replication_origin_status"),
            "2"
        );
    }
}

#[test]
fn applier_killed_mid_stream_loses_and_duplicates_nothing() {
    let mut mesh = Mesh::new(&["a", "b"], SCHEMA);
    let writer_dsn = mesh.node("a").connstr();
    let writer = thread::spawn(move || {
        let mut client = postgres::Client::connect(&writer_dsn, postgres::NoTls).expect("connect");
        for batch in 0..40i64 {
            client
                .execute(
                    "INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series($1::bigint, $1 + 2499) g",
                    &[&(batch * 2500)],
                )
                .expect("insert batch");
            client
                .execute("INSERT INTO log VALUES ('a', $1)", &[&batch.to_string()])
                .expect("insert log");
        }
    });
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(700));
        mesh.applier("b").kill9();
        thread::sleep(Duration::from_millis(200));
        mesh.applier("b").restart();
    }
    writer.join().expect("writer");
    mesh.wait_for_catchup();
    assert_eq!(mesh.assert_same("SELECT count(*) FROM big"), "100000");
    mesh.assert_same(&fingerprint("big", "id"));
    assert_eq!(
        mesh.assert_same("SELECT count(*), count(DISTINCT v) FROM log"),
        "40|40"
    );
}

#[test]
fn large_and_many_small_transactions() {
    let mesh = Mesh::new(&["a", "b"], SCHEMA);
    let a = mesh.node("a");
    a.safe_psql("INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 100000) g");
    a.safe_psql(
        "DO $$ BEGIN FOR i IN 1..10000 LOOP
             INSERT INTO t VALUES (i, 'small', i); COMMIT;
         END LOOP; END $$",
    );
    mesh.wait_for_catchup();
    assert_eq!(mesh.assert_same("SELECT count(*) FROM big"), "100000");
    assert_eq!(mesh.assert_same("SELECT count(*) FROM t"), "10000");
    mesh.assert_same(&fingerprint("big", "id"));
    mesh.assert_same(&fingerprint("t", "id"));
}

#[test]
fn a_restarted_or_unreachable_peer_does_not_stop_the_others() {
    let mut mesh = Mesh::new(&["a", "b", "c"], SCHEMA);
    mesh.node_mut("c").stop();
    mesh.node("a")
        .safe_psql("INSERT INTO log VALUES ('a', 'while c is down')");
    mesh.node("b")
        .poll_query_until("SELECT count(*) FROM log", "1");
    mesh.node_mut("c").start();
    mesh.node("c")
        .poll_query_until("SELECT count(*) FROM log", "1");

    mesh.node_mut("a").restart();
    mesh.node("a")
        .safe_psql("INSERT INTO log VALUES ('a', 'after restart')");
    mesh.node("b")
        .poll_query_until("SELECT count(*) FROM log", "2");
    mesh.node("c")
        .poll_query_until("SELECT count(*) FROM log", "2");
    mesh.wait_for_catchup();
    mesh.assert_same(&fingerprint("log", "v"));
}

#[test]
fn synchronous_commit_waits_for_the_peers_applier() {
    let mut mesh = Mesh::new(&["a", "b"], SCHEMA);
    let a = mesh.node("a");
    a.append_conf("synchronous_standby_names = 'b'");
    a.reload();
    a.safe_psql("INSERT INTO log VALUES ('a', 'sync 1')");
    assert_eq!(
        mesh.node("b").safe_psql("SELECT count(*) FROM log"),
        "1",
        "applied before the commit returned"
    );

    assert_eq!(
        mesh.applier("b").stop().code(),
        Some(0),
        "clean exit on SIGTERM"
    );
    let dsn = mesh.node("a").connstr();
    let commit = thread::spawn(move || {
        let mut client = postgres::Client::connect(&dsn, postgres::NoTls).expect("connect");
        client
            .batch_execute("INSERT INTO log VALUES ('a', 'sync 2')")
            .expect("insert");
    });
    thread::sleep(Duration::from_secs(2));
    assert!(
        !commit.is_finished(),
        "the commit waits while b's applier is down"
    );
    mesh.applier("b").restart();
    commit.join().expect("commit finished");
    assert_eq!(mesh.node("b").safe_psql("SELECT count(*) FROM log"), "2");
}

#[test]
fn status_and_cli_errors_name_what_is_wrong() {
    let mesh = Mesh::new(&["a", "b"], SCHEMA);
    mesh.node("a")
        .safe_psql("INSERT INTO log VALUES ('a', 'x')");
    mesh.wait_for_catchup();
    let status = applier_command(mesh.node("b"), &["status"]);
    let line = status
        .lines()
        .find(|l| l.starts_with("a "))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(line.contains("streaming"), "{status}");

    let out =
        bdr_tests::applier_command_output(mesh.node("a"), &["add-peer", "z", "port=notanumber"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node z") && err.contains("connection string"),
        "{err}"
    );

    // A peer whose connection string leads back to the node itself is
    // refused at the handshake, not streamed from.
    let own = mesh.node("a").connstr();
    applier_command(mesh.node("a"), &["add-peer", "itself", &own]);
    mesh.appliers[0].wait_for_log("the connection string of peer itself leads to this node itself");
}

#[test]
fn a_missing_table_stops_only_that_peer_and_names_it() {
    let mut mesh = Mesh::new(&["a", "b", "c"], SCHEMA);
    mesh.node("a")
        .safe_psql("CREATE TABLE only_on_a (id int PRIMARY KEY)");
    mesh.node("a").safe_psql("INSERT INTO only_on_a VALUES (1)");
    mesh.applier("b")
        .wait_for_log("relation public.only_on_a does not exist on this node");
    // Recorded once as an apply error, however often it is retried.
    let b = mesh.node("b");
    b.poll_query_until(
        "SELECT count(*) FROM bdr.conflict_history WHERE conflict_type = 'apply_error'",
        "1",
    );
    let deadline = std::time::Instant::now() + bdr_tests::timeout();
    while mesh
        .applier("b")
        .log()
        .matches("apply from peer stopped")
        .count()
        < 3
    {
        assert!(std::time::Instant::now() < deadline, "b did not retry");
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        mesh.node("b").safe_psql(
            "SELECT relation, resolution, detail,
                    remote_node_id = (SELECT node_id FROM bdr.nodes WHERE node_name = 'a'),
                    remote_xid IS NOT NULL, remote_commit_time <= now()
               FROM bdr.conflict_history"
        ),
        "public.only_on_a|error|relation public.only_on_a does not exist on this node|t|t|t"
    );
    // c's changes still reach b.
    mesh.node("c")
        .safe_psql("INSERT INTO log VALUES ('c', 'still flowing')");
    mesh.node("b")
        .poll_query_until("SELECT count(*) FROM log", "1");
    // Once the table exists, the retry applies the change.
    mesh.node("b")
        .safe_psql("CREATE TABLE only_on_a (id int PRIMARY KEY)");
    mesh.node("b")
        .poll_query_until("SELECT count(*) FROM only_on_a", "1");
}

#[test]
fn an_immediate_stop_of_either_node_loses_and_duplicates_nothing() {
    let mut mesh = Mesh::new(&["a", "b"], SCHEMA);
    for round in 0..3i64 {
        let dsn = mesh.node("a").connstr();
        let writer = thread::spawn(move || {
            let mut client = postgres::Client::connect(&dsn, postgres::NoTls).expect("connect");
            for batch in 0..10i64 {
                let first = (round * 10 + batch) * 1000;
                client
                    .execute(
                        "INSERT INTO big SELECT g, 'r' FROM generate_series($1::bigint, $1 + 999) g",
                        &[&first],
                    )
                    .expect("insert batch");
            }
        });
        thread::sleep(Duration::from_millis(300));
        // The receiver crashes mid-stream; its applier reconnects.
        mesh.node_mut("b").stop_immediate();
        thread::sleep(Duration::from_millis(300));
        mesh.node_mut("b").start();
        writer.join().expect("writer");
    }
    // The sender crashes right after committing; nothing it acknowledged
    // as committed is lost downstream.
    mesh.node("a")
        .safe_psql("INSERT INTO log VALUES ('a', 'before crash')");
    mesh.node_mut("a").stop_immediate();
    mesh.node_mut("a").start();
    mesh.wait_for_catchup();
    assert_eq!(mesh.assert_same("SELECT count(*) FROM big"), "30000");
    mesh.assert_same(&fingerprint("big", "id"));
    assert_eq!(mesh.assert_same("SELECT count(*) FROM log"), "1");
}

/// The applier commits without waiting for the WAL flush; what it tells
/// the peer it may forget must be flushed all the same. With b's WAL
/// writer nearly asleep, an immediate stop right after a counted b's
/// changes as flushed loses the commits still in b's WAL buffers, unless
/// the applier had them flushed before saying so.
#[test]
fn what_the_peer_counts_as_flushed_survives_an_immediate_stop() {
    let mut mesh = Mesh::new(&["a", "b"], SCHEMA);
    mesh.node("b").append_conf("wal_writer_delay = 10s");
    mesh.node("b").reload();
    mesh.wait_for_streaming();
    for i in 0..20 {
        mesh.node("a")
            .safe_psql(&format!("INSERT INTO log VALUES ('a', 'row {i}')"));
    }
    let lsn = mesh.node("a").safe_psql("SELECT pg_current_wal_lsn()");
    mesh.node("a").poll_query_until(
        &format!(
            "SELECT coalesce(bool_and(confirmed_flush_lsn >= '{lsn}'), false)
               FROM pg_replication_slots WHERE slot_type = 'logical'"
        ),
        "t",
    );
    mesh.node_mut("b").stop_immediate();
    mesh.node_mut("b").start();
    mesh.wait_for_catchup();
    assert_eq!(mesh.node("b").safe_psql("SELECT count(*) FROM log"), "20");
}

/// Built-in types travel in binary, user-defined ones (an enum, a
/// composite, a domain) as text; batches bind each value in its own
/// format, so every value arrives as it was (NULLs, padding and special
/// characters included) without a batch failing and being applied again.
#[test]
fn values_of_every_column_type_arrive_intact_through_batches() {
    let schema = "
        CREATE TYPE mood AS ENUM ('sad', 'happy');
        CREATE TYPE pair AS (x int, y text);
        CREATE DOMAIN small AS int CHECK (VALUE < 1000);
        CREATE TABLE every (id int PRIMARY KEY, i2 int2, i8 int8, b bool, f4 float4,
            f8 float8, n numeric, t text, vc varchar(12), c char(5), by bytea,
            ts timestamptz, d date, u uuid, j jsonb, ia int[], ta text[],
            iv interval, ip inet, tn timestamp);
        CREATE TABLE custom (id int PRIMARY KEY, m mood, p pair, s small, t text);";
    let mut mesh = Mesh::new(&["a", "b"], schema);
    mesh.applier("b").stop();
    // Counts the calls of bdr.apply_changes that succeed.
    mesh.node("b")
        .safe_psql("ALTER SYSTEM SET track_functions = 'all'");
    mesh.node("b").safe_psql("SELECT pg_reload_conf()");
    mesh.node("a").safe_psql(
        r"INSERT INTO every
          SELECT g, g - 50, g * 100000000000, g % 2 = 0, g / 3.0, g / 7.0, g * 1.5 - 0.001,
                 'row ' || g || E'\t\n\\ é', 'v' || g, 'c' || (g % 10),
                 decode(md5(g::text), 'hex'), '2026-11-26 12:00:00+00'::timestamptz + g * interval '1 h',
                 date '2026-01-01' + g, md5(g::text)::uuid, jsonb_build_object('g', g, 'a', array[g]),
                 array[g, NULL, -g], array['x' || g, NULL, ''], g * interval '1 min', '10.0.0.1'::inet + g,
                 '2026-11-26 12:00:00'::timestamp - g * interval '100 days'
            FROM generate_series(1, 100) g;
          INSERT INTO every (id) SELECT g FROM generate_series(101, 130) g;
          INSERT INTO every (id, b, f4, f8, ts, d, tn) VALUES
              (131, false, -1.5, '-Infinity', 'infinity', '-infinity', '4713-01-01 00:00:00 BC'),
              (132, true, 'NaN', -0.0, '-infinity', 'infinity', 'infinity');
          INSERT INTO custom
          SELECT g, CASE WHEN g % 3 = 0 THEN NULL WHEN g % 2 = 0 THEN 'happy' ELSE 'sad' END::mood,
                 ROW(g, 'p' || g)::pair, g, 'n' || g
            FROM generate_series(1, 40) g",
    );
    mesh.applier("b")
        .restart_with_env(&[("RUST_LOG", "info,bdr_applier=debug")]);
    mesh.wait_for_catchup();
    assert!(
        mesh.assert_same(&fingerprint("every", "id"))
            .starts_with("132:")
    );
    assert!(
        mesh.assert_same(&fingerprint("custom", "id"))
            .starts_with("40:")
    );
    // Every column set again by UPDATEs (one leaving the key to find
    // the row by, one changing it), and DELETEs by key.
    mesh.node("a").safe_psql(
        r#"UPDATE every SET i2 = -i2, i8 = i8 + 1, b = NOT b, f4 = f4 * 2, f8 = -f8, n = n + 0.5,
                 t = t || ' upd', vc = 'u' || id, c = 'u', by = by || '\x00'::bytea,
                 ts = ts + interval '1 s', d = d + 1, u = md5(id::text || 'u')::uuid,
                 j = j || '{"u": true}', ia = ia || id, ta = ta || 'u'::text,
                 iv = iv * 2, ip = ip + 1, tn = tn + interval '1 s'
           WHERE id % 2 = 0;
          UPDATE custom SET m = 'happy', p = ROW(-id, NULL), s = s + 1, t = NULL WHERE id <= 20"#,
    );
    mesh.node("a").safe_psql(
        "DELETE FROM every WHERE id % 5 = 0;
         UPDATE every SET id = id + 1000 WHERE id > 120;
         DELETE FROM custom WHERE id > 35",
    );
    mesh.wait_for_catchup();
    assert!(
        mesh.assert_same(&fingerprint("every", "id"))
            .starts_with("106:")
    );
    assert!(
        mesh.assert_same(&fingerprint("custom", "id"))
            .starts_with("35:")
    );
    let log = mesh.applier("b").log();
    assert!(!log.contains("batch failed"), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
    // The server applied them: beside the session's check, at least one
    // call of the procedure that applies transactions (a call that fails
    // is not counted, and none failed).
    mesh.node("b").poll_query_until(
        "SELECT coalesce(sum(calls), 0) >= 2 FROM pg_stat_user_functions
          WHERE schemaname = 'bdr' AND funcname = 'apply_transactions'",
        "t",
    );
}

/// Runs of INSERTs into a table reach the heap many rows at a time (one
/// WAL record per page, as COPY writes them), before changes that could
/// see them; a table with a row trigger that fires on the applier's
/// session, which must see each row, gets its rows one at a time, and the
/// trigger fires for every one and sees every row written before it. A
/// foreign key's triggers do not fire there.
#[test]
fn runs_of_inserts_go_in_many_rows_at_a_time_unless_a_trigger_watches() {
    let schema = "
        CREATE TABLE plain (id int PRIMARY KEY, v text NOT NULL, n int CHECK (n >= 0));
        CREATE TABLE watched (id int PRIMARY KEY, v text);
        CREATE TABLE gen (id int PRIMARY KEY, v int, w int GENERATED ALWAYS AS (v * 2) STORED);
        CREATE TABLE child (id int PRIMARY KEY, p int REFERENCES plain (id));";
    let mesh = Mesh::new(&["a", "b"], schema);
    let (a, b) = (mesh.node("a"), mesh.node("b"));
    b.safe_psql(
        "CREATE EXTENSION pg_walinspect;
         CREATE FUNCTION mark() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN NEW.v := NEW.v || '!' || (SELECT count(*) FROM plain); RETURN NEW; END $$;
         CREATE TRIGGER mark BEFORE INSERT ON watched FOR EACH ROW EXECUTE FUNCTION mark();
         ALTER TABLE watched ENABLE ALWAYS TRIGGER mark;",
    );
    let start = b.safe_psql("SELECT pg_current_wal_lsn()");
    a.safe_psql(
        "BEGIN;
         INSERT INTO plain SELECT g, 'p' || g, g FROM generate_series(1, 5000) g;
         INSERT INTO watched SELECT g, 'w' || g FROM generate_series(1, 50) g;
         INSERT INTO gen SELECT g, g FROM generate_series(1, 50) g;
         INSERT INTO child SELECT g, g FROM generate_series(1, 500) g;
         INSERT INTO plain VALUES (5001, 'x', 1);
         INSERT INTO watched VALUES (51, 'y');
         INSERT INTO plain VALUES (5002, 'x', 2);
         UPDATE plain SET v = 'updated' WHERE id BETWEEN 4990 AND 5001;
         DELETE FROM plain WHERE id = 5002;
         INSERT INTO plain VALUES (5002, 'again', 3);
         COMMIT",
    );
    mesh.wait_for_catchup();
    assert!(
        mesh.assert_same(&fingerprint("plain", "id"))
            .starts_with("5002:")
    );
    assert_eq!(
        mesh.assert_same("SELECT count(*) FROM plain WHERE v = 'updated'"),
        "12"
    );
    assert!(
        mesh.assert_same(&fingerprint("gen", "id"))
            .starts_with("50:")
    );
    assert_eq!(
        b.safe_psql("SELECT count(*) FROM watched WHERE v LIKE 'w%!5000'"),
        "50"
    );
    assert_eq!(b.safe_psql("SELECT v FROM watched WHERE id = 51"), "y!5001");
    assert_eq!(
        a.safe_psql("SELECT count(*) FROM watched WHERE v LIKE '%!%'"),
        "0"
    );
    // b's heap records per table: (multi-row inserts, single-row inserts).
    let records = |table: &str| {
        b.safe_psql(&format!(
            "SELECT count(*) FILTER (WHERE record_type LIKE 'MULTI_INSERT%') || ' ' ||
                    count(*) FILTER (WHERE record_type LIKE 'INSERT%')
               FROM pg_get_wal_records_info('{start}', pg_current_wal_lsn())
              WHERE resource_manager IN ('Heap', 'Heap2')
                AND block_ref LIKE '%/' || pg_relation_filenode('{table}') || ' %'"
        ))
    };
    // A row held alone goes in by itself: the last one, and those around
    // the end of a call.
    let plain = records("plain");
    let (multi, single) = plain.split_once(' ').unwrap();
    let (multi, single): (u32, u32) = (multi.parse().unwrap(), single.parse().unwrap());
    assert!(
        (20..200).contains(&multi) && (1..5).contains(&single),
        "plain's heap records (multi-row, single-row): {plain}"
    );
    assert_eq!(records("watched"), "0 51");
    // A foreign key's triggers do not fire on the applier's session.
    assert!(
        mesh.assert_same(&fingerprint("child", "id"))
            .starts_with("500:")
    );
    let child = records("child");
    assert!(
        child.ends_with(" 0") && !child.starts_with("0 "),
        "child's heap records (multi-row, single-row): {child}"
    );

    // Many small transactions (on tables that the server applies to
    // itself: not gen), applied in calls that keep their tables open from
    // one transaction to the next: triggers (BEFORE and AFTER,
    // firing or not) see each row, and no call fails on the way (closing
    // the tables fails when the trigger code's slots are not the call's;
    // the fallback would still apply everything).
    b.safe_psql(
        "CREATE FUNCTION remark() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN NEW.v := NEW.v || '?'; RETURN NEW; END $$;
         CREATE TRIGGER remark BEFORE UPDATE ON watched FOR EACH ROW EXECUTE FUNCTION remark();
         ALTER TABLE watched ENABLE ALWAYS TRIGGER remark;",
    );
    let mut mesh = mesh;
    mesh.applier("b").stop();
    // Counts the calls of bdr.apply_transactions that succeed.
    mesh.node("b")
        .safe_psql("ALTER SYSTEM SET track_functions = 'all'");
    mesh.node("b").safe_psql("SELECT pg_reload_conf()");
    let calls = "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions
                  WHERE schemaname = 'bdr' AND funcname = 'apply_transactions'";
    let calls_before: i64 = mesh.node("b").safe_psql(calls).parse().unwrap();
    let a = mesh.node("a");
    let mut txns = String::new();
    for i in 1..=40 {
        txns += &format!(
            "BEGIN; UPDATE watched SET v = 'u{i}' WHERE id = {i};
             INSERT INTO child VALUES ({id}, {i}); UPDATE plain SET n = n + 1 WHERE id = {i};
             DELETE FROM child WHERE id = {i}; COMMIT;",
            id = 1000 + i
        );
    }
    a.safe_psql(&txns);
    mesh.applier("b")
        .restart_with_env(&[("RUST_LOG", "info,bdr_applier=debug")]);
    mesh.wait_for_catchup();
    let (a, b) = (mesh.node("a"), mesh.node("b"));
    assert_eq!(
        b.safe_psql("SELECT count(*) FROM watched WHERE v ~ '^u[0-9]+[?]$'"),
        "40"
    );
    assert_eq!(
        a.safe_psql("SELECT count(*) FROM watched WHERE v LIKE 'u%'"),
        "40"
    );
    mesh.assert_same(&fingerprint("plain", "id"));
    mesh.assert_same(&fingerprint("child", "id"));
    b.poll_query_until(&format!("SELECT ({calls}) > {calls_before}"), "t");
    let log = mesh.applier("b").log();
    assert!(!log.contains("batch failed"), "{log}");
}

#[test]
fn columns_are_matched_by_name_and_definition_changes_are_followed() {
    let mesh = Mesh::new(&["a", "b"], "");
    // The same table with its columns in a different order on each node.
    mesh.node("a")
        .safe_psql("CREATE TABLE m (id int PRIMARY KEY, x text, y int)");
    mesh.node("b")
        .safe_psql("CREATE TABLE m (y int, id int PRIMARY KEY, x text)");
    mesh.node("a")
        .safe_psql("INSERT INTO m VALUES (1, 'one', 10)");
    mesh.wait_for_catchup();
    assert_eq!(
        mesh.node("b").safe_psql("SELECT id, x, y FROM m"),
        "1|one|10"
    );

    // A new column on both nodes: RELATION is sent again and the applier
    // prepares new statements.
    for n in &mesh.nodes {
        n.safe_psql("ALTER TABLE m ADD COLUMN z numeric DEFAULT 0");
    }
    mesh.node("a")
        .safe_psql("INSERT INTO m VALUES (2, 'two', 20, 2.5)");
    mesh.node("a")
        .safe_psql("UPDATE m SET z = 1.5 WHERE id = 1");
    mesh.wait_for_catchup();
    assert_eq!(
        mesh.node("b")
            .safe_psql("SELECT id, x, y, z FROM m ORDER BY id"),
        "1|one|10|1.5\n2|two|20|2.5"
    );

    // A column whose type differs is an error naming relation and column.
    mesh.node("a")
        .safe_psql("CREATE TABLE w (id int PRIMARY KEY, v int)");
    mesh.node("b")
        .safe_psql("CREATE TABLE w (id int PRIMARY KEY, v text)");
    mesh.node("a").safe_psql("INSERT INTO w VALUES (1, 1)");
    let applier_b = &mesh.appliers[1];
    applier_b
        .wait_for_log("column v of relation public.w has type integer on the peer but text here");
}

#[test]
fn a_table_created_again_is_mapped_again() {
    // b's copy of t is dropped and created again (a new OID) while a, whose
    // table did not change, sends no new RELATION message. The description
    // of t that b's applier hands the server names the old table: the
    // first batch fails, the relations are mapped again, and the later
    // transactions go to the server in batches again (without the new
    // mapping, each batch would fail and be applied one statement at a
    // time).
    let log = table_created_again(&[], "apply_transactions");
    assert_eq!(log.matches("batch failed").count(), 1, "{log}");
}

#[test]
fn a_table_created_again_is_mapped_again_in_large_transactions() {
    // The same for transactions past the size of a chunk (here, every
    // one), which leave the batches: their changes go to the server per
    // chunk, and after the first failure the relations are mapped again.
    let log = table_created_again(&[("BDR_APPLY_CHUNK_BYTES", "1")], "apply_changes");
    assert_eq!(
        log.matches("applying again one statement at a time")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("pipelined changes go to bdr.apply_changes"),
        "{log}"
    );
}

/// Drops and creates again b's copy of t while b's applier (with `env`)
/// runs, then replicates 21 transactions into it from a: checks that they
/// all applied, the relations were mapped again and the server's
/// `function` applied changes afterwards; returns b's applier log.
fn table_created_again(env: &[(&str, &str)], function: &str) -> String {
    let mut mesh = Mesh::new(&["a", "b"], "CREATE TABLE t (id int PRIMARY KEY, v text)");
    mesh.applier("b").stop();
    // Counts the calls of the bdr functions that succeed.
    mesh.node("b")
        .safe_psql("ALTER SYSTEM SET track_functions = 'all'");
    mesh.node("b").safe_psql("SELECT pg_reload_conf()");
    let mut with_log = env.to_vec();
    with_log.push(("RUST_LOG", "info,bdr_applier=debug"));
    mesh.applier("b").restart_with_env(&with_log);
    mesh.node("a").safe_psql("INSERT INTO t VALUES (0, 'zero')");
    mesh.node("a").safe_psql("DELETE FROM t");
    mesh.wait_for_catchup();
    // The same columns in another order: other column numbers.
    mesh.node("b").safe_psql(
        "DROP TABLE t;
         CREATE TABLE t (v text, id int PRIMARY KEY);
         SELECT pg_stat_reset();",
    );
    for id in 1..=20 {
        mesh.node("a")
            .safe_psql(&format!("INSERT INTO t VALUES ({id}, 'a')"));
    }
    mesh.node("a")
        .safe_psql("UPDATE t SET v = 'a2' WHERE id > 10");
    mesh.wait_for_catchup();
    assert_eq!(
        mesh.node("b")
            .safe_psql("SELECT count(*), count(*) FILTER (WHERE v = 'a2') FROM t"),
        "20|10"
    );
    let log = mesh.applier("b").log();
    assert!(log.contains("mapping the relations again"), "{log}");
    // The server applied changes after the failure (a failed call is not
    // counted).
    mesh.node("b").poll_query_until(
        &format!(
            "SELECT coalesce(sum(calls), 0) >= 1 FROM pg_stat_user_functions
              WHERE schemaname = 'bdr' AND funcname = '{function}'"
        ),
        "t",
    );
    log
}

#[test]
fn a_crash_between_local_commit_and_feedback_applies_nothing_twice() {
    // Pipelined without batches, the applier stops committing right there.
    let env = [("BDR_APPLY_BATCH", "off")];
    let committed = crash_after_three_commits(&env, &env);
    assert_eq!(committed, 3);
}

#[test]
fn a_crash_in_the_middle_of_a_batch_applies_nothing_twice() {
    // The server goes on with the batch already sent: what it commits
    // after the third is committed, and must not be applied again.
    let committed = crash_after_three_commits(&[], &[]);
    assert!((3..=5).contains(&committed), "{committed}");
}

#[test]
fn a_crash_in_the_middle_of_parallel_batches_applies_nothing_twice() {
    // Two sessions, each with its own origin, each committing its own
    // transactions in a's order: b resumes at the lower progress of the
    // two and skips what the session each transaction is dealt to has
    // committed.
    let parallel = [("BDR_PARALLEL_APPLY", "on")];
    let committed = crash_after_three_commits(&parallel, &parallel);
    assert!((3..=5).contains(&committed), "{committed}");
}

#[test]
fn a_crash_while_one_parallel_session_is_held_up_loses_nothing() {
    // The session that a's row 1000 is dealt to waits for a local
    // transaction; the other one commits later transactions meanwhile,
    // so its origin is past a transaction not committed. After a crash
    // b resumes at the lower progress, and skips only what each
    // transaction's own session committed.
    let parallel = [("BDR_PARALLEL_APPLY", "on")];
    let mut mesh = Mesh::new(&["a", "b"], SCHEMA);
    mesh.applier("b").stop();
    let mut local = mesh.node("b").connect();
    local
        .batch_execute("BEGIN; INSERT INTO t VALUES (1000, 'b', 0)")
        .expect("a local transaction");
    for id in 990..=1010 {
        mesh.node("a")
            .safe_psql(&format!("INSERT INTO t VALUES ({id}, 'a', 0)"));
    }
    mesh.applier("b").restart_with_env(&parallel);
    mesh.node("b")
        .poll_query_until("SELECT count(*) > 0 FROM t WHERE id > 1000", "t");
    mesh.node("b").poll_query_until(
        "SELECT count(*) > 0 FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'",
        "t",
    );
    mesh.applier("b").kill9();
    // The waiting session ends with its applier, before the row is free.
    mesh.node("b")
        .poll_query_until("SELECT count(*) FROM pg_locks WHERE NOT granted", "0");
    local.batch_execute("ROLLBACK").expect("rolled back");
    mesh.applier("b").restart_with_env(&parallel);
    mesh.wait_for_catchup();
    assert_eq!(
        mesh.assert_same("SELECT count(*), count(*) FILTER (WHERE v = 'a') FROM t"),
        "21|21"
    );
}

#[test]
fn parallel_apply_turned_off_after_a_crash_applies_nothing_twice() {
    // What the two sessions left is sorted out as they were dealt, then
    // (after a clean stop) one session applies.
    let committed = crash_after_three_commits(
        &[("BDR_PARALLEL_APPLY", "on")],
        &[("BDR_PARALLEL_APPLY", "off")],
    );
    assert!((3..=5).contains(&committed), "{committed}");
}

/// Node a commits five transactions; b's applier (with `env`) aborts
/// right after its third local commit is confirmed, before it tells a:
/// b's origin is ahead of a's slot. Restarted (with `env`, or
/// `restart_env` when given), it resumes after what b committed, not at
/// the slot. Returns how many b had committed.
fn crash_after_three_commits(env: &[(&str, &str)], restart_env: &[(&str, &str)]) -> u32 {
    let mut mesh = Mesh::new(&["a", "b"], SCHEMA);
    mesh.applier("b").stop();
    for i in 0..5 {
        mesh.node("a")
            .safe_psql(&format!("INSERT INTO log VALUES ('a', 'tx {i}')"));
    }
    let mut with_fault = env.to_vec();
    with_fault.push(("BDR_FAULT_ABORT_AFTER_COMMITS", "3"));
    mesh.applier("b").restart_with_env(&with_fault);
    assert!(!mesh.applier("b").wait_exit().success(), "aborted");
    let committed: u32 = mesh
        .node("b")
        .safe_psql("SELECT count(*) FROM log")
        .parse()
        .expect("a count");
    let origin_progress = mesh
        .node("b")
        .safe_psql("SELECT max(remote_lsn) FROM pg_replication_origin_status");
    let confirmed = mesh.node("a").safe_psql(&format!(
        "SELECT confirmed_flush_lsn < '{origin_progress}' FROM pg_replication_slots"
    ));
    assert_eq!(confirmed, "t", "the peer had not heard of the last commit");
    // Parallel apply's two origins at different points.
    let apart = mesh.node("b").safe_psql(
        "SELECT count(DISTINCT remote_lsn) > 1 FROM pg_replication_origin_status
          WHERE remote_lsn <> '0/0'",
    ) == "t";
    eprintln!("origins apart after the crash: {apart}");
    mesh.applier("b").restart_with_env(restart_env);
    mesh.wait_for_catchup();
    assert_eq!(
        mesh.assert_same("SELECT count(*), count(DISTINCT v) FROM log"),
        "5|5"
    );
    if restart_env != env {
        if apart {
            let log = mesh.applier("b").log();
            assert!(log.contains("did not stop cleanly"), "{log}");
        }
        // After a clean stop, the restart takes the setting as it is:
        // one origin in use, and nothing applied twice since.
        mesh.applier("b").stop();
        mesh.node("a")
            .safe_psql("INSERT INTO log VALUES ('a', 'tx 5')");
        mesh.applier("b").restart_with_env(restart_env);
        mesh.wait_for_catchup();
        assert_eq!(
            mesh.assert_same("SELECT count(*), count(DISTINCT v) FROM log"),
            "6|6"
        );
        let parallel_on = restart_env.contains(&("BDR_PARALLEL_APPLY", "on"));
        assert_eq!(
            mesh.node("b").safe_psql(
                "SELECT count(*) FROM pg_replication_origin_status
                  WHERE external_id LIKE 'bdr\\_%\\_1' AND remote_lsn <> '0/0'"
            ),
            if parallel_on { "1" } else { "0" }
        );
    }
    committed
}

#[test]
fn parallel_apply_keeps_statements_in_order_with_everything_around_them() {
    // TRUNCATE goes out as a statement on the first session (or, dealt
    // to the second, is handed over with that session's origin): rows
    // inserted before it must be gone and rows inserted after it must
    // stay, whichever session each transaction is dealt to. A local lock
    // holds the first TRUNCATE, dealt to the first session, up for a
    // while: the second session must not commit what comes after it.
    let mut mesh = Mesh::new(&["a", "b"], SCHEMA);
    mesh.applier("b").stop();
    let write = |sql: &str| -> u32 {
        let out = mesh.node("a").safe_psql(&format!(
            "BEGIN; {sql}; SELECT pg_catalog.txid_current() % 4294967296; COMMIT"
        ));
        out.lines()
            .last()
            .and_then(|l| l.parse().ok())
            .expect("an xid")
    };
    for i in 0..10 {
        write(&format!("INSERT INTO log VALUES ('a', '{i}')"));
    }
    // The next transaction id is one more than the last one given out.
    let mut truncated = 0;
    for i in 10..40 {
        let next: u32 = mesh
            .node("a")
            .safe_psql("SELECT pg_catalog.txid_current() % 4294967296")
            .parse()
            .expect("an xid");
        if truncated == 0 && lane_of(next + 1) == 0 {
            let xid = write(&format!(
                "TRUNCATE log; INSERT INTO log VALUES ('a', 'after {i}')"
            ));
            if lane_of(xid) == 0 {
                truncated = i;
            }
        } else {
            write(&format!("INSERT INTO log VALUES ('a', '{i}')"));
        }
    }
    assert!(truncated > 0, "no TRUNCATE was dealt to the first session");
    let mut local = mesh.node("b").connect();
    local
        .batch_execute("BEGIN; LOCK TABLE log IN SHARE UPDATE EXCLUSIVE MODE")
        .expect("a local lock");
    mesh.applier("b")
        .restart_with_env(&[("BDR_PARALLEL_APPLY", "on")]);
    mesh.node("b").poll_query_until(
        "SELECT count(*) > 0 FROM pg_locks WHERE NOT granted AND mode = 'AccessExclusiveLock'",
        "t",
    );
    // The second session's transactions after the TRUNCATE wait for it.
    thread::sleep(Duration::from_millis(500));
    local.batch_execute("COMMIT").expect("released");
    mesh.wait_for_catchup();
    let expected: Vec<String> = (truncated + 1..40)
        .map(|i| i.to_string())
        .chain([format!("after {truncated}")])
        .collect();
    assert_eq!(
        mesh.assert_same("SELECT string_agg(v, ',' ORDER BY v) FROM log"),
        expected.join(",")
    );
}

#[test]
fn parallel_apply_can_be_turned_off_and_on_again() {
    let mut mesh = Mesh::new(&["a", "b"], SCHEMA);
    let write = |mesh: &Mesh, from: i32| {
        for i in from..from + 200 {
            mesh.node("a").safe_psql(&format!(
                "INSERT INTO t VALUES ({i}, 'a', 0); UPDATE t SET n = n + 1 WHERE id = {}",
                i / 2
            ));
        }
    };
    let parallel = [
        ("BDR_PARALLEL_APPLY", "on"),
        ("RUST_LOG", "info,bdr_applier=debug"),
    ];
    let serial = [
        ("BDR_PARALLEL_APPLY", "off"),
        ("RUST_LOG", "info,bdr_applier=debug"),
    ];
    let failed = |mesh: &mut Mesh| {
        mesh.applier("b")
            .log()
            .matches("batch failed: applying again")
            .count()
    };
    for (round, env) in [parallel, serial, parallel].iter().enumerate() {
        // Each round is a backlog for b's applier, started anew.
        mesh.applier("b").stop();
        write(&mesh, round as i32 * 200);
        let failed_before = failed(&mut mesh);
        mesh.applier("b").restart_with_env(env);
        mesh.wait_for_catchup();
        assert_eq!(
            mesh.assert_same("SELECT count(*), sum(n) FROM t"),
            format!("{}|{}", (round + 1) * 200, (round + 1) * 200),
            "round {round}:\n{}",
            mesh.applier("b").log()
        );
        // Nothing conflicts: rows the other round's sessions wrote are
        // the peer's, and no batch fails on them.
        assert_eq!(
            failed(&mut mesh),
            failed_before,
            "round {round}:\n{}",
            mesh.applier("b").log()
        );
    }
}
