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

use bdr_protocol::{Oid, RelId, Relation, ReplicaIdentity};
use tokio_postgres::{Client, Statement};

use super::ApplyError;
use super::sql;

/// Looks up the local table's columns: name, type OID, type schema and
/// name, generated flag, type as SQL writes it.
const LOCAL_COLUMNS: &str = "\
SELECT a.attname::text, a.atttypid::oid, tn.nspname::text, t.typname::text, a.attgenerated <> '',
       pg_catalog.format_type(a.atttypid, NULL)
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
  JOIN pg_catalog.pg_namespace tn ON tn.oid = t.typnamespace
 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
 ORDER BY a.attnum";

/// One remote column, matched to a local one.
#[derive(Debug)]
pub(crate) struct MappedColumn {
    pub(crate) name: String,
    /// The column's type OID on the sending node (it tells the width of
    /// integers sent compactly).
    pub(crate) remote_type: Oid,
}

/// A remote relation and the local table it is applied to.
#[derive(Debug)]
pub(crate) struct MappedRelation {
    /// `schema.name` as written in messages and logs.
    pub(crate) display: String,
    /// The quoted, schema-qualified local table.
    pub(crate) table: String,
    /// In the remote column order, which is the order of tuple data.
    pub(crate) columns: Vec<MappedColumn>,
    /// Indexes into `columns` of the replica identity key.
    pub(crate) key: Vec<usize>,
    insert: Option<Statement>,
    update_all: Option<Statement>,
    /// UPDATEs that leave unchanged TOAST columns out, by which columns
    /// are set.
    update_partial: HashMap<Vec<bool>, Statement>,
    delete: Option<Statement>,
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
        Ok(MappedRelation {
            display,
            table: sql::qualified(remote.schema, remote.name),
            columns,
            key,
            insert: None,
            update_all: None,
            update_partial: HashMap::new(),
            delete: None,
        })
    }

    fn names<'s>(&'s self, pick: impl Iterator<Item = usize> + 's) -> Vec<&'s str> {
        pick.map(|i| self.columns[i].name.as_str()).collect()
    }

    /// The INSERT of every remote column, prepared on first use.
    pub(crate) async fn insert(&mut self, client: &Client) -> Result<Statement, ApplyError> {
        if let Some(s) = &self.insert {
            return Ok(s.clone());
        }
        let sql = sql::insert(&self.table, &self.names(0..self.columns.len()));
        let s = client.prepare(&sql).await?;
        Ok(self.insert.insert(s).clone())
    }

    /// The UPDATE that sets the columns flagged in `set` and finds the row
    /// by its key, prepared on first use.
    pub(crate) async fn update(
        &mut self,
        client: &Client,
        set: &[bool],
    ) -> Result<Statement, ApplyError> {
        let all = set.iter().all(|s| *s);
        let cached = if all {
            self.update_all.as_ref()
        } else {
            self.update_partial.get(set)
        };
        if let Some(s) = cached {
            return Ok(s.clone());
        }
        let set_names = self.names((0..set.len()).filter(|i| set[*i]));
        let sql = sql::update(
            &self.table,
            &set_names,
            &self.names(self.key.iter().copied()),
        );
        let s = client.prepare(&sql).await?;
        if all {
            self.update_all = Some(s.clone());
        } else {
            self.update_partial.insert(set.to_vec(), s.clone());
        }
        Ok(s)
    }

    /// The DELETE by key, prepared on first use.
    pub(crate) async fn delete(&mut self, client: &Client) -> Result<Statement, ApplyError> {
        if let Some(s) = &self.delete {
            return Ok(s.clone());
        }
        let sql = sql::delete(&self.table, &self.names(self.key.iter().copied()));
        let s = client.prepare(&sql).await?;
        Ok(self.delete.insert(s).clone())
    }
}

/// The relations of one stream, by stream-local id.
#[derive(Debug, Default)]
pub(crate) struct RelationMap {
    by_id: HashMap<RelId, MappedRelation>,
}

impl RelationMap {
    /// Records `relation` under `id`, replacing (and so dropping the
    /// statements of) any earlier definition.
    pub(crate) fn define(&mut self, id: RelId, relation: MappedRelation) {
        self.by_id.insert(id, relation);
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
}
