//! The one test harness of nbdraid, used by every test suite (end-to-end,
//! client, CLI, RAID layer).
//!
//! Tests start real daemons on OS-picked ports (`--listen 127.0.0.1:0`, then
//! the addresses come from `--ready-file`) and drive them with real NBD
//! clients (libnbd tools, qemu, fio, nbd-client, python3-libnbd).
//!
//! - [`bins`]: the daemons and the CLI, built one way only (see there);
//! - [`node`]: the storage node launcher; [`array`]: the array daemon and
//!   a local cluster (nodes + array daemon); [`peers`]: nbdkit and qemu-nbd;
//!   [`daemon`]: what every launched daemon shares;
//! - [`tools`]: external tools, present or skipped with a reason;
//! - [`process`]: commands with hang detectors, background processes;
//! - [`data`]: the pattern generator and comparisons;
//! - [`fio`], [`fuse`]: drivers for fio's NBD engine and for nbdfuse;
//! - [`shared`]: one fixture (e.g. a cluster) for every test of a binary.
//!
//! Environment knobs:
//!
//! * `NBDRAID_NODE_BIN=/path/to/nbdraid-node`: use this binary, build nothing.
//! * `NBDRAID_TEST_NO_BUILD=1`: do not run cargo; use whatever binary is in the profile dir.
//! * `NBDRAID_TEST_REQUIRE_TOOLS=1` (set it in CI): a missing external tool fails the test
//!   instead of skipping it.
//! * `NBDRAID_TEST_HANG_SECS=N`: scale every hang detector (default 30 s for daemon start).
//! * `NBDRAID_TEST_SERVER=nbdkit`: development aid, serve the volumes with `nbdkit file`
//!   instead of the node (a reference peer; only for checking the tests themselves).
//!
//! Every wait in here is bounded; every process the harness starts is killed by its own PID
//! (or the process group it created for it) and by nothing broader.

pub mod array;
pub mod bins;
pub mod daemon;
pub mod data;
pub mod fio;
pub mod fuse;
pub mod node;
pub mod peers;
pub mod process;
pub mod shared;
pub mod tools;

pub use array::{ArrayDaemon, Cluster, array_entry};
pub use bins::{array_binary, cli_binary, hang, node_binary, profile_dir, workspace_root};
pub use daemon::{DaemonProc, Ready, http_get};
pub use data::{
    assert_files_equal, assert_same, parse_size, pattern, scratch_dir, write_pattern_file,
};
pub use fio::{FioReport, FioRun, assert_fio_clean, fio, fio_io_bytes};
pub use fuse::{NbdFuse, can_loop_mount};
pub use node::{Backend, Node, NodeBuilder, backend, backend_is_node};
pub use peers::Peer;
pub use process::{Background, describe, output_text, run, run_ok, show, wait_for};
pub use shared::Shared;
pub use tempfile::TempDir;
pub use tools::{SYSTEM_PYTHON, have_python_libnbd, have_tools, tool, tool_path};

/// Return early (skipping, with a printed reason) unless all the tools exist.
#[macro_export]
macro_rules! require_tools {
    ($($tool:expr),+ $(,)?) => {
        if !$crate::have_tools(module_path!(), &[$($tool),+]) {
            return;
        }
    };
}
