//! The SQL text of the statements that apply row changes.
//!
//! Identifiers are always quoted; values are always bound as parameters
//! (`$n`), never spliced into the text. Pure functions, unit-tested.

/// `name` as a quoted SQL identifier: `"name"`, inner quotes doubled.
pub(crate) fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `"schema"."name"`.
pub(crate) fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// `INSERT INTO table (c1, c2) VALUES ($1, $2), ($3, $4), ... ON CONFLICT
/// DO NOTHING`: `rows` rows, the parameters row after row. With ON
/// CONFLICT (`detect`), a row that hits any unique key is not inserted and
/// a count below `rows` sends the change down the conflict path; without
/// it such a row fails the statement.
pub(crate) fn insert_rows(table: &str, columns: &[&str], rows: usize, detect: bool) -> String {
    let names: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let width = columns.len();
    let tuples: Vec<String> = (0..rows)
        .map(|r| {
            let params: Vec<String> = (1..=width).map(|i| format!("${}", r * width + i)).collect();
            format!("({})", params.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO {table} ({}) VALUES {}{}",
        names.join(", "),
        tuples.join(", "),
        if detect {
            " ON CONFLICT DO NOTHING"
        } else {
            ""
        }
    )
}

/// Whether the no-conflict path's statements detect conflicts: always,
/// unless `BDR_APPLY_DETECT_CONFLICTS=off`, which the benchmark sets to
/// measure what detection costs. Without it an UPDATE or DELETE finds its
/// row by key alone and an INSERT has no ON CONFLICT clause: a conflict
/// overwrites, or fails as an apply error.
pub(crate) fn detect_conflicts() -> bool {
    static VALUE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VALUE.get_or_init(|| std::env::var("BDR_APPLY_DETECT_CONFLICTS").map_or(true, |v| v != "off"))
}

/// The condition that the row `alias` was last written by the origin
/// `$param` (a replication origin id), or by an unknown writer: a frozen
/// row, or one written earlier in the current transaction. Those apply
/// without a conflict, as in PostgreSQL 18.
fn same_origin(alias: &str, param: usize, detect: bool) -> String {
    if !detect {
        // The parameter is bound all the same.
        return format!("${param}::oid IS NOT NULL");
    }
    format!("coalesce(bdr.xact_origin({alias}.xmin), ${param}::oid) = ${param}::oid")
}

/// `alias.c1 = $k AND alias.c2 = $k+1 ...`, numbering from `first`.
fn key_condition(alias: &str, keys: &[&str], first: usize) -> String {
    let conds: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{alias}.{} = ${}", quote_ident(k), first + i))
        .collect();
    conds.join(" AND ")
}

/// The UPDATE of the no-conflict path:
///
/// ```sql
/// UPDATE table AS t SET s1 = $1, ... WHERE t.k1 = $n+1 AND ...
///    AND <t last written by origin $m>
///    AND NOT EXISTS (SELECT 1 FROM table AS u WHERE u.c = $i AND u.ctid <> t.ctid)
/// ```
///
/// The new values come first, then the key values that find the row, then
/// the expected origin id. Each entry of `unique` lists the positions in
/// `set` of one unique key's columns: the row is not updated when its new
/// values would hit another row's key. An updated count of 0 sends the
/// change down the conflict path, with no extra round trip otherwise.
pub(crate) fn update(
    table: &str,
    set: &[&str],
    keys: &[&str],
    unique: &[Vec<usize>],
    detect: bool,
) -> String {
    let sets: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = ${}", quote_ident(c), i + 1))
        .collect();
    let origin_param = set.len() + keys.len() + 1;
    let mut sql = format!(
        "UPDATE {table} AS t SET {} WHERE {} AND {}",
        sets.join(", "),
        key_condition("t", keys, set.len() + 1),
        same_origin("t", origin_param, detect)
    );
    for cols in unique {
        let conds: Vec<String> = cols
            .iter()
            .map(|&i| format!("u.{} = ${}", quote_ident(set[i]), i + 1))
            .collect();
        sql.push_str(&format!(
            " AND NOT EXISTS (SELECT 1 FROM {table} AS u WHERE {} AND u.ctid <> t.ctid)",
            conds.join(" AND ")
        ));
    }
    sql
}

/// The DELETE of the no-conflict path: `DELETE FROM table AS t WHERE
/// t.k1 = $1 AND ... AND <t last written by origin $n+1>`.
pub(crate) fn delete(table: &str, keys: &[&str], detect: bool) -> String {
    format!(
        "DELETE FROM {table} AS t WHERE {} AND {}",
        key_condition("t", keys, 1),
        same_origin("t", keys.len() + 1, detect)
    )
}

/// The local row found by `keys` (the replica identity or a unique key),
/// locked, with its last writer: its address (`tableoid:ctid`, the
/// table oid telling partitions apart), the row as json, its commit time
/// and the node id of its origin (both NULL when unknown), and the origin
/// id.
pub(crate) fn lookup(table: &str, keys: &[&str]) -> String {
    // The last writer is computed in the target list, not in a LATERAL
    // function in FROM: when the row is locked after a concurrent update,
    // PostgreSQL re-evaluates the target list on the new row version but
    // reuses the FROM function's original output (ROW_MARK_COPY), which
    // would pair the new row with the old writer.
    let origin = "pg_catalog.pg_xact_commit_timestamp_origin(t.xmin)";
    format!(
        "SELECT t.tableoid::text || ':' || t.ctid::text, pg_catalog.to_jsonb(t)::text, \
                ({origin}).timestamp, bdr.origin_node_id(({origin}).roident), bdr.xact_origin(t.xmin) \
           FROM {table} AS t \
          WHERE {} FOR UPDATE OF t",
        key_condition("t", keys, 1)
    )
}

/// `DELETE FROM table WHERE tableoid = $1::oid AND ctid = $2::tid`, for
/// a row locked by [`lookup`] in the same transaction.
pub(crate) fn delete_by_ctid(table: &str) -> String {
    format!("DELETE FROM {table} WHERE tableoid = $1::oid AND ctid = $2::tid")
}

/// `UPDATE table SET s1 = $1, ... WHERE tableoid = $n+1::oid AND ctid =
/// $n+2::tid`.
pub(crate) fn update_by_ctid(table: &str, set: &[&str]) -> String {
    let sets: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = ${}", quote_ident(c), i + 1))
        .collect();
    format!(
        "UPDATE {table} SET {} WHERE tableoid = ${}::oid AND ctid = ${}::tid",
        sets.join(", "),
        set.len() + 1,
        set.len() + 2
    )
}

/// Writes a row given as json (a conflict handler's answer) over the row
/// at `tableoid = $2`, `ctid = $3`: `UPDATE table AS t SET (c1, ...) =
/// (SELECT r.c1, ... FROM jsonb_populate_record(t, $1) AS r) WHERE ...`.
/// Populating the local row itself, columns the json leaves out (such as
/// unchanged TOAST values the remote row did not carry) keep their values.
pub(crate) fn update_from_json(table: &str, columns: &[&str]) -> String {
    let names: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let picked: Vec<String> = names.iter().map(|n| format!("r.{n}")).collect();
    format!(
        "UPDATE {table} AS t SET ({}) = (SELECT {} FROM pg_catalog.jsonb_populate_record(t, $1::text::jsonb) AS r) \
         WHERE t.tableoid = $2::oid AND t.ctid = $3::tid",
        names.join(", "),
        picked.join(", ")
    )
}

/// Bound values rendered as a json object, for the conflict history only:
/// `SELECT to_jsonb(r)::text FROM (SELECT $1::type1 AS c1, ...) AS r`.
/// `columns` are (name, quoted type) pairs, numbered from `first`.
pub(crate) fn values_as_json(columns: &[(&str, &str)], first: usize) -> String {
    let cols: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, (name, ty))| format!("${}::{ty} AS {}", first + i, quote_ident(name)))
        .collect();
    format!(
        "(SELECT pg_catalog.to_jsonb(r)::text FROM (SELECT {}) AS r)",
        cols.join(", ")
    )
}

/// `TRUNCATE t1, t2 [RESTART IDENTITY] [CASCADE]`.
pub(crate) fn truncate(tables: &[String], restart_identity: bool, cascade: bool) -> String {
    let mut sql = format!("TRUNCATE {}", tables.join(", "));
    if restart_identity {
        sql.push_str(" RESTART IDENTITY");
    }
    if cascade {
        sql.push_str(" CASCADE");
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_inner_quotes_doubled() {
        assert_eq!(quote_ident("t"), "\"t\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(qualified("My Schema", "t;drop"), "\"My Schema\".\"t;drop\"");
    }

    #[test]
    fn handler_rows_are_written_by_address() {
        assert_eq!(
            update_from_json("\"s\".\"t\"", &["id", "v"]),
            "UPDATE \"s\".\"t\" AS t SET (\"id\", \"v\") = (SELECT r.\"id\", r.\"v\" \
             FROM pg_catalog.jsonb_populate_record(t, $1::text::jsonb) AS r) \
             WHERE t.tableoid = $2::oid AND t.ctid = $3::tid"
        );
    }

    #[test]
    fn statements_bind_every_value() {
        let t = qualified("public", "t");
        assert_eq!(
            insert_rows(&t, &["id", "v"], 1, true),
            "INSERT INTO \"public\".\"t\" (\"id\", \"v\") VALUES ($1, $2) ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            insert_rows(&t, &["id", "v"], 3, true),
            "INSERT INTO \"public\".\"t\" (\"id\", \"v\") VALUES ($1, $2), ($3, $4), ($5, $6) \
             ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            update(&t, &["id", "v"], &["id"], &[vec![0]], true),
            "UPDATE \"public\".\"t\" AS t SET \"id\" = $1, \"v\" = $2 WHERE t.\"id\" = $3 \
             AND coalesce(bdr.xact_origin(t.xmin), $4::oid) = $4::oid \
             AND NOT EXISTS (SELECT 1 FROM \"public\".\"t\" AS u WHERE u.\"id\" = $1 AND u.ctid <> t.ctid)"
        );
        assert_eq!(
            delete(&t, &["a", "b"], true),
            "DELETE FROM \"public\".\"t\" AS t WHERE t.\"a\" = $1 AND t.\"b\" = $2 \
             AND coalesce(bdr.xact_origin(t.xmin), $3::oid) = $3::oid"
        );
        // Without detection: by key alone, every parameter still used.
        assert_eq!(
            delete(&t, &["a"], false),
            "DELETE FROM \"public\".\"t\" AS t WHERE t.\"a\" = $1 AND $2::oid IS NOT NULL"
        );
        assert_eq!(
            update(&t, &["v"], &["id"], &[], false),
            "UPDATE \"public\".\"t\" AS t SET \"v\" = $1 WHERE t.\"id\" = $2 AND $3::oid IS NOT NULL"
        );
        assert_eq!(
            insert_rows(&t, &["id"], 2, false),
            "INSERT INTO \"public\".\"t\" (\"id\") VALUES ($1), ($2)"
        );
        assert_eq!(
            values_as_json(
                &[
                    ("id", "\"pg_catalog\".\"int4\""),
                    ("v", "\"pg_catalog\".\"text\"")
                ],
                3
            ),
            "(SELECT pg_catalog.to_jsonb(r)::text FROM (SELECT $3::\"pg_catalog\".\"int4\" AS \"id\", \
             $4::\"pg_catalog\".\"text\" AS \"v\") AS r)"
        );
        assert_eq!(
            truncate(&[t.clone(), qualified("s", "u")], true, true),
            "TRUNCATE \"public\".\"t\", \"s\".\"u\" RESTART IDENTITY CASCADE"
        );
        assert_eq!(truncate(&[t], false, false), "TRUNCATE \"public\".\"t\"");
    }
}
