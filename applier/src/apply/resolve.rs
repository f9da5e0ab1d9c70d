//! The conflict path: what happens when a change's statement of the
//! no-conflict path touched no row.
//!
//! ```text
//!  INSERT ... ON CONFLICT DO NOTHING -> 0 rows -> insert_conflict
//!  UPDATE ... WHERE key AND same origin AND no unique key hit -> 0 rows
//!                                    -> update_conflict
//!  DELETE ... WHERE key AND same origin -> 0 rows -> delete_conflict
//! ```
//!
//! Each looks the local row(s) up (locked, with their last writer), asks
//! the table's resolver, applies the decision and reports the conflict
//! (see [`super::record`]). Decisions depend only on the two versions
//! and the resolver, so every node takes the same one. A resolver of
//! `error` returns [`ApplyError::ConflictStop`]: the caller rolls the
//! transaction back and records the conflict on its own.

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use super::conflict::{self, ConflictType, Resolution, Resolver};
use super::param::Param;
use super::record::{self, ConflictRecord, LocalRow, RemoteTxn, RemoteValues};
use super::relation::MappedRelation;
use super::{ApplyError, sql};

const TABLE_RULES: &str = "\
SELECT resolver::text, handler::regproc::text FROM bdr.table_conflict_resolvers
 WHERE relation_schema = $1 AND relation_name = $2";

/// How a table's conflicts are resolved on this node.
#[derive(Debug, Default)]
struct Rules {
    resolver: Resolver,
    /// The conflict handler's name (`bdr.set_conflict_handler`), quoted
    /// and qualified as needed by `regproc` output.
    handler: Option<String>,
}

/// The rules set for `rel` on this node (last_update_wins, no handler,
/// when none).
async fn rules_for(client: &Client, rel: &MappedRelation) -> Result<Rules, ApplyError> {
    let Some(row) = client
        .query_opt(TABLE_RULES, &[&rel.schema, &rel.name])
        .await?
    else {
        return Ok(Rules::default());
    };
    Ok(Rules {
        resolver: row
            .get::<_, Option<String>>(0)
            .and_then(|name| Resolver::parse(&name))
            .unwrap_or_default(),
        handler: row.get(1),
    })
}

/// One remote change on the conflict path.
struct Change<'c, 'p, 'a> {
    client: &'c Client,
    rel: &'c MappedRelation,
    remote: &'c RemoteTxn,
    values: RemoteValues<'p, 'a>,
}

impl Change<'_, '_, '_> {
    /// Records the conflict, or stops apply when `resolution` says so.
    async fn conclude(
        &self,
        kind: ConflictType,
        resolver: Resolver,
        resolution: Resolution,
        local: &[&LocalRow],
        detail: Option<String>,
    ) -> Result<(), ApplyError> {
        let mut record = self.record(kind, resolver, resolution, local).await?;
        record.detail = detail;
        finish(self.client, record).await
    }

    async fn record(
        &self,
        kind: ConflictType,
        resolver: Resolver,
        resolution: Resolution,
        local: &[&LocalRow],
    ) -> Result<ConflictRecord, ApplyError> {
        record::build(
            self.client,
            self.rel,
            self.remote,
            &self.values,
            kind,
            resolver,
            resolution,
            local,
        )
        .await
    }

    /// Lets the table's conflict handler decide between the local row and
    /// the remote change: it returns the row to keep, written over the
    /// local one, or NULL to keep the local row as it is.
    async fn by_handler(
        &self,
        kind: ConflictType,
        rules: &Rules,
        handler: &str,
        local: &LocalRow,
    ) -> Result<(), ApplyError> {
        let mut record = self
            .record(kind, rules.resolver, Resolution::KeepLocal, &[local])
            .await?;
        let call = format!(
            "SELECT ({handler}($1::text::bdr.conflict_type, $2::text::jsonb, $3::text::jsonb))::text"
        );
        let row = self
            .client
            .query_one(&call, &[&kind.as_str(), &local.json, &record.remote_row])
            .await?;
        let kept: Option<String> = row.get(0);
        record.resolution = match kept {
            None => Resolution::KeepLocal,
            Some(ref k) if *k == local.json => Resolution::KeepLocal,
            Some(k) => {
                let [table, ctid] = address(&local.ctid);
                let names = self.rel.names(0..self.rel.columns.len());
                self.client
                    .execute(
                        &sql::update_from_json(&self.rel.table, &names),
                        &[&k, &table, &ctid],
                    )
                    .await?;
                if Some(&k) == record.remote_row.as_ref() {
                    Resolution::ApplyRemote
                } else {
                    Resolution::Merge
                }
            }
        };
        record.detail = Some(format!("handler {handler}"));
        finish(self.client, record).await
    }
}

fn as_sql<'p>(params: &'p [&'p Param<'_>]) -> Vec<&'p (dyn ToSql + Sync)> {
    params.iter().map(|p| *p as &(dyn ToSql + Sync)).collect()
}

/// The local rows `cols` of the remote values `params` (positions among
/// the relation's columns) find, locked.
async fn lookup<'v, 'a: 'v>(
    client: &Client,
    rel: &MappedRelation,
    cols: &[usize],
    value_of: impl Fn(usize) -> Option<&'v Param<'a>>,
) -> Result<Vec<LocalRow>, ApplyError> {
    let Some(values) = cols
        .iter()
        .map(|&c| value_of(c))
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(Vec::new());
    };
    let query = sql::lookup(&rel.table, &rel.names(cols.iter().copied()));
    let rows: Vec<Row> = client.query(&query, &as_sql(&values)).await?;
    rows.iter()
        .map(|r| LocalRow::from_row(r).map_err(ApplyError::from))
        .collect()
}

/// Every local row, other than `except`, that holds one of the unique
/// keys of the remote values, each once.
async fn unique_hits<'v, 'a: 'v>(
    client: &Client,
    rel: &MappedRelation,
    value_of: impl Fn(usize) -> Option<&'v Param<'a>> + Copy,
    except: Option<&str>,
) -> Result<(Vec<LocalRow>, Vec<String>), ApplyError> {
    let mut hits: Vec<LocalRow> = Vec::new();
    let mut indexes = Vec::new();
    for index in &rel.unique {
        for row in lookup(client, rel, &index.columns, value_of).await? {
            if Some(row.ctid.as_str()) == except || hits.iter().any(|h| h.ctid == row.ctid) {
                continue;
            }
            indexes.push(index.name.clone());
            hits.push(row);
        }
    }
    Ok((hits, indexes))
}

/// The table oid and ctid of a row's address from [`sql::lookup`], as
/// text parameters.
fn address(addr: &str) -> [Param<'_>; 2] {
    let (table, ctid) = addr.split_once(':').unwrap_or(("0", addr));
    [Param::Text(table), Param::Text(ctid)]
}

async fn delete_row(client: &Client, rel: &MappedRelation, addr: &str) -> Result<(), ApplyError> {
    let [table, ctid] = address(addr);
    client
        .execute(&sql::delete_by_ctid(&rel.table), &[&table, &ctid])
        .await?;
    Ok(())
}

/// Reports `record`, or stops apply when the resolver says so.
async fn finish(client: &Client, record: ConflictRecord) -> Result<(), ApplyError> {
    if record.resolution == Resolution::Error {
        return Err(ApplyError::ConflictStop(Box::new(record)));
    }
    record.report(client).await
}

/// Removes every conflicting row the remote version beats; the remote
/// change applies only if it beats them all. This is the same on every
/// node, so the loser disappears everywhere.
async fn settle_unique(
    client: &Client,
    rel: &MappedRelation,
    remote: &RemoteTxn,
    resolver: Resolver,
    hits: &[LocalRow],
) -> Result<bool, ApplyError> {
    let mut applies = true;
    for hit in hits {
        if conflict::remote_wins(resolver, hit.version, remote.version) {
            delete_row(client, rel, &hit.ctid).await?;
        } else {
            applies = false;
        }
    }
    Ok(applies)
}

/// An INSERT whose row hit one or more unique keys.
pub(crate) async fn insert_conflict(
    client: &Client,
    rel: &MappedRelation,
    remote: &RemoteTxn,
    params: &[Param<'_>],
) -> Result<(), ApplyError> {
    let (hits, indexes) = unique_hits(client, rel, |i| params.get(i), None).await?;
    let all: Vec<usize> = (0..rel.columns.len()).collect();
    // Without ON CONFLICT: once no row holds one of its keys, the INSERT
    // either succeeds or fails with the database's own message.
    let plain = sql::insert_rows(&rel.table, &rel.names(all.iter().copied()), 1, false);
    let refs: Vec<&Param<'_>> = params.iter().collect();
    if hits.is_empty() {
        // A key this applier does not look up (partial or expression
        // index, exclusion constraint), or the row went away meanwhile.
        client.execute(&plain, &as_sql(&refs)).await?;
        return Ok(());
    }
    let key: Vec<Param<'_>> = rel.key.iter().map(|&i| params[i].clone()).collect();
    let change = Change {
        client,
        rel,
        remote,
        values: RemoteValues {
            columns: &all,
            row: params,
            key: &key,
        },
    };
    let rules = rules_for(client, rel).await?;
    if let ([hit], Some(handler)) = (&hits[..], &rules.handler) {
        return change
            .by_handler(ConflictType::InsertExists, &rules, handler, hit)
            .await;
    }
    let kind = if hits.len() == 1 {
        ConflictType::InsertExists
    } else {
        ConflictType::MultipleUniqueConflicts
    };
    let resolution = if rules.resolver == Resolver::Error {
        Resolution::Error
    } else if settle_unique(client, rel, remote, rules.resolver, &hits).await? {
        client.execute(&plain, &as_sql(&refs)).await?;
        Resolution::ApplyRemote
    } else {
        Resolution::KeepLocal
    };
    let local: Vec<&LocalRow> = hits.iter().collect();
    let detail = Some(format!("unique index {}", indexes.join(", ")));
    change
        .conclude(kind, rules.resolver, resolution, &local, detail)
        .await
}

/// The values of an UPDATE: its new row (the set columns) and its key.
#[derive(Debug)]
pub(crate) struct UpdateValues<'p, 'a> {
    pub(crate) set_cols: &'p [usize],
    pub(crate) new: &'p [Param<'a>],
    pub(crate) key: &'p [Param<'a>],
}

/// An UPDATE that found no row with the same origin and free unique keys.
pub(crate) async fn update_conflict(
    client: &Client,
    rel: &MappedRelation,
    remote: &RemoteTxn,
    v: &UpdateValues<'_, '_>,
) -> Result<(), ApplyError> {
    let change = Change {
        client,
        rel,
        remote,
        values: RemoteValues {
            columns: v.set_cols,
            row: v.new,
            key: v.key,
        },
    };
    let key_of = |i: usize| rel.key.iter().position(|&k| k == i).map(|p| &v.key[p]);
    let found = lookup(client, rel, &rel.key, key_of).await?.pop();
    let rules = rules_for(client, rel).await?;
    let resolver = rules.resolver;
    let Some(local) = found else {
        let resolution = if resolver == Resolver::Error {
            Resolution::Error
        } else {
            Resolution::Skip
        };
        return change
            .conclude(ConflictType::UpdateMissing, resolver, resolution, &[], None)
            .await;
    };
    if local.roident.is_some_and(|o| o != remote.roident) {
        let kind = ConflictType::UpdateOriginDiffers;
        if let Some(handler) = &rules.handler {
            return change.by_handler(kind, &rules, handler, &local).await;
        }
        let wins = conflict::remote_wins(resolver, local.version, remote.version);
        let resolution = conflict::decide(resolver, wins);
        change
            .conclude(kind, resolver, resolution, &[&local], None)
            .await?;
        if resolution != Resolution::ApplyRemote {
            return Ok(());
        }
    }
    update_row(&change, resolver, v, &local).await
}

/// Writes an UPDATE's new values over `local`, settling first with every
/// other row that holds one of its unique keys.
async fn update_row(
    change: &Change<'_, '_, '_>,
    resolver: Resolver,
    v: &UpdateValues<'_, '_>,
    local: &LocalRow,
) -> Result<(), ApplyError> {
    let Change {
        client,
        rel,
        remote,
        ..
    } = *change;
    let new_of = |i: usize| v.set_cols.iter().position(|&c| c == i).map(|p| &v.new[p]);
    let (hits, indexes) = unique_hits(client, rel, new_of, Some(&local.ctid)).await?;
    let set_names = rel.names(v.set_cols.iter().copied());
    let update = sql::update_by_ctid(&rel.table, &set_names);
    let mut refs: Vec<&Param<'_>> = v.new.iter().collect();
    let [table, ctid] = address(&local.ctid);
    refs.push(&table);
    refs.push(&ctid);
    if hits.is_empty() {
        client.execute(&update, &as_sql(&refs)).await?;
        return Ok(());
    }
    let kind = if hits.len() == 1 {
        ConflictType::UpdateExists
    } else {
        ConflictType::MultipleUniqueConflicts
    };
    let resolution = if resolver == Resolver::Error {
        Resolution::Error
    } else if settle_unique(client, rel, remote, resolver, &hits).await? {
        client.execute(&update, &as_sql(&refs)).await?;
        Resolution::ApplyRemote
    } else {
        // The remote version of this row lost to another row holding its
        // key: under a timestamp resolver the row is removed, as the
        // other nodes remove it when that other row reaches them.
        if matches!(
            resolver,
            Resolver::LastUpdateWins | Resolver::FirstUpdateWins
        ) {
            delete_row(client, rel, &local.ctid).await?;
        }
        Resolution::KeepLocal
    };
    let local_rows: Vec<&LocalRow> = hits.iter().collect();
    let detail = Some(format!("unique index {}", indexes.join(", ")));
    change
        .conclude(kind, resolver, resolution, &local_rows, detail)
        .await
}

/// A DELETE that found no row last written by the change's origin.
pub(crate) async fn delete_conflict(
    client: &Client,
    rel: &MappedRelation,
    remote: &RemoteTxn,
    key: &[Param<'_>],
) -> Result<(), ApplyError> {
    let change = Change {
        client,
        rel,
        remote,
        values: RemoteValues {
            columns: &rel.key,
            row: key,
            key,
        },
    };
    let key_of = |i: usize| rel.key.iter().position(|&k| k == i).map(|p| &key[p]);
    let found = lookup(client, rel, &rel.key, key_of).await?.pop();
    let resolver = rules_for(client, rel).await?.resolver;
    let (kind, resolution) = match &found {
        None => (ConflictType::DeleteMissing, Resolution::Skip),
        Some(local) if local.roident.is_some_and(|o| o != remote.roident) => (
            ConflictType::DeleteOriginDiffers,
            conflict::decide(resolver, conflict::delete_wins(resolver)),
        ),
        Some(local) => {
            // Same origin after all (the row changed meanwhile): no conflict.
            delete_row(client, rel, &local.ctid).await?;
            return Ok(());
        }
    };
    let resolution = if resolver == Resolver::Error {
        Resolution::Error
    } else {
        resolution
    };
    if let (Some(local), Resolution::ApplyRemote) = (&found, resolution) {
        delete_row(client, rel, &local.ctid).await?;
    }
    let local: Vec<&LocalRow> = found.iter().collect();
    change
        .conclude(kind, resolver, resolution, &local, None)
        .await
}
