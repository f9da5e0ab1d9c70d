//! Node identity: which node of the group a stream comes from.
//!
//! A node is one database of one PostgreSQL cluster. Its [`NodeId`] is the
//! 64-bit FNV-1a hash of the cluster's system identifier (8 bytes,
//! big-endian; `GetSystemIdentifier()`, the value `pg_control_system()`
//! shows) followed by the database OID (4 bytes, big-endian;
//! `MyDatabaseId`). The id is stable for the life of the database, equal in
//! every session, and computable from SQL:
//!
//! ```text
//! id = fnv1a64(be64(system_identifier) || be32(database oid))
//! ```
//!
//! SQL sees it as a `bigint` with the same 64 bits (`bdr.local_node_id()`).
//!
//! Replication origins and slots name peers after their id:
//! `bdr_<16 lowercase hex digits>` ([`parse_peer_name`]).

use bdr_protocol::NodeId;
use pgrx::pg_sys;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Prefix of the replication origins and slots that name a peer node.
pub const PEER_PREFIX: &str = "bdr_";

/// 64-bit FNV-1a over `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// The id of the node made of cluster `system_identifier` and database
/// `database_oid`.
pub fn node_id(system_identifier: u64, database_oid: u32) -> NodeId {
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&system_identifier.to_be_bytes());
    bytes[8..].copy_from_slice(&database_oid.to_be_bytes());
    fnv1a64(&bytes)
}

/// The id of this node: this cluster, the current database.
pub fn local_node_id() -> NodeId {
    // SAFETY: GetSystemIdentifier reads the control file data loaded at
    // start-up; MyDatabaseId is set once the backend is bound to a
    // database, which every caller (SQL function, decoding) is.
    let (sysid, dboid) = unsafe { (pg_sys::GetSystemIdentifier(), pg_sys::MyDatabaseId) };
    node_id(sysid, dboid.to_u32())
}

/// The node id in a peer name `bdr_<16 lowercase hex digits>`, or `None`
/// if `name` does not follow that pattern.
pub fn parse_peer_name(name: &str) -> Option<NodeId> {
    let hex = name.strip_prefix(PEER_PREFIX)?;
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if hex.len() != 16 || !hex.bytes().all(lower_hex) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The node id a replication origin stands for, when its changes are
/// forwarded: the peer's id for an origin named `bdr_<hex id>` (the
/// applier's naming), otherwise the FNV-1a hash of the origin's name, so
/// that changes applied by other tools (e.g. a built-in subscription's
/// `pg_16384`) still carry a stable identity of where they came from.
pub fn origin_node_id(origin_name: &str) -> NodeId {
    parse_peer_name(origin_name).unwrap_or_else(|| fnv1a64(origin_name.as_bytes()))
}

/// The name of the peer's own replication origin (`bdr_<16 hex digits>`)
/// when `name` is one of the applier's further origins for that peer
/// (that name, `_`, and a number).
pub fn lane_origin_peer(name: &[u8]) -> Option<&[u8]> {
    const PEER: usize = 4 + 16;
    let (peer, rest) = (name.get(..PEER)?, name.get(PEER..)?);
    let hex = &peer[4..];
    let ok = peer.starts_with(b"bdr_")
        && hex.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        && rest.len() > 1
        && rest[0] == b'_'
        && rest[1..].iter().all(u8::is_ascii_digit);
    ok.then_some(peer)
}

#[cfg(test)]
mod lane_tests {
    use super::lane_origin_peer;

    #[test]
    fn lane_origins_name_their_peer() {
        assert_eq!(
            lane_origin_peer(b"bdr_00000000000000aa_1"),
            Some(&b"bdr_00000000000000aa"[..])
        );
        assert_eq!(lane_origin_peer(b"bdr_00000000000000aa"), None);
        assert_eq!(lane_origin_peer(b"bdr_00000000000000aa_"), None);
        assert_eq!(lane_origin_peer(b"bdr_00000000000000aa_x"), None);
        assert_eq!(lane_origin_peer(b"bdr_00000000000000AA_1"), None);
        assert_eq!(lane_origin_peer(b"pg_16384"), None);
    }
}
