//! The stable C API (include/qvshim.h) for runtimes and the Python companion. Every function is
//! safe from any thread and allocates nothing through the host's malloc.

#![deny(missing_docs)]

use crate::ledger::{self, pool_stats};

/// The C API's stats struct, `struct qvshim_pool_stats` of include/qvshim.h (its layout is
/// checked against the header by this file's test).
pub use crate::ledger::PoolStats;

/// `QVSHIM_API_VERSION` of include/qvshim.h: raised only for an incompatible change.
pub const API_VERSION: i32 = 1;

/// `QVSHIM_API_VERSION` of the loaded library.
#[no_mangle]
pub extern "C" fn qvshim_api_version() -> i32 {
    API_VERSION
}

/// Number of pools in use: 1 (host) + the highest GPU pool index seen.
#[no_mangle]
pub extern "C" fn qvshim_pool_count() -> i32 {
    ledger::pool_count() as i32
}

/// # Safety
/// `out` is null or valid for writing `(*out).struct_size` bytes, which the caller set.
#[no_mangle]
pub unsafe extern "C" fn qvshim_pool_stats(pool: i32, out: *mut PoolStats) -> i32 {
    if out.is_null() || pool < 0 {
        return -1;
    }
    let Some(stats) = pool_stats(pool as usize) else {
        return -1;
    };
    // SAFETY: out is valid for at least the caller's struct_size (contract above).
    let room = unsafe { (*out).struct_size } as usize;
    // An older caller's shorter struct gets the fields it knows; fields are only appended.
    let n = room.min(core::mem::size_of::<PoolStats>());
    if n < core::mem::size_of::<u32>() {
        return -1;
    }
    // SAFETY: out is valid for n bytes and the source is a local PoolStats of at least n bytes.
    unsafe {
        core::ptr::copy_nonoverlapping(
            (&stats as *const PoolStats).cast::<u8>(),
            out.cast::<u8>(),
            n,
        )
    };
    0
}

/// The level of one pool (`enum qvshim_level`), or -1 for an unknown pool.
#[no_mangle]
pub extern "C" fn qvshim_level(pool: i32) -> i32 {
    usize::try_from(pool)
        .ok()
        .and_then(ledger::pool)
        .map_or(-1, |p| p.level() as i32)
}

/// Sets a pool's budget: -1 for a pool that does not exist (a GPU pool exists once the process
/// touched that device) or a budget below [`MIN_BUDGET_BYTES`], as `QVSHIM_BUDGET` refuses one.
///
/// [`MIN_BUDGET_BYTES`]: crate::base::config::MIN_BUDGET_BYTES
#[no_mangle]
pub extern "C" fn qvshim_set_budget(pool: i32, bytes: u64) -> i32 {
    if bytes < crate::base::config::MIN_BUDGET_BYTES {
        return -1;
    }
    match usize::try_from(pool).ok().and_then(ledger::pool) {
        Some(p) if p.is_active() => {
            p.set_budget(bytes);
            0
        }
        _ => -1,
    }
}

/// Purges jemalloc's dirty and muzzy pages now; returns the bytes of resident memory returned
/// (resident before minus after; 0 when nothing came back).
#[no_mangle]
pub extern "C" fn qvshim_purge() -> u64 {
    crate::base::jemalloc::purge().returned()
}

/// # Safety
/// `cb` is a function with the `qvshim_level_callback` signature; `ctx` is passed back as is.
#[no_mangle]
pub unsafe extern "C" fn qvshim_on_level_change(
    cb: Option<crate::runtime::callbacks::LevelCallback>,
    ctx: *mut core::ffi::c_void,
) -> i32 {
    match cb {
        Some(cb) => crate::runtime::callbacks::register(cb, ctx),
        None => -1,
    }
}

/// Removes a registered level callback: 0, or -1 for an unknown id.
#[no_mangle]
pub extern "C" fn qvshim_remove_level_callback(id: i32) -> i32 {
    crate::runtime::callbacks::remove(id)
}

/// Writes the diagnostic dump (text, or JSON when `json` is non-zero) to `fd` from the calling
/// thread: 0, or -1 when the write failed. Never from a signal handler (docs/DUMP.md).
#[no_mangle]
pub extern "C" fn qvshim_dump(fd: i32, json: i32) -> i32 {
    if crate::diag::write_dump(fd, json != 0) {
        0
    } else {
        -1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of, size_of_val};
    use std::path::Path;
    use std::process::Command;

    /// Each field of [`PoolStats`] as (name, offset, size), in declaration order.
    fn rust_layout() -> Vec<(&'static str, usize, usize)> {
        let s = PoolStats::default();
        macro_rules! fields {
            ($($name:ident),*) => {
                vec![$((stringify!($name), offset_of!(PoolStats, $name), size_of_val(&s.$name))),*]
            };
        }
        fields!(
            struct_size,
            pool,
            level,
            device,
            budget,
            effective_budget,
            reserve,
            reserve_in_use,
            live,
            peak,
            allocs,
            frees,
            refusals,
            largest_refused,
            purges,
            level_changes,
            notifications
        )
    }

    /// The layout of `struct qvshim_pool_stats` as gcc compiles include/qvshim.h
    /// (shim-tests/abi/stats_layout.c): the fields, then sizeof.
    fn c_layout() -> (Vec<(String, usize, usize)>, usize) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out_dir = std::env::temp_dir().join(format!("qvshim-abi-{}", std::process::id()));
        std::fs::create_dir_all(&out_dir).expect("a temporary directory for the C probe");
        let binary = out_dir.join("stats_layout");
        let built = Command::new("gcc")
            .arg("-I")
            .arg(root.join("include"))
            .arg("-o")
            .arg(&binary)
            .arg(root.join("shim-tests/abi/stats_layout.c"))
            .status()
            .expect("gcc to run");
        assert!(built.success(), "expected the C layout probe to compile");
        let output = Command::new(&binary).output().expect("the probe to run");
        let _ = std::fs::remove_dir_all(&out_dir);
        let text = String::from_utf8(output.stdout).expect("the probe prints text");
        let mut fields = Vec::new();
        let mut total = 0;
        for line in text.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["sizeof", n] => total = n.parse().expect("a size"),
                [name, offset, size] => fields.push((
                    name.to_string(),
                    offset.parse().expect("an offset"),
                    size.parse().expect("a size"),
                )),
                _ => panic!("unexpected probe line {line:?}"),
            }
        }
        (fields, total)
    }

    #[test]
    fn pool_stats_has_the_layout_of_the_c_header() {
        let (c_fields, c_size) = c_layout();
        let rust: Vec<(String, usize, usize)> = rust_layout()
            .into_iter()
            .map(|(name, offset, size)| (name.to_string(), offset, size))
            .collect();
        assert_eq!(
            rust, c_fields,
            "expected PoolStats (src/ledger/stats.rs) to have the fields, offsets and sizes of \
             struct qvshim_pool_stats in include/qvshim.h"
        );
        assert_eq!(
            size_of::<PoolStats>(),
            c_size,
            "expected sizeof(PoolStats) to equal sizeof(struct qvshim_pool_stats)"
        );
    }
}
