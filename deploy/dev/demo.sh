#!/usr/bin/env bash
# The demo rollout: brings up RabbitMQ and Redis if needed, builds fleetbatch (release), and
# runs `fleetbatch demo`. Arguments go to `fleetbatch demo` (default: --devices 100000).
#   deploy/dev/demo.sh
#   deploy/dev/demo.sh --devices 20000 --json
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/dev/toolchain.sh
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
deploy/dev/services.sh start
deploy/dev/services.sh wait
cargo build --release --locked --bins
if [ "$#" -eq 0 ]; then set -- --devices 100000; fi
exec target/release/fleetbatch demo "$@"
