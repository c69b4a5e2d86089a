//! CPython relief: when a pool rises to warn, the interpreter's main thread runs `gc.collect()`
//! and the app's callbacks (`sys.modules["qvshim"]._on_pressure(level, pool)`, which the Python
//! companion provides); at critical it also empties torch's CUDA cache (when torch is imported
//! and CUDA initialised).
//!
//! CPython is found at run time with `dlsym(RTLD_DEFAULT, ...)`: nothing links libpython, and a
//! process without Python never resolves anything. The monitor thread only queues the work with
//! `Py_AddPendingCall` (documented as callable from any thread without the GIL) and nudges the
//! main thread (see below); the work runs in the main thread, with the GIL, between two
//! bytecodes of the app, never inside an allocation. When the main thread is not executing
//! Python code (blocked in C with the GIL released), the nudge thread runs it instead, holding
//! the GIL, but only where the app's own collector could have run it: while `gc.isenabled()`,
//! or when the next step is a refusal ([`refusal_is_next`]). After `gc.disable()` the app
//! expects finalizers on its own threads only (a Tcl interpreter deleted by another thread
//! aborts the process). An exception raised there is printed through `sys.unraisablehook`,
//! logged and cleared; it never reaches the app.
//!
//! At most one relief is queued at a time; a rise while one is queued raises its level.
//!
//! While a pool stays above normal the monitor asks again every `QVSHIM_PURGE_INTERVAL`; a
//! relief that freed nothing doubles the wait before the next of those ([`backoff_wait_ms`]),
//! so that a program sitting at warn is not collected over and over for nothing.
//!
//! Over 500 lines: finding CPython, queuing a relief, the nudge thread and the relief run inside
//! the interpreter share one set of statics (the pending flag, the queue, the counters) and one
//! safety argument about the GIL. Splitting it along those lines is possible and left for later
//! (it is the one file of src/ past 500 lines with more than one concern).

use core::ffi::{c_char, c_int, c_long, c_void, CStr};
use core::sync::atomic::{
    AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering,
};
use std::sync::OnceLock;

use super::arena;
use crate::base::log::qlog;
use crate::base::log::Bytes;
use crate::ledger::{self, LEVEL_CRITICAL, LEVEL_WARN};

type PyObject = c_void;

// The C signatures of the CPython functions used (CPython's stable ABI).
type IsInitialized = unsafe extern "C" fn() -> c_int;
type AddPendingCall =
    unsafe extern "C" fn(extern "C" fn(*mut c_void) -> c_int, *mut c_void) -> c_int;
type RunStringFlags = unsafe extern "C" fn(
    *const c_char,
    c_int,
    *mut PyObject,
    *mut PyObject,
    *mut c_void,
) -> *mut PyObject;
type NewObject = unsafe extern "C" fn() -> *mut PyObject;
type DictSetItemString = unsafe extern "C" fn(*mut PyObject, *const c_char, *mut PyObject) -> c_int;
type DictGetItemString = unsafe extern "C" fn(*mut PyObject, *const c_char) -> *mut PyObject;
type TupleNew = unsafe extern "C" fn(isize) -> *mut PyObject;
type TupleSetItem = unsafe extern "C" fn(*mut PyObject, isize, *mut PyObject) -> c_int;
type UnicodeFromString = unsafe extern "C" fn(*const c_char) -> *mut PyObject;
type LongFromLong = unsafe extern "C" fn(c_long) -> *mut PyObject;
type LongAsLongLong = unsafe extern "C" fn(*mut PyObject) -> i64;
type CallObject = unsafe extern "C" fn(*mut PyObject, *mut PyObject) -> *mut PyObject;
type ObjectFn = unsafe extern "C" fn(*mut PyObject);
type VoidFn = unsafe extern "C" fn();
type AtExit = unsafe extern "C" fn(extern "C" fn()) -> c_int;
type GilEnsure = unsafe extern "C" fn() -> c_int;
type GilRelease = unsafe extern "C" fn(c_int);
type IsFinalizing = unsafe extern "C" fn() -> c_int;

/// The CPython C API functions the relief uses, resolved once Python is up.
struct Api {
    is_initialized: IsInitialized,
    add_pending_call: AddPendingCall,
    run_string_flags: RunStringFlags,
    dict_new: NewObject,
    dict_set_item_string: DictSetItemString,
    dict_get_item_string: DictGetItemString,
    eval_get_builtins: NewObject,
    tuple_new: TupleNew,
    tuple_set_item: TupleSetItem,
    unicode_from_string: UnicodeFromString,
    long_from_long: LongFromLong,
    long_as_long_long: LongAsLongLong,
    object_call_object: CallObject,
    dec_ref: ObjectFn,
    err_occurred: NewObject,
    err_write_unraisable: ObjectFn,
    err_clear: VoidFn,
    at_exit: AtExit,
    gil_ensure: GilEnsure,
    gil_release: GilRelease,
    /// Py_IsFinalizing (3.13) or _Py_IsFinalizing (3.7 to 3.12), when either is exported.
    is_finalizing: Option<IsFinalizing>,
}

/// `Py_file_input` in CPython's compile.h (stable since Python 2).
const PY_FILE_INPUT: c_int = 257;

/// The relief's Python side, compiled once into a private namespace (the app's modules and
/// `__main__` are not touched). Each step is its own function so that one raising does not
/// skip the others.
const HELPERS: &CStr = c"
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

static ENABLED: AtomicBool = AtomicBool::new(true);
static API: OnceLock<Api> = OnceLock::new();
/// Py_AtExit registration of the exit report: not asked yet, queued to the main thread, done.
static AT_EXIT: AtomicU8 = AtomicU8::new(AT_EXIT_NOT_ASKED);
const AT_EXIT_NOT_ASKED: u8 = 0;
const AT_EXIT_QUEUED: u8 = 1;
const AT_EXIT_DONE: u8 = 2;
/// The helpers' namespace dict (a strong reference kept for the life of the interpreter).
static HELPERS_DICT: AtomicPtr<PyObject> = AtomicPtr::new(core::ptr::null_mut());

/// A relief is wanted and nobody has taken it yet.
static PENDING: AtomicBool = AtomicBool::new(false);
/// Our entry is in CPython's pending-call queue.
static IN_QUEUE: AtomicBool = AtomicBool::new(false);
static NUDGE_THREAD_RUNS: AtomicU64 = AtomicU64::new(0);
static REQUEST_LEVEL: AtomicU8 = AtomicU8::new(0);
static REQUEST_POOL: AtomicU8 = AtomicU8::new(0);

/// What the relief did, for the dump.
static QUEUED: AtomicU64 = AtomicU64::new(0);
static RUNS: AtomicU64 = AtomicU64::new(0);
static ERRORS: AtomicU64 = AtomicU64::new(0);
static CUDA_CACHE_EMPTIED: AtomicU64 = AtomicU64::new(0);
static APP_CALLBACK_RUNS: AtomicU64 = AtomicU64::new(0);
static LAST_COLLECTED: AtomicI64 = AtomicI64::new(-1);
static LAST_HOST_BEFORE: AtomicU64 = AtomicU64::new(0);
static LAST_HOST_AFTER: AtomicU64 = AtomicU64::new(0);

/// A relief that gave back less than this of the pool it was asked for freed nothing: a
/// collection that finds a few small cycles in a loop's temporaries is no relief.
pub const RELIEF_FREED_MIN_BYTES: u64 = 1 << 20;
/// The wait between periodic reliefs that free nothing doubles up to this many times
/// `QVSHIM_PURGE_INTERVAL`...
pub const BACKOFF_MAX_FACTOR: u64 = 32;
/// ... or this, when longer, so that a very short interval still backs off far.
pub const BACKOFF_CAP_MIN_MS: u64 = 30_000;
/// Doublings past which the wait is at its cap whatever the interval (2^40 ms is 35 years).
const BACKOFF_MAX_DOUBLINGS: u32 = 40;

/// Reliefs in a row that freed nothing, or periodic asks that found the last one not yet run;
/// reset when one frees something or the level or pool asked for changes.
static FRUITLESS: AtomicU32 = AtomicU32::new(0);
/// When the last relief was asked for (monotonic ms), and for which pool and level.
static LAST_ASKED_MS: AtomicU64 = AtomicU64::new(0);
static LAST_ASKED_FOR: AtomicU32 = AtomicU32::new(u32::MAX);
/// Periodic reliefs skipped because the last ones freed nothing.
static BACKED_OFF: AtomicU64 = AtomicU64::new(0);

pub fn configure(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Looks a symbol up in the whole process.
fn symbol(name: &CStr) -> Option<usize> {
    // SAFETY: name is NUL-terminated; RTLD_DEFAULT searches the global scope.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if p.is_null() {
        // A failed dlsym keeps its message in memory from the host's malloc until dlerror()
        // has been called twice (the first call hands the message out, the second frees it).
        // SAFETY: dlerror has no preconditions.
        unsafe {
            libc::dlerror();
            libc::dlerror();
        }
        return None;
    }
    Some(p as usize)
}

/// True when a CPython runtime may be in the process: a loaded object named `libpython*`, or a
/// main program named `python*` (a statically linked interpreter). Checked before any dlsym,
/// because a failed dlsym allocates its error message through the host's malloc: the monitor
/// of a process without Python must not touch the host's ledger.
fn python_may_be_loaded() -> bool {
    extern "C" fn visit(info: *mut libc::dl_phdr_info, _size: usize, found: *mut c_void) -> c_int {
        // SAFETY: dl_iterate_phdr passes a valid info; its name is NULL or NUL-terminated.
        let name = unsafe { (*info).dlpi_name };
        if name.is_null() {
            return 0;
        }
        // SAFETY: as above.
        let path = unsafe { CStr::from_ptr(name) }.to_bytes();
        if base_name(path).starts_with(b"libpython") {
            // SAFETY: found points at the caller's c_int.
            unsafe { *found.cast::<c_int>() = 1 };
            return 1;
        }
        0
    }
    let mut found: c_int = 0;
    // SAFETY: visit has dl_iterate_phdr's callback signature; found outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut found as *mut c_int).cast()) };
    if found != 0 {
        return true;
    }
    let mut exe = [0u8; 4096];
    // SAFETY: the path is NUL-terminated and exe is writable for its length.
    let n = unsafe {
        libc::readlink(
            c"/proc/self/exe".as_ptr(),
            exe.as_mut_ptr().cast(),
            exe.len(),
        )
    };
    exe.get(..n.max(0) as usize)
        .is_some_and(|path| base_name(path).starts_with(b"python"))
}

fn base_name(path: &[u8]) -> &[u8] {
    path.rsplit(|&b| b == b'/').next().unwrap_or(path)
}

fn resolve() -> Option<Api> {
    macro_rules! f {
        ($name:literal, $t:ty) => {{
            let address = symbol($name)?;
            // SAFETY: the symbol is the CPython C API function of that name, whose C signature
            // is $t (CPython's stable ABI).
            unsafe { core::mem::transmute::<usize, $t>(address) }
        }};
    }
    Some(Api {
        is_initialized: f!(c"Py_IsInitialized", IsInitialized),
        add_pending_call: f!(c"Py_AddPendingCall", AddPendingCall),
        run_string_flags: f!(c"PyRun_StringFlags", RunStringFlags),
        dict_new: f!(c"PyDict_New", NewObject),
        dict_set_item_string: f!(c"PyDict_SetItemString", DictSetItemString),
        dict_get_item_string: f!(c"PyDict_GetItemString", DictGetItemString),
        eval_get_builtins: f!(c"PyEval_GetBuiltins", NewObject),
        tuple_new: f!(c"PyTuple_New", TupleNew),
        tuple_set_item: f!(c"PyTuple_SetItem", TupleSetItem),
        unicode_from_string: f!(c"PyUnicode_FromString", UnicodeFromString),
        long_from_long: f!(c"PyLong_FromLong", LongFromLong),
        long_as_long_long: f!(c"PyLong_AsLongLong", LongAsLongLong),
        object_call_object: f!(c"PyObject_CallObject", CallObject),
        dec_ref: f!(c"Py_DecRef", ObjectFn),
        err_occurred: f!(c"PyErr_Occurred", NewObject),
        err_write_unraisable: f!(c"PyErr_WriteUnraisable", ObjectFn),
        err_clear: f!(c"PyErr_Clear", VoidFn),
        at_exit: f!(c"Py_AtExit", AtExit),
        gil_ensure: f!(c"PyGILState_Ensure", GilEnsure),
        gil_release: f!(c"PyGILState_Release", GilRelease),
        is_finalizing: symbol(c"Py_IsFinalizing")
            .or_else(|| symbol(c"_Py_IsFinalizing"))
            // SAFETY: either function takes nothing and returns an int.
            .map(|address| unsafe { core::mem::transmute::<usize, IsFinalizing>(address) }),
    })
}

/// The API when this process runs an initialised CPython. Monitor thread only (dlsym).
fn api() -> Option<&'static Api> {
    let api = match API.get() {
        Some(api) => api,
        None => {
            // One look at the loaded objects a tick in a process without Python; the symbols
            // once it has one.
            if !python_may_be_loaded() {
                return None;
            }
            symbol(c"Py_IsInitialized")?;
            let found = resolve()?;
            API.get_or_init(|| found)
        }
    };
    // SAFETY: Py_IsInitialized only reads a runtime flag; it needs no GIL.
    if unsafe { (api.is_initialized)() } == 0 {
        return None;
    }
    if AT_EXIT
        .compare_exchange(
            AT_EXIT_NOT_ASKED,
            AT_EXIT_QUEUED,
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_ok()
    {
        // Py_AtExit writes CPython's table without a lock, as extension modules do with the
        // GIL held: so it is called from a pending call, in the main thread, with the GIL.
        // SAFETY: documented as callable from any thread without the GIL.
        if unsafe { (api.add_pending_call)(register_exit_report, core::ptr::null_mut()) } != 0 {
            AT_EXIT.store(AT_EXIT_NOT_ASKED, Ordering::Release);
        }
    }
    Some(api)
}

/// Registers the exit report with Py_AtExit, whose functions Py_FinalizeEx runs, also before
/// an unhandled KeyboardInterrupt ends the process with SIGINT (where atexit handlers never
/// run). Runs in CPython's main thread with the GIL; only once the runtime is initialised,
/// which would otherwise reset the table.
extern "C" fn register_exit_report(_: *mut c_void) -> c_int {
    let Some(api) = API.get() else {
        return 0;
    };
    // SAFETY: the GIL is held in a pending call; at_python_exit takes nothing.
    let registered = unsafe { (api.at_exit)(at_python_exit) } == 0;
    AT_EXIT.store(AT_EXIT_DONE, Ordering::Release);
    if ENABLED.load(Ordering::Relaxed) {
        // SAFETY: the GIL is held, so no other thread is taking an arena.
        unsafe { count_arenas("from the main thread") };
    }
    qlog!(
        Debug,
        "CPython found; exit report {}",
        if registered {
            "registered with Py_AtExit"
        } else {
            "left to atexit (Py_AtExit table full)"
        }
    );
    0
}

/// Installs the arena allocator that counts pymalloc's arenas (see arena.rs), when this CPython
/// has the API for it.
///
/// # Safety
/// No other thread can be taking an arena: the GIL is held, or the interpreter has not started.
unsafe fn count_arenas(when: &str) {
    let (Some(get), Some(set)) = (
        symbol(c"PyObject_GetArenaAllocator"),
        symbol(c"PyObject_SetArenaAllocator"),
    ) else {
        return;
    };
    // SAFETY: the symbols are CPython's functions of those names, with these signatures; the
    // caller's contract covers the rest.
    let installed = unsafe {
        arena::install(
            core::mem::transmute::<usize, arena::GetArenaAllocator>(get),
            core::mem::transmute::<usize, arena::SetArenaAllocator>(set),
        )
    };
    if installed {
        qlog!(
            Debug,
            "counting CPython's small-object arenas (installed {when})"
        );
    }
}

/// At load, before `main`: when the process is a CPython that has not started yet, counts its
/// arenas from the very first. Otherwise the first pending call in the main thread does it.
pub fn count_arenas_before_start() {
    if !ENABLED.load(Ordering::Relaxed) || !python_may_be_loaded() {
        return;
    }
    let Some(is_initialized) = symbol(c"Py_IsInitialized") else {
        return;
    };
    // SAFETY: Py_IsInitialized takes nothing and only reads a runtime flag.
    let is_initialized = unsafe { core::mem::transmute::<usize, IsInitialized>(is_initialized) };
    // SAFETY: as above.
    if unsafe { is_initialized() } == 0 {
        // SAFETY: the interpreter has not started: no thread can be taking an arena.
        unsafe { count_arenas("at load") };
    }
}

/// What CPython's exit hook calls: the exit report, handed down by the crate root at load (so
/// that the runtime layer never reaches up into the report).
static EXIT_REPORT: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what runs when CPython finalizes (the exit report). Called once at load.
pub fn set_exit_report(report: fn()) {
    let _ = EXIT_REPORT.set(report);
}

extern "C" fn at_python_exit() {
    if let Some(report) = EXIT_REPORT.get() {
        report();
    }
}

/// Looks for an initialised CPython, so that its exit is seen. Monitor thread, each tick until
/// found.
pub fn probe() {
    if AT_EXIT.load(Ordering::Relaxed) == AT_EXIT_NOT_ASKED {
        let _ = api();
    }
}

/// True while CPython is linked into the process but not yet initialised: the monitor looks
/// again soon, so that an early exit is reported too.
pub fn awaiting_start() -> bool {
    API.get().is_some() && AT_EXIT.load(Ordering::Relaxed) != AT_EXIT_DONE
}

/// True when this process runs CPython (as far as the monitor has looked).
pub fn detected() -> bool {
    API.get().is_some()
}

/// Queues a relief for `pool`, which rose to `level`, in the main thread; true when one was
/// queued now or is already waiting. A rise starts the backoff afresh. Monitor thread only.
pub fn request_relief(pool: usize, level: u8) -> bool {
    if !ENABLED.load(Ordering::Relaxed) || level < LEVEL_WARN {
        return false;
    }
    FRUITLESS.store(0, Ordering::Relaxed);
    LAST_ASKED_FOR.store(asked_for(pool, level), Ordering::Relaxed);
    queue_relief(pool, level)
}

/// The periodic relief, asked for every `interval_ms` (`QVSHIM_PURGE_INTERVAL`) while `pool`
/// stays at `level` (warn or critical); true when one was queued now or is already waiting.
/// Skipped until [`backoff_wait_ms`] has passed since the last one was asked for. Monitor
/// thread only.
pub fn request_periodic_relief(pool: usize, level: u8, interval_ms: u64) -> bool {
    if !ENABLED.load(Ordering::Relaxed) || level < LEVEL_WARN {
        return false;
    }
    if LAST_ASKED_FOR.swap(asked_for(pool, level), Ordering::Relaxed) != asked_for(pool, level) {
        FRUITLESS.store(0, Ordering::Relaxed);
    }
    let since_ms =
        crate::base::clock::now_ms().saturating_sub(LAST_ASKED_MS.load(Ordering::Relaxed));
    if since_ms < backoff_wait_ms(interval_ms, FRUITLESS.load(Ordering::Relaxed)) {
        BACKED_OFF.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    if PENDING.load(Ordering::Acquire) {
        // The last one is still waiting for the main thread: asking again frees nothing either.
        note_fruitless();
    }
    queue_relief(pool, level)
}

/// How long after the last relief the periodic one is asked for again, after `fruitless`
/// reliefs in a row freed nothing: `interval_ms` doubled that many times, up to 32 times
/// `interval_ms` or 30 s, whichever is longer.
pub fn backoff_wait_ms(interval_ms: u64, fruitless: u32) -> u64 {
    let cap_ms = interval_ms
        .saturating_mul(BACKOFF_MAX_FACTOR)
        .max(BACKOFF_CAP_MIN_MS);
    interval_ms
        .saturating_mul(1u64 << fruitless.min(BACKOFF_MAX_DOUBLINGS))
        .min(cap_ms)
}

fn asked_for(pool: usize, level: u8) -> u32 {
    (pool as u32) << 8 | level as u32
}

fn note_fruitless() {
    let _ = FRUITLESS.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        Some(n.saturating_add(1).min(BACKOFF_MAX_DOUBLINGS))
    });
}

/// Queues the relief; true when one was queued now or is already waiting.
fn queue_relief(pool: usize, level: u8) -> bool {
    let Some(api) = api() else {
        return false;
    };
    LAST_ASKED_MS.store(crate::base::clock::now_ms(), Ordering::Relaxed);
    REQUEST_LEVEL.fetch_max(level, Ordering::AcqRel);
    REQUEST_POOL.store(pool as u8, Ordering::Release);
    PENDING.store(true, Ordering::Release);
    // One entry in CPython's queue at a time: an entry already there runs this request too.
    if !IN_QUEUE.swap(true, Ordering::AcqRel) {
        // SAFETY: documented as callable from any thread without the GIL; relief has the
        // Py_AddPendingCall callback signature.
        if unsafe { (api.add_pending_call)(relief, core::ptr::null_mut()) } != 0 {
            IN_QUEUE.store(false, Ordering::Release);
            qlog!(
                Warn,
                "python relief not queued: CPython's pending-call queue is full; the nudge \
                 thread will run it"
            );
        } else {
            QUEUED.fetch_add(1, Ordering::Relaxed);
        }
    }
    nudge();
    true
}

// ---------------------------------------------------------------------------------------------
// The nudge: CPython 3.9 to 3.12 do not interrupt the main thread for a pending call added
// from another thread (cpython issue 95820); the main thread runs it only the next time it
// takes the GIL again. A busy main thread holding the GIL would never run it. Asking for the
// GIL from another thread makes the main thread stop at the next bytecode boundary (after the
// switch interval, 5 ms by default), where it runs pending calls first and then hands the GIL
// over. That waiting is done by a thread of its own, so the monitor never blocks on the GIL.
//
// When the relief is still waiting after the nudge thread got and gave back the GIL, the main
// thread is not executing Python code: it is in a call that released the GIL (time.sleep(),
// I/O, thread.join(), future.result()). It gets [`MAIN_THREAD_GRACE_MS`] to come back and run
// the relief itself (a main thread sleeping in short steps does). After that the nudge thread
// runs it, holding the GIL, so memory comes back while other threads allocate, but only while
// the app's collector is enabled (its own collections could then run on any of its threads) or
// when the next step is a refusal. Otherwise the relief waits for the main thread, and at
// critical the nudge thread watches for the pool to come within its reserve. Whoever takes the
// PENDING flag first runs it.

/// How long a main thread outside Python code has to take a relief before the nudge thread
/// runs it, where it may (the app's collector on, or the next step a refusal).
pub const MAIN_THREAD_GRACE_MS: u64 = 20;

/// How often the nudge thread looks whether a pool at critical came within its reserve, while
/// a relief waits for a main thread that is outside Python code and the app's collector is off.
pub const REFUSAL_WATCH_STEP_MS: u64 = 1;

/// The nudge thread's stack: the relief may run Python code on it (gc finalizers, the app's
/// callbacks), so it gets what a Python thread gets by default on Linux.
pub const NUDGE_STACK_BYTES: usize = 8 << 20;

static NUDGE_BELL: AtomicU32 = AtomicU32::new(0);
/// The process the nudge thread was started in (a fork child starts its own).
static NUDGER_PID: AtomicI32 = AtomicI32::new(0);

fn nudge() {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    if NUDGER_PID.load(Ordering::Acquire) != pid {
        if !crate::base::threads::spawn_thread(c"qvshim-nudge", NUDGE_STACK_BYTES, nudger_main) {
            qlog!(Warn, "could not start the python nudge thread");
            return;
        }
        NUDGER_PID.store(pid, Ordering::Release);
    }
    NUDGE_BELL.fetch_add(1, Ordering::Release);
    // SAFETY: FUTEX_WAKE on a valid, static, aligned u32.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            NUDGE_BELL.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        )
    };
}

/// CPython can take a thread's GIL request now: initialised and not finalizing (a thread
/// taking the GIL during finalization is ended by CPython).
fn gil_usable(api: &Api) -> bool {
    // SAFETY: both only read runtime flags.
    unsafe {
        (api.is_initialized)() != 0 && api.is_finalizing.is_none_or(|finalizing| finalizing() == 0)
    }
}

extern "C" fn nudger_main(_: *mut c_void) -> *mut c_void {
    nudger()
}

/// Waits up to `ms` for someone to take the relief; true when it was taken. The wait ends
/// early when a pool comes to its refusal step, or one at that step loses half of what was
/// left of its budget, while it lasts: other threads are filling it faster than the main
/// thread comes back.
fn taken_within_ms(ms: u64) -> bool {
    const STEP_MS: u64 = 1;
    let left_at_start = least_left_at_refusal_step();
    for _ in 0..ms / STEP_MS {
        if !PENDING.load(Ordering::Acquire) {
            return true;
        }
        if let Some(left) = least_left_at_refusal_step() {
            if left <= left_at_start.unwrap_or(u64::MAX) / 2 {
                return false;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(STEP_MS));
    }
    !PENDING.load(Ordering::Acquire)
}

fn nudger() -> ! {
    loop {
        let seen = NUDGE_BELL.load(Ordering::Acquire);
        if let Some(api) = API.get().filter(|_| PENDING.load(Ordering::Acquire)) {
            if gil_usable(api) {
                // A main thread executing Python code runs the relief before it hands the GIL
                // over.
                // SAFETY: CPython is initialised and not finalizing; Ensure is balanced by
                // Release on this thread at once.
                unsafe {
                    let state = (api.gil_ensure)();
                    (api.gil_release)(state);
                }
            }
            if !taken_within_ms(MAIN_THREAD_GRACE_MS) {
                run_for_a_main_thread_outside_python(api, seen);
            }
        }
        // SAFETY: FUTEX_WAIT on a valid, static, aligned u32, no timeout.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                NUDGE_BELL.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                seen,
                core::ptr::null::<libc::timespec>(),
            )
        };
    }
}

/// The main thread is outside Python code and left the relief waiting: runs it here when the
/// app's own collector could have (it is enabled) or the next step is a refusal; otherwise
/// leaves it to the main thread, watching a pool at critical for its refusal step. Returns
/// when the relief was taken, left to the main thread, or the bell rang again (`bell` is the
/// value it had).
fn run_for_a_main_thread_outside_python(api: &Api, bell: u32) {
    loop {
        if !PENDING.load(Ordering::Acquire) || !gil_usable(api) {
            return;
        }
        let refusal_next = refusal_is_next();
        // SAFETY: CPython is initialised and not finalizing; Ensure is balanced by Release on
        // this thread. The collector's state is read with the GIL held and the relief runs
        // under the same hold, so the app cannot turn it off in between.
        let may_run = unsafe {
            let state = (api.gil_ensure)();
            let may_run = refusal_next || collector_enabled(api);
            if may_run && PENDING.swap(false, Ordering::AcqRel) {
                NUDGE_THREAD_RUNS.fetch_add(1, Ordering::Relaxed);
                take_request_and_run(api);
            }
            (api.gil_release)(state);
            may_run
        };
        if may_run {
            return;
        }
        // Left to the main thread. A pool at warn that rises to critical rings the bell; one at
        // critical can come within its reserve without a level change, so it is watched.
        loop {
            if !PENDING.load(Ordering::Acquire)
                || NUDGE_BELL.load(Ordering::Acquire) != bell
                || !any_pool_critical()
            {
                return;
            }
            if refusal_is_next() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(REFUSAL_WATCH_STEP_MS));
        }
    }
}

fn any_pool_critical() -> bool {
    (0..ledger::pool_count())
        .filter_map(ledger::pool)
        .any(|pool| pool.level() >= LEVEL_CRITICAL)
}

/// True when the next step of some pool is a refusal: it is at critical and what is left of its
/// effective budget is no more than its reserve (`QVSHIM_RESERVE` for the host pool, 64 MiB by
/// default; a pool without a reserve, as GPU pools are, only once it is full). Only then may a
/// thread of the shim's own run a collection the app turned off: the alternative is a
/// `MemoryError` (or a NULL) in the app.
fn refusal_is_next() -> bool {
    least_left_at_refusal_step().is_some()
}

/// What is left of the effective budget of the fullest pool at its refusal step, if any.
fn least_left_at_refusal_step() -> Option<u64> {
    (0..ledger::pool_count())
        .filter_map(ledger::pool)
        .filter(|pool| pool.level() >= LEVEL_CRITICAL)
        .filter_map(|pool| {
            let left = pool.effective().saturating_sub(pool.committed());
            (left <= pool.reserve()).then_some(left)
        })
        .min()
}

/// `gc.isenabled()`; false when it cannot be asked.
///
/// # Safety
/// The caller holds the GIL.
unsafe fn collector_enabled(api: &Api) -> bool {
    // SAFETY: GIL held (caller's contract).
    let Some(helpers) = (unsafe { helpers(api) }) else {
        return false;
    };
    // SAFETY: GIL held; helpers is the helpers' namespace.
    unsafe { call(api, helpers, c"collector_enabled", None) == Some(1) }
}

fn level_name(level: u8) -> &'static CStr {
    if level >= LEVEL_CRITICAL {
        c"critical"
    } else {
        c"warn"
    }
}

/// Runs in CPython's main thread with the GIL. Always returns 0 with no exception set, so
/// nothing is raised into the app.
extern "C" fn relief(_: *mut c_void) -> c_int {
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
unsafe fn take_request_and_run(api: &Api) {
    let level = REQUEST_LEVEL.swap(0, Ordering::AcqRel).max(LEVEL_WARN);
    let pool = REQUEST_POOL.load(Ordering::Acquire) as usize;
    // SAFETY: GIL held (caller's contract); every pointer used comes from CPython and each new
    // reference is released once.
    unsafe { run_relief(api, pool, level) };
}

/// # Safety
/// The caller holds the GIL of the main interpreter.
unsafe fn run_relief(api: &Api, pool: usize, level: u8) {
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
unsafe fn helpers(api: &Api) -> Option<*mut PyObject> {
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
unsafe fn call(
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
unsafe fn args_tuple(api: &Api, level: u8, pool: usize) -> Option<*mut PyObject> {
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
unsafe fn report_exception(api: &Api, context: *mut PyObject, what: &str) {
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

/// The relief's figures for the dump.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub enabled: bool,
    pub detected: bool,
    pub queued: u64,
    pub runs: u64,
    /// Reliefs the nudge thread ran because the main thread was not executing Python code.
    pub nudge_thread_runs: u64,
    pub errors: u64,
    pub cuda_cache_emptied: u64,
    pub app_callback_runs: u64,
    /// Objects the last gc.collect() found unreachable; -1 before the first.
    pub last_collected: i64,
    pub last_host_before: u64,
    pub last_host_after: u64,
    /// Reliefs in a row that freed nothing (the periodic one waits 2^this intervals).
    pub fruitless: u64,
    /// Periodic reliefs skipped while backing off.
    pub backed_off: u64,
}

pub fn stats() -> Stats {
    Stats {
        enabled: ENABLED.load(Ordering::Relaxed),
        detected: detected(),
        queued: QUEUED.load(Ordering::Relaxed),
        runs: RUNS.load(Ordering::Relaxed),
        nudge_thread_runs: NUDGE_THREAD_RUNS.load(Ordering::Relaxed),
        errors: ERRORS.load(Ordering::Relaxed),
        cuda_cache_emptied: CUDA_CACHE_EMPTIED.load(Ordering::Relaxed),
        app_callback_runs: APP_CALLBACK_RUNS.load(Ordering::Relaxed),
        last_collected: LAST_COLLECTED.load(Ordering::Relaxed),
        last_host_before: LAST_HOST_BEFORE.load(Ordering::Relaxed),
        last_host_after: LAST_HOST_AFTER.load(Ordering::Relaxed),
        fruitless: FRUITLESS.load(Ordering::Relaxed) as u64,
        backed_off: BACKED_OFF.load(Ordering::Relaxed),
    }
}

/// In a fork child the next rise queues afresh. An entry the parent had queued stays in the
/// child's CPython queue and runs there as a no-op (or takes the child's next request).
pub fn after_fork_child() {
    arena::after_fork_child();
    PENDING.store(false, Ordering::Relaxed);
    IN_QUEUE.store(false, Ordering::Relaxed);
    REQUEST_LEVEL.store(0, Ordering::Relaxed);
    FRUITLESS.store(0, Ordering::Relaxed);
    LAST_ASKED_MS.store(0, Ordering::Relaxed);
    LAST_ASKED_FOR.store(u32::MAX, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_interval_up_to_its_cap() {
        let cases: &[(u64, u32, u64)] = &[
            // (interval ms, fruitless reliefs in a row, wait ms)
            (10, 0, 10),
            (10, 1, 20),
            (10, 5, 320),
            (10, 11, 20_480),
            (10, 12, BACKOFF_CAP_MIN_MS),
            (10, u32::MAX, BACKOFF_CAP_MIN_MS),
            (30_000, 0, 30_000),
            (30_000, 5, 30_000 * BACKOFF_MAX_FACTOR),
            (30_000, 40, 30_000 * BACKOFF_MAX_FACTOR),
            (u64::MAX, 3, u64::MAX),
        ];
        for &(interval_ms, fruitless, wait_ms) in cases {
            assert_eq!(
                backoff_wait_ms(interval_ms, fruitless),
                wait_ms,
                "interval {interval_ms} ms after {fruitless} fruitless reliefs"
            );
        }
    }
}
