//! The `--stat=json` object: every `--stat` figure and the run's outcome as one JSON
//! object, for monitoring. Its fields are documented in `docs/usage.md` ("--stat=json");
//! a field is only ever added, never renamed or given another meaning.

use crate::json;
use crate::report::Stats;

/// What a run was, beside its figures: the JSON object says it, so that a monitor needs
/// no command line to read it.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunFacts {
    /// `"run"` or `"index"`.
    pub command: &'static str,
    /// `"PUSH"`, `"PULL"`, or `None` without an action.
    pub action: Option<&'static str>,
    /// `"SYNC"`, `"COPY"`, or `None` without an action.
    pub mode: Option<&'static str>,
    /// `--recheck`.
    pub recheck: bool,
}

/// The JSON object of a run that ended with `exit_code` (and `error`, its message, when
/// it failed), on one line.
pub fn render(stats: &Stats, facts: &RunFacts, exit_code: i32, error: Option<&str>) -> String {
    let (local_written, remote_written) = match facts.action {
        Some("PULL") => (stats.bytes_written, 0),
        Some(_) => (0, stats.bytes_written),
        None => (0, 0),
    };
    let object = json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "command": facts.command,
        "action": facts.action,
        "mode": facts.mode,
        "recheck": facts.recheck,
        "exit_code": exit_code,
        "error": error,
        "link": if stats.over_ssh { "ssh" } else { "pipe" },
        "device_size_bytes": stats.device_size,
        "duration_seconds": stats.elapsed.as_secs_f64(),
        "rx_bytes": stats.rx,
        "tx_bytes": stats.tx,
        "traffic_bytes": stats.rx + stats.tx,
        "ratio_percent": stats.ratio(),
        "real_bandwidth_bytes_per_second": stats.real_bandwidth(),
        "effective_bandwidth_bytes_per_second": stats.effective_bandwidth(),
        "blocks_compared": stats.blocks_compared,
        "blocks_differing": stats.blocks_differing,
        "blocks_sent": stats.blocks_sent,
        "data_bytes_sent": stats.data_sent,
        "zero_bytes_sent": stats.zeros_sent,
        "bytes_written": stats.bytes_written,
        "local_read_bytes": stats.local_read,
        "local_written_bytes": local_written,
        "remote_read_bytes": stats.remote_read,
        "remote_written_bytes": remote_written,
        "tree_nodes_compared": stats.nodes_compared,
    });
    format!("{}\n", json::render(&object))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_figure_is_a_field_and_the_sides_follow_the_action() {
        let stats = Stats {
            device_size: 1 << 20,
            rx: 100,
            tx: 5000,
            elapsed: Duration::from_millis(1500),
            blocks_compared: 8,
            blocks_differing: 2,
            blocks_sent: 2,
            data_sent: 4096,
            zeros_sent: 8192,
            bytes_written: 12288,
            local_read: 1 << 20,
            remote_read: 3,
            nodes_compared: 7,
            over_ssh: true,
        };
        let facts = RunFacts { command: "run", action: Some("PULL"), mode: Some("SYNC"), recheck: false };
        let text = render(&stats, &facts, 2, Some("it broke"));
        assert!(text.ends_with("}\n") && text.matches('\n').count() == 1, "{text}");
        let v: json::Value = json::parse(&text).expect("valid JSON");
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!((v["exit_code"].as_i64(), v["error"].as_str()), (Some(2), Some("it broke")));
        assert_eq!(
            (v["action"].as_str(), v["mode"].as_str(), v["link"].as_str()),
            (Some("PULL"), Some("SYNC"), Some("ssh"))
        );
        assert_eq!(v["traffic_bytes"], 5100);
        assert_eq!(v["duration_seconds"], 1.5);
        assert_eq!((v["local_written_bytes"].as_u64(), v["remote_written_bytes"].as_u64()), (Some(12288), Some(0)));
        assert_eq!(v["effective_bandwidth_bytes_per_second"].as_f64(), Some((1u64 << 20) as f64 / 1.5));
        let local = Stats { over_ssh: false, blocks_sent: 0, data_sent: 0, zeros_sent: 0, bytes_written: 0, ..stats };
        let v: json::Value = json::parse(&render(&local, &RunFacts::default(), 0, None)).expect("valid JSON");
        assert!(v["real_bandwidth_bytes_per_second"].is_null() && v["effective_bandwidth_bytes_per_second"].is_null());
        assert!(v["error"].is_null() && v["action"].is_null());
        assert_eq!(v["link"], "pipe");
    }
}
