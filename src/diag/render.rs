//! The dump, rendered: one gathered report as text or as one JSON object.

use core::ffi::c_int;

use super::{json, report, text};

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
