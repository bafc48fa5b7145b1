#!/usr/bin/env bash
# The test command: installs what the tests need, then checks formatting,
# lints, and runs every test (unit, property, end-to-end with real clients).
# CI runs exactly this (.ci/run). Run from anywhere: `tests/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "tests/run.sh: cargo is required (https://rustup.rs)" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$component"
    fi
done
tests/install-deps.sh

# A fresh clone gains nothing from incremental compilation but gigabytes
# of target/; set CARGO_INCREMENTAL=1 to keep it for repeated local runs.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# From a clean clone the build takes about 2 GiB and the tests hold up to
# about 2 GiB of volume data at once under the temporary directory
# (measured with df during a run); a disk that fills up fails them with
# ENOSPC, so say so up front.
for where in . "${TMPDIR:-/tmp}"; do
    free_kb=$(df -Pk "$where" | awk 'NR == 2 { print $4 }')
    if [ "${free_kb:-0}" -lt $((5 * 1024 * 1024)) ]; then
        echo "tests/run.sh: warning: only $((free_kb / 1024)) MiB free under $where;" \
            "the build and the tests need about 5 GiB, and fail with ENOSPC without it" >&2
    fi
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# No separate build step: clippy compiles every target, and the test
# harness builds the binaries under test itself, once, with the features
# the tests need (tests/harness/src/bins.rs), so no two builds of a daemon
# overwrite each other.
echo "== tests"
NBDRAID_TEST_REQUIRE_TOOLS=1 cargo test --workspace --no-fail-fast
echo "== all tests passed"
