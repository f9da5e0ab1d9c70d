//! Where the catch-up time of a backlog of small transactions goes: a
//! measurement, not a test. Node a writes `TX` (default 100,000)
//! pgbench-style transactions (one UPDATE by key and one INSERT each, 4
//! clients) while b's applier is stopped; then b catches up, and the probe
//! prints the rate and the CPU seconds of a's walsender, b's applier and
//! its sessions. `SYSTEM=builtin` has b subscribe with PostgreSQL's own
//! logical replication instead (disabled while a writes), for the same
//! figures of its walsender and apply worker; `RUNS` rounds (default 3).
//! `PERF=file` records the whole machine during each catch-up with
//! `perf record -a --call-graph dwarf` (file, file.1, ...).
//! `LANE_ROWS=1` has every row of `acc` on b last written through the
//! origin of a parallel apply session for a (`bdr_<a>_1`) before each
//! round, as after a round with parallel apply (those rows are a's too);
//! `LANE_ROWS=own` through a's own origin (what the rewrite costs alone).
//! `CONFLICTS=1` makes every UPDATE a conflict: before each round b
//! rewrites all rows through a replication origin of its own (not sent to
//! a), so each row a updates was last written on b by another origin.
//! `SPREAD_ROWS=1` has b rewrite every row of `acc` through a's origin,
//! each in a transaction of its own, once before the rounds: the rows'
//! writers then span 500,000 transaction ids, as after a long life,
//! instead of the one of the initial load (the commit timestamp that
//! conflict detection looks up for each row found is then rarely in
//! memory).
//! `ONE_WAY=1` stops a's applier before the rounds, so that b has no
//! walsender decoding what it applies (as in the benchmark's pairs).
//! `CALLGRIND=dir` runs b's server under `valgrind --tool=callgrind`
//! (instructions counted, not seconds: the same work counts the same
//! however busy the machine is), one file per process in `dir`
//! (`cg.<pid>`, written when the process exits: the apply sessions at the
//! end of each round; the count is the `totals:` line, the `summary:`
//! line of a forked process is wrong); b's processes run some 50 times
//! slower, so use a small `TX`. An applier is profiled the same way
//! through `BDR_APPLIER_BIN` naming a wrapper script.
//! `BULK=1` has each transaction insert 1,000 rows into `bulk` instead
//! (the benchmark's workload 2b: `TX` transactions from one client).
//! `CONF=lines` appends `lines` to both servers' settings (for example
//! `CONF='bdr.writer_cache_size = 0'`).
//! Run it with
//!
//! ```sh
//! cargo build --release -p bdr-applier
//! BDR_APPLIER_BIN=target/release/bdr-applier \
//!     cargo run --release -p bdr-tests --example catchup_probe
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use bdr_tests::{Mesh, Node, bindir, cpu_of, cpu_seconds, env_u64};

/// The summed CPU seconds of the processes a query on `node` returns.
fn cpu_of_query(node: &Node, sql: &str) -> f64 {
    cpu_of(&node.pids(sql))
}

fn main() {
    let tx = env_u64("TX", 100_000);
    let runs = env_u64("RUNS", 3);
    let builtin = std::env::var("SYSTEM").as_deref() == Ok("builtin");
    let conflicts = std::env::var("CONFLICTS").as_deref() == Ok("1");
    let lane_rows = std::env::var("LANE_ROWS").as_deref() == Ok("1");
    let own_rows = std::env::var("LANE_ROWS").as_deref() == Ok("own");
    let mut mesh = Mesh::new(
        &["a", "b"],
        "CREATE TABLE acc (aid int PRIMARY KEY, abalance int, filler char(84));
         CREATE TABLE hist (aid int, delta int, mtime timestamp);
         CREATE TABLE bulk (id bigint PRIMARY KEY, a int, b text, c timestamptz, d numeric, e float8);
         CREATE SEQUENCE bulk_id;",
    );
    // The benchmark's server settings (bench/src/pair.rs).
    for name in ["a", "b"] {
        let node = mesh.node_mut(name);
        node.append_conf(
            "shared_buffers = 256MB\ncheckpoint_timeout = 30min\nmax_wal_size = 4GB\n\
             logical_decoding_work_mem = 64MB\nautovacuum = off\n",
        );
        if let Ok(lines) = std::env::var("CONF") {
            node.append_conf(&lines);
        }
        node.restart();
    }
    mesh.wait_for_streaming();
    mesh.node("a")
        .safe_psql("INSERT INTO acc SELECT g, 0, '' FROM generate_series(1, 500000) g");
    mesh.wait_for_catchup();
    if let Ok(dir) = std::env::var("CALLGRIND") {
        restart_under_callgrind(mesh.node_mut("b"), std::path::Path::new(&dir));
        mesh.wait_for_streaming();
    }
    if std::env::var("ONE_WAY").as_deref() == Ok("1") && !builtin {
        mesh.applier("a").stop();
    }
    if std::env::var("SPREAD_ROWS").as_deref() == Ok("1") {
        // b's applier holds a's origin meanwhile.
        mesh.applier("b").stop();
        let b = mesh.node("b");
        b.safe_psql(
            "CREATE PROCEDURE probe_spread() LANGUAGE plpgsql AS $$ \
             BEGIN \
               PERFORM pg_replication_origin_session_setup(roname) \
                  FROM pg_replication_origin WHERE roname ~ '^bdr_[0-9a-f]{16}$'; \
               FOR i IN 1..500000 LOOP \
                 UPDATE acc SET filler = 's' WHERE aid = i; \
                 COMMIT; \
               END LOOP; \
             END $$",
        );
        // A CALL alone: its COMMITs need a non-atomic context.
        b.safe_psql("CALL probe_spread()");
        b.safe_psql("VACUUM acc");
        mesh.applier("b").restart();
    }
    if builtin {
        mesh.applier("a").stop();
        mesh.applier("b").stop();
        mesh.node("a")
            .safe_psql("CREATE PUBLICATION probe_pub FOR TABLE acc, hist, bulk");
        let connstr = mesh.node("a").connstr();
        mesh.node("b").safe_psql(&format!(
            "CREATE SUBSCRIPTION probe_sub CONNECTION '{connstr}' PUBLICATION probe_pub \
             WITH (copy_data = false, enabled = false)"
        ));
    }
    let script = std::env::temp_dir().join(format!("catchup_probe_{}.sql", std::process::id()));
    let bulk = std::env::var("BULK").as_deref() == Ok("1");
    std::fs::write(
        &script,
        if bulk {
            // The benchmark's workload 2b.
            "INSERT INTO bulk SELECT nextval('bulk_id'), g % 1000, md5(g::text), now(), \
             g * 1.5, g / 7.0 FROM generate_series(1, 1000) g;\n"
        } else {
            "\\set aid random(1, 500000)\nBEGIN;\n\
             UPDATE acc SET abalance = abalance + 1 WHERE aid = :aid;\n\
             INSERT INTO hist VALUES (:aid, 1, now());\nEND;\n"
        },
    )
    .unwrap();
    // The table every transaction adds rows to.
    let added = if bulk { "bulk" } else { "hist" };
    for run in 0..runs {
        // A checkpoint logs the running transactions; once b has
        // confirmed past it, a's slot need not decode the initial load
        // again (the built-in's slot starts after it).
        if !builtin {
            mesh.node("a").safe_psql("CHECKPOINT");
            mesh.wait_for_catchup_from("a");
            mesh.applier("b").stop();
        }
        if lane_rows {
            // As a parallel apply session would have left them.
            mesh.node("b").safe_psql(
                "SELECT pg_replication_origin_create(roname || '_1') \
                   FROM pg_replication_origin \
                  WHERE roname ~ '^bdr_[0-9a-f]{16}$' \
                    AND NOT EXISTS (SELECT FROM pg_replication_origin o \
                                     WHERE o.roname = pg_replication_origin.roname || '_1'); \
                 SELECT pg_replication_origin_session_setup(roname) \
                   FROM pg_replication_origin WHERE roname ~ '^bdr_[0-9a-f]{16}_1$'; \
                 UPDATE acc SET filler = 'b'",
            );
        }
        if own_rows {
            // The same rewrite through a's own origin: what it costs alone.
            mesh.node("b").safe_psql(
                "SELECT pg_replication_origin_session_setup(roname) \
                   FROM pg_replication_origin WHERE roname ~ '^bdr_[0-9a-f]{16}$'; \
                 UPDATE acc SET filler = 'b'",
            );
        }
        if conflicts {
            mesh.node("b").safe_psql(
                "SELECT pg_replication_origin_create('probe_local') \
                  WHERE NOT EXISTS (SELECT FROM pg_replication_origin WHERE roname = 'probe_local'); \
                 SELECT pg_replication_origin_session_setup('probe_local'); \
                 UPDATE acc SET filler = 'b'",
            );
        }
        let port = mesh.node("a").port().to_string();
        // One client for BULK=1, as the benchmark writes 2b: keys ascend.
        let clients: u64 = if bulk { 1 } else { 4 };
        let per_client = (tx / clients).to_string();
        let t = Instant::now();
        let status = Command::new(bindir().join("pgbench"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-n"])
            .arg("-f")
            .arg(&script)
            .args([
                "-c",
                &clients.to_string(),
                "-j",
                &clients.min(2).to_string(),
            ])
            .args(["-t", &per_client, "postgres"])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let write = t.elapsed().as_secs_f64();
        let perf = std::env::var("PERF").ok().map(|file| {
            let out = if run == 0 {
                file
            } else {
                format!("{file}.{run}")
            };
            let child = Command::new("perf")
                .args([
                    "record",
                    "-q",
                    "-a",
                    "-F",
                    "499",
                    "--call-graph",
                    "dwarf",
                    "-o",
                    &out,
                ])
                .spawn()
                .expect("perf record");
            std::thread::sleep(Duration::from_millis(500));
            child
        });
        let walwriter_before = walwriter_cpu(mesh.node("b"));
        let t = Instant::now();
        let (walsender, apply) = if builtin {
            let b = mesh.node("b");
            b.safe_psql("ALTER SUBSCRIPTION probe_sub ENABLE");
            // As for bdr: what the receiver reports as applied.
            mesh.node("a").wait_until_applied_by("probe_sub");
            let apply = cpu_of_query(
                b,
                "SELECT pid FROM pg_stat_subscription WHERE pid IS NOT NULL",
            );
            let walsender = cpu_of_query(
                mesh.node("a"),
                "SELECT pid FROM pg_stat_replication WHERE application_name = 'probe_sub'",
            );
            b.safe_psql("ALTER SUBSCRIPTION probe_sub DISABLE");
            // Gone (and, under callgrind, its profile written).
            b.poll_query_until(
                "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL",
                "0",
            );
            (walsender, apply)
        } else {
            mesh.applier("b").restart();
            mesh.wait_for_catchup_from("a");
            // Every row there, whatever the applier reports.
            let count = format!("SELECT count(*) FROM {added}");
            let rows = mesh.node("a").safe_psql(&count);
            mesh.node("b").poll_query_until(&count, &rows);
            let sessions = cpu_of_query(
                mesh.node("b"),
                "SELECT pid FROM pg_stat_activity \
                 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            );
            let applier = mesh
                .applier("b")
                .pid()
                .map_or(0.0, |p| cpu_seconds(p as i32));
            let each: Vec<String> = mesh
                .node("b")
                .pids(
                    "SELECT pid FROM pg_stat_activity \
                     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
                     ORDER BY pid",
                )
                .iter()
                .map(|&p| format!("{:.2}", cpu_seconds(p)))
                .collect();
            eprintln!(
                "run {run}: b's applier {applier:.2} CPU s, its sessions {sessions:.2} ({})",
                each.join(" + ")
            );
            let walsender = cpu_of_query(
                mesh.node("a"),
                "SELECT pid FROM pg_stat_replication WHERE application_name = 'b'",
            );
            (walsender, applier + sessions)
        };
        let catch_up = t.elapsed().as_secs_f64();
        let walwriter = walwriter_cpu(mesh.node("b")) - walwriter_before;
        if let Some(mut child) = perf {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        // Whether a's walsender spilled or streamed any of it.
        let slots = mesh.node("a").safe_psql(
            "SELECT sum(spill_txns) || ' spilled (' || pg_size_pretty(sum(spill_bytes)) \
                    || '), ' || sum(stream_txns) || ' streamed' FROM pg_stat_replication_slots",
        );
        mesh.node("a")
            .safe_psql("SELECT pg_stat_reset_replication_slot(NULL)");
        eprintln!("run {run}: a's slots: {slots}");
        eprintln!(
            "run {run}: {tx} tx written in {write:.2} s; {} caught up in {catch_up:.2} s = {:.0} tx/s; \
             CPU s: a's walsender {walsender:.2}, apply {apply:.2}, b's walwriter {walwriter:.2}",
            if builtin { "built-in" } else { "bdr" },
            tx as f64 / catch_up
        );
    }
    if !builtin {
        // A clean stop: an applier run under a profiler (through
        // BDR_APPLIER_BIN) writes its profile as it exits.
        mesh.applier("b").stop();
    }
    let _ = std::fs::remove_file(&script);
}

/// CPU seconds of `node`'s WAL writer, which the receiver's asynchronous
/// commits wake.
fn walwriter_cpu(node: &Node) -> f64 {
    cpu_of_query(
        node,
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'",
    )
}

/// Restarts `node` with its server under callgrind, one output file per
/// process in `dir`.
fn restart_under_callgrind(node: &mut Node, dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    // The server user writes the profiles.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let wrapper = dir.join("postgres-under-callgrind");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file={}/cg.%p {} \"$@\"\n",
            dir.display(),
            bindir().join("postgres").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    node.stop();
    node.start_under(&wrapper);
}
