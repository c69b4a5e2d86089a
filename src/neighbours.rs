//! Neighbours the shim did not expect: whether this process's malloc is the shim's at all, and
//! where each malloc-family function goes when it is not.
//!
//! The shim governs the heap only when the process's `malloc`, as the global scope resolves it,
//! is the shim's own: preloaded first, as intended. It is not when another allocator was
//! preloaded before it (`LD_PRELOAD="libjemalloc.so.2 libqvshim.so"`), when the program defines
//! malloc itself, or when the library was dlopened after the program started. Then the shim
//! *passes through*: each of its malloc-family exports that a caller still reaches (the names
//! the other allocator leaves out, such as `reallocarray` or `__libc_malloc`, or a lookup on
//! the shim's own handle) forwards to the function the caller would have reached without the
//! shim, so no block ever crosses between two heaps. One line says what is not governed.
//!
//! The decision is made once, in the constructor, before any thread takes a credit slot; in
//! pass-through no thread ever gets one, so malloc's and free's fast paths are never taken and
//! the check costs them nothing (it sits on their slow paths). Nothing here runs on the
//! allocation path but [`next`], a load and a branch.

use core::ffi::{c_char, c_void, CStr};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::base::log::qlog;

/// Every malloc-family function the shim exports, in [`NAMES`] order.
#[derive(Clone, Copy)]
pub enum Name {
    Malloc,
    Free,
    Calloc,
    Realloc,
    Reallocarray,
    PosixMemalign,
    AlignedAlloc,
    Memalign,
    Valloc,
    Pvalloc,
    MallocUsableSize,
    Cfree,
    MallocTrim,
    Mallinfo,
    Mallinfo2,
    Mallopt,
    MallocStats,
    MallocInfo,
    LibcMalloc,
    LibcFree,
    LibcCalloc,
    LibcRealloc,
    LibcMemalign,
    LibcValloc,
    LibcPvalloc,
    LibcCfree,
    PosixMemalignAlias,
}

const NAME_COUNT: usize = 27;

/// The exported names, indexed by [`Name`].
const NAMES: [&CStr; NAME_COUNT] = [
    c"malloc",
    c"free",
    c"calloc",
    c"realloc",
    c"reallocarray",
    c"posix_memalign",
    c"aligned_alloc",
    c"memalign",
    c"valloc",
    c"pvalloc",
    c"malloc_usable_size",
    c"cfree",
    c"malloc_trim",
    c"mallinfo",
    c"mallinfo2",
    c"mallopt",
    c"malloc_stats",
    c"malloc_info",
    c"__libc_malloc",
    c"__libc_free",
    c"__libc_calloc",
    c"__libc_realloc",
    c"__libc_memalign",
    c"__libc_valloc",
    c"__libc_pvalloc",
    c"__libc_cfree",
    c"__posix_memalign",
];

/// Set once in the constructor when the process's malloc is not the shim's.
static PASSING_THROUGH: AtomicBool = AtomicBool::new(false);

/// Where each export forwards in pass-through; 0 when nothing else defines it (the shim then
/// serves the call itself, which only the shim's own blocks can reach).
static NEXT: [AtomicUsize; NAME_COUNT] = [const { AtomicUsize::new(0) }; NAME_COUNT];

/// True once the constructor found the process's malloc to be someone else's.
#[inline(always)]
pub fn passing_through() -> bool {
    PASSING_THROUGH.load(Ordering::Relaxed)
}

/// The address `name` forwards to in pass-through; None when the shim serves it (governing, or
/// nothing else defines it). The caller transmutes it to the export's own signature.
#[inline(always)]
pub fn next(name: Name) -> Option<usize> {
    if !passing_through() {
        return None;
    }
    match NEXT.get(name as usize)?.load(Ordering::Relaxed) {
        0 => None,
        address => Some(address),
    }
}

/// The base address of the object that defines `address`, with its file name.
fn defining_object(address: *const c_void) -> Option<(usize, &'static CStr)> {
    // SAFETY: Dl_info is pointers only; all-null is a valid value.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr only reads the loader's tables and writes info.
    if address.is_null() || unsafe { libc::dladdr(address, &mut info) } == 0 {
        return None;
    }
    let name = if info.dli_fname.is_null() {
        c"(unknown)"
    } else {
        // SAFETY: the loader's file names are NUL-terminated and live as long as the object.
        unsafe { CStr::from_ptr(info.dli_fname) }
    };
    Some((info.dli_fbase as usize, name))
}

/// dladdr1's request for the symbol table entry of the symbol found (dlfcn.h).
const RTLD_DL_SYMENT: i32 = 1;
/// st_shndx of a symbol the object does not define (elf.h).
const SHN_UNDEF: u16 = 0;

#[cfg(target_pointer_width = "64")]
type ElfSym = libc::Elf64_Sym;
#[cfg(target_pointer_width = "32")]
type ElfSym = libc::Elf32_Sym;

/// Whether `address` is an import stub rather than a definition: a program linked without PIE
/// that takes the address of a function it imports (CPython's `/usr/bin/python3` on Debian and
/// Ubuntu takes malloc's) gets a "canonical PLT entry": its own symbol table lists the function
/// as undefined but with the PLT entry's address as its value, so that every object sees one
/// address for it, and a global lookup returns that address. Calls through it still go where
/// the program's relocation sends them: the first definition after the program.
fn is_import_stub(address: *const c_void) -> bool {
    // SAFETY: Dl_info is pointers only; all-null is a valid value.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    let mut sym: *const ElfSym = core::ptr::null();
    // SAFETY: dladdr1 only reads the loader's tables and writes info and sym; with
    // RTLD_DL_SYMENT, sym receives a pointer into the object's symbol table (or null).
    let found = unsafe {
        libc::dladdr1(
            address,
            &mut info,
            (&mut sym as *mut *const ElfSym).cast(),
            RTLD_DL_SYMENT,
        )
    };
    // SAFETY: a non-null sym points into the symbol table of a loaded object, which stays.
    found != 0 && !sym.is_null() && unsafe { (*sym).st_shndx } == SHN_UNDEF
}

/// What [`first_definition_after_program`] walks with: this library's base, and the answer.
struct Walk {
    own: usize,
    found: Option<(usize, &'static CStr)>,
}

/// dl_iterate_phdr's callback: the objects come in load order, the program first, then what
/// LD_PRELOAD named, then the program's needed libraries: the global scope's order. Stops at the
/// first object after the program that defines malloc itself (or at this library).
unsafe extern "C" fn definition_walk(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    data: *mut c_void,
) -> i32 {
    // SAFETY: data is the Walk passed to dl_iterate_phdr below, alive for its call.
    let walk = unsafe { &mut *data.cast::<Walk>() };
    // SAFETY: the loader passes a valid dl_phdr_info for the duration of the callback.
    let name_ptr = unsafe { (*info).dlpi_name };
    if name_ptr.is_null() {
        return 0;
    }
    // SAFETY: the loader's object names are NUL-terminated and live as long as the object.
    let name = unsafe { CStr::from_ptr(name_ptr) };
    if name.to_bytes().is_empty() {
        return 0; // the program (and the vDSO's unnamed entry), whose stub brought us here
    }
    let real_dlopen = REAL_DLOPEN.load(Ordering::Acquire);
    if real_dlopen == 0 {
        return 1;
    }
    // SAFETY: REAL_DLOPEN holds glibc's dlopen (resolve_real_dlopen never stores ours).
    let dlopen: unsafe extern "C" fn(*const c_char, i32) -> *mut c_void =
        unsafe { core::mem::transmute(real_dlopen) };
    // SAFETY: a name of a loaded object; RTLD_NOLOAD only takes a reference to it.
    let handle = unsafe { dlopen(name.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
    if handle.is_null() {
        return 0;
    }
    // SAFETY: a valid handle and a NUL-terminated name. The handle's scope is the object and its
    // dependencies, so the answer is this object's only when dladdr names this object.
    let found = unsafe { crate::gpu::driver::real_dlsym(handle, c"malloc".as_ptr()) };
    // SAFETY: the reference taken by dlopen above is given back; the object stays loaded.
    unsafe { libc::dlclose(handle) };
    match defining_object(found) {
        Some((base, owner)) if owner.as_ptr() == name_ptr || owner == name => {
            walk.found = Some((base, owner));
            1
        }
        Some((base, _)) if base == walk.own => {
            walk.found = Some((base, name));
            1
        }
        _ => 0,
    }
}

/// Past a non-PIE program's import stub: the first object after the program that defines
/// malloc, in the global scope's order, with its file name; None when it cannot be told.
fn first_definition_after_program(own: usize) -> Option<(usize, &'static CStr)> {
    resolve_real_dlopen();
    let mut walk = Walk { own, found: None };
    // SAFETY: the callback only reads the loader's entries and writes walk, which outlives the
    // call; dlopen(RTLD_NOLOAD) and dlsym from inside it take the loader's recursive lock again
    // on this same thread, which glibc allows.
    unsafe { libc::dl_iterate_phdr(Some(definition_walk), (&mut walk as *mut Walk).cast()) };
    walk.found
}

/// The base address of this library.
fn own_base() -> usize {
    static ANCHOR: u8 = 0;
    defining_object((&ANCHOR as *const u8).cast()).map_or(0, |(base, _)| base)
}

/// What `handle` resolves `name` to, unless that is this library's own definition.
fn lookup_elsewhere(handle: *mut c_void, name: &CStr, own: usize) -> Option<usize> {
    // SAFETY: the handle is RTLD_DEFAULT or RTLD_NEXT and the name is NUL-terminated; the caller
    // glibc sees is this library, so RTLD_NEXT means "after libqvshim.so", as wanted here.
    let found = unsafe { crate::gpu::driver::real_dlsym(handle, name.as_ptr()) };
    let (base, _) = defining_object(found)?;
    (base != own).then_some(found as usize)
}

/// Decides, once at load, whether the shim governs this process's heap. When it does not, fills
/// the forwarding table, switches to pass-through and says in one line what is not governed.
/// Returns true when the shim governs the heap.
pub fn decide_at_load() -> bool {
    let own = own_base();
    // SAFETY: RTLD_DEFAULT and a NUL-terminated name.
    let malloc = unsafe { crate::gpu::driver::real_dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) };
    let Some((mut base, mut owner)) = defining_object(malloc) else {
        return true;
    };
    if base != own && is_import_stub(malloc) {
        // A program built without PIE (Debian's and Ubuntu's /usr/bin/python3) answered with
        // the PLT entry it calls malloc through: the definition its calls reach comes later.
        match first_definition_after_program(own) {
            Some(found) => (base, owner) = found,
            None => return true,
        }
    }
    if own == 0 || base == own {
        return true;
    }
    for (slot, name) in NEXT.iter().zip(NAMES) {
        // Without the shim, a caller would reach the global definition when there is one other
        // than ours, else the one after ours.
        let address = lookup_elsewhere(libc::RTLD_DEFAULT, name, own)
            .or_else(|| lookup_elsewhere(libc::RTLD_NEXT, name, own))
            .unwrap_or(0);
        slot.store(address, Ordering::Relaxed);
    }
    PASSING_THROUGH.store(true, Ordering::Release);
    if is_libc(owner) {
        qlog!(
            Warn,
            "loaded with dlopen, not preloaded: malloc stays {}'s and the host budget does not apply; GPU budgets and the C API still work",
            Shown(owner)
        );
    } else {
        qlog!(
            Warn,
            "malloc in this process is {}'s, loaded before qvshim: the host budget does not apply (heap allocations are not counted); GPU budgets still do",
            Shown(owner)
        );
    }
    false
}

fn is_libc(file: &CStr) -> bool {
    let bytes = file.to_bytes();
    let base = bytes.rsplit(|&b| b == b'/').next().unwrap_or(bytes);
    base.starts_with(b"libc.so") || base.starts_with(b"libc-")
}

/// A loader file name shown as text ("the program" when empty: the main executable).
struct Shown<'a>(&'a CStr);

impl core::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0.to_str() {
            Ok("") => f.write_str("the program"),
            Ok(text) => f.write_str(text),
            Err(_) => f.write_str("(a library with a non-UTF-8 name)"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RTLD_DEEPBIND.

/// `dlopen`'s flag that makes the opened library look in its own dependencies first.
const RTLD_DEEPBIND: i32 = 0x8;

/// glibc's `dlopen`, resolved on first use: what the shim's `dlopen` jumps to.
pub static REAL_DLOPEN: AtomicUsize = AtomicUsize::new(0);

#[cfg(target_arch = "x86_64")]
const DLOPEN_VERSIONS: [&CStr; 2] = [c"GLIBC_2.34", c"GLIBC_2.2.5"];
#[cfg(target_arch = "aarch64")]
const DLOPEN_VERSIONS: [&CStr; 2] = [c"GLIBC_2.34", c"GLIBC_2.17"];

fn resolve_real_dlopen() {
    if REAL_DLOPEN.load(Ordering::Acquire) != 0 {
        return;
    }
    let own = own_base();
    let found = DLOPEN_VERSIONS
        .iter()
        // SAFETY: both strings are NUL-terminated; RTLD_NEXT asks for the definition after ours.
        .map(|version| unsafe {
            libc::dlvsym(libc::RTLD_NEXT, c"dlopen".as_ptr(), version.as_ptr())
        })
        .find(|p| !p.is_null())
        // Never our own dlopen, however the loader answers: that would call itself.
        .filter(|&p| defining_object(p).is_some_and(|(base, _)| base != own))
        .map_or(0, |p| p as usize);
    REAL_DLOPEN.store(found, Ordering::Release);
}

/// The flags the shim's `dlopen` passes on for `flags`: RTLD_DEEPBIND is dropped while the shim
/// governs the heap, with one line naming the library, because a deep-bound library would bind
/// malloc and free to glibc's (its own dependency) while the program's are the shim's, and a
/// block passed between them would be freed into the wrong heap. Also resolves glibc's dlopen.
///
/// # Safety
/// `file` is null or NUL-terminated (dlopen's contract).
pub unsafe extern "C" fn dlopen_flags(file: *const c_char, flags: i32) -> i32 {
    resolve_real_dlopen();
    if flags & RTLD_DEEPBIND == 0 || file.is_null() || passing_through() {
        return flags;
    }
    // SAFETY: NUL-terminated (caller's contract).
    let name = unsafe { CStr::from_ptr(file) };
    qlog!(
        Warn,
        "{} opened without RTLD_DEEPBIND so that its malloc and free are the process's (qvshim's)",
        Shown(name)
    );
    flags & !RTLD_DEEPBIND
}
