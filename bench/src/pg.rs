//! PostgreSQL client programs and process accounting.
//!
//! `pgbench` is the writer of every workload that needs many small
//! transactions; CPU time comes from `/proc/<pid>/stat` (utime + stime, in
//! clock ticks), which counts every thread of a process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};
use bdr_tests::{Node, bindir};

/// The directory of PostgreSQL's loadable libraries.
pub fn pkglibdir() -> PathBuf {
    bdr_tests::pg_config("pkglibdir")
}

fn pgbench_command(node: &Node, args: &[&str]) -> Command {
    let mut cmd = Command::new(bindir().join("pgbench"));
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &node.port().to_string(),
        "-U",
        "postgres",
    ])
    .args(args)
    .arg("postgres");
    cmd
}

/// Runs pgbench to completion and returns its standard output.
pub fn pgbench(node: &Node, args: &[&str]) -> anyhow::Result<String> {
    let out = pgbench_command(node, args)
        .output()
        .context("running pgbench")?;
    if !out.status.success() {
        bail!(
            "pgbench {args:?} on {} failed:\n{}{}",
            node.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts pgbench in the background (output captured).
pub fn spawn_pgbench(node: &Node, args: &[&str]) -> anyhow::Result<Child> {
    pgbench_command(node, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting pgbench")
}

/// What a pgbench run reports.
#[derive(Debug, Clone, Copy)]
pub struct PgbenchResult {
    /// Transactions processed.
    pub transactions: u64,
    /// Transactions per second, without the initial connection time.
    pub tps: f64,
}

/// Parses pgbench's summary.
pub fn parse_pgbench(out: &str) -> anyhow::Result<PgbenchResult> {
    let transactions = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split(['/', ' ']).next())
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no transaction count in pgbench output:\n{out}"))?;
    let tps = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no tps in pgbench output:\n{out}"))?;
    Ok(PgbenchResult { transactions, tps })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbench_summary() {
        let out = "transaction type: <builtin: simple update>\n\
                   number of transactions actually processed: 4000/4000\n\
                   tps = 8123.456789 (without initial connection time)\n";
        let r = parse_pgbench(out).unwrap();
        assert_eq!(r.transactions, 4000);
        assert!((r.tps - 8123.456789).abs() < 1e-6);
        let timed = "number of transactions actually processed: 51234\n\
                     tps = 5123.4 (without initial connection time)\n";
        assert_eq!(parse_pgbench(timed).unwrap().transactions, 51234);
    }
}
