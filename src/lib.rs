//! libqvshim.so: a memory governor preloaded into a process. It serves the malloc family from
//! jemalloc, counts every byte against a budget and refuses what would cross it.
//!
//! This file is the crate root and the load-time constructor, nothing else.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(clippy::missing_safety_doc)]

pub mod base;
pub mod diag;
pub mod gpu;
pub mod heap;
#[cfg(feature = "extent-prototype")]
pub mod heap_extent;
pub mod heap_stats;
pub mod ledger;
pub mod monitor;
pub mod neighbours;
pub mod runtime;
pub mod surface;
pub mod tracker;

use core::ffi::CStr;
use core::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use base::config::{self, BadValue, Settings};
use base::log::{self, qlog, Bytes};
use base::{cgroup, system};

/// The shim's own Rust allocations go straight to jemalloc, never through the exported malloc
/// (which would count them against the host's budget and could recurse).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The environment value of `name` as bytes, read without allocating.
fn env_bytes(name: &str) -> Option<&'static [u8]> {
    let mut buf = [0u8; 64];
    let n = name.len();
    buf.get_mut(..n)?.copy_from_slice(name.as_bytes());
    let cname = CStr::from_bytes_until_nul(&buf).ok()?;
    // SAFETY: cname is NUL-terminated; getenv's result lives as long as the environment entry,
    // which nothing changes while the constructor runs.
    let value = unsafe { libc::getenv(cname.as_ptr()) };
    if value.is_null() {
        return None;
    }
    // SAFETY: getenv returned a NUL-terminated string.
    Some(unsafe { CStr::from_ptr(value) }.to_bytes())
}

/// The longest QVSHIM_LOG_FILE path opened (PATH_MAX, with its NUL).
const LOG_PATH_MAX_BYTES: usize = 4096;
/// A log file the library creates is the user's alone: lines can say what the program does.
const LOG_FILE_MODE: libc::mode_t = 0o600;

/// Opens QVSHIM_LOG_FILE and makes it the log's destination; true when it is. A path that is
/// refused gets one line (on stderr) naming the variable, and logging stays on stderr.
fn open_log_file() -> bool {
    let Some(path) = env_bytes("QVSHIM_LOG_FILE") else {
        return false;
    };
    let mut buf = [0u8; LOG_PATH_MAX_BYTES];
    let opened = match buf.get_mut(..path.len()) {
        Some(dst) => {
            dst.copy_from_slice(path);
            open_log(&buf)
        }
        None => Err("longer than PATH_MAX"),
    };
    let reason = match opened {
        Ok(fd) if log::use_file(fd) => return true,
        Ok(_) => "cannot be opened for appending",
        Err(reason) => reason,
    };
    log::write_error_always(format_args!(
        "{}",
        BadValue {
            variable: "QVSHIM_LOG_FILE",
            value: path,
            reason,
            default: "stderr",
        }
    ));
    false
}

/// Opens the NUL-terminated path in `buf` for appending, the way a file another user may have
/// planted must be opened: never through a symbolic link (O_NOFOLLOW), never waiting for a
/// FIFO's reader (O_NONBLOCK: a FIFO nobody reads is refused, before `main`, instead of hanging
/// there), created mode 0600, and only a regular file, a FIFO or a character device. The
/// descriptor stays open for the process.
fn open_log(buf: &[u8]) -> Result<i32, &'static str> {
    let cpath = CStr::from_bytes_until_nul(buf).map_err(|_| "longer than PATH_MAX")?;
    // SAFETY: cpath is NUL-terminated.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_WRONLY
                | libc::O_APPEND
                | libc::O_CREAT
                | libc::O_CLOEXEC
                | libc::O_NOFOLLOW
                | libc::O_NONBLOCK
                | libc::O_NOCTTY,
            LOG_FILE_MODE,
        )
    };
    if fd < 0 {
        // SAFETY: __errno_location always returns this thread's valid errno slot.
        return Err(match unsafe { *libc::__errno_location() } {
            libc::ELOOP => "a symbolic link (the log never follows one)",
            libc::ENXIO => {
                "a FIFO nobody reads, a socket or an absent device (refused rather than wait)"
            }
            libc::EISDIR => "a directory",
            libc::ENOENT => "no such file or directory",
            libc::EACCES | libc::EPERM => "permission denied",
            _ => "cannot be opened for appending",
        });
    }
    // SAFETY: an all-zero stat is a valid plain C struct; fstat only writes it.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: fd is open and st is a valid out-pointer.
    let kind = if unsafe { libc::fstat(fd, &mut st) } == 0 {
        st.st_mode & libc::S_IFMT
    } else {
        0
    };
    if matches!(kind, libc::S_IFREG | libc::S_IFIFO | libc::S_IFCHR) {
        Ok(fd)
    } else {
        // SAFETY: fd was opened above and is not kept.
        unsafe { libc::close(fd) };
        Err("not a regular file, FIFO or character device")
    }
}

extern "C" fn after_fork_child() {
    // A new member of the tree first: the credits given back next leave its share.
    if let Err(reason) = ledger::tree::after_fork_child() {
        qlog!(
            Warn,
            "this fork child keeps its own budget: the tree's ledger {} refused it ({})",
            config::Printable(ledger::tree::path()),
            reason
        );
    }
    ledger::after_fork_child();
    monitor::after_fork_child();
}

/// Applies the settings to the ledger, the monitor and the rest; returns them as applied (a
/// system reserve that no machine of this size can leave is replaced by the default).
fn apply(settings: &Settings) -> Settings {
    let mut settings = *settings;
    let settings = &mut settings;
    cgroup::find_cgroups();
    let physical = system::physical_memory_bytes();
    let cgroup_limit = cgroup::cgroup_limit_below(physical);
    let memory = cgroup_limit.unwrap_or(physical);
    let reserve = settings.system_reserve_bytes;
    if let Some(value) = env_bytes("QVSHIM_SYSTEM_RESERVE") {
        if memory > 0 && reserve >= memory && reserve != config::DEFAULT_SYSTEM_RESERVE_BYTES {
            // No process could ever get room past such a reserve: a misconfiguration, reported
            // like a bad value (a machine that really runs out of room is the monitor's business).
            log::write_error_always(format_args!(
                "QVSHIM_SYSTEM_RESERVE=\"{}\": not below this machine's memory ({}); using default 512M",
                config::Printable(value),
                Bytes(memory)
            ));
            settings.system_reserve_bytes = config::DEFAULT_SYSTEM_RESERVE_BYTES;
        }
    }
    let resolved = config::resolve_host_budget(settings, memory, cgroup_limit);
    if let Some(asked) = resolved.percent_below_minimum {
        log::write_error_always(format_args!(
            "QVSHIM_BUDGET=\"{}\": {} of {}, below the {} minimum; using {}",
            config::Printable(env_bytes("QVSHIM_BUDGET").unwrap_or(&[])),
            Bytes(asked),
            Bytes(memory),
            Bytes(config::MIN_BUDGET_BYTES),
            Bytes(resolved.bytes)
        ));
    }
    let budget = resolved.bytes;
    if let (Some(limit), false) = (cgroup_limit, settings.budget_from_env) {
        qlog!(
            Info,
            "default host budget {}: the memory cgroup's limit {} less the reserve {} and a headroom of {}",
            Bytes(budget),
            Bytes(limit),
            Bytes(settings.reserve_bytes),
            Bytes(config::cgroup_headroom_bytes(limit))
        );
    }
    let host = ledger::host();
    ledger::set_thresholds(settings.warn_percent, settings.critical_percent);
    host.set_reserve(settings.reserve_bytes);
    host.set_budget(budget);
    host.activate();
    if settings.tree {
        take_part_in_tree(budget);
    }
    #[cfg(feature = "extent-prototype")]
    heap_extent::install();
    gpu::driver::know_wrappers(surface::cuda::wrapper);
    gpu::configure(settings.gpu_budget);
    monitor::configure(
        settings.interval_ms,
        settings.purge_interval_ms,
        settings.system_reserve_bytes,
    );
    runtime::python::configure(settings.python);
    runtime::python::set_exit_report(diag::report_exit_once);
    runtime::signal::configure(settings.notify_signal);
    diag::configure(settings, budget, env_bytes("QVSHIM_DUMP_FILE"));
    diag::publish::configure(settings.publish, env_bytes("XDG_RUNTIME_DIR"));
    if settings.backtrace {
        tracker::enable_backtraces();
    }
    *settings
}

/// QVSHIM_SCOPE=tree: creates the tree's ledger (and names it in QVSHIM_TREE_LEDGER for the
/// children) or joins the one the environment names; when neither works, one line and the
/// process keeps its own budget.
fn take_part_in_tree(budget: u64) {
    use ledger::tree::Outcome;
    let named = env_bytes("QVSHIM_TREE_LEDGER").filter(|v| !v.is_empty());
    let dir = if named.is_none() {
        base::shared_file::private_directory(env_bytes("XDG_RUNTIME_DIR"))
    } else {
        None
    };
    match ledger::tree::take_part(named, dir, budget) {
        Outcome::Created => {
            let path = ledger::tree::path();
            let mut value = [0u8; base::shared_file::PATH_MAX_BYTES];
            if let Some(dst) = value.get_mut(..path.len()) {
                dst.copy_from_slice(path);
            }
            if let Ok(value) = CStr::from_bytes_until_nul(&value) {
                // SAFETY: both strings are NUL-terminated; the constructor runs before main,
                // while the process has one thread, so nothing reads the environment meanwhile.
                unsafe { libc::setenv(c"QVSHIM_TREE_LEDGER".as_ptr(), value.as_ptr(), 1) };
            }
            qlog!(
                Info,
                "tree scope: created the tree's ledger {} (host budget {})",
                config::Printable(path),
                Bytes(budget)
            );
        }
        Outcome::Joined { host_budget } => {
            ledger::host().set_budget(host_budget);
            qlog!(
                Info,
                "tree scope: joined the tree's ledger {} ({} members, host budget {})",
                config::Printable(ledger::tree::path()),
                ledger::tree::members(),
                Bytes(host_budget)
            );
        }
        Outcome::Refused(reason) => match named {
            Some(path) => log::write_error_always(format_args!(
                "{}",
                BadValue {
                    variable: "QVSHIM_TREE_LEDGER",
                    value: path,
                    reason,
                    default: "this process's own budget",
                }
            )),
            None => log::write_error_always(format_args!(
                "QVSHIM_SCOPE=\"tree\": the tree's ledger: {reason}; using default process"
            )),
        },
    }
}

extern "C" fn tree_at_exit() {
    ledger::tree::at_exit();
}

/// The dump signal, kept for [`install_deferred_dump_signal`] while a CPython starts.
static DEFERRED_DUMP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static DEFERRED_DUMP_SIGNAL_CHOSEN: AtomicBool = AtomicBool::new(false);

fn install_deferred_dump_signal() {
    diag::install_dump_signal(
        DEFERRED_DUMP_SIGNAL.load(Ordering::Relaxed),
        DEFERRED_DUMP_SIGNAL_CHOSEN.load(Ordering::Relaxed),
    );
}

#[ctor::ctor]
fn init() {
    // jemalloc registers its fork handlers when it first initialises; doing that now puts them
    // before ours, so the child's jemalloc is usable when our handler runs.
    // SAFETY: a plain allocation and its free.
    unsafe { tikv_jemalloc_sys::free(tikv_jemalloc_sys::malloc(1)) };

    log::check_stderr_at_load();
    let to_file = open_log_file();
    let mut settings = Settings::load(env_bytes, |bad| {
        log::write_error_always(format_args!("{bad}"))
    });
    if to_file && !settings.log_level_chosen {
        settings.log_level = config::DEFAULT_LOG_FILE_LEVEL;
    }
    log::set_level(settings.log_level);
    if !to_file && settings.log_level >= log::Level::Info {
        log::keep_stderr_copy();
    }
    let settings = apply(&settings);
    let host = ledger::host();
    qlog!(
        Info,
        "qvshim {} pid {}: host budget {}, warn {}%, critical {}%, reserve {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        Bytes(host.budget()),
        settings.warn_percent,
        settings.critical_percent,
        Bytes(host.reserve())
    );
    runtime::python::count_arenas_before_start();
    // Threads take credit slots only when the heap is the shim's; otherwise every malloc and
    // free takes the slow path, which passes it on (src/neighbours.rs).
    if neighbours::decide_at_load() {
        ledger::init_threads();
    }
    // SAFETY: registering a plain extern "C" handler with no prepare/parent step.
    unsafe { libc::pthread_atfork(None, None, Some(after_fork_child)) };
    if let Some(signal) = settings.dump_signal {
        let chosen = env_bytes("QVSHIM_DUMP_SIGNAL").is_some();
        if runtime::python::may_start() {
            // CPython's signal module must find the default action at start-up (a handler it
            // did not install reads back as None, which a program cannot put back).
            DEFERRED_DUMP_SIGNAL.store(signal, Ordering::Relaxed);
            DEFERRED_DUMP_SIGNAL_CHOSEN.store(chosen, Ordering::Relaxed);
            runtime::python::run_after_start(install_deferred_dump_signal);
        } else {
            diag::install_dump_signal(signal, chosen);
        }
    }
    diag::install_exit_report();
    if ledger::tree::active() {
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(tree_at_exit) };
    }
    monitor::start();
}
