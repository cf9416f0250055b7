#!/usr/bin/env bash
# A Python environment in target/py for the Python the tests run: the AWS IoT Device SDK v2
# (pip package awsiotsdk) for the device agent (tests/agents/aws_jobs_agent.py), and
# kubernetes-validate for the manifests' schema check (tests/agents/validate_k8s.py), and
# schemathesis for the schema-driven test of the API against its OpenAPI description.
# Installs Debian's python3-venv first when it is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=target/py/bin/python
if [ -x "$py" ] && "$py" -c 'import awsiot, kubernetes_validate, schemathesis' 2>/dev/null; then
  exit 0
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "pyagent: installing python3-venv from Debian's packages" >&2
  sudo_cmd() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
  sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
if ! [ -x "$py" ]; then
  python3 -m venv target/py
fi
target/py/bin/pip install -q --disable-pip-version-check awsiotsdk kubernetes-validate schemathesis
echo "pyagent: $("$py" -c 'import importlib.metadata as m; print("awsiotsdk", m.version("awsiotsdk"), "kubernetes-validate", m.version("kubernetes-validate"), "schemathesis", m.version("schemathesis"))') in target/py" >&2
