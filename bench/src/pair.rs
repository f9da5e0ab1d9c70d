//! One origin -> receiver pair per replication system, on loopback.
//!
//! ```text
//!   origin (pgbench writes) ──walsender──> receiver (applies)
//!   bdr:       plugin `bdr`        ──> bdr-applier + its backend
//!   built-in:  publication/pgoutput ──> subscription apply worker
//!   pglogical: pglogical_output    ──> pglogical apply worker
//! ```
//!
//! Both sides get the same pgbench tables (`pgbench -i` is deterministic)
//! plus a marker table and a bulk table; nothing is copied at subscription
//! time. Progress is observed on the receiver through marker rows: apply is
//! in commit order in all three systems, so a marker written after a batch
//! is visible on the receiver only once the whole batch is applied.

use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::bail;
use bdr_tests::{ApplierProcess, Node, applier_command};

use crate::pg;
use crate::report::System;

/// Tables both sides of every pair hold, beside pgbench's.
const SCHEMA: &str = "\
CREATE TABLE bench_marker (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());
CREATE TABLE bench_bulk (id int PRIMARY KEY, a int, b text, c timestamptz, d numeric, e float8);";

/// pgbench's tables with a primary key, then the one without.
const KEYED_TABLES: [&str; 5] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "bench_marker",
    "bench_bulk",
];
const HISTORY: &str = "pgbench_history";

/// Settings for the benchmark servers, appended after the test harness's
/// (later lines win). Durability is off on every node alike (`fsync =
/// off` from the harness): the figures compare replication, not disks.
/// Autovacuum is off: the pairs share the machine, and a vacuum of the
/// rows one system just applied would run in the middle of the next
/// system's measurement; instead each timed run starts with a VACUUM
/// ANALYZE of its own pair ([`Pair::tidy`]).
const BENCH_CONF: &str = "\
shared_buffers = 256MB
max_connections = 50
wal_sender_timeout = 60s
wal_receiver_timeout = 60s
checkpoint_timeout = 30min
max_wal_size = 4GB
logical_decoding_work_mem = 64MB
autovacuum = off
log_min_messages = warning
# The built-in launcher waits this long before starting an apply worker
# again for a subscription whose worker just exited (default 5 s); the
# benchmark disables and enables subscriptions between runs.
wal_retrieve_retry_interval = 200ms
";

/// Which replication system a pair runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bdr,
    Builtin,
    Pglogical,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Bdr => "bdr",
            Kind::Builtin => "builtin",
            Kind::Pglogical => "pglogical",
        }
    }
}

/// A running pair. Field order is drop order: the applier and the client
/// go before the servers stop.
pub struct Pair {
    pub kind: Kind,
    applier: Option<ApplierProcess>,
    poll: postgres::Client,
    next_marker: i32,
    paused: bool,
    /// bdr only: the applier's environment (see `pause_as`).
    applier_env: &'static [(&'static str, &'static str)],
    /// Whether the receiver commits in the origin's order, so that a
    /// marker applied means everything before it is (not with bdr's
    /// parallel apply: see [`Pair::wait_for_all_before`]).
    in_order: bool,
    pub origin: Node,
    pub receiver: Node,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("kind", &self.kind)
            .field("origin", &self.origin)
            .field("receiver", &self.receiver)
            .finish_non_exhaustive()
    }
}

/// What one catch-up measured.
#[derive(Debug, Clone, Copy)]
pub struct Catchup {
    /// From resume until the first marker was applied (connection and
    /// start-up; not part of the throughput).
    pub startup: Duration,
    /// From the first marker applied to the last: applying the batch.
    pub apply: Duration,
    /// CPU seconds of the receiving processes during `apply`.
    pub cpu_receiver: f64,
    /// CPU seconds of the origin's walsender during `apply`.
    pub cpu_walsender: f64,
}

/// bdr only: rewrites the receiver's copy of the tables in a session of
/// the replication origin that the applier uses for `origin`, so its rows
/// look as if they had been replicated from there, as they would be after
/// a node joins. Otherwise every first remote UPDATE of a row loaded
/// locally by `pgbench -i` is an `update_origin_differs` conflict, and the
/// benchmark would measure the conflict path instead of apply.
fn mark_as_replicated(origin: &Node, receiver: &Node) {
    let id = origin.safe_psql("SELECT lpad(to_hex(bdr.local_node_id()), 16, '0')");
    let name = format!("bdr_{}", id.trim());
    let mut sql = format!(
        "SELECT pg_replication_origin_create('{name}');
         SELECT pg_replication_origin_session_setup('{name}');
         SET session_replication_role = replica;
         BEGIN;"
    );
    for t in KEYED_TABLES.iter().chain([&HISTORY]) {
        sql.push_str(&format!(
            "CREATE TEMP TABLE copy_{t} AS SELECT * FROM {t};
             DELETE FROM {t};
             INSERT INTO {t} SELECT * FROM copy_{t};"
        ));
    }
    sql.push_str("COMMIT;");
    receiver.safe_psql(&sql);
    receiver.safe_psql("VACUUM ANALYZE");
}

fn start_node(name: &str, preload: &str) -> Node {
    let mut node = Node::init(name);
    node.append_conf(&format!(
        "{BENCH_CONF}shared_preload_libraries = '{preload}'\n"
    ));
    node.start();
    node
}

impl Pair {
    /// Starts two servers, loads pgbench at `scale` on both and sets up
    /// replication from origin to receiver.
    pub fn new(kind: Kind, scale: u32) -> anyhow::Result<Pair> {
        let preload = if kind == Kind::Pglogical {
            "pglogical"
        } else {
            "bdr"
        };
        let origin = start_node(&format!("{}_origin", kind.prefix()), preload);
        let receiver = start_node(&format!("{}_receiver", kind.prefix()), preload);
        for node in [&origin, &receiver] {
            pg::pgbench(node, &["-i", "-q", "-s", &scale.to_string()])?;
            node.safe_psql(SCHEMA);
        }
        let mut poll = postgres::Client::connect(
            &format!("{} application_name=bdr-bench", receiver.connstr()),
            postgres::NoTls,
        )?;
        poll.batch_execute("SET statement_timeout = '10s'")?;
        let mut pair = Pair {
            kind,
            applier: None,
            poll,
            next_marker: 1,
            in_order: true,
            paused: false,
            applier_env: &[],
            origin,
            receiver,
        };
        pair.replicate()?;
        pair.wait_for_walsender(1)?;
        // Proves the stream applies before anything is timed.
        let m = pair.write_marker();
        pair.wait_for_marker(m, crate::wait_limit())?;
        Ok(pair)
    }

    fn replicate(&mut self) -> anyhow::Result<()> {
        let (o, r) = (&self.origin, &self.receiver);
        match self.kind {
            Kind::Bdr => {
                for node in [o, r] {
                    node.safe_psql("CREATE EXTENSION bdr");
                    applier_command(node, &["init"]);
                }
                mark_as_replicated(o, r);
                applier_command(r, &["add-peer", o.name(), &o.connstr()]);
                self.applier = Some(ApplierProcess::start(r));
            }
            Kind::Builtin => {
                let mut tables: Vec<&str> = KEYED_TABLES.to_vec();
                tables.push(HISTORY);
                o.safe_psql(&format!(
                    "CREATE PUBLICATION bench_pub FOR TABLE {}",
                    tables.join(", ")
                ));
                r.safe_psql(&format!(
                    "CREATE SUBSCRIPTION bench_sub CONNECTION '{}' PUBLICATION bench_pub
                     WITH (copy_data = false, binary = false)",
                    o.connstr()
                ));
            }
            Kind::Pglogical => {
                for (node, name) in [(o, "origin"), (r, "receiver")] {
                    node.safe_psql(&format!(
                        "CREATE EXTENSION pglogical;
                         SELECT pglogical.create_node(node_name := '{name}', dsn := '{}')",
                        node.connstr()
                    ));
                }
                for t in KEYED_TABLES {
                    o.safe_psql(&format!(
                        "SELECT pglogical.replication_set_add_table('default', '{t}')"
                    ));
                }
                // pglogical refuses a table without a primary key in a set
                // that replicates updates; history only ever gets inserts.
                o.safe_psql(&format!(
                    "SELECT pglogical.replication_set_add_table('default_insert_only', '{HISTORY}')"
                ));
                r.safe_psql(&format!(
                    "SELECT pglogical.create_subscription(
                        subscription_name := 'bench_sub', provider_dsn := '{}',
                        replication_sets := ARRAY['default', 'default_insert_only'],
                        synchronize_structure := false, synchronize_data := false,
                        forward_origins := '{{}}')",
                    o.connstr()
                ));
                r.poll_query_until(
                    "SELECT status FROM pglogical.show_subscription_status('bench_sub')",
                    "replicating",
                );
            }
        }
        Ok(())
    }

    /// Waits until the origin has `n` walsenders streaming.
    fn wait_for_walsender(&self, n: usize) -> anyhow::Result<()> {
        let sql = if n == 0 {
            "SELECT count(*) FROM pg_stat_replication".to_owned()
        } else {
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'".to_owned()
        };
        self.origin
            .poll_query_until_within(&sql, &n.to_string(), crate::wait_limit());
        Ok(())
    }

    /// Stops the receiving side and waits until the origin's walsender has
    /// gone: from now on the origin's writes queue up in the slot.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        if self.paused {
            return Ok(());
        }
        match self.kind {
            Kind::Bdr => {
                let status = self.applier.as_mut().expect("applier").stop();
                if !status.success() {
                    bail!("bdr-applier exited with {status} when stopped");
                }
            }
            Kind::Builtin => {
                self.receiver
                    .safe_psql("ALTER SUBSCRIPTION bench_sub DISABLE");
            }
            Kind::Pglogical => {
                self.receiver
                    .safe_psql("SELECT pglogical.alter_subscription_disable('bench_sub', true)");
            }
        }
        self.wait_for_walsender(0)?;
        self.paused = true;
        Ok(())
    }

    /// Starts the receiving side again.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        match self.kind {
            Kind::Bdr => {
                let env = self.applier_env;
                self.applier
                    .as_mut()
                    .expect("applier")
                    .restart_with_env(env);
            }
            Kind::Builtin => {
                self.receiver
                    .safe_psql("ALTER SUBSCRIPTION bench_sub ENABLE");
            }
            Kind::Pglogical => {
                self.receiver
                    .safe_psql("SELECT pglogical.alter_subscription_enable('bench_sub', true)");
            }
        }
        self.paused = false;
        Ok(())
    }

    /// Pauses the pair and sets it up to run as `system` from the next
    /// resume on: the built-in subscription's `binary` option, the bdr
    /// applier's environment.
    pub fn pause_as(&mut self, system: System) -> anyhow::Result<()> {
        self.pause()?;
        match self.kind {
            Kind::Builtin => {
                let binary = system == System::BuiltinBinary;
                self.receiver.safe_psql(&format!(
                    "ALTER SUBSCRIPTION bench_sub SET (binary = {binary})"
                ));
            }
            Kind::Bdr => {
                self.in_order = system != System::BdrParallel;
                self.applier_env = match system {
                    System::BdrSerial => &[("BDR_APPLY_PIPELINE", "off")],
                    System::BdrPipelined => &[("BDR_APPLY_BATCH", "off")],
                    System::BdrPlain => &[("BDR_APPLY_DETECT_CONFLICTS", "off")],
                    System::BdrStatements => &[("BDR_APPLY_IN_SERVER", "off")],
                    System::BdrNoStream => &[("BDR_STREAMING", "off")],
                    System::BdrParallel => &[("BDR_PARALLEL_APPLY", "on")],
                    _ => &[],
                }
            }
            Kind::Pglogical => {}
        }
        Ok(())
    }

    /// Commits a marker row on the origin; returns its id.
    pub fn write_marker(&mut self) -> i32 {
        let id = self.next_marker;
        self.next_marker += 1;
        self.origin
            .safe_psql(&format!("INSERT INTO bench_marker (id) VALUES ({id})"));
        id
    }

    /// Waits until marker `id` is on the receiver; returns when it was seen
    /// (polled every 5 ms).
    pub fn wait_for_marker(&mut self, id: i32, limit: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            let found = self
                .poll
                .query_opt("SELECT 1 FROM bench_marker WHERE id = $1", &[&id])?
                .is_some();
            let now = Instant::now();
            if found {
                return Ok(now);
            }
            if now > deadline {
                let applier = self.applier.as_ref().map(|a| a.log()).unwrap_or_default();
                let lines: Vec<&str> = applier.lines().collect();
                let activity = self
                    .poll
                    .query(
                        "SELECT format('%s %s %s/%s %s', pid, state, wait_event_type, \
                         wait_event, left(query, 120)) FROM pg_stat_activity \
                         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .map(|rows| {
                        rows.iter()
                            .map(|r| r.get::<_, String>(0))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                bail!(
                    "{:?}: marker {id} not applied within {limit:?}; receiver log:\n{}\n\
                     --- applier log tail ---\n{}\n--- receiver sessions ---\n{}",
                    self.kind,
                    self.receiver.log_tail(20),
                    lines[lines.len().saturating_sub(40)..].join("\n"),
                    activity.join("\n")
                );
            }
            sleep(Duration::from_millis(5));
        }
    }

    /// After the last marker is on the receiver (at `seen`): when the
    /// receiver does not commit in the origin's order, waits until it
    /// holds as many rows of the tables the workloads write as the origin
    /// (polled as often as the query allows) and returns when it did.
    pub fn wait_for_all_before(
        &mut self,
        seen: Instant,
        limit: Duration,
    ) -> anyhow::Result<Instant> {
        if self.in_order {
            return Ok(seen);
        }
        let sql = "SELECT (SELECT count(*) FROM pgbench_history)
                        + (SELECT count(*) FROM bench_bulk)";
        let want: i64 = self.origin.connect().query_one(sql, &[])?.get(0);
        let deadline = Instant::now() + limit;
        loop {
            let have: i64 = self.poll.query_one(sql, &[])?.get(0);
            let now = Instant::now();
            if have == want {
                return Ok(now);
            }
            if now > deadline {
                bail!(
                    "{:?}: the receiver has {have} rows of {want} within {limit:?}",
                    self.kind
                );
            }
            sleep(Duration::from_millis(5));
        }
    }

    /// The receiver's processes that apply the stream.
    pub fn receiver_pids(&mut self) -> anyhow::Result<Vec<i32>> {
        let sql = match self.kind {
            // The applier's local connections; they set no application
            // name (ours is `bdr-bench`, psql's `psql`).
            Kind::Bdr => {
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'
                   AND pid <> pg_backend_pid() AND application_name = ''"
            }
            Kind::Builtin => {
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'logical replication worker'"
            }
            Kind::Pglogical => {
                "SELECT pid FROM pg_stat_activity WHERE backend_type LIKE 'pglogical apply%'
                    OR (backend_type = 'background worker' AND query LIKE '%pglogical apply%')"
            }
        };
        let mut pids: Vec<i32> = self
            .poll
            .query(sql, &[])?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some(pid) = self.applier.as_ref().and_then(ApplierProcess::pid) {
            pids.push(pid as i32);
        }
        Ok(pids)
    }

    /// The origin's walsenders.
    pub fn walsender_pids(&self) -> anyhow::Result<Vec<i32>> {
        Ok(self.origin.pids("SELECT pid FROM pg_stat_replication"))
    }

    /// Pauses the receiver, lets `write` queue a batch on the origin
    /// between two markers, resumes, and times how long the receiver takes
    /// to apply the batch (from the first marker applied to the last).
    pub fn timed_catchup(
        &mut self,
        write: impl FnOnce(&Node) -> anyhow::Result<()>,
    ) -> anyhow::Result<Catchup> {
        self.pause()?;
        self.tidy();
        let first = self.write_marker();
        write(&self.origin)?;
        let last = self.write_marker();
        let resumed = Instant::now();
        self.resume()?;
        let t0 = self.wait_for_marker(first, crate::wait_limit())?;
        let receivers = self.receiver_pids()?;
        let walsenders = self.walsender_pids()?;
        let (r0, w0) = (
            bdr_tests::cpu_of(&receivers),
            bdr_tests::cpu_of(&walsenders),
        );
        let t1 = self.wait_for_marker(last, crate::wait_limit())?;
        let t1 = self.wait_for_all_before(t1, crate::wait_limit())?;
        let (r1, w1) = (
            bdr_tests::cpu_of(&receivers),
            bdr_tests::cpu_of(&walsenders),
        );
        if receivers.is_empty() || walsenders.is_empty() {
            bail!(
                "{:?}: found no apply process ({receivers:?}) or walsender ({walsenders:?})",
                self.kind
            );
        }
        Ok(Catchup {
            startup: t0 - resumed,
            apply: t1 - t0,
            cpu_receiver: r1 - r0,
            cpu_walsender: w1 - w0,
        })
    }

    /// Vacuums, analyzes and checkpoints both nodes, so that each
    /// measurement starts from tidy tables (autovacuum is off, see
    /// `BENCH_CONF`).
    pub fn tidy(&self) {
        for node in [&self.origin, &self.receiver] {
            node.safe_psql("VACUUM ANALYZE");
            node.safe_psql("CHECKPOINT");
        }
    }

    /// Whether the receiver holds the same rows as the origin once it has
    /// caught up (a system that dropped changes would look fast).
    pub fn verify(&mut self) -> anyhow::Result<bool> {
        self.resume_if_paused()?;
        let m = self.write_marker();
        let seen = self.wait_for_marker(m, crate::wait_limit())?;
        self.wait_for_all_before(seen, crate::wait_limit())?;
        let sql = "SELECT (SELECT count(*) || '/' || sum(abalance) FROM pgbench_accounts)
                || ' ' || (SELECT count(*) || '/' || coalesce(sum(delta), 0) FROM pgbench_history)
                || ' ' || (SELECT count(*) || '/' || coalesce(sum(a), 0) FROM bench_bulk)
                || ' ' || (SELECT count(*) FROM bench_marker)";
        let (o, r) = (self.origin.safe_psql(sql), self.receiver.safe_psql(sql));
        if o != r {
            eprintln!("bdr-bench: {:?}: origin has {o}, receiver {r}", self.kind);
        }
        Ok(o == r)
    }

    fn resume_if_paused(&mut self) -> anyhow::Result<()> {
        if self.paused {
            self.resume()?;
        }
        Ok(())
    }

    /// The receiver's applied position in the origin's WAL (its
    /// replication origin's progress, committed with the applied rows in
    /// all three systems).
    pub fn applied_lsn(&mut self) -> anyhow::Result<u64> {
        let row = self.poll.query_one(
            "SELECT coalesce(max(remote_lsn) - '0/0'::pg_lsn, 0)::int8
               FROM pg_replication_origin_status",
            &[],
        )?;
        Ok(row.get::<_, i64>(0) as u64)
    }
}
