#!/usr/bin/env bash
# Makes RabbitMQ (127.0.0.1:5672, guest/guest) and Redis (127.0.0.1:6379) answer: installs
# them from the distribution's packages when they are missing, starts them when they are
# down, waits until they answer. A service that already answers is left alone.
# Run by the tests themselves (tests/support/services.rs) and by .ci/run.
# `services.sh promtool` installs only promtool, for the checks of deploy/prometheus in
# tests/deploy.rs; with no argument it does RabbitMQ and Redis.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
install() {
  echo "$1 is not installed; installing it from the distribution's packages" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_rabbitmq() {
  broker_up() { as_root rabbitmqctl await_startup --timeout 5 >/dev/null 2>&1; }
  if ! broker_up; then
    command -v rabbitmq-server >/dev/null 2>&1 || install rabbitmq-server
    if ! broker_up; then
      echo "starting RabbitMQ" >&2
      as_root rabbitmq-server -detached || true
    fi
    for _ in $(seq 1 60); do broker_up && break; sleep 2; done
  fi
  broker_up || { echo "RabbitMQ did not start" >&2; exit 1; }
  echo "RabbitMQ is up" >&2
}

ensure_redis() {
  redis_up() { redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; }
  if ! redis_up; then
    command -v redis-server >/dev/null 2>&1 || install redis-server
    if ! redis_up; then
      echo "starting Redis" >&2
      redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    fi
    for _ in $(seq 1 30); do redis_up && break; sleep 1; done
  fi
  redis_up || { echo "Redis did not start" >&2; exit 1; }
  echo "Redis is up" >&2
}

ensure_promtool() {
  command -v promtool >/dev/null 2>&1 && return
  # Debian ships promtool in the Prometheus server's package. Only promtool is wanted: a
  # server the package starts would hold port 9090, so it is stopped and disabled again.
  install prometheus --no-install-recommends
  as_root systemctl disable prometheus >/dev/null 2>&1 || true
  as_root service prometheus stop >/dev/null 2>&1 || true
  command -v promtool >/dev/null 2>&1 || { echo "promtool is still missing" >&2; exit 1; }
  echo "promtool is installed" >&2
}

[ $# -gt 0 ] || set -- rabbitmq redis
for service in "$@"; do
  case "$service" in
    rabbitmq | redis | promtool) "ensure_$service" ;;
    *) echo "unknown service: $service (rabbitmq, redis or promtool)" >&2; exit 2 ;;
  esac
done
