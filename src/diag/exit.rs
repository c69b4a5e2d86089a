//! The one-line exit report: each pool's peak against its budget, refusals, purges and
//! notifications, written once per process at exit (atexit, or CPython's finalization).

use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::ledger::PoolName;
use crate::ledger::{self, UNLIMITED};

use super::request::finish_requested_dump;
use super::text::b;

/// One line: each pool's peak against its budget, then refusals, purges, notifications.
pub fn exit_line() -> String {
    let mut line = format!("exit pid {}:", std::process::id());
    let (mut refusals, mut largest, mut purges, mut told) = (0u64, 0u64, 0u64, 0u64);
    let mut first = true;
    for index in 0..ledger::pool_count() {
        let Some(s) = ledger::pool_stats(index) else {
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
            let _ = write!(line, " ({}%)", ledger::percent(s.peak, s.budget));
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

pub(super) static EXIT_REPORTED: AtomicBool = AtomicBool::new(false);

/// Writes the exit line, once per process (CPython's finalization and atexit both call this).
pub fn report_exit_once() {
    finish_requested_dump();
    super::publish::withdraw();
    // Written past the log's rate limit: a busy last second must not swallow the summary.
    if !EXIT_REPORTED.swap(true, Ordering::AcqRel)
        && crate::base::log::enabled(crate::base::log::Level::Info)
    {
        let line = format!("[qvshim] INFO {}\n", exit_line());
        crate::base::log::write_to_log(line.as_bytes());
    }
}

/// A fork child reports its own exit.
pub(super) fn after_fork_child() {
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
