#!/usr/bin/env bash
# Nightly kledger audit: measure HEAD, keep a dated HTML report, blame on a threshold crossing.
#
#   KLEDGER_DIR=/srv/models/my-model  REPORTS=/srv/reports/kledger  ./nightly-audit.sh
#
# Exit status is kledger's: 0 healthy, 3 threshold crossed (collapse warning), other = error.
# The audit only reads the ledger (short read-only connections) and holds the write lock just
# for appending its own event, so it can run while people keep using `kledger log/show/export`.
set -u -o pipefail

: "${KLEDGER_DIR:?set KLEDGER_DIR to the folder holding .kledger/}"
REPORTS="${REPORTS:-$KLEDGER_DIR/audit-reports}"
KEEP_DAYS="${KEEP_DAYS:-30}"
KLEDGER="${KLEDGER:-kledger}"
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
out="$REPORTS/$stamp"
mkdir -p "$out"

# one thread per process is faster on small shared machines; raise on a dedicated box
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# --blame only does work when a threshold is crossed: it bisects the edit history for the edits
# responsible and puts the revert commands into the JSON, the report and the ledger
"$KLEDGER" --ledger "$KLEDGER_DIR" --quiet audit --json --blame --report "$out" > "$out/audit.json"
status=$?
if [ "$status" -eq 3 ]; then
    echo "kledger audit: threshold crossed; report $out/index.html; suggested fix:" >&2
    python3 -c 'import json,sys; b=json.load(open(sys.argv[1])).get("blame") or {}; print("\n".join(b.get("revert_commands") or ["(none found)"]))' "$out/audit.json" >&2 || true
fi
ln -sfn "$out" "$REPORTS/latest"
# keep the reports of the last KEEP_DAYS days
find "$REPORTS" -mindepth 1 -maxdepth 1 -type d -name '20*' -mtime +"$KEEP_DAYS" -exec rm -rf {} + 2>/dev/null || true
exit "$status"
