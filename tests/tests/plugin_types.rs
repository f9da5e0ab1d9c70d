//! The type matrix: one column per built-in type (and arrays of several,
//! and user-defined types), one row of values, decoded through
//! `bdr_protocol` and compared with what PostgreSQL itself produces for
//! the same value: the type's send function for binary datums
//! (`SELECT encode(int4send(c), 'hex')`), its output function for text
//! datums (`SELECT textin(int4out(c))`), the value for integer datums.

mod plugin_support;

use bdr_protocol::{Datum, Message};
use bdr_tests::Node;
use plugin_support::*;

/// (type, literal) of every built-in base type a table can store.
const BUILT_IN: &[(&str, &str)] = &[
    ("bool", "true"),
    ("int2", "-32768"),
    ("int4", "2147483647"),
    ("int8", "-9223372036854775808"),
    ("float4", "3.14159"),
    ("float8", "-1.0000000000000002e-300"),
    ("numeric", "-12345678901234567890.000000000123"),
    ("text", "'héllo ✓ \"quoted\"'"),
    ("varchar(20)", "'varchar value'"),
    ("bpchar(10)", "'ab'"),
    ("\"char\"", "'z'"),
    ("name", "'a_name'"),
    ("bytea", "'\\x00ff10'"),
    ("date", "'2024-02-29'"),
    ("time", "'23:59:59.999999'"),
    ("timetz", "'12:34:56+05:30'"),
    ("timestamp", "'2001-02-03 04:05:06.789'"),
    ("timestamptz", "'2001-02-03 04:05:06.789+02'"),
    ("interval", "'1 year 2 mons 3 days 04:05:06.7'"),
    ("uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"),
    ("json", "'{\"b\": [1, 2], \"a\": null}'"),
    ("jsonb", "'{\"b\": [1, 2], \"a\": null}'"),
    ("jsonpath", "'$.a[*] ? (@ > 1)'"),
    ("inet", "'192.168.1.5/24'"),
    ("cidr", "'10.0.0.0/8'"),
    ("macaddr", "'08:00:2b:01:02:03'"),
    ("macaddr8", "'08:00:2b:01:02:03:04:05'"),
    ("money", "'12.34'"),
    ("bit(4)", "B'1010'"),
    ("varbit", "B'110'"),
    ("point", "'(1.5,2)'"),
    ("line", "'{1,2,3}'"),
    ("lseg", "'[(0,0),(1,1)]'"),
    ("box", "'(1,1),(0,0)'"),
    ("path", "'[(0,0),(1,1),(2,0)]'"),
    ("polygon", "'((0,0),(1,1),(1,0))'"),
    ("circle", "'<(1,1),5>'"),
    ("tsvector", "'a fat cat'"),
    ("tsquery", "'fat & cat'"),
    ("oid", "4294967295"),
    ("regclass", "'pg_class'"),
    ("regtype", "'int4'"),
    ("pg_lsn", "'16/B374D848'"),
    ("int2vector", "'1 2 3'"),
    ("oidvector", "'1 2 3'"),
    ("pg_snapshot", "'10:20:10,14,15'"),
    ("int4range", "'[1,10)'"),
    ("int8range", "'(,5]'"),
    ("numrange", "'[1.5,2.5]'"),
    ("daterange", "'[2020-01-01,2020-02-01)'"),
    ("tsrange", "'[2020-01-01 00:00,2020-01-02 00:00)'"),
    ("tstzrange", "'empty'"),
    ("int4multirange", "'{[1,3), [5,7)}'"),
    ("int4[]", "'{1,NULL,3}'"),
    ("int8[]", "'{{1,2},{3,4}}'"),
    ("text[]", "'{a,\"b c\",NULL}'"),
    ("float8[]", "'{1.5,NaN,-Infinity}'"),
    ("numeric[]", "'{1.1,2.2}'"),
    ("date[]", "'{2020-01-01,infinity}'"),
    ("uuid[]", "'{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}'"),
    ("jsonb[]", "ARRAY['{\"a\":1}'::jsonb]"),
    ("timestamptz[]", "'{2001-02-03 04:05:06+00}'"),
    ("bool[]", "'{t,f}'"),
];

/// User-defined types: always text, with their name in RELATION.
const USER_DEFINED: &str = "
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
    CREATE TYPE pair AS (a int, b text);
    CREATE DOMAIN posint AS int CHECK (VALUE > 0);
    CREATE TYPE floatrange AS RANGE (subtype = float8);
";
const USER_COLUMNS: &[(&str, &str)] = &[
    ("mood", "'happy'"),
    ("pair", "ROW(1, 'x y')"),
    ("posint", "7"),
    ("mood[]", "'{sad,ok}'"),
    ("pair[]", "ARRAY[ROW(2, 'z')::pair]"),
    ("floatrange", "'[1.5,2.5)'"),
];

fn column(i: usize) -> String {
    format!("c{i}")
}

/// Creates table `m` with the given (type, literal) columns, one row of
/// values and one row of NULLs; returns the column types.
fn matrix_table(node: &Node, columns: &[(&str, &str)]) {
    let defs: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, (ty, _))| format!("{} {ty}", column(i)))
        .collect();
    let values: Vec<&str> = columns.iter().map(|(_, v)| *v).collect();
    node.safe_psql(&format!(
        "CREATE TABLE m (id int PRIMARY KEY, {})",
        defs.join(", ")
    ));
    node.safe_psql(&format!("INSERT INTO m VALUES (1, {})", values.join(", ")));
    node.safe_psql("INSERT INTO m (id) VALUES (2)");
}

/// What PostgreSQL says column `i` of row 1 must look like for `datum`.
fn expected(node: &Node, i: usize, datum: &Datum<'_>) -> String {
    let c = column(i);
    let function = |which: &str| {
        node.safe_psql(&format!(
            "SELECT t.{which} FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = 'm'::regclass AND a.attname = '{c}'"
        ))
    };
    match datum {
        Datum::Binary(_) => node.safe_psql(&format!(
            "SELECT encode({}({c}), 'hex') FROM m WHERE id = 1",
            function("typsend")
        )),
        _ => {
            // Brackets keep trailing blanks (char(n) padding) from psql's trim.
            let out = node.safe_psql(&format!(
                "SELECT '[' || textin({}({c})) || ']' FROM m WHERE id = 1",
                function("typoutput")
            ));
            out[1..out.len() - 1].to_owned()
        }
    }
}

fn check_row(node: &Node, columns: &[(&str, &str)], options: &[(String, String)]) -> Vec<String> {
    let frames = peek(node, "s", options);
    let messages = decode(&frames);
    let inserts: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Insert(i) => Some(i),
            _ => None,
        })
        .collect();
    assert_eq!(inserts.len(), 2);
    let mut kinds = Vec::new();
    for (i, (ty, _)) in columns.iter().enumerate() {
        let datum = &inserts[0].new[i + 1];
        assert_eq!(
            show(datum),
            expected(node, i, datum),
            "column {i} of type {ty}: {datum:?}"
        );
        kinds.push(format!("{ty}:{}", kind(datum)));
        assert_eq!(inserts[1].new[i + 1], Datum::Null, "NULL of type {ty}");
    }
    kinds
}

fn kind(datum: &Datum<'_>) -> &'static str {
    match datum {
        Datum::Binary(_) => "binary",
        Datum::Text(_) | Datum::PaddedText { .. } => "text",
        Datum::Int(_) => "int",
        Datum::Null => "null",
        Datum::UnchangedToast => "toast",
    }
}

#[test]
fn built_in_types_round_trip_binary_and_text() {
    let node = started("types");
    let mut columns = BUILT_IN.to_vec();
    if node.psql("SELECT '<a>1</a>'::xml").is_ok() {
        columns.push(("xml", "'<a b=\"c\">1</a>'"));
    }
    node.safe_psql("SELECT pg_create_logical_replication_slot('s', 'bdr')");
    matrix_table(&node, &columns);

    let binary = client_options(&node);
    let kinds = check_row(&node, &columns, &binary);
    for expected in [
        "int4:int",
        "int8:int",
        "text:text",
        "bpchar(10):text",
        "numeric:binary",
        "jsonb:binary",
        "int4[]:binary",
        "uuid:binary",
        "timestamptz:binary",
    ] {
        assert!(
            kinds.iter().any(|k| k == expected),
            "{expected} in {kinds:?}"
        );
    }
    // Text only: every value is its output function's text.
    let text = with_option(binary, "datum_formats", "text");
    let kinds = check_row(&node, &columns, &text);
    assert!(kinds.iter().all(|k| k.ends_with(":text")), "{kinds:?}");
}

#[test]
fn user_defined_types_travel_as_text_with_their_names() {
    let node = started("udt");
    node.safe_psql(USER_DEFINED);
    node.safe_psql("SELECT pg_create_logical_replication_slot('s', 'bdr')");
    matrix_table(&node, USER_COLUMNS);
    let kinds = check_row(&node, USER_COLUMNS, &client_options(&node));
    assert!(kinds.iter().all(|k| k.ends_with(":text")), "{kinds:?}");

    let frames = peek(&node, "s", &client_options(&node));
    let messages = decode(&frames);
    let rel = messages
        .iter()
        .find_map(|m| match m {
            Message::Relation(r) => Some(r.clone()),
            _ => None,
        })
        .expect("RELATION");
    let names: Vec<_> = rel.columns[1..]
        .iter()
        .map(|c| c.type_name.map(|n| format!("{}.{}", n.schema, n.name)))
        .collect();
    let expected: Vec<_> = ["mood", "pair", "posint", "_mood", "_pair", "floatrange"]
        .iter()
        .map(|n| Some(format!("public.{n}")))
        .collect();
    assert_eq!(names, expected);
}
