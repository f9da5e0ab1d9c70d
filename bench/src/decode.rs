//! Workloads 4 and 5: what each output plugin makes of the same WAL,
//! through the SQL slot functions (a port of `plugin/bench/decode.sh`).
//!
//! One server, one slot per plugin, created before the writes. Each plugin
//! decodes the same WAL with `pg_logical_slot_peek_binary_changes`, which
//! does not consume, so every run decodes the same range. Two workloads:
//! pgbench -N (small transactions, 2 row changes each) and decode.sh's mix
//! (1000-row insert transactions, then updates of half and deletes of a
//! quarter of the rows).
//!
//! Bytes per change count what the plugin emits plus, per message, the
//! 30 bytes the streaming protocol wraps it in (CopyData `d` + length,
//! XLogData `w` + three LSN/time fields), divided by row changes: begin,
//! commit and relation messages are part of the cost of a change.

use std::time::Instant;

use bdr_protocol::{DatumFormats, StartupOptions};
use bdr_tests::Node;

use crate::report::{Report, System};
use crate::{Sizes, catchup, pg};

/// Bytes of streaming-protocol framing around each decoded message.
const FRAMING: f64 = 30.0;

/// The plugins compared, by the system whose stream they produce.
fn cases(pg_version: u32) -> Vec<(System, &'static str, String)> {
    let mut bdr = StartupOptions::new(1, "bench", pg_version);
    // What bdr-applier asks for: binary where safe, text otherwise.
    bdr.datum_formats = DatumFormats::TEXT.union(DatumFormats::BINARY);
    let bdr_opts: Vec<String> = bdr
        .to_pairs()
        .iter()
        .flat_map(|(k, v)| [format!("'{k}'"), format!("'{v}'")])
        .collect();
    vec![
        (System::Bdr, "bdr_s", bdr_opts.join(", ")),
        (
            System::Builtin,
            "pgo_s",
            "'proto_version', '1', 'publication_names', 'p'".into(),
        ),
        (
            System::BuiltinBinary,
            "pgo_s",
            "'proto_version', '1', 'publication_names', 'p', 'binary', 'true'".into(),
        ),
        (System::Wal2json, "w2j_s", "'format-version', '2'".into()),
    ]
}

/// Sets up the server, writes both workloads and measures each plugin.
pub fn run(sizes: &Sizes, runs: usize, report: &mut Report) -> anyhow::Result<()> {
    let mut node = Node::init("decode");
    node.append_conf(
        "shared_buffers = 256MB\nlogical_decoding_work_mem = 64MB\nmax_wal_size = 4GB\n",
    );
    node.start();
    pg::pgbench(&node, &["-i", "-q", "-s", "1"])?;
    node.safe_psql(
        "CREATE TABLE bench (id int PRIMARY KEY, a int, b text, c timestamptz, d numeric, e float8);
         CREATE PUBLICATION p FOR ALL TABLES",
    );
    for (slot, plugin) in [
        ("bdr_s", "bdr"),
        ("pgo_s", "pgoutput"),
        ("w2j_s", "wal2json"),
    ] {
        node.safe_psql(&format!(
            "SELECT pg_create_logical_replication_slot('{slot}', '{plugin}')"
        ));
    }
    let version: u32 = node.safe_psql("SHOW server_version_num").parse()?;
    let cases = cases(version);

    let per_client = sizes.decode_tx.div_ceil(u64::from(sizes.clients));
    let out = pg::pgbench(
        &node,
        &[
            "-n",
            "-N",
            "-c",
            &sizes.clients.to_string(),
            "-j",
            &sizes.clients.min(2).to_string(),
            "-t",
            &per_client.to_string(),
        ],
    )?;
    let changes = pg::parse_pgbench(&out)?.transactions * catchup::ROWS_PER_PGBENCH_TX;
    measure(&node, &cases, runs, changes, Workload::Small, report)?;

    for (_, slot, _) in &cases {
        node.safe_psql(&format!(
            "SELECT pg_replication_slot_advance('{slot}', pg_current_wal_lsn())"
        ));
    }
    let rows = sizes.decode_rows;
    let mut client = node.connect();
    for i in (0..rows).step_by(1000) {
        client.batch_execute(&format!(
            "INSERT INTO bench SELECT g, g % 1000, md5(g::text), now(), g * 1.5, g / 7.0
               FROM generate_series({}, {}) g",
            i + 1,
            (i + 1000).min(rows)
        ))?;
    }
    client.batch_execute("UPDATE bench SET a = a + 1, b = b || 'x' WHERE id % 2 = 0")?;
    client.batch_execute("DELETE FROM bench WHERE id % 4 = 1")?;
    let changes = rows + rows / 2 + rows.div_ceil(4);
    measure(&node, &cases, runs, changes, Workload::Mixed, report)?;
    node.stop();
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Workload {
    Small,
    Mixed,
}

fn measure(
    node: &Node,
    cases: &[(System, &'static str, String)],
    runs: usize,
    changes: u64,
    workload: Workload,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut client = node.connect();
    let changes = changes as f64;
    for _ in 0..runs {
        for (system, slot, opts) in cases {
            let start = Instant::now();
            let row = client.query_one(
                &format!(
                    "SELECT count(*), coalesce(sum(octet_length(data)), 0)::int8
                       FROM pg_logical_slot_peek_binary_changes('{slot}', NULL, NULL, {opts})"
                ),
                &[],
            )?;
            let secs = start.elapsed().as_secs_f64();
            let (messages, bytes): (i64, i64) = (row.get(0), row.get(1));
            let wire = (bytes as f64 + FRAMING * messages as f64) / changes;
            let payload = bytes as f64 / changes;
            match workload {
                Workload::Small => {
                    report.add(
                        "decode_small_changes_s",
                        "5 decode, pgbench -N WAL",
                        "changes/s",
                        true,
                        *system,
                        changes / secs,
                    );
                    report.add(
                        "bytes_small_wire",
                        "4 bytes/change on the wire, pgbench -N",
                        "B",
                        false,
                        *system,
                        wire,
                    );
                    report.add(
                        "bytes_small_payload",
                        "4 plugin payload/change, pgbench -N",
                        "B",
                        false,
                        *system,
                        payload,
                    );
                }
                Workload::Mixed => {
                    report.add(
                        "decode_mixed_changes_s",
                        "5 decode, 1000-row tx mix",
                        "changes/s",
                        true,
                        *system,
                        changes / secs,
                    );
                    report.add(
                        "bytes_mixed_wire",
                        "4 bytes/change on the wire, 1000-row tx mix",
                        "B",
                        false,
                        *system,
                        wire,
                    );
                    report.add(
                        "bytes_mixed_payload",
                        "4 plugin payload/change, 1000-row tx mix",
                        "B",
                        false,
                        *system,
                        payload,
                    );
                }
            }
        }
    }
    Ok(())
}
