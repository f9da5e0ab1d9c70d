//! `bdr-applier` processes under test.
//!
//! The binary is built once per test run with the same cargo that runs the
//! tests, so a test never uses a stale daemon. Each process logs to a file
//! beside its node's data; it is stopped when dropped (killed if it does
//! not exit), and a failing test prints the tail of its log.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::node::Node;

/// The path of a `bdr-applier` freshly built with the profile of the
/// running executable (a test, an example or the benchmark; release builds
/// get a release daemon), or of the binary named by `BDR_APPLIER_BIN`
/// (used as is, not built).
pub fn applier_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("BDR_APPLIER_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.exists(),
                "BDR_APPLIER_BIN={} does not exist",
                bin.display()
            );
            return bin;
        }
        // target/<profile>/{deps,examples}/<exe> or target/<profile>/<exe>
        let exe = std::env::current_exe().expect("path of the running executable");
        let profile_dir = exe
            .ancestors()
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n == "release" || n == "debug")
            })
            .expect("the running executable is not under target/<profile>")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut build = Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "bdr-applier",
                "--bin",
                "bdr-applier",
            ])
            .arg("--manifest-path")
            .arg(&manifest)
            .env("CARGO_TARGET_DIR", target_dir);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build for bdr-applier");
        assert!(status.success(), "building bdr-applier failed");
        let bin = profile_dir.join("bdr-applier");
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
}

/// Runs an administrative `bdr-applier` command for `node` and returns its
/// output, panicking (with the output) when it fails.
pub fn applier_command(node: &Node, args: &[&str]) -> String {
    let out = applier_command_output(node, args);
    assert!(
        out.status.success(),
        "bdr-applier {args:?} for node {} failed:\n{}{}",
        node.name(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`applier_command`], returning the raw output.
pub fn applier_command_output(node: &Node, args: &[&str]) -> Output {
    Command::new(applier_binary())
        .args(["--node-name", node.name(), "--dsn", &node.connstr()])
        .args(args)
        .output()
        .expect("running bdr-applier")
}

/// A running `bdr-applier run` for one node.
#[derive(Debug)]
pub struct ApplierProcess {
    node_name: String,
    dsn: String,
    log: PathBuf,
    child: Option<Child>,
}

impl ApplierProcess {
    /// Starts the daemon for `node`; it logs to `applier.log` beside the
    /// node's data directory.
    pub fn start(node: &Node) -> ApplierProcess {
        let log = node.data_dir().with_file_name("applier.log");
        let mut p = ApplierProcess {
            node_name: node.name().into(),
            dsn: node.connstr(),
            log,
            child: None,
        };
        p.restart();
        p
    }

    /// Starts the daemon again after a stop or kill.
    pub fn restart(&mut self) {
        self.restart_with_env(&[]);
    }

    /// Starts the daemon again with extra environment variables (fault
    /// injection: `BDR_FAULT_ABORT_AFTER_COMMITS`).
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(
            self.child.is_none(),
            "applier of {} is already running",
            self.node_name
        );
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening the applier log");
        let mut command = Command::new(applier_binary());
        // SAFETY: the hook only calls prctl, which is async-signal-safe. It
        // makes the daemon die with the test thread that started it, also
        // when the test process is killed before it can drop this handle.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command
            .args(["--node-name", &self.node_name, "--dsn", &self.dsn, "run"])
            .env(
                "RUST_LOG",
                std::env::var("BDR_TEST_APPLIER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("starting bdr-applier");
        self.child = Some(child);
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit; returns its status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("applier is not running");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the applier") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "applier of {} did not exit within 30 s of SIGTERM",
                    self.node_name
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the daemon to exit by itself; returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("applier is not running");
        let deadline = Instant::now() + crate::timeout();
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the applier") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "applier of {} did not exit",
                self.node_name
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `pattern`.
    pub fn wait_for_log(&self, pattern: &str) {
        let deadline = Instant::now() + crate::timeout();
        while !self.log().contains(pattern) {
            assert!(
                Instant::now() < deadline,
                "applier of {}: timed out waiting for {pattern:?}; log:\n{}",
                self.node_name,
                self.log()
            );
            sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ApplierProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- applier of {} log tail ---\n{}",
                self.node_name,
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}
