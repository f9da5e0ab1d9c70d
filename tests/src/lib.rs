//! Test harness: real PostgreSQL 15 clusters for the integration tests.
//!
//! Modelled on PostgreSQL's own TAP `PostgreSQL::Test::Cluster`: a [`Node`]
//! is initdb'd into a temp dir as an unprivileged OS user, listens on a free
//! loopback port, and can be started, stopped, restarted and killed; SQL
//! runs through `psql` ([`Node::safe_psql`]) or a client connection
//! ([`Node::connect`]); [`Node::poll_query_until`] and
//! [`Node::wait_for_log`] wait with a timeout and report what they last saw.
//!
//! [`ApplierProcess`] runs `bdr-applier` for a node, and [`Mesh`] sets up
//! a group of nodes that all stream from each other.
//!
//! Every server a test starts is stopped when its `Node` is dropped, also
//! while the test panics; a failed test keeps the data dir and prints the
//! tail of the server log.

mod applier;
mod mesh;
mod node;
mod port;
mod process;
mod user;

pub use applier::{ApplierProcess, applier_binary, applier_command, applier_command_output};
pub use mesh::Mesh;
pub use node::{Node, bindir, pg_config, timeout};
pub use process::{cpu_of, cpu_seconds};

/// Environment variable `name` as a number, or `default` when it is unset
/// or not one: the settings of the measurement programs in `examples/`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
