//! The relief itself, run inside CPython with the GIL (in the main thread's pending call, or on
//! the nudge thread): `gc.collect()`, at critical torch's CUDA cache, then the app's callbacks,
//! each a helper function compiled once into a private namespace. Also what a relief asks for
//! (the pending flag, level and pool) and what it did, for the dump and the backoff.

use core::ffi::{c_int, c_long, c_void, CStr};
use core::sync::atomic::{
    AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering,
};

use crate::base::log::qlog;
use crate::base::log::Bytes;
use crate::ledger::{self, LEVEL_CRITICAL, LEVEL_WARN};

use super::interpreter::{Api, PyObject, API};

/// `Py_file_input` in CPython's compile.h (stable since Python 2).
pub(crate) const PY_FILE_INPUT: c_int = 257;

/// The relief's Python side, compiled once into a private namespace (the app's modules and
/// `__main__` are not touched). Each step is its own function so that one raising does not
/// skip the others.
pub(crate) const HELPERS: &CStr = c"
import gc as _gc, sys as _sys

def collect():
    return _gc.collect()

def collector_enabled():
    return 1 if _gc.isenabled() else 0

def empty_cuda_cache():
    torch = _sys.modules.get('torch')
    cuda = getattr(torch, 'cuda', None) if torch is not None else None
    if cuda is None or not cuda.is_initialized():
        return 0
    cuda.empty_cache()
    return 1

def app_callbacks(level, pool):
    companion = _sys.modules.get('qvshim')
    on_pressure = getattr(companion, '_on_pressure', None) if companion is not None else None
    if on_pressure is None:
        return 0
    on_pressure(level, pool)
    return 1
";

/// The helpers' namespace dict (a strong reference kept for the life of the interpreter).
pub(crate) static HELPERS_DICT: AtomicPtr<PyObject> = AtomicPtr::new(core::ptr::null_mut());

/// A relief is wanted and nobody has taken it yet.
pub(crate) static PENDING: AtomicBool = AtomicBool::new(false);
/// Our entry is in CPython's pending-call queue.
pub(crate) static IN_QUEUE: AtomicBool = AtomicBool::new(false);
pub(crate) static REQUEST_LEVEL: AtomicU8 = AtomicU8::new(0);
pub(crate) static REQUEST_POOL: AtomicU8 = AtomicU8::new(0);

/// What the relief did, for the dump.
pub(crate) static RUNS: AtomicU64 = AtomicU64::new(0);
pub(crate) static ERRORS: AtomicU64 = AtomicU64::new(0);
pub(crate) static CUDA_CACHE_EMPTIED: AtomicU64 = AtomicU64::new(0);
pub(crate) static APP_CALLBACK_RUNS: AtomicU64 = AtomicU64::new(0);
pub(crate) static LAST_COLLECTED: AtomicI64 = AtomicI64::new(-1);
pub(crate) static LAST_HOST_BEFORE: AtomicU64 = AtomicU64::new(0);
pub(crate) static LAST_HOST_AFTER: AtomicU64 = AtomicU64::new(0);

/// A relief that gave back less than this of the pool it was asked for freed nothing: a
/// collection that finds a few small cycles in a loop's temporaries is no relief.
pub const RELIEF_FREED_MIN_BYTES: u64 = 1 << 20;
/// Doublings past which the wait is at its cap whatever the interval (2^40 ms is 35 years).
pub(crate) const BACKOFF_MAX_DOUBLINGS: u32 = 40;

/// Reliefs in a row that freed nothing, or periodic asks that found the last one not yet run;
/// reset when one frees something or the level or pool asked for changes.
pub(crate) static FRUITLESS: AtomicU32 = AtomicU32::new(0);

pub(crate) fn note_fruitless() {
    let _ = FRUITLESS.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        Some(n.saturating_add(1).min(BACKOFF_MAX_DOUBLINGS))
    });
}

/// `gc.isenabled()`; false when it cannot be asked.
///
/// # Safety
/// The caller holds the GIL.
pub(crate) unsafe fn collector_enabled(api: &Api) -> bool {
    // SAFETY: GIL held (caller's contract).
    let Some(helpers) = (unsafe { helpers(api) }) else {
        return false;
    };
    // SAFETY: GIL held; helpers is the helpers' namespace.
    unsafe { call(api, helpers, c"collector_enabled", None) == Some(1) }
}

pub(crate) fn level_name(level: u8) -> &'static CStr {
    if level >= LEVEL_CRITICAL {
        c"critical"
    } else {
        c"warn"
    }
}

/// Runs in CPython's main thread with the GIL. Always returns 0 with no exception set, so
/// nothing is raised into the app.
pub(crate) extern "C" fn relief(_: *mut c_void) -> c_int {
    IN_QUEUE.store(false, Ordering::Release);
    if !PENDING.swap(false, Ordering::AcqRel) {
        return 0;
    }
    if let Some(api) = API.get() {
        // SAFETY: we hold the GIL in a pending call.
        unsafe { take_request_and_run(api) };
    }
    0
}

/// # Safety
/// The caller holds the GIL and has just taken the PENDING flag.
pub(crate) unsafe fn take_request_and_run(api: &Api) {
    let level = REQUEST_LEVEL.swap(0, Ordering::AcqRel).max(LEVEL_WARN);
    let pool = REQUEST_POOL.load(Ordering::Acquire) as usize;
    // SAFETY: GIL held (caller's contract); every pointer used comes from CPython and each new
    // reference is released once.
    unsafe { run_relief(api, pool, level) };
}

/// # Safety
/// The caller holds the GIL of the main interpreter.
pub(crate) unsafe fn run_relief(api: &Api, pool: usize, level: u8) {
    RUNS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: GIL held (caller's contract).
    let Some(helpers) = (unsafe { helpers(api) }) else {
        return;
    };
    let pool_before = ledger::totals(pool).live;
    let host_before = ledger::totals(ledger::HOST).live;
    // SAFETY: GIL held.
    let collected = unsafe { call(api, helpers, c"collect", None) };
    let host_after = ledger::totals(ledger::HOST).live;
    LAST_COLLECTED.store(collected.unwrap_or(-1), Ordering::Relaxed);
    LAST_HOST_BEFORE.store(host_before, Ordering::Relaxed);
    LAST_HOST_AFTER.store(host_after, Ordering::Relaxed);
    // SAFETY: GIL held.
    let emptied = level >= LEVEL_CRITICAL
        && unsafe { call(api, helpers, c"empty_cuda_cache", None) } == Some(1);
    if emptied {
        CUDA_CACHE_EMPTIED.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: GIL held.
    let app = unsafe { call(api, helpers, c"app_callbacks", Some((level, pool))) } == Some(1);
    if app {
        APP_CALLBACK_RUNS.fetch_add(1, Ordering::Relaxed);
    }
    if pool_before.saturating_sub(ledger::totals(pool).live) >= RELIEF_FREED_MIN_BYTES {
        FRUITLESS.store(0, Ordering::Relaxed);
    } else {
        note_fruitless();
    }
    qlog!(
        Info,
        "gc collected {} objects; host {} -> {}{}{}",
        collected.unwrap_or(0),
        Bytes(host_before),
        Bytes(host_after),
        if emptied {
            "; torch CUDA cache emptied"
        } else {
            ""
        },
        if app { "; app callbacks ran" } else { "" }
    );
}

/// The helpers' namespace, compiled on first use.
///
/// # Safety
/// The caller holds the GIL.
pub(crate) unsafe fn helpers(api: &Api) -> Option<*mut PyObject> {
    let dict = HELPERS_DICT.load(Ordering::Acquire);
    if !dict.is_null() {
        return Some(dict);
    }
    // SAFETY: GIL held; PyDict_New returns a new reference or NULL with an exception set.
    let dict = unsafe { (api.dict_new)() };
    if dict.is_null() {
        // SAFETY: GIL held.
        unsafe { report_exception(api, core::ptr::null_mut(), "creating its namespace") };
        return None;
    }
    // SAFETY: GIL held; dict is a new dict and the builtins a borrowed reference the dict
    // takes its own reference to. A code object run without __builtins__ in its globals
    // would see no builtins on older CPython versions.
    unsafe {
        (api.dict_set_item_string)(dict, c"__builtins__".as_ptr(), (api.eval_get_builtins)())
    };
    // SAFETY: GIL held; HELPERS is NUL-terminated source, dict a valid globals dict.
    let result = unsafe {
        (api.run_string_flags)(
            HELPERS.as_ptr(),
            PY_FILE_INPUT,
            dict,
            dict,
            core::ptr::null_mut(),
        )
    };
    if result.is_null() {
        // SAFETY: GIL held.
        unsafe {
            report_exception(api, core::ptr::null_mut(), "compiling its helpers");
            (api.dec_ref)(dict);
        }
        return None;
    }
    // SAFETY: GIL held; result is a new reference.
    unsafe { (api.dec_ref)(result) };
    HELPERS_DICT.store(dict, Ordering::Release);
    Some(dict)
}

/// Calls helper `name` with `(level_name, pool)` when `args` is given; returns its int result,
/// or None when it raised (the exception is reported and cleared).
///
/// # Safety
/// The caller holds the GIL; `helpers` is the helpers' namespace dict.
pub(crate) unsafe fn call(
    api: &Api,
    helpers: *mut PyObject,
    name: &CStr,
    args: Option<(u8, usize)>,
) -> Option<i64> {
    // SAFETY: GIL held; a borrowed reference (or NULL, no exception set).
    let func = unsafe { (api.dict_get_item_string)(helpers, name.as_ptr()) };
    if func.is_null() {
        return None;
    }
    let tuple = match args {
        // SAFETY: GIL held.
        Some((level, pool)) => unsafe { args_tuple(api, level, pool) }?,
        None => core::ptr::null_mut(),
    };
    // SAFETY: GIL held; func is a callable, tuple a tuple or NULL (no arguments).
    let result = unsafe { (api.object_call_object)(func, tuple) };
    if !tuple.is_null() {
        // SAFETY: GIL held; our own new reference.
        unsafe { (api.dec_ref)(tuple) };
    }
    if result.is_null() {
        let what = name.to_str().unwrap_or("a helper");
        // SAFETY: GIL held; func is the callable that raised.
        unsafe { report_exception(api, func, what) };
        return None;
    }
    // SAFETY: GIL held; result is a new reference.
    let value = unsafe { (api.long_as_long_long)(result) };
    // SAFETY: GIL held.
    unsafe {
        (api.dec_ref)(result);
        if !(api.err_occurred)().is_null() {
            (api.err_clear)();
        }
    }
    Some(value)
}

/// `(level_name, pool)` as a new tuple.
///
/// # Safety
/// The caller holds the GIL.
pub(crate) unsafe fn args_tuple(api: &Api, level: u8, pool: usize) -> Option<*mut PyObject> {
    // SAFETY: GIL held; PyTuple_SetItem steals the item references, including on failure.
    unsafe {
        let tuple = (api.tuple_new)(2);
        if tuple.is_null() {
            report_exception(api, core::ptr::null_mut(), "building arguments");
            return None;
        }
        let name = (api.unicode_from_string)(level_name(level).as_ptr());
        let pool = (api.long_from_long)(pool as c_long);
        if name.is_null() || pool.is_null() {
            if !name.is_null() {
                (api.dec_ref)(name);
            }
            if !pool.is_null() {
                (api.dec_ref)(pool);
            }
            (api.dec_ref)(tuple);
            report_exception(api, core::ptr::null_mut(), "building arguments");
            return None;
        }
        (api.tuple_set_item)(tuple, 0, name);
        (api.tuple_set_item)(tuple, 1, pool);
        Some(tuple)
    }
}

/// Prints the pending exception through sys.unraisablehook (which also clears it) and logs.
///
/// # Safety
/// The caller holds the GIL.
pub(crate) unsafe fn report_exception(api: &Api, context: *mut PyObject, what: &str) {
    ERRORS.fetch_add(1, Ordering::Relaxed);
    qlog!(
        Error,
        "python relief: {what} raised an exception (cleared, not raised into the app)"
    );
    // SAFETY: GIL held. WriteUnraisable prints and clears; a SystemExit there does not exit.
    unsafe {
        if !(api.err_occurred)().is_null() {
            (api.err_write_unraisable)(context);
        }
        if !(api.err_occurred)().is_null() {
            (api.err_clear)();
        }
    }
}
