#!/usr/bin/env bash
# The demo rollout: brings up RabbitMQ, Redis and Mosquitto if needed, builds fleetbatch
# (release), and runs `fleetbatch demo`. Arguments go to `fleetbatch demo` (default:
# --devices 100000).
#   deploy/dev/demo.sh
#   deploy/dev/demo.sh --devices 20000 --json
#   deploy/dev/demo.sh --devices 100000 --devices-over mqtt   # or aws-iot-jobs, http, http2
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/dev/toolchain.sh
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
deploy/dev/services.sh start mqtt
deploy/dev/services.sh wait mqtt
cargo build --release --locked --bins
if [ "$#" -eq 0 ]; then set -- --devices 100000; fi
exec target/release/fleetbatch demo "$@"
