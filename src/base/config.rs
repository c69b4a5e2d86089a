//! The environment, read once at load: parsing of every `QVSHIM_*` variable, and one clear line
//! for each bad value.
//!
//! Parsing is pure (no environment, no I/O) so that it is tested in a table; [`Settings::load`]
//! is the one place that reads the environment. Nothing here ever fails the host program: a bad
//! value is reported as `[qvshim] ERROR QVSHIM_X="value": why; using default D` and the default
//! is used.
//!
//! Each value's parser is in [`values`]; this file holds the defaults, [`Settings`] and how
//! they are loaded, and how a budget is resolved against the machine: about 350 lines of code,
//! followed by its tables of whole-environment cases (the other half of the file).

pub mod values;

use core::fmt;

use crate::base::log::Level;

pub use values::*;

pub const DEFAULT_BUDGET_BYTES: u64 = 6 << 30;
pub const DEFAULT_RESERVE_BYTES: u64 = 64 << 20;
pub const DEFAULT_WARN_PERCENT: u8 = 70;
pub const DEFAULT_CRITICAL_PERCENT: u8 = 90;
/// `QVSHIM_GPU_BUDGET`'s default: this share of each device's memory.
pub const DEFAULT_GPU_BUDGET_PERCENT: f64 = 90.0;
/// In a memory cgroup, the default budget leaves this much of the cgroup's limit (besides the
/// reserve) to what the ledger does not count: the interpreter's code and stacks, jemalloc's
/// metadata and dirty pages, and the page cache the cgroup is charged for...
pub const CGROUP_HEADROOM_MIN_BYTES: u64 = 128 << 20;
/// ...or this fraction of the limit (1/8), when that is more: a large program's libraries
/// (PyTorch's are over a GiB on disk) grow with the container it is given.
pub const CGROUP_HEADROOM_DIVISOR: u64 = 8;
pub const DEFAULT_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_PURGE_INTERVAL_MS: u64 = 30_000;
/// Memory left to the rest of the machine: the effective budget shrinks so that the process
/// never takes the machine's MemAvailable below this.
pub const DEFAULT_SYSTEM_RESERVE_BYTES: u64 = 512 << 20;
/// Silent by default: only what warrants a warning (a bad value, a refusal, a level reached)
/// reaches stderr; the start and exit lines are asked for with QVSHIM_LOG=info.
pub const DEFAULT_LOG_LEVEL: Level = Level::Warn;
/// A log file was asked for, so it gets the start and exit lines unless QVSHIM_LOG says otherwise.
pub const DEFAULT_LOG_FILE_LEVEL: Level = Level::Info;
/// How the default log level is named in a bad value's line.
const DEFAULT_LOG_LEVEL_TEXT: &str = "warn (info with QVSHIM_LOG_FILE)";

/// Every setting, parsed; defaults where the environment said nothing or something bad.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    pub budget: BudgetSpec,
    /// Whether QVSHIM_BUDGET gave the budget (a bad value leaves the default, and this false):
    /// only the default follows a cgroup's limit.
    pub budget_from_env: bool,
    /// Per CUDA device; a percentage is of that device's memory.
    pub gpu_budget: BudgetSpec,
    pub reserve_bytes: u64,
    pub warn_percent: u8,
    pub critical_percent: u8,
    pub log_level: Level,
    /// QVSHIM_LOG named a level; otherwise the default depends on where the log goes.
    pub log_level_chosen: bool,
    /// QVSHIM_INTERVAL: how often the monitor reads the machine at the normal level.
    pub interval_ms: u64,
    /// QVSHIM_PURGE_INTERVAL: how often purges repeat while a pool is above normal.
    pub purge_interval_ms: u64,
    pub system_reserve_bytes: u64,
    /// QVSHIM_PYTHON: tell a CPython runtime to collect.
    pub python: bool,
    /// QVSHIM_SIGNAL: a signal raised to the process on each level rise.
    pub notify_signal: Option<i32>,
    /// QVSHIM_DUMP_SIGNAL: the signal that asks for the diagnostic dump.
    pub dump_signal: Option<i32>,
    /// QVSHIM_DUMP_FORMAT=json.
    pub dump_json: bool,
    /// QVSHIM_BACKTRACE: native backtraces of the largest live allocations.
    pub backtrace: bool,
    /// QVSHIM_PUBLISH: publish the counters file `qvshim status` reads (docs/MONITOR.md).
    pub publish: bool,
    /// QVSHIM_SCOPE=tree: share one budget with the process tree (docs/TREE.md).
    pub tree: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            budget: BudgetSpec::Bytes(DEFAULT_BUDGET_BYTES),
            budget_from_env: false,
            gpu_budget: BudgetSpec::PercentOfMemory(DEFAULT_GPU_BUDGET_PERCENT),
            reserve_bytes: DEFAULT_RESERVE_BYTES,
            warn_percent: DEFAULT_WARN_PERCENT,
            critical_percent: DEFAULT_CRITICAL_PERCENT,
            log_level: DEFAULT_LOG_LEVEL,
            log_level_chosen: false,
            interval_ms: DEFAULT_INTERVAL_MS,
            purge_interval_ms: DEFAULT_PURGE_INTERVAL_MS,
            system_reserve_bytes: DEFAULT_SYSTEM_RESERVE_BYTES,
            python: true,
            notify_signal: None,
            dump_signal: Some(libc::SIGUSR2),
            dump_json: false,
            backtrace: false,
            publish: true,
            tree: false,
        }
    }
}

/// One bad value, ready to be printed as a line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BadValue<'a> {
    pub variable: &'static str,
    pub value: &'a [u8],
    pub reason: &'static str,
    pub default: &'static str,
}

/// A bad value longer than this is shown by its first this many bytes and its length, so that
/// the line always fits a log line and still names the default.
pub const BAD_VALUE_SHOWN_MAX_BYTES: usize = 200;

impl fmt::Display for BadValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self
            .value
            .get(..BAD_VALUE_SHOWN_MAX_BYTES)
            .unwrap_or(self.value);
        write!(f, "{}=\"{}\"", self.variable, Printable(shown))?;
        if shown.len() < self.value.len() {
            write!(f, "... ({} bytes)", self.value.len())?;
        }
        write!(f, ": {}; using default {}", self.reason, self.default)
    }
}

/// Shows raw environment bytes, with anything not printable ASCII as `?`.
pub struct Printable<'a>(pub &'a [u8]);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            let c = if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            };
            fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

impl Settings {
    /// Parses every variable through `lookup` (name -> raw value), passing each bad value to
    /// `report` and using the default for it.
    pub fn load<'a>(
        lookup: impl Fn(&str) -> Option<&'a [u8]>,
        mut report: impl FnMut(BadValue<'a>),
    ) -> Settings {
        let mut s = Settings::default();
        let read = |variable: &'static str, default: &'static str| {
            lookup(variable).map(|value| {
                let bad = move |reason| BadValue {
                    variable,
                    value,
                    reason,
                    default,
                };
                (value, bad)
            })
        };

        if let Some((value, bad)) = read("QVSHIM_LOG", DEFAULT_LOG_LEVEL_TEXT) {
            match parse_log_level(value) {
                Ok(level) => (s.log_level, s.log_level_chosen) = (level, true),
                Err(reason) => report(bad(reason)),
            }
        }
        if let Some((value, bad)) = read("QVSHIM_BUDGET", "6G") {
            match parse_budget(value) {
                Ok(budget) => (s.budget, s.budget_from_env) = (budget, true),
                Err(reason) => report(bad(reason)),
            }
        }
        if let Some((value, bad)) = read("QVSHIM_GPU_BUDGET", "90%") {
            match parse_budget(value) {
                Ok(budget) => s.gpu_budget = budget,
                Err(reason) => report(bad(reason)),
            }
        }
        if let Some((value, bad)) = read("QVSHIM_RESERVE", "64M") {
            match parse_size(value) {
                Ok(bytes) => s.reserve_bytes = bytes,
                Err(reason) => report(bad(reason)),
            }
        }
        if let Some((value, bad)) = read("QVSHIM_INTERVAL", "1s") {
            match parse_interval_ms(value) {
                Ok(ms) => s.interval_ms = ms,
                Err(reason) => report(bad(reason)),
            }
        }
        if let Some((value, bad)) = read("QVSHIM_PURGE_INTERVAL", "30s") {
            match parse_interval_ms(value) {
                Ok(ms) => s.purge_interval_ms = ms,
                Err(reason) => report(bad(reason)),
            }
        }
        if let Some((value, bad)) = read("QVSHIM_SYSTEM_RESERVE", "512M") {
            match parse_size(value) {
                Ok(bytes) => s.system_reserve_bytes = bytes,
                Err(reason) => report(bad(reason)),
            }
        }
        if let Some((value, bad)) = read("QVSHIM_PYTHON", "on") {
            match parse_switch(value) {
                Ok(on) => s.python = on,
                Err(reason) => report(bad(reason)),
            }
        }
        let notify_signal = read("QVSHIM_SIGNAL", "off");
        if let Some((value, bad)) = notify_signal {
            match parse_signal(value) {
                Ok(signal) => s.notify_signal = signal,
                Err(reason) => report(bad(reason)),
            }
        }
        if let Some((value, bad)) = read("QVSHIM_DUMP_SIGNAL", "USR2") {
            match parse_signal(value) {
                Ok(signal) => s.dump_signal = signal,
                Err(reason) => report(bad(reason)),
            }
        }
        // Every level change would otherwise write a dump.
        if s.notify_signal.is_some() && s.notify_signal == s.dump_signal {
            if let Some((_, bad)) = notify_signal {
                report(bad(
                    "the same signal as QVSHIM_DUMP_SIGNAL, which asks for the dump",
                ));
            }
            s.notify_signal = None;
        }
        if let Some((value, bad)) = read("QVSHIM_DUMP_FORMAT", "text") {
            match parse_dump_format(value) {
                Ok(json) => s.dump_json = json,
                Err(reason) => report(bad(reason)),
            }
        }
        if let Some((value, bad)) = read("QVSHIM_SCOPE", "process") {
            match parse_scope(value) {
                Ok(tree) => s.tree = tree,
                Err(reason) => report(bad(reason)),
            }
        }
        if let Some((value, bad)) = read("QVSHIM_BACKTRACE", "0") {
            match parse_switch(value) {
                Ok(on) => s.backtrace = on,
                Err(reason) => report(bad(reason)),
            }
        }
        if let Some((value, bad)) = read("QVSHIM_PUBLISH", "on") {
            match parse_switch(value) {
                Ok(on) => s.publish = on,
                Err(reason) => report(bad(reason)),
            }
        }
        let warn = read("QVSHIM_WARN", "70");
        let critical = read("QVSHIM_CRITICAL", "90");
        let mut warn_set = false;
        let mut critical_set = false;
        if let Some((value, bad)) = warn {
            match parse_level_percent(value) {
                Ok(p) => (s.warn_percent, warn_set) = (p, true),
                Err(reason) => report(bad(reason)),
            }
        }
        if let Some((value, bad)) = critical {
            match parse_level_percent(value) {
                Ok(p) => (s.critical_percent, critical_set) = (p, true),
                Err(reason) => report(bad(reason)),
            }
        }
        if s.warn_percent >= s.critical_percent {
            match (warn, critical) {
                (Some((_, bad)), _) if warn_set => report(bad("not below QVSHIM_CRITICAL")),
                (_, Some((_, bad))) if critical_set => report(bad("not above QVSHIM_WARN")),
                _ => {}
            }
            s.warn_percent = DEFAULT_WARN_PERCENT;
            s.critical_percent = DEFAULT_CRITICAL_PERCENT;
        }
        s
    }
}

/// Resolves a budget spec to bytes (`u64::MAX` for off) against the memory the process may use;
/// a percentage is never below [`MIN_BUDGET_BYTES`].
pub fn resolve_budget(spec: BudgetSpec, memory_bytes: u64) -> u64 {
    resolve_percent(spec, memory_bytes).0
}

/// [`resolve_budget`], and what a percentage came to before it was raised to the minimum
/// (None when it was not).
fn resolve_percent(spec: BudgetSpec, memory_bytes: u64) -> (u64, Option<u64>) {
    match spec {
        BudgetSpec::Bytes(b) => (b, None),
        BudgetSpec::PercentOfMemory(p) => {
            let bytes = ((memory_bytes as f64) * p / 100.0) as u64;
            if bytes < MIN_BUDGET_BYTES {
                (MIN_BUDGET_BYTES, Some(bytes))
            } else {
                (bytes, None)
            }
        }
        BudgetSpec::Off => (u64::MAX, None),
    }
}

/// The default host budget: [`DEFAULT_BUDGET_BYTES`], or in a memory cgroup whose limit is
/// lower, the limit less the reserve and the headroom (the larger of
/// [`CGROUP_HEADROOM_MIN_BYTES`] and 1/[`CGROUP_HEADROOM_DIVISOR`] of the limit), never below
/// [`MIN_BUDGET_BYTES`]. Decided at load, so that refusals stay inline: the cgroup's OOM killer
/// acts faster than the monitor's next look.
pub fn default_budget_bytes(cgroup_limit: Option<u64>, reserve_bytes: u64) -> u64 {
    let Some(limit) = cgroup_limit else {
        return DEFAULT_BUDGET_BYTES;
    };
    let headroom = cgroup_headroom_bytes(limit);
    limit
        .saturating_sub(reserve_bytes)
        .saturating_sub(headroom)
        .clamp(MIN_BUDGET_BYTES, DEFAULT_BUDGET_BYTES.max(MIN_BUDGET_BYTES))
}

/// What the default budget leaves of a cgroup's limit besides the reserve.
pub fn cgroup_headroom_bytes(limit: u64) -> u64 {
    CGROUP_HEADROOM_MIN_BYTES.max(limit / CGROUP_HEADROOM_DIVISOR)
}

/// The host budget of these settings on a machine whose process may use `memory_bytes` (the
/// smaller of physical memory and the cgroup's limit, `cgroup_limit`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostBudget {
    pub bytes: u64,
    /// A percentage that came to less than [`MIN_BUDGET_BYTES`]: what it came to.
    pub percent_below_minimum: Option<u64>,
}

pub fn resolve_host_budget(
    settings: &Settings,
    memory_bytes: u64,
    cgroup_limit: Option<u64>,
) -> HostBudget {
    if !settings.budget_from_env {
        return HostBudget {
            bytes: default_budget_bytes(cgroup_limit, settings.reserve_bytes),
            percent_below_minimum: None,
        };
    }
    let (bytes, percent_below_minimum) = resolve_percent(settings.budget, memory_bytes);
    HostBudget {
        bytes,
        percent_below_minimum,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(env: &[(&str, &str)]) -> (Settings, Vec<String>) {
        let mut lines = Vec::new();
        let s = Settings::load(
            |name| {
                env.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.as_bytes())
            },
            |bad| lines.push(bad.to_string()),
        );
        (s, lines)
    }

    /// One row: the environment, and the lines it must print.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);

    #[test]
    fn bad_values_print_one_line_each_and_keep_defaults() {
        let cases: &[Case] = &[
            (&[], &[]),
            (
                &[("QVSHIM_BUDGET", "lots")],
                &["QVSHIM_BUDGET=\"lots\": not a size (e.g. 6G, 512MiB, 1.5G, 50%, off); using default 6G"],
            ),
            (
                &[("QVSHIM_LOG", "loud")],
                &["QVSHIM_LOG=\"loud\": not one of off, error, warn, info, debug; using default warn (info with QVSHIM_LOG_FILE)"],
            ),
            (
                &[("QVSHIM_WARN", "95")],
                &["QVSHIM_WARN=\"95\": not below QVSHIM_CRITICAL; using default 70"],
            ),
            (
                &[("QVSHIM_CRITICAL", "60")],
                &["QVSHIM_CRITICAL=\"60\": not above QVSHIM_WARN; using default 90"],
            ),
            (
                &[("QVSHIM_WARN", "80"), ("QVSHIM_CRITICAL", "60")],
                &["QVSHIM_WARN=\"80\": not below QVSHIM_CRITICAL; using default 70"],
            ),
            (
                &[("QVSHIM_GPU_BUDGET", "lots")],
                &["QVSHIM_GPU_BUDGET=\"lots\": not a size (e.g. 6G, 512MiB, 1.5G, 50%, off); using default 90%"],
            ),
            (
                &[("QVSHIM_GPU_BUDGET", "150%")],
                &["QVSHIM_GPU_BUDGET=\"150%\": a percentage over 100; using default 90%"],
            ),
            (
                &[("QVSHIM_RESERVE", "-1M"), ("QVSHIM_BUDGET", "")],
                &[
                    "QVSHIM_BUDGET=\"\": empty; using default 6G",
                    "QVSHIM_RESERVE=\"-1M\": negative; using default 64M",
                ],
            ),
        ];
        for (env, want) in cases {
            let (s, lines) = load_with(env);
            assert_eq!(&lines, want, "env {env:?}");
            assert!(
                s.warn_percent < s.critical_percent,
                "env {env:?} gave {s:?}"
            );
        }
    }

    #[test]
    fn long_bad_values_are_shortened_and_the_line_fits_a_log_line() {
        const LONG_BYTES: usize = 5000;
        let long = vec![b'9'; LONG_BYTES];
        let cases: &[(&[u8], &str)] = &[
            (b"lots", "QVSHIM_BUDGET=\"lots\": why; using default 6G"),
            (
                &long[..BAD_VALUE_SHOWN_MAX_BYTES],
                "\": why; using default 6G",
            ),
            (&long, "\"... (5000 bytes): why; using default 6G"),
        ];
        for (value, end) in cases {
            let line = BadValue {
                variable: "QVSHIM_BUDGET",
                value,
                reason: "why",
                default: "6G",
            }
            .to_string();
            assert!(line.ends_with(end), "{} bytes gave {line:?}", value.len());
            // Room left for the "[qvshim] ERROR " prefix and the longest reason and default.
            assert!(
                line.len() + 200 <= crate::base::log::LINE_MAX_BYTES,
                "{} bytes gave a {}-byte line",
                value.len(),
                line.len()
            );
        }
    }

    #[test]
    fn good_values_are_taken_silently() {
        let (s, lines) = load_with(&[
            ("QVSHIM_BUDGET", "512MiB"),
            ("QVSHIM_GPU_BUDGET", "3G"),
            ("QVSHIM_RESERVE", "0"),
            ("QVSHIM_WARN", "50"),
            ("QVSHIM_CRITICAL", "80%"),
            ("QVSHIM_LOG", "debug"),
        ]);
        assert!(lines.is_empty(), "unexpected lines {lines:?}");
        assert_eq!(s.budget, BudgetSpec::Bytes(512 << 20));
        assert_eq!(s.gpu_budget, BudgetSpec::Bytes(3 << 30));
        assert_eq!(s.reserve_bytes, 0);
        assert_eq!((s.warn_percent, s.critical_percent), (50, 80));
        assert_eq!(s.log_level, Level::Debug);
    }

    #[test]
    fn monitor_values_parse() {
        let intervals: &[(&str, Result<u64, &str>)] = &[
            ("1s", Ok(1000)),
            ("100ms", Ok(100)),
            ("0.5", Ok(500)),
            ("2 m", Ok(120_000)),
            ("5ms", Err("shorter than 10ms")),
            ("9ms", Err("shorter than 10ms")),
            ("10ms", Ok(10)),
            ("0.01", Ok(10)),
            ("1h", Ok(3_600_000)),
            ("1H", Ok(3_600_000)),
            ("60m", Ok(3_600_000)),
            ("3600s", Ok(3_600_000)),
            ("3600000ms", Ok(3_600_000)),
            ("3600001ms", Err("longer than 1 hour")),
            ("1.01h", Err("longer than 1 hour")),
            ("2h", Err("longer than 1 hour")),
            ("1d", Err("unknown unit (use ms, s, m or h)")),
            ("-1s", Err("negative")),
            ("soon", Err("not a duration (e.g. 1s, 100ms, 0.5s)")),
            ("", Err("empty")),
        ];
        for (text, want) in intervals {
            assert_eq!(parse_interval_ms(text.as_bytes()), *want, "{text:?}");
        }
        let rtmin = libc::SIGRTMIN();
        let rtmax = libc::SIGRTMAX();
        let signals: &[(&str, Result<Option<i32>, &str>)] = &[
            ("USR1", Ok(Some(libc::SIGUSR1))),
            ("sigusr2", Ok(Some(libc::SIGUSR2))),
            ("10", Ok(Some(10))),
            ("12", Ok(Some(12))),
            ("RTMIN", Ok(Some(rtmin))),
            ("SIGRTMIN+2", Ok(Some(rtmin + 2))),
            ("rtmax-1", Ok(Some(rtmax - 1))),
            ("SIGRTMAX", Ok(Some(rtmax))),
            ("64", Ok(Some(64))),
            ("off", Ok(None)),
            ("SIGHUP", Err(NOT_FOR_USERS)),
            ("INT", Err(NOT_FOR_USERS)),
            ("TERM", Err(NOT_FOR_USERS)),
            ("QUIT", Err(NOT_FOR_USERS)),
            ("SEGV", Err(NOT_FOR_USERS)),
            ("11", Err(NOT_FOR_USERS)),
            ("9", Err(NOT_FOR_USERS)),
            ("32", Err(NOT_FOR_USERS)),
            ("33", Err(NOT_FOR_USERS)),
            ("65", Err(NOT_FOR_USERS)),
            ("RTMIN+40", Err(NOT_FOR_USERS)),
            ("RTMAX-40", Err(NOT_FOR_USERS)),
            ("RTMIN-1", Err(NOT_FOR_USERS)),
            ("RTMIN+", Err(NOT_FOR_USERS)),
            ("RTMINX", Err(NOT_FOR_USERS)),
            // A decimal offset is no signal, however small.
            ("RTMIN+1.5", Err(NOT_FOR_USERS)),
            ("SIGRTMAX-0.5", Err(NOT_FOR_USERS)),
            ("KILL", Err(NOT_FOR_USERS)),
            ("", Err(NOT_FOR_USERS)),
        ];
        for (text, want) in signals {
            assert_eq!(parse_signal(text.as_bytes()), *want, "{text:?}");
        }
        let switches: &[(&str, Result<bool, &str>)] = &[
            ("1", Ok(true)),
            ("ON", Ok(true)),
            ("off", Ok(false)),
            ("0", Ok(false)),
            (
                "maybe",
                Err("not on or off (1, on, yes, true / 0, off, no, false)"),
            ),
        ];
        for (text, want) in switches {
            assert_eq!(parse_switch(text.as_bytes()), *want, "{text:?}");
        }
        assert_eq!(parse_dump_format(b"JSON"), Ok(true));
        assert_eq!(signal_name(libc::SIGUSR2), Some("USR2"));
        assert_eq!(signal_name(40), None);
        let names = [
            (libc::SIGUSR1, "USR1".to_string()),
            (rtmin, "RTMIN+0".to_string()),
            (rtmin + 3, "RTMIN+3".to_string()),
            (rtmax, "RTMAX".to_string()),
            (libc::SIGTERM, "TERM".to_string()),
            (libc::SIGSEGV, "11".to_string()),
        ];
        for (signal, want) in names {
            assert_eq!(SignalName(signal).to_string(), want, "signal {signal}");
        }
        assert_eq!(parse_dump_format(b"xml"), Err("not text or json"));
    }

    #[test]
    fn scope_is_process_unless_tree_and_a_bad_value_keeps_process() {
        // (QVSHIM_SCOPE, tree scope, lines printed)
        let cases: &[(&str, bool, &[&str])] = &[
            ("tree", true, &[]),
            (" TREE ", true, &[]),
            ("process", false, &[]),
            (
                "family",
                false,
                &["QVSHIM_SCOPE=\"family\": not process or tree; using default process"],
            ),
        ];
        for &(value, tree, want) in cases {
            let (s, lines) = load_with(&[("QVSHIM_SCOPE", value)]);
            assert_eq!(s.tree, tree, "QVSHIM_SCOPE={value:?}");
            assert_eq!(lines, want, "QVSHIM_SCOPE={value:?}");
        }
        assert!(!load_with(&[]).0.tree, "process scope is the default");
    }

    #[test]
    fn monitor_variables_load_and_bad_ones_keep_defaults() {
        let (s, lines) = load_with(&[
            ("QVSHIM_INTERVAL", "250ms"),
            ("QVSHIM_PURGE_INTERVAL", "5s"),
            ("QVSHIM_SYSTEM_RESERVE", "1G"),
            ("QVSHIM_PYTHON", "off"),
            ("QVSHIM_SIGNAL", "USR1"),
            ("QVSHIM_DUMP_SIGNAL", "off"),
            ("QVSHIM_DUMP_FORMAT", "json"),
            ("QVSHIM_BACKTRACE", "1"),
            ("QVSHIM_PUBLISH", "0"),
        ]);
        assert!(lines.is_empty(), "unexpected lines {lines:?}");
        assert!(!s.publish, "QVSHIM_PUBLISH=0 turns publishing off");
        assert_eq!((s.interval_ms, s.purge_interval_ms), (250, 5000));
        assert_eq!(s.system_reserve_bytes, 1 << 30);
        assert!(!s.python && s.dump_json && s.backtrace);
        assert_eq!(
            (s.notify_signal, s.dump_signal),
            (Some(libc::SIGUSR1), None)
        );

        let (s, lines) = load_with(&[
            ("QVSHIM_INTERVAL", "1ms"),
            ("QVSHIM_SIGNAL", "KILL"),
            ("QVSHIM_PUBLISH", "maybe"),
        ]);
        assert!(s.publish, "a bad QVSHIM_PUBLISH keeps publishing on");
        assert_eq!(
            lines,
            [
                "QVSHIM_INTERVAL=\"1ms\": shorter than 10ms; using default 1s",
                "QVSHIM_SIGNAL=\"KILL\": not a signal meant for users (USR1, USR2, RTMIN+n, RTMAX-n or their numbers, or off); using default off",
                "QVSHIM_PUBLISH=\"maybe\": not on or off (1, on, yes, true / 0, off, no, false); using default on",
            ]
        );
        assert_eq!(
            (s.interval_ms, s.notify_signal),
            (DEFAULT_INTERVAL_MS, None)
        );

        // (environment, QVSHIM_SIGNAL and QVSHIM_DUMP_SIGNAL after load, lines printed)
        type SignalCase<'a> = (
            &'a [(&'a str, &'a str)],
            (Option<i32>, Option<i32>),
            &'a [&'a str],
        );
        let usr1 = Some(libc::SIGUSR1);
        let usr2 = Some(libc::SIGUSR2);
        let same = "the same signal as QVSHIM_DUMP_SIGNAL, which asks for the dump";
        let cases: &[SignalCase] = &[
            (&[("QVSHIM_SIGNAL", "USR1")], (usr1, usr2), &[]),
            (
                &[("QVSHIM_SIGNAL", "USR2")],
                (None, usr2),
                &[&format!(
                    "QVSHIM_SIGNAL=\"USR2\": {same}; using default off"
                )],
            ),
            (
                &[("QVSHIM_SIGNAL", "10"), ("QVSHIM_DUMP_SIGNAL", "USR1")],
                (None, usr1),
                &[&format!("QVSHIM_SIGNAL=\"10\": {same}; using default off")],
            ),
            (
                &[("QVSHIM_SIGNAL", "USR2"), ("QVSHIM_DUMP_SIGNAL", "off")],
                (usr2, None),
                &[],
            ),
            (
                &[("QVSHIM_DUMP_SIGNAL", "SEGV")],
                (None, usr2),
                &[&format!(
                    "QVSHIM_DUMP_SIGNAL=\"SEGV\": {NOT_FOR_USERS}; using default USR2"
                )],
            ),
        ];
        for (env, signals, want) in cases {
            let (s, lines) = load_with(env);
            assert_eq!((s.notify_signal, s.dump_signal), *signals, "{env:?}");
            assert_eq!(lines, *want, "{env:?}");
        }
    }

    #[test]
    fn percent_budget_resolves_against_memory() {
        assert_eq!(
            resolve_budget(BudgetSpec::PercentOfMemory(50.0), 16 << 30),
            8 << 30
        );
        assert_eq!(resolve_budget(BudgetSpec::Off, 16 << 30), u64::MAX);
    }

    #[test]
    fn percent_budgets_obey_the_minimum() {
        // (percent, memory, resolved bytes, what the percentage came to when raised)
        let cases: &[(f64, u64, u64, Option<u64>)] = &[
            (0.0001, 24 << 30, MIN_BUDGET_BYTES, Some(25769)),
            (0.05, 24 << 30, MIN_BUDGET_BYTES, Some(12884901)),
            (0.1, 16 << 30, 17179869, None),
            (50.0, 16 << 30, 8 << 30, None),
            (100.0, MIN_BUDGET_BYTES, MIN_BUDGET_BYTES, None),
        ];
        for &(percent, memory, bytes, below) in cases {
            let settings = Settings {
                budget: BudgetSpec::PercentOfMemory(percent),
                budget_from_env: true,
                ..Settings::default()
            };
            assert_eq!(
                resolve_host_budget(&settings, memory, None),
                HostBudget {
                    bytes,
                    percent_below_minimum: below
                },
                "{percent}% of {memory}"
            );
            assert_eq!(
                resolve_budget(BudgetSpec::PercentOfMemory(percent), memory),
                bytes
            );
        }
    }

    #[test]
    fn default_budget_follows_a_cgroup_limit_less_reserve_and_headroom() {
        const M: u64 = 1 << 20;
        const G: u64 = 1 << 30;
        // (cgroup limit, reserve, default budget)
        let cases: &[(Option<u64>, u64, u64)] = &[
            (None, 64 * M, DEFAULT_BUDGET_BYTES),
            (Some(600 * M), 64 * M, 600 * M - 64 * M - 128 * M),
            (Some(600 * M), 0, 600 * M - 128 * M),
            (Some(G), 64 * M, G - 64 * M - 128 * M),
            (Some(4 * G), 64 * M, 4 * G - 64 * M - 512 * M),
            (Some(7 * G), 64 * M, DEFAULT_BUDGET_BYTES),
            (Some(64 * G), 64 * M, DEFAULT_BUDGET_BYTES),
            (Some(200 * M), 64 * M, MIN_BUDGET_BYTES),
            (Some(0), 64 * M, MIN_BUDGET_BYTES),
            (Some(u64::MAX), 64 * M, DEFAULT_BUDGET_BYTES),
        ];
        for &(limit, reserve, want) in cases {
            assert_eq!(
                default_budget_bytes(limit, reserve),
                want,
                "limit {limit:?}, reserve {reserve}"
            );
        }
        // Only the default follows the cgroup: a budget the user gave is kept.
        let (given, _) = load_with(&[("QVSHIM_BUDGET", "6G")]);
        let (bad, lines) = load_with(&[("QVSHIM_BUDGET", "6")]);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let limit = Some(600 * M);
        assert_eq!(resolve_host_budget(&given, 24 * G, limit).bytes, 6 * G);
        assert_eq!(resolve_host_budget(&bad, 24 * G, limit).bytes, 408 * M);
        assert_eq!(
            resolve_host_budget(&Settings::default(), 24 * G, limit).bytes,
            408 * M
        );
    }

    #[test]
    fn gpu_budget_defaults_to_ninety_percent_and_takes_off() {
        assert_eq!(
            load_with(&[]).0.gpu_budget,
            BudgetSpec::PercentOfMemory(90.0)
        );
        assert_eq!(
            load_with(&[("QVSHIM_GPU_BUDGET", "off")]).0.gpu_budget,
            BudgetSpec::Off
        );
        assert_eq!(
            resolve_budget(BudgetSpec::PercentOfMemory(90.0), 10 << 30),
            9 << 30
        );
    }
}
