#!/usr/bin/env bash
# A throwaway PostgreSQL server for the sweep tests (tests/test_sweep_run.py).
#
#   source tests/postgres.sh         # install if missing, start, export STABENCH_TEST_POSTGRES_URL
#   eval "$(tests/postgres.sh)"      # the same from any shell (prints the export line)
#   tests/postgres.sh stop           # stop the server and delete its data
#
# Installs Debian's `postgresql` when no server binaries are found (apt-get; needs root), then runs
# initdb + pg_ctl as the `postgres` user in $STABENCH_PG_DIR (default /tmp/stabench-pg), listening on
# 127.0.0.1:$STABENCH_PG_PORT (default 54329) only, with a database and role `stabench` whose random
# password is kept in $STABENCH_PG_DIR/password. Running it again reuses the running server.
# Progress goes to stderr; sourcing changes nothing in the calling shell but that one variable.

_stabench_pg() (
    set -euo pipefail
    DIR="${STABENCH_PG_DIR:-/tmp/stabench-pg}"
    PORT="${STABENCH_PG_PORT:-54329}"
    DB=stabench
    ROLE=stabench

    log() { echo "postgres.sh: $*" >&2; }
    find_bin() {
        local d
        for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
            [ -x "$d/initdb" ] && { echo "$d"; return 0; }
        done
        command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
        return 1
    }
    as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

    BIN="$(find_bin || true)"
    if [ "$1" = stop ]; then
        if [ -n "$BIN" ] && [ -d "$DIR/data" ]; then
            as_postgres "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >&2 || true
        fi
        rm -rf "$DIR"
        log "stopped"
        return 0
    fi

    if [ -z "$BIN" ]; then
        log "installing Debian's postgresql"
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >&2
        BIN="$(find_bin)"
    fi
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir "$DIR" --shell /usr/sbin/nologin postgres
    fi
    mkdir -p "$DIR"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$DIR"; fi
    chmod 700 "$DIR"
    if [ ! -s "$DIR/password" ]; then  # hex digits only: no URL quoting needed
        as_postgres sh -c "umask 077; od -An -tx1 -N12 /dev/urandom | tr -d ' \n' > '$DIR/password'"
    fi
    PASSWORD="$(cat "$DIR/password")"

    if [ ! -f "$DIR/data/PG_VERSION" ]; then
        log "initdb in $DIR/data"
        as_postgres "$BIN/initdb" -D "$DIR/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 >&2
    fi
    if ! as_postgres "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
        log "starting on 127.0.0.1:$PORT"
        as_postgres "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
            -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=200" start >&2
    fi
    psql_su() { as_postgres "$BIN/psql" -h "$DIR" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
    if [ "$(psql_su -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
        psql_su -c "CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD'" >&2
    fi
    if [ "$(psql_su -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
        psql_su -c "CREATE DATABASE $DB OWNER $ROLE" >&2
    fi
    log "ready: postgresql://$ROLE:***@127.0.0.1:$PORT/$DB"
    echo "postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"
)

if [ "${BASH_SOURCE[0]}" != "$0" ]; then  # sourced: always start (a sourced script sees the caller's "$1")
    STABENCH_TEST_POSTGRES_URL="$(_stabench_pg start)" && export STABENCH_TEST_POSTGRES_URL
    unset -f _stabench_pg
elif [ "${1:-start}" = stop ]; then
    _stabench_pg stop
else
    url="$(_stabench_pg start)"
    echo "export STABENCH_TEST_POSTGRES_URL=$url"
fi
