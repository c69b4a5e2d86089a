//! The diagnostic dump (text or one JSON object) and the one-line exit report.
//!
//! A dump is asked for by the dump signal (QVSHIM_DUMP_SIGNAL, default SIGUSR2), whose handler
//! only sets a flag and rings the monitor; the monitor thread gathers and writes it. The C API's
//! `qvshim_dump` writes one from the calling thread. The dump is built in a Rust `String`: the
//! shim's own allocations go straight to jemalloc, never through the exported malloc, so this
//! never touches the host's budget or its locks. Never runs inside an allocation or a handler.
//!
//! The JSON keys are a stable contract, documented in docs/DUMP.md: keys are only ever added.

use core::ffi::{c_int, CStr};
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, Ordering};
use std::ffi::CString;
use std::sync::OnceLock;

use crate::capi::{self, PoolStats};
use crate::config::Settings;
use crate::ledger::{self, LEVEL_NORMAL, UNLIMITED};
use crate::log::Bytes;
use crate::monitor::{self, PoolName, PurgeRecord, PURGE_HISTORY};
use crate::qlog;
use crate::runtime::{self, python};
use crate::system::{self, MemInfo, Pressure, ProcessMemory};
use crate::tracker::{self, LiveBlock, LARGEST_SHOWN};
use crate::{gpu, jemalloc};

/// Version of the dump's layout ("dump_version" in JSON); raised only when a key changes
/// meaning, which the stable contract forbids for version 1.
pub const DUMP_VERSION: u32 = 1;

/// What the dump shows of the configuration, fixed at load.
struct Config {
    settings: Settings,
    host_budget: u64,
    dump_path: Option<Vec<u8>>,
    started_ms: u64,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// Records the configuration, for the dump and the exit report. Called once at load.
pub fn configure(settings: &Settings, host_budget: u64, dump_path: Option<&[u8]>) {
    let _ = CONFIG.set(Config {
        settings: *settings,
        host_budget,
        dump_path: dump_path.map(<[u8]>::to_vec),
        started_ms: monitor::now_ms(),
    });
}

// ---------------------------------------------------------------------------------------------
// The largest live allocations: the heap's large blocks (tracker.rs) and the CUDA driver's
// allocations (gpu.rs: device memory for GPU pools, pinned host memory for the host pool).

/// One live allocation as the dump lists it.
struct Block {
    size: u64,
    age_ms: u64,
    /// What made it: "malloc" for the heap (the whole malloc family), else the driver call.
    call: &'static str,
    /// Return addresses, innermost first (heap blocks with QVSHIM_BACKTRACE=1 only).
    frames: Vec<usize>,
}

/// The largest live allocations of one pool, largest first, and how many large allocations
/// went untracked because a table was full.
fn largest(pool: usize) -> (Vec<Block>, u64) {
    let mut blocks = Vec::new();
    let mut untracked = 0;
    if pool == ledger::HOST {
        let table = tracker::host();
        let mut heap = [LiveBlock::default(); LARGEST_SHOWN];
        let n = table.largest(&mut heap);
        blocks.extend(heap.iter().take(n).map(|b| Block {
            size: b.size,
            age_ms: b.age_ms,
            call: "malloc",
            frames: b.frames().to_vec(),
        }));
        untracked += table.untracked();
    } else {
        untracked += gpu::untracked_allocations();
    }
    let mut driver = [gpu::LiveAllocation::default(); LARGEST_SHOWN];
    let n = gpu::largest_allocations(pool, &mut driver);
    blocks.extend(driver.iter().take(n).map(|a| Block {
        size: a.bytes,
        age_ms: a.age_ms,
        call: a.call,
        frames: Vec::new(),
    }));
    blocks.sort_by_key(|b| core::cmp::Reverse(b.size));
    blocks.truncate(LARGEST_SHOWN);
    (blocks, untracked)
}

// ---------------------------------------------------------------------------------------------
// Gathering.

struct PoolReport {
    stats: PoolStats,
    effective: Option<monitor::Effective>,
    largest: Vec<Block>,
    untracked: u64,
}

struct Report {
    pid: u32,
    uptime_ms: u64,
    level: u8,
    pools: Vec<PoolReport>,
    jemalloc: jemalloc::Stats,
    process: Option<ProcessMemory>,
    meminfo: Option<MemInfo>,
    pressure: Option<Pressure>,
    cgroup_max: Option<u64>,
    cgroup_current: Option<u64>,
    purges: Vec<PurgeRecord>,
    now_ms: u64,
    python: python::Stats,
    arenas: runtime::arena::Stats,
    signal: Option<i32>,
    signals_raised: u64,
    signals_skipped: u64,
    callbacks_registered: usize,
    callback_calls: u64,
}

fn gather() -> Report {
    let mut pools = Vec::new();
    for index in 0..ledger::pool_count() {
        let active = ledger::pool(index).is_some_and(|p| p.is_active());
        let Some(stats) = capi::pool_stats(index) else {
            continue;
        };
        if !active && index != ledger::HOST {
            continue;
        }
        let (largest, untracked) = largest(index);
        pools.push(PoolReport {
            stats,
            effective: (index == ledger::HOST).then(monitor::host_effective),
            largest,
            untracked,
        });
    }
    let level = pools
        .iter()
        .map(|p| p.stats.level as u8)
        .max()
        .unwrap_or(LEVEL_NORMAL);
    let mut purges = [PurgeRecord::default(); PURGE_HISTORY];
    let purge_count = monitor::recent_purges(&mut purges);
    let now_ms = monitor::now_ms();
    let (signals_raised, signals_skipped) = runtime::signal::counts();
    Report {
        pid: std::process::id(),
        uptime_ms: CONFIG
            .get()
            .map_or(0, |c| now_ms.saturating_sub(c.started_ms)),
        level,
        pools,
        jemalloc: jemalloc::stats(),
        process: system::process_memory(),
        meminfo: system::meminfo(),
        pressure: system::memory_pressure(),
        cgroup_max: system::cgroup_memory_max(),
        cgroup_current: system::cgroup_memory_current(),
        purges: purges.iter().take(purge_count).copied().collect(),
        now_ms,
        python: python::stats(),
        arenas: runtime::arena::stats(),
        signal: runtime::signal::configured(),
        signals_raised,
        signals_skipped,
        callbacks_registered: runtime::callbacks::registered(),
        callback_calls: runtime::callbacks::calls(),
    }
}

// ---------------------------------------------------------------------------------------------
// JSON.

/// A JSON value, built and then written; keys keep their insertion order.
enum J {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float2(u32),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(&'static str, J)>),
}

/// A byte count: null for "unlimited".
fn bytes_or_null(v: u64) -> J {
    if v == UNLIMITED {
        J::Null
    } else {
        J::UInt(v)
    }
}

fn opt(v: Option<u64>) -> J {
    v.map_or(J::Null, J::UInt)
}

fn write_json(out: &mut String, v: &J) {
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Int(i) => {
            let _ = write!(out, "{i}");
        }
        J::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        J::Float2(hundredths) => {
            let _ = write!(out, "{}.{:02}", hundredths / 100, hundredths % 100);
        }
        J::Str(s) => write_json_str(out, s),
        J::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(out, item);
            }
            out.push(']');
        }
        J::Obj(fields) => {
            out.push('{');
            for (i, (key, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_str(out, key);
                out.push(':');
                write_json(out, item);
            }
            out.push('}');
        }
    }
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn signal_json(signal: Option<i32>) -> J {
    signal.map_or(J::Null, |s| J::Int(s as i64))
}

fn config_json() -> J {
    let Some(c) = CONFIG.get() else {
        return J::Null;
    };
    let s = &c.settings;
    J::Obj(vec![
        ("budget", bytes_or_null(c.host_budget)),
        ("reserve", J::UInt(s.reserve_bytes)),
        ("warn_percent", J::UInt(s.warn_percent as u64)),
        ("critical_percent", J::UInt(s.critical_percent as u64)),
        ("interval_ms", J::UInt(s.interval_ms)),
        ("purge_interval_ms", J::UInt(s.purge_interval_ms)),
        ("system_reserve", J::UInt(s.system_reserve_bytes)),
        ("python", J::Bool(s.python)),
        ("signal", signal_json(s.notify_signal)),
        ("dump_signal", signal_json(s.dump_signal)),
        (
            "dump_format",
            J::Str(if s.dump_json { "json" } else { "text" }.into()),
        ),
        (
            "dump_file",
            c.dump_path
                .as_ref()
                .map_or(J::Null, |p| J::Str(String::from_utf8_lossy(p).into_owned())),
        ),
        ("backtrace", J::Bool(s.backtrace)),
        ("log_level", J::Str(s.log_level.name().to_ascii_lowercase())),
    ])
}

fn block_json(block: &Block) -> J {
    J::Obj(vec![
        ("size", J::UInt(block.size)),
        ("age_ms", J::UInt(block.age_ms)),
        ("call", J::Str(block.call.into())),
        (
            "backtrace",
            J::Arr(block.frames.iter().map(|&f| J::Str(symbolize(f))).collect()),
        ),
    ])
}

fn pool_json(p: &PoolReport) -> J {
    let s = &p.stats;
    J::Obj(vec![
        ("pool", J::Int(s.pool as i64)),
        ("name", J::Str(PoolName(s.pool as usize).to_string())),
        ("device", J::Int(s.device as i64)),
        (
            "device_memory",
            opt(usize::try_from(s.device).ok().and_then(gpu::device_memory)),
        ),
        ("level", J::Str(monitor::level_name(s.level as u8).into())),
        ("budget", bytes_or_null(s.budget)),
        ("effective_budget", bytes_or_null(s.effective_budget)),
        (
            "effective_reason",
            J::Str(
                p.effective
                    .map_or("budget", |e| monitor::reason_name(e.reason))
                    .into(),
            ),
        ),
        ("live", J::UInt(s.live)),
        ("peak", J::UInt(s.peak)),
        ("reserve", J::UInt(s.reserve)),
        ("reserve_in_use", J::UInt(s.reserve_in_use)),
        ("allocs", J::UInt(s.allocs)),
        ("frees", J::UInt(s.frees)),
        ("refusals", J::UInt(s.refusals)),
        ("largest_refused", J::UInt(s.largest_refused)),
        ("purges", J::UInt(s.purges)),
        ("level_changes", J::UInt(s.level_changes)),
        ("notifications", J::UInt(s.notifications)),
        (
            "largest",
            J::Arr(p.largest.iter().map(block_json).collect()),
        ),
        ("untracked_large", J::UInt(p.untracked)),
    ])
}

fn report_json(r: &Report) -> J {
    let host_effective = monitor::host_effective();
    J::Obj(vec![
        ("dump_version", J::UInt(DUMP_VERSION as u64)),
        ("version", J::Str(env!("CARGO_PKG_VERSION").into())),
        ("pid", J::UInt(r.pid as u64)),
        ("uptime_ms", J::UInt(r.uptime_ms)),
        ("level", J::Str(monitor::level_name(r.level).into())),
        ("config", config_json()),
        ("pools", J::Arr(r.pools.iter().map(pool_json).collect())),
        (
            "jemalloc",
            J::Obj(vec![
                ("allocated", J::UInt(r.jemalloc.allocated)),
                ("active", J::UInt(r.jemalloc.active)),
                ("resident", J::UInt(r.jemalloc.resident)),
                ("mapped", J::UInt(r.jemalloc.mapped)),
                ("retained", J::UInt(r.jemalloc.retained)),
            ]),
        ),
        (
            "process",
            J::Obj(vec![
                ("rss", opt(r.process.map(|p| p.rss))),
                ("rss_anon", opt(r.process.map(|p| p.rss_anon))),
                ("rss_peak", opt(r.process.map(|p| p.rss_peak))),
            ]),
        ),
        (
            "system",
            J::Obj(vec![
                ("mem_total", opt(r.meminfo.map(|m| m.total))),
                ("mem_available", opt(r.meminfo.map(|m| m.available))),
                ("system_reserve", J::UInt(monitor::system_reserve_bytes())),
                ("machine_cap", bytes_or_null(host_effective.machine_cap)),
                ("unseen_anon", J::UInt(host_effective.unseen_anon)),
                (
                    "psi",
                    r.pressure.map_or(J::Null, |p| {
                        J::Obj(vec![
                            ("some_avg10", J::Float2(p.some_avg10)),
                            ("some_avg60", J::Float2(p.some_avg60)),
                            ("full_avg10", J::Float2(p.full_avg10)),
                            ("full_avg60", J::Float2(p.full_avg60)),
                        ])
                    }),
                ),
                (
                    "cgroup",
                    if r.cgroup_max.is_none() && r.cgroup_current.is_none() {
                        J::Null
                    } else {
                        J::Obj(vec![
                            ("memory_max", opt(r.cgroup_max)),
                            ("memory_current", opt(r.cgroup_current)),
                        ])
                    },
                ),
            ]),
        ),
        (
            "purges",
            J::Arr(
                r.purges
                    .iter()
                    .map(|p| {
                        J::Obj(vec![
                            ("age_ms", J::UInt(r.now_ms.saturating_sub(p.at_ms))),
                            ("pool", J::UInt(p.pool as u64)),
                            (
                                "reason",
                                J::Str(monitor::purge_reason_name(p.reason).into()),
                            ),
                            ("level", J::Str(monitor::level_name(p.level).into())),
                            ("resident_before", J::UInt(p.resident_before)),
                            ("resident_after", J::UInt(p.resident_after)),
                        ])
                    })
                    .collect(),
            ),
        ),
        (
            "runtime",
            J::Obj(vec![
                (
                    "python",
                    J::Obj(vec![
                        ("enabled", J::Bool(r.python.enabled)),
                        ("detected", J::Bool(r.python.detected)),
                        ("queued", J::UInt(r.python.queued)),
                        ("runs", J::UInt(r.python.runs)),
                        ("nudge_thread_runs", J::UInt(r.python.nudge_thread_runs)),
                        ("errors", J::UInt(r.python.errors)),
                        ("cuda_cache_emptied", J::UInt(r.python.cuda_cache_emptied)),
                        ("app_callback_runs", J::UInt(r.python.app_callback_runs)),
                        ("last_collected", J::Int(r.python.last_collected)),
                        ("last_host_before", J::UInt(r.python.last_host_before)),
                        ("last_host_after", J::UInt(r.python.last_host_after)),
                        ("fruitless", J::UInt(r.python.fruitless)),
                        ("backed_off", J::UInt(r.python.backed_off)),
                        ("arenas_counted", J::Bool(r.arenas.installed)),
                        ("arenas_live", J::UInt(r.arenas.live)),
                        ("arenas_refused", J::UInt(r.arenas.refused)),
                        ("arenas_untracked", J::UInt(r.arenas.untracked)),
                    ]),
                ),
                (
                    "signal",
                    J::Obj(vec![
                        ("signal", signal_json(r.signal)),
                        ("raised", J::UInt(r.signals_raised)),
                        ("skipped_no_handler", J::UInt(r.signals_skipped)),
                    ]),
                ),
                (
                    "callbacks",
                    J::Obj(vec![
                        ("registered", J::UInt(r.callbacks_registered as u64)),
                        ("calls", J::UInt(r.callback_calls)),
                    ]),
                ),
            ]),
        ),
    ])
}

/// "0x7f.. symbol+0x1c (libfoo.so.1)", as much of it as dladdr knows.
fn symbolize(address: usize) -> String {
    let mut s = format!("{address:#x}");
    // SAFETY: a zeroed Dl_info is a valid out-value.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // A return address points past the call: look up the byte before it.
    // SAFETY: dladdr only reads the loader's tables; info is a valid out-pointer.
    if unsafe {
        libc::dladdr(
            (address.saturating_sub(1)) as *const libc::c_void,
            &mut info,
        )
    } == 0
    {
        return s;
    }
    if !info.dli_sname.is_null() {
        // SAFETY: dladdr's names are NUL-terminated strings owned by the loader.
        let name = unsafe { CStr::from_ptr(info.dli_sname) }.to_string_lossy();
        let _ = write!(
            s,
            " {}+{:#x}",
            name,
            address.saturating_sub(info.dli_saddr as usize)
        );
    }
    if !info.dli_fname.is_null() {
        // SAFETY: as above.
        let file = unsafe { CStr::from_ptr(info.dli_fname) }.to_string_lossy();
        let base = file.rsplit('/').next().unwrap_or("");
        let _ = write!(s, " ({base})");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Text.

fn b(v: u64) -> Bytes {
    Bytes(v)
}

fn opt_bytes(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| Bytes(v).to_string())
}

fn signal_text(signal: Option<i32>) -> String {
    match signal {
        None => "off".into(),
        Some(s) => match crate::config::signal_name(s) {
            Some(name) => format!("SIG{name} ({s})"),
            None => s.to_string(),
        },
    }
}

fn report_text(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "==== qvshim {} dump: pid {}, up {}.{:03} s, level {} ====",
        env!("CARGO_PKG_VERSION"),
        r.pid,
        r.uptime_ms / 1000,
        r.uptime_ms % 1000,
        monitor::level_name(r.level)
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
            monitor::level_name(s.level as u8),
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
    let e = monitor::host_effective();
    let _ = writeln!(
        o,
        "host effective budget: {} ({}); machine cap {}, unseen anonymous {}",
        b(e.bytes),
        monitor::reason_name(e.reason),
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
        b(monitor::system_reserve_bytes())
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
                monitor::purge_reason_name(p.reason),
                monitor::level_name(p.level),
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

// ---------------------------------------------------------------------------------------------
// Writing.

/// The dump as text or as one JSON object (with a trailing newline).
pub fn render(json: bool) -> String {
    let report = gather();
    if json {
        let mut out = String::new();
        write_json(&mut out, &report_json(&report));
        out.push('\n');
        out
    } else {
        report_text(&report)
    }
}

/// Writes a dump to `fd`; false when the write failed.
pub fn write_dump(fd: c_int, json: bool) -> bool {
    crate::log::write_all(fd, render(json).as_bytes())
}

/// QVSHIM_DUMP_FILE with `%p` replaced by the pid (and `%%` by `%`).
pub fn expand_path(pattern: &[u8], pid: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(pattern.len() + 8);
    let mut bytes = pattern.iter();
    while let Some(&c) = bytes.next() {
        if c != b'%' {
            out.push(c);
            continue;
        }
        match bytes.next() {
            Some(b'p') => out.extend_from_slice(pid.to_string().as_bytes()),
            Some(b'%') => out.push(b'%'),
            Some(&other) => out.extend_from_slice(&[b'%', other]),
            None => out.push(b'%'),
        }
    }
    out
}

/// Writes the dump the dump signal asked for, where the configuration says. Monitor thread, or
/// the exit path.
pub fn write_requested_dump() {
    let Some(config) = CONFIG.get() else {
        return;
    };
    let json = config.settings.dump_json;
    let Some(pattern) = &config.dump_path else {
        write_dump(crate::log::fd(), json);
        return;
    };
    let pid = std::process::id();
    let path = expand_path(pattern, pid);
    let shown = String::from_utf8_lossy(&path).into_owned();
    // Written beside the file and renamed over it, so that a reader (or a process that ends
    // mid-write) never sees half a dump.
    let mut partial = path.clone();
    partial.extend_from_slice(format!(".{pid}.partial").as_bytes());
    let (Ok(path), Ok(partial)) = (CString::new(path), CString::new(partial)) else {
        qlog!(
            Error,
            "QVSHIM_DUMP_FILE contains a NUL byte; dump not written"
        );
        return;
    };
    // SAFETY: partial is NUL-terminated; the fd is closed below.
    let fd = unsafe {
        libc::open(
            partial.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        qlog!(
            Error,
            "cannot create dump file {shown}; dump written to the log instead"
        );
        write_dump(crate::log::fd(), json);
        return;
    }
    let written = write_dump(fd, json);
    // SAFETY: fd was opened above.
    let closed = unsafe { libc::close(fd) } == 0;
    // SAFETY: both paths are NUL-terminated.
    let renamed =
        written && closed && unsafe { libc::rename(partial.as_ptr(), path.as_ptr()) } == 0;
    if renamed {
        qlog!(Info, "dump written to {shown}");
    } else {
        // SAFETY: partial is NUL-terminated.
        unsafe { libc::unlink(partial.as_ptr()) };
        qlog!(Error, "writing the dump to {shown} failed");
    }
}

/// The dump signal's handler: a flag and the doorbell, nothing else (errno preserved).
extern "C" fn on_dump_signal(_signal: c_int) {
    // SAFETY: __errno_location is async-signal-safe and returns this thread's errno.
    let errno = unsafe { *libc::__errno_location() };
    monitor::request_dump();
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Installs the dump signal's handler. Called once at load.
pub fn install_dump_signal(signal: i32) {
    // SAFETY: a zeroed sigaction with a handler, an empty mask and SA_RESTART is valid;
    // on_dump_signal is async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = core::mem::zeroed();
        action.sa_sigaction = on_dump_signal as extern "C" fn(c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, core::ptr::null_mut()) != 0 {
            qlog!(
                Error,
                "could not install the dump handler for signal {signal}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The exit report.

/// One line: each pool's peak against its budget, then refusals, purges, notifications.
pub fn exit_line() -> String {
    let mut line = format!("exit pid {}:", std::process::id());
    let (mut refusals, mut largest, mut purges, mut told) = (0u64, 0u64, 0u64, 0u64);
    let mut first = true;
    for index in 0..ledger::pool_count() {
        let Some(s) = capi::pool_stats(index) else {
            continue;
        };
        let active = ledger::pool(index).is_some_and(|p| p.is_active());
        if !active && index != ledger::HOST {
            continue;
        }
        let _ = write!(
            line,
            "{} {} peak {} of budget {}",
            if first { "" } else { ";" },
            PoolName(index),
            b(s.peak),
            b(s.budget)
        );
        if s.budget != UNLIMITED {
            let _ = write!(line, " ({}%)", monitor::percent(s.peak, s.budget));
        }
        first = false;
        refusals += s.refusals;
        largest = largest.max(s.largest_refused);
        purges += s.purges;
        told += s.notifications;
    }
    let _ = write!(line, "; {refusals} refusals");
    if refusals > 0 {
        let _ = write!(line, " (largest {})", b(largest));
    }
    let _ = write!(line, ", {purges} purges, {told} notifications");
    line
}

static EXIT_REPORTED: AtomicBool = AtomicBool::new(false);

/// Writes the exit line, once per process (CPython's finalization and atexit both call this).
pub fn report_exit_once() {
    monitor::finish_requested_dump();
    // Written past the log's rate limit: a busy last second must not swallow the summary.
    if !EXIT_REPORTED.swap(true, Ordering::AcqRel) && crate::log::enabled(crate::log::Level::Info) {
        let line = format!("[qvshim] INFO {}\n", exit_line());
        crate::log::write_all(crate::log::fd(), line.as_bytes());
    }
}

/// A fork child reports its own exit.
pub fn after_fork_child() {
    EXIT_REPORTED.store(false, Ordering::Relaxed);
}

extern "C" fn at_exit() {
    report_exit_once();
}

/// Registers the exit report. Called once at load.
pub fn install_exit_report() {
    // SAFETY: at_exit is a plain extern "C" function with no arguments.
    unsafe { libc::atexit(at_exit) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_path_expands_pid_and_percent() {
        let cases: &[(&str, &str)] = &[
            ("/tmp/dump-%p.json", "/tmp/dump-42.json"),
            ("/tmp/100%%-%p", "/tmp/100%-42"),
            ("/tmp/plain", "/tmp/plain"),
            ("/tmp/x%", "/tmp/x%"),
            ("/tmp/%q", "/tmp/%q"),
        ];
        for (pattern, want) in cases {
            assert_eq!(
                expand_path(pattern.as_bytes(), 42),
                want.as_bytes(),
                "{pattern}"
            );
        }
    }

    #[test]
    fn json_strings_are_escaped_and_values_written() {
        let mut out = String::new();
        write_json(
            &mut out,
            &J::Obj(vec![
                ("s", J::Str("a\"b\\c\n\u{1}".into())),
                ("n", J::Null),
                ("f", J::Float2(1205)),
                ("a", J::Arr(vec![J::Bool(true), J::Int(-1), J::UInt(7)])),
            ]),
        );
        assert_eq!(
            out,
            r#"{"s":"a\"b\\c\n\u0001","n":null,"f":12.05,"a":[true,-1,7]}"#
        );
    }
}
