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
deploy/dev/browser.sh
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
# --no-fail-fast: a failing unit test must not hide the end-to-end suite.
cargo test --locked --workspace --all-targets --no-fail-fast -- --test-threads="${FLEETBATCH_TEST_THREADS:-2}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary). A binary that
# started but printed no result line crashed: it counts as one failure, and is named.
awk '/^ *Running / { bin = $NF; started[bin] = 1; order[++n] = bin }
     /^test result:/ { done[bin] = 1
       for (i = 1; i <= NF; i++) {
         if ($(i+1) ~ /^passed/) p += $i
         if ($(i+1) ~ /^failed/) f += $i
         if ($(i+1) ~ /^ignored/) ig += $i } }
     END { for (k = 1; k <= n; k++) if (!done[order[k]]) { print "crashed (no result line): " order[k]; f++ }
           printf "tests: %d passed, %d failed, %d skipped\n", p, f, ig }' "$log"
exit "$status"
