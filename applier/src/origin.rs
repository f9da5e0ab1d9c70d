//! Replication origins and slots: where exactly-once progress is kept.
//!
//! This node keeps one replication origin per peer, named after the peer
//! (`bdr_<peer node id in hex>`). The apply connection binds its session to
//! that origin; every applied remote transaction records the remote commit
//! LSN in the origin as part of the same local commit, so after a crash the
//! origin's progress is exactly what was applied, never more nor less. The
//! slot on the peer is named after this node the same way; the plugin reads
//! the subscriber's identity from the name in `bdr.node_slots`.

use bdr_protocol::NodeId;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use crate::stream::Lsn;

/// The name of the origin for changes from `peer`, and of the slot on a
/// peer that serves node `peer` (the same convention both ways).
pub fn name_for(node: NodeId) -> String {
    format!("bdr_{node:016x}")
}

/// The name of the origin of the second session applying `peer`'s
/// transactions (parallel apply, see the applier's `apply::batch`).
pub fn lane_name_for(node: NodeId) -> String {
    format!("{}_1", name_for(node))
}

/// The durable progress of a peer's transactions, given the name of its
/// origin: the highest among that origin and the origins of the further
/// sessions applying them (named after it, `_<n>`). Those sessions commit
/// in the peer's order, so every transaction up to there is applied. The
/// function flushes the local WAL up to it.
pub(crate) const PEER_PROGRESS: &str =
    "SELECT max(pg_catalog.pg_replication_origin_progress(roname, true))
       FROM pg_catalog.pg_replication_origin
      WHERE roname = $1 OR pg_catalog.starts_with(roname, $1 || '_')";

/// Creates the origin named `$1` if it is missing.
pub(crate) const CREATE_ORIGIN: &str = "SELECT pg_catalog.pg_replication_origin_create($1)
              WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = $1)";

/// The settings of every session that applies remote transactions:
/// triggers and foreign keys behave as on a replica; a commit does not
/// wait for the WAL flush (nor for this node's synchronous standbys): the
/// flush position sent to the peer comes from the origin's progress read
/// with a flush (see the `peer` module), never from a COMMIT. A session
/// whose applier is gone stops within a second even in the middle of a
/// call (one of parallel apply's may wait for a transaction of the other
/// session that will never commit, holding its rows meanwhile).
pub(crate) const APPLY_SETTINGS: &str = "SET session_replication_role = replica; \
     SET synchronous_commit = off; SET client_connection_check_interval = 1000";

/// Creates the origin for `peer` if missing, binds the session of `client`
/// to it, makes the session apply as a replica, and returns the peer's
/// durable progress (the end LSN of the last applied transaction, see
/// [`PEER_PROGRESS`]; invalid when nothing was applied yet).
pub(crate) async fn bind_session(
    client: &Client,
    peer: NodeId,
) -> Result<Lsn, tokio_postgres::Error> {
    let name = name_for(peer);
    client.execute(CREATE_ORIGIN, &[&name]).await?;
    client
        .execute(
            "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
            &[&name],
        )
        .await?;
    client.batch_execute(APPLY_SETTINGS).await?;
    let row = client.query_one(PEER_PROGRESS, &[&name]).await?;
    let progress: Option<PgLsn> = row.try_get(0)?;
    Ok(progress.map_or(Lsn::INVALID, |p| Lsn(u64::from(p))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_fixed_width_hex() {
        assert_eq!(name_for(0xaa), "bdr_00000000000000aa");
        assert_eq!(name_for(u64::MAX), "bdr_ffffffffffffffff");
        assert_eq!(lane_name_for(0xaa), "bdr_00000000000000aa_1");
    }
}
