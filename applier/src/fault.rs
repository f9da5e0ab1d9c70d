//! Fault injection for crash tests.
//!
//! `BDR_FAULT_ABORT_AFTER_COMMITS=N` makes the daemon abort (no unwinding,
//! no clean-up, like `kill -9`) right after its N-th local commit of a
//! remote transaction, before the peer hears of it: the window where the
//! local origin is ahead of the peer's slot. Unset, it costs one relaxed
//! atomic load per commit.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

const VAR: &str = "BDR_FAULT_ABORT_AFTER_COMMITS";

static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
static COMMITS: AtomicU64 = AtomicU64::new(0);

/// Called after each local commit of a remote transaction.
pub(crate) fn after_commit() {
    let Some(limit) = *LIMIT.get_or_init(|| std::env::var(VAR).ok()?.parse().ok()) else {
        return;
    };
    if COMMITS.fetch_add(1, Ordering::Relaxed) + 1 >= limit {
        eprintln!("{VAR}={limit}: aborting after a local commit, before its feedback");
        std::process::abort();
    }
}
