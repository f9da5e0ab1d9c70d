//! Looking into bdr slots from SQL (`bdr.peek_changes`,
//! `bdr.decode_changes`, `bdr.node_slots`), and the plugin serving a real
//! walsender (`pg_recvlogical`).

mod plugin_support;

use std::process::{Command, Stdio};

use bdr_tests::Node;
use plugin_support::*;

fn pg_recvlogical() -> String {
    let pg_config = std::env::var("PG_CONFIG")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(pg_config)
        .arg("--bindir")
        .output()
        .expect("pg_config");
    format!(
        "{}/pg_recvlogical",
        String::from_utf8_lossy(&out.stdout).trim()
    )
}

fn recvlogical(
    node: &Node,
    slot: &str,
    options: &[(String, String)],
    file: &std::path::Path,
) -> Command {
    let mut cmd = Command::new(pg_recvlogical());
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &node.port().to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
    ])
    .args(["--slot", slot, "--start", "--no-loop", "-s", "1", "-f"])
    .arg(file);
    for (k, v) in options {
        cmd.arg("-o").arg(format!("{k}={v}"));
    }
    cmd
}

#[test]
fn peek_changes_shows_readable_rows_without_consuming() {
    let node = started("peek");
    node.safe_psql("CREATE TABLE t (id int PRIMARY KEY, v text, d date, big text)");
    node.safe_psql("ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL");
    node.safe_psql("SELECT pg_create_logical_replication_slot('s', 'bdr')");
    node.safe_psql(
        "INSERT INTO t VALUES (1, 'a \"quoted\" value', '2024-02-29', repeat('x', 5000))",
    );
    node.safe_psql("UPDATE t SET v = 'b' WHERE id = 1");
    node.safe_psql("DELETE FROM t");
    node.safe_psql("SELECT pg_logical_emit_message(false, 'app', 'hello')");
    // A non-transactional message alone is not flushed; a later commit is.
    node.safe_psql("CREATE TABLE flush_wal ()");

    let rows = node.safe_psql(
        "SELECT kind, relation, old, new, origin IS NULL, commit_time IS NOT NULL, xid IS NOT NULL \
         FROM bdr.peek_changes('s') WHERE kind IN ('insert', 'update', 'delete', 'message')",
    );
    let lines: Vec<&str> = rows.lines().collect();
    assert_eq!(lines.len(), 4, "{rows}");
    let big = "x".repeat(5000);
    assert_eq!(
        lines[0],
        format!(
            r#"insert|public.t||{{"id": 1, "v": "a \"quoted\" value", "d": "2024-02-29", "big": "{big}"}}|t|t|t"#
        )
    );
    assert_eq!(
        lines[1],
        r#"update|public.t||{"id": 1, "v": "b", "d": "2024-02-29", "big": {"unchanged_toast": true}}|t|t|t"#
    );
    assert_eq!(
        lines[2],
        r#"delete|public.t|{"id": 1, "v": null, "d": null, "big": null}||t|t|t"#
    );
    assert!(
        lines[3].starts_with(r#"message|app||{"transactional": false, "lsn": ""#),
        "{}",
        lines[3]
    );
    assert!(
        lines[3].ends_with(r#""content": "hello"}|t|f|t"#),
        "{}",
        lines[3]
    );

    // The first row is STARTUP, then BEGIN; nothing was consumed.
    assert_eq!(
        node.safe_psql("SELECT kind FROM bdr.peek_changes('s', upto_nchanges => 1) LIMIT 2"),
        "startup\nbegin"
    );
    let json = node.safe_psql(
        "SELECT new->>'node_id' = bdr.local_node_id()::text FROM bdr.peek_changes('s') LIMIT 1",
    );
    assert_eq!(json, "t");
    assert_eq!(
        node.safe_psql("SELECT count(*) > 10 FROM bdr.peek_changes('s')"),
        "t"
    );

    // Bytes fetched by hand decode the same way.
    let same = node.safe_psql(
        "SELECT count(*) FROM bdr.decode_changes(ARRAY(SELECT data FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL)))",
    );
    assert_eq!(
        same,
        node.safe_psql("SELECT count(*) FROM bdr.peek_changes('s')")
    );
    let err = node
        .psql("SELECT * FROM bdr.decode_changes(ARRAY['\\x5a'::bytea])")
        .expect_err("garbage");
    assert!(
        err.contains("element 1 is not a valid bdr protocol message"),
        "{err}"
    );
}

#[test]
fn node_slots_and_a_real_walsender() {
    let node = started("slots");
    node.safe_psql("CREATE TABLE t (id int PRIMARY KEY, f float8, ts timestamptz)");
    node.safe_psql("SELECT pg_create_logical_replication_slot('bdr_00000000000000bb', 'bdr')");
    node.safe_psql("SELECT pg_create_logical_replication_slot('by_hand', 'bdr')");
    node.safe_psql("SELECT pg_create_logical_replication_slot('td', 'test_decoding')");
    node.safe_psql("INSERT INTO t SELECT g, g / 3.0, now() FROM generate_series(1, 100) g");

    let dir = tempfile::tempdir().expect("temp dir");
    // A replication client must pass its options.
    let out = recvlogical(&node, "by_hand", &[], &dir.path().join("none"))
        .output()
        .expect("pg_recvlogical");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("required startup option"), "{stderr}");

    let file = dir.path().join("stream");
    let mut child = recvlogical(&node, "bdr_00000000000000bb", &client_options(&node), &file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting pg_recvlogical");
    node.poll_query_until(
        "SELECT active AND sent_lsn IS NOT NULL AND flush_lsn IS NOT NULL \
         FROM bdr.node_slots WHERE slot_name = 'bdr_00000000000000bb'",
        "t",
    );
    let rows = node.safe_psql(
        "SELECT slot_name, peer_node_id, active, retained_wal_bytes >= lag_bytes, lag_bytes >= 0 \
         FROM bdr.node_slots ORDER BY slot_name",
    );
    assert_eq!(rows, "bdr_00000000000000bb|187|t|t|t\nby_hand||f|t|t");
    // The walsender pinned its text settings for its own session only.
    assert_eq!(node.safe_psql("SHOW extra_float_digits"), "1");
    let _ = child.kill();
    let _ = child.wait();
    let received = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    assert!(received > 100 * 10, "pg_recvlogical wrote {received} bytes");
}
