#!/bin/bash
# A throwaway PostgreSQL 15 cluster for the fleet server (tests, bench, local demo); no init system needed.
#   scripts/pg.sh start DIR [PORT]   create (first time) and start; prints the database URL
#   scripts/pg.sh stop|restart|destroy DIR
# As root it runs postgres as `nobody` (PostgreSQL refuses root). Loopback TCP only, trust auth.
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${NEPHOSCOPE_VENV:-$here/.venv}
PYTHONPATH=$here/src${PYTHONPATH:+:$PYTHONPATH} exec "$venv/bin/python" -m nephoscope.fleet.pgcluster "$@"
