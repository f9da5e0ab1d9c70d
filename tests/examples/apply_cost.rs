//! Apply throughput with no conflicts: how fast a node catches up on a
//! backlog of single-row changes from a peer. A measurement, not a test
//! (the test suite never times anything); run it with
//!
//! ```sh
//! cargo build --release -p bdr-applier
//! BDR_APPLIER_BIN=target/release/bdr-applier \
//!     cargo run --release -p bdr-tests --example apply_cost
//! ```
//!
//! and again with `BDR_APPLIER_BIN` pointing at another build to compare,
//! or with `BDR_APPLY_DETECT_CONFLICTS=off` (inherited by the applier) for
//! the cost of conflict detection.

use std::time::Instant;

use bdr_tests::Mesh;

const ROWS: i64 = 100_000;

/// Writes `sql` on a while b's applier is stopped, then times b's
/// catch-up; returns rows per second.
fn catch_up(mesh: &mut Mesh, sql: &str) -> f64 {
    mesh.applier("b").stop();
    mesh.node("a").safe_psql(sql);
    let start = Instant::now();
    mesh.applier("b").restart();
    mesh.wait_for_catchup_from("a");
    ROWS as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let mut mesh = Mesh::new(
        &["a", "b"],
        "CREATE TABLE t (id bigint PRIMARY KEY, v text, n bigint)",
    );
    // 100,000 single-row transactions of each kind.
    let inserts = catch_up(
        &mut mesh,
        &format!(
            "DO $$ BEGIN FOR i IN 1..{ROWS} LOOP
                 INSERT INTO t VALUES (i, md5(i::text), i); COMMIT;
             END LOOP; END $$"
        ),
    );
    let updates = catch_up(
        &mut mesh,
        &format!(
            "DO $$ BEGIN FOR i IN 1..{ROWS} LOOP
                 UPDATE t SET n = n + 1 WHERE id = i; COMMIT;
             END LOOP; END $$"
        ),
    );
    // One transaction of ROWS rows (multi-row INSERTs).
    let bulk = catch_up(
        &mut mesh,
        &format!(
            "INSERT INTO t SELECT g, md5(g::text), g FROM generate_series({ROWS} + 1, 2 * {ROWS}) g"
        ),
    );
    mesh.node("a")
        .safe_psql(&format!("DELETE FROM t WHERE id > {ROWS}"));
    mesh.wait_for_catchup_from("a");
    let deletes = catch_up(
        &mut mesh,
        &format!(
            "DO $$ BEGIN FOR i IN 1..{ROWS} LOOP
                 DELETE FROM t WHERE id = i; COMMIT;
             END LOOP; END $$"
        ),
    );
    assert_eq!(mesh.assert_same("SELECT count(*) FROM t"), "0");
    assert_eq!(
        mesh.node("b")
            .safe_psql("SELECT count(*) FROM bdr.conflict_history"),
        "0"
    );
    eprintln!(
        "apply rows/s: single-row transactions: insert {inserts:.0}, update {updates:.0}, delete {deletes:.0}; one {ROWS}-row insert: {bulk:.0}"
    );
}
