//! PROTOTYPE, built only with the `extent-prototype` cargo feature (off by default; never the
//! library main ships). Issue 13's other design, measured in docs/BENCHMARKS.md: the malloc
//! family goes straight to jemalloc (see the `cfg(feature = "extent-prototype")` early returns
//! in [`crate::heap`]) and the host budget is enforced where jemalloc gets its memory, in the
//! extent hooks of every automatic arena.
//!
//! What is counted here is pages jemalloc holds mapped (every extent between its alloc and
//! its dalloc hook, dirty pages included until decay or a purge unmaps them), not bytes asked
//! for. jemalloc is configured (`_rjem_malloc_conf` below) with `retain:false`, so that freed
//! extents are unmapped (and uncounted) once purged instead of kept as virtual memory that the
//! hooks would never see reused, and with `oversize_threshold:0`, so that no lazily created
//! huge arena escapes the hooks.
//!
//! What this prototype does not do (docs/BENCHMARKS.md says what that costs users): it feeds no
//! large-allocation table (the dump and cuMemHostRegister see none), keeps no per-thread live
//! figures, leaves the pass-through to another preloaded allocator out, does not hook arenas a
//! program creates itself with `arenas.create`, and counts nothing jemalloc mapped before the
//! constructor installed the hooks. The purge before a refusal runs `arena.4096.purge` from
//! inside jemalloc's alloc hook (jemalloc marks the thread reentrant around hooks): it did not
//! deadlock in the two-thread storm of scripts/bench-budget, which is all that was checked.

use core::ffi::{c_char, c_uint, c_void};
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use tikv_jemalloc_sys as je;

use crate::ledger;

/// jemalloc's options for this design (read once, when jemalloc initialises): see the module
/// documentation for why each.
// jemalloc's prefixed build (tikv-jemalloc-sys) reads its compiled-in options from this name.
#[allow(non_upper_case_globals)]
#[no_mangle]
#[used]
pub static _rjem_malloc_conf: &u8 = &b"retain:false,oversize_threshold:0\0"[0];

/// Extents up to this size (the slabs of small size classes, small large blocks) may use the
/// host pool's reserve past the budget, so that small requests still succeed when a large one
/// was just refused.
const RESERVE_EXTENT_MAX_BYTES: usize = 64 << 10;

/// "arena.<MALLCTL_ARENAS_ALL>.purge".
const PURGE_ALL_ARENAS: &[u8] = b"arena.4096.purge\0";

/// Bytes mapped through our hooks and not yet unmapped: what the host pool was charged for
/// extents. An extent mapped before the hooks were installed is never charged, so its unmapping
/// releases only what this count holds.
static MAPPED_BYTES: AtomicU64 = AtomicU64::new(0);

/// jemalloc's default hooks, read from arena 0 before ours replace them.
static DEFAULT_HOOKS: AtomicPtr<je::extent_hooks_t> = AtomicPtr::new(ptr::null_mut());

/// Marks the library as the prototype for the benchmarks (scripts/bench.d/alloc/common.h), and
/// reads the bytes counted through the hooks.
#[no_mangle]
pub extern "C" fn qvshim_extent_prototype() -> u64 {
    MAPPED_BYTES.load(Ordering::Relaxed)
}

fn defaults() -> Option<&'static je::extent_hooks_t> {
    // SAFETY: set once, before our hooks are installed, to jemalloc's static default table.
    unsafe { DEFAULT_HOOKS.load(Ordering::Acquire).as_ref() }
}

fn charge(bytes: u64, may_use_reserve: bool) -> bool {
    let pool = ledger::host();
    if pool.try_commit(bytes, may_use_reserve) {
        MAPPED_BYTES.fetch_add(bytes, Ordering::Relaxed);
        return true;
    }
    false
}

fn uncharge(bytes: u64) {
    let mut current = MAPPED_BYTES.load(Ordering::Relaxed);
    loop {
        let taken = bytes.min(current);
        match MAPPED_BYTES.compare_exchange_weak(
            current,
            current - taken,
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                ledger::host().release(taken);
                return;
            }
            Err(seen) => current = seen,
        }
    }
}

fn purge_all() {
    // SAFETY: a NUL-terminated void control with no old or new value.
    unsafe {
        je::mallctl(
            PURGE_ALL_ARENAS.as_ptr().cast(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
            0,
        )
    };
}

/// The alloc hook: charge the extent, purging every arena once before refusing.
unsafe extern "C" fn hook_alloc(
    _hooks: *mut je::extent_hooks_t,
    new_addr: *mut c_void,
    size: usize,
    alignment: usize,
    zero: *mut bool,
    commit: *mut bool,
    arena_ind: c_uint,
) -> *mut c_void {
    let Some(alloc) = defaults().and_then(|d| d.alloc) else {
        return ptr::null_mut();
    };
    let may_use_reserve = size <= RESERVE_EXTENT_MAX_BYTES;
    if !charge(size as u64, may_use_reserve) {
        // Dirty pages count until unmapped: give them back before saying no.
        purge_all();
        if !charge(size as u64, may_use_reserve) {
            ledger::host().record_budget_refusal(size as u64);
            return ptr::null_mut();
        }
    }
    let default = DEFAULT_HOOKS.load(Ordering::Acquire);
    // SAFETY: jemalloc's own default alloc hook, called with jemalloc's arguments unchanged.
    let p = unsafe { alloc(default, new_addr, size, alignment, zero, commit, arena_ind) };
    if p.is_null() {
        uncharge(size as u64);
    }
    p
}

/// The dalloc hook: the default unmaps (returns false) unless it opts out; only then uncount.
unsafe extern "C" fn hook_dalloc(
    _hooks: *mut je::extent_hooks_t,
    addr: *mut c_void,
    size: usize,
    committed: bool,
    arena_ind: c_uint,
) -> bool {
    let Some(dalloc) = defaults().and_then(|d| d.dalloc) else {
        return true;
    };
    let default = DEFAULT_HOOKS.load(Ordering::Acquire);
    // SAFETY: jemalloc's own default dalloc hook, arguments unchanged.
    let kept = unsafe { dalloc(default, addr, size, committed, arena_ind) };
    if !kept {
        uncharge(size as u64);
    }
    kept
}

/// The destroy hook (arena destruction): always unmaps.
unsafe extern "C" fn hook_destroy(
    _hooks: *mut je::extent_hooks_t,
    addr: *mut c_void,
    size: usize,
    committed: bool,
    arena_ind: c_uint,
) {
    if let Some(destroy) = defaults().and_then(|d| d.destroy) {
        let default = DEFAULT_HOOKS.load(Ordering::Acquire);
        // SAFETY: jemalloc's own default destroy hook, arguments unchanged.
        unsafe { destroy(default, addr, size, committed, arena_ind) };
        uncharge(size as u64);
    }
}

/// Our table: alloc, dalloc and destroy counted, everything else jemalloc's default. Filled in
/// by [`install`] (the other entries are copied from the defaults), then only read by jemalloc.
static mut HOOKS: je::extent_hooks_t = je::extent_hooks_t {
    alloc: None,
    dalloc: None,
    destroy: None,
    commit: None,
    decommit: None,
    purge_lazy: None,
    purge_forced: None,
    split: None,
    merge: None,
};

fn hooks_name(arena: u32, buf: &mut [u8; 40]) -> *const c_char {
    // "arena.<i>.extent_hooks\0" without allocating.
    let mut digits = [0u8; 10];
    let mut n = 0;
    let mut v = arena;
    loop {
        if let Some(d) = digits.get_mut(n) {
            *d = b'0' + (v % 10) as u8;
        }
        n += 1;
        v /= 10;
        if v == 0 || n == digits.len() {
            break;
        }
    }
    let mut at = 0;
    let mut put = |b: u8| {
        if let Some(slot) = buf.get_mut(at) {
            *slot = b;
        }
        at += 1;
    };
    b"arena.".iter().for_each(|&b| put(b));
    for i in (0..n).rev() {
        put(digits.get(i).copied().unwrap_or(b'0'));
    }
    b".extent_hooks\0".iter().for_each(|&b| put(b));
    buf.as_ptr().cast()
}

/// Installs the counting hooks on every automatic arena (writing `arena.<i>.extent_hooks`
/// initialises an arena that no thread has used yet). Called once from the constructor, after
/// the host budget is set. Returns the number of arenas hooked.
pub fn install() -> u32 {
    let mut narenas: c_uint = 0;
    let mut len = core::mem::size_of::<c_uint>();
    // SAFETY: "arenas.narenas" is an unsigned read into a buffer of its size.
    let rc = unsafe {
        je::mallctl(
            c"arenas.narenas".as_ptr(),
            (&mut narenas as *mut c_uint).cast(),
            &mut len,
            ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return 0;
    }
    let mut buf = [0u8; 40];
    let mut old: *mut je::extent_hooks_t = ptr::null_mut();
    let mut old_len = core::mem::size_of::<*mut je::extent_hooks_t>();
    // SAFETY: reading arena 0's hook table pointer into a pointer-sized buffer.
    let rc = unsafe {
        je::mallctl(
            hooks_name(0, &mut buf),
            (&mut old as *mut *mut je::extent_hooks_t).cast(),
            &mut old_len,
            ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return 0;
    }
    // SAFETY: on success `old` is jemalloc's static default table (or null).
    let Some(default) = (unsafe { old.as_ref() }) else {
        return 0;
    };
    DEFAULT_HOOKS.store(old, Ordering::Release);
    let ours = je::extent_hooks_t {
        alloc: Some(hook_alloc),
        dalloc: Some(hook_dalloc),
        destroy: Some(hook_destroy),
        ..*default
    };
    // SAFETY: written once here in the constructor, before any arena can call through it.
    unsafe { *ptr::addr_of_mut!(HOOKS) = ours };
    let mut hooked = 0;
    for arena in 0..narenas {
        let mut new = ptr::addr_of_mut!(HOOKS);
        // SAFETY: writing a pointer to a 'static hook table into "arena.<i>.extent_hooks".
        let rc = unsafe {
            je::mallctl(
                hooks_name(arena, &mut buf),
                ptr::null_mut(),
                ptr::null_mut(),
                (&mut new as *mut *mut je::extent_hooks_t).cast(),
                core::mem::size_of::<*mut je::extent_hooks_t>(),
            )
        };
        if rc == 0 {
            hooked += 1;
        }
    }
    hooked
}

#[cfg(test)]
mod tests {
    use super::hooks_name;
    use core::ffi::CStr;

    #[test]
    fn hook_control_names() {
        let rows: &[(u32, &str)] = &[
            (0, "arena.0.extent_hooks"),
            (7, "arena.7.extent_hooks"),
            (10, "arena.10.extent_hooks"),
            (4095, "arena.4095.extent_hooks"),
        ];
        for &(arena, expected) in rows {
            let mut buf = [0u8; 40];
            // SAFETY: hooks_name NUL-terminates inside buf, which outlives the CStr.
            let name = unsafe { CStr::from_ptr(hooks_name(arena, &mut buf)) };
            assert_eq!(
                name.to_str(),
                Ok(expected),
                "control name for arena {arena}"
            );
        }
    }
}
