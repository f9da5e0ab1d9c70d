//! Free loopback ports, safe when tests run in parallel.
//!
//! Like PostgreSQL's TAP harness: a candidate port outside the kernel's
//! ephemeral range must be bindable on 127.0.0.1 and is then reserved with
//! a lock file created atomically in a shared directory. A lock whose
//! owning process is gone is stale and taken over.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const FIRST: u32 = 15432;
const LAST: u32 = 32767;

/// A reserved port; the reservation ends when this is dropped.
#[derive(Debug)]
pub(crate) struct Port {
    pub(crate) number: u16,
    lock: PathBuf,
}

impl Drop for Port {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.lock);
    }
}

fn lock_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("bdr-test-ports");
    if fs::create_dir_all(&dir).is_ok() {
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777));
    }
    dir
}

fn holder_alive(lock: &PathBuf) -> bool {
    match fs::read_to_string(lock) {
        Ok(pid) => match pid.trim().parse::<u32>() {
            Ok(pid) => PathBuf::from(format!("/proc/{pid}")).exists(),
            // Being written right now by its creator.
            Err(_) => true,
        },
        Err(_) => false,
    }
}

/// Reserves a free port on 127.0.0.1.
pub(crate) fn reserve() -> Port {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let dir = lock_dir();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2_654_435_761);
    for attempt in 0..10_000u32 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let span = LAST - FIRST + 1;
        let number = FIRST
            + (seed
                .wrapping_add(n.wrapping_mul(7919))
                .wrapping_add(attempt))
                % span;
        let Ok(number) = u16::try_from(number) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", number)).is_err() {
            continue;
        }
        let lock = dir.join(format!("{number}.lock"));
        if lock.exists() && !holder_alive(&lock) {
            let _ = fs::remove_file(&lock);
        }
        if let Ok(mut f) = OpenOptions::new().write(true).create_new(true).open(&lock) {
            let _ = write!(f, "{}", std::process::id());
            return Port { number, lock };
        }
    }
    panic!("no free port in {FIRST}..={LAST} on 127.0.0.1");
}
