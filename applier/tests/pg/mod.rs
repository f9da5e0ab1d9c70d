//! A throwaway PostgreSQL 15 cluster for the streaming client's tests.
//!
//! Minimal on purpose: the shared harness in the workspace's `tests/` crate
//! will replace it. initdb runs as the unprivileged `postgres` OS user (the
//! server refuses to run as root) in a temporary directory owned by that
//! user; the server listens on a free loopback port and on a Unix socket in
//! the same directory. Dropping the [`Cluster`] stops the server with
//! `pg_ctl -m immediate stop`, also when a test panics; on a panic the
//! directory is kept and the server log's tail is printed.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = "/usr/lib/postgresql/15/bin";
const OS_USER: &str = "postgres";
/// Password of the `postgres` superuser, set by initdb.
pub const SUPERUSER_PASSWORD: &str = "s3cret'pw";

/// A running server; stopped on drop.
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    pub port: u16,
}

impl Cluster {
    /// Creates and starts a cluster. `hba` lines are written to
    /// pg_hba.conf, after `local` lines that trust everyone.
    pub fn start(hba: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("bdr-stream-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        let port = free_port();
        let pwfile = root.join("pwfile");
        fs::write(&pwfile, SUPERUSER_PASSWORD).expect("write pwfile");
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{OS_USER}:{OS_USER}"))
            .arg(&root));
        run(as_postgres("initdb")
            .arg("-D")
            .arg(root.join("data"))
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display())));
        let mut cluster = Cluster {
            dir: Some(dir),
            root,
            port,
        };
        cluster.append_conf(&format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             wal_sender_timeout = 5s\nfsync = off\n",
            cluster.root.display()
        ));
        let mut hba_conf = String::from("local all all trust\nlocal replication all trust\n");
        for line in hba {
            hba_conf.push_str(line);
            hba_conf.push('\n');
        }
        fs::write(cluster.data().join("pg_hba.conf"), hba_conf).expect("write pg_hba.conf");
        run(as_postgres("pg_ctl")
            .arg("-D")
            .arg(cluster.data())
            .arg("-l")
            .arg(cluster.log())
            .args(["-w", "-t", "60", "start"]));
        cluster
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn log(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    fn append_conf(&mut self, text: &str) {
        let path = self.data().join("postgresql.conf");
        let mut conf = fs::read_to_string(&path).expect("read postgresql.conf");
        conf.push_str(text);
        fs::write(&path, conf).expect("write postgresql.conf");
    }

    /// A keyword=value connection string for TCP on loopback.
    pub fn conninfo(&self, user: &str, password: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password='{}' dbname=postgres connect_timeout=10",
            self.port,
            password.replace('\\', "\\\\").replace('\'', "\\'")
        )
    }

    /// An ordinary (non-replication) superuser connection.
    pub async fn sql(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(
            &self.conninfo("postgres", SUPERUSER_PASSWORD),
            tokio_postgres::NoTls,
        )
        .await
        .expect("normal SQL connection");
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("sql connection ended: {e}");
            }
        });
        client
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        if std::thread::panicking() {
            eprintln!("--- server log tail ---\n{}\n---", self.log_tail());
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping {}", dir.keep().display());
            }
        }
    }
}

fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", OS_USER, "--"])
        .arg(Path::new(BIN).join(program));
    cmd
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}
