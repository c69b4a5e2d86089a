//! The ground floor: mechanisms any part of the shim may use, which use nothing of the shim's
//! but each other. Nothing here knows about pools, levels or the monitor's policy.
//!
//! * [`config`]: the environment, parsed, one message per bad value;
//! * [`log`]: allocation-free logging and `log::qlog!`;
//! * [`system`]: what the kernel says (meminfo, PSI, /proc); [`cgroup`]: the memory cgroup;
//! * [`clock`]: monotonic milliseconds;
//! * [`jemalloc`]: jemalloc's control interface (stats, purge);
//! * [`doorbell`]: wakes the monitor thread (async-signal-safe);
//! * [`threads`]: the shim's own threads and the count of the program's;
//! * [`rundir`]: the user's private run directory (0700, never another user's or a link).
//! * [`shared_file`]: a file mapped shared by processes of one user, in a private directory.

pub mod cgroup;
pub mod clock;
pub mod config;
pub mod doorbell;
pub mod jemalloc;
pub mod log;
pub mod rundir;
pub mod shared_file;
pub mod system;
pub mod threads;
