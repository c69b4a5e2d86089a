//! One value of the environment, parsed: sizes, budgets, percentages, intervals, switches, log
//! levels and signal names, each a pure function from bytes to a value or the reason it is
//! refused (no environment, no I/O, no allocation), tested in tables. The bounds they enforce
//! live here too.

use core::fmt;

use crate::base::log::Level;

/// The smallest budget: one below it refuses the interpreter's own start-up. Measured with
/// CPython 3.11 (`python3 -c pass`, site-packages with two `.pth` files): the host peak is
/// 6.35 MiB; at 4 MiB a `.pth` file fails with MemoryError, at 1-2 MiB `site` is silently not
/// imported at all (no site-packages), at 8 MiB it starts whole. 16 MiB leaves that start-up
/// room to handle a MemoryError. It also catches typos (`QVSHIM_BUDGET=6` meaning 6 GiB).
/// Sizes, percentages, `qvshim_set_budget` and the effective budget's floor all obey it.
pub const MIN_BUDGET_BYTES: u64 = 16 << 20;
/// Sizes stay below 2^63 so sums of a few of them never overflow a u64.
pub const MAX_SIZE_BYTES: u64 = 1 << 63;
/// Intervals are kept between these bounds: a shorter one would keep a core busy, a longer one
/// would make the monitor blind.
pub const MIN_INTERVAL_MS: u64 = 10;
pub const MAX_INTERVAL_MS: u64 = 3_600_000;

/// What `QVSHIM_BUDGET` asked for, before the machine's memory is known.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BudgetSpec {
    Bytes(u64),
    /// Percent of physical memory, or of the cgroup's memory.max when that is lower.
    PercentOfMemory(f64),
    Off,
}

const SIZE_EXAMPLES: &str = "not a size (e.g. 6G, 512MiB, 1.5G, 50%, off)";

/// Parses a size: a number with an optional fraction and an optional binary unit
/// (`K`, `M`, `G`, `T`, each optionally followed by `iB` or `B`; case-insensitive).
pub fn parse_size(text: &[u8]) -> Result<u64, &'static str> {
    let text = trim(text);
    if text.is_empty() {
        return Err("empty");
    }
    if text.first() == Some(&b'-') {
        return Err("negative");
    }
    let (number, unit) = split_number(text);
    let value = parse_decimal(number).ok_or(SIZE_EXAMPLES)?;
    let multiplier = unit_multiplier(trim(unit))?;
    let bytes = value * multiplier as f64;
    if bytes >= MAX_SIZE_BYTES as f64 {
        return Err("too large (at most 2^63 bytes)");
    }
    Ok(bytes as u64)
}

/// Parses `QVSHIM_BUDGET`: a size, a percentage of memory or `off`.
pub fn parse_budget(text: &[u8]) -> Result<BudgetSpec, &'static str> {
    let trimmed = trim(text);
    if trimmed.eq_ignore_ascii_case(b"off") {
        return Ok(BudgetSpec::Off);
    }
    if let Some(number) = trimmed.strip_suffix(b"%") {
        let percent = parse_percent(number)?;
        return Ok(BudgetSpec::PercentOfMemory(percent));
    }
    let bytes = parse_size(text)?;
    if bytes < MIN_BUDGET_BYTES {
        return Err("below the 16 MiB minimum");
    }
    Ok(BudgetSpec::Bytes(bytes))
}

fn parse_percent(number: &[u8]) -> Result<f64, &'static str> {
    let number = trim(number);
    if number.is_empty() {
        return Err("empty percentage");
    }
    if number.first() == Some(&b'-') {
        return Err("negative");
    }
    let percent = parse_decimal(number).ok_or("not a percentage")?;
    if percent > 100.0 {
        return Err("a percentage over 100");
    }
    if percent <= 0.0 {
        return Err("a percentage of zero");
    }
    Ok(percent)
}

/// Parses a level threshold: a whole percentage 1..100, with or without `%`.
pub fn parse_level_percent(text: &[u8]) -> Result<u8, &'static str> {
    let trimmed = trim(text);
    if trimmed.is_empty() {
        return Err("empty");
    }
    let number = trimmed.strip_suffix(b"%").unwrap_or(trimmed);
    if trim(number).first() == Some(&b'-') {
        return Err("negative");
    }
    let value = parse_decimal(trim(number)).ok_or("not a whole percentage 1..100")?;
    if value.fract() != 0.0 {
        return Err("not a whole percentage 1..100");
    }
    if value > 100.0 {
        return Err("a percentage over 100");
    }
    if value < 1.0 {
        return Err("a percentage of zero");
    }
    Ok(value as u8)
}

pub fn parse_log_level(text: &[u8]) -> Result<Level, &'static str> {
    let trimmed = trim(text);
    const NAMES: [(&[u8], Level); 5] = [
        (b"off", Level::Off),
        (b"error", Level::Error),
        (b"warn", Level::Warn),
        (b"info", Level::Info),
        (b"debug", Level::Debug),
    ];
    if trimmed.is_empty() {
        return Err("empty");
    }
    NAMES
        .iter()
        .find(|(name, _)| trimmed.eq_ignore_ascii_case(name))
        .map(|(_, level)| *level)
        .ok_or("not one of off, error, warn, info, debug")
}

/// Parses a duration: a number with an optional fraction and a unit `ms`, `s`, `m` or `h`
/// (a bare number is seconds), between [`MIN_INTERVAL_MS`] and [`MAX_INTERVAL_MS`], both
/// included.
pub fn parse_interval_ms(text: &[u8]) -> Result<u64, &'static str> {
    let text = trim(text);
    if text.is_empty() {
        return Err("empty");
    }
    if text.first() == Some(&b'-') {
        return Err("negative");
    }
    let (number, unit) = split_number(text);
    let value = parse_decimal(number).ok_or("not a duration (e.g. 1s, 100ms, 0.5s)")?;
    let unit = trim(unit);
    let scale = if unit.is_empty() || unit.eq_ignore_ascii_case(b"s") {
        1000.0
    } else if unit.eq_ignore_ascii_case(b"ms") {
        1.0
    } else if unit.eq_ignore_ascii_case(b"m") || unit.eq_ignore_ascii_case(b"min") {
        60_000.0
    } else if unit.eq_ignore_ascii_case(b"h") {
        3_600_000.0
    } else {
        return Err("unknown unit (use ms, s, m or h)");
    };
    let ms = value * scale;
    if ms < MIN_INTERVAL_MS as f64 {
        return Err("shorter than 10ms");
    }
    if ms > MAX_INTERVAL_MS as f64 {
        return Err("longer than 1 hour");
    }
    Ok(ms as u64)
}

/// Parses an on/off switch: `1`, `on`, `yes`, `true` or `0`, `off`, `no`, `false`.
pub fn parse_switch(text: &[u8]) -> Result<bool, &'static str> {
    let trimmed = trim(text);
    const ON: [&[u8]; 4] = [b"1", b"on", b"yes", b"true"];
    const OFF: [&[u8]; 4] = [b"0", b"off", b"no", b"false"];
    if ON.iter().any(|w| trimmed.eq_ignore_ascii_case(w)) {
        Ok(true)
    } else if OFF.iter().any(|w| trimmed.eq_ignore_ascii_case(w)) {
        Ok(false)
    } else {
        Err("not on or off (1, on, yes, true / 0, off, no, false)")
    }
}

/// Names of signals, for messages.
const SIGNAL_NAMES: [(&[u8], i32); 10] = [
    (b"USR1", libc::SIGUSR1),
    (b"USR2", libc::SIGUSR2),
    (b"HUP", libc::SIGHUP),
    (b"INT", libc::SIGINT),
    (b"QUIT", libc::SIGQUIT),
    (b"ALRM", libc::SIGALRM),
    (b"TERM", libc::SIGTERM),
    (b"WINCH", libc::SIGWINCH),
    (b"URG", libc::SIGURG),
    (b"PWR", libc::SIGPWR),
];

/// The name of a common signal (`USR1` for 10), for messages.
pub fn signal_name(signal: i32) -> Option<&'static str> {
    SIGNAL_NAMES
        .iter()
        .find(|(_, number)| *number == signal)
        .and_then(|(name, _)| core::str::from_utf8(name).ok())
}

/// A signal as a person names it: `USR1`, `RTMIN+2`, `RTMAX`, or its number.
#[derive(Clone, Copy)]
pub struct SignalName(pub i32);

impl fmt::Display for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
        match self.0 {
            signal if signal == max => f.write_str("RTMAX"),
            signal if (min..max).contains(&signal) => write!(f, "RTMIN+{}", signal - min),
            signal => match signal_name(signal) {
                Some(name) => f.write_str(name),
                None => write!(f, "{signal}"),
            },
        }
    }
}

/// True for the signals meant for users, the only ones the shim takes: SIGUSR1, SIGUSR2 and
/// the real-time signals glibc leaves to programs (SIGRTMIN..SIGRTMAX). Every other signal has
/// a meaning of its own (a fault, Ctrl-C, `kill`, a hangup) that the shim must never change.
pub fn is_user_signal(signal: i32) -> bool {
    signal == libc::SIGUSR1
        || signal == libc::SIGUSR2
        || (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&signal)
}

pub(crate) const NOT_FOR_USERS: &str =
    "not a signal meant for users (USR1, USR2, RTMIN+n, RTMAX-n or their numbers, or off)";

/// A real-time signal by name: `RTMIN`, `RTMIN+n`, `RTMAX`, `RTMAX-n`.
fn parse_realtime(name: &[u8]) -> Option<i32> {
    let offset = |rest: &[u8], sign: u8| -> Option<i32> {
        match rest.split_first() {
            None => Some(0),
            Some((&first, digits)) if first == sign && !digits.is_empty() => {
                let n = parse_decimal(digits)?;
                (digits.iter().all(u8::is_ascii_digit) && n <= 64.0).then_some(n as i32)
            }
            _ => None,
        }
    };
    let (head, rest) = name.split_at(name.len().min(5));
    if head.eq_ignore_ascii_case(b"RTMIN") {
        Some(libc::SIGRTMIN() + offset(rest, b'+')?)
    } else if head.eq_ignore_ascii_case(b"RTMAX") {
        Some(libc::SIGRTMAX() - offset(rest, b'-')?)
    } else {
        None
    }
}

/// Parses a signal meant for users ([`is_user_signal`]): a name (`USR1`, `SIGUSR2`,
/// `RTMIN+2`, `SIGRTMAX-1`, any case), its number, or `off` (None). Anything else is refused.
pub fn parse_signal(text: &[u8]) -> Result<Option<i32>, &'static str> {
    let trimmed = trim(text);
    if trimmed.eq_ignore_ascii_case(b"off") {
        return Ok(None);
    }
    let signal = if !trimmed.is_empty() && trimmed.iter().all(u8::is_ascii_digit) {
        let number = parse_decimal(trimmed).ok_or(NOT_FOR_USERS)?;
        if number > 64.0 {
            return Err(NOT_FOR_USERS);
        }
        number as i32
    } else {
        let name = match trimmed.get(..3) {
            Some(prefix) if prefix.eq_ignore_ascii_case(b"SIG") => trimmed.get(3..).unwrap_or(&[]),
            _ => trimmed,
        };
        if name.eq_ignore_ascii_case(b"USR1") {
            libc::SIGUSR1
        } else if name.eq_ignore_ascii_case(b"USR2") {
            libc::SIGUSR2
        } else {
            parse_realtime(name).ok_or(NOT_FOR_USERS)?
        }
    };
    if is_user_signal(signal) {
        Ok(Some(signal))
    } else {
        Err(NOT_FOR_USERS)
    }
}

/// Parses QVSHIM_DUMP_FORMAT: `text` (false) or `json` (true).
pub fn parse_dump_format(text: &[u8]) -> Result<bool, &'static str> {
    let trimmed = trim(text);
    if trimmed.eq_ignore_ascii_case(b"text") {
        Ok(false)
    } else if trimmed.eq_ignore_ascii_case(b"json") {
        Ok(true)
    } else {
        Err("not text or json")
    }
}

/// Parses QVSHIM_SCOPE: `process` (false) or `tree` (true).
pub fn parse_scope(text: &[u8]) -> Result<bool, &'static str> {
    let trimmed = trim(text);
    if trimmed.eq_ignore_ascii_case(b"process") {
        Ok(false)
    } else if trimmed.eq_ignore_ascii_case(b"tree") {
        Ok(true)
    } else {
        Err("not process or tree")
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !first.is_ascii_whitespace() {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !last.is_ascii_whitespace() {
            break;
        }
        s = rest;
    }
    s
}

fn split_number(text: &[u8]) -> (&[u8], &[u8]) {
    let end = text
        .iter()
        .position(|b| !(b.is_ascii_digit() || *b == b'.'))
        .unwrap_or(text.len());
    text.split_at(end)
}

/// Digits with at most one '.', at least one digit; no signs, no exponents.
fn parse_decimal(text: &[u8]) -> Option<f64> {
    let mut whole: f64 = 0.0;
    let mut fraction_scale: f64 = 0.0;
    let mut digits = 0;
    for &b in text {
        match b {
            b'0'..=b'9' => {
                let d = (b - b'0') as f64;
                if fraction_scale == 0.0 {
                    whole = whole * 10.0 + d;
                } else {
                    whole += d * fraction_scale;
                    fraction_scale /= 10.0;
                }
                digits += 1;
            }
            b'.' if fraction_scale == 0.0 => fraction_scale = 0.1,
            _ => return None,
        }
    }
    (digits > 0).then_some(whole)
}

fn unit_multiplier(unit: &[u8]) -> Result<u64, &'static str> {
    const UNKNOWN: &str = "unknown unit (use K, M, G or T, optionally with iB)";
    let Some((&letter, suffix)) = unit.split_first() else {
        return Ok(1);
    };
    let shift = match letter.to_ascii_uppercase() {
        b'B' if suffix.is_empty() => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        _ => return Err(UNKNOWN),
    };
    let suffix_ok = suffix.is_empty()
        || suffix.eq_ignore_ascii_case(b"ib")
        || (shift > 0 && suffix.eq_ignore_ascii_case(b"b"));
    if suffix_ok {
        Ok(1 << shift)
    } else {
        Err(UNKNOWN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        let cases: &[(&str, u64)] = &[
            ("6G", 6 << 30),
            ("512MiB", 512 << 20),
            ("512mb", 512 << 20),
            ("1.5g", 3 << 29),
            ("64 M", 64 << 20),
            (" 1073741824 ", 1 << 30),
            ("0", 0),
            ("10B", 10),
            ("2T", 2 << 40),
            ("4kib", 4096),
        ];
        for (text, want) in cases {
            assert_eq!(
                parse_size(text.as_bytes()),
                Ok(*want),
                "parse_size({text:?})"
            );
        }
    }

    #[test]
    fn bad_sizes_are_refused_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("  ", "empty"),
            ("-5G", "negative"),
            ("lots", SIZE_EXAMPLES),
            ("5X", "unknown unit (use K, M, G or T, optionally with iB)"),
            ("5GX", "unknown unit (use K, M, G or T, optionally with iB)"),
            ("5BB", "unknown unit (use K, M, G or T, optionally with iB)"),
            // Bytes take no binary suffix: "BiB" is no unit.
            (
                "5BiB",
                "unknown unit (use K, M, G or T, optionally with iB)",
            ),
            ("1.2.3G", SIZE_EXAMPLES),
            ("99999999999T", "too large (at most 2^63 bytes)"),
        ];
        for (text, want) in cases {
            assert_eq!(
                parse_size(text.as_bytes()),
                Err(*want),
                "parse_size({text:?})"
            );
        }
    }

    #[test]
    fn budgets_accept_percent_and_off() {
        let cases: &[(&str, Result<BudgetSpec, &str>)] = &[
            ("off", Ok(BudgetSpec::Off)),
            ("OFF", Ok(BudgetSpec::Off)),
            ("50%", Ok(BudgetSpec::PercentOfMemory(50.0))),
            ("12.5%", Ok(BudgetSpec::PercentOfMemory(12.5))),
            ("101%", Err("a percentage over 100")),
            ("0%", Err("a percentage of zero")),
            ("-5%", Err("negative")),
            ("%", Err("empty percentage")),
            ("512K", Err("below the 16 MiB minimum")),
            ("1M", Err("below the 16 MiB minimum")),
            ("16777215", Err("below the 16 MiB minimum")),
            ("16M", Ok(BudgetSpec::Bytes(16 << 20))),
            ("0.0001%", Ok(BudgetSpec::PercentOfMemory(0.0001))),
        ];
        for (text, want) in cases {
            assert_eq!(
                parse_budget(text.as_bytes()),
                *want,
                "parse_budget({text:?})"
            );
        }
    }

    #[test]
    fn level_percent_is_whole_and_in_range() {
        let cases: &[(&str, Result<u8, &str>)] = &[
            ("70", Ok(70)),
            ("70%", Ok(70)),
            ("100", Ok(100)),
            ("0", Err("a percentage of zero")),
            ("101", Err("a percentage over 100")),
            ("7.5", Err("not a whole percentage 1..100")),
            ("-3", Err("negative")),
            ("", Err("empty")),
            ("high", Err("not a whole percentage 1..100")),
        ];
        for (text, want) in cases {
            assert_eq!(parse_level_percent(text.as_bytes()), *want, "{text:?}");
        }
    }
}
