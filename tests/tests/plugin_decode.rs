//! The `bdr` output plugin on a real cluster: every message kind, the
//! shapes of transactions, origin filtering and forwarding, RELATION
//! invalidation, TOAST, replica identities and start-up options. The
//! slot's bytes are decoded with `bdr_protocol`.

mod plugin_support;

use bdr_protocol::{DatumFormats, Message, OldKind, ReplicaIdentity};
use bdr_tests::Node;
use plugin_support::*;

fn slot(node: &bdr_tests::Node, name: &str) {
    node.safe_psql(&format!(
        "SELECT pg_create_logical_replication_slot('{name}', 'bdr')"
    ));
}

#[test]
fn every_change_kind_in_order() {
    let node = started("kinds");
    node.safe_psql("CREATE TABLE t (id int PRIMARY KEY, v text, n numeric)");
    slot(&node, "s");
    node.safe_psql("INSERT INTO t VALUES (1, 'one', 1.5), (2, 'two', NULL)");
    node.safe_psql("UPDATE t SET v = 'uno' WHERE id = 1");
    node.safe_psql("UPDATE t SET id = 3 WHERE id = 2");
    node.safe_psql("DELETE FROM t WHERE id = 1");
    node.safe_psql("BEGIN; INSERT INTO t VALUES (9, 'rolled back'); ROLLBACK");

    let options = client_options(&node);
    let frames = peek(&node, "s", &options);
    let messages = decode(&frames);
    assert_eq!(outline(&messages), "SBRIICBUCBUCBDC");

    let Message::Startup(startup) = &messages[0] else {
        unreachable!()
    };
    let local_id: i64 = node
        .safe_psql("SELECT bdr.local_node_id()")
        .parse()
        .unwrap();
    assert_eq!(startup.node_id, local_id as u64);
    assert_eq!(startup.proto_version, 1);
    assert_eq!(startup.database_encoding, "UTF8");
    assert_eq!(
        startup.pg_version_num.to_string(),
        node.safe_psql("SHOW server_version_num")
    );
    assert_eq!(
        startup.datum_formats,
        DatumFormats::TEXT.union(DatumFormats::BINARY)
    );
    assert_eq!(startup.node_name, "kinds/postgres");

    let Message::Begin(begin) = &messages[1] else {
        unreachable!()
    };
    assert!(begin.origin.is_none());
    assert!(begin.commit_time > 0);
    let Message::Relation(rel) = &messages[2] else {
        unreachable!()
    };
    assert_eq!((rel.schema, rel.name, rel.rel_id), ("public", "t", 1));
    assert_eq!(rel.replica_identity, ReplicaIdentity::Default);
    let cols: Vec<_> = rel
        .columns
        .iter()
        .map(|c| (c.name, c.key, c.type_oid))
        .collect();
    assert_eq!(
        cols,
        [("id", true, 23), ("v", false, 25), ("n", false, 1700)]
    );

    let Message::Insert(ins) = &messages[3] else {
        unreachable!()
    };
    assert_eq!(ins.rel_id, 1);
    assert_eq!(row(&ins.new)[..2], ["1", "one"]);
    let numeric_send = node.safe_psql("SELECT encode(numeric_send(1.5), 'hex')");
    assert_eq!(row(&ins.new)[2], numeric_send);
    let Message::Insert(ins) = &messages[4] else {
        unreachable!()
    };
    assert_eq!(row(&ins.new), ["2", "two", "NULL"]);
    let Message::Commit(commit) = &messages[5] else {
        unreachable!()
    };
    assert_eq!(commit.commit_lsn, begin.final_lsn);
    assert!(commit.end_lsn > commit.commit_lsn);

    // The key did not change: no old tuple.
    let Message::Update(upd) = &messages[7] else {
        unreachable!()
    };
    assert!(upd.old.is_none());
    assert_eq!(row(&upd.new)[..2], ["1", "uno"]);
    // The key changed: the old key, other columns null.
    let Message::Update(upd) = &messages[10] else {
        unreachable!()
    };
    let old = upd.old.as_ref().expect("old key");
    assert_eq!(old.kind, OldKind::Key);
    assert_eq!(row(&old.tuple), ["2", "NULL", "NULL"]);
    assert_eq!(row(&upd.new), ["3", "two", "NULL"]);
    let Message::Delete(del) = &messages[13] else {
        unreachable!()
    };
    assert_eq!(del.old.kind, OldKind::Key);
    assert_eq!(row(&del.old.tuple), ["1", "NULL", "NULL"]);

    // Peeking again gives the same bytes (a new stream: STARTUP and
    // RELATION again, same ids).
    assert_eq!(peek(&node, "s", &options), frames);
}

#[test]
fn local_node_id_is_fnv1a_of_system_identifier_and_database() {
    let node = started("nodeid");
    let out = node.safe_psql(
        "SELECT system_identifier, (SELECT oid FROM pg_database WHERE datname = current_database()), \
         bdr.local_node_id() FROM pg_control_system()",
    );
    let fields: Vec<&str> = out.split('|').collect();
    let sysid: i64 = fields[0].parse().unwrap();
    let dboid: u32 = fields[1].parse().unwrap();
    let got: i64 = fields[2].parse().unwrap();
    let mut bytes = (sysid as u64).to_be_bytes().to_vec();
    bytes.extend_from_slice(&dboid.to_be_bytes());
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    assert_eq!(got as u64, hash);
}

#[test]
fn transaction_shapes() {
    let node = started("shapes");
    node.safe_psql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    slot(&node, "s");
    // Catalog-only and aborted transactions send nothing.
    node.safe_psql("CREATE TABLE other (id int)");
    node.safe_psql("BEGIN; INSERT INTO t VALUES (100); ROLLBACK");
    node.safe_psql("SELECT pg_replication_origin_create('unused_origin')");
    // Subtransactions: the rolled-back savepoint's rows are not sent.
    node.safe_psql(
        "BEGIN; INSERT INTO t VALUES (1); SAVEPOINT a; INSERT INTO t VALUES (2); \
         ROLLBACK TO SAVEPOINT a; SAVEPOINT b; INSERT INTO t VALUES (3); RELEASE b; COMMIT",
    );
    // A large transaction, spilled to disk by the reorder buffer.
    node.safe_psql("INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(10, 20009) g");

    let frames = peek(&node, "s", &client_options(&node));
    let messages = decode(&frames);
    let shape = outline(&messages);
    assert!(shape.starts_with("SBRIICB"), "{}", &shape[..20]);
    assert_eq!(shape.len(), 7 + 20_000 + 1);
    // A small transaction is one write; the large one is split into
    // writes of about 64 kB, each of whole messages.
    let grouped = frame_outline(&frames);
    assert!(grouped.starts_with("SBRIIC|BI"), "{}", &grouped[..20]);
    assert!(frames.len() > 20, "{} writes", frames.len());
    assert!(frames.iter().all(|f| f.len() < (64 << 10) + 1024));
    let ids: Vec<String> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Insert(i) => Some(show(&i.new[0])),
            _ => None,
        })
        .take(3)
        .collect();
    assert_eq!(ids, ["1", "3", "10"]);
    // The xid of the subtransaction case is one transaction.
    let Message::Begin(b1) = &messages[1] else {
        unreachable!()
    };
    let Message::Begin(b2) = &messages[6] else {
        unreachable!()
    };
    assert_ne!(b1.xid, b2.xid);
}

#[test]
fn origin_changes_are_filtered_unless_forwarded() {
    let node = started("origins");
    node.safe_psql("CREATE TABLE t (id int PRIMARY KEY)");
    slot(&node, "s");
    node.safe_psql("SELECT pg_replication_origin_create('bdr_00000000000000aa')");
    node.safe_psql("SELECT pg_replication_origin_create('other_tool')");
    node.safe_psql("INSERT INTO t VALUES (1)");
    node.safe_psql(
        "SELECT pg_replication_origin_session_setup('bdr_00000000000000aa'); \
         BEGIN; SELECT pg_replication_origin_xact_setup('0/ABCDEF', now()); \
         INSERT INTO t VALUES (2); COMMIT",
    );
    node.safe_psql(
        "SELECT pg_replication_origin_session_setup('other_tool'); \
         BEGIN; SELECT pg_replication_origin_xact_setup('0/1234', now()); \
         INSERT INTO t VALUES (3); COMMIT",
    );
    node.safe_psql("INSERT INTO t VALUES (4)");

    let options = client_options(&node);
    let local = peek(&node, "s", &options);
    let messages = decode(&local);
    assert_eq!(outline(&messages), "SBRICBIC");
    assert!(
        messages
            .iter()
            .all(|m| !matches!(m, Message::Begin(b) if b.origin.is_some()))
    );

    let forwarding = with_option(options, "forward_origins", "true");
    let all = peek(&node, "s", &forwarding);
    let messages = decode(&all);
    assert_eq!(outline(&messages), "SBRICBICBICBIC");
    let origins: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Begin(b) => Some(b.origin),
            _ => None,
        })
        .collect();
    assert_eq!(origins[0], None);
    let aa = origins[1].expect("forwarded origin");
    assert_eq!((aa.node_id, aa.lsn), (0xaa, 0xABCDEF));
    // A foreign origin name: its id is the FNV-1a hash of the name.
    let other = origins[2].expect("forwarded origin");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"other_tool" {
        hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    assert_eq!((other.node_id, other.lsn), (hash, 0x1234));
    assert_eq!(origins[3], None);
}

#[test]
fn relation_is_resent_after_alter_table_only() {
    let node = started("alter");
    node.safe_psql("CREATE TABLE t (id int PRIMARY KEY, a text, b int)");
    slot(&node, "s");
    node.safe_psql("INSERT INTO t VALUES (1, 'a', 1)");
    node.safe_psql("CREATE INDEX ON t (b)");
    node.safe_psql("VACUUM ANALYZE t");
    node.safe_psql("INSERT INTO t VALUES (2, 'b', 2)");
    node.safe_psql("ALTER TABLE t DROP COLUMN a, ADD COLUMN c text GENERATED ALWAYS AS (b::text) STORED, ADD COLUMN d bigint");
    node.safe_psql("INSERT INTO t (id, b, d) VALUES (3, 3, 30)");
    node.safe_psql("CREATE TABLE u (x int PRIMARY KEY); INSERT INTO u VALUES (1); INSERT INTO t (id, b) VALUES (4, 4)");

    let frames = peek(&node, "s", &client_options(&node));
    let messages = decode(&frames);
    assert_eq!(outline(&messages), "SBRICBICBRICBRIIC");
    let Message::Relation(after) = &messages[9] else {
        unreachable!()
    };
    assert_eq!(after.rel_id, 1, "a table keeps its id");
    let names: Vec<_> = after.columns.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        ["id", "b", "d"],
        "dropped and generated columns are not sent"
    );
    let Message::Insert(ins) = &messages[10] else {
        unreachable!()
    };
    assert_eq!(row(&ins.new), ["3", "3", "30"]);
    let Message::Relation(u) = &messages[13] else {
        unreachable!()
    };
    assert_eq!((u.name, u.rel_id), ("u", 2));
}

#[test]
fn unchanged_toast_is_marked_not_sent() {
    let node = started("toast");
    node.safe_psql("CREATE TABLE t (id int PRIMARY KEY, big text, small text)");
    node.safe_psql("ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL");
    slot(&node, "s");
    node.safe_psql("INSERT INTO t VALUES (1, repeat('abcdefgh', 10000), 'x')");
    node.safe_psql("UPDATE t SET small = 'y' WHERE id = 1");
    node.safe_psql("UPDATE t SET big = repeat('z', 9000) WHERE id = 1");
    let frames = peek(&node, "s", &client_options(&node));
    let messages = decode(&frames);
    assert_eq!(outline(&messages), "SBRICBUCBUC");
    let Message::Insert(ins) = &messages[3] else {
        unreachable!()
    };
    assert_eq!(show(&ins.new[1]), "abcdefgh".repeat(10_000));
    let Message::Update(upd) = &messages[6] else {
        unreachable!()
    };
    assert_eq!(row(&upd.new), ["1", "TOAST", "y"]);
    let Message::Update(upd) = &messages[9] else {
        unreachable!()
    };
    assert_eq!(show(&upd.new[1]), "z".repeat(9000));
}

#[test]
fn replica_identities() {
    let node = started("identity");
    node.safe_psql(
        "CREATE TABLE f (id int, v text); ALTER TABLE f REPLICA IDENTITY FULL; \
         CREATE TABLE i (id int PRIMARY KEY, u int NOT NULL, v text); \
         CREATE UNIQUE INDEX i_u ON i (u); ALTER TABLE i REPLICA IDENTITY USING INDEX i_u; \
         CREATE TABLE n (id int PRIMARY KEY, v text); ALTER TABLE n REPLICA IDENTITY NOTHING; \
         CREATE TABLE nopk (id int, v text)",
    );
    slot(&node, "s");
    node.safe_psql("INSERT INTO f VALUES (1, 'a'); UPDATE f SET v = 'b'; DELETE FROM f");
    node.safe_psql("INSERT INTO i VALUES (1, 10, 'a'); UPDATE i SET u = 11; DELETE FROM i");
    node.safe_psql("INSERT INTO n VALUES (1, 'a'); INSERT INTO nopk VALUES (1, 'a')");

    let options = client_options(&node);
    let frames = peek(&node, "s", &options);
    let messages = decode(&frames);
    assert_eq!(outline(&messages), "SBRIUDCBRIUDCBRIRIC");
    let Message::Relation(f) = &messages[2] else {
        unreachable!()
    };
    assert_eq!(f.replica_identity, ReplicaIdentity::Full);
    assert!(f.columns.iter().all(|c| c.key));
    let Message::Update(upd) = &messages[4] else {
        unreachable!()
    };
    let old = upd.old.as_ref().expect("full old row");
    assert_eq!(
        (old.kind, row(&old.tuple)),
        (OldKind::Full, vec!["1".to_owned(), "a".to_owned()])
    );
    let Message::Delete(del) = &messages[5] else {
        unreachable!()
    };
    assert_eq!(
        (del.old.kind, row(&del.old.tuple)),
        (OldKind::Full, vec!["1".to_owned(), "b".to_owned()])
    );

    let Message::Relation(i) = &messages[8] else {
        unreachable!()
    };
    assert_eq!(i.replica_identity, ReplicaIdentity::Index);
    let keys: Vec<_> = i.columns.iter().map(|c| c.key).collect();
    assert_eq!(keys, [false, true, false]);
    let Message::Update(upd) = &messages[10] else {
        unreachable!()
    };
    let old = upd.old.as_ref().expect("old key");
    assert_eq!(
        (old.kind, row(&old.tuple)),
        (
            OldKind::Key,
            vec!["NULL".to_owned(), "10".to_owned(), "NULL".to_owned()]
        )
    );

    let Message::Relation(n) = &messages[14] else {
        unreachable!()
    };
    assert_eq!(n.replica_identity, ReplicaIdentity::Nothing);
    let Message::Relation(nopk) = &messages[16] else {
        unreachable!()
    };
    assert_eq!(
        nopk.replica_identity,
        ReplicaIdentity::Nothing,
        "DEFAULT without a key"
    );

    // Updates and deletes of tables without identity stop the stream with
    // an error that names the table.
    node.safe_psql("UPDATE nopk SET v = 'b'");
    let err = try_peek(&node, "s", &options).expect_err("no identity");
    assert!(
        err.contains("cannot replicate UPDATE on table \"public.nopk\""),
        "{err}"
    );
    assert!(err.contains("REPLICA IDENTITY"), "{err}");
}

#[test]
fn truncate_and_logical_messages() {
    let node = started("truncate");
    node.safe_psql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id serial PRIMARY KEY, a int REFERENCES a)");
    slot(&node, "s");
    node.safe_psql("TRUNCATE a, b");
    node.safe_psql("TRUNCATE a RESTART IDENTITY CASCADE");
    node.safe_psql("SELECT pg_logical_emit_message(false, 'app', 'outside')");
    node.safe_psql("BEGIN; SELECT pg_logical_emit_message(true, 'app', '\\x00ff'::bytea); INSERT INTO a VALUES (1); COMMIT");

    let frames = peek(&node, "s", &client_options(&node));
    let messages = decode(&frames);
    assert_eq!(outline(&messages), "SBRRTCBTCMBMIC");
    let Message::Truncate(t) = &messages[4] else {
        unreachable!()
    };
    assert_eq!((t.cascade, t.restart_identity), (false, false));
    let mut ids = t.rel_ids.clone();
    ids.sort();
    assert_eq!(ids, [1, 2]);
    let Message::Truncate(t) = &messages[7] else {
        unreachable!()
    };
    assert!(t.cascade && t.restart_identity);
    assert_eq!(t.rel_ids.len(), 2, "CASCADE truncates b too");
    let Message::Logical(m) = &messages[9] else {
        unreachable!()
    };
    assert_eq!(
        (m.transactional, m.prefix, m.content),
        (false, "app", &b"outside"[..])
    );
    let Message::Logical(m) = &messages[11] else {
        unreachable!()
    };
    assert_eq!(
        (m.transactional, m.prefix, m.content),
        (true, "app", &[0u8, 0xff][..])
    );
}

#[test]
fn bad_startup_options_are_refused_clearly() {
    let node = started("options");
    slot(&node, "s");
    node.safe_psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)");
    let good = client_options(&node);

    let mut unknown = good.clone();
    unknown.push(("colour".into(), "blue".into()));
    let err = try_peek(&node, "s", &unknown).expect_err("unknown option");
    assert!(err.contains("unknown startup option \"colour\""), "{err}");
    assert!(err.contains("Valid options are"), "{err}");

    let mut duplicate = good.clone();
    duplicate.push(("node_id".into(), "1".into()));
    let err = try_peek(&node, "s", &duplicate).expect_err("duplicate option");
    assert!(err.contains("\"node_id\" given more than once"), "{err}");

    let malformed = with_option(good.clone(), "node_id", "-3");
    let err = try_peek(&node, "s", &malformed).expect_err("malformed option");
    assert!(
        err.contains("\"node_id\" has invalid value \"-3\""),
        "{err}"
    );

    let missing: Vec<_> = good
        .iter()
        .filter(|(k, _)| k != "node_name")
        .cloned()
        .collect();
    let err = try_peek(&node, "s", &missing).expect_err("missing option");
    assert!(err.contains("\"node_name\" is missing"), "{err}");

    let future = with_option(
        with_option(good.clone(), "min_proto_version", "3"),
        "max_proto_version",
        "5",
    );
    let err = try_peek(&node, "s", &future).expect_err("version mismatch");
    assert!(
        err.contains("client supports protocol versions 3..5 but server supports 1..2"),
        "{err}"
    );

    // Streaming needs protocol version 2, which this client does not read.
    let streaming = with_option(good.clone(), "streaming", "true");
    let err = try_peek(&node, "s", &streaming).expect_err("streaming without version 2");
    assert!(
        err.contains("\"streaming\" needs protocol version 2, but version 1 was chosen"),
        "{err}"
    );

    let startup = with_option(good.clone(), "startup_version", "9");
    let err = try_peek(&node, "s", &startup).expect_err("startup version");
    assert!(err.contains("startup version 9"), "{err}");

    // No options at all from SQL: inspection defaults.
    let frames = peek(&node, "s", &[]);
    assert_eq!(outline(&decode(&frames)), "SBRIC");
    // Text only: every value travels as text.
    let text = with_option(good, "datum_formats", "text");
    let frames = peek(&node, "s", &text);
    let messages = decode(&frames);
    let Message::Startup(s) = &messages[0] else {
        unreachable!()
    };
    assert_eq!(s.datum_formats, DatumFormats::TEXT);
    let Message::Insert(ins) = &messages[3] else {
        unreachable!()
    };
    assert_eq!(ins.new, [bdr_protocol::Datum::Text("1")]);
}

#[test]
fn the_extension_catalog_is_never_sent() {
    let node = started("catalog");
    node.safe_psql("CREATE TABLE t (id int PRIMARY KEY)");
    slot(&node, "s");
    node.safe_psql("INSERT INTO bdr.nodes (node_name, dsn) VALUES ('z', 'host=h')");
    node.safe_psql("BEGIN; UPDATE bdr.nodes SET dsn = 'host=i'; INSERT INTO t VALUES (1); COMMIT");
    node.safe_psql("TRUNCATE bdr.nodes");
    node.safe_psql("TRUNCATE bdr.nodes, t");

    let frames = peek(&node, "s", &client_options(&node));
    let messages = decode(&frames);
    // Only the row of t and the truncate of t: bdr.nodes is each node's own.
    assert_eq!(outline(&messages), "SBRICBTC");
    let Message::Relation(r) = &messages[2] else {
        unreachable!()
    };
    assert_eq!((r.schema, r.name), ("public", "t"));
    let Message::Truncate(t) = &messages[6] else {
        unreachable!()
    };
    assert_eq!(t.rel_ids, [r.rel_id]);
}

/// What a receiver keeps of a streamed transaction: the ids inserted, each
/// with the (sub)transaction it belongs to.
#[derive(Default)]
struct Streamed {
    rows: Vec<(u32, String)>,
    /// Where each (sub)transaction's first change is in `rows`.
    starts: Vec<(u32, usize)>,
    blocks: usize,
}

#[test]
fn large_transactions_stream_in_blocks_when_asked() {
    let mut node = Node::init("streaming");
    node.append_conf("logical_decoding_work_mem = '64kB'\n");
    node.start();
    node.safe_psql("CREATE EXTENSION bdr");
    node.safe_psql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    slot(&node, "s");
    let rows = |from: i32, to: i32| {
        format!("INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series({from}, {to}) g")
    };
    // Committed, with a subtransaction rolled back half-way.
    node.safe_psql(&format!(
        "BEGIN; {}; SAVEPOINT sp; {}; ROLLBACK TO SAVEPOINT sp; {}; COMMIT",
        rows(1, 2000),
        rows(10_001, 12_000),
        rows(99_999, 99_999)
    ));
    // Rolled back as a whole.
    node.safe_psql(&format!("BEGIN; {}; ROLLBACK", rows(20_001, 23_000)));
    // Small: sent whole after its commit.
    node.safe_psql(&rows(30_001, 30_001));

    // Without the option, the same WAL comes as whole transactions only.
    let plain = outline(&decode(&peek(&node, "s", &client_options(&node))));
    assert!(plain.bytes().all(|b| b"SBRICM".contains(&b)), "{plain}");

    let options = with_option(
        with_option(client_options(&node), "max_proto_version", "2"),
        "streaming",
        "true",
    );
    let frames = peek(&node, "s", &options);
    let messages = decode(&frames);
    let Message::Startup(startup) = &messages[0] else {
        panic!("no STARTUP first")
    };
    assert_eq!(startup.proto_version, 2);

    let mut open: std::collections::HashMap<u32, Streamed> = Default::default();
    let mut block: Option<(u32, u32)> = None;
    let (mut committed, mut aborted, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    let mut first_blocks = 0;
    let mut in_whole = false;
    for m in &messages {
        match m {
            Message::StreamStart(s) => {
                assert!(block.is_none(), "STREAM START inside a block");
                assert_eq!(
                    s.first,
                    !open.contains_key(&s.xid),
                    "first flag of {}",
                    s.xid
                );
                first_blocks += usize::from(s.first);
                open.entry(s.xid).or_default().blocks += 1;
                block = Some((s.xid, s.xid));
            }
            Message::Subxact(xid) => {
                let (top, _) = block.expect("SUBXACT outside a block");
                block = Some((top, *xid));
            }
            Message::Insert(i) => {
                let id = show(&i.new[0]);
                match block {
                    Some((top, sub)) => {
                        let t = open.get_mut(&top).unwrap();
                        if !t.starts.iter().any(|(x, _)| *x == sub) {
                            t.starts.push((sub, t.rows.len()));
                        }
                        t.rows.push((sub, id));
                    }
                    None => {
                        assert!(in_whole, "a change outside any transaction");
                        whole.push(id);
                    }
                }
            }
            Message::StreamStop => {
                assert!(block.take().is_some(), "STREAM STOP outside a block");
            }
            Message::StreamAbort(a) => {
                assert!(block.is_none(), "STREAM ABORT inside a block");
                if a.xid == a.subxid {
                    let t = open
                        .remove(&a.xid)
                        .expect("abort of a streamed transaction");
                    aborted.push(t.rows.len());
                } else if let Some(t) = open.get_mut(&a.xid)
                    && let Some(&(_, at)) = t.starts.iter().find(|(x, _)| *x == a.subxid)
                {
                    t.rows.truncate(at);
                    t.starts.retain(|&(_, start)| start < at);
                }
            }
            Message::StreamCommit(c) => {
                assert!(block.is_none(), "STREAM COMMIT inside a block");
                assert!(c.end_lsn > c.commit_lsn && c.origin.is_none());
                let t = open
                    .remove(&c.xid)
                    .expect("commit of a streamed transaction");
                assert!(
                    t.blocks >= 2,
                    "a transaction of 400 kB in {} block(s)",
                    t.blocks
                );
                committed.extend(t.rows.into_iter().map(|(_, id)| id));
            }
            Message::Begin(_) => in_whole = true,
            Message::Commit(_) => in_whole = false,
            _ => {}
        }
    }
    assert!(open.is_empty() && block.is_none());
    assert_eq!(first_blocks, 2, "two transactions were streamed");
    let expected: Vec<String> = (1..=2000).chain([99_999]).map(|i| i.to_string()).collect();
    assert_eq!(
        committed, expected,
        "the committed rows, without the rolled back subtransaction"
    );
    assert_eq!(aborted.len(), 1);
    assert!(
        aborted[0] > 0,
        "the aborted transaction was streamed before its abort"
    );
    assert_eq!(whole, ["30001"]);
    let outline = outline(&messages);
    assert!(
        outline.contains('x'),
        "SUBXACT marks the subtransaction: {outline}"
    );
}
