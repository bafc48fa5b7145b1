//! The end-to-end suite's library: the shared harness
//! ([`nbdraid_harness`]), re-exported so the tests name it in one place.

pub use nbdraid_harness::*;
