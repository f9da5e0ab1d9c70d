//! `bdr.apply_changes` called directly, as the applier calls it: values it
//! makes into datums itself (without the types' receive or input
//! functions) come out as the server makes them (`char(n)` too), bad
//! values are refused with an error naming what was wrong, a run of
//! INSERTs written many rows at a time is all or nothing, an UPDATE
//! waits for a local transaction writing its row, and
//! `bdr.apply_transactions` commits a transaction only after the one it
//! is told to wait for, applied on another session, holds the tables it
//! writes open and locked until the call ends, or one of its
//! transactions waits for another session's, and leaves nothing open
//! after it.

use bdr_protocol::apply::{
    After, LocalColumn, LocalRelation, Transaction, start_transactions, write_changes_head,
    write_transaction,
};
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

/// Two sessions applying one peer's transactions, each with a
/// replication origin of its own (`peer_0`, `peer_1`): their origin ids
/// and server process ids.
struct Sessions {
    a: postgres::Client,
    b: postgres::Client,
    origin_a: u32,
    origin_b: u32,
    pid_a: i32,
    pid_b: i32,
}

fn sessions(node: &Node) -> Sessions {
    let origin = |name: &str| {
        node.safe_psql(&format!("SELECT pg_replication_origin_create('{name}')"))
            .parse::<u32>()
            .unwrap()
    };
    let (origin_a, origin_b) = (origin("peer_0"), origin("peer_1"));
    let session = |name: &str| {
        let mut c = node.connect();
        c.batch_execute(&format!(
            "SELECT pg_replication_origin_session_setup('{name}'); \
             SET deadlock_timeout = '100ms'; SET statement_timeout = '60s'"
        ))
        .unwrap();
        let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        (c, pid)
    };
    let ((a, pid_a), (b, pid_b)) = (session("peer_0"), session("peer_1"));
    Sessions {
        a,
        b,
        origin_a,
        origin_b,
        pid_a,
        pid_b,
    }
}

/// The argument of `bdr.apply_changes`: an UPDATE setting `t` of row `id`.
fn update_t(rel: &LocalRelation, id: i64, t: &'static str) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_changes_head(&mut bytes, std::iter::once(rel));
    let mut new = row(id, &[]);
    new[7] = Datum::Text(t);
    write_update(&mut bytes, rel.rel_id, None, &new);
    bytes
}

/// `CALL bdr.apply_transactions` with `txns` on `client`: the error's
/// SQLSTATE and message if it failed.
fn call_transactions(
    client: &mut postgres::Client,
    txns: &[Transaction<'_>],
) -> Result<(), (String, String)> {
    let mut bytes = Vec::new();
    start_transactions(&mut bytes);
    for t in txns {
        write_transaction(&mut bytes, t);
    }
    client
        .execute("CALL bdr.apply_transactions($1)", &[&bytes])
        .map(|_| ())
        .map_err(|e| {
            let db = e.as_db_error().expect("an error of the server");
            (db.code().code().to_string(), db.message().to_string())
        })
}

/// Where replication origin `name` is.
fn progress(node: &Node, name: &str) -> String {
    node.safe_psql(&format!(
        "SELECT remote_lsn FROM pg_replication_origin_status WHERE external_id = '{name}'"
    ))
}

/// Whether process `pid` waits as `event` says (`type/event`).
fn waits(pid: i32, event: &str) -> String {
    format!(
        "SELECT wait_event_type || '/' || wait_event = '{event}' FROM pg_stat_activity WHERE pid = {pid}"
    )
}

/// An ordered transaction without origin check, ending at `end_lsn`,
/// waiting for the one of origin `after.0` ending at `after.1`, if given.
fn ordered(end_lsn: u64, changes: &[u8], after: Option<(u32, u64)>) -> Transaction<'_> {
    Transaction {
        end_lsn,
        commit_time: 0,
        origin: None,
        after: after.map(|(origin, end_lsn)| After { origin, end_lsn }),
        ordered: true,
        changes,
    }
}

/// `txn` on `client` as a change of origin `refused`: refused, its row
/// being last written by another origin (nothing commits); then as one
/// of origin `applied`: applied.
fn refused_then_applied(
    client: &mut postgres::Client,
    mut txn: Transaction<'_>,
    refused: u32,
    applied: u32,
) {
    txn.origin = Some(refused);
    let (code, message) =
        call_transactions(client, std::slice::from_ref(&txn)).expect_err("a row of another origin");
    assert_eq!(code, "P0002", "{message}");
    txn.origin = Some(applied);
    assert_eq!(call_transactions(client, &[txn]), Ok(()));
}

#[test]
fn a_transaction_commits_after_the_one_it_waits_for() {
    let node = node();
    node.safe_psql("INSERT INTO v (id, t) VALUES (1, 'before'), (2, 'before')");
    let rel = relation(&node);
    let Sessions {
        mut a,
        mut b,
        origin_a,
        origin_b,
        pid_a,
        pid_b,
    } = sessions(&node);
    let txn = move |end_lsn: u64, changes: &'static [u8], after: Option<u64>| {
        ordered(end_lsn, changes, after.map(|lsn| (origin_a, lsn)))
    };
    let first: &'static [u8] = update_t(&rel, 1, "first").leak();
    let second: &'static [u8] = update_t(&rel, 2, "second").leak();
    // A local transaction holds row 1, so that A's transaction, which
    // updates it, stays open.
    let mut local = node.connect();
    local
        .batch_execute("BEGIN; UPDATE v SET t = 'local' WHERE id = 1")
        .unwrap();

    // B's transaction waits for A's (end LSN 0/100), which has not begun:
    // B sleeps until A's origin is there.
    let waiting = std::thread::spawn(move || {
        let r = call_transactions(&mut b, &[txn(0x200, second, Some(0x100))]);
        (b, r)
    });
    node.poll_query_until(&waits(pid_b, "Extension/Extension"), "t");
    // A begins it and waits for the local transaction: B still sleeps,
    // until A commits.
    let applying = std::thread::spawn(move || {
        let r = call_transactions(&mut a, &[txn(0x100, first, None)]);
        (a, r)
    });
    node.poll_query_until(&waits(pid_a, "Lock/transactionid"), "t");
    assert_eq!(node.safe_psql(&waits(pid_b, "Extension/Extension")), "t");
    assert!(!waiting.is_finished(), "B committed before A");
    assert_eq!(progress(&node, "peer_1"), "0/0");
    local.batch_execute("COMMIT").unwrap();
    let (mut a, result) = applying.join().unwrap();
    assert_eq!(result, Ok(()));
    let (mut b, result) = waiting.join().unwrap();
    assert_eq!(result, Ok(()));
    assert_eq!(progress(&node, "peer_0"), "0/100");
    assert_eq!(progress(&node, "peer_1"), "0/200");
    assert_eq!(
        node.safe_psql("SELECT string_agg(id || ' ' || t, ',' ORDER BY id) FROM v"),
        "1 first,2 second"
    );

    // A transaction of A that does not commit (cancelled while it waits
    // for the local transaction) is waited for until B is cancelled, and
    // B commits nothing.
    local
        .batch_execute("BEGIN; UPDATE v SET t = 'local' WHERE id = 1")
        .unwrap();
    let waiting = std::thread::spawn(move || {
        let r = call_transactions(&mut b, &[txn(0x400, second, Some(0x300))]);
        (b, r)
    });
    let applying = std::thread::spawn(move || {
        let r = call_transactions(&mut a, &[txn(0x300, first, None)]);
        (a, r)
    });
    node.poll_query_until(&waits(pid_a, "Lock/transactionid"), "t");
    node.poll_query_until(&waits(pid_b, "Extension/Extension"), "t");
    node.safe_psql(&format!("SELECT pg_cancel_backend({pid_a})"));
    let (_, result) = applying.join().unwrap();
    assert_eq!(result.expect_err("cancelled").0, "57014");
    node.poll_query_until(&waits(pid_b, "Extension/Extension"), "t");
    assert!(!waiting.is_finished(), "B committed after A rolled back");
    node.safe_psql(&format!("SELECT pg_cancel_backend({pid_b})"));
    let (mut b, result) = waiting.join().unwrap();
    let (code, message) = result.expect_err("cancelled");
    assert_eq!(code, "57014", "{message}");
    assert_eq!(progress(&node, "peer_1"), "0/200");
    local.batch_execute("ROLLBACK").unwrap();

    // A row last written through another origin, not one of the same
    // peer's (those are named `bdr_<peer>_<n>`, below), is refused.
    let mut by_b = txn(0x500, first, None);
    by_b.origin = Some(origin_b);
    let (code, message) =
        call_transactions(&mut b, std::slice::from_ref(&by_b)).expect_err("another origin");
    assert_eq!(code, "P0002", "{message}");
    assert!(
        message.contains(&format!(
            "last written by origin {origin_a}, not {origin_b}"
        )),
        "{message}"
    );
    // Statements take a row last written through a peer's further origin
    // (`bdr_<peer>_<n>`) as written by the peer's own.
    node.safe_psql(
        "SELECT pg_replication_origin_create('bdr_00000000000000aa'), \
                pg_replication_origin_create('bdr_00000000000000aa_1')",
    );
    let mut c = node.connect();
    c.batch_execute(
        "SELECT pg_replication_origin_session_setup('bdr_00000000000000aa_1'); \
         BEGIN; UPDATE v SET t = 'lane' WHERE id = 2; COMMIT",
    )
    .unwrap();
    assert_eq!(
        node.safe_psql(
            "SELECT bdr.xact_origin(xmin) = (SELECT roident FROM pg_replication_origin \
                                              WHERE roname = 'bdr_00000000000000aa'), \
                    bdr.origin_node_id((pg_xact_commit_timestamp_origin(xmin)).roident) \
               FROM v WHERE id = 2"
        ),
        "t|170"
    );
    // So does the server's own search, and it refuses the row for any
    // other origin.
    let origin_id = |name: &str| -> u32 {
        node.safe_psql(&format!(
            "SELECT roident FROM pg_replication_origin WHERE roname = '{name}'"
        ))
        .parse()
        .unwrap()
    };
    let peer_aa = origin_id("bdr_00000000000000aa");
    let lane_row: &'static [u8] = update_t(&rel, 2, "peer").leak();
    refused_then_applied(&mut b, ordered(0x600, lane_row, None), origin_b, peer_aa);
    assert_eq!(node.safe_psql("SELECT t FROM v WHERE id = 2"), "peer");
    assert_eq!(progress(&node, "peer_1"), "0/600");

    // The further origin is dropped and its id taken by another peer's:
    // the session that took it as aa's (above) takes it as bb's now.
    let aa_lane = origin_id("bdr_00000000000000aa_1");
    c.batch_execute(
        "SELECT pg_replication_origin_session_reset(); \
         SELECT pg_replication_origin_drop('bdr_00000000000000aa_1'); \
         SELECT pg_replication_origin_create('bdr_00000000000000bb_1'), \
                pg_replication_origin_create('bdr_00000000000000bb'); \
         SELECT pg_replication_origin_session_setup('bdr_00000000000000bb_1'); \
         BEGIN; UPDATE v SET t = 'lane bb' WHERE id = 2; COMMIT",
    )
    .unwrap();
    assert_eq!(origin_id("bdr_00000000000000bb_1"), aa_lane);
    let peer_bb = origin_id("bdr_00000000000000bb");
    let bb_row: &'static [u8] = update_t(&rel, 2, "bb").leak();
    refused_then_applied(&mut b, ordered(0x700, bb_row, None), peer_aa, peer_bb);
    assert_eq!(node.safe_psql("SELECT t FROM v WHERE id = 2"), "bb");
}

#[test]
fn a_transaction_waits_before_its_changes_holding_no_row() {
    let node = node();
    node.safe_psql("INSERT INTO v (id, t) VALUES (1, 'before')");
    let rel = relation(&node);
    let Sessions {
        mut a,
        mut b,
        origin_a,
        pid_b,
        ..
    } = sessions(&node);
    let first: &'static [u8] = update_t(&rel, 1, "first").leak();
    let second: &'static [u8] = update_t(&rel, 1, "second").leak();
    // B gets the later transaction first: it waits for A's before it
    // writes row 1, so A's can write it (waiting after its change, B
    // would hold the row A waits for: a deadlock).
    let later = ordered(0x200, second, Some((origin_a, 0x100)));
    let waiting = std::thread::spawn(move || call_transactions(&mut b, &[later]));
    node.poll_query_until(&waits(pid_b, "Extension/Extension"), "t");
    let earlier = ordered(0x100, first, None);
    let result_a = call_transactions(&mut a, &[earlier]);
    let result_b = waiting.join().unwrap();
    assert!(
        result_a.is_ok() && result_b.is_ok(),
        "A {result_a:?}, B {result_b:?}"
    );
    assert_eq!(node.safe_psql("SELECT t FROM v WHERE id = 1"), "second");
    assert_eq!(progress(&node, "peer_1"), "0/200");
}

/// The tables `bdr.apply_transactions` writes stay locked for its session
/// (`RowExclusiveLock`) from the transaction that first opens them to the
/// end of the call, across its commits; the call gives them back when it
/// ends, by an error too, and before it sleeps waiting for a transaction
/// of another session.
#[test]
fn a_call_holds_its_tables_until_it_ends() {
    let node = node();
    node.safe_psql(
        "INSERT INTO v (id, t) VALUES (1, 'before'); INSERT INTO w (id, t) VALUES (2, 'before')",
    );
    let v = relation(&node);
    let w = LocalRelation {
        rel_id: 8,
        table: node.safe_psql("SELECT 'w'::regclass::oid").parse().unwrap(),
        index: node
            .safe_psql("SELECT 'w_pkey'::regclass::oid")
            .parse()
            .unwrap(),
        ..v.clone()
    };
    let Sessions {
        a,
        mut b,
        origin_b,
        pid_a,
        ..
    } = sessions(&node);
    // What the apply session holds on v and its key, and in what mode.
    let held = format!(
        "SELECT coalesce(string_agg(relation::regclass || ' ' || mode, ',' \
                                    ORDER BY relation::regclass::text), '') \
           FROM pg_locks WHERE pid = {pid_a} AND relation IN ('v'::regclass, 'v_pkey'::regclass)"
    );
    let on_v: &'static [u8] = update_t(&v, 1, "first").leak();
    let on_w: &'static [u8] = update_t(&w, 2, "second").leak();
    let txn = |end_lsn: u64, changes: &'static [u8]| Transaction {
        ordered: false,
        ..ordered(end_lsn, changes, None)
    };

    // The second transaction of `txns`, on w alone, waits for a local one
    // holding its row: the first, on v, has committed (its origin at
    // `first`) and v is still locked; `meanwhile` runs before the local
    // transaction lets go.
    let mut local = node.connect();
    let mut while_w_is_held = |mut a: postgres::Client,
                               txns: [Transaction<'static>; 2],
                               first: &str,
                               meanwhile: &dyn Fn()| {
        local
            .batch_execute("BEGIN; UPDATE w SET t = 'local' WHERE id = 2")
            .unwrap();
        let applying = std::thread::spawn(move || {
            let r = call_transactions(&mut a, &txns);
            (a, r)
        });
        node.poll_query_until(&waits(pid_a, "Lock/transactionid"), "t");
        assert_eq!(progress(&node, "peer_0"), first);
        assert_eq!(
            node.safe_psql(&held),
            "v RowExclusiveLock,v_pkey RowExclusiveLock"
        );
        meanwhile();
        local.batch_execute("ROLLBACK").unwrap();
        applying.join().unwrap()
    };
    let (mut a, result) =
        while_w_is_held(a, [txn(0x100, on_v), txn(0x200, on_w)], "0/100", &|| {
            // DDL on v waits for the call's end.
            let ddl = node
                .connect()
                .batch_execute("SET lock_timeout = '50ms'; ALTER TABLE v ADD COLUMN x int")
                .expect_err("v is locked");
            assert_eq!(ddl.code().map(|c| c.code()), Some("55P03"), "{ddl}");
        });
    assert_eq!(result, Ok(()));
    assert_eq!(progress(&node, "peer_0"), "0/200");
    assert_eq!(node.safe_psql(&held), "");
    // The call kept v and w open from one transaction to the next: the
    // session has given them back (TRUNCATE refuses a table this session
    // still has open).
    let not_open = |a: &mut postgres::Client| {
        a.batch_execute("BEGIN; TRUNCATE v, w; ROLLBACK")
            .expect("v and w closed");
    };
    not_open(&mut a);

    // A call that fails in its second transaction (w's row is gone)
    // commits the first and holds nothing after.
    node.safe_psql("DELETE FROM w");
    let (code, message) = call_transactions(&mut a, &[txn(0x300, on_v), txn(0x400, on_w)])
        .expect_err("no row to update");
    assert_eq!(code, "P0002", "{message}");
    assert_eq!(progress(&node, "peer_0"), "0/300");
    assert_eq!(node.safe_psql(&held), "");
    not_open(&mut a);
    node.safe_psql("ALTER TABLE v ADD COLUMN x int");

    // Ordered transactions (parallel apply's) hold them too...
    node.safe_psql("INSERT INTO w (id, t) VALUES (2, 'before')");
    let (mut a, result) = while_w_is_held(
        a,
        [ordered(0x500, on_v, None), ordered(0x600, on_w, None)],
        "0/500",
        &|| {},
    );
    assert_eq!(result, Ok(()));
    assert_eq!(progress(&node, "peer_0"), "0/600");

    // ...but give them back, and close them, before sleeping until a
    // transaction of another session commits, which may need them: here
    // it locks v exclusively (as a TRUNCATE sent as a statement would),
    // adds an index to it, and commits through the other origin. The
    // call's next transaction on v then writes to that index too.
    let on_v_again: &'static [u8] = update_t(&v, 1, "third").leak();
    let applying = std::thread::spawn(move || {
        let r = call_transactions(
            &mut a,
            &[
                ordered(0x700, on_v, None),
                ordered(0x800, on_w, Some((origin_b, 0x900))),
                ordered(0xA00, on_v_again, None),
            ],
        );
        (a, r)
    });
    node.poll_query_until(&waits(pid_a, "Extension/Extension"), "t");
    assert_eq!(progress(&node, "peer_0"), "0/700");
    assert_eq!(node.safe_psql(&held), "");
    b.batch_execute(
        "BEGIN; LOCK TABLE v IN ACCESS EXCLUSIVE MODE; CREATE INDEX v_t ON v (t); \
         UPDATE w SET t = 'b' WHERE id = 2; \
         SELECT pg_replication_origin_xact_setup('0/900', now()); COMMIT",
    )
    .unwrap();
    let (mut a, result) = applying.join().unwrap();
    assert_eq!(result, Ok(()));
    assert_eq!(progress(&node, "peer_0"), "0/A00");
    assert_eq!(progress(&node, "peer_1"), "0/900");
    assert_eq!(
        node.safe_psql("SET enable_seqscan = off; SELECT count(*) FROM v WHERE t = 'third'"),
        "1",
        "the row is in the index made while the call slept"
    );
    not_open(&mut a);
}

#[test]
fn a_call_keeps_tables_with_triggers_open_from_one_transaction_to_the_next() {
    let node = node();
    node.safe_psql(
        "INSERT INTO v (id, t) VALUES (1, 'before'), (2, 'before');
         CREATE TABLE seen (id int, t text);
         CREATE FUNCTION mark() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN NEW.t := NEW.t || '!'; RETURN NEW; END $$;
         CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN INSERT INTO seen VALUES (NEW.id, NEW.t); RETURN NULL; END $$;
         CREATE TRIGGER mark BEFORE UPDATE ON v FOR EACH ROW EXECUTE FUNCTION mark();
         CREATE TRIGGER note AFTER UPDATE ON v FOR EACH ROW EXECUTE FUNCTION note();
         ALTER TABLE v ENABLE ALWAYS TRIGGER mark, ENABLE ALWAYS TRIGGER note;",
    );
    let rel = relation(&node);
    let Sessions { mut a, .. } = sessions(&node);
    a.batch_execute("SET session_replication_role = replica")
        .unwrap();
    let from = node.log_position();
    let changes = [
        update_t(&rel, 1, "one"),
        update_t(&rel, 2, "two"),
        update_t(&rel, 1, "three"),
    ];
    let txns: Vec<_> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| Transaction {
            ordered: false,
            ..ordered(0x100 * (i as u64 + 1), c, None)
        })
        .collect();
    assert_eq!(call_transactions(&mut a, &txns), Ok(()));
    assert_eq!(progress(&node, "peer_0"), "0/300");
    assert_eq!(
        node.safe_psql("SELECT string_agg(id || t, ',' ORDER BY id) FROM v"),
        "1three!,2two!"
    );
    assert_eq!(
        node.safe_psql("SELECT string_agg(id || t, ',') FROM seen"),
        "1one!,2two!,1three!"
    );
    // The trigger code's slots were the call's, not one transaction's:
    // the server had nothing to give back itself.
    let log = node.read_log_since(from);
    assert!(!log.contains("WARNING"), "{log}");
    a.batch_execute("BEGIN; TRUNCATE v; ROLLBACK")
        .expect("v closed");
}

#[test]
fn char_values_are_the_servers() {
    let node = node();
    let table = "(id int PRIMARY KEY, a char(5), b char, c bpchar)";
    node.safe_psql(&format!("CREATE TABLE c {table}; CREATE TABLE d {table}"));
    let oid = |sql: &str| node.safe_psql(sql).parse::<u32>().unwrap();
    let rel = LocalRelation {
        rel_id: 9,
        table: oid("SELECT 'c'::regclass::oid"),
        index: oid("SELECT 'c_pkey'::regclass::oid"),
        columns: [23, 1042, 1042, 1042]
            .iter()
            .enumerate()
            .map(|(i, &type_oid)| LocalColumn {
                attnum: i as u16 + 1,
                type_oid,
                key: i == 0,
            })
            .collect(),
    };
    let padded = |text, spaces| Datum::PaddedText { text, spaces };
    // Values of the column's length (as the same column sends them),
    // shorter, longer with blanks to cut, and for a column without one.
    let rows: [[Datum<'_>; 4]; 5] = [
        [
            Datum::Int(1),
            Datum::Text("héllo"),
            Datum::Text("x"),
            Datum::Text(" a b "),
        ],
        [
            Datum::Int(2),
            padded("ab", 3),
            Datum::Text(" "),
            padded("", 4),
        ],
        [
            Datum::Int(3),
            Datum::Text("ab"),
            Datum::Text("é"),
            Datum::Text(""),
        ],
        [
            Datum::Int(4),
            padded("abcde", 2),
            padded("y", 2),
            Datum::Null,
        ],
        [
            Datum::Int(5),
            Datum::Text("a"),
            Datum::Null,
            Datum::Text("ü"),
        ],
    ];
    let mut bytes = Vec::new();
    write_changes_head(&mut bytes, std::iter::once(&rel));
    for r in &rows {
        write_insert(&mut bytes, rel.rel_id, r);
    }
    assert_eq!(call(&mut node.connect(), &bytes), Ok(5));
    node.safe_psql(
        "INSERT INTO d VALUES (1, 'héllo', 'x', ' a b '), (2, 'ab   ', ' ', '    '),
           (3, 'ab', 'é', ''), (4, 'abcde  ', 'y  ', NULL), (5, 'a', NULL, 'ü')",
    );
    let rows_of = |t: &str| {
        node.safe_psql(&format!(
            "SELECT string_agg(concat_ws(':', octet_length(a), a, octet_length(b), b, \
                                         octet_length(c), c), ' | ' ORDER BY id) FROM {t}"
        ))
    };
    assert_eq!(rows_of("c"), rows_of("d"));
    // Too long, with more than blanks past the length.
    let mut bytes = Vec::new();
    write_changes_head(&mut bytes, std::iter::once(&rel));
    write_insert(
        &mut bytes,
        rel.rel_id,
        &[
            Datum::Int(6),
            Datum::Text("abcdef"),
            Datum::Null,
            Datum::Null,
        ],
    );
    let err = call(&mut node.connect(), &bytes).expect_err("too long");
    assert_eq!(err.0, "22001", "{err:?}");
}
