//! Where the time of one large transaction goes on its way to a peer: the
//! origin's decoding alone, the receiver's catch-up, and the server's own
//! bulk paths for the same rows. A measurement, not a test; run it with
//!
//! ```sh
//! cargo build --release -p bdr-applier
//! BDR_APPLIER_BIN=target/release/bdr-applier \
//!     cargo run --release -p bdr-tests --example bulk_probe
//! ```
//!
//! `ROWS` sets the transaction's size (default 1,000,000), `RUNS` the
//! number of rounds (default 3), `SMALL=1` writes that many single-row
//! transactions instead; `BDR_STREAMING=off` (inherited by the
//! appliers) for whole transactions only, and
//! `BDR_TEST_APPLIER_LOG=info,bdr_applier::apply::streamed=debug` to see
//! whether b applied a streamed transaction as it arrived.

use std::time::Instant;

use bdr_tests::{Mesh, cpu_seconds, env_u64};

const SCHEMA: &str = "CREATE TABLE bench_bulk (id int PRIMARY KEY, a int, b text, c timestamptz, d numeric, e float8)";

const PEEK: &str = "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('probe', NULL, NULL, \
    'startup_version', '1', 'min_proto_version', '1', 'max_proto_version', '1', 'node_id', '1', \
    'node_name', 'probe', 'pg_version_num', '150020', 'datum_formats', 'text,binary', \
    'forward_origins', 'false')";

fn main() {
    let rows = env_u64("ROWS", 1_000_000);
    let runs = env_u64("RUNS", 3);
    let small = env_u64("SMALL", 0) != 0;
    let mut mesh = Mesh::new(&["a", "b"], SCHEMA);
    for n in ["a", "b"] {
        mesh.node_mut(n).append_conf(
            "shared_buffers = 256MB\nlogical_decoding_work_mem = 64MB\n\
             max_wal_size = 4GB\nautovacuum = off\n",
        );
        mesh.node_mut(n).restart();
    }
    mesh.wait_for_streaming();
    mesh.node("b").safe_psql("CREATE DATABASE probe");
    let dump = std::env::temp_dir().join(format!("bulk_probe_{}.copy", std::process::id()));
    let insert = "INSERT INTO bench_bulk SELECT g, g % 1000, md5(g::text), now(), g * 1.5, g / 7.0 \
                  FROM generate_series";
    for run in 0..runs {
        mesh.node("a").safe_psql("TRUNCATE bench_bulk");
        mesh.wait_for_catchup();
        for n in ["a", "b"] {
            mesh.node(n).safe_psql("VACUUM ANALYZE");
            mesh.node(n).safe_psql("CHECKPOINT");
        }
        mesh.applier("b").stop();
        let a = mesh.node("a");
        a.safe_psql("SELECT pg_create_logical_replication_slot('probe', 'bdr')");
        let t = Instant::now();
        if small {
            // As many single-row transactions instead.
            a.safe_psql(&format!(
                "DO $$ BEGIN FOR i IN 1..{rows} LOOP
                     {insert}(i, i) g; COMMIT;
                 END LOOP; END $$"
            ));
        } else {
            a.safe_psql(&format!("{insert}(1, {rows}) g"));
        }
        let write = t.elapsed().as_secs_f64();
        let t = Instant::now();
        a.safe_psql(PEEK);
        let decode = t.elapsed().as_secs_f64();
        a.safe_psql("SELECT pg_drop_replication_slot('probe')");
        let t = Instant::now();
        mesh.applier("b").restart();
        mesh.wait_for_catchup_from("a");
        let apply = t.elapsed().as_secs_f64();
        // CPU of the processes that carried it, all started with the
        // applier's restart: a's walsender, b's applier and its sessions.
        let walsender = mesh
            .node("a")
            .pids("SELECT pid FROM pg_stat_replication WHERE application_name = 'b'");
        let sessions = mesh.node("b").pids(
            "SELECT pid FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        );
        // b's walsender to a decodes what b applied, to filter it out.
        let echo = mesh
            .node("b")
            .pids("SELECT pid FROM pg_stat_replication WHERE application_name = 'a'");
        let applier = mesh
            .applier("b")
            .pid()
            .map_or(0.0, |p| cpu_seconds(p as i32));
        eprintln!(
            "run {run}: CPU s: a's walsender {:.2}, b's applier {applier:.2}, its sessions {:.2}, \
             b's walsender to a {:.2}",
            walsender.iter().map(|p| cpu_seconds(*p)).sum::<f64>(),
            sessions.iter().map(|p| cpu_seconds(*p)).sum::<f64>(),
            echo.iter().map(|p| cpu_seconds(*p)).sum::<f64>(),
        );
        // How a's walsender for b sent it: streamed in blocks, or spilled
        // to disk and sent after its commit.
        let slots = mesh.node("a").safe_psql(
            "SELECT sum(stream_txns) || ' streamed in ' || sum(stream_count) || ' blocks, ' \
                    || sum(spill_txns) || ' spilled (' || pg_size_pretty(sum(spill_bytes)) || ')' \
               FROM pg_stat_replication_slots WHERE slot_name LIKE 'bdr_%'",
        );
        mesh.node("a")
            .safe_psql("SELECT pg_stat_reset_replication_slot(NULL)");
        let log = mesh.applier("b").log();
        let how = if log.matches("committed as it arrived").count() > run as usize {
            ", applied as it arrived"
        } else {
            ""
        };
        eprintln!("run {run}: a's walsender: {slots}{how}");

        // The server's own bulk paths for the same rows, on b, in a
        // database of its own that nothing replicates.
        let b = mesh.node("b");
        b.safe_psql(&format!("COPY bench_bulk TO '{}'", dump.display()));
        let mut c = postgres::Client::connect(&b.connstr_db("probe"), postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "DROP TABLE IF EXISTS probe_ins; DROP TABLE IF EXISTS probe_src; {}; \
             CREATE TABLE probe_src AS SELECT * FROM probe_ins",
            SCHEMA.replace("bench_bulk", "probe_ins")
        ))
        .unwrap();
        let t = Instant::now();
        c.batch_execute(&format!("COPY probe_ins FROM '{}'", dump.display()))
            .unwrap();
        let copy = t.elapsed().as_secs_f64();
        c.batch_execute("INSERT INTO probe_src SELECT * FROM probe_ins; TRUNCATE probe_ins")
            .unwrap();
        c.batch_execute("VACUUM ANALYZE").unwrap();
        c.batch_execute("CHECKPOINT").unwrap();
        let t = Instant::now();
        c.batch_execute("INSERT INTO probe_ins SELECT * FROM probe_src")
            .unwrap();
        let ins = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&dump);
        eprintln!(
            "run {run}: origin insert {write:.2} s, bdr decode (peek) {decode:.2} s, \
             b catch-up {apply:.2} s = {:.0} rows/s; on b alone: COPY FROM {copy:.2} s, \
             INSERT ... SELECT {ins:.2} s",
            rows as f64 / apply
        );
    }
}
