//! `dlopen`, so that a library opened with RTLD_DEEPBIND shares the process's malloc and free
//! (see [`crate::neighbours::dlopen_flags`]). Everything else is glibc's own `dlopen`, reached by
//! a tail jump: glibc reads the caller from the return address (for the caller's namespace and
//! its RPATH/RUNPATH), and the jump leaves it the caller's. The jump goes to the address
//! resolved with `dlvsym(RTLD_NEXT)`, never to this function, so it cannot call itself.
//!
//! x86-64 only: on other architectures `dlopen` is glibc's and a deep-bound library's blocks
//! must not be passed across (docs/TRAPS.md).

#[cfg(target_arch = "x86_64")]
use core::ffi::{c_char, c_int, c_void};

#[cfg(target_arch = "x86_64")]
use crate::neighbours;

/// # Safety
/// glibc's contract for `dlopen`.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlopen(file: *const c_char, flags: c_int) -> *mut c_void {
    core::arch::naked_asm!(
        // Keep the file name; two pushes and 8 bytes realign the stack to 16 for the call.
        "push rdi",
        "push rsi",
        "sub rsp, 8",
        "call {flags}",
        "add rsp, 8",
        "pop rsi",
        "pop rdi",
        "mov esi, eax",
        "mov rax, qword ptr [rip + {real}]",
        "test rax, rax",
        "jz 2f",
        "jmp rax",
        // No glibc dlopen found: fail as dlopen fails.
        "2:",
        "xor eax, eax",
        "ret",
        flags = sym neighbours::dlopen_flags,
        real = sym neighbours::REAL_DLOPEN,
    )
}
