//! Reporting a conflict: one log line and one row of
//! `bdr.conflict_history`.
//!
//! Only the conflict path comes here. The remote row is rendered as json
//! by the database from the same bound parameters the change carried
//! (cast to the local column types), so values look exactly as
//! `to_jsonb` of the local row does. The log line carries no row values;
//! they are in the history row (unless history is turned off with
//! `bdr.set_conflict_history(false)`).

use std::error::Error;

use bdr_protocol::NodeId;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{Client, Row};
use tracing::info;

use super::conflict::{ConflictType, Resolution, Resolver, Version};
use super::param::Param;
use super::relation::MappedRelation;
use super::{ApplyError, sql};
use crate::stream::Lsn;

/// A `timestamptz` as PostgreSQL keeps it: microseconds since
/// 2000-01-01 UTC.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Micros(pub(crate) i64);

impl<'a> FromSql<'a> for Micros {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into()?;
        Ok(Micros(i64::from_be_bytes(bytes)))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
}

/// A local row met by a remote change, locked, with its last writer.
#[derive(Debug)]
pub(crate) struct LocalRow {
    /// `tableoid:ctid` (partitions of one table reuse ctids).
    pub(crate) ctid: String,
    pub(crate) json: String,
    /// Unknown for a frozen row or one written earlier in this
    /// transaction.
    pub(crate) version: Option<Version>,
    /// The replication origin id of its last writer (0: a local write).
    pub(crate) roident: Option<u32>,
}

impl LocalRow {
    /// A row of [`sql::lookup`].
    pub(crate) fn from_row(row: &Row) -> Result<LocalRow, tokio_postgres::Error> {
        let time: Option<Micros> = row.try_get(2)?;
        let node: Option<i64> = row.try_get(3)?;
        let version = match (time, node) {
            (Some(t), Some(n)) => Some(Version {
                commit_time: t.0,
                node: n as NodeId,
            }),
            _ => None,
        };
        Ok(LocalRow {
            ctid: row.try_get(0)?,
            json: row.try_get(1)?,
            version,
            roident: row.try_get(4)?,
        })
    }
}

/// The remote transaction a change belongs to, as conflicts need it.
#[derive(Debug, Clone)]
pub(crate) struct RemoteTxn {
    /// Commit time and the node where the transaction first committed.
    pub(crate) version: Version,
    /// The local replication origin id rows written by that node carry.
    pub(crate) roident: u32,
    /// The commit LSN on the sending node.
    pub(crate) commit_lsn: u64,
    pub(crate) xid: u32,
    /// The sending peer's name; shared, since every change clones this.
    pub(crate) peer: std::sync::Arc<str>,
    pub(crate) local_node: NodeId,
}

/// One conflict, ready to be logged and recorded: everything owned, so a
/// conflict that stops apply can be recorded after the rollback.
#[derive(Debug, Clone)]
pub(crate) struct ConflictRecord {
    pub(crate) kind: ConflictType,
    pub(crate) resolution: Resolution,
    pub(crate) resolver: Resolver,
    pub(crate) relation: String,
    pub(crate) key: Option<String>,
    pub(crate) local_row: Option<String>,
    pub(crate) remote_row: Option<String>,
    pub(crate) local_version: Option<Version>,
    pub(crate) detail: Option<String>,
    pub(crate) history: bool,
    pub(crate) remote: RemoteTxn,
}

/// The remote side of a conflict: which remote columns the bound values
/// are, and the key values.
#[derive(Debug)]
pub(crate) struct RemoteValues<'p, 'a> {
    /// Positions of `row` among the relation's columns.
    pub(crate) columns: &'p [usize],
    pub(crate) row: &'p [Param<'a>],
    /// Bound values of the replica identity key, in key order.
    pub(crate) key: &'p [Param<'a>],
}

/// Builds the record of a conflict: renders the remote row and key as
/// json and reads whether history is on, in one statement.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn build(
    client: &Client,
    rel: &MappedRelation,
    remote: &RemoteTxn,
    values: &RemoteValues<'_, '_>,
    kind: ConflictType,
    resolver: Resolver,
    resolution: Resolution,
    local: &[&LocalRow],
) -> Result<ConflictRecord, ApplyError> {
    let typed = |cols: &mut dyn Iterator<Item = usize>| -> Vec<(&str, &str)> {
        cols.map(|i| {
            let c = &rel.columns[i];
            (c.name.as_str(), c.local_type.as_str())
        })
        .collect()
    };
    let row_cols = typed(&mut values.columns.iter().copied());
    let key_cols = typed(&mut rel.key.iter().copied());
    let query = format!(
        "SELECT coalesce((SELECT value FROM bdr.local_settings WHERE name = 'conflict_history'), 'on') = 'on', {}, {}",
        render(&key_cols, 1),
        render(&row_cols, 1 + key_cols.len())
    );
    let params: Vec<&(dyn ToSql + Sync)> = values
        .key
        .iter()
        .chain(values.row.iter())
        .map(|p| p as &(dyn ToSql + Sync))
        .collect();
    let row = client.query_one(&query, &params).await?;
    let local_row = match local {
        [] => None,
        [one] => Some(one.json.clone()),
        many => Some(format!(
            "[{}]",
            many.iter()
                .map(|r| r.json.as_str())
                .collect::<Vec<_>>()
                .join(",")
        )),
    };
    Ok(ConflictRecord {
        kind,
        resolution,
        resolver,
        relation: rel.display.clone(),
        key: row.try_get(1)?,
        local_row,
        remote_row: row.try_get(2)?,
        local_version: local.iter().filter_map(|r| r.version).max_by_key(|v| {
            // The newest local version is the one shown.
            (v.commit_time, v.node as i64)
        }),
        detail: None,
        history: row.try_get(0)?,
        remote: remote.clone(),
    })
}

fn render(cols: &[(&str, &str)], first: usize) -> String {
    if cols.is_empty() {
        "NULL::text".into()
    } else {
        sql::values_as_json(cols, first)
    }
}

const INSERT_HISTORY: &str = "\
INSERT INTO bdr.conflict_history
    (local_node_id, remote_node_id, relation, conflict_type, resolution, resolver,
     key, local_row, remote_row, local_origin, local_commit_time,
     remote_commit_time, remote_commit_lsn, remote_xid, detail)
SELECT $1::bigint, $2::bigint, $3::text, $4::text::bdr.conflict_type,
       $5::text::bdr.conflict_resolution, $6::text::bdr.conflict_resolver,
       $7::text::jsonb, $8::text::jsonb, $9::text::jsonb, $10::bigint, $11::timestamptz,
       $12::timestamptz, $13::pg_lsn, $14::bigint, $15::text
 WHERE NOT ($5::text = 'error' AND EXISTS (
       SELECT 1 FROM bdr.conflict_history h
        WHERE h.resolution = 'error' AND h.remote_commit_lsn = $13::pg_lsn
          AND h.relation = $3::text AND h.conflict_type = $4::text::bdr.conflict_type))";

impl ConflictRecord {
    /// Logs the conflict and writes its history row (unless history is
    /// off). A conflict that stops apply is recorded once per remote
    /// transaction, however often the peer retries it.
    pub(crate) async fn report(&self, client: &Client) -> Result<(), ApplyError> {
        info!(
            "type" = %self.kind,
            relation = %self.relation,
            resolution = %self.resolution.as_str(),
            resolver = %self.resolver.as_str(),
            peer = %self.remote.peer,
            origin = %format_args!("{:016x}", self.remote.version.node),
            lsn = %Lsn(self.remote.commit_lsn),
            xid = self.remote.xid,
            "conflict"
        );
        if !self.history {
            return Ok(());
        }
        let time = |v: Option<i64>| v.map_or(Param::Null, |t| Param::eight_bytes(t as u64));
        let local_origin = self.local_version.map(|v| v.node as i64);
        let local_time = time(self.local_version.map(|v| v.commit_time));
        let remote_time = time(Some(self.remote.version.commit_time));
        let lsn = Param::eight_bytes(self.remote.commit_lsn);
        let params: [&(dyn ToSql + Sync); 15] = [
            &(self.remote.local_node as i64),
            &(self.remote.version.node as i64),
            &self.relation,
            &self.kind.as_str(),
            &self.resolution.as_str(),
            &self.resolver.as_str(),
            &self.key,
            &self.local_row,
            &self.remote_row,
            &local_origin,
            &local_time,
            &remote_time,
            &lsn,
            &i64::from(self.remote.xid),
            &self.detail,
        ];
        client.execute(INSERT_HISTORY, &params).await?;
        Ok(())
    }
}
