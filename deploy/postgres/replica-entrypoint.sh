#!/bin/bash
# A streaming replica on the official postgres image: on first start, clone the
# primary with pg_basebackup --write-recovery-conf (standby.signal + primary_conninfo),
# then hand over to the image's own entrypoint, which finds a data directory and
# starts the server as a hot standby.
set -euo pipefail

: "${PGDATA:=/var/lib/postgresql/data}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    export PGPASSWORD
    PGPASSWORD="$(cat "${REPLICATION_PASSWORD_FILE:?}")"
    until gosu postgres pg_basebackup --pgdata="$PGDATA" --host="${PRIMARY_HOST:?}" \
        --username=replicator --wal-method=stream --checkpoint=fast --write-recovery-conf; do
        echo "waiting for the primary to accept a base backup..." >&2
        rm -rf "${PGDATA:?}"/*
        sleep 2
    done
    unset PGPASSWORD
fi
exec docker-entrypoint.sh postgres
