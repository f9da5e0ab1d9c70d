//! `bdr.apply_changes` called directly, as the applier calls it: values it
//! makes into datums itself (without the types' receive or input
//! functions) come out as the server makes them, bad values are refused
//! with an error naming what was wrong, and a run of INSERTs written many
//! rows at a time is all or nothing.

use bdr_protocol::apply::{LocalColumn, LocalRelation, write_changes_head};
use bdr_protocol::{Datum, write_insert};
use bdr_tests::Node;

/// Every type with a datum made in the library, after the key.
const COLUMNS: &str = "(id int PRIMARY KEY, b bool, f4 float4, f8 float8, d date, ts timestamp, tz timestamptz, \
     t text, vc varchar)";
const TYPES: [u32; 9] = [23, 16, 700, 701, 1082, 1114, 1184, 25, 1043];

fn node() -> Node {
    let mut n = Node::init("apply");
    n.start();
    n.safe_psql("CREATE EXTENSION bdr");
    n.safe_psql(&format!(
        "CREATE TABLE v {COLUMNS}; CREATE TABLE w {COLUMNS}"
    ));
    n
}

/// The description of table `v` for the call.
fn relation(node: &Node) -> LocalRelation {
    let oid = |sql: &str| node.safe_psql(sql).parse::<u32>().unwrap();
    LocalRelation {
        rel_id: 7,
        table: oid("SELECT 'v'::regclass::oid"),
        index: oid("SELECT 'v_pkey'::regclass::oid"),
        columns: (0..TYPES.len())
            .map(|i| LocalColumn {
                attnum: i as u16 + 1,
                type_oid: TYPES[i],
                key: i == 0,
            })
            .collect(),
    }
}

/// A row of `v`: the key and the rest, NULL where not given.
fn row<'a>(id: i64, rest: &[Datum<'a>]) -> Vec<Datum<'a>> {
    let mut r = vec![Datum::Int(id)];
    r.extend_from_slice(rest);
    r.resize(TYPES.len(), Datum::Null);
    r
}

/// Calls `bdr.apply_changes` with INSERTs of `rows`: how many it applied,
/// or the error's SQLSTATE and message.
fn insert(node: &Node, rows: &[Vec<Datum<'_>>]) -> Result<i64, (String, String)> {
    let rel = relation(node);
    let mut bytes = Vec::new();
    write_changes_head(&mut bytes, std::iter::once(&rel));
    for r in rows {
        write_insert(&mut bytes, rel.rel_id, r);
    }
    let mut client = node.connect();
    match client.query_one(
        "SELECT bdr.apply_changes($1, NULL, NULL, NULL)",
        &[&bytes.as_slice()],
    ) {
        Ok(r) => Ok(r.get(0)),
        Err(e) => {
            let db = e.as_db_error().expect("an error of the server");
            Err((db.code().code().to_string(), db.message().to_string()))
        }
    }
}

#[test]
fn values_made_in_the_library_are_the_servers() {
    let node = node();
    let f4 = (-1.5f32).to_bits().to_be_bytes();
    let nan4 = f32::NAN.to_bits().to_be_bytes();
    let f8 = f64::NEG_INFINITY.to_bits().to_be_bytes();
    let zero8 = (-0.0f64).to_bits().to_be_bytes();
    let day = |d: i32| d.to_be_bytes();
    let micros = |t: i64| t.to_be_bytes();
    let (d1, d2, d3) = (day(1), day(i32::MIN), day(i32::MAX));
    let (t1, t2, t3, t4) = (
        micros(-86_400_000_000),
        micros(i64::MAX),
        micros(i64::MIN),
        micros(1),
    );
    let rows = [
        row(
            1,
            &[
                Datum::Binary(&[1]),
                Datum::Binary(&f4),
                Datum::Binary(&f8),
                Datum::Binary(&d1),
                Datum::Binary(&t1),
                Datum::Binary(&t4),
                Datum::Text("héllo\ttab 'q'"),
                Datum::Text("x"),
            ],
        ),
        row(
            2,
            &[
                Datum::Binary(&[0]),
                Datum::Binary(&nan4),
                Datum::Binary(&zero8),
                Datum::Binary(&d2),
                Datum::Binary(&t2),
                Datum::Binary(&t3),
                Datum::Text(""),
            ],
        ),
        row(
            3,
            &[Datum::Null, Datum::Null, Datum::Null, Datum::Binary(&d3)],
        ),
    ];
    assert_eq!(insert(&node, &rows), Ok(3));
    node.safe_psql(
        "SET TIME ZONE 'UTC';
         INSERT INTO w VALUES
           (1, true, -1.5, '-Infinity', '2000-01-02', '1999-12-31 00:00:00',
            '2000-01-01 00:00:00.000001+00', E'héllo\\ttab ''q''', 'x'),
           (2, false, 'NaN', '-0', '-infinity', 'infinity', '-infinity', '', NULL),
           (3, NULL, NULL, NULL, 'infinity', NULL, NULL, NULL, NULL)",
    );
    let rows_of = |t: &str| {
        node.safe_psql(&format!(
            "SET TIME ZONE 'UTC'; SELECT string_agg(x::text, ' | ' ORDER BY id) FROM {t} x"
        ))
    };
    assert_eq!(rows_of("v"), rows_of("w"));
}

#[test]
fn bad_values_are_refused_naming_what_was_wrong() {
    let node = node();
    let seven = [0u8; 7];
    let end_ts = 9_223_371_331_200_000_000i64.to_be_bytes();
    let end_date = 2_145_031_949i32.to_be_bytes();
    let cases: [(Vec<Datum<'_>>, &str, &str); 4] = [
        (
            row(1, &[Datum::Null, Datum::Null, Datum::Binary(&seven)]),
            "22P03",
            "7 bytes for a value of type 701",
        ),
        (
            row(
                1,
                &[
                    Datum::Null,
                    Datum::Null,
                    Datum::Null,
                    Datum::Null,
                    Datum::Null,
                    Datum::Binary(&end_ts),
                ],
            ),
            "22008",
            "timestamp out of range",
        ),
        (
            row(
                1,
                &[
                    Datum::Null,
                    Datum::Null,
                    Datum::Null,
                    Datum::Binary(&end_date),
                ],
            ),
            "22008",
            "date out of range",
        ),
        (
            row(
                1,
                &[
                    Datum::Null,
                    Datum::Null,
                    Datum::Null,
                    Datum::Null,
                    Datum::Null,
                    Datum::Null,
                    Datum::Text("a\0b"),
                ],
            ),
            "22021",
            "a text value of type 25 holds a NUL byte",
        ),
    ];
    for (r, code, message) in cases {
        // After a good row held for the same multi-row insert.
        let err = insert(&node, &[row(2, &[]), r]).expect_err(message);
        assert_eq!(err.0, code, "{err:?}");
        assert!(err.1.contains(message), "{err:?}");
    }
    assert_eq!(node.safe_psql("SELECT count(*) FROM v"), "0");
}

#[test]
fn a_run_of_inserts_with_a_duplicate_key_inserts_nothing() {
    let node = node();
    // 2,500 rows: held and written in several multi-row inserts.
    let rows: Vec<Vec<Datum<'_>>> = (1..=2500).map(|i| row(i, &[])).collect();
    let mut dup = rows.clone();
    dup.push(row(1, &[]));
    let err = insert(&node, &dup).expect_err("a duplicate key");
    assert_eq!(err.0, "23505", "{err:?}");
    assert!(err.1.contains("v_pkey"), "{err:?}");
    assert_eq!(node.safe_psql("SELECT count(*) FROM v"), "0");
    assert_eq!(insert(&node, &rows), Ok(2500));
    assert_eq!(
        node.safe_psql("SELECT count(*) || ' ' || sum(id) FROM v"),
        "2500 3126250"
    );
}
