//! The ledger: the truth about memory. Pools and levels ([`pools`]), the host's per-thread
//! credit ([`credit`]), what is reported of them ([`stats`]), the host's effective budget
//! ([`effective`]), each GPU's ([`device_effective`]), the history of purges ([`purges`]) and
//! the ledger a process tree shares ([`tree`]).
//!
//! It rings the doorbell when something changed and knows no thread: the monitor decides what
//! to do about it. Everything a pool is asked by an allocation is here, and never allocates,
//! never takes a lock, never logs.

pub mod credit;
pub mod device_effective;
pub mod effective;
pub mod pools;
pub mod purges;
pub mod stats;
pub mod tree;

pub use credit::*;
pub use pools::*;
pub use stats::*;
