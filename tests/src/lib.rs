//! Test harness: real PostgreSQL 15 clusters for the integration tests.
//!
//! Modelled on PostgreSQL's own TAP `PostgreSQL::Test::Cluster`: a [`Node`]
//! is initdb'd into a temp dir as an unprivileged OS user, listens on a free
//! loopback port, and can be started, stopped, restarted and killed; SQL
//! runs through `psql` ([`Node::safe_psql`]) or a client connection
//! ([`Node::connect`]); [`Node::poll_query_until`] and
//! [`Node::wait_for_log`] wait with a timeout and report what they last saw.
//!
//! Every server a test starts is stopped when its `Node` is dropped, also
//! while the test panics; a failed test keeps the data dir and prints the
//! tail of the server log.

mod node;
mod port;
mod user;

pub use node::{Node, timeout};
