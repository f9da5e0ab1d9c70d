//! Convergence under concurrent writers: three nodes, one writer each,
//! on overlapping keys, with every applier running. After the writers
//! stop and the nodes catch up, every table is identical on every node.
//!
//! The workload stays inside what converges without tombstones (see
//! docs/conflicts.md): updates and deletes race on rows every node had
//! before the writers started, and inserts race on a separate range of
//! keys that is never deleted. A failing seed is printed; replay it with
//! `BDR_CONFLICT_SEED=<seed> cargo test -p bdr-tests --test conflict_converge`.

use std::thread;

use bdr_tests::Mesh;

const OPS_PER_WRITER: usize = 300;
const SHARED_KEYS: i32 = 40;
const INSERT_KEYS: i32 = 40;

/// xorshift64*: small, deterministic, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn writer(dsn: String, table: String, seed: u64, node: usize) {
    let mut client = postgres::Client::connect(&dsn, postgres::NoTls).expect("connect");
    let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(node as u64 + 1) | 1);
    for op in 0..OPS_PER_WRITER {
        let tag = format!("n{node}-{op}");
        let roll = rng.below(10);
        let sql = if roll < 4 {
            let k = 1 + rng.below(SHARED_KEYS as u64) as i32;
            format!("UPDATE {table} SET v = '{tag}', n = n + 1 WHERE id = {k}")
        } else if roll < 6 {
            let k = 1 + rng.below(SHARED_KEYS as u64) as i32;
            format!("DELETE FROM {table} WHERE id = {k}")
        } else {
            let k = 1001 + rng.below(INSERT_KEYS as u64) as i32;
            format!("INSERT INTO {table} VALUES ({k}, '{tag}', 0) ON CONFLICT DO NOTHING")
        };
        client.batch_execute(&sql).expect("writer statement");
    }
}

/// Prints the rows that differ between nodes, with their last writers and
/// the conflicts recorded for them.
fn report_difference(mesh: &Mesh, table: &str) {
    for n in &mesh.nodes {
        eprintln!(
            "--- node {} ---\n{}\n--- conflicts ---\n{}",
            n.name(),
            n.safe_psql(&format!(
                "SELECT id, v, n, (pg_xact_commit_timestamp_origin(xmin)).* FROM {table} ORDER BY id"
            )),
            n.safe_psql(&format!(
                "SELECT key, conflict_type, resolution, local_row ->> 'v', remote_row ->> 'v',
                        local_commit_time, remote_commit_time
                   FROM bdr.conflict_history WHERE relation = 'public.{table}' ORDER BY id"
            ))
        );
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("BDR_CONFLICT_SEED") {
        Ok(s) => vec![s.parse().expect("BDR_CONFLICT_SEED is a number")],
        Err(_) => vec![1, 2, 3],
    }
}

#[test]
fn three_writers_on_overlapping_keys_converge() {
    let seeds = seeds();
    let schema: String = seeds
        .iter()
        .map(|s| format!("CREATE TABLE r{s} (id int PRIMARY KEY, v text, n int);"))
        .collect();
    let mesh = Mesh::new(&["a", "b", "c"], &schema);
    for seed in &seeds {
        let table = format!("r{seed}");
        mesh.node("a").safe_psql(&format!(
            "INSERT INTO {table} SELECT g, 'seed', 0 FROM generate_series(1, {SHARED_KEYS}) g"
        ));
        mesh.wait_for_catchup();
        let writers: Vec<_> = mesh
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let (dsn, table, seed) = (n.connstr(), table.clone(), *seed);
                thread::spawn(move || writer(dsn, table, seed, i))
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        mesh.wait_for_catchup();
        mesh.wait_for_catchup();
        let query = format!(
            "SELECT count(*) || ':' || md5(string_agg(x::text, ',' ORDER BY id)) FROM {table} x"
        );
        let first = mesh.nodes[0].safe_psql(&query);
        for n in &mesh.nodes[1..] {
            if n.safe_psql(&query) != first {
                report_difference(&mesh, &table);
                panic!(
                    "seed {seed}: node {} differs from node a; replay with BDR_CONFLICT_SEED={seed}",
                    n.name()
                );
            }
        }
        let conflicts: Vec<String> = mesh
            .nodes
            .iter()
            .map(|n| {
                n.safe_psql(&format!(
                    "SELECT count(*) FROM bdr.conflict_history WHERE relation = 'public.{table}'"
                ))
            })
            .collect();
        eprintln!("seed {seed}: {first}, conflicts per node {conflicts:?}");
    }
}
