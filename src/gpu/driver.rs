//! The real CUDA driver: loaded with libloading on first use, never at start-up (a process that
//! never touches CUDA never loads it), and the real function behind each call the shim wraps.
//!
//! Symbols are looked up with the real `dlsym` ([`real_dlsym`]), never the exported one, which
//! would hand the shim its own wrappers back. libloading only opens the library: its `get` goes
//! through `dlsym` by name and so would reach the hook.
//!
//! Never calls itself: a driver linked without `-Bsymbolic` hands out its exports as the global
//! scope resolves them, which is this library's exports (or those of an interposer preloaded
//! before it), and another interposer may answer anything. So no address is taken as a real
//! function unless it lies in an object loaded after this one, or in the driver's own object
//! ([`Callable`]): the next interposer, the driver, or code in no object at all. When every answer is refused the wrapper
//! fails with CUDA_ERROR_NOT_FOUND. And since a function below the shim may still come back
//! into it (an interposer that looks its real functions up with RTLD_DEFAULT finds the shim's
//! exports), a wrapper entered while its thread is already inside the driver for a wrapper goes
//! to the driver's own export, uncharged ([`Inside`]).
//!
//! One concern, a little over 500 lines with its tests: which address is the driver's real
//! function. The table of forms, the loader's list and the refusal of the shim's own exports
//! are one argument and read best together.

use core::cell::Cell;
use core::ffi::{c_char, c_int, c_void, CStr};
use core::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// What `dlopen` asks for: the soname every CUDA runtime opens.
const DRIVER_SONAME: &str = "libcuda.so.1";

pub type CuResult = c_int;
pub const CUDA_SUCCESS: CuResult = 0;
pub const CUDA_ERROR_OUT_OF_MEMORY: CuResult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CuResult = 3;
pub const CUDA_ERROR_NOT_FOUND: CuResult = 500;

/// `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM`: the flag that selects `_ptsz`/`_ptds` forms.
pub const PER_THREAD_DEFAULT_STREAM: u64 = 1 << 1;

/// One form of a driver call the shim wraps: its exported name, and how `cuGetProcAddress`
/// reaches it (the base name, the CUDA version that introduced this form, the flags).
pub struct Form {
    pub export: &'static CStr,
    pub base: &'static CStr,
    pub since_version: c_int,
    pub flags: u64,
}

const fn form(export: &'static CStr, base: &'static CStr, since_version: c_int) -> Form {
    Form {
        export,
        base,
        since_version,
        flags: 0,
    }
}

const fn per_thread(export: &'static CStr, base: &'static CStr, since_version: c_int) -> Form {
    Form {
        export,
        base,
        since_version,
        flags: PER_THREAD_DEFAULT_STREAM,
    }
}

macro_rules! wrapped_forms {
    ($($variant:ident = $form:expr,)*) => {
        /// Every driver call form the shim wraps.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Wrapped { $($variant,)* }

        pub const FORMS: &[(Wrapped, Form)] = &[$((Wrapped::$variant, $form),)*];
    };
}

wrapped_forms! {
    GetProcAddress = form(c"cuGetProcAddress", c"cuGetProcAddress", 11030),
    GetProcAddressV2 = form(c"cuGetProcAddress_v2", c"cuGetProcAddress", 12000),
    MemAllocV2 = form(c"cuMemAlloc_v2", c"cuMemAlloc", 3020),
    MemAllocPitchV2 = form(c"cuMemAllocPitch_v2", c"cuMemAllocPitch", 3020),
    MemAllocManaged = form(c"cuMemAllocManaged", c"cuMemAllocManaged", 6000),
    MemAllocAsync = form(c"cuMemAllocAsync", c"cuMemAllocAsync", 11020),
    MemAllocAsyncPtsz = per_thread(c"cuMemAllocAsync_ptsz", c"cuMemAllocAsync", 11020),
    MemAllocFromPoolAsync = form(c"cuMemAllocFromPoolAsync", c"cuMemAllocFromPoolAsync", 11020),
    MemAllocFromPoolAsyncPtsz =
        per_thread(c"cuMemAllocFromPoolAsync_ptsz", c"cuMemAllocFromPoolAsync", 11020),
    MemFreeV2 = form(c"cuMemFree_v2", c"cuMemFree", 3020),
    MemFreeAsync = form(c"cuMemFreeAsync", c"cuMemFreeAsync", 11020),
    MemFreeAsyncPtsz = per_thread(c"cuMemFreeAsync_ptsz", c"cuMemFreeAsync", 11020),
    MemCreate = form(c"cuMemCreate", c"cuMemCreate", 10020),
    MemRelease = form(c"cuMemRelease", c"cuMemRelease", 10020),
    MemGetInfoV2 = form(c"cuMemGetInfo_v2", c"cuMemGetInfo", 3020),
    DeviceTotalMemV2 = form(c"cuDeviceTotalMem_v2", c"cuDeviceTotalMem", 3020),
    MemHostAlloc = form(c"cuMemHostAlloc", c"cuMemHostAlloc", 2020),
    MemAllocHostV2 = form(c"cuMemAllocHost_v2", c"cuMemAllocHost", 3020),
    MemFreeHost = form(c"cuMemFreeHost", c"cuMemFreeHost", 2000),
    MemHostRegisterV2 = form(c"cuMemHostRegister_v2", c"cuMemHostRegister", 6050),
    MemHostUnregister = form(c"cuMemHostUnregister", c"cuMemHostUnregister", 4000),
}

pub const WRAPPED_COUNT: usize = FORMS.len();

impl Wrapped {
    /// The wrapped form exported under `name`, if any. No allocation: a walk over a short table,
    /// reached only for names that start with "cu".
    pub fn by_export_name(name: &CStr) -> Option<Wrapped> {
        let name = name.to_bytes();
        FORMS
            .iter()
            .find(|(_, form)| form.export.to_bytes() == name)
            .map(|(wrapped, _)| *wrapped)
    }
}

type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;
type GetProcAddressFn =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64) -> CuResult;
type GetProcAddressV2Fn =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CuResult;
pub type CtxGetDeviceFn = unsafe extern "C" fn(*mut c_int) -> CuResult;
/// cuDeviceGetUuid(_v2): 16 bytes of the device's UUID.
pub type DeviceGetUuidFn = unsafe extern "C" fn(*mut [u8; 16], c_int) -> CuResult;
/// cuDeviceGetDefaultMemPool: the device's default CUDA memory pool.
pub type DeviceGetDefaultMemPoolFn = unsafe extern "C" fn(*mut *mut c_void, c_int) -> CuResult;
/// cuMemPoolGetAttribute, for the 64-bit attributes.
pub type MemPoolGetAttributeFn = unsafe extern "C" fn(*mut c_void, c_int, *mut u64) -> CuResult;
/// cuMemPoolTrimTo.
pub type MemPoolTrimToFn = unsafe extern "C" fn(*mut c_void, usize) -> CuResult;

/// glibc's `dlsym`, found once with `dlvsym` so the exported hook is never reached. 0 until found.
pub static REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

/// The symbol versions glibc has given `dlsym`: 2.34 moved it into libc proper.
#[cfg(target_arch = "x86_64")]
const DLSYM_VERSIONS: [&CStr; 2] = [c"GLIBC_2.34", c"GLIBC_2.2.5"];
#[cfg(target_arch = "aarch64")]
const DLSYM_VERSIONS: [&CStr; 2] = [c"GLIBC_2.34", c"GLIBC_2.17"];

/// The address of glibc's `dlsym`, resolving it on first use. Never allocates (dlvsym of a
/// symbol that exists does not reach malloc).
pub fn real_dlsym_address() -> usize {
    let known = REAL_DLSYM.load(Ordering::Acquire);
    if known != 0 {
        return known;
    }
    let found = DLSYM_VERSIONS
        .iter()
        // SAFETY: both strings are NUL-terminated; RTLD_NEXT asks for the definition after ours.
        .map(|version| unsafe {
            libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr())
        })
        .find(|p| !p.is_null())
        .map_or(0, |p| p as usize);
    REAL_DLSYM.store(found, Ordering::Release);
    found
}

/// Looks `name` up in `handle` with glibc's `dlsym`. The caller glibc sees is this library, so
/// RTLD_NEXT means the next definition after libqvshim.so.
///
/// # Safety
/// `handle` is a handle from `dlopen` or RTLD_DEFAULT; `name` is NUL-terminated.
pub unsafe fn real_dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    let address = real_dlsym_address();
    if address == 0 {
        return core::ptr::null_mut();
    }
    // SAFETY: the address is glibc's dlsym, whose signature DlsymFn is.
    let dlsym: DlsymFn = unsafe { core::mem::transmute::<usize, DlsymFn>(address) };
    // SAFETY: forwarded caller's contract.
    unsafe { dlsym(handle, name) }
}

/// `address` as the function pointer type `F`; None for 0.
///
/// # Safety
/// `F` is an `extern "C"` function pointer type, and `address` is 0 or a function of that type.
pub unsafe fn as_function<F: Copy>(address: usize) -> Option<F> {
    if address == 0 {
        return None;
    }
    // SAFETY: F is a function pointer (the size of usize) for this address (caller's contract).
    Some(unsafe { core::mem::transmute_copy::<usize, F>(&address) })
}

/// The loaded driver: the real function of every wrapped form, and the addresses by which a
/// caller may already hold the form (any of them may be one of the shim's own exports).
pub struct Driver {
    /// What the wrapper calls: never an address of this library, nor of one loaded before it
    /// but the driver ([`Callable`]); 0 when nothing qualified.
    real: [usize; WRAPPED_COUNT],
    /// The driver's own export, through its handle.
    export: [usize; WRAPPED_COUNT],
    /// What `cuGetProcAddress`, asked through the chain, hands out.
    by_proc: [usize; WRAPPED_COUNT],
    /// The next definition after this library in the global scope (another interposer, or a
    /// driver the program linked against).
    next: [usize; WRAPPED_COUNT],
    /// What the driver's own `cuGetProcAddress` hands out, when the chain's is another's.
    by_driver_proc: [usize; WRAPPED_COUNT],
    /// What a call that came back from below goes to: the driver's own export.
    floor: [usize; WRAPPED_COUNT],
    pub ctx_get_device: Option<CtxGetDeviceFn>,
    /// Functions the shim calls but does not wrap: naming a device for NVML, and the CUDA
    /// memory pools (`gpu/mempools.rs`). The driver's own exports only.
    pub device_get_uuid: Option<DeviceGetUuidFn>,
    pub device_get_default_mem_pool: Option<DeviceGetDefaultMemPoolFn>,
    pub mem_pool_get_attribute: Option<MemPoolGetAttributeFn>,
    pub mem_pool_trim_to: Option<MemPoolTrimToFn>,
}

static DRIVER: OnceLock<Option<Driver>> = OnceLock::new();

/// The real driver, loaded on first call. None when libcuda.so.1 cannot be opened.
///
/// Only from outside the driver ([`Inside::enter`] at depth 0): a call that comes back while the
/// driver is being loaded would wait for its own load.
pub fn driver() -> Option<&'static Driver> {
    DRIVER.get_or_init(load).as_ref()
}

/// The driver if it is loaded already; never loads it, never waits.
pub fn loaded() -> Option<&'static Driver> {
    DRIVER.get().and_then(Option::as_ref)
}

thread_local! {
    /// How many wrappers this thread is inside, each calling down into the driver (or loading
    /// it). Const-initialised and without a destructor: no allocation, no registration.
    static DEPTH: Cell<u8> = const { Cell::new(0) };
}

/// Marks the calling thread as inside a wrapper's call to the driver until dropped.
pub struct Inside {
    depth_before: u8,
}

impl Inside {
    /// Enters; [`Inside::depth_before`] says whether the thread was inside already.
    pub fn enter() -> Inside {
        let depth_before = DEPTH.get();
        DEPTH.set(depth_before.saturating_add(1));
        Inside { depth_before }
    }

    /// 0 for a call from the program; more for one that came back from below the shim.
    pub fn depth_before(&self) -> u8 {
        self.depth_before
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        DEPTH.set(self.depth_before);
    }
}

fn load() -> Option<Driver> {
    // SAFETY: opening the CUDA driver runs its initialisers, which expect nothing from us.
    let library = unsafe {
        libloading::os::unix::Library::open(
            Some(DRIVER_SONAME),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
        )
    }
    .ok()?;
    // The driver stays loaded for the life of the process: the wrappers may be called at any time.
    let handle = library.into_raw();
    let own = |name: &CStr| {
        // SAFETY: handle came from dlopen; name is NUL-terminated. A handle's lookup searches
        // the driver and its dependencies, never the preloaded libraries.
        unsafe { real_dlsym(handle, name.as_ptr()) as usize }
    };
    let next = |name: &CStr| {
        // SAFETY: name is NUL-terminated; RTLD_NEXT from here means after libqvshim.so.
        unsafe { real_dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
    };
    let driver_code = [c"cuGetProcAddress_v2", c"cuGetProcAddress", c"cuInit"]
        .iter()
        .map(|name| own(name))
        .find(|&address| address != 0)
        .unwrap_or(0);
    let callable = Callable::for_driver_at(driver_code);
    // The lookup goes down the chain: a later interposer's cuGetProcAddress swaps in its hooks.
    let get_proc = ProcLookup {
        v2: callable.first(&[next(c"cuGetProcAddress_v2"), own(c"cuGetProcAddress_v2")]),
        v1: callable.first(&[next(c"cuGetProcAddress"), own(c"cuGetProcAddress")]),
    };
    let driver_proc = ProcLookup {
        v2: callable.first(&[own(c"cuGetProcAddress_v2")]),
        v1: callable.first(&[own(c"cuGetProcAddress")]),
    };
    let mut driver = Driver {
        real: [0; WRAPPED_COUNT],
        export: [0; WRAPPED_COUNT],
        by_proc: [0; WRAPPED_COUNT],
        next: [0; WRAPPED_COUNT],
        by_driver_proc: [0; WRAPPED_COUNT],
        floor: [0; WRAPPED_COUNT],
        ctx_get_device: None,
        device_get_uuid: None,
        device_get_default_mem_pool: None,
        mem_pool_get_attribute: None,
        mem_pool_trim_to: None,
    };
    for (index, (wrapped, form)) in FORMS.iter().enumerate() {
        let export = own(form.export);
        let next_definition = next(form.export);
        let by_proc = get_proc.get(form);
        driver.export[index] = export;
        driver.by_proc[index] = by_proc;
        driver.next[index] = next_definition;
        if get_proc.v2 != driver_proc.v2 || get_proc.v1 != driver_proc.v1 {
            driver.by_driver_proc[index] = driver_proc.get(form);
        }
        driver.floor[index] = callable.first(&[export]);
        driver.real[index] = match wrapped {
            // The lookups themselves are the chain's, so that their answers are the ones the
            // forms above were identified by.
            Wrapped::GetProcAddress => get_proc.v1,
            Wrapped::GetProcAddressV2 => get_proc.v2,
            _ => callable.first(&[by_proc, next_definition, export]),
        };
    }
    let ctx_get_device = callable.first(&[own(c"cuCtxGetDevice")]);
    if ctx_get_device != 0 {
        // SAFETY: cuCtxGetDevice has had this signature since CUDA 2.0.
        driver.ctx_get_device =
            Some(unsafe { core::mem::transmute::<usize, CtxGetDeviceFn>(ctx_get_device) });
    }
    // Each address is 0 or the driver's export of that name, whose signature the type is
    // (cuDeviceGetUuid and its _v2 differ only in what they report for MIG instances).
    let uuid = callable.first(&[own(c"cuDeviceGetUuid_v2"), own(c"cuDeviceGetUuid")]);
    // SAFETY: as said above; as_function gives None for 0.
    driver.device_get_uuid = unsafe { as_function(uuid) };
    let default_pool = callable.first(&[own(c"cuDeviceGetDefaultMemPool")]);
    // SAFETY: as said above.
    driver.device_get_default_mem_pool = unsafe { as_function(default_pool) };
    let pool_attribute = callable.first(&[own(c"cuMemPoolGetAttribute")]);
    // SAFETY: as said above.
    driver.mem_pool_get_attribute = unsafe { as_function(pool_attribute) };
    let trim_to = callable.first(&[own(c"cuMemPoolTrimTo")]);
    // SAFETY: as said above.
    driver.mem_pool_trim_to = unsafe { as_function(trim_to) };
    Some(driver)
}

// ---------------------------------------------------------------------------------------------
// Where an address lives.

/// An address's object, by its position in the loader's list (the program, the preloaded
/// libraries in LD_PRELOAD order, their dependencies, then everything dlopened).
struct Placing {
    address: usize,
    ours: usize,
    /// Position of the object being visited.
    position: usize,
    address_at: Option<usize>,
    ours_at: Option<usize>,
}

/// The positions in the loader's list of the object holding `address` and of this library;
/// None for an address in no object (or a library the list does not show).
///
/// Walks the loader's list under its lock with `dl_iterate_phdr`: no allocation, but not for a
/// signal handler or the allocation path. Called while the driver is loaded.
fn place(address: usize) -> (Option<usize>, Option<usize>) {
    let mut placing = Placing {
        address,
        ours: place as *const () as usize,
        position: 0,
        address_at: None,
        ours_at: None,
    };
    /// # Safety
    /// `info` is the loader's description of one object; `data` points to a live `Placing`.
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: data is the Placing below, alive for the whole walk; info is the loader's.
        let (placing, info) = unsafe { (&mut *data.cast::<Placing>(), &*info) };
        let headers: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
            &[]
        } else {
            // SAFETY: the loader gives dlpi_phnum program headers at dlpi_phdr.
            unsafe { core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) }
        };
        let holds = |address: usize| {
            headers.iter().any(|header| {
                let start = (info.dlpi_addr as usize).wrapping_add(header.p_vaddr as usize);
                header.p_type == libc::PT_LOAD
                    && address >= start
                    && address - start < header.p_memsz as usize
            })
        };
        if placing.address_at.is_none() && holds(placing.address) {
            placing.address_at = Some(placing.position);
        }
        if placing.ours_at.is_none() && holds(placing.ours) {
            placing.ours_at = Some(placing.position);
        }
        placing.position += 1;
        0
    }
    // SAFETY: visit has dl_iterate_phdr's callback signature; placing outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut placing as *mut Placing).cast()) };
    (placing.address_at, placing.ours_at)
}

/// Which addresses may be called as a real driver function: not null, not in libqvshim.so (its
/// exports and wrappers), and not in an object before it in the loader's list (the program, or
/// an interposer preloaded earlier, whose hooks may call back into the shim), except the
/// driver's own object (before the shim only when the shim was dlopened after it). An object
/// after the shim is the next interposer or the driver; an address in no object at all (code
/// the driver generated) is accepted too.
pub struct Callable {
    driver_at: Option<usize>,
}

impl Callable {
    /// The rule for a driver whose own code holds `driver_code` (0 when unknown).
    pub fn for_driver_at(driver_code: usize) -> Callable {
        let driver_at = if driver_code == 0 {
            None
        } else {
            place(driver_code).0
        };
        Callable { driver_at }
    }

    pub fn accepts(&self, address: usize) -> bool {
        if address == 0 {
            return false;
        }
        match place(address) {
            (Some(at), Some(ours)) => at != ours && (at > ours || Some(at) == self.driver_at),
            (None, _) => true,
            // This library not found in the list: refuse at least its own wrappers.
            (Some(_), None) => !FORMS.iter().any(|(form, _)| is_own_wrapper(*form, address)),
        }
    }

    /// The first of `candidates` that may be called as the real function, or 0 when none may.
    pub fn first(&self, candidates: &[usize]) -> usize {
        candidates
            .iter()
            .copied()
            .find(|&address| self.accepts(address))
            .unwrap_or(0)
    }
}

/// The shim's own wrapper for a form, as the surface hands it out: told once at load by the
/// crate root ([`know_wrappers`]), so that this layer never reaches up into the exported surface.
static WRAPPER_OF: OnceLock<fn(Wrapped) -> *mut c_void> = OnceLock::new();

/// Tells the driver table which function the shim hands out for each form. Called once at load.
pub fn know_wrappers(wrapper: fn(Wrapped) -> *mut c_void) {
    let _ = WRAPPER_OF.set(wrapper);
}

/// Whether `address` is the shim's own wrapper for `form`.
fn is_own_wrapper(form: Wrapped, address: usize) -> bool {
    WRAPPER_OF
        .get()
        .is_some_and(|wrapper| wrapper(form) as usize == address)
}

/// The driver's own `cuGetProcAddress`, `_v2` preferred.
struct ProcLookup {
    v2: usize,
    v1: usize,
}

impl ProcLookup {
    /// What the driver hands out for `form` when asked with the version that introduced it.
    fn get(&self, form: &Form) -> usize {
        let mut pfn: *mut c_void = core::ptr::null_mut();
        let mut status: c_int = 0;
        let result = if self.v2 != 0 {
            // SAFETY: the address is the driver's cuGetProcAddress_v2; out-pointers are locals.
            let f: GetProcAddressV2Fn = unsafe { core::mem::transmute(self.v2) };
            // SAFETY: the driver's own cuGetProcAddress_v2 with a NUL-terminated name and local
            // out-pointers.
            unsafe {
                f(
                    form.base.as_ptr(),
                    &mut pfn,
                    form.since_version,
                    form.flags,
                    &mut status,
                )
            }
        } else if self.v1 != 0 {
            // SAFETY: the address is the driver's cuGetProcAddress; the out-pointer is a local.
            let f: GetProcAddressFn = unsafe { core::mem::transmute(self.v1) };
            // SAFETY: the driver's own cuGetProcAddress with a NUL-terminated name and a local
            // out-pointer.
            unsafe { f(form.base.as_ptr(), &mut pfn, form.since_version, form.flags) }
        } else {
            return 0;
        };
        if result == CUDA_SUCCESS {
            pfn as usize
        } else {
            0
        }
    }
}

impl Driver {
    /// The real function of `form` as an address; 0 when this driver lacks it.
    pub fn real(&self, form: Wrapped) -> usize {
        self.real.get(form as usize).copied().unwrap_or(0)
    }

    /// The driver's own export of `form`, for a call that came back from below; 0 when none.
    pub fn floor(&self, form: Wrapped) -> usize {
        self.floor.get(form as usize).copied().unwrap_or(0)
    }

    /// The wrapped form a driver function address belongs to, if it is one the shim wraps.
    pub fn identify(&self, address: usize) -> Option<Wrapped> {
        if address == 0 {
            return None;
        }
        FORMS
            .iter()
            .enumerate()
            .find(|(index, _)| {
                [
                    &self.by_proc,
                    &self.export,
                    &self.next,
                    &self.by_driver_proc,
                ]
                .iter()
                .any(|known| known.get(*index) == Some(&address))
            })
            .map(|(_, (wrapped, _))| *wrapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_listed_in_declaration_order() {
        for (index, (wrapped, _)) in FORMS.iter().enumerate() {
            assert_eq!(*wrapped as usize, index, "{wrapped:?}");
        }
    }

    #[test]
    fn export_names_find_their_form() {
        let cases: &[(&CStr, Option<Wrapped>)] = &[
            (c"cuMemAlloc_v2", Some(Wrapped::MemAllocV2)),
            (c"cuMemAllocAsync_ptsz", Some(Wrapped::MemAllocAsyncPtsz)),
            (c"cuGetProcAddress", Some(Wrapped::GetProcAddress)),
            (c"cuMemAlloc", None),
            (c"cuInit", None),
            (c"cuMemAlloc_v2x", None),
        ];
        for (name, want) in cases {
            assert_eq!(Wrapped::by_export_name(name), *want, "{name:?}");
        }
    }

    #[test]
    fn only_addresses_loaded_after_this_library_may_be_called_as_real() {
        let ours = place as *const () as usize;
        let libc_function = libc::getpid as *const () as usize;
        let in_no_object = Box::into_raw(Box::new(0u64)) as usize;
        // (candidates, the one taken): an address of ours is never taken, whatever its place.
        let cases: &[(&[usize], usize)] = &[
            (&[ours], 0),
            (&[0], 0),
            (&[ours, 0], 0),
            (&[ours, libc_function], libc_function),
            (&[0, ours, in_no_object], in_no_object),
            (&[libc_function, ours], libc_function),
        ];
        for (candidates, want) in cases {
            assert_eq!(
                Callable::for_driver_at(0).first(candidates),
                *want,
                "{candidates:x?}"
            );
        }
        let driver_is_libc = Callable::for_driver_at(libc_function);
        assert!(driver_is_libc.accepts(libc::getppid as *const () as usize));
        assert!(
            !driver_is_libc.accepts(ours),
            "the driver's rule never admits the shim"
        );
        // SAFETY: made by Box::into_raw above, freed once.
        drop(unsafe { Box::from_raw(in_no_object as *mut u64) });
    }

    #[test]
    fn calls_inside_the_driver_know_their_depth() {
        let outer = Inside::enter();
        assert_eq!(outer.depth_before(), 0, "a call from the program");
        {
            let from_below = Inside::enter();
            assert_eq!(
                from_below.depth_before(),
                1,
                "a call that came back from below"
            );
        }
        assert_eq!(
            Inside::enter().depth_before(),
            1,
            "leaving restores the depth"
        );
        drop(outer);
        assert_eq!(Inside::enter().depth_before(), 0);
    }

    #[test]
    fn per_thread_forms_ask_for_the_per_thread_flag() {
        for (wrapped, form) in FORMS {
            let ptsz = form.export.to_bytes().ends_with(b"_ptsz");
            assert_eq!(ptsz, form.flags == PER_THREAD_DEFAULT_STREAM, "{wrapped:?}");
        }
    }
}
