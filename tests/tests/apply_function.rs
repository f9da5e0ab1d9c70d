//! `bdr.apply_changes` called directly, as the applier calls it: values it
//! makes into datums itself (without the types' receive or input
//! functions) come out as the server makes them, bad values are refused
//! with an error naming what was wrong, a run of INSERTs written many
//! rows at a time is all or nothing, and an UPDATE waits for a local
//! transaction writing its row.

use bdr_protocol::apply::{LocalColumn, LocalRelation, write_changes_head};
use bdr_protocol::{Datum, write_insert, write_update};
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
    call(&mut node.connect(), &bytes)
}

/// Calls `bdr.apply_changes` with `changes` on `client`.
fn call(client: &mut postgres::Client, changes: &[u8]) -> Result<i64, (String, String)> {
    match client.query_one(
        "SELECT bdr.apply_changes($1, NULL, NULL, NULL)",
        &[&changes],
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

#[test]
fn an_update_waits_for_a_local_transaction_writing_its_row() {
    let node = node();
    node.safe_psql("INSERT INTO v (id, t) VALUES (1, 'before'), (2, 'before'), (3, 'before')");
    let rel = relation(&node);
    let update = |id: i64| {
        let mut bytes = Vec::new();
        write_changes_head(&mut bytes, std::iter::once(&rel));
        // Column 8 is t.
        let mut new = row(id, &[]);
        new[7] = Datum::Text("remote");
        write_update(&mut bytes, rel.rel_id, None, &new);
        bytes
    };
    // Whether a backend waits for another transaction to end.
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE wait_event_type = 'Lock' AND wait_event = 'transactionid'";
    // Row 3 with a BEFORE UPDATE trigger (which fires on this session):
    // the search locks the row for it.
    let mark = "CREATE FUNCTION mark() RETURNS trigger LANGUAGE plpgsql AS \
                $$ BEGIN NEW.t := NEW.t || '!'; RETURN NEW; END $$; \
                CREATE TRIGGER mark BEFORE UPDATE ON v FOR EACH ROW EXECUTE FUNCTION mark()";
    for (id, local, expected) in [
        (1, "UPDATE v SET t = 'local' WHERE id = 1", Ok(1)),
        (2, "DELETE FROM v WHERE id = 2", Err("P0002")),
        (3, "UPDATE v SET t = 'local' WHERE id = 3", Ok(1)),
    ] {
        if id == 3 {
            node.safe_psql(mark);
        }
        let mut writer = node.connect();
        writer.batch_execute("BEGIN").unwrap();
        writer.batch_execute(local).unwrap();
        let mut applier = node.connect();
        let changes = update(id);
        let applying = std::thread::spawn(move || call(&mut applier, &changes));
        node.poll_query_until(waiting, "1");
        assert!(
            !applying.is_finished(),
            "the UPDATE of row {id} did not wait"
        );
        writer.batch_execute("COMMIT").unwrap();
        let result = applying.join().unwrap();
        match expected {
            Ok(n) => assert_eq!(result, Ok(n), "row {id}"),
            Err(code) => {
                let (got, message) = result.expect_err("no row to update");
                assert_eq!(got, code, "row {id}: {message}");
                assert!(message.contains("no row of table"), "{message}");
            }
        }
    }
    // The UPDATEs applied to the rows the local transaction committed,
    // the trigger's once.
    assert_eq!(
        node.safe_psql("SELECT string_agg(id || ' ' || t, ',' ORDER BY id) FROM v"),
        "1 remote,3 remote!"
    );
}
