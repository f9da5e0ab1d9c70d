//! The benchmark harness end to end at tiny sizes: one run of every
//! workload on all three pairs must produce a complete table and a JSON
//! file with every figure present for every system it applies to. Nothing
//! here judges speed; the figures at these sizes mean nothing.

use std::process::Command;

#[test]
fn quick_run_produces_every_figure() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json_path = dir.path().join("results.json");
    let out = Command::new(env!("CARGO_BIN_EXE_bdr-bench"))
        .args(["--quick", "--runs", "1", "--json"])
        .arg(&json_path)
        .output()
        .expect("running bdr-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bdr-bench failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json file"))
            .expect("valid JSON");
    let matches = json["receiver_matches_origin"]
        .as_object()
        .expect("consistency");
    assert_eq!(matches.len(), 3, "{matches:?}");
    assert!(matches.values().all(|v| v == true), "{matches:?}");
    let figures = json["figures"].as_array().expect("figures");
    // Apply figures: bdr, bdr one statement at a time, built-in text and
    // binary, pglogical, and for catch-up bdr without batches, bdr
    // without conflict detection, bdr with statements only and bdr on
    // two sessions (parallel apply), plus bdr without streaming for the
    // one large transaction;
    // decoding figures: bdr, pgoutput text and binary, wal2json.
    let expected = [
        ("catchup_tps", 9),
        ("catchup_startup_s", 9),
        ("bulk_one_tx_rows_s", 10),
        ("bulk_many_tx_rows_s", 9),
        ("cpu_apply_pgbench", 9),
        ("cpu_walsender_pgbench", 9),
        ("cpu_apply_bulk", 9),
        ("cpu_walsender_bulk", 9),
        ("keepup_tps", 5),
        ("keepup_ratio", 5),
        ("lag_bytes_p50", 5),
        ("lag_bytes_p99", 5),
        ("lag_ms_p50", 5),
        ("lag_ms_p99", 5),
        ("decode_small_changes_s", 4),
        ("bytes_small_wire", 4),
        ("bytes_small_payload", 4),
        ("decode_mixed_changes_s", 4),
        ("bytes_mixed_wire", 4),
        ("bytes_mixed_payload", 4),
    ];
    for (key, systems) in expected {
        let f = figures
            .iter()
            .find(|f| f["key"] == key)
            .unwrap_or_else(|| panic!("figure {key} missing:\n{stdout}"));
        let map = f["systems"].as_object().expect("systems");
        assert_eq!(map.len(), systems, "figure {key} systems: {map:?}");
        for (system, v) in map {
            let median = v["median"].as_f64().unwrap_or(-1.0);
            // Lag may be zero when the receiver keeps up within a sample,
            // and CPU time of a tiny batch below one clock tick; everything
            // else is a rate, a size or a time and positive.
            let ok = if key.starts_with("lag_") || key.starts_with("cpu_") {
                median >= 0.0
            } else {
                median > 0.0
            };
            assert!(ok, "figure {key} for {system}: {median}\n{stdout}");
            assert!(
                stdout.contains(f["label"].as_str().expect("label")),
                "table lacks {key}:\n{stdout}"
            );
        }
    }
}
