//! Telling the runtime in the process to give memory back, with no change to the app.
//!
//! Three channels, each told by the monitor thread when a pool's level rises (never from inside
//! an allocation or a signal handler):
//! * [`python`]: a CPython found at run time collects garbage (and at critical empties torch's
//!   CUDA cache and runs the app's callbacks registered through the Python companion);
//! * [`signal`]: `QVSHIM_SIGNAL` raised to the process when it has a handler for it;
//! * [`callbacks`]: functions registered through the C API (`qvshim_on_level_change`), told of
//!   every level change in both directions.
//!
//! [`arena`] is the one piece that counts rather than tells: CPython's small-object arenas,
//! charged to the host pool through CPython's own arena allocator hook.

pub mod arena;
pub mod callbacks;
pub mod python;
pub mod signal;

/// What the runtime was told about one level rise.
#[derive(Clone, Copy, Debug, Default)]
pub struct Told {
    pub python: bool,
    pub signal: bool,
}

impl Told {
    /// Notifications sent, as counted in a pool's `notifications`.
    pub fn count(&self) -> u64 {
        self.python as u64 + self.signal as u64
    }
}

/// Tells every runtime that pool `pool` rose to `level` (warn or critical).
pub fn tell_rise(pool: usize, level: u8) -> Told {
    Told {
        python: python::request_relief(pool, level),
        signal: signal::raise_if_handled(),
    }
}

/// In a fork child: nothing is pending any more.
pub fn after_fork_child() {
    python::after_fork_child();
    callbacks::after_fork_child();
}
