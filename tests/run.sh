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
