#!/usr/bin/env bash
# Makes sure a local RabbitMQ answers on 127.0.0.1:5672: start the installed one, install it where this
# machine allows (Debian, root), otherwise say exactly how to get one.
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if port_open; then exit 0; fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing rabbitmq-server (Debian package)..." >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  else
    cat >&2 <<'MSG'
No RabbitMQ is reachable on 127.0.0.1:5672 and this script cannot install one here.
Get one in any of these ways, then run `make dev` again:
  - Debian/Ubuntu (root):  apt-get install rabbitmq-server && rabbitmq-server -detached
  - macOS (Homebrew):      brew install rabbitmq && brew services start rabbitmq
  - Docker:                docker run -d -p 5672:5672 -p 15672:15672 rabbitmq:3-management
Or point AUTHNOTIFY_RABBITMQ_URL at a broker you already have.
MSG
    exit 1
  fi
fi

if ! port_open; then
  echo "starting rabbitmq-server..." >&2
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 90); do
    port_open && break
    sleep 1
  done
fi
port_open || { echo "RabbitMQ did not come up on 127.0.0.1:5672 (see /var/log/rabbitmq/)" >&2; exit 1; }
# The port opens a moment before the node accepts AMQP logins.
rabbitmq-diagnostics -q check_running >/dev/null 2>&1 || sleep 3
