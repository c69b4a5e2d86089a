//! The dump as text, for a person reading the log.

use core::fmt::Write as _;

use crate::base::log::Bytes;
use crate::ledger::device_effective;
use crate::ledger::effective::{self};
use crate::ledger::purges::{self};
use crate::ledger::PoolName;
use crate::ledger::{self};
use crate::tracker::{self};

use super::json::symbolize;
use super::report::Report;
use super::report::CONFIG;

pub(super) fn b(v: u64) -> Bytes {
    Bytes(v)
}

pub(super) fn opt_bytes(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| Bytes(v).to_string())
}

pub(super) fn signal_text(signal: Option<i32>) -> String {
    match signal {
        None => "off".into(),
        Some(s) => match crate::base::config::signal_name(s) {
            Some(name) => format!("SIG{name} ({s})"),
            None => s.to_string(),
        },
    }
}

pub(super) fn report_text(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "==== qvshim {} dump: pid {}, up {}.{:03} s, level {} ====",
        env!("CARGO_PKG_VERSION"),
        r.pid,
        r.uptime_ms / 1000,
        r.uptime_ms % 1000,
        ledger::level_name(r.level)
    );
    if let Some(c) = CONFIG.get() {
        let s = &c.settings;
        let _ = writeln!(
            o,
            "config: budget {}, reserve {}, warn {}%, critical {}%, interval {} ms, purge interval {} ms",
            b(c.host_budget),
            b(s.reserve_bytes),
            s.warn_percent,
            s.critical_percent,
            s.interval_ms,
            s.purge_interval_ms
        );
        let _ = writeln!(
            o,
            "        system reserve {}, python {}, signal {}, dump signal {}, dump {} to {}, backtrace {}, log {}",
            b(s.system_reserve_bytes),
            if s.python { "on" } else { "off" },
            signal_text(s.notify_signal),
            signal_text(s.dump_signal),
            if s.dump_json { "json" } else { "text" },
            c.dump_path
                .as_ref()
                .map_or_else(|| "stderr".into(), |p| String::from_utf8_lossy(p).into_owned()),
            if s.backtrace { "on" } else { "off" },
            s.log_level.name().to_ascii_lowercase()
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<7} {:<8} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10} {:>8} {:>11} {:>6} {:>7} {:>6}",
        "pool", "level", "budget", "effective", "live", "peak", "reserve", "res.used", "allocs",
        "frees", "refused", "largest ref", "purges", "changes", "told"
    );
    for p in &r.pools {
        let s = &p.stats;
        let _ = writeln!(
            o,
            "{:<7} {:<8} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10} {:>8} {:>11} {:>6} {:>7} {:>6}",
            PoolName(s.pool as usize).to_string(),
            ledger::level_name(s.level as u8),
            b(s.budget).to_string(),
            b(s.effective_budget).to_string(),
            b(s.live).to_string(),
            b(s.peak).to_string(),
            b(s.reserve).to_string(),
            b(s.reserve_in_use).to_string(),
            s.allocs,
            s.frees,
            s.refusals,
            b(s.largest_refused).to_string(),
            s.purges,
            s.level_changes,
            s.notifications
        );
    }
    for p in r
        .pools
        .iter()
        .filter(|p| p.stats.pool as usize != ledger::HOST)
    {
        let index = p.stats.pool as usize;
        let (trims, trimmed) = crate::gpu::mempools::trims(index);
        let _ = writeln!(
            o,
            "{}: counted {}, NVML {}, pools cached {}, unseen {}; pools trimmed {} times ({})",
            PoolName(index),
            b(ledger::pool(index).map_or(0, |pool| pool.committed())),
            device_effective::last_nvml_used(index)
                .map_or_else(|| "n/a".into(), |u| b(u).to_string()),
            b(device_effective::last_pools_cached(index)),
            b(device_effective::last_unseen(index)),
            trims,
            b(trimmed)
        );
    }
    let e = effective::host_effective();
    let _ = writeln!(
        o,
        "host effective budget: {} ({}); machine cap {}, unseen anonymous {}",
        b(e.bytes),
        effective::reason_name(e.reason),
        b(e.machine_cap),
        b(e.unseen_anon)
    );
    let _ = writeln!(o);
    let j = &r.jemalloc;
    let _ = writeln!(
        o,
        "jemalloc: allocated {}, active {}, resident {}, mapped {}, retained {}",
        b(j.allocated),
        b(j.active),
        b(j.resident),
        b(j.mapped),
        b(j.retained)
    );
    let _ = writeln!(
        o,
        "process:  rss {}, rss anon {}, rss peak {}",
        opt_bytes(r.process.map(|p| p.rss)),
        opt_bytes(r.process.map(|p| p.rss_anon)),
        opt_bytes(r.process.map(|p| p.rss_peak))
    );
    let _ = write!(
        o,
        "system:   total {}, available {}, reserve {}",
        opt_bytes(r.meminfo.map(|m| m.total)),
        opt_bytes(r.meminfo.map(|m| m.available)),
        b(effective::system_reserve_bytes())
    );
    match r.pressure {
        Some(p) => {
            let _ = write!(
                o,
                ", psi some {}.{:02}%/{}.{:02}% full {}.{:02}%/{}.{:02}% (avg10/avg60)",
                p.some_avg10 / 100,
                p.some_avg10 % 100,
                p.some_avg60 / 100,
                p.some_avg60 % 100,
                p.full_avg10 / 100,
                p.full_avg10 % 100,
                p.full_avg60 / 100,
                p.full_avg60 % 100
            );
        }
        None => o.push_str(", psi n/a"),
    }
    let _ = writeln!(
        o,
        ", cgroup max {} current {}",
        opt_bytes(r.cgroup_max),
        opt_bytes(r.cgroup_current)
    );
    let _ = writeln!(o);
    if r.purges.is_empty() {
        let _ = writeln!(o, "purges: none yet");
    } else {
        let _ = writeln!(o, "last purges (newest first):");
        for p in &r.purges {
            let _ = writeln!(
                o,
                "  {:>8} ms ago  {:<5} {:<10} at {:<8}  resident {} -> {}",
                r.now_ms.saturating_sub(p.at_ms),
                PoolName(p.pool as usize).to_string(),
                purges::purge_reason_name(p.reason),
                ledger::level_name(p.level),
                b(p.resident_before),
                b(p.resident_after)
            );
        }
    }
    let py = &r.python;
    let _ = writeln!(
        o,
        "runtime: python {} ({}): {} queued, {} run ({} by the nudge thread), {} errors, last gc collected {}, host {} -> {}, cuda cache emptied {}, app callbacks {}",
        if py.enabled { "on" } else { "off" },
        if py.detected { "detected" } else { "not detected" },
        py.queued,
        py.runs,
        py.nudge_thread_runs,
        py.errors,
        py.last_collected,
        b(py.last_host_before),
        b(py.last_host_after),
        py.cuda_cache_emptied,
        py.app_callback_runs
    );
    let arenas = &r.arenas;
    if arenas.installed {
        let _ = writeln!(
            o,
            "         pymalloc arenas counted: {} live, {} refused by the budget, {} past the table",
            arenas.live, arenas.refused, arenas.untracked
        );
    } else {
        let _ = writeln!(o, "         pymalloc arenas not counted");
    }
    let _ = writeln!(
        o,
        "         signal {}: raised {}, skipped (no handler) {}; C callbacks: {} registered, {} calls",
        signal_text(r.signal),
        r.signals_raised,
        r.signals_skipped,
        r.callbacks_registered,
        r.callback_calls
    );
    for p in &r.pools {
        let _ = writeln!(o);
        let name = PoolName(p.stats.pool as usize);
        if p.largest.is_empty() {
            let _ = writeln!(o, "largest live allocations ({name}): none tracked");
            continue;
        }
        let _ = writeln!(
            o,
            "largest live allocations ({name}; heap blocks of {} and more, driver allocations{}):",
            b(tracker::TRACK_MIN_BYTES),
            if p.untracked > 0 {
                format!("; {} went untracked, a table was full", p.untracked)
            } else {
                String::new()
            }
        );
        for block in &p.largest {
            let _ = writeln!(
                o,
                "  {:>11}  age {}.{:03} s  {}",
                b(block.size).to_string(),
                block.age_ms / 1000,
                block.age_ms % 1000,
                block.call
            );
            for &frame in &block.frames {
                let _ = writeln!(o, "      {}", symbolize(frame));
            }
        }
    }
    let _ = writeln!(o, "==== end of qvshim dump ====");
    o
}
