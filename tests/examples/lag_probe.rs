//! Lag under a steady load, sampled every few milliseconds: a measurement,
//! not a test (the test suite never times anything). Node a runs pgbench
//! (one UPDATE and one INSERT per transaction, 4 clients, `RATE`
//! transactions per second, default 2300, for 10 s); the probe compares a's
//! WAL position with b's replication origin progress and prints the
//! percentiles of the time lag and the worst samples. b's applier logs at
//! debug level to `/tmp/lag_probe_applier.log` (its status updates show
//! what it had received and applied when). Run it with
//!
//! ```sh
//! cargo build --release -p bdr-applier
//! BDR_APPLIER_BIN=target/release/bdr-applier \
//!     cargo run --release -p bdr-tests --example lag_probe
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use bdr_tests::{Mesh, bindir};

/// An LSN in `X/Y` form as a number.
fn lsn(s: &str) -> u64 {
    let (a, b) = s.split_once('/').unwrap();
    (u64::from_str_radix(a, 16).unwrap() << 32) | u64::from_str_radix(b, 16).unwrap()
}
fn main() {
    let mut mesh = Mesh::new(
        &["a", "b"],
        "CREATE TABLE acc (aid int PRIMARY KEY, abalance int, filler char(84));
         CREATE TABLE hist (aid int, delta int, mtime timestamp);",
    );
    mesh.node("a")
        .safe_psql("INSERT INTO acc SELECT g, 0, '' FROM generate_series(1, 100000) g");
    mesh.wait_for_catchup();
    mesh.applier("b").stop();
    mesh.applier("b")
        .restart_with_env(&[("RUST_LOG", "info,bdr_applier=debug")]);
    mesh.wait_for_catchup();
    let script = "/tmp/lag_probe.sql";
    std::fs::write(script, "\\set aid random(1, 100000)\nBEGIN;\nUPDATE acc SET abalance = abalance + 1 WHERE aid = :aid;\nINSERT INTO hist VALUES (:aid, 1, now());\nEND;\n").unwrap();
    let rate = std::env::var("RATE").unwrap_or("2300".into());
    let port_a = mesh.node("a").port();
    let port_b = mesh.node("b").port();
    let mut pg = Command::new(bindir().join("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port_a.to_string(),
            "-U",
            "postgres",
            "-n",
            "-f",
            script,
            "-c",
            "4",
            "-j",
            "2",
            "--rate",
            &rate,
            "-T",
            "10",
            "postgres",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let conn = |p: u16| {
        postgres::Client::connect(
            &format!("host=127.0.0.1 port={p} user=postgres dbname=postgres"),
            postgres::NoTls,
        )
        .unwrap()
    };
    let (mut a, mut b) = (conn(port_a), conn(port_b));
    let start = Instant::now();
    let mut wal: Vec<(f64, u64)> = Vec::new();
    let mut lags: Vec<(f64, f64)> = Vec::new();
    while start.elapsed() < Duration::from_secs(10) {
        let t = start.elapsed().as_secs_f64();
        let al: String = a
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .unwrap()
            .get(0);
        wal.push((t, lsn(&al)));
        let bl: Option<String> = b
            .query_one(
                "SELECT max(remote_lsn)::text FROM pg_replication_origin_status",
                &[],
            )
            .unwrap()
            .get(0);
        let applied = bl.map(|s| lsn(&s)).unwrap_or(0);
        let now = start.elapsed().as_secs_f64();
        // When a's WAL first passed what b has applied.
        let at = wal
            .iter()
            .find(|(_, l)| *l > applied)
            .map(|(t, _)| *t)
            .unwrap_or(now);
        if t > 1.0 {
            lags.push((now, (now - at).max(0.0) * 1000.0));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    pg.wait().unwrap();
    let mut v: Vec<f64> = lags.iter().map(|x| x.1).collect();
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize];
    eprintln!(
        "samples {} p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ms",
        v.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        p(1.0)
    );
    let mut worst = lags.clone();
    worst.sort_by(|x, y| y.1.total_cmp(&x.1));
    for (t, l) in worst.iter().take(8) {
        eprintln!("  t={t:.3}s lag {l:.1} ms");
    }
    let log = mesh.applier("b").log();
    eprintln!(
        "applier log lines (not status): {}",
        log.lines().filter(|l| !l.contains("status update")).count()
    );
    std::fs::write("/tmp/lag_probe_applier.log", log).unwrap();
}
