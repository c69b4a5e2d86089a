//! Everything the host process sees of qvshim, one file per surface: the malloc family
//! ([`malloc`]), the CUDA driver's calls with the `dlsym` and `cuGetProcAddress` answers that
//! hand them out ([`cuda`]), `dlopen` ([`dlopen`]) and the stable C API ([`capi`]). Each exported
//! function is a one-line forward: the checks and accounting live in `heap`, `gpu` and `ledger`.

pub mod capi;
pub mod cuda;
pub mod dlopen;
pub mod malloc;
