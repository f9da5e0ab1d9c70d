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

/// `INSERT INTO table (c1, c2) VALUES ($1, $2)`.
pub(crate) fn insert(table: &str, columns: &[&str]) -> String {
    let names: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let params: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
    format!(
        "INSERT INTO {table} ({}) VALUES ({})",
        names.join(", "),
        params.join(", ")
    )
}

/// `c1 = $k AND c2 = $k+1 ...`, numbering from `first`.
fn key_condition(keys: &[&str], first: usize) -> String {
    let conds: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ${}", quote_ident(k), first + i))
        .collect();
    conds.join(" AND ")
}

/// `UPDATE table SET s1 = $1, ... WHERE k1 = $n+1 AND ...`: the new values
/// first, then the key values that find the row.
pub(crate) fn update(table: &str, set: &[&str], keys: &[&str]) -> String {
    let sets: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = ${}", quote_ident(c), i + 1))
        .collect();
    format!(
        "UPDATE {table} SET {} WHERE {}",
        sets.join(", "),
        key_condition(keys, set.len() + 1)
    )
}

/// `DELETE FROM table WHERE k1 = $1 AND ...`.
pub(crate) fn delete(table: &str, keys: &[&str]) -> String {
    format!("DELETE FROM {table} WHERE {}", key_condition(keys, 1))
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
    fn statements_bind_every_value() {
        let t = qualified("public", "t");
        assert_eq!(
            insert(&t, &["id", "v"]),
            "INSERT INTO \"public\".\"t\" (\"id\", \"v\") VALUES ($1, $2)"
        );
        assert_eq!(
            update(&t, &["id", "v"], &["id"]),
            "UPDATE \"public\".\"t\" SET \"id\" = $1, \"v\" = $2 WHERE \"id\" = $3"
        );
        assert_eq!(
            delete(&t, &["a", "b"]),
            "DELETE FROM \"public\".\"t\" WHERE \"a\" = $1 AND \"b\" = $2"
        );
        assert_eq!(
            truncate(&[t.clone(), qualified("s", "u")], true, true),
            "TRUNCATE \"public\".\"t\", \"s\".\"u\" RESTART IDENTITY CASCADE"
        );
        assert_eq!(truncate(&[t], false, false), "TRUNCATE \"public\".\"t\"");
    }
}
