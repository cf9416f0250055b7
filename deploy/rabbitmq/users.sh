#!/usr/bin/env bash
# One RabbitMQ user per fleetbatch component, each with only the rights it uses, for the
# deployment's namespace (fleetbatch setting `namespace`) on a vhost:
#
#   COORDINATOR_PASSWORD=... WORKER_PASSWORD=... deploy/rabbitmq/users.sh NAMESPACE [VHOST]
#
# creates (or updates) NAMESPACE-coordinator and NAMESPACE-worker. Point each component at
# its own: FLEETBATCH_AMQP__URL=amqp://NAMESPACE-worker:...@host:5672/%2f for workers.
#
# coordinator: declares the topology (configure on NAMESPACE.*), publishes tasks, control
#   messages, dead letters and replays (write on NAMESPACE.* and the default exchange),
#   consumes results and reads dead letters (read on NAMESPACE.*).
# worker: declares nothing but its private control queue (configure on amq.gen-*; the
#   topology is only checked, passively); consumes tasks and control messages; publishes
#   results, dead letters, parked tasks (the default exchange, to the retry queues) and
#   tasks it hands back. It cannot declare or delete a queue or exchange, publish a control
#   message (cancel), or read results or dead letters. (RabbitMQ ties purging a queue to the
#   right to consume from it, so a worker's user can purge the tasks queue, as it could
#   consume and drop every task.) A task it could publish is checked like any other: only a
#   device the job targets, with its own execution id, is ever delivered.
set -euo pipefail
ns=${1:?usage: users.sh NAMESPACE [VHOST]}
vhost=${2:-/}
: "${COORDINATOR_PASSWORD:?set COORDINATOR_PASSWORD}" "${WORKER_PASSWORD:?set WORKER_PASSWORD}"
n=$(printf '%s' "$ns" | sed 's/[].[^$*+?(){}|\\]/\\&/g')

user() { # name password
  if rabbitmqctl -q list_users | awk '{print $1}' | grep -qx "$1"; then
    rabbitmqctl -q change_password "$1" "$2"
  else
    rabbitmqctl -q add_user "$1" "$2"
  fi
}

user "$ns-coordinator" "$COORDINATOR_PASSWORD"
rabbitmqctl -q set_permissions -p "$vhost" "$ns-coordinator" \
  "^$n\\..*" "^($n\\..*|amq\\.default)\$" "^$n\\..*"

user "$ns-worker" "$WORKER_PASSWORD"
rabbitmqctl -q set_permissions -p "$vhost" "$ns-worker" \
  "^amq\\.gen-.*" \
  "^($n\\.(tasks|results|dead)|amq\\.default|amq\\.gen-.*)\$" \
  "^($n\\.(tasks|control)|amq\\.gen-.*)\$"
echo "users $ns-coordinator and $ns-worker ready on vhost $vhost"
