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
/// origin: the lowest among that origin and the origins of the further
/// sessions applying them (named after it, `_<n>`, parallel apply). Each
/// session commits its own transactions in the peer's order, so every
/// transaction up to there is applied. The function flushes the local WAL
/// up to the last commit through each of them.
pub(crate) const PEER_PROGRESS: &str =
    "SELECT min(pg_catalog.pg_replication_origin_progress(roname, true))
       FROM pg_catalog.pg_replication_origin
      WHERE roname = $1 OR pg_catalog.starts_with(roname, $1 || '_')";

/// The durable progress of the origins `$1` and `$2` (NULL: missing or
/// never advanced).
pub(crate) const BOTH_PROGRESS: &str =
    "SELECT pg_catalog.pg_replication_origin_progress(roname, true)
       FROM unnest(ARRAY[$1, $2]::text[]) WITH ORDINALITY AS o(name, n)
       LEFT JOIN pg_catalog.pg_replication_origin ON roname = o.name
      ORDER BY n";

/// Creates the origin named `$1` if it is missing.
pub(crate) const CREATE_ORIGIN: &str = "SELECT pg_catalog.pg_replication_origin_create($1)
              WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = $1)";

/// Takes the progress of the origin named `$1`, if it is there, back to
/// none (as never advanced): an origin not in use, whose progress would
/// be stale the next time. Not dropped: rows written through it are
/// still told as the peer's by its name.
pub(crate) const FORGET_PROGRESS: &str =
    "SELECT pg_catalog.pg_replication_origin_advance(roname, '0/0')
       FROM pg_catalog.pg_replication_origin WHERE roname = $1";

/// Sets the progress of the origin `$1` (held by no session) to `$2`.
pub(crate) const ADVANCE_ORIGIN: &str =
    "SELECT pg_catalog.pg_replication_origin_advance($1, $2::text::pg_lsn)";

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

/// How far a peer's transactions are applied (see [`bind_session`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    /// The progress of the peer's origin (invalid: nothing applied yet).
    pub own: Lsn,
    /// The progress of the origin of parallel apply's second session,
    /// when that origin exists and has been advanced.
    pub lane: Option<Lsn>,
}

impl Progress {
    /// Where the peer's stream resumes: every transaction up to there is
    /// applied (each session commits its own in the peer's order).
    pub(crate) fn start(&self) -> Lsn {
        self.lane.map_or(self.own, |lane| lane.min(self.own))
    }

    /// Whether transactions between the two origins' progress may be
    /// applied by one session and not by the other: applying them again
    /// needs to know which session each was dealt to.
    pub(crate) fn uneven(&self) -> bool {
        self.lane.is_some_and(|lane| lane != self.own)
    }
}

/// The session of parallel apply a transaction is dealt to, of two (0:
/// the one with the peer's origin, 1: [`lane_name_for`]'s), by its
/// transaction id on the peer: the same wherever and however often the
/// peer sends it (whole or streamed), so that after a restart it is known
/// which origin's progress tells whether it is committed.
pub fn lane_of(xid: u32) -> usize {
    (xid.wrapping_mul(0x9E37_79B9) >> 31) as usize
}

/// Reads the durable progress of `peer`'s origin and of its parallel
/// apply origin (see [`BOTH_PROGRESS`]).
pub(crate) async fn read_progress(
    client: &Client,
    peer: NodeId,
) -> Result<Progress, tokio_postgres::Error> {
    let rows = client
        .query(BOTH_PROGRESS, &[&name_for(peer), &lane_name_for(peer)])
        .await?;
    let lsn = |i: usize| -> Result<Option<Lsn>, tokio_postgres::Error> {
        let p: Option<PgLsn> = rows[i].try_get(0)?;
        Ok(p.map(|p| Lsn(u64::from(p))).filter(|l| *l != Lsn::INVALID))
    };
    Ok(Progress {
        own: lsn(0)?.unwrap_or(Lsn::INVALID),
        lane: lsn(1)?,
    })
}

/// Creates the origin for `peer` if missing, binds the session of `client`
/// to it, makes the session apply as a replica, and returns the peer's
/// durable progress (see [`Progress`]).
pub(crate) async fn bind_session(
    client: &Client,
    peer: NodeId,
) -> Result<Progress, tokio_postgres::Error> {
    let name = name_for(peer);
    client.execute(CREATE_ORIGIN, &[&name]).await?;
    client
        .execute(
            "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
            &[&name],
        )
        .await?;
    client.batch_execute(APPLY_SETTINGS).await?;
    read_progress(client, peer).await
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

    #[test]
    fn transactions_are_dealt_by_their_id_about_evenly() {
        // The same transaction always goes to the same session.
        assert_eq!(lane_of(7_654_321), lane_of(7_654_321));
        // Consecutive ids, as a busy peer gives out: both sessions get
        // about half, and neither long runs.
        let lanes: Vec<usize> = (1_000_000..1_010_000).map(lane_of).collect();
        let ones = lanes.iter().filter(|l| **l == 1).count();
        assert!((4_500..=5_500).contains(&ones), "{ones}");
        let longest = lanes
            .chunk_by(|a, b| a == b)
            .map(<[usize]>::len)
            .max()
            .unwrap_or(0);
        assert!(longest <= 8, "{longest}");
    }
}
