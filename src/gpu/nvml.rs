//! What NVML says the process uses on each device: the figure `nvidia-smi` shows for it, the
//! driver's context, modules and library workspaces included, which never pass through the
//! wrapped calls. libnvidia-ml.so.1 is opened the first time the monitor asks (never at
//! start-up, never on an allocation), and a process without it goes on without the figure.
//!
//! The process's usage comes from `nvmlDeviceGetComputeRunningProcesses`, the newest form the
//! library exports (`_v3`, `_v2`, then the original), and its own pid's entry. A CUDA device is
//! matched to its NVML device by UUID (`cuDeviceGetUuid` formatted as NVML writes it, looked up
//! with `nvmlDeviceGetHandleByUUID`): the two number devices differently (CUDA_VISIBLE_DEVICES,
//! CUDA_DEVICE_ORDER), the UUID is the one name both share.
//!
//! Monitor thread only: loading the library and the NVML calls take locks and may allocate.

use core::ffi::{c_char, c_int, c_uint, c_void};
use core::sync::atomic::{AtomicI32, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::devices::MAX_DEVICES;
use super::driver::{as_function, real_dlsym, Driver, CUDA_SUCCESS};

const NVML_SONAME: &str = "libnvidia-ml.so.1";

type NvmlReturn = c_int;
const NVML_SUCCESS: NvmlReturn = 0;
const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
/// What NVML writes as `usedGpuMemory` when it cannot tell (Windows WDDM, some containers).
const NVML_VALUE_NOT_AVAILABLE: u64 = u64::MAX;

type InitFn = unsafe extern "C" fn() -> NvmlReturn;
type HandleByUuidFn = unsafe extern "C" fn(*const c_char, *mut *mut c_void) -> NvmlReturn;
type ProcessesFn = unsafe extern "C" fn(*mut c_void, *mut c_uint, *mut c_void) -> NvmlReturn;

/// Bytes between two entries of the process list: `nvmlProcessInfo_v1_t` is a pid and the
/// bytes used (16), `_v2_t` adds the MIG instance ids (24). `_v3` fills `_v2_t` records:
/// NVIDIA's own bindings (nvidia-ml-py) read it so; one header release named a 32-byte record
/// that the library never wrote. The buffer is sized for 32-byte records all the same, so a
/// library that did write them could not write past it.
const STRIDE_V1_BYTES: usize = 16;
const STRIDE_V2_BYTES: usize = 24;
const STRIDE_BUFFER_BYTES: usize = 32;
/// Entries asked for first; a device with more processes is asked again with NVML's count.
const PROCESSES_FIRST_ASK: usize = 64;
/// Offsets in every form of the record: the pid (u32), then, 8-aligned, `usedGpuMemory`.
const PID_OFFSET: usize = 0;
const USED_OFFSET: usize = 8;

/// Where NVML stands in this process.
pub const STATE_UNUSED: u8 = 0;
pub const STATE_READY: u8 = 1;
pub const STATE_MISSING: u8 = 2;
pub const STATE_INIT_FAILED: u8 = 3;
pub const STATE_NO_FUNCTION: u8 = 4;

static STATE: AtomicU8 = AtomicU8::new(STATE_UNUSED);
/// nvmlInit's error code when it failed.
static INIT_ERROR: AtomicI32 = AtomicI32::new(0);
/// 3, 2 or 1: which form of nvmlDeviceGetComputeRunningProcesses is used.
static FUNCTION_VERSION: AtomicU8 = AtomicU8::new(0);

/// Why a device has no figure: an NVML error code, or one of these.
pub const ERROR_NONE: i32 = 0;
pub const ERROR_NO_UUID: i32 = -1;
pub const ERROR_NOT_LISTED: i32 = -2;
pub const ERROR_NOT_AVAILABLE: i32 = -3;
static DEVICE_ERROR: [AtomicI32; MAX_DEVICES] = [const { AtomicI32::new(ERROR_NONE) }; MAX_DEVICES];
/// Each CUDA device's NVML handle, found once; 0 until then.
static HANDLES: [AtomicUsize; MAX_DEVICES] = [const { AtomicUsize::new(0) }; MAX_DEVICES];

struct Nvml {
    handle_by_uuid: HandleByUuidFn,
    processes: ProcessesFn,
    stride: usize,
}

static NVML: OnceLock<Option<Nvml>> = OnceLock::new();

fn load() -> Option<Nvml> {
    // SAFETY: opening NVML runs its initialisers, which expect nothing from us.
    let library = unsafe {
        libloading::os::unix::Library::open(
            Some(NVML_SONAME),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
        )
    };
    let Ok(library) = library else {
        STATE.store(STATE_MISSING, Ordering::Relaxed);
        return None;
    };
    // Stays loaded for the life of the process: the monitor asks again at every look.
    let handle = library.into_raw();
    let symbol = |name: &core::ffi::CStr| {
        // SAFETY: handle came from dlopen; name is NUL-terminated.
        unsafe { real_dlsym(handle, name.as_ptr()) as usize }
    };
    let init = [c"nvmlInit_v2", c"nvmlInit"]
        .iter()
        .map(|name| symbol(name))
        .find(|&address| address != 0)
        .unwrap_or(0);
    // SAFETY: 0 or nvmlInit(_v2), which takes nothing and returns nvmlReturn_t.
    let init = unsafe { as_function::<InitFn>(init) };
    let by_uuid = symbol(c"nvmlDeviceGetHandleByUUID");
    // SAFETY: 0 or nvmlDeviceGetHandleByUUID, of this signature.
    let handle_by_uuid = unsafe { as_function::<HandleByUuidFn>(by_uuid) };
    let forms: [(&core::ffi::CStr, u8, usize); 3] = [
        (
            c"nvmlDeviceGetComputeRunningProcesses_v3",
            3,
            STRIDE_V2_BYTES,
        ),
        (
            c"nvmlDeviceGetComputeRunningProcesses_v2",
            2,
            STRIDE_V2_BYTES,
        ),
        (c"nvmlDeviceGetComputeRunningProcesses", 1, STRIDE_V1_BYTES),
    ];
    let newest = forms
        .iter()
        .map(|&(name, version, stride)| (symbol(name), version, stride))
        .find(|&(address, _, _)| address != 0);
    let (Some(init), Some(handle_by_uuid), Some((processes, version, stride))) =
        (init, handle_by_uuid, newest)
    else {
        STATE.store(STATE_NO_FUNCTION, Ordering::Relaxed);
        return None;
    };
    // SAFETY: every form takes (device, count in/out, array of its records).
    let processes = unsafe { as_function::<ProcessesFn>(processes) }?;
    // SAFETY: nvmlInit takes nothing; it is called once, from the monitor thread.
    let result = unsafe { init() };
    if result != NVML_SUCCESS {
        INIT_ERROR.store(result, Ordering::Relaxed);
        STATE.store(STATE_INIT_FAILED, Ordering::Relaxed);
        return None;
    }
    FUNCTION_VERSION.store(version, Ordering::Relaxed);
    STATE.store(STATE_READY, Ordering::Relaxed);
    Some(Nvml {
        handle_by_uuid,
        processes,
        stride,
    })
}

/// A CUDA UUID as NVML names it: "GPU-" and the 16 bytes in hex, grouped 4-2-2-2-6, then NUL.
fn uuid_name(uuid: &[u8; 16]) -> [u8; 41] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut name = [0u8; 41];
    name[..4].copy_from_slice(b"GPU-");
    let mut at = 4;
    for (i, byte) in uuid.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            name[at] = b'-';
            at += 1;
        }
        name[at] = HEX[(byte >> 4) as usize];
        name[at + 1] = HEX[(byte & 0xf) as usize];
        at += 2;
    }
    name
}

fn set_error(device: usize, code: i32) {
    if let Some(error) = DEVICE_ERROR.get(device) {
        error.store(code, Ordering::Relaxed);
    }
}

/// The NVML handle of CUDA device `device`, found by its UUID once.
fn handle(nvml: &Nvml, driver: &Driver, device: usize) -> Option<*mut c_void> {
    let slot = HANDLES.get(device)?;
    let known = slot.load(Ordering::Relaxed);
    if known != 0 {
        return Some(known as *mut c_void);
    }
    let get_uuid = driver.device_get_uuid?;
    let mut uuid = [0u8; 16];
    // SAFETY: cuDeviceGetUuid writes 16 bytes; uuid is a local of that size.
    if unsafe { get_uuid(&mut uuid, device as c_int) } != CUDA_SUCCESS {
        set_error(device, ERROR_NO_UUID);
        return None;
    }
    let name = uuid_name(&uuid);
    let mut found: *mut c_void = core::ptr::null_mut();
    // SAFETY: name is NUL-terminated; found is a local the call writes.
    let result = unsafe { (nvml.handle_by_uuid)(name.as_ptr().cast(), &mut found) };
    if result != NVML_SUCCESS || found.is_null() {
        set_error(device, result);
        return None;
    }
    slot.store(found as usize, Ordering::Relaxed);
    Some(found)
}

/// What NVML says this process uses on CUDA device `device`; None without NVML, for a device
/// it does not know, or when the process is not in its list (a pid namespace: NVML lists the
/// host's pids). Monitor thread only.
pub fn process_used(driver: &Driver, device: usize) -> Option<u64> {
    let nvml = NVML.get_or_init(load).as_ref()?;
    let handle = handle(nvml, driver, device)?;
    let mut capacity = PROCESSES_FIRST_ASK;
    let mut buffer: Vec<u8> = Vec::new();
    let mut count: c_uint = 0;
    let mut result = NVML_ERROR_INSUFFICIENT_SIZE;
    for _ in 0..2 {
        buffer.clear();
        buffer.resize(capacity.saturating_mul(STRIDE_BUFFER_BYTES), 0);
        count = capacity as c_uint;
        // SAFETY: the buffer holds `count` records of any form; count is a local.
        result = unsafe { (nvml.processes)(handle, &mut count, buffer.as_mut_ptr().cast()) };
        if result == NVML_SUCCESS {
            break;
        }
        if result != NVML_ERROR_INSUFFICIENT_SIZE || count as usize <= capacity {
            set_error(device, result);
            return None;
        }
        // Processes came since: room for a few more than NVML counted.
        capacity = count as usize + PROCESSES_FIRST_ASK;
    }
    if result != NVML_SUCCESS {
        // Still more processes than room on the second ask: NVML's own code, not "not listed".
        set_error(device, result);
        return None;
    }
    let own_pid = std::process::id();
    let listed = (count as usize).min(capacity);
    for record in buffer.chunks_exact(nvml.stride).take(listed) {
        let (Some(pid), Some(used)) = (
            record.get(PID_OFFSET..PID_OFFSET + 4),
            record.get(USED_OFFSET..USED_OFFSET + 8),
        ) else {
            continue;
        };
        let pid = u32::from_ne_bytes(pid.try_into().unwrap_or_default());
        if pid != own_pid {
            continue;
        }
        let used = u64::from_ne_bytes(used.try_into().unwrap_or_default());
        if used == NVML_VALUE_NOT_AVAILABLE {
            set_error(device, ERROR_NOT_AVAILABLE);
            return None;
        }
        set_error(device, ERROR_NONE);
        return Some(used);
    }
    set_error(device, ERROR_NOT_LISTED);
    None
}

/// NVML's state and, when ready, the form of the process list used (3, 2 or 1); when init
/// failed, its error code instead.
pub fn state() -> (u8, i32) {
    let state = STATE.load(Ordering::Relaxed);
    let detail = match state {
        STATE_READY => FUNCTION_VERSION.load(Ordering::Relaxed) as i32,
        STATE_INIT_FAILED => INIT_ERROR.load(Ordering::Relaxed),
        _ => 0,
    };
    (state, detail)
}

pub fn state_name(state: u8) -> &'static str {
    match state {
        STATE_READY => "ready",
        STATE_MISSING => "missing",
        STATE_INIT_FAILED => "init_failed",
        STATE_NO_FUNCTION => "no_function",
        _ => "unused",
    }
}

/// Why CUDA device `device` has no NVML figure: an NVML error code, [`ERROR_NO_UUID`],
/// [`ERROR_NOT_LISTED`], [`ERROR_NOT_AVAILABLE`], or [`ERROR_NONE`].
pub fn device_error(device: usize) -> i32 {
    DEVICE_ERROR
        .get(device)
        .map_or(ERROR_NONE, |e| e.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_uuids_are_named_as_nvml_names_them() {
        let cases: &[([u8; 16], &str)] = &[
            ([0; 16], "GPU-00000000-0000-0000-0000-000000000000"),
            (
                [
                    0xfa, 0xce, 0x01, 0x00, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01,
                    0x23, 0x45, 0x67,
                ],
                "GPU-face0100-1234-5678-9abc-def001234567",
            ),
        ];
        for (uuid, want) in cases {
            let name = uuid_name(uuid);
            assert_eq!(&name[..40], want.as_bytes(), "{uuid:?}");
            assert_eq!(name[40], 0, "NUL-terminated");
        }
    }
}
