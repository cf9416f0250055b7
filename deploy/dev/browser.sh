#!/usr/bin/env bash
# Headless Chromium and its WebDriver (chromedriver) for the dashboard's browser test, from
# Debian's packages when missing.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
sudo_cmd() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
echo "installing chromium and chromium-driver (the dashboard's browser test)" >&2
sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq
sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
