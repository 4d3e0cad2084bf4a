#!/bin/sh
# `make test` starts its own PostgreSQL servers (tests/pg.py) from Debian's package: install the
# package where its binaries are missing. Only initdb and postgres are used; the package's own
# cluster is not.
set -eu
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends postgresql
