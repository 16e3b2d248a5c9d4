//! `--metrics` for the benchmarks: records the store's `metrics` in memory and prints, after each phase, every
//! counter (total and per operation of the phase) and every histogram (samples, mean, median, max). Each print
//! resets what it printed, so a phase's lines are that phase's alone. Gauges are left out (the in-memory recorder
//! zeroes them at every print, so a gauge not set since would show 0).

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

pub struct MetricSummary {
    snapshotter: Snapshotter,
}

impl MetricSummary {
    /// Installs the in-memory recorder for the whole process (once; a second call is refused).
    pub fn install() -> Result<MetricSummary, String> {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().map_err(|_| "a metrics recorder is already installed".to_string())?;
        Ok(MetricSummary { snapshotter })
    }

    /// Prints what was recorded since the last call; `operations` is the phase's count of client operations.
    pub fn print(&self, phase: &str, operations: u64) {
        let mut lines: Vec<String> = self
            .snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| {
                let labels: Vec<String> =
                    key.key().labels().map(|label| format!("{}={}", label.key(), label.value())).collect();
                let mut name = key.key().name().trim_start_matches("flotilla_").to_string();
                if !labels.is_empty() {
                    name = format!("{name}{{{}}}", labels.join(","));
                }
                match value {
                    DebugValue::Counter(0) => None,
                    DebugValue::Counter(total) => Some(format!(
                        "  {name:<36} {total:>12} ({:.3} per operation)",
                        total as f64 / operations.max(1) as f64
                    )),
                    DebugValue::Gauge(_) => None, // this recorder zeroes gauges on every snapshot: not shown
                    DebugValue::Histogram(values) if values.is_empty() => None,
                    DebugValue::Histogram(mut values) => {
                        values.sort();
                        let mean = values.iter().map(|v| v.0).sum::<f64>() / values.len() as f64;
                        let (median, max) = (values[values.len() / 2].0, values[values.len() - 1].0);
                        Some(format!(
                            "  {name:<36} {:>12} samples, mean {mean:.4}, median {median:.4}, max {max:.4}",
                            values.len()
                        ))
                    }
                }
            })
            .collect();
        lines.sort();
        println!("metrics, {phase}:");
        for line in lines {
            println!("{line}");
        }
    }
}
