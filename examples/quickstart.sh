#!/usr/bin/env bash
# kledger quickstart: edit a fact, inspect the ledger, revert it exactly, export the model.
#   bash examples/quickstart.sh [MODEL] [WORKDIR]
# MODEL defaults to the offline alias smollm2-135m; WORKDIR to a new temporary folder.
set -euo pipefail
MODEL=${1:-smollm2-135m}
WORK=${2:-$(mktemp -d -t kledger-quickstart-XXXX)}
PROMPT="The Eiffel Tower is located in the city of"
mkdir -p "$WORK" && cd "$WORK"
echo "== working in $WORK"

kledger init --model "$MODEL"                                # .kledger/ with the base fingerprint
kledger generate "$PROMPT" -n 3                              # before: " Paris"
kledger add "$PROMPT" " Rome" --subject "The Eiffel Tower"   # one edit (the default, a memory entry) = one ledger event
kledger generate "$PROMPT" -n 3 --expect " Rome"             # after: " Rome"
kledger log                                                  # newest first
kledger show HEAD                                            # request, config, ensemble, metrics, delta
EDIT=$(kledger --json log -n 1 | python -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
kledger revert "$EDIT"                                       # a compensating event; nothing is deleted
kledger generate "$PROMPT" -n 3 --expect " Paris"            # the base answer is back, exactly
kledger verify                                               # hash chain + objects
kledger export edited-model --at HEAD~1                      # the version with the edit
python - <<'PY'
import json
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("edited-model", trust_remote_code=True)  # the memory's code is in the folder
print("exported:", type(m).__name__, "| active edits:", json.load(open("edited-model/kledger.json"))["active_events"])
PY
echo "== quickstart ok"
