#!/usr/bin/env bash
# Makes sure a local RabbitMQ answers on 127.0.0.1:5672: start the installed one, install it where this
# machine allows (Debian, root), otherwise say exactly how to get one.
# When AUTHNOTIFY_RABBITMQ_URL (environment or .env) names another host, that broker is the developer's: only check it answers.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # rabbitmq-server and rabbitmq-diagnostics live there on Debian

host=127.0.0.1
port=5672
if [ -z "${AUTHNOTIFY_RABBITMQ_URL:-}" ] && [ -f .env ]; then  # authnotify reads .env too
  AUTHNOTIFY_RABBITMQ_URL=$(sed -n 's/^[[:space:]]*\(export[[:space:]]\+\)\?AUTHNOTIFY_RABBITMQ_URL=["'"'"']\?\([^"'"'"']*\)["'"'"']\?[[:space:]]*$/\2/p' .env | tail -n 1)
fi
if [ -n "${AUTHNOTIFY_RABBITMQ_URL:-}" ]; then
  # amqp[s]://user:pass@host[:port]/vhost -> host and port
  rest=${AUTHNOTIFY_RABBITMQ_URL#*://}
  rest=${rest##*@}
  rest=${rest%%/*}
  case "$rest" in
    *:*) host=${rest%%:*}; port=${rest##*:} ;;
    *) host=$rest; case "$AUTHNOTIFY_RABBITMQ_URL" in amqps://*) port=5671 ;; esac ;;
  esac
fi

port_open() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

if port_open; then exit 0; fi

case "$host" in
  127.0.0.1|localhost|::1) ;;
  *)
    echo "No RabbitMQ answers at $host:$port (AUTHNOTIFY_RABBITMQ_URL): start it, or unset the variable to use a local one." >&2
    exit 1 ;;
esac
if [ "$port" != 5672 ]; then
  echo "No RabbitMQ answers on $host:$port (AUTHNOTIFY_RABBITMQ_URL); this script starts one only on port 5672." >&2
  exit 1
fi

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
port_open || { echo "RabbitMQ did not come up on 127.0.0.1:5672 (see /var/log/rabbitmq/; as a non-root user, start it with sudo)" >&2; exit 1; }
# The port opens a moment before the node accepts AMQP logins.
rabbitmq-diagnostics -q check_running >/dev/null 2>&1 || sleep 3
