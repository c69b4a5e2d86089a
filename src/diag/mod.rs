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
//! * [`json`] and [`text`]: the two views of it, chosen by [`render()`];
//! * [`file`](mod@file): where a requested dump goes (QVSHIM_DUMP_FILE, safely);
//! * [`request`]: the dump signal and the flags the monitor and the exit path share;
//! * [`exit`]: the one-line exit report;
//! * [`publish`]: the counters file `qvshim status` reads, and the reply to `qvshim dump`.

pub mod exit;
pub mod file;
pub mod json;
pub mod publish;
pub mod render;
pub mod report;
pub mod request;
pub mod text;

pub use exit::{install_exit_report, report_exit_once};
pub use render::{render, write_dump};
pub use report::{configure, DUMP_VERSION};
pub use request::{check_dump_signal, install_dump_signal};

/// In a fork child: no dump is being written or asked for, and the child reports its own exit.
pub fn after_fork_child() {
    request::after_fork_child();
    exit::after_fork_child();
    publish::after_fork_child();
}
