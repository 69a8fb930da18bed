#!/usr/bin/env bash
# One federation round for one site on a plain workstation (no scheduler).
#
#   deploy/site_round.sh configs/site_a.yaml a
#   # or every 10 minutes from cron:  */10 * * * *  cd /opt/fedpath && deploy/site_round.sh cfg.yaml a
#
# Safe to run again at any time: a round already submitted is not retrained, a saved update is re-sent,
# and a lock file keeps two copies for the same site from running at once.
set -euo pipefail

CONFIG="${1:?usage: site_round.sh CONFIG SITE [extra fedpath args]}"
SITE="${2:?usage: site_round.sh CONFIG SITE [extra fedpath args]}"
shift 2
cd "${FEDPATH_HOME:-$(dirname "$0")/..}"
FEDPATH="${FEDPATH_VENV:-.venv}/bin/fedpath"

mkdir -p "${TMPDIR:-/tmp}"
exec 9>"${TMPDIR:-/tmp}/fedpath-site-round-${SITE}.lock"
if ! flock -n 9; then
    echo "fedpath: a site-round job for ${SITE} is already running" >&2
    exit 0
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
"$FEDPATH" site-round --config "$CONFIG" --site "$SITE" "$@"
