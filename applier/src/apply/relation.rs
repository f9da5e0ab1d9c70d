//! Remote relations matched to local tables, with their prepared
//! statements.
//!
//! A RELATION message describes a remote table under a stream-local id.
//! It is matched to the local table of the same schema and name, and each
//! remote column to the local column of the same name (column order may
//! differ between nodes). A missing table or column, or a column whose type
//! differs, is an error naming the relation and column. Statements are
//! prepared on first use per change kind and dropped with the entry when a
//! new RELATION message redefines the id.

use std::collections::HashMap;

use bdr_protocol::apply::{LocalColumn, LocalRelation};
use bdr_protocol::{Message, Messages, Oid, RelId, Relation, ReplicaIdentity, write_relation};
use rustc_hash::FxHashMap;
use tokio_postgres::{Client, Row, Statement};

use super::ApplyError;
use super::sql;

/// Looks up the local table's columns: name, type OID, type schema and
/// name, generated flag, type as SQL writes it, column number, the
/// table's OID and whether it is a plain table.
const LOCAL_COLUMNS: &str = "\
SELECT a.attname::text, a.atttypid::oid, tn.nspname::text, t.typname::text, a.attgenerated <> '',
       pg_catalog.format_type(a.atttypid, NULL), a.attnum::int2, c.oid, c.relkind = 'r'
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
  JOIN pg_catalog.pg_namespace tn ON tn.oid = t.typnamespace
 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
 ORDER BY a.attnum";

/// The local table's unique indexes that conflicts are looked up by:
/// valid, immediate, on plain columns and without a predicate (others are
/// left to the database's own checks), the primary key first. Key columns
/// only (not INCLUDE columns). With each, its OID and whether it is a
/// btree.
const LOCAL_UNIQUE: &str = "\
SELECT ic.relname::text, array_agg(a.attname::text ORDER BY k.ord), i.indexrelid,
       ic.relam = (SELECT oid FROM pg_catalog.pg_am WHERE amname = 'btree')
  FROM pg_catalog.pg_index i
  JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
  JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
  JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
 WHERE n.nspname = $1 AND c.relname = $2
   AND i.indisunique AND i.indisvalid AND i.indimmediate
   AND i.indpred IS NULL AND i.indexprs IS NULL AND k.ord <= i.indnkeyatts
 GROUP BY ic.relname, i.indisprimary, i.indexrelid, ic.relam
 ORDER BY i.indisprimary DESC, ic.relname";

/// A statement of the no-conflict path, by what it does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Shape {
    /// A multi-row INSERT of this many rows, without ON CONFLICT.
    InsertRows(usize),
    /// The UPDATE setting the flagged columns; whether the key changes.
    Update(Vec<bool>, bool),
    /// The DELETE by key.
    Delete,
}

/// One local unique index, by the positions of its columns among the
/// remote columns.
#[derive(Debug)]
pub(crate) struct UniqueIndex {
    pub(crate) name: String,
    pub(crate) columns: Vec<usize>,
    oid: Oid,
    btree: bool,
}

/// One remote column, matched to a local one.
#[derive(Debug)]
pub(crate) struct MappedColumn {
    pub(crate) name: String,
    /// The column's type OID on the sending node (it tells the width of
    /// integers sent compactly).
    pub(crate) remote_type: Oid,
    /// The local column's type, quoted and schema-qualified (for casts).
    pub(crate) local_type: String,
}

/// A remote relation and the local table it is applied to.
#[derive(Debug)]
pub(crate) struct MappedRelation {
    /// `schema.name` as written in messages and logs.
    pub(crate) display: String,
    /// The table's schema and name, unquoted.
    pub(crate) schema: String,
    pub(crate) name: String,
    /// The quoted, schema-qualified local table.
    pub(crate) table: String,
    /// In the remote column order, which is the order of tuple data.
    pub(crate) columns: Vec<MappedColumn>,
    /// Indexes into `columns` of the replica identity key.
    pub(crate) key: Vec<usize>,
    /// The local unique indexes whose columns the remote rows carry.
    pub(crate) unique: Vec<UniqueIndex>,
    /// The description `bdr.apply_changes` applies changes by, when the
    /// table suits it (see [`in_server`]).
    pub(crate) local: Option<LocalRelation>,
    insert: Option<Statement>,
    /// Multi-row INSERTs, by number of rows (powers of two).
    insert_rows: HashMap<usize, Statement>,
    /// The UPDATE of every column, by whether the key changes.
    update_all: [Option<Statement>; 2],
    /// UPDATEs that leave unchanged TOAST columns out, by which columns
    /// are set and whether the key changes.
    update_partial: HashMap<(Vec<bool>, bool), Statement>,
    delete: Option<Statement>,
    /// Statement texts by shape, for the batched apply session.
    texts: HashMap<Shape, std::sync::Arc<str>>,
    /// The RELATION message this mapping came from, to map it again
    /// (see [`RelationMap::remap`]).
    message: Vec<u8>,
}

impl MappedRelation {
    /// Matches `remote` to the local table through `client`.
    pub(crate) async fn map(client: &Client, remote: &Relation<'_>) -> Result<Self, ApplyError> {
        let display = format!("{}.{}", remote.schema, remote.name);
        let rows = client
            .query(LOCAL_COLUMNS, &[&remote.schema, &remote.name])
            .await?;
        if rows.is_empty() {
            return Err(ApplyError::MissingTable { relation: display });
        }
        let mut columns = Vec::with_capacity(remote.columns.len());
        let mut local_columns = Vec::with_capacity(remote.columns.len());
        for col in &remote.columns {
            let local = rows
                .iter()
                .find(|r| r.get::<_, &str>(0) == col.name)
                .ok_or_else(|| ApplyError::MissingColumn {
                    relation: display.clone(),
                    column: col.name.into(),
                })?;
            let (local_oid, local_schema, local_type): (Oid, &str, &str) =
                (local.get(1), local.get(2), local.get(3));
            let same_type = match &col.type_name {
                Some(t) => t.schema == local_schema && t.name == local_type,
                None => col.type_oid == local_oid,
            };
            if !same_type {
                let remote_type = match col.type_name {
                    Some(t) => format!("{}.{}", t.schema, t.name),
                    // Built-in types have the same OID on every node.
                    None => client
                        .query_one("SELECT pg_catalog.format_type($1, NULL)", &[&col.type_oid])
                        .await?
                        .get(0),
                };
                return Err(ApplyError::TypeMismatch {
                    relation: display,
                    column: col.name.into(),
                    remote: remote_type,
                    local: local.get(5),
                });
            }
            if local.get::<_, bool>(4) {
                return Err(ApplyError::GeneratedColumn {
                    relation: display,
                    column: col.name.into(),
                });
            }
            columns.push(MappedColumn {
                name: col.name.into(),
                remote_type: col.type_oid,
                local_type: sql::qualified(local_schema, local_type),
            });
            local_columns.push(LocalColumn {
                attnum: u16::try_from(local.get::<_, i16>(6)).unwrap_or(0),
                type_oid: local_oid,
                key: col.key,
            });
        }
        let mut key: Vec<usize> = remote
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect();
        if key.is_empty() && remote.replica_identity == ReplicaIdentity::Full {
            key = (0..columns.len()).collect();
        }
        let unique = unique_indexes(client, remote, &columns).await?;
        let local = in_server(remote, &rows, &unique, local_columns);
        Ok(MappedRelation {
            display,
            schema: remote.schema.into(),
            name: remote.name.into(),
            table: sql::qualified(remote.schema, remote.name),
            columns,
            key,
            unique,
            local,
            insert: None,
            insert_rows: HashMap::new(),
            update_all: [None, None],
            update_partial: HashMap::new(),
            delete: None,
            texts: HashMap::new(),
            message: {
                let mut message = Vec::new();
                write_relation(&mut message, remote);
                message
            },
        })
    }

    pub(crate) fn names<'s>(&'s self, pick: impl Iterator<Item = usize> + 's) -> Vec<&'s str> {
        pick.map(|i| self.columns[i].name.as_str()).collect()
    }

    /// The INSERT of every remote column, prepared on first use.
    pub(crate) async fn insert(&mut self, client: &Client) -> Result<Statement, ApplyError> {
        if let Some(s) = &self.insert {
            return Ok(s.clone());
        }
        let sql = sql::insert_rows(
            &self.table,
            &self.names(0..self.columns.len()),
            1,
            sql::detect_conflicts(),
        );
        let s = client.prepare(&sql).await?;
        Ok(self.insert.insert(s).clone())
    }

    /// The INSERT of `rows` rows at once, prepared on first use, for
    /// pipelined apply: without ON CONFLICT, so a row that hits a unique
    /// key fails the statement and the transaction is applied again one
    /// statement at a time, where [`Self::insert`] detects the conflict.
    /// A failed statement costs a replay; ON CONFLICT would cost every
    /// INSERT a speculative insertion.
    pub(crate) async fn insert_rows(
        &mut self,
        client: &Client,
        rows: usize,
    ) -> Result<Statement, ApplyError> {
        if let Some(s) = self.insert_rows.get(&rows) {
            return Ok(s.clone());
        }
        let sql = sql::insert_rows(&self.table, &self.names(0..self.columns.len()), rows, false);
        let s = client.prepare(&sql).await?;
        self.insert_rows.insert(rows, s.clone());
        Ok(s)
    }

    /// The UPDATE that sets the columns flagged in `set` and finds the row
    /// by its key, prepared on first use. Unless `key_changes`, a unique
    /// key made of key columns only keeps its values and is not checked.
    pub(crate) async fn update(
        &mut self,
        client: &Client,
        set: &[bool],
        key_changes: bool,
    ) -> Result<Statement, ApplyError> {
        let all = set.iter().all(|s| *s);
        let cached = if all {
            self.update_all[usize::from(key_changes)].as_ref()
        } else {
            self.update_partial.get(&(set.to_vec(), key_changes))
        };
        if let Some(s) = cached {
            return Ok(s.clone());
        }
        let sql = self.update_sql(set, key_changes);
        let s = client.prepare(&sql).await?;
        if all {
            self.update_all[usize::from(key_changes)] = Some(s.clone());
        } else {
            self.update_partial
                .insert((set.to_vec(), key_changes), s.clone());
        }
        Ok(s)
    }

    /// The SQL text of a statement of the no-conflict path, built on first
    /// use (for the batched apply session, which prepares by text).
    pub(crate) fn sql(&mut self, shape: Shape) -> std::sync::Arc<str> {
        if let Some(s) = self.texts.get(&shape) {
            return s.clone();
        }
        let detect = sql::detect_conflicts();
        let text: std::sync::Arc<str> = match &shape {
            Shape::InsertRows(rows) => sql::insert_rows(
                &self.table,
                &self.names(0..self.columns.len()),
                *rows,
                false,
            ),
            Shape::Update(set, key_changes) => self.update_sql(set, *key_changes),
            Shape::Delete => {
                sql::delete(&self.table, &self.names(self.key.iter().copied()), detect)
            }
        }
        .into();
        self.texts.insert(shape, text.clone());
        text
    }

    /// The text of [`Self::update`]'s statement.
    fn update_sql(&self, set: &[bool], key_changes: bool) -> String {
        let set_cols: Vec<usize> = (0..set.len()).filter(|i| set[*i]).collect();
        let set_names = self.names(set_cols.iter().copied());
        // Each unique key whose columns are all set, by positions in the
        // SET list.
        let unique: Vec<Vec<usize>> = self
            .unique
            .iter()
            .filter(|u| key_changes || !u.columns.iter().all(|c| self.key.contains(c)))
            .filter_map(|u| {
                u.columns
                    .iter()
                    .map(|c| set_cols.iter().position(|s| s == c))
                    .collect()
            })
            .collect();
        let detect = sql::detect_conflicts();
        sql::update(
            &self.table,
            &set_names,
            &self.names(self.key.iter().copied()),
            if detect { &unique } else { &[] },
            detect,
        )
    }

    /// The DELETE by key, prepared on first use.
    pub(crate) async fn delete(&mut self, client: &Client) -> Result<Statement, ApplyError> {
        if let Some(s) = &self.delete {
            return Ok(s.clone());
        }
        let sql = sql::delete(
            &self.table,
            &self.names(self.key.iter().copied()),
            sql::detect_conflicts(),
        );
        let s = client.prepare(&sql).await?;
        Ok(self.delete.insert(s).clone())
    }
}

/// The description of `remote` for `bdr.apply_changes`, when its changes
/// can be applied there: the local table is a plain one whose every column
/// the remote rows carry (the server fills no defaults), none of them
/// generated. UPDATEs and DELETEs also need a unique btree index of the
/// local table on the remote replica identity's columns (no more, no
/// fewer) to find rows by; without one the description has no index (0)
/// and only INSERTs go to the server. Otherwise changes go out as
/// statements.
fn in_server(
    remote: &Relation<'_>,
    local_rows: &[Row],
    unique: &[UniqueIndex],
    columns: Vec<LocalColumn>,
) -> Option<LocalRelation> {
    let plain = local_rows.first()?.get::<_, bool>(8);
    let all_carried = local_rows.iter().all(|r| {
        !r.get::<_, bool>(4) && remote.columns.iter().any(|c| c.name == r.get::<_, &str>(0))
    });
    if !plain || !all_carried || columns.iter().any(|c| c.attnum == 0) {
        return None;
    }
    let key: Vec<usize> = (0..columns.len()).filter(|&i| columns[i].key).collect();
    let index = unique
        .iter()
        .find(|u| {
            let mut cols = u.columns.clone();
            cols.sort_unstable();
            cols.dedup();
            u.btree && !key.is_empty() && cols == key
        })
        .map_or(0, |u| u.oid);
    Some(LocalRelation {
        rel_id: remote.rel_id,
        table: local_rows[0].get(7),
        index,
        columns,
    })
}

/// The unique indexes of the local table for `remote`, by remote column
/// positions; indexes on a column the remote rows lack are left out.
async fn unique_indexes(
    client: &Client,
    remote: &Relation<'_>,
    columns: &[MappedColumn],
) -> Result<Vec<UniqueIndex>, ApplyError> {
    let rows = client
        .query(LOCAL_UNIQUE, &[&remote.schema, &remote.name])
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let names: Vec<String> = row.get(1);
        let positions: Option<Vec<usize>> = names
            .iter()
            .map(|n| columns.iter().position(|c| &c.name == n))
            .collect();
        if let Some(columns) = positions {
            out.push(UniqueIndex {
                name: row.get(0),
                columns,
                oid: row.get(2),
                btree: row.get(3),
            });
        }
    }
    Ok(out)
}

/// The relations of one stream, by stream-local id (looked up for every
/// change: a fast hash of the peer's ids).
#[derive(Debug, Default)]
pub(crate) struct RelationMap {
    by_id: FxHashMap<RelId, MappedRelation>,
}

impl RelationMap {
    /// Records `relation` under `id`, replacing (and so dropping the
    /// statements of) any earlier definition.
    pub(crate) fn define(&mut self, id: RelId, relation: MappedRelation) {
        self.by_id.insert(id, relation);
    }

    /// The relation under `id`, if defined.
    pub(crate) fn peek(&self, id: RelId) -> Option<&MappedRelation> {
        self.by_id.get(&id)
    }

    pub(crate) fn get(&mut self, id: RelId) -> Result<&mut MappedRelation, ApplyError> {
        self.by_id
            .get_mut(&id)
            .ok_or(ApplyError::UnknownRelation(id))
    }

    /// Forgets every relation (a new stream starts with none).
    pub(crate) fn clear(&mut self) {
        self.by_id.clear();
    }

    /// Maps every relation again from the RELATION message it came from,
    /// through `client`: a local table may have been dropped and created
    /// again (a new OID, other column numbers) while the peer, whose
    /// table did not change, sends no new RELATION message. A relation
    /// that cannot be mapped now keeps its mapping (its statements report
    /// what is wrong).
    pub(crate) async fn remap(&mut self, client: &Client) -> Result<(), ApplyError> {
        for relation in self.by_id.values_mut() {
            let Some(Ok(Message::Relation(remote))) = Messages::new(&relation.message).next()
            else {
                continue;
            };
            match MappedRelation::map(client, &remote).await {
                Ok(mapped) => *relation = mapped,
                Err(e @ ApplyError::Database(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(relation = %relation.display, error = %e, "cannot map the table again")
                }
            }
        }
        Ok(())
    }
}
