//! The interpreter: finding a CPython in the process at run time (`dlsym(RTLD_DEFAULT, ...)`,
//! only once a loaded object or the program looks like Python, since a failed dlsym allocates),
//! the C API functions the relief uses, and the hooks taken once it is up: the exit report
//! through `Py_AtExit` and the counting of pymalloc's arenas. Monitor thread (and the main
//! thread in a pending call); nothing links libpython.

use core::ffi::{c_char, c_int, c_long, c_void, CStr};
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::base::log::qlog;
use crate::runtime::arena;

pub(crate) type PyObject = c_void;

// The C signatures of the CPython functions used (CPython's stable ABI).
pub(crate) type IsInitialized = unsafe extern "C" fn() -> c_int;
pub(crate) type AddPendingCall =
    unsafe extern "C" fn(extern "C" fn(*mut c_void) -> c_int, *mut c_void) -> c_int;
pub(crate) type RunStringFlags = unsafe extern "C" fn(
    *const c_char,
    c_int,
    *mut PyObject,
    *mut PyObject,
    *mut c_void,
) -> *mut PyObject;
pub(crate) type NewObject = unsafe extern "C" fn() -> *mut PyObject;
pub(crate) type DictSetItemString =
    unsafe extern "C" fn(*mut PyObject, *const c_char, *mut PyObject) -> c_int;
pub(crate) type DictGetItemString =
    unsafe extern "C" fn(*mut PyObject, *const c_char) -> *mut PyObject;
pub(crate) type TupleNew = unsafe extern "C" fn(isize) -> *mut PyObject;
pub(crate) type TupleSetItem = unsafe extern "C" fn(*mut PyObject, isize, *mut PyObject) -> c_int;
pub(crate) type UnicodeFromString = unsafe extern "C" fn(*const c_char) -> *mut PyObject;
pub(crate) type LongFromLong = unsafe extern "C" fn(c_long) -> *mut PyObject;
pub(crate) type LongAsLongLong = unsafe extern "C" fn(*mut PyObject) -> i64;
pub(crate) type CallObject = unsafe extern "C" fn(*mut PyObject, *mut PyObject) -> *mut PyObject;
pub(crate) type ObjectFn = unsafe extern "C" fn(*mut PyObject);
pub(crate) type VoidFn = unsafe extern "C" fn();
pub(crate) type AtExit = unsafe extern "C" fn(extern "C" fn()) -> c_int;
pub(crate) type GilEnsure = unsafe extern "C" fn() -> c_int;
pub(crate) type GilRelease = unsafe extern "C" fn(c_int);
pub(crate) type IsFinalizing = unsafe extern "C" fn() -> c_int;

/// The CPython C API functions the relief uses, resolved once Python is up.
pub(crate) struct Api {
    pub(crate) is_initialized: IsInitialized,
    pub(crate) add_pending_call: AddPendingCall,
    pub(crate) run_string_flags: RunStringFlags,
    pub(crate) dict_new: NewObject,
    pub(crate) dict_set_item_string: DictSetItemString,
    pub(crate) dict_get_item_string: DictGetItemString,
    pub(crate) eval_get_builtins: NewObject,
    pub(crate) tuple_new: TupleNew,
    pub(crate) tuple_set_item: TupleSetItem,
    pub(crate) unicode_from_string: UnicodeFromString,
    pub(crate) long_from_long: LongFromLong,
    pub(crate) long_as_long_long: LongAsLongLong,
    pub(crate) object_call_object: CallObject,
    pub(crate) dec_ref: ObjectFn,
    pub(crate) err_occurred: NewObject,
    pub(crate) err_write_unraisable: ObjectFn,
    pub(crate) err_clear: VoidFn,
    pub(crate) at_exit: AtExit,
    pub(crate) gil_ensure: GilEnsure,
    pub(crate) gil_release: GilRelease,
    /// Py_IsFinalizing (3.13) or _Py_IsFinalizing (3.7 to 3.12), when either is exported.
    pub(crate) is_finalizing: Option<IsFinalizing>,
}

pub(crate) static ENABLED: AtomicBool = AtomicBool::new(true);
pub(crate) static API: OnceLock<Api> = OnceLock::new();
/// Py_AtExit registration of the exit report: not asked yet, queued to the main thread, done.
pub(crate) static AT_EXIT: AtomicU8 = AtomicU8::new(AT_EXIT_NOT_ASKED);
pub(crate) const AT_EXIT_NOT_ASKED: u8 = 0;
pub(crate) const AT_EXIT_QUEUED: u8 = 1;
pub(crate) const AT_EXIT_DONE: u8 = 2;

pub fn configure(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Looks a symbol up in the whole process.
pub(crate) fn symbol(name: &CStr) -> Option<usize> {
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
pub(crate) fn python_may_be_loaded() -> bool {
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

pub(crate) fn base_name(path: &[u8]) -> &[u8] {
    path.rsplit(|&b| b == b'/').next().unwrap_or(path)
}

pub(crate) fn resolve() -> Option<Api> {
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
pub(crate) fn api() -> Option<&'static Api> {
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
pub(crate) extern "C" fn register_exit_report(_: *mut c_void) -> c_int {
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
    if let Some(hook) = take_after_start() {
        hook();
    }
    0
}

/// A function to run once CPython is up (see [`run_after_start`]); 0 when none is waiting.
static AFTER_START: AtomicUsize = AtomicUsize::new(0);

/// Runs `hook` once, on CPython's main thread, right after the runtime is found initialised;
/// or on the monitor thread, through [`start_watch_over`], when no CPython has started by the
/// end of the monitor's start-up watch. For what CPython's start-up must not see: its signal
/// module records the handlers it finds then, and one it did not install itself reads back as
/// `None` from `signal.signal`, which a program cannot put back (the dump signal's handler
/// waits for this).
pub fn run_after_start(hook: fn()) {
    AFTER_START.store(hook as usize, Ordering::Release);
}

fn take_after_start() -> Option<fn()> {
    let hook = AFTER_START.swap(0, Ordering::AcqRel);
    // SAFETY: the only value stored, other than 0, is a `fn()` cast to usize by run_after_start.
    (hook != 0).then(|| unsafe { core::mem::transmute::<usize, fn()>(hook) })
}

/// On the monitor thread, once its watch for a starting CPython is over: a hook still waiting
/// runs now.
pub fn start_watch_over() {
    if AT_EXIT.load(Ordering::Acquire) != AT_EXIT_DONE {
        if let Some(hook) = take_after_start() {
            hook();
        }
    }
}

/// True when a CPython runtime may be in the process (its start is then waited for).
pub fn may_start() -> bool {
    python_may_be_loaded()
}

/// Installs the arena allocator that counts pymalloc's arenas (see arena.rs), when this CPython
/// has the API for it.
///
/// # Safety
/// No other thread can be taking an arena: the GIL is held, or the interpreter has not started.
pub(crate) unsafe fn count_arenas(when: &str) {
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
pub(crate) static EXIT_REPORT: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what runs when CPython finalizes (the exit report). Called once at load.
pub fn set_exit_report(report: fn()) {
    let _ = EXIT_REPORT.set(report);
}

pub(crate) extern "C" fn at_python_exit() {
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
