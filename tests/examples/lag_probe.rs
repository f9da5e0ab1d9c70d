//! Lag under a steady load, sampled every few milliseconds: a measurement,
//! not a test (the test suite never times anything). Node a runs pgbench
//! (one UPDATE and one INSERT per transaction, 4 clients, `RATE`
//! transactions per second, default 2300, for 10 s); the probe compares a's
//! WAL position with b's replication origin progress and prints the
//! percentiles of the time lag and the worst samples, with how far a's
//! walsender had sent at the time (and their wall-clock time). b's applier
//! logs at debug level to `/tmp/lag_probe_applier.log` (its status updates
//! show what it had received and applied when; `PROBE_LOG` sets its
//! `RUST_LOG`, e.g. `info,bdr_applier::apply::wire=trace` adds when each
//! batch went out and was answered). With `SYSTEM=builtin` the appliers
//! stop and b subscribes to a with PostgreSQL's own logical replication
//! instead, under the same load and sampling. Run it with
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
    let builtin = std::env::var("SYSTEM").as_deref() == Ok("builtin");
    if builtin {
        mesh.applier("a").stop();
        mesh.applier("b").stop();
        mesh.node("a")
            .safe_psql("CREATE PUBLICATION probe_pub FOR TABLE acc, hist");
        let connstr = mesh.node("a").connstr();
        mesh.node("b").safe_psql(&format!(
            "CREATE SUBSCRIPTION probe_sub CONNECTION '{connstr}' PUBLICATION probe_pub WITH (copy_data = false)"
        ));
        while mesh
            .node("b")
            .safe_psql("SELECT count(*) FROM pg_stat_subscription WHERE received_lsn IS NOT NULL")
            != "1"
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        mesh.applier("b").stop();
        mesh.applier("b").restart_with_env(&[(
            "RUST_LOG",
            std::env::var("PROBE_LOG")
                .as_deref()
                .unwrap_or("info,bdr_applier=debug"),
        )]);
        mesh.wait_for_catchup();
    }
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
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let mut wal: Vec<(f64, u64)> = Vec::new();
    // (time, lag of what b applied, lag of what a's walsender sent), ms.
    let mut lags: Vec<(f64, f64, f64)> = Vec::new();
    while start.elapsed() < Duration::from_secs(10) {
        let t = start.elapsed().as_secs_f64();
        let row = a
            .query_one(
                "SELECT pg_current_wal_lsn()::text,
                        (SELECT max(sent_lsn)::text FROM pg_stat_replication)",
                &[],
            )
            .unwrap();
        let al: String = row.get(0);
        let sent = row.get::<_, Option<String>>(1).map_or(0, |s| lsn(&s));
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
        // How long ago a's WAL first passed `pos`.
        let behind = |pos: u64| {
            let at = wal.iter().find(|(_, l)| *l > pos).map_or(now, |(t, _)| *t);
            (now - at).max(0.0) * 1000.0
        };
        if t > 1.0 {
            lags.push((now, behind(applied), behind(sent)));
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
    for (t, l, s) in worst.iter().take(8) {
        let at = wall + t;
        let clock = format!(
            "{:02}:{:02}:{:06.3}",
            (at / 3600.0) as u64 % 24,
            (at / 60.0) as u64 % 60,
            at % 60.0
        );
        eprintln!(
            "  t={t:.3}s ({clock} UTC) lag {l:.1} ms (a's walsender had sent all but {s:.1} ms)"
        );
    }
    if builtin {
        mesh.node("b").safe_psql("DROP SUBSCRIPTION probe_sub");
        return;
    }
    let log = mesh.applier("b").log();
    eprintln!(
        "applier log lines (not status): {}",
        log.lines().filter(|l| !l.contains("status update")).count()
    );
    std::fs::write("/tmp/lag_probe_applier.log", log).unwrap();
}
