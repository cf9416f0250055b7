#!/usr/bin/env bash
# Local RabbitMQ and Redis (and Mosquitto, for MQTT transports) on 127.0.0.1, for the demo and
# the tests. Installs them from Debian's packages when missing.
#
#   deploy/dev/services.sh start [mqtt]   # install if needed, start what is not running
#   deploy/dev/services.sh wait [mqtt]    # wait until they accept connections
#   (with `mqtt`: Mosquitto too)
#   deploy/dev/services.sh stop    # stop what this script started
#   deploy/dev/services.sh status
#
# Servers already listening on the standard ports (5672, 6379, 1883) are used as they are.
set -euo pipefail

STATE_DIR="${FLEETBATCH_SERVICES_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/fleetbatch-services}"
WANT_MQTT=0
if [ "${2:-}" = mqtt ]; then WANT_MQTT=1; fi

sudo_cmd() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

install_missing() {
  local pkgs=()
  command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || pkgs+=(rabbitmq-server)
  command -v redis-server >/dev/null 2>&1 || pkgs+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || pkgs+=(redis-tools)
  if [ "$WANT_MQTT" = 1 ]; then
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || pkgs+=(mosquitto)
  fi
  if [ "${#pkgs[@]}" -gt 0 ]; then
    echo "services: installing ${pkgs[*]} from Debian's packages" >&2
    sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # Don't let package scripts start services through a missing init system.
    sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  fi
}

have_systemd() {
  [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

start_rabbitmq() {
  port_open 5672 && return 0
  echo "services: starting RabbitMQ" >&2
  if have_systemd; then
    sudo_cmd systemctl start rabbitmq-server
  else
    local bin=rabbitmq-server
    command -v rabbitmq-server >/dev/null 2>&1 || bin=/usr/sbin/rabbitmq-server
    sudo_cmd "$bin" -detached >/dev/null 2>&1 || sudo_cmd "$bin" -detached
  fi
}

start_redis() {
  port_open 6379 && return 0
  echo "services: starting Redis (append-only file in $STATE_DIR/redis)" >&2
  mkdir -p "$STATE_DIR/redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 \
    --dir "$STATE_DIR/redis" --appendonly yes --appendfsync everysec --save "" \
    --pidfile "$STATE_DIR/redis.pid" --logfile "$STATE_DIR/redis.log"
}

start_mosquitto() {
  [ "$WANT_MQTT" = 1 ] || return 0
  port_open 1883 && return 0
  echo "services: starting Mosquitto" >&2
  local bin=mosquitto
  command -v mosquitto >/dev/null 2>&1 || bin=/usr/sbin/mosquitto
  mkdir -p "$STATE_DIR"
  printf 'listener 1883 127.0.0.1\nallow_anonymous true\n' > "$STATE_DIR/mosquitto.conf"
  "$bin" -d -c "$STATE_DIR/mosquitto.conf"
}

wait_for() {
  local name=$1 port=$2 secs=${3:-90}
  for _ in $(seq 1 $((secs * 5))); do
    if port_open "$port"; then return 0; fi
    sleep 0.2
  done
  echo "services: $name did not open port $port within ${secs}s" >&2
  return 1
}

case "${1:-}" in
  start)
    install_missing
    start_redis
    start_rabbitmq
    start_mosquitto
    ;;
  wait)
    wait_for Redis 6379 30
    for _ in $(seq 1 150); do
      [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ] && break
      sleep 0.2
    done
    wait_for RabbitMQ 5672 120
    if command -v rabbitmqctl >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
      timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || true
    fi
    if [ "$WANT_MQTT" = 1 ]; then wait_for Mosquitto 1883 30; fi
    echo "services: RabbitMQ on 5672 and Redis on 6379 are up" >&2
    if [ "$WANT_MQTT" = 1 ]; then echo "services: Mosquitto on 1883 is up" >&2; fi
    ;;
  stop)
    if [ -f "$STATE_DIR/redis.pid" ]; then
      kill "$(cat "$STATE_DIR/redis.pid")" 2>/dev/null || true
      rm -f "$STATE_DIR/redis.pid"
    fi
    if have_systemd; then sudo_cmd systemctl stop rabbitmq-server || true
    else sudo_cmd rabbitmqctl stop >/dev/null 2>&1 || true; fi
    ;;
  status)
    for p in 5672 6379 1883; do
      if port_open "$p"; then echo "port $p: open"; else echo "port $p: closed"; fi
    done
    ;;
  *)
    echo "usage: $0 start|wait [mqtt] | stop | status" >&2
    exit 2
    ;;
esac
