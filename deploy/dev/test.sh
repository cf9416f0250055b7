#!/usr/bin/env bash
# The test suite: brings up RabbitMQ, Redis and Mosquitto if needed, checks formatting and
# lints, builds the binaries and runs every test (unit tests and the end-to-end suite, which
# starts real coordinator, worker and fleet-sim processes against the real services, and a
# device agent written against the AWS IoT Device SDK for Python).
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/dev/toolchain.sh
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
deploy/dev/services.sh start mqtt
deploy/dev/services.sh wait mqtt
deploy/dev/pyagent.sh
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The end-to-end tests start the coordinator and worker binaries: build them first.
cargo build --locked --workspace --bins
# Supply chain (deny.toml): licenses, banned and duplicate crates, sources, and advisories
# from the RustSec database. Machines that cannot reach the database's git host use a copy
# in ~/.cargo/advisory-dbs when there is one.
command -v cargo-deny >/dev/null || cargo install --locked cargo-deny
if ls -d "$HOME"/.cargo/advisory-dbs/advisory-db-* >/dev/null 2>&1; then
  cargo deny --offline check --hide-inclusion-graph
elif cargo deny fetch db; then
  cargo deny check --hide-inclusion-graph
else
  echo "cargo deny: the RustSec database cannot be fetched here; advisories not checked" >&2
  cargo deny check --hide-inclusion-graph bans licenses sources
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --workspace --all-targets -- --test-threads="${FLEETBATCH_TEST_THREADS:-2}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
