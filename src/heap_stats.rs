//! The malloc surface's statistics and tuning calls, answered from jemalloc's figures instead of
//! glibc's (whose heap the process does not use under the shim): `mallinfo`, `mallinfo2`,
//! `malloc_stats`, `malloc_info` and `mallopt`.
//!
//! Reading jemalloc's statistics refreshes its "epoch", which takes its locks: these are
//! explicit calls of the program, never part of an allocation or a signal handler. Nothing here
//! allocates through the exported malloc but what stdio does for `malloc_info`'s stream.

use core::ffi::{c_int, c_void};
use core::fmt::{self, Write};

use crate::base::jemalloc;

/// glibc's `struct mallinfo2`: every field a byte or chunk count.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Mallinfo2 {
    pub arena: usize,
    pub ordblks: usize,
    pub smblks: usize,
    pub hblks: usize,
    pub hblkhd: usize,
    pub usmblks: usize,
    pub fsmblks: usize,
    pub uordblks: usize,
    pub fordblks: usize,
    pub keepcost: usize,
}

/// glibc's older `struct mallinfo`, the same fields as `int`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Mallinfo {
    pub arena: c_int,
    pub ordblks: c_int,
    pub smblks: c_int,
    pub hblks: c_int,
    pub hblkhd: c_int,
    pub usmblks: c_int,
    pub fsmblks: c_int,
    pub uordblks: c_int,
    pub fordblks: c_int,
    pub keepcost: c_int,
}

/// The heap as glibc's fields describe it: `arena` the bytes jemalloc has mapped for blocks,
/// `uordblks` the bytes in live blocks (jemalloc's `stats.allocated`: the program's blocks and
/// the shim's own), `fordblks` the rest of `arena`. Counts glibc keeps per chunk (`ordblks`,
/// `hblks`, ...) have no jemalloc equivalent and are 0.
pub fn mallinfo2() -> Mallinfo2 {
    let stats = jemalloc::stats();
    let in_use = stats.allocated as usize;
    let arena = (stats.mapped as usize).max(in_use);
    Mallinfo2 {
        arena,
        uordblks: in_use,
        fordblks: arena - in_use,
        ..Mallinfo2::default()
    }
}

/// [`mallinfo2`] in `int`s, each capped at `INT_MAX` (glibc's wraps instead).
pub fn mallinfo() -> Mallinfo {
    let wide = mallinfo2();
    let narrow = |v: usize| v.min(c_int::MAX as usize) as c_int;
    Mallinfo {
        arena: narrow(wide.arena),
        uordblks: narrow(wide.uordblks),
        fordblks: narrow(wide.fordblks),
        ..Mallinfo::default()
    }
}

/// mallopt's parameters tune glibc's heap, which the process does not use: every call succeeds
/// (1, as glibc answers for parameters it ignores) and changes nothing.
pub fn mallopt(_param: c_int, _value: c_int) -> c_int {
    1
}

/// Text built on the stack; what does not fit is cut.
struct StackText {
    buf: [u8; STACK_TEXT_BYTES],
    len: usize,
}

const STACK_TEXT_BYTES: usize = 2048;

impl StackText {
    fn new() -> Self {
        StackText {
            buf: [0; STACK_TEXT_BYTES],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }
}

impl Write for StackText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = STACK_TEXT_BYTES - self.len;
        let n = s.len().min(room);
        if let (Some(dst), Some(src)) = (self.buf.get_mut(self.len..self.len + n), s.get(..n)) {
            dst.copy_from_slice(src.as_bytes());
            self.len += n;
        }
        Ok(())
    }
}

/// glibc's `malloc_stats` report on stderr, with jemalloc's figures.
pub fn malloc_stats() {
    let info = mallinfo2();
    let mut text = StackText::new();
    let _ = write!(
        text,
        "Arena 0:\nsystem bytes     = {:>10}\nin use bytes     = {:>10}\nTotal (incl. mmap):\n\
         system bytes     = {:>10}\nin use bytes     = {:>10}\nmax mmap regions = {:>10}\n\
         max mmap bytes   = {:>10}\n",
        info.arena, info.uordblks, info.arena, info.uordblks, 0, 0
    );
    let bytes = text.as_bytes();
    // SAFETY: writes an initialised buffer to stderr; a short or failed write is ignored, as
    // glibc's malloc_stats ignores them.
    unsafe {
        libc::write(
            libc::STDERR_FILENO,
            bytes.as_ptr().cast::<c_void>(),
            bytes.len(),
        )
    };
}

/// glibc's `malloc_info`: XML in glibc's layout on `stream`, with jemalloc's figures. `options`
/// must be 0; otherwise EINVAL is returned, as glibc does.
///
/// # Safety
/// `stream` is a valid open `FILE *` when `options` is 0.
pub unsafe fn malloc_info(options: c_int, stream: *mut libc::FILE) -> c_int {
    if options != 0 {
        return libc::EINVAL;
    }
    let info = mallinfo2();
    let mut text = StackText::new();
    let _ = write!(
        text,
        "<malloc version=\"1\">\n<heap nr=\"0\">\n<sizes>\n</sizes>\n\
         <total type=\"fast\" count=\"0\" size=\"0\"/>\n\
         <total type=\"rest\" count=\"0\" size=\"{free}\"/>\n\
         <system type=\"current\" size=\"{arena}\"/>\n<system type=\"max\" size=\"{arena}\"/>\n\
         <aspace type=\"total\" size=\"{arena}\"/>\n<aspace type=\"mprotect\" size=\"{arena}\"/>\n\
         </heap>\n<total type=\"fast\" count=\"0\" size=\"0\"/>\n\
         <total type=\"rest\" count=\"0\" size=\"{free}\"/>\n\
         <total type=\"mmap\" count=\"0\" size=\"0\"/>\n\
         <system type=\"current\" size=\"{arena}\"/>\n<system type=\"max\" size=\"{arena}\"/>\n\
         <aspace type=\"total\" size=\"{arena}\"/>\n<aspace type=\"mprotect\" size=\"{arena}\"/>\n\
         </malloc>\n",
        free = info.fordblks,
        arena = info.arena
    );
    let bytes = text.as_bytes();
    // SAFETY: stream is valid (caller's contract); the buffer is initialised.
    unsafe { libc::fwrite(bytes.as_ptr().cast::<c_void>(), 1, bytes.len(), stream) };
    0
}
