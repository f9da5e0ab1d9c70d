//! Conflict kinds, resolvers and the decision rule: pure, no I/O.
//!
//! A conflict is a remote change that does not meet the local row it was
//! written against: the row was last written by another origin, is
//! missing, or another row holds one of its unique keys. Each side has a
//! [`Version`]: the commit time and node of its last writer. Applied
//! transactions keep the remote commit time (see [`crate::apply`]), so
//! every node compares the same two versions and, with the same
//! resolver, takes the same decision.
//!
//! The names of kinds match PostgreSQL 18 and Spock and are mirrored by
//! the SQL enums `bdr.conflict_type`, `bdr.conflict_resolver` and
//! `bdr.conflict_resolution`.

use std::fmt;

use bdr_protocol::NodeId;

/// What kind of conflict was met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConflictType {
    /// An INSERT found a row with the same primary or secondary key.
    InsertExists,
    /// An UPDATE found its row last written by another origin.
    UpdateOriginDiffers,
    /// The new row of an UPDATE hits another row's unique key.
    UpdateExists,
    /// An UPDATE found no row to update.
    UpdateMissing,
    /// A DELETE found its row last written by another origin.
    DeleteOriginDiffers,
    /// A DELETE found no row to delete.
    DeleteMissing,
    /// An INSERT or UPDATE hits more than one local row through different
    /// unique keys.
    MultipleUniqueConflicts,
}

impl ConflictType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ConflictType::InsertExists => "insert_exists",
            ConflictType::UpdateOriginDiffers => "update_origin_differs",
            ConflictType::UpdateExists => "update_exists",
            ConflictType::UpdateMissing => "update_missing",
            ConflictType::DeleteOriginDiffers => "delete_origin_differs",
            ConflictType::DeleteMissing => "delete_missing",
            ConflictType::MultipleUniqueConflicts => "multiple_unique_conflicts",
        }
    }
}

impl fmt::Display for ConflictType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rule a table's conflicts are resolved by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Resolver {
    /// The version with the later commit time wins.
    #[default]
    LastUpdateWins,
    /// The version with the earlier commit time wins.
    FirstUpdateWins,
    /// The remote change always wins.
    ApplyRemote,
    /// The local row always wins.
    KeepLocal,
    /// Apply from the peer stops until an operator acts.
    Error,
}

impl Resolver {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Resolver::LastUpdateWins => "last_update_wins",
            Resolver::FirstUpdateWins => "first_update_wins",
            Resolver::ApplyRemote => "apply_remote",
            Resolver::KeepLocal => "keep_local",
            Resolver::Error => "error",
        }
    }

    /// The resolver named `name` (as stored in
    /// `bdr.table_conflict_resolvers`).
    pub(crate) fn parse(name: &str) -> Option<Resolver> {
        Some(match name {
            "last_update_wins" => Resolver::LastUpdateWins,
            "first_update_wins" => Resolver::FirstUpdateWins,
            "apply_remote" => Resolver::ApplyRemote,
            "keep_local" => Resolver::KeepLocal,
            "error" => Resolver::Error,
            _ => return None,
        })
    }
}

/// What a resolver does about two versions of a row: stop apply, or
/// apply the remote change when `remote_wins`, or keep the local row.
pub(crate) fn decide(resolver: Resolver, remote_wins: bool) -> Resolution {
    match resolver {
        Resolver::Error => Resolution::Error,
        _ if remote_wins => Resolution::ApplyRemote,
        _ => Resolution::KeepLocal,
    }
}

/// What was done about a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// The remote change was applied.
    ApplyRemote,
    /// The local row was kept; the remote change was not applied.
    KeepLocal,
    /// There was nothing to apply the change to.
    Skip,
    /// The table's conflict handler returned a row other than both
    /// versions, and that row was written.
    Merge,
    /// Apply stopped.
    Error,
}

impl Resolution {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Resolution::ApplyRemote => "apply_remote",
            Resolution::KeepLocal => "keep_local",
            Resolution::Skip => "skip",
            Resolution::Merge => "merge",
            Resolution::Error => "error",
        }
    }
}

/// Who last wrote a version of a row, and when: the commit time
/// (microseconds since 2000-01-01 UTC) and the node where the writing
/// transaction first committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Version {
    pub(crate) commit_time: i64,
    pub(crate) node: NodeId,
}

impl Version {
    /// The total order every node agrees on: commit time, then node id
    /// (as the signed `bigint` SQL shows) on equal times.
    fn order_key(self) -> (i64, i64) {
        (self.commit_time, self.node as i64)
    }
}

/// Whether the remote version beats the local one under `resolver`.
/// `local` is `None` when the local row's last writer is unknown (a frozen
/// row, or one written before commit timestamps were tracked): it counts
/// as older than any known version. Under [`Resolver::Error`] nothing
/// wins: the caller stops before asking.
pub(crate) fn remote_wins(resolver: Resolver, local: Option<Version>, remote: Version) -> bool {
    match resolver {
        Resolver::LastUpdateWins => local.is_none_or(|l| remote.order_key() > l.order_key()),
        // Earlier wins; equal times still break to the higher node id, the
        // same tie-break as last_update_wins.
        Resolver::FirstUpdateWins => local.is_some_and(|l| {
            remote.commit_time < l.commit_time
                || (remote.commit_time == l.commit_time && remote.node as i64 > l.node as i64)
        }),
        Resolver::ApplyRemote => true,
        Resolver::KeepLocal | Resolver::Error => false,
    }
}

/// The resolution of a DELETE that found its row last written by another
/// origin. Without tombstones a deleted row leaves nothing to compare a
/// later-arriving UPDATE against (that UPDATE is `update_missing` and
/// skipped), so for the nodes to converge the DELETE must win wherever it
/// meets the row: under both timestamp resolvers the delete is applied.
pub(crate) fn delete_wins(resolver: Resolver) -> bool {
    !matches!(resolver, Resolver::KeepLocal | Resolver::Error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(commit_time: i64, node: NodeId) -> Version {
        Version { commit_time, node }
    }

    #[test]
    fn last_update_wins_by_time_then_node() {
        let lww = Resolver::LastUpdateWins;
        assert!(remote_wins(lww, Some(v(1, 9)), v(2, 1)));
        assert!(!remote_wins(lww, Some(v(2, 1)), v(1, 9)));
        // Equal times: the higher node id wins, seen from either side.
        assert!(remote_wins(lww, Some(v(5, 1)), v(5, 2)));
        assert!(!remote_wins(lww, Some(v(5, 2)), v(5, 1)));
        // Node ids compare as signed bigints, as SQL shows them.
        assert!(remote_wins(lww, Some(v(5, u64::MAX)), v(5, 0)));
        // The same version does not replace itself.
        assert!(!remote_wins(lww, Some(v(5, 2)), v(5, 2)));
        assert!(remote_wins(lww, None, v(0, 0)));
    }

    #[test]
    fn first_update_wins_mirrors_it() {
        let fuw = Resolver::FirstUpdateWins;
        assert!(remote_wins(fuw, Some(v(2, 1)), v(1, 9)));
        assert!(!remote_wins(fuw, Some(v(1, 9)), v(2, 1)));
        assert!(remote_wins(fuw, Some(v(5, 1)), v(5, 2)));
        assert!(!remote_wins(fuw, Some(v(5, 2)), v(5, 1)));
        assert!(!remote_wins(fuw, None, v(0, 0)));
    }

    #[test]
    fn decisions_agree_from_both_sides() {
        // Two versions meet on two nodes, each local on one of them: exactly
        // one node applies the other's version.
        let versions = [v(1, 1), v(1, 2), v(2, 1), v(3, 7)];
        for r in [Resolver::LastUpdateWins, Resolver::FirstUpdateWins] {
            for a in versions {
                for b in versions.into_iter().filter(|b| *b != a) {
                    assert_ne!(remote_wins(r, Some(a), b), remote_wins(r, Some(b), a));
                }
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for r in [
            Resolver::LastUpdateWins,
            Resolver::FirstUpdateWins,
            Resolver::ApplyRemote,
            Resolver::KeepLocal,
            Resolver::Error,
        ] {
            assert_eq!(Resolver::parse(r.as_str()), Some(r));
        }
        assert_eq!(Resolver::parse("nope"), None);
        assert!(delete_wins(Resolver::LastUpdateWins));
        assert!(!delete_wins(Resolver::KeepLocal));
    }

    #[test]
    fn error_resolver_stops_whoever_would_win() {
        assert_eq!(decide(Resolver::Error, true), Resolution::Error);
        assert_eq!(decide(Resolver::Error, false), Resolution::Error);
        assert_eq!(decide(Resolver::KeepLocal, true), Resolution::ApplyRemote);
        assert_eq!(decide(Resolver::ApplyRemote, false), Resolution::KeepLocal);
    }
}
