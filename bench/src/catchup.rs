//! Workloads 1a and 2 (and the CPU figures of 6): a batch queued on the
//! origin while the receiver is stopped, then applied from a standing
//! start.
//!
//! The timed interval runs from the first marker applied to the last (see
//! [`Pair::timed_catchup`]), so connecting and starting the receiver are
//! reported apart and do not dilute the throughput.

use bdr_tests::Node;

use crate::pair::{Catchup, Pair};
use crate::report::{Report, System};
use crate::{Sizes, pg};

/// Row changes per `pgbench -N` transaction: one update of
/// pgbench_accounts, one insert into pgbench_history.
pub const ROWS_PER_PGBENCH_TX: u64 = 2;

/// Runs one catch-up of each workload on `pair` as `system`.
pub fn run(
    pair: &mut Pair,
    system: System,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<()> {
    if system == System::BdrNoStream {
        // Streaming only changes how a transaction past the sender's
        // logical_decoding_work_mem travels.
        pair.pause_as(system)?;
        return one_big_transaction(pair, system, sizes, report);
    }
    pair.pause_as(system)?;
    small_transactions(pair, system, sizes, report)?;
    pair.pause_as(system)?;
    one_big_transaction(pair, system, sizes, report)?;
    pair.pause_as(system)?;
    many_bulk_transactions(pair, system, sizes, report)?;
    Ok(())
}

fn small_transactions(
    pair: &mut Pair,
    system: System,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<()> {
    // Every run starts with an empty history, whatever ran before on the
    // pair, and the wait for all rows under parallel apply counts this
    // run's rows only. On both sides, before the first marker (the pair
    // is paused): pglogical's insert-only set may not carry a TRUNCATE.
    for node in [&pair.origin, &pair.receiver] {
        node.safe_psql("TRUNCATE pgbench_history");
    }
    let clients = sizes.clients;
    let per_client = sizes.backlog.div_ceil(u64::from(clients));
    let mut written = None;
    let c = pair.timed_catchup(|origin| {
        let out = pg::pgbench(
            origin,
            &[
                "-n",
                "-N",
                "-c",
                &clients.to_string(),
                "-j",
                &clients.min(2).to_string(),
                "-t",
                &per_client.to_string(),
            ],
        )?;
        written = Some(pg::parse_pgbench(&out)?);
        Ok(())
    })?;
    let tx = written.expect("pgbench ran").transactions as f64;
    let rows = tx * ROWS_PER_PGBENCH_TX as f64;
    report_catchup(report, system, &c, tx);
    add_cpu(report, system, &c, rows, "pgbench");
    Ok(())
}

fn report_catchup(report: &mut Report, system: System, c: &Catchup, tx: f64) {
    report.add(
        "catchup_tps",
        "1a catch-up, pgbench -N backlog",
        "tx/s",
        true,
        system,
        tx / c.apply.as_secs_f64(),
    );
    report.add(
        "catchup_startup_s",
        "1a resume to first tx applied",
        "s",
        false,
        system,
        c.startup.as_secs_f64(),
    );
}

fn add_cpu(report: &mut Report, system: System, c: &Catchup, rows: f64, workload: &str) {
    let per = 100_000.0 / rows;
    let (rkey, rlabel, wkey, wlabel) = if workload == "pgbench" {
        (
            "cpu_apply_pgbench",
            "6 receiver CPU per 100k rows (1a)",
            "cpu_walsender_pgbench",
            "6 origin walsender CPU per 100k rows (1a)",
        )
    } else {
        (
            "cpu_apply_bulk",
            "6 receiver CPU per 100k rows (2b)",
            "cpu_walsender_bulk",
            "6 origin walsender CPU per 100k rows (2b)",
        )
    };
    report.add(rkey, rlabel, "CPU s", false, system, c.cpu_receiver * per);
    report.add(wkey, wlabel, "CPU s", false, system, c.cpu_walsender * per);
}

const BULK_INSERT: &str = "INSERT INTO bench_bulk \
    SELECT g, g % 1000, md5(g::text), now(), g * 1.5, g / 7.0 FROM generate_series";

/// Empties the bulk table through replication, before the timed batch:
/// the receiver applies the TRUNCATE before the first marker.
fn empty_bulk(pair: &Pair) {
    pair.origin.safe_psql("TRUNCATE bench_bulk");
}

fn one_big_transaction(
    pair: &mut Pair,
    system: System,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<()> {
    empty_bulk(pair);
    let rows = sizes.bulk_rows;
    let c = pair.timed_catchup(|origin| {
        origin.safe_psql(&format!("{BULK_INSERT}(1, {rows}) g"));
        Ok(())
    })?;
    report.add(
        "bulk_one_tx_rows_s",
        "2a one transaction of N rows",
        "rows/s",
        true,
        system,
        rows as f64 / c.apply.as_secs_f64(),
    );
    Ok(())
}

fn many_bulk_transactions(
    pair: &mut Pair,
    system: System,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<()> {
    empty_bulk(pair);
    let (n, per) = (sizes.bulk_batches, sizes.bulk_batch_rows);
    let c = pair.timed_catchup(|origin: &Node| {
        let mut client = postgres::Client::connect(&origin.connstr(), postgres::NoTls)?;
        for i in 0..n {
            let first = i * per + 1;
            client.batch_execute(&format!("{BULK_INSERT}({first}, {}) g", first + per - 1))?;
        }
        Ok(())
    })?;
    let rows = (n * per) as f64;
    report.add(
        "bulk_many_tx_rows_s",
        "2b many transactions of M rows",
        "rows/s",
        true,
        system,
        rows / c.apply.as_secs_f64(),
    );
    add_cpu(report, system, &c, rows, "bulk");
    Ok(())
}
