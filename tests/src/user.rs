//! Running PostgreSQL's programs as an unprivileged OS user.
//!
//! PostgreSQL refuses to run as root. When the tests run as root, server
//! programs run through `runuser -u postgres` and their directories are
//! owned by that user; otherwise they run as the current user.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

/// The OS user that owns clusters when the tests run as root.
const SERVER_USER: &str = "postgres";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A command for `program`, run as the unprivileged server user.
pub(crate) fn server_command(program: impl AsRef<OsStr>) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", SERVER_USER, "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Hands `path` to the server user (no-op when not root).
pub(crate) fn give_to_server_user(path: &Path) {
    if !is_root() {
        return;
    }
    let name = std::ffi::CString::new(SERVER_USER).expect("static name");
    // SAFETY: getpwnam gets a valid C string; the result is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "OS user {SERVER_USER:?} does not exist; install postgresql-15 (scripts/setup.sh)"
    );
    // SAFETY: pw is non-null and points to libc's static passwd struct.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {} to {SERVER_USER}: {e}", path.display()));
}
