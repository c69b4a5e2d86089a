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
use crate::config::{BadValue, Settings};
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
/// `dump_path` is QVSHIM_DUMP_FILE as given; an empty one names no file and is reported here.
pub fn configure(settings: &Settings, host_budget: u64, dump_path: Option<&[u8]>) {
    let dump_path = match dump_path {
        Some([]) => {
            crate::log::write_error_always(format_args!(
                "{}",
                BadValue {
                    variable: "QVSHIM_DUMP_FILE",
                    value: b"",
                    reason: "empty, not a path",
                    default: "the log",
                }
            ));
            None
        }
        other => other.map(<[u8]>::to_vec),
    };
    let _ = CONFIG.set(Config {
        settings: *settings,
        host_budget,
        dump_path,
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

/// How long, in all, a dump written into a FIFO or character device may wait for its reader to
/// make room; past it the rest is dropped, so a reader that stops reading never holds the
/// monitor (or the exit path) for ever.
const DUMP_DEVICE_WAIT_MS: u64 = 1000;

/// Temporary names tried before giving up; each is random, so a second try only happens when
/// someone created that exact name (or getrandom failed and the fallback repeated itself).
const TEMP_NAME_ATTEMPTS: u32 = 8;

/// The mode of a dump file: it can hold code addresses (backtraces), so only its owner reads it.
const DUMP_FILE_MODE: libc::mode_t = 0o600;

/// What the dump path names, decided before anything is written.
enum Target {
    /// Nothing (`existed` false) or a regular file of this user: written beside it, renamed over.
    Replace { existed: bool },
    /// A character device or FIFO opened here (non-blocking), or one of the process's own
    /// descriptors named as `/dev/stderr`, `/dev/fd/N`, ...: written in place, never replaced.
    InPlace { fd: c_int, owned: bool },
    /// Not written: why, shown after the variable; the dump goes to the log instead.
    Refused(String),
}

fn errno() -> c_int {
    // SAFETY: __errno_location always returns this thread's valid errno slot.
    unsafe { *libc::__errno_location() }
}

/// The system's words for an errno value ("Permission denied").
fn os_error(code: c_int) -> String {
    let mut buf = [0u8; 128];
    // SAFETY: the buffer and its length are valid; the XSI strerror_r always NUL-terminates.
    unsafe { libc::strerror_r(code, buf.as_mut_ptr().cast(), buf.len()) };
    CStr::from_bytes_until_nul(&buf).map_or_else(
        |_| format!("errno {code}"),
        |s| s.to_string_lossy().into_owned(),
    )
}

/// The descriptor a path names when it is one of the process's own (`/dev/stdout`,
/// `/dev/stderr`, `/dev/fd/N`, `/proc/self/fd/N`). These are symlinks the system owns, and what
/// they lead to is whatever the descriptor is (a tty, a pipe, the log file): written to the
/// descriptor itself, like the log, so neither the link nor what it leads to is ever replaced.
fn own_descriptor(path: &[u8]) -> Option<c_int> {
    match path {
        b"/dev/stdout" => return Some(1),
        b"/dev/stderr" => return Some(2),
        _ => {}
    }
    let number = path
        .strip_prefix(b"/dev/fd/")
        .or_else(|| path.strip_prefix(b"/proc/self/fd/"))?;
    if number.is_empty() || number.len() > 9 || !number.iter().all(u8::is_ascii_digit) {
        return None;
    }
    core::str::from_utf8(number).ok()?.parse().ok()
}

/// Decides what to do with `path`. A symlink is never followed and never replaced; a regular
/// file is replaced only when it belongs to this user; a FIFO or character device is opened
/// non-blocking (never waiting for a reader) and checked to be the node examined.
fn examine(path: &CStr, raw: &[u8]) -> Target {
    if let Some(fd) = own_descriptor(raw) {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Target::Refused(format!("names descriptor {fd}, which is not open"));
        }
        return Target::InPlace { fd, owned: false };
    }
    // SAFETY: a zeroed stat is a valid out-buffer; path is NUL-terminated.
    let mut seen: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::lstat(path.as_ptr(), &mut seen) } != 0 {
        let e = errno();
        return if e == libc::ENOENT {
            Target::Replace { existed: false }
        } else {
            Target::Refused(format!("cannot be examined ({})", os_error(e)))
        };
    }
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    match seen.st_mode & libc::S_IFMT {
        libc::S_IFLNK => Target::Refused("is a symbolic link, never followed or replaced".into()),
        libc::S_IFDIR => Target::Refused("is a directory (name a file in it)".into()),
        libc::S_IFREG if seen.st_uid == uid => Target::Replace { existed: true },
        libc::S_IFREG => Target::Refused(format!(
            "belongs to uid {}, not to this process's uid {uid}; never written or replaced",
            seen.st_uid
        )),
        libc::S_IFCHR | libc::S_IFIFO => open_in_place(path, &seen),
        _ => Target::Refused("is neither a regular file, a character device nor a FIFO".into()),
    }
}

/// Opens the character device or FIFO `seen` describes for writing in place.
fn open_in_place(path: &CStr, seen: &libc::stat) -> Target {
    // SAFETY: path is NUL-terminated; the fd is closed by the caller or below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = errno();
        return Target::Refused(if e == libc::ENXIO {
            "is a FIFO with no reader".into()
        } else {
            format!("cannot be opened for writing ({})", os_error(e))
        });
    }
    // SAFETY: a zeroed stat is a valid out-buffer; fd is open.
    let mut opened: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    let same = unsafe { libc::fstat(fd, &mut opened) } == 0
        && opened.st_dev == seen.st_dev
        && opened.st_ino == seen.st_ino;
    if !same {
        // SAFETY: fd was opened above.
        unsafe { libc::close(fd) };
        return Target::Refused("changed while it was being opened".into());
    }
    Target::InPlace { fd, owned: true }
}

/// Writes all of `bytes` to a non-blocking descriptor, waiting for room at most
/// DUMP_DEVICE_WAIT_MS in all; false when it failed or the wait ran out.
fn write_without_blocking(fd: c_int, mut bytes: &[u8]) -> bool {
    let deadline_ms = monitor::now_ms() + DUMP_DEVICE_WAIT_MS;
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe a live slice for the duration of the call.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n >= 0 {
            bytes = bytes.get(n as usize..).unwrap_or(&[]);
            continue;
        }
        match errno() {
            libc::EINTR => continue,
            libc::EAGAIN => {
                let left_ms = deadline_ms.saturating_sub(monitor::now_ms());
                if left_ms == 0 {
                    return false;
                }
                let mut poll = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; the timeout is below DUMP_DEVICE_WAIT_MS.
                unsafe { libc::poll(&mut poll, 1, left_ms as c_int) };
            }
            _ => return false,
        }
    }
    true
}

/// 64 unpredictable bits for a temporary name: getrandom(2), called through syscall so the
/// library does not need a glibc that has the wrapper; the clock and the attempt number if it
/// fails (O_EXCL still keeps a planted name from being used, the name is only guessable then).
fn temp_suffix(attempt: u32) -> u64 {
    let mut value = 0u64;
    // SAFETY: the buffer is the 8 bytes of `value`.
    let got = unsafe {
        libc::syscall(
            libc::SYS_getrandom,
            (&mut value as *mut u64).cast::<libc::c_void>(),
            core::mem::size_of::<u64>(),
            libc::GRND_NONBLOCK,
        )
    };
    if got == core::mem::size_of::<u64>() as libc::c_long {
        return value;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64).rotate_left(32) ^ ts.tv_nsec as u64 ^ u64::from(attempt).rotate_left(48)
}

/// Creates a temporary file beside `path` (same directory, so the rename stays on one file
/// system): a random name, O_EXCL|O_NOFOLLOW (nothing planted there is opened), mode 0600.
fn create_temp(path: &[u8]) -> Result<(CString, c_int), String> {
    for attempt in 0..TEMP_NAME_ATTEMPTS {
        let mut name = path.to_vec();
        name.extend_from_slice(format!(".{:016x}.partial", temp_suffix(attempt)).as_bytes());
        let Ok(name) = CString::new(name) else {
            return Err("contains a NUL byte".into());
        };
        // SAFETY: name is NUL-terminated; the fd is closed by the caller.
        let fd = unsafe {
            libc::open(
                name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                DUMP_FILE_MODE as libc::c_uint,
            )
        };
        if fd >= 0 {
            return Ok((name, fd));
        }
        let e = errno();
        if e != libc::EEXIST {
            return Err(format!(
                "no temporary file can be created beside it ({})",
                os_error(e)
            ));
        }
    }
    Err("no unused temporary name was found beside it".into())
}

/// Moves the finished temporary file to `path`. When nothing was there, RENAME_NOREPLACE makes
/// sure nothing that appeared since (another user's file, a symlink) is replaced; a rename
/// never follows a symlink at its target.
fn move_into_place(temp: &CStr, path: &CStr, existed: bool) -> Result<(), String> {
    let rename = || {
        // SAFETY: both paths are NUL-terminated.
        unsafe { libc::rename(temp.as_ptr(), path.as_ptr()) }
    };
    let result = if existed {
        rename()
    } else {
        // SAFETY: both paths are NUL-terminated; AT_FDCWD makes them relative to the cwd.
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                temp.as_ptr(),
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        // Old kernels and some file systems do not know the flag: the plain rename then.
        if r != 0 && matches!(errno(), libc::EINVAL | libc::ENOSYS) {
            rename()
        } else {
            r as c_int
        }
    };
    if result == 0 {
        return Ok(());
    }
    Err(match errno() {
        libc::EEXIST => "appeared while the dump was written; left as it was".into(),
        e @ (libc::EPERM | libc::EACCES) => format!(
            "cannot be replaced ({}): in a sticky directory (like /tmp) only its owner may",
            os_error(e)
        ),
        e => format!("cannot be replaced ({})", os_error(e)),
    })
}

/// Writes `text` beside `path` and renames it over, so that a reader (or a process that ends
/// mid-write) never sees half a dump.
fn replace_with(path: &CStr, text: &[u8], existed: bool) -> Result<(), String> {
    let (temp, fd) = create_temp(path.to_bytes())?;
    let written = crate::log::write_all(fd, text);
    // SAFETY: fd was opened by create_temp.
    let closed = unsafe { libc::close(fd) } == 0;
    let result = if written && closed {
        move_into_place(&temp, path, existed)
    } else {
        Err("the temporary file beside it could not be written".into())
    };
    if result.is_err() {
        // SAFETY: temp is NUL-terminated; unlink never follows a symlink.
        unsafe { libc::unlink(temp.as_ptr()) };
    }
    result
}

/// Writes the dump the dump signal asked for, where the configuration says. Monitor thread, or
/// the exit path. Whatever stops the file from being written is one line naming
/// QVSHIM_DUMP_FILE, and the dump goes to the log instead.
pub fn write_requested_dump() {
    let Some(config) = CONFIG.get() else {
        return;
    };
    let json = config.settings.dump_json;
    let Some(pattern) = &config.dump_path else {
        write_dump(crate::log::fd(), json);
        return;
    };
    let path = expand_path(pattern, std::process::id());
    let shown = String::from_utf8_lossy(&path).into_owned();
    let text = render(json);
    let result = match CString::new(path.clone()) {
        Err(_) => Err("contains a NUL byte".to_string()),
        Ok(cpath) => match examine(&cpath, &path) {
            Target::Refused(why) => Err(why),
            Target::Replace { existed } => replace_with(&cpath, text.as_bytes(), existed),
            Target::InPlace { fd, owned } => {
                let whole = if owned {
                    write_without_blocking(fd, text.as_bytes())
                } else {
                    crate::log::write_all(fd, text.as_bytes())
                };
                if owned {
                    // SAFETY: fd was opened by open_in_place.
                    unsafe { libc::close(fd) };
                }
                if whole {
                    Ok(())
                } else {
                    Err(
                        "the write failed or its reader stopped reading; the dump is cut short"
                            .into(),
                    )
                }
            }
        },
    };
    match result {
        Ok(()) => qlog!(Info, "dump written to {shown}"),
        Err(why) => {
            qlog!(
                Error,
                "QVSHIM_DUMP_FILE=\"{shown}\": {why}; dump written to the log instead"
            );
            crate::log::write_all(crate::log::fd(), text.as_bytes());
        }
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

/// The signal whose handler is the shim's now (0: none, dumps by signal are off).
static DUMP_SIGNAL: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(0);
/// QVSHIM_DUMP_SIGNAL was set by the user: what becomes of it is said at WARN, not INFO.
static DUMP_SIGNAL_CHOSEN: AtomicBool = AtomicBool::new(false);

/// One line about the dump signal: a warning when the user chose it, else information (the
/// default signal being the program's own is nothing to warn about).
fn say_dump_signal(args: core::fmt::Arguments) {
    let level = if DUMP_SIGNAL_CHOSEN.load(Ordering::Relaxed) {
        crate::log::Level::Warn
    } else {
        crate::log::Level::Info
    };
    crate::log::write_line(level, args);
}

/// The handler the process has for `signal` now; None when it cannot be read.
fn current_handler(signal: i32) -> Option<usize> {
    // SAFETY: a zeroed sigaction is a valid out-value; a null new action only queries.
    let mut current: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: current is a valid out-pointer.
    (unsafe { libc::sigaction(signal, core::ptr::null(), &mut current) } == 0)
        .then_some(current.sa_sigaction)
}

fn dump_handler() -> usize {
    on_dump_signal as extern "C" fn(c_int) as usize
}

/// Installs the dump signal's handler, unless the program already ignores or handles the
/// signal: it is never taken from the program (an inherited SIG_IGN stays SIG_IGN). `chosen`:
/// QVSHIM_DUMP_SIGNAL was set. Called once at load.
pub fn install_dump_signal(signal: i32, chosen: bool) {
    use crate::config::SignalName;
    DUMP_SIGNAL_CHOSEN.store(chosen, Ordering::Relaxed);
    let name = SignalName(signal);
    match current_handler(signal) {
        Some(libc::SIG_DFL) => {}
        Some(libc::SIG_IGN) => {
            say_dump_signal(format_args!(
                "QVSHIM_DUMP_SIGNAL: signal {signal} ({name}) is ignored by the process and \
                 stays ignored; dumps by signal are off"
            ));
            return;
        }
        Some(_) => {
            say_dump_signal(format_args!(
                "QVSHIM_DUMP_SIGNAL: the program handles signal {signal} ({name}) itself and \
                 keeps it; dumps by signal are off"
            ));
            return;
        }
        None => {}
    }
    // SAFETY: a zeroed sigaction with a handler, an empty mask and SA_RESTART is valid;
    // on_dump_signal is async-signal-safe.
    let installed = unsafe {
        let mut action: libc::sigaction = core::mem::zeroed();
        action.sa_sigaction = dump_handler();
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, core::ptr::null_mut()) == 0
    };
    if installed {
        DUMP_SIGNAL.store(signal, Ordering::Relaxed);
    } else {
        crate::log::write_error_always(format_args!(
            "QVSHIM_DUMP_SIGNAL: the handler for signal {signal} ({name}) could not be \
             installed ({}); dumps by signal are off",
            std::io::Error::last_os_error()
        ));
    }
}

/// Notices, on the monitor thread, when the program installed its own action for the dump
/// signal after load: says so once and leaves the signal to the program (never takes it back).
pub fn check_dump_signal() {
    let signal = DUMP_SIGNAL.load(Ordering::Relaxed);
    if signal == 0 {
        return;
    }
    match current_handler(signal) {
        Some(handler) if handler != dump_handler() => {
            DUMP_SIGNAL.store(0, Ordering::Relaxed);
            let what = match handler {
                libc::SIG_IGN => "ignores",
                libc::SIG_DFL => "set the default action for",
                _ => "installed its own handler for",
            };
            say_dump_signal(format_args!(
                "QVSHIM_DUMP_SIGNAL: the program {what} signal {signal} ({}); qvshim leaves \
                 it to the program; dumps by signal are off",
                crate::config::SignalName(signal)
            ));
        }
        _ => {}
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
        crate::log::write_to_log(line.as_bytes());
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
    fn own_descriptor_names_are_recognised_and_nothing_else() {
        let cases: &[(&str, Option<c_int>)] = &[
            ("/dev/stdout", Some(1)),
            ("/dev/stderr", Some(2)),
            ("/dev/fd/7", Some(7)),
            ("/proc/self/fd/12", Some(12)),
            ("/dev/fd/", None),
            ("/dev/fd/1x", None),
            ("/dev/fd/-1", None),
            ("/dev/fd/9999999999", None),
            ("/dev/stderr2", None),
            ("/dev/null", None),
            ("/proc/1/fd/2", None),
            ("dev/stderr", None),
        ];
        for (path, want) in cases {
            assert_eq!(own_descriptor(path.as_bytes()), *want, "{path}");
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
