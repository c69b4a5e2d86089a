//! The dump as one JSON object: a small encoder (`J`, `write_json`) and the stable keys of
//! docs/DUMP.md (keys are only ever added). Symbol names of backtrace frames come from dladdr.

use core::ffi::CStr;
use core::fmt::Write as _;

use crate::gpu;
use crate::ledger::device_effective;
use crate::ledger::effective::{self};
use crate::ledger::purges::{self};
use crate::ledger::PoolName;
use crate::ledger::{self, UNLIMITED};

use super::report::{Block, PoolReport, Report};
use super::report::{CONFIG, DUMP_VERSION};

/// A JSON value, built and then written; keys keep their insertion order.
pub(super) enum J {
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
pub(super) fn bytes_or_null(v: u64) -> J {
    if v == UNLIMITED {
        J::Null
    } else {
        J::UInt(v)
    }
}

pub(super) fn opt(v: Option<u64>) -> J {
    v.map_or(J::Null, J::UInt)
}

pub(super) fn write_json(out: &mut String, v: &J) {
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

pub(super) fn write_json_str(out: &mut String, s: &str) {
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

pub(super) fn signal_json(signal: Option<i32>) -> J {
    signal.map_or(J::Null, |s| J::Int(s as i64))
}

pub(super) fn config_json() -> J {
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

pub(super) fn block_json(block: &Block) -> J {
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

pub(super) fn pool_json(p: &PoolReport) -> J {
    let s = &p.stats;
    let mut object = J::Obj(vec![
        ("pool", J::Int(s.pool as i64)),
        ("name", J::Str(PoolName(s.pool as usize).to_string())),
        ("device", J::Int(s.device as i64)),
        (
            "device_memory",
            opt(usize::try_from(s.device).ok().and_then(gpu::device_memory)),
        ),
        ("level", J::Str(ledger::level_name(s.level as u8).into())),
        ("budget", bytes_or_null(s.budget)),
        ("effective_budget", bytes_or_null(s.effective_budget)),
        (
            "effective_reason",
            J::Str(
                p.effective
                    .map_or(
                        // A GPU pool's budget is lowered only by what the device holds unseen.
                        if s.effective_budget < s.budget {
                            "unseen_device"
                        } else {
                            "budget"
                        },
                        |e| effective::reason_name(e.reason),
                    )
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
    ]);
    if s.pool as usize != ledger::HOST {
        if let J::Obj(fields) = &mut object {
            fields.extend(device_fields(s.pool as usize));
        }
    }
    object
}

/// A GPU pool's device figures: what the ledger counts, what NVML shows for the process, what
/// the memory pools keep, and what is unseen (the larger of NVML past the count and the
/// pools' cache; the effective budget is the budget less it).
fn device_fields(index: usize) -> Vec<(&'static str, J)> {
    let (trims, trimmed) = gpu::mempools::trims(index);
    let nvml_error = gpu::nvml::device_error(index - 1);
    vec![
        (
            "counted",
            J::UInt(ledger::pool(index).map_or(0, |p| p.committed())),
        ),
        ("nvml_used", opt(device_effective::last_nvml_used(index))),
        (
            "nvml_error",
            if nvml_error == gpu::nvml::ERROR_NONE {
                J::Null
            } else {
                J::Int(nvml_error as i64)
            },
        ),
        (
            "pools_cached",
            J::UInt(device_effective::last_pools_cached(index)),
        ),
        ("unseen", J::UInt(device_effective::last_unseen(index))),
        ("pool_trims", J::UInt(trims)),
        ("pool_trimmed", J::UInt(trimmed)),
    ]
}

/// NVML's state: "unused" until the monitor first reads a GPU, then "ready" (with the form of
/// the process list used), "missing", "init_failed" (with nvmlInit's code) or "no_function".
fn nvml_json() -> J {
    let (state, detail) = gpu::nvml::state();
    J::Obj(vec![
        ("state", J::Str(gpu::nvml::state_name(state).into())),
        (
            "processes_version",
            if state == gpu::nvml::STATE_READY {
                J::Int(detail as i64)
            } else {
                J::Null
            },
        ),
        (
            "init_error",
            if state == gpu::nvml::STATE_INIT_FAILED {
                J::Int(detail as i64)
            } else {
                J::Null
            },
        ),
    ])
}

pub(super) fn report_json(r: &Report) -> J {
    let host_effective = effective::host_effective();
    J::Obj(vec![
        ("dump_version", J::UInt(DUMP_VERSION as u64)),
        ("version", J::Str(env!("CARGO_PKG_VERSION").into())),
        ("pid", J::UInt(r.pid as u64)),
        ("uptime_ms", J::UInt(r.uptime_ms)),
        ("level", J::Str(ledger::level_name(r.level).into())),
        ("config", config_json()),
        ("pools", J::Arr(r.pools.iter().map(pool_json).collect())),
        ("nvml", nvml_json()),
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
                ("system_reserve", J::UInt(effective::system_reserve_bytes())),
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
                            ("reason", J::Str(purges::purge_reason_name(p.reason).into())),
                            ("level", J::Str(ledger::level_name(p.level).into())),
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
pub(super) fn symbolize(address: usize) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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
