//! The symbols qvshim takes over in the host process, one file per surface. Each exported
//! function is a one-line forward: the checks and accounting live in `heap`, `gpu` and `ledger`.

pub mod cuda;
pub mod dlopen;
pub mod malloc;
