//! The node catalog: this node and its peers, from table `bdr.nodes`.

use bdr_protocol::NodeId;
use tokio_postgres::{Client, Config};

/// This node, as the daemon runs it.
#[derive(Debug, Clone)]
pub struct LocalNode {
    /// The node's name in `bdr.nodes`; also the `application_name` of its
    /// replication connections, so peers see it in `pg_stat_replication`.
    pub name: String,
    /// `bdr.local_node_id()`.
    pub node_id: NodeId,
    /// `server_version_num`.
    pub pg_version_num: u32,
    /// How to connect to the local database.
    pub config: Config,
    /// Whether each transaction's statements are pipelined.
    pub apply_pipeline: bool,
    /// Whether two batched sessions apply side by side.
    pub parallel_apply: bool,
}

/// A peer to stream from.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub name: String,
    pub dsn: String,
    pub config: Config,
}

/// Errors reading or writing the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{}", crate::describe_db_error(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("node {node}: invalid connection string: {source}")]
    Dsn {
        node: String,
        source: tokio_postgres::Error,
    },
    #[error("node {0} is not registered in bdr.nodes on this node; run `bdr-applier init`")]
    NotRegistered(String),
    #[error(
        "node {name} has id {actual:016x} now but {recorded:016x} when it was first seen; \
         it is a different database: remove it and add it again"
    )]
    IdentityChanged {
        name: String,
        recorded: NodeId,
        actual: NodeId,
    },
}

/// Reads this node's identity and checks that it is registered.
pub async fn local_node(
    client: &Client,
    name: &str,
    config: Config,
) -> Result<LocalNode, CatalogError> {
    let row = client
        .query_one(
            "SELECT bdr.local_node_id(), current_setting('server_version_num')::int,
                    (SELECT node_id FROM bdr.nodes WHERE node_name = $1)",
            &[&name],
        )
        .await?;
    let node_id = row.get::<_, i64>(0) as NodeId;
    let registered: Option<i64> = row.get(2);
    if registered.map(|id| id as NodeId) != Some(node_id) {
        return Err(CatalogError::NotRegistered(name.into()));
    }
    Ok(LocalNode {
        name: name.into(),
        node_id,
        pg_version_num: row.get::<_, i32>(1) as u32,
        config,
        apply_pipeline: true,
        parallel_apply: false,
    })
}

/// The active nodes other than `local`, by name.
pub async fn peers(client: &Client, local: &str) -> Result<Vec<Peer>, CatalogError> {
    let rows = client
        .query(
            "SELECT node_name, dsn FROM bdr.nodes
              WHERE state = 'active' AND node_name <> $1 ORDER BY node_name",
            &[&local],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let (name, dsn): (String, String) = (r.get(0), r.get(1));
            let config = dsn.parse::<Config>().map_err(|source| CatalogError::Dsn {
                node: name.clone(),
                source,
            })?;
            Ok(Peer { name, dsn, config })
        })
        .collect()
}

/// Records the identity of peer `name` on first contact; refuses a peer
/// whose identity changed since.
pub async fn record_peer_id(client: &Client, name: &str, id: NodeId) -> Result<(), CatalogError> {
    let row = client
        .query_one(
            "WITH u AS (UPDATE bdr.nodes SET node_id = $2
                         WHERE node_name = $1 AND node_id IS NULL RETURNING node_id)
             SELECT coalesce((SELECT node_id FROM u), (SELECT node_id FROM bdr.nodes WHERE node_name = $1))",
            &[&name, &(id as i64)],
        )
        .await?;
    match row.get::<_, Option<i64>>(0) {
        Some(recorded) if recorded as NodeId != id => Err(CatalogError::IdentityChanged {
            name: name.into(),
            recorded: recorded as NodeId,
            actual: id,
        }),
        _ => Ok(()),
    }
}

/// Registers this node under `name`, reachable by peers through `dsn`.
pub async fn register_local(
    client: &Client,
    name: &str,
    dsn: &str,
) -> Result<NodeId, CatalogError> {
    let row = client
        .query_one(
            "INSERT INTO bdr.nodes (node_name, node_id, dsn) VALUES ($1, bdr.local_node_id(), $2)
             ON CONFLICT (node_name) DO UPDATE SET dsn = EXCLUDED.dsn, node_id = EXCLUDED.node_id,
                                                   state = 'active'
             RETURNING node_id",
            &[&name, &dsn],
        )
        .await?;
    Ok(row.get::<_, i64>(0) as NodeId)
}

/// Registers peer `name`, reachable through `dsn`.
pub async fn add_peer(client: &Client, name: &str, dsn: &str) -> Result<(), CatalogError> {
    dsn.parse::<Config>().map_err(|source| CatalogError::Dsn {
        node: name.into(),
        source,
    })?;
    client
        .execute(
            "INSERT INTO bdr.nodes (node_name, dsn) VALUES ($1, $2)
             ON CONFLICT (node_name) DO UPDATE SET dsn = EXCLUDED.dsn, state = 'active'",
            &[&name, &dsn],
        )
        .await?;
    Ok(())
}

/// Marks peer `name` parted: this node stops streaming from it.
pub async fn part_peer(client: &Client, name: &str) -> Result<bool, CatalogError> {
    let n = client
        .execute(
            "UPDATE bdr.nodes SET state = 'parted' WHERE node_name = $1",
            &[&name],
        )
        .await?;
    Ok(n == 1)
}
