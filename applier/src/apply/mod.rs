//! Applying one peer's stream of changes to the local database.
//!
//! ```text
//!  BEGIN     -> BEGIN
//!  RELATION  -> match to the local table, drop its old statements
//!  INSERT/UPDATE/DELETE -> prepared statement, values bound as sent;
//!               no row touched -> the conflict path (resolve.rs)
//!  TRUNCATE  -> TRUNCATE of the local tables
//!  MESSAGE   -> the message dispatcher
//!  COMMIT    -> pg_replication_origin_xact_setup(end lsn, commit time);
//!               COMMIT: the origin's progress moves in the same commit
//! ```
//!
//! The connection is bound to this node's replication origin for the peer
//! (see [`crate::origin`]) and runs with `session_replication_role =
//! replica`, so triggers and foreign keys behave as on a replica. Each
//! remote transaction is one local transaction whose origin LSN and
//! commit timestamp are the remote ones: the progress commits atomically
//! with the data, and the rows keep the remote commit time (conflict
//! resolution compares the same values on every node).
//!
//! Conflicts are detected without an extra round trip: each change's
//! statement only touches a row last written by the change's own origin
//! (and, for UPDATE, whose new values hit no other row's unique key;
//! INSERT uses `ON CONFLICT DO NOTHING`). When it touches none, the
//! conflict path looks at the local row, resolves and records (see
//! [`conflict`], `resolve`, `record` and `docs/conflicts.md`).
//!
//! One handler per message kind, dispatched from one `match`, like
//! PostgreSQL's apply worker.

mod conflict;
mod param;
mod record;
mod relation;
mod resolve;
pub(crate) mod sql;

use std::collections::HashMap;

use bdr_protocol::{
    Begin, Commit, Datum, Delete, Insert, LogicalMessage, Lsn, Message, NodeId, RelId, Truncate,
    Update,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use tracing::debug;

use conflict::Version;
use param::{Param, ParamError};
use record::{ConflictRecord, RemoteTxn};
use relation::{MappedRelation, RelationMap};

/// Why a change could not be applied. Each names what is at fault; the
/// peer task adds the peer and the LSN.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("relation {relation} does not exist on this node")]
    MissingTable { relation: String },
    #[error("column {column} of relation {relation} does not exist on this node")]
    MissingColumn { relation: String, column: String },
    #[error(
        "column {column} of relation {relation} has type {remote} on the peer but {local} here"
    )]
    TypeMismatch {
        relation: String,
        column: String,
        remote: String,
        local: String,
    },
    #[error(
        "column {column} of relation {relation} is generated on this node and cannot be written"
    )]
    GeneratedColumn { relation: String, column: String },
    #[error("relation {relation} has no replica identity key to find rows by")]
    NoKey { relation: String },
    #[error("a change refers to relation id {0}, which no RELATION message defined")]
    UnknownRelation(RelId),
    #[error("tuple of relation {relation} has {got} columns, its RELATION message {expected}")]
    ColumnCount {
        relation: String,
        got: usize,
        expected: usize,
    },
    #[error("column {column} of relation {relation}: {source}")]
    Value {
        relation: String,
        column: String,
        source: ParamError,
    },
    #[error("{0} message outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("BEGIN of xid {0} while a transaction is open")]
    NestedBegin(u32),
    #[error("unexpected STARTUP message in the middle of the stream")]
    UnexpectedStartup,
    #[error(
        "conflict {} on relation {} and the table's conflict resolver is 'error': apply from this peer stops until an operator resolves it (change the local row, or the resolver with bdr.set_conflict_resolver); see bdr.conflict_history",
        .0.kind, .0.relation
    )]
    ConflictStop(Box<ConflictRecord>),
    #[error("{}", crate::describe_db_error(.0))]
    Database(#[from] tokio_postgres::Error),
}

impl ApplyError {
    /// The relation the error is about, for the log.
    pub(crate) fn relation(&self) -> Option<&str> {
        match self {
            ApplyError::MissingTable { relation }
            | ApplyError::MissingColumn { relation, .. }
            | ApplyError::TypeMismatch { relation, .. }
            | ApplyError::GeneratedColumn { relation, .. }
            | ApplyError::NoKey { relation }
            | ApplyError::ColumnCount { relation, .. }
            | ApplyError::Value { relation, .. } => Some(relation),
            ApplyError::ConflictStop(record) => Some(&record.relation),
            _ => None,
        }
    }
}

/// The remote transaction being applied.
#[derive(Debug, Clone)]
struct OpenTxn {
    xid: u32,
    /// The remote commit time, recorded with the commit.
    commit_time: i64,
    /// Who wrote it, as conflicts need it.
    remote: RemoteTxn,
}

/// The nodes at both ends of a stream.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    pub(crate) local: NodeId,
    pub(crate) peer: NodeId,
    pub(crate) peer_name: std::sync::Arc<str>,
}

/// Applies the stream of one peer through one local connection.
#[derive(Debug)]
pub(crate) struct Applier {
    client: Client,
    relations: RelationMap,
    txn: Option<OpenTxn>,
    xact_setup: Statement,
    ends: Endpoints,
    /// The local replication origin id of each origin node met so far:
    /// rows written by that node's transactions carry it.
    origin_ids: HashMap<NodeId, u32>,
}

/// What a message did to the apply position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Nothing committed.
    Pending,
    /// A remote transaction committed locally; the peer's stream up to
    /// this LSN is durably applied.
    Committed(Lsn),
}

impl Applier {
    /// Wraps a connection already bound to the peer's replication origin
    /// (see [`crate::origin::bind_session`]).
    pub(crate) async fn new(client: Client, ends: Endpoints) -> Result<Self, ApplyError> {
        let xact_setup = client
            .prepare(
                "SELECT pg_catalog.pg_replication_origin_xact_setup($1::pg_lsn, $2::timestamptz)",
            )
            .await?;
        let mut origin_ids = HashMap::new();
        origin_ids.insert(ends.local, 0);
        Ok(Applier {
            client,
            relations: RelationMap::default(),
            txn: None,
            xact_setup,
            ends,
            origin_ids,
        })
    }

    /// The local replication origin id of rows written by `node`'s
    /// transactions; one that no row can carry when this node has no
    /// origin for it.
    async fn origin_id(&mut self, node: NodeId) -> Result<u32, ApplyError> {
        if let Some(id) = self.origin_ids.get(&node) {
            return Ok(*id);
        }
        let row = self
            .client
            .query_opt(
                "SELECT roident FROM pg_catalog.pg_replication_origin WHERE roname = $1",
                &[&crate::origin::name_for(node)],
            )
            .await?;
        match row {
            Some(r) => {
                let id: u32 = r.get(0);
                self.origin_ids.insert(node, id);
                Ok(id)
            }
            None => Ok(u32::MAX),
        }
    }

    /// Forgets stream state: a new stream starts without relations and
    /// outside any transaction. An open local transaction is rolled back.
    pub(crate) async fn reset(&mut self) -> Result<(), ApplyError> {
        self.relations.clear();
        if self.txn.take().is_some() {
            self.client.batch_execute("ROLLBACK").await?;
        }
        Ok(())
    }

    /// The remote xid of the transaction being applied.
    pub(crate) fn current_xid(&self) -> Option<u32> {
        self.txn.as_ref().map(|t| t.xid)
    }

    /// Whether a remote transaction is being applied.
    pub(crate) fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Applies one message. A conflict that stops apply rolls the
    /// transaction back and is recorded on its own.
    pub(crate) async fn handle(&mut self, msg: &Message<'_>) -> Result<Applied, ApplyError> {
        match self.dispatch(msg).await {
            Err(ApplyError::ConflictStop(record)) => {
                if self.txn.take().is_some() {
                    self.client.batch_execute("ROLLBACK").await?;
                }
                record.report(&self.client).await?;
                Err(ApplyError::ConflictStop(record))
            }
            other => other,
        }
    }

    async fn dispatch(&mut self, msg: &Message<'_>) -> Result<Applied, ApplyError> {
        match msg {
            Message::Begin(m) => self.handle_begin(m).await?,
            Message::Commit(m) => return self.handle_commit(m).await,
            Message::Relation(m) => {
                let mapped = MappedRelation::map(&self.client, m).await?;
                self.relations.define(m.rel_id, mapped);
            }
            Message::Insert(m) => self.handle_insert(m).await?,
            Message::Update(m) => self.handle_update(m).await?,
            Message::Delete(m) => self.handle_delete(m).await?,
            Message::Truncate(m) => self.handle_truncate(m).await?,
            Message::Logical(m) => self.handle_message(m),
            Message::Startup(_) => return Err(ApplyError::UnexpectedStartup),
        }
        Ok(Applied::Pending)
    }

    async fn handle_begin(&mut self, m: &Begin) -> Result<(), ApplyError> {
        if let Some(open) = &self.txn {
            return Err(ApplyError::NestedBegin(open.xid));
        }
        let origin = m.origin.map_or(self.ends.peer, |o| o.node_id);
        let roident = self.origin_id(origin).await?;
        self.client.batch_execute("BEGIN").await?;
        self.txn = Some(OpenTxn {
            xid: m.xid,
            commit_time: m.commit_time,
            remote: RemoteTxn {
                version: Version {
                    commit_time: m.commit_time,
                    node: origin,
                },
                roident,
                commit_lsn: m.final_lsn,
                xid: m.xid,
                peer: self.ends.peer_name.clone(),
                local_node: self.ends.local,
            },
        });
        Ok(())
    }

    /// Records the remote commit in the origin, then commits: the origin's
    /// progress becomes the transaction's end LSN atomically with its rows.
    /// The end LSN (not the commit record's start) is what a restart asks
    /// the peer to stream from: the peer skips every transaction whose
    /// commit record starts before it, this one included.
    async fn handle_commit(&mut self, m: &Commit) -> Result<Applied, ApplyError> {
        let Some(open) = &self.txn else {
            return Err(ApplyError::OutsideTransaction("COMMIT"));
        };
        // pg_lsn and timestamptz in binary are 8 big-endian bytes: the
        // remote values are recorded exactly. Both statements go out in
        // one round trip.
        let lsn = Param::eight_bytes(m.end_lsn);
        let time = Param::eight_bytes(open.commit_time as u64);
        let params: [&(dyn ToSql + Sync); 2] = [&lsn, &time];
        let setup = self.client.execute(&self.xact_setup, &params);
        let commit = self.client.batch_execute("COMMIT");
        tokio::try_join!(setup, commit)?;
        self.txn = None;
        Ok(Applied::Committed(m.end_lsn))
    }

    /// The open remote transaction's writer, for conflicts.
    fn require_txn(&self, what: &'static str) -> Result<RemoteTxn, ApplyError> {
        match &self.txn {
            Some(open) => Ok(open.remote.clone()),
            None => Err(ApplyError::OutsideTransaction(what)),
        }
    }

    async fn handle_insert(&mut self, m: &Insert<'_>) -> Result<(), ApplyError> {
        let remote = self.require_txn("INSERT")?;
        let rel = self.relations.get(m.rel_id)?;
        let params = bind_columns(rel, &m.new, |_| true)?;
        let stmt = rel.insert(&self.client).await?;
        if self.client.execute_raw(&stmt, params.iter()).await? == 0 {
            resolve::insert_conflict(&self.client, rel, &remote, &params).await?;
        }
        Ok(())
    }

    async fn handle_update(&mut self, m: &Update<'_>) -> Result<(), ApplyError> {
        let remote = self.require_txn("UPDATE")?;
        let rel = self.relations.get(m.rel_id)?;
        if rel.key.is_empty() {
            return Err(ApplyError::NoKey {
                relation: rel.display.clone(),
            });
        }
        let set: Vec<bool> = m.new.iter().map(|d| *d != Datum::UnchangedToast).collect();
        let new = bind_columns(rel, &m.new, |i| set.get(i).copied().unwrap_or(false))?;
        let old = m.old.as_ref().map_or(&m.new, |o| &o.tuple);
        let key = bind_key(rel, old)?;
        let origin = Param::four_bytes(remote.roident);
        let stmt = rel.update(&self.client, &set).await?;
        let params: Vec<&Param<'_>> = new.iter().chain(&key).chain([&origin]).collect();
        if self.client.execute_raw(&stmt, params).await? == 0 {
            let set_cols: Vec<usize> = (0..set.len()).filter(|i| set[*i]).collect();
            let values = resolve::UpdateValues {
                set_cols: &set_cols,
                new: &new,
                key: &key,
            };
            resolve::update_conflict(&self.client, rel, &remote, &values).await?;
        }
        Ok(())
    }

    async fn handle_delete(&mut self, m: &Delete<'_>) -> Result<(), ApplyError> {
        let remote = self.require_txn("DELETE")?;
        let rel = self.relations.get(m.rel_id)?;
        if rel.key.is_empty() {
            return Err(ApplyError::NoKey {
                relation: rel.display.clone(),
            });
        }
        let key = bind_key(rel, &m.old.tuple)?;
        let origin = Param::four_bytes(remote.roident);
        let stmt = rel.delete(&self.client).await?;
        let params: Vec<&Param<'_>> = key.iter().chain([&origin]).collect();
        if self.client.execute_raw(&stmt, params).await? == 0 {
            resolve::delete_conflict(&self.client, rel, &remote, &key).await?;
        }
        Ok(())
    }

    async fn handle_truncate(&mut self, m: &Truncate) -> Result<(), ApplyError> {
        self.require_txn("TRUNCATE")?;
        let mut tables = Vec::with_capacity(m.rel_ids.len());
        for id in &m.rel_ids {
            tables.push(self.relations.get(*id)?.table.clone());
        }
        let stmt = sql::truncate(&tables, m.restart_identity, m.cascade);
        self.client.batch_execute(&stmt).await?;
        Ok(())
    }

    /// Logical decoding messages are for coordination (schema changes
    /// later); none is acted on yet.
    fn handle_message(&mut self, m: &LogicalMessage<'_>) {
        debug!(
            prefix = m.prefix,
            len = m.content.len(),
            transactional = m.transactional,
            "message"
        );
    }
}

fn check_width(rel: &MappedRelation, tuple: &[Datum<'_>]) -> Result<(), ApplyError> {
    if tuple.len() == rel.columns.len() {
        return Ok(());
    }
    Err(ApplyError::ColumnCount {
        relation: rel.display.clone(),
        got: tuple.len(),
        expected: rel.columns.len(),
    })
}

/// The parameters for the columns of `tuple` picked by `keep`, in column
/// order.
fn bind_columns<'a>(
    rel: &MappedRelation,
    tuple: &[Datum<'a>],
    keep: impl Fn(usize) -> bool,
) -> Result<Vec<Param<'a>>, ApplyError> {
    check_width(rel, tuple)?;
    tuple
        .iter()
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(i, d)| bind(rel, i, d))
        .collect()
}

/// The parameters for the key columns of `tuple`.
fn bind_key<'a>(rel: &MappedRelation, tuple: &[Datum<'a>]) -> Result<Vec<Param<'a>>, ApplyError> {
    check_width(rel, tuple)?;
    rel.key.iter().map(|&i| bind(rel, i, &tuple[i])).collect()
}

fn bind<'a>(rel: &MappedRelation, i: usize, d: &Datum<'a>) -> Result<Param<'a>, ApplyError> {
    let col = &rel.columns[i];
    Param::from_datum(d, col.remote_type).map_err(|source| ApplyError::Value {
        relation: rel.display.clone(),
        column: col.name.clone(),
        source,
    })
}
