//! `bdr-bench`: bdr against PostgreSQL's built-in logical replication and
//! pglogical 2, in one run on one machine.
//!
//! Sets up three origin -> receiver pairs on loopback (bdr plugin +
//! bdr-applier; publication + subscription, text and binary; pglogical),
//! runs the same workloads on each, and prints one table of medians and
//! ratios; every run's values also go to a JSON file. Runs are interleaved
//! (run 1 of every system, then run 2, ...) so that a noisy moment on the
//! machine does not fall on one system only. Only one pair works at a
//! time; the others sit idle.

mod catchup;
mod decode;
mod live;
mod pair;
mod pg;
mod report;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::json;

use pair::{Kind, Pair};
use report::{Report, System};

/// Benchmarks bdr against built-in logical replication and pglogical.
#[derive(Debug, Parser)]
#[command(name = "bdr-bench")]
struct Cli {
    /// Runs per figure; each figure is the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tiny sizes, for the smoke test (not representative).
    #[arg(long)]
    quick: bool,
    /// Transactions in the catch-up backlog (1a).
    #[arg(long)]
    backlog: Option<u64>,
    /// pgbench scale factor (100,000 accounts each).
    #[arg(long)]
    scale: Option<u32>,
    /// pgbench clients.
    #[arg(long)]
    clients: Option<u32>,
    /// Rows in the single bulk transaction (2a).
    #[arg(long)]
    bulk_rows: Option<u64>,
    /// Seconds of full-speed writing (1b) and of rate-limited writing (3).
    #[arg(long)]
    seconds: Option<u64>,
    /// Workloads to run, comma-separated: catchup (1a, 2, 6), live (1b, 3),
    /// decode (4, 5).
    #[arg(long, value_delimiter = ',', default_value = "catchup,live,decode")]
    only: Vec<String>,
    /// Systems to run for catch-up, comma-separated, by their key in the
    /// JSON file (bdr, bdr_parallel, builtin, ...); all when not given.
    /// The pairs are set up all the same.
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// Where the JSON results go.
    #[arg(long, default_value = "bench-results.json")]
    json: PathBuf,
}

/// Workload sizes.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub scale: u32,
    pub clients: u32,
    pub backlog: u64,
    pub bulk_rows: u64,
    pub bulk_batches: u64,
    pub bulk_batch_rows: u64,
    pub seconds: u64,
    pub decode_tx: u64,
    pub decode_rows: u64,
}

impl Sizes {
    fn from_cli(cli: &Cli) -> Sizes {
        let base = if cli.quick {
            Sizes {
                scale: 1,
                clients: 2,
                backlog: 2_000,
                bulk_rows: 20_000,
                bulk_batches: 20,
                bulk_batch_rows: 500,
                seconds: 2,
                decode_tx: 1_000,
                decode_rows: 4_000,
            }
        } else {
            Sizes {
                scale: 5,
                clients: 4,
                backlog: 200_000,
                bulk_rows: 1_000_000,
                bulk_batches: 1_000,
                bulk_batch_rows: 1_000,
                seconds: 20,
                decode_tx: 50_000,
                decode_rows: 200_000,
            }
        };
        Sizes {
            scale: cli.scale.unwrap_or(base.scale),
            clients: cli.clients.unwrap_or(base.clients),
            backlog: cli.backlog.unwrap_or(base.backlog),
            bulk_rows: cli.bulk_rows.unwrap_or(base.bulk_rows),
            seconds: cli.seconds.unwrap_or(base.seconds),
            ..base
        }
    }
}

/// Prints a progress line with the seconds since the start.
pub fn note(msg: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(Instant::now);
    eprintln!("bdr-bench [{:6.1}s] {msg}", start.elapsed().as_secs_f64());
}

/// How long any single wait may take before the run fails.
pub fn wait_limit() -> Duration {
    bdr_tests::timeout().max(Duration::from_secs(600))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(unknown) = cli
        .systems
        .iter()
        .find(|k| !System::ALL.iter().any(|s| s.key() == k.as_str()))
    {
        let keys: Vec<&str> = System::ALL.iter().map(|s| s.key()).collect();
        anyhow::bail!(
            "--systems: no system is called {unknown:?}; the systems are {}",
            keys.join(", ")
        );
    }
    let sizes = Sizes::from_cli(&cli);
    let started = Instant::now();
    let applier = bdr_tests::applier_binary();
    // Other checkouts on the machine may install their bdr.so meanwhile;
    // servers started later (the decoding one) would load theirs.
    let installed_at_start = check_installed_plugin();
    crate::note(&format!("sizes {sizes:?}, {} run(s)", cli.runs));
    let mut report = Report::default();
    let mut consistent = serde_json::Map::new();
    let wants = |w: &str| cli.only.iter().any(|o| o == w);

    if wants("catchup") || wants("live") {
        let mut pairs = Vec::new();
        for kind in [Kind::Bdr, Kind::Builtin, Kind::Pglogical] {
            crate::note(&format!("setting up the {kind:?} pair"));
            pairs.push(Pair::new(kind, sizes.scale)?);
        }
        for run in 1..=cli.runs {
            for (i, system) in plan(&pairs) {
                let chosen =
                    cli.systems.is_empty() || cli.systems.iter().any(|k| k == system.key());
                if wants("catchup") && chosen {
                    crate::note(&format!("run {run}: catch-up, {system:?}"));
                    catchup::run(&mut pairs[i], system, &sizes, &mut report)?;
                }
            }
            if wants("live") {
                live::run(&mut pairs, &sizes, &mut report)?;
            }
        }
        for pair in &mut pairs {
            let same = pair.verify()?;
            consistent.insert(format!("{:?}", pair.kind).to_lowercase(), same.into());
        }
    }
    if wants("decode") {
        crate::note("decoding");
        decode::run(&sizes, cli.runs, &mut report)?;
    }

    let table = report.table();
    println!("{table}");
    if consistent.values().any(|v| v == false) {
        println!("WARNING: a receiver does not match its origin: {consistent:?}");
    }
    let result = json!({
        "date": run_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": machine(),
        "runs": cli.runs,
        "quick": cli.quick,
        "sizes": format!("{sizes:?}"),
        "applier_binary": applier.display().to_string(),
        "applier_profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "installed_plugin_matches_build": {
            "at_start": installed_at_start,
            "at_end": check_installed_plugin(),
        },
        "seconds_total": started.elapsed().as_secs_f64(),
        "receiver_matches_origin": consistent,
        "figures": report.figures_json(),
        "table": table,
    });
    std::fs::write(&cli.json, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("writing {}", cli.json.display()))?;
    eprintln!(
        "bdr-bench: results in {} ({:.0} s)",
        cli.json.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Which pair stands for which system: the built-in pair twice, with
/// the subscription in text and in binary mode; the bdr pair seven times:
/// as it runs, applying one statement at a time, pipelined without
/// batches, without conflict detection, batching statements without the
/// server's apply function, and on two batched sessions (parallel apply;
/// those four for catch-up only: they are for comparison), and asking for
/// whole transactions only (for the one large transaction only).
fn plan(pairs: &[Pair]) -> Vec<(usize, System)> {
    let mut out = Vec::new();
    for (i, pair) in pairs.iter().enumerate() {
        match pair.kind {
            Kind::Bdr => {
                out.push((i, System::Bdr));
                out.push((i, System::BdrSerial));
                out.push((i, System::BdrPipelined));
                out.push((i, System::BdrPlain));
                out.push((i, System::BdrStatements));
                out.push((i, System::BdrNoStream));
                out.push((i, System::BdrParallel));
            }
            Kind::Builtin => {
                out.push((i, System::Builtin));
                out.push((i, System::BuiltinBinary));
            }
            Kind::Pglogical => out.push((i, System::Pglogical)),
        }
    }
    out
}

/// Whether the installed bdr.so is the one in target/release (warns if
/// not: the servers would run another version of the plugin).
fn check_installed_plugin() -> Option<bool> {
    let installed = std::fs::read(pg::pkglibdir().join("bdr.so")).ok()?;
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/libbdr.so");
    let built = std::fs::read(built).ok()?;
    let same = installed == built;
    if !same {
        eprintln!(
            "bdr-bench: warning: the installed bdr.so differs from target/release/libbdr.so; \
             run scripts/setup.sh"
        );
    }
    Some(same)
}

fn run_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// CPU model, core count, memory, kernel, load at the end of the run.
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    json!({
        "cpu": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory": mem,
        "kernel": run_output("uname", &["-sr"]),
        "postgres": run_output("/usr/lib/postgresql/15/bin/postgres", &["--version"]),
        "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}
