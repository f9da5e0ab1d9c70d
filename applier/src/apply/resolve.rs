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

const TABLE_RESOLVER: &str = "\
SELECT resolver::text FROM bdr.table_conflict_resolvers
 WHERE relation_schema = $1 AND relation_name = $2";

fn as_sql<'p>(params: &'p [&'p Param<'_>]) -> Vec<&'p (dyn ToSql + Sync)> {
    params.iter().map(|p| *p as &(dyn ToSql + Sync)).collect()
}

/// The resolver set for `rel` on this node (last_update_wins when none).
async fn resolver_for(client: &Client, rel: &MappedRelation) -> Result<Resolver, ApplyError> {
    let row = client
        .query_opt(TABLE_RESOLVER, &[&rel.schema, &rel.name])
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|name| Resolver::parse(&name))
        .unwrap_or_default())
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
    if hits.is_empty() {
        // A key this applier does not look up (partial or expression
        // index, exclusion constraint), or the row went away meanwhile:
        // the plain INSERT either succeeds or fails with the database's
        // own message.
        let all: Vec<usize> = (0..rel.columns.len()).collect();
        let plain = sql::insert(&rel.table, &rel.names(all.into_iter()))
            .replace(" ON CONFLICT DO NOTHING", "");
        let refs: Vec<&Param<'_>> = params.iter().collect();
        client.execute(&plain, &as_sql(&refs)).await?;
        return Ok(());
    }
    let kind = if hits.len() == 1 {
        ConflictType::InsertExists
    } else {
        ConflictType::MultipleUniqueConflicts
    };
    let resolver = resolver_for(client, rel).await?;
    let resolution = if resolver == Resolver::Error {
        Resolution::Error
    } else if settle_unique(client, rel, remote, resolver, &hits).await? {
        let all: Vec<usize> = (0..rel.columns.len()).collect();
        // Without ON CONFLICT: every row holding one of its keys is gone.
        let insert = sql::insert(&rel.table, &rel.names(all.into_iter()))
            .replace(" ON CONFLICT DO NOTHING", "");
        let refs: Vec<&Param<'_>> = params.iter().collect();
        client.execute(&insert, &as_sql(&refs)).await?;
        Resolution::ApplyRemote
    } else {
        Resolution::KeepLocal
    };
    let all: Vec<usize> = (0..rel.columns.len()).collect();
    let key: Vec<Param<'_>> = rel.key.iter().map(|&i| params[i].clone()).collect();
    let values = RemoteValues {
        columns: &all,
        row: params,
        key: &key,
    };
    let local: Vec<&LocalRow> = hits.iter().collect();
    let mut record = record::build(
        client, rel, remote, &values, kind, resolver, resolution, &local,
    )
    .await?;
    record.detail = Some(format!("unique index {}", indexes.join(", ")));
    finish(client, record).await
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
    let values = RemoteValues {
        columns: v.set_cols,
        row: v.new,
        key: v.key,
    };
    let key_of = |i: usize| rel.key.iter().position(|&k| k == i).map(|p| &v.key[p]);
    let Some(local) = lookup(client, rel, &rel.key, key_of).await?.pop() else {
        let resolver = resolver_for(client, rel).await?;
        let resolution = if resolver == Resolver::Error {
            Resolution::Error
        } else {
            Resolution::Skip
        };
        let kind = ConflictType::UpdateMissing;
        let record = record::build(
            client,
            rel,
            remote,
            &values,
            kind,
            resolver,
            resolution,
            &[],
        )
        .await?;
        return finish(client, record).await;
    };
    let resolver = resolver_for(client, rel).await?;
    if local.roident.is_some_and(|o| o != remote.roident) {
        let resolution = if resolver == Resolver::Error {
            Resolution::Error
        } else if conflict::remote_wins(resolver, local.version, remote.version) {
            Resolution::ApplyRemote
        } else {
            Resolution::KeepLocal
        };
        let kind = ConflictType::UpdateOriginDiffers;
        let record = record::build(
            client,
            rel,
            remote,
            &values,
            kind,
            resolver,
            resolution,
            &[&local],
        )
        .await?;
        finish(client, record).await?;
        if resolution != Resolution::ApplyRemote {
            return Ok(());
        }
    }
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
    let mut record = record::build(
        client,
        rel,
        remote,
        &values,
        kind,
        resolver,
        resolution,
        &local_rows,
    )
    .await?;
    record.detail = Some(format!("unique index {}", indexes.join(", ")));
    finish(client, record).await
}

/// A DELETE that found no row last written by the change's origin.
pub(crate) async fn delete_conflict(
    client: &Client,
    rel: &MappedRelation,
    remote: &RemoteTxn,
    key: &[Param<'_>],
) -> Result<(), ApplyError> {
    let values = RemoteValues {
        columns: &rel.key,
        row: key,
        key,
    };
    let key_of = |i: usize| rel.key.iter().position(|&k| k == i).map(|p| &key[p]);
    let found = lookup(client, rel, &rel.key, key_of).await?.pop();
    let resolver = resolver_for(client, rel).await?;
    let (kind, resolution) = match &found {
        None => (ConflictType::DeleteMissing, Resolution::Skip),
        Some(local) if local.roident.is_some_and(|o| o != remote.roident) => {
            let resolution = if conflict::delete_wins(resolver) {
                Resolution::ApplyRemote
            } else {
                Resolution::KeepLocal
            };
            (ConflictType::DeleteOriginDiffers, resolution)
        }
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
    let record = record::build(
        client, rel, remote, &values, kind, resolver, resolution, &local,
    )
    .await?;
    finish(client, record).await
}
