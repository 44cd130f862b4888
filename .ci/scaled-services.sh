#!/usr/bin/env bash
# Installs what the scaled stack (ops/scaled_stack.py, the tests marked `scaled`) runs: PostgreSQL, Redis and
# haproxy, from Debian's packages through the machine's configured apt sources. Idempotent: programs already
# installed are left as they are. No service is started here: each stack starts processes of its own.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
missing=()
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "scaled stack's services installed: $(ls -d /usr/lib/postgresql/*/bin | head -1), $(redis-server --version | cut -d' ' -f3), $(haproxy -v | head -1 | cut -d' ' -f3)"
