//! One PostgreSQL cluster under test.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::port::{self, Port};
use crate::user::{give_to_server_user, server_command};

/// Settings every bdr node needs, shared with `scripts/mesh.sh`.
const NODE_CONF: &str = include_str!("../../scripts/node.conf");

/// Settings only for test clusters: speed over durability, fast failure
/// detection, and logs that show what the tests need.
const TEST_CONF: &str = "\
fsync = off
synchronous_commit = on
full_page_writes = off
wal_sender_timeout = 5s
wal_receiver_timeout = 5s
shared_buffers = 32MB
max_connections = 40
log_min_messages = info
log_connections = off
log_statement = 'none'
";

/// How long polling helpers wait; `BDR_TEST_TIMEOUT` (seconds) overrides
/// the default of 180 s, which leaves room for a loaded 2-core CI machine.
pub fn timeout() -> Duration {
    let secs = std::env::var("BDR_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    Duration::from_secs(secs)
}

/// `pg_config --<what>` of PostgreSQL 15 (`PG_CONFIG` names another
/// pg_config).
pub fn pg_config(what: &str) -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(&pg_config)
        .arg(format!("--{what}"))
        .output()
        .unwrap_or_else(|e| panic!("running {pg_config}: {e}; run scripts/setup.sh"));
    assert!(out.status.success(), "{pg_config} --{what} failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Directory of PostgreSQL 15's programs.
pub fn bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| pg_config("bindir"))
}

/// Whether this server build knows `output_plugin_libraries` (a setting
/// that refuses unlisted output plugins; an unknown setting would stop an
/// older server from starting).
fn has_output_plugin_libraries() -> bool {
    static KNOWN: OnceLock<bool> = OnceLock::new();
    *KNOWN.get_or_init(|| {
        Command::new(bindir().join("postgres"))
            .arg("--describe-config")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("output_plugin_libraries\t"))
            .unwrap_or(false)
    })
}

fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PostgreSQL cluster in a temp dir on a free loopback port.
#[derive(Debug)]
pub struct Node {
    name: String,
    dir: Option<tempfile::TempDir>,
    port: Port,
    running: bool,
}

impl Node {
    /// initdb's a new cluster named `name` (used in messages and as its
    /// `cluster_name`) with the bdr node settings; it is not started.
    pub fn init(name: &str) -> Node {
        let base = std::env::var_os("BDR_TEST_TMPDIR").map_or_else(std::env::temp_dir, Into::into);
        let dir = tempfile::Builder::new()
            .prefix(&format!("bdr-{name}-"))
            .tempdir_in(base)
            .expect("creating the node's temp dir");
        give_to_server_user(dir.path());
        let node = Node {
            name: name.to_owned(),
            dir: Some(dir),
            port: port::reserve(),
            running: false,
        };
        let out = server_command(bindir().join("initdb"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "-D",
            ])
            .arg(node.data_dir())
            .output()
            .expect("running initdb");
        check(&format!("initdb for node {name}"), &out);
        node.write_config();
        node
    }

    fn write_config(&self) {
        let mut conf = format!("\n# bdr test node {}\n{NODE_CONF}{TEST_CONF}", self.name);
        if has_output_plugin_libraries() {
            conf.push_str("output_plugin_libraries = 'bdr, pgoutput, test_decoding, wal2json, pglogical_output'\n");
        }
        conf.push_str(&format!(
            "port = {}\nunix_socket_directories = '{}'\ncluster_name = '{}'\n",
            self.port(),
            self.base_dir().display(),
            self.name
        ));
        self.append_conf(&conf);
        self.set_hba(&[
            "host all all 127.0.0.1/32 trust",
            "host replication all 127.0.0.1/32 trust",
        ]);
    }

    /// Replaces pg_hba.conf with `lines` after a line that trusts local
    /// (Unix socket) connections, which the harness itself uses, and
    /// reloads a running server.
    pub fn set_hba(&self, lines: &[&str]) {
        let mut hba = String::from("local all all trust\n");
        for line in lines {
            hba.push_str(line);
            hba.push('\n');
        }
        fs::write(self.data_dir().join("pg_hba.conf"), hba).expect("writing pg_hba.conf");
        if self.running {
            self.reload();
        }
    }

    /// Appends lines to `postgresql.conf` (takes effect on the next start
    /// or reload).
    pub fn append_conf(&self, lines: &str) {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.data_dir().join("postgresql.conf"))
            .expect("opening postgresql.conf");
        writeln!(f, "{lines}").expect("appending to postgresql.conf");
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port.number
    }

    /// The directory of the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.base_dir()
    }

    fn base_dir(&self) -> &Path {
        self.dir.as_ref().expect("node dir").path()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.base_dir().join("data")
    }

    /// The server log file.
    pub fn log_file(&self) -> PathBuf {
        self.base_dir().join("postgres.log")
    }

    /// A libpq connection string for database `postgres` as `postgres`.
    pub fn connstr(&self) -> String {
        self.connstr_db("postgres")
    }

    /// A libpq connection string for `dbname`.
    pub fn connstr_db(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port()
        )
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        server_command(bindir().join("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .args(args)
            .output()
            .expect("running pg_ctl")
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&mut self) {
        self.start_with("120", &[]);
    }

    /// Starts the server through `program`, run by the server user in
    /// place of `postgres` with the same arguments (a profiler's wrapper
    /// script, say), and waits until it accepts connections.
    pub fn start_under(&mut self, program: &Path) {
        let program = program.to_string_lossy();
        // Slower to start than the server alone.
        self.start_with("600", &["-p", &program]);
    }

    fn start_with(&mut self, wait_secs: &str, extra: &[&str]) {
        let log = self.log_file();
        let log = log.to_string_lossy();
        let mut args = vec!["-w", "-t", wait_secs, "-l", &log];
        args.extend_from_slice(extra);
        args.push("start");
        let out = self.pg_ctl(&args);
        if !out.status.success() {
            panic!(
                "starting node {} failed:\n{}\nserver log tail:\n{}",
                self.name,
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(30)
            );
        }
        self.running = true;
    }

    /// Stops the server in `fast` mode (clean shutdown).
    pub fn stop(&mut self) {
        self.stop_mode("fast");
    }

    /// Stops the server in `immediate` mode: no shutdown checkpoint, crash
    /// recovery on the next start.
    pub fn stop_immediate(&mut self) {
        self.stop_mode("immediate");
    }

    fn stop_mode(&mut self, mode: &str) {
        let out = self.pg_ctl(&["-w", "-t", "120", "-m", mode, "stop"]);
        check(&format!("stopping node {} ({mode})", self.name), &out);
        self.running = false;
    }

    /// Stops (fast) and starts the server.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// Sends SIGHUP through `pg_ctl reload` and waits until the postmaster has reloaded, so that connections
    /// opened afterwards see the new pg_hba.conf.
    pub fn reload(&self) {
        let from = self.log_position();
        check("pg_ctl reload", &self.pg_ctl(&["reload"]));
        self.wait_for_log("reloading configuration files", from);
    }

    /// The postmaster's pid, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Kills the postmaster with SIGKILL, as a crash would, and waits until
    /// its children have gone so the node can be started again.
    pub fn kill9(&mut self) {
        let pid = self
            .postmaster_pid()
            .expect("kill9: node has no postmaster.pid");
        let children = children_of(pid);
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        self.running = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut all = children;
        all.push(pid);
        while all.iter().any(|p| process_alive(*p)) {
            if Instant::now() > deadline {
                for p in &all {
                    // SAFETY: as above.
                    unsafe { libc::kill(*p, libc::SIGKILL) };
                }
            }
            sleep(Duration::from_millis(50));
        }
        // An exited postmaster that nobody has reaped yet still answers
        // kill(pid, 0), which makes the next start refuse the stale lock
        // files; it is dead, so they can go.
        if PathBuf::from(format!("/proc/{pid}")).exists() {
            let socket_lock = format!(".s.PGSQL.{}.lock", self.port());
            let _ = fs::remove_file(self.data_dir().join("postmaster.pid"));
            let _ = fs::remove_file(self.base_dir().join(socket_lock));
        }
    }

    /// Opens a client connection to database `postgres`.
    pub fn connect(&self) -> postgres::Client {
        postgres::Client::connect(&self.connstr(), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting to node {}: {e}", self.name))
    }

    /// Runs SQL through `psql` and returns stdout (unaligned, tuples only,
    /// `|` between columns, one row per line) or psql's error output.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(bindir().join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port().to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .expect("running psql");
        let stdout = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The process ids a query returns, one per row (of
    /// `pg_stat_activity` or `pg_stat_replication`, say).
    pub fn pids(&self, sql: &str) -> Vec<i32> {
        self.safe_psql(sql)
            .lines()
            .map(|l| {
                l.trim().parse().unwrap_or_else(|_| {
                    panic!("node {}: {l:?} is not a process id, from\n{sql}", self.name)
                })
            })
            .collect()
    }

    /// Like [`Node::psql`], but panics with the error and the node's name.
    pub fn safe_psql(&self, sql: &str) -> String {
        self.psql(sql)
            .unwrap_or_else(|e| panic!("node {}: query failed:\n{sql}\n{e}", self.name))
    }

    /// Runs `sql` until its output equals `expected`; panics after
    /// [`timeout`] showing what it last returned.
    pub fn poll_query_until(&self, sql: &str, expected: &str) {
        self.poll_query_until_within(sql, expected, timeout());
    }

    /// [`Node::poll_query_until`] with an explicit time limit.
    pub fn poll_query_until_within(&self, sql: &str, expected: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last;
        loop {
            last = self.psql(sql);
            if last.as_deref() == Ok(expected) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "node {}: timed out after {:?} waiting for\n{sql}\nto return {expected:?}; \
                     last returned {last:?}",
                    self.name, limit
                );
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the node named `to` has applied (reported as replayed
    /// to this node's walsender) everything this node has written so far.
    pub fn wait_until_applied_by(&self, to: &str) {
        let lsn = self.safe_psql("SELECT pg_current_wal_lsn()");
        self.poll_query_until(
            &format!(
                "SELECT coalesce(bool_and(replay_lsn >= '{lsn}'), false)
                   FROM pg_stat_replication WHERE application_name = '{to}'"
            ),
            "t",
        );
    }

    /// The current size of the server log, to pass to
    /// [`Node::wait_for_log`] so that it only looks at newer lines.
    pub fn log_position(&self) -> u64 {
        fs::metadata(self.log_file()).map(|m| m.len()).unwrap_or(0)
    }

    /// Waits until the server log, from byte `from` on, contains `pattern`.
    pub fn wait_for_log(&self, pattern: &str, from: u64) {
        let deadline = Instant::now() + timeout();
        loop {
            if self.read_log_since(from).contains(pattern) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "node {}: timed out waiting for {pattern:?} in the server log; its tail:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// The server log from byte `from` on.
    pub fn read_log_since(&self, from: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.log_file()) {
            let mut bytes = Vec::new();
            if f.seek(SeekFrom::Start(from)).is_ok() && f.read_to_end(&mut bytes).is_ok() {
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        text
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_of(&self.log_file(), n)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["-w", "-t", "60", "-m", "immediate", "stop"]);
            self.running = false;
        }
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!(
                "node {}: test failed; data dir kept at {}\n--- server log tail ---\n{}",
                self.name,
                kept.display(),
                tail_of(&kept.join("postgres.log"), 40)
            );
        }
    }
}

fn tail_of(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn process_alive(pid: i32) -> bool {
    // A zombie (state Z) has exited and only waits to be reaped.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .is_some_and(|stat| {
                    // Fields after the command name: state, ppid, ...
                    stat.rsplit(')')
                        .next()
                        .and_then(|rest| rest.split_whitespace().nth(1))
                        .and_then(|ppid| ppid.parse::<i32>().ok())
                        == Some(parent)
                })
        })
        .collect()
}
