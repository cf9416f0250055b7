#!/usr/bin/env bash
# Makes sure a Rust toolchain recent enough for the workspace (edition 2024) is on PATH,
# installing rustup's stable toolchain for this user when cargo is missing.
set -euo pipefail
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
if command -v cargo >/dev/null 2>&1; then exit 0; fi
echo "toolchain: cargo not found; installing the stable Rust toolchain with rustup" >&2
if ! command -v curl >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq curl ca-certificates gcc >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq curl ca-certificates gcc >/dev/null; fi
fi
curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt >&2
