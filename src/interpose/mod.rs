//! The symbols qvshim takes over in the host process, one file per surface. Each exported
//! function is a one-line forward: the checks and accounting live in `heap` and `ledger`.

pub mod malloc;
