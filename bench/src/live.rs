//! Workloads 1b and 3: the receiver running while the origin writes.
//!
//! 1b, keeping up: pgbench -N at full speed for a fixed time, then the
//! time until the receiver has applied everything; the sustainable rate is
//! transactions / (writing + draining), also as a ratio to the writer's own
//! rate (1.0: the receiver keeps up).
//!
//! 3, lag under load: pgbench -N limited to half the writer's full rate
//! (the median full rate of this run's 1b over all systems, so every
//! system gets the same load). Every 100 ms the origin's WAL position and
//! the receiver's replication-origin progress are sampled: the byte lag is
//! their difference; the time lag is how long ago the origin's WAL was at
//! the position the receiver has now applied (interpolated between
//! samples). This does not depend on how often a receiver reports its
//! position to the origin.

use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::pair::Pair;
use crate::report::{Report, System};
use crate::{Sizes, pg};

/// Runs 1b and then 3 once on every system (but the bdr variants for
/// catch-up only).
pub fn run(pairs: &mut [Pair], sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let plan: Vec<(usize, System)> = crate::plan(pairs)
        .into_iter()
        .filter(|(_, s)| {
            !matches!(
                s,
                System::BdrPlain
                    | System::BdrPipelined
                    | System::BdrStatements
                    | System::BdrNoStream
                    | System::BdrParallel
            )
        })
        .collect();
    let mut writer_rates = Vec::new();
    for &(i, system) in &plan {
        crate::note(&format!("keep-up, {system:?}"));
        let pair = &mut pairs[i];
        select(pair, system)?;
        writer_rates.push(keep_up(pair, system, sizes, report)?);
    }
    writer_rates.sort_by(f64::total_cmp);
    let rate = (writer_rates[writer_rates.len() / 2] / 2.0).max(1.0);
    for &(i, system) in &plan {
        crate::note(&format!("lag at {rate:.0} tx/s, {system:?}"));
        let pair = &mut pairs[i];
        select(pair, system)?;
        lag(pair, system, sizes, rate, report)?;
    }
    Ok(())
}

/// Pauses, sets the pair up to run as `system`, resumes, and waits until
/// the receiver streams and has applied everything so far.
fn select(pair: &mut Pair, system: System) -> anyhow::Result<()> {
    pair.pause_as(system)?;
    pair.tidy();
    pair.resume()?;
    let m = pair.write_marker();
    pair.wait_for_marker(m, crate::wait_limit())?;
    Ok(())
}

fn writer_args(sizes: &Sizes) -> Vec<String> {
    vec![
        "-n".into(),
        "-N".into(),
        "-c".into(),
        sizes.clients.to_string(),
        "-j".into(),
        sizes.clients.min(2).to_string(),
        "-T".into(),
        sizes.seconds.to_string(),
    ]
}

/// Returns the writer's own rate.
fn keep_up(
    pair: &mut Pair,
    system: System,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<f64> {
    let args = writer_args(sizes);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let start = Instant::now();
    let written = pg::parse_pgbench(&pg::pgbench(&pair.origin, &args)?)?;
    let m = pair.write_marker();
    let done = pair.wait_for_marker(m, crate::wait_limit())?;
    let sustained = written.transactions as f64 / (done - start).as_secs_f64();
    report.add(
        "keepup_tps",
        "1b keep-up: sustained rate",
        "tx/s",
        true,
        system,
        sustained,
    );
    report.add(
        "keepup_ratio",
        "1b keep-up: sustained / writer rate",
        "ratio",
        true,
        system,
        sustained / written.tps,
    );
    Ok(written.tps)
}

fn lag(
    pair: &mut Pair,
    system: System,
    sizes: &Sizes,
    rate: f64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut args = writer_args(sizes);
    args.extend(["--rate".into(), format!("{rate:.0}")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut origin = pair.origin.connect();
    let mut writer = pg::spawn_pgbench(&pair.origin, &args)?;
    let start = Instant::now();
    // (seconds since start, origin WAL position)
    let mut wal: Vec<(f64, u64)> = Vec::new();
    let mut bytes = Vec::new();
    let mut millis = Vec::new();
    let status = loop {
        if let Some(status) = writer.try_wait()? {
            break status;
        }
        let row = origin.query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8", &[])?;
        let now = start.elapsed().as_secs_f64();
        let current = row.get::<_, i64>(0) as u64;
        let applied = pair.applied_lsn()?;
        wal.push((now, current));
        // The first second is ramp-up.
        if now >= 1.0 || sizes.seconds < 3 {
            bytes.push(current.saturating_sub(applied) as f64);
            millis.push(time_lag(&wal, now, applied) * 1000.0);
        }
        sleep(Duration::from_millis(100));
    };
    if !status.success() {
        bail!("pgbench --rate on {system:?} failed: {status}");
    }
    if bytes.is_empty() {
        bail!("no lag samples for {system:?}");
    }
    report.add(
        "lag_bytes_p50",
        "3 lag at 50% load, bytes p50",
        "B",
        false,
        system,
        percentile(&mut bytes, 50.0),
    );
    report.add(
        "lag_bytes_p99",
        "3 lag at 50% load, bytes p99",
        "B",
        false,
        system,
        percentile(&mut bytes, 99.0),
    );
    report.add(
        "lag_ms_p50",
        "3 lag at 50% load, time p50",
        "ms",
        false,
        system,
        percentile(&mut millis, 50.0),
    );
    report.add(
        "lag_ms_p99",
        "3 lag at 50% load, time p99",
        "ms",
        false,
        system,
        percentile(&mut millis, 99.0),
    );
    Ok(())
}

/// How long ago (seconds before `now`) the origin's WAL reached `applied`,
/// interpolating linearly between samples; 0 if it reached it only now.
fn time_lag(wal: &[(f64, u64)], now: f64, applied: u64) -> f64 {
    let Some(i) = wal.iter().position(|&(_, lsn)| lsn >= applied) else {
        return 0.0;
    };
    if i == 0 {
        return now - wal[0].0;
    }
    let (t0, l0) = wal[i - 1];
    let (t1, l1) = wal[i];
    let reached = if l1 > l0 {
        t0 + (t1 - t0) * (applied - l0) as f64 / (l1 - l0) as f64
    } else {
        t1
    };
    (now - reached).max(0.0)
}

/// The nearest-rank percentile.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_lag_interpolates() {
        let wal = [(0.0, 100), (0.1, 200), (0.2, 300)];
        assert!((time_lag(&wal, 0.2, 150) - 0.15).abs() < 1e-9);
        assert_eq!(time_lag(&wal, 0.2, 300), 0.0);
        assert_eq!(time_lag(&wal, 0.2, 400), 0.0);
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), 50.0);
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(percentile(&mut [7.0], 99.0), 7.0);
    }
}
