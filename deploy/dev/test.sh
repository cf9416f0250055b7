#!/usr/bin/env bash
# The test suite: brings up RabbitMQ and Redis if needed, checks formatting and lints, builds
# the binaries and runs every test (unit tests and the end-to-end suite, which starts real
# coordinator and worker processes against the real services).
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/dev/toolchain.sh
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
deploy/dev/services.sh start
deploy/dev/services.sh wait
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The end-to-end tests start the coordinator and worker binaries: build them first.
cargo build --locked --workspace --bins
cargo test --locked --workspace -- --test-threads="${FLEETBATCH_TEST_THREADS:-2}"
