//! The diagnostic dump (text or one JSON object) and the one-line exit report.
//!
//! A dump is asked for by the dump signal (QVSHIM_DUMP_SIGNAL, default SIGUSR2), whose handler
//! only sets a flag and rings the monitor; the monitor thread gathers and writes it. The C API's
//! `qvshim_dump` writes one from the calling thread. The dump is built in a Rust `String`: the
//! shim's own allocations go straight to jemalloc, never through the exported malloc, so this
//! never touches the host's budget or its locks. Never runs inside an allocation or a handler.
//!
//! The JSON keys are a stable contract, documented in docs/DUMP.md: keys are only ever added.
//!
//! * [`report`]: gathers one report from the layers below (reads only);
//! * [`json`] and [`text`]: the two views of it;
//! * [`file`]: where a requested dump goes (QVSHIM_DUMP_FILE, safely);
//! * [`request`]: the dump signal and the flags the monitor and the exit path share;
//! * [`exit`]: the one-line exit report.

pub mod exit;
pub mod file;
pub mod json;
pub mod report;
pub mod request;
pub mod text;

use core::ffi::c_int;
use std::sync::OnceLock;

use crate::base::clock;
use crate::base::config::{BadValue, Settings};

pub use exit::{install_exit_report, report_exit_once};
pub use request::{check_dump_signal, install_dump_signal};

/// Version of the dump's layout ("dump_version" in JSON); raised only when a key changes
/// meaning, which the stable contract forbids for version 1.
pub const DUMP_VERSION: u32 = 1;

/// What the dump shows of the configuration, fixed at load.
pub(super) struct Config {
    pub(super) settings: Settings,
    pub(super) host_budget: u64,
    pub(super) dump_path: Option<Vec<u8>>,
    pub(super) started_ms: u64,
}

pub(super) static CONFIG: OnceLock<Config> = OnceLock::new();

/// Records the configuration, for the dump and the exit report. Called once at load.
/// `dump_path` is QVSHIM_DUMP_FILE as given; an empty one names no file and is reported here.
pub fn configure(settings: &Settings, host_budget: u64, dump_path: Option<&[u8]>) {
    let dump_path = match dump_path {
        Some([]) => {
            crate::base::log::write_error_always(format_args!(
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
        started_ms: clock::now_ms(),
    });
}

/// The dump as text or as one JSON object (with a trailing newline).
pub fn render(json: bool) -> String {
    let report = report::gather();
    if json {
        let mut out = String::new();
        json::write_json(&mut out, &json::report_json(&report));
        out.push('\n');
        out
    } else {
        text::report_text(&report)
    }
}

/// Writes a dump to `fd`; false when the write failed.
pub fn write_dump(fd: c_int, json: bool) -> bool {
    crate::base::log::write_all(fd, render(json).as_bytes())
}

/// In a fork child: no dump is being written or asked for, and the child reports its own exit.
pub fn after_fork_child() {
    request::after_fork_child();
    exit::after_fork_child();
}
