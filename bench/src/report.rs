//! Figures, their medians, the table and the JSON file.
//!
//! Every figure keeps each run's value per system; the table shows the
//! median and the ratios of ours to the others. A ratio is always
//! `bdr / other`: above 1 is better for "higher is better" figures
//! (throughput), below 1 for "lower is better" ones (CPU, bytes, lag).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

/// A replication system (or, for decoding, an output plugin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum System {
    Bdr,
    /// bdr applying one statement at a time (`BDR_APPLY_PIPELINE=off`):
    /// what pipelining buys, in the same run.
    BdrSerial,
    /// bdr pipelining each transaction but not batching transactions
    /// (`BDR_APPLY_BATCH=off`): what batching buys.
    BdrPipelined,
    /// bdr without conflict detection in its statements
    /// (`BDR_APPLY_DETECT_CONFLICTS=off`): what detection costs.
    BdrPlain,
    /// bdr batching statements, without the server applying row changes
    /// itself (`BDR_APPLY_IN_SERVER=off`): what `bdr.apply_changes` buys.
    BdrStatements,
    /// bdr asking for whole transactions only (`BDR_STREAMING=off`), for
    /// the one large transaction (2a): what streaming buys.
    BdrNoStream,
    /// bdr applying on two batched sessions (`BDR_PARALLEL_APPLY=on`):
    /// what parallel apply buys.
    BdrParallel,
    Builtin,
    BuiltinBinary,
    Pglogical,
    Wal2json,
}

impl System {
    pub const ALL: [System; 11] = [
        System::Bdr,
        System::BdrSerial,
        System::BdrPipelined,
        System::BdrPlain,
        System::BdrStatements,
        System::BdrNoStream,
        System::BdrParallel,
        System::Builtin,
        System::BuiltinBinary,
        System::Pglogical,
        System::Wal2json,
    ];

    /// The key in the JSON file.
    pub fn key(self) -> &'static str {
        match self {
            System::Bdr => "bdr",
            System::BdrSerial => "bdr_serial",
            System::BdrPipelined => "bdr_no_batch",
            System::BdrPlain => "bdr_no_detection",
            System::BdrStatements => "bdr_statements",
            System::BdrNoStream => "bdr_no_stream",
            System::BdrParallel => "bdr_parallel",
            System::Builtin => "builtin",
            System::BuiltinBinary => "builtin_binary",
            System::Pglogical => "pglogical",
            System::Wal2json => "wal2json",
        }
    }

    fn header(self) -> &'static str {
        match self {
            System::Bdr => "bdr",
            System::BdrSerial => "bdr 1-by-1",
            System::BdrPipelined => "bdr no batch",
            System::BdrPlain => "bdr no detect",
            System::BdrStatements => "bdr stmts",
            System::BdrNoStream => "bdr no stream",
            System::BdrParallel => "bdr parallel",
            System::Builtin => "built-in",
            System::BuiltinBinary => "built-in bin",
            System::Pglogical => "pglogical",
            System::Wal2json => "wal2json",
        }
    }
}

/// One measured quantity.
#[derive(Debug, Clone)]
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    pub runs: BTreeMap<System, Vec<f64>>,
}

impl Figure {
    /// The median of a system's runs (mean of the middle two for an even
    /// count).
    pub fn median(&self, s: System) -> Option<f64> {
        let mut v = self.runs.get(&s)?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }

    fn ratio(&self, other: System) -> Option<f64> {
        let ours = self.median(System::Bdr)?;
        let theirs = self.median(other)?;
        (theirs != 0.0).then(|| ours / theirs)
    }
}

/// All figures of a run, in the order they were first recorded.
#[derive(Debug, Default)]
pub struct Report {
    pub figures: Vec<Figure>,
}

impl Report {
    /// Records one run's value of a figure for a system.
    pub fn add(
        &mut self,
        key: &'static str,
        label: &'static str,
        unit: &'static str,
        higher_is_better: bool,
        system: System,
        value: f64,
    ) {
        let i = match self.figures.iter().position(|f| f.key == key) {
            Some(i) => i,
            None => {
                self.figures.push(Figure {
                    key,
                    label,
                    unit,
                    higher_is_better,
                    runs: BTreeMap::new(),
                });
                self.figures.len() - 1
            }
        };
        self.figures[i].runs.entry(system).or_default().push(value);
    }

    fn columns(&self) -> Vec<System> {
        System::ALL
            .into_iter()
            .filter(|s| self.figures.iter().any(|f| f.runs.contains_key(s)))
            .collect()
    }

    /// The table, in Markdown (readable as plain text too).
    pub fn table(&self) -> String {
        let cols = self.columns();
        let ratios = [System::Builtin, System::BuiltinBinary, System::Pglogical];
        let mut out = String::from("| figure | unit |");
        for c in &cols {
            let _ = write!(out, " {} |", c.header());
        }
        for r in ratios {
            let _ = write!(out, " bdr/{} |", r.header());
        }
        out.push_str("\n|---|---|");
        for _ in 0..cols.len() + ratios.len() {
            out.push_str("---:|");
        }
        out.push('\n');
        for f in &self.figures {
            let better = if f.higher_is_better { "↑" } else { "↓" };
            let _ = write!(out, "| {} {better} | {} |", f.label, f.unit);
            for c in &cols {
                let _ = write!(out, " {} |", f.median(*c).map_or("-".into(), fmt_value));
            }
            for r in ratios {
                let _ = write!(
                    out,
                    " {} |",
                    f.ratio(r).map_or("-".into(), |x| format!("{x:.2}"))
                );
            }
            out.push('\n');
        }
        out
    }

    /// The figures as JSON: per system every run and the median, plus the
    /// ratios.
    pub fn figures_json(&self) -> Value {
        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|f| {
                let mut systems = serde_json::Map::new();
                for (s, runs) in &f.runs {
                    systems.insert(
                        s.key().into(),
                        json!({ "median": f.median(*s), "runs": runs }),
                    );
                }
                let mut ratios = serde_json::Map::new();
                for r in [System::Builtin, System::BuiltinBinary, System::Pglogical] {
                    if let Some(x) = f.ratio(r) {
                        ratios.insert(format!("bdr/{}", r.key()), json!(x));
                    }
                }
                json!({
                    "key": f.key,
                    "label": f.label,
                    "unit": f.unit,
                    "higher_is_better": f.higher_is_better,
                    "systems": systems,
                    "ratios": ratios,
                })
            })
            .collect();
        Value::Array(figures)
    }
}

/// Three significant figures at least, no exponent.
fn fmt_value(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        let mut r = Report::default();
        for v in [3.0, 1.0, 2.0] {
            r.add("k", "label", "u", true, System::Bdr, v);
        }
        for v in [4.0, 8.0] {
            r.add("k", "label", "u", true, System::Builtin, v);
        }
        let f = &r.figures[0];
        assert_eq!(f.median(System::Bdr), Some(2.0));
        assert_eq!(f.median(System::Builtin), Some(6.0));
        assert_eq!(f.ratio(System::Builtin), Some(2.0 / 6.0));
        assert_eq!(f.ratio(System::Pglogical), None);
        let table = r.table();
        assert!(table.contains("| label ↑ | u | 2.00 | 6.00 |"), "{table}");
        assert!(table.contains("0.33"), "{table}");
    }
}
