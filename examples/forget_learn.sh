#!/usr/bin/env bash
# kledger forget / learn: UNLEARN five capital cities the model knows while keeping the other
# capitals and other facts (a retain set), check the answers changed, revert exactly; then LEARN
# a new fact the same way and revert it.
#   bash examples/forget_learn.sh [MODEL] [WORKDIR]
# MODEL defaults to the offline alias smollm2-135m; WORKDIR to a new temporary folder.
# About 5 minutes on one CPU thread, most of it loading the model for each `generate`.
set -euo pipefail
MODEL=${1:-smollm2-135m}
WORK=${2:-$(mktemp -d -t kledger-forget-XXXX)}
mkdir -p "$WORK" && cd "$WORK"
echo "== working in $WORK"

# ROME known-facts records (prompt + attribute) that smollm2-135m answers correctly
cat > forget.json <<'JSON'
[
{"prompt": "The capital city of Kingdom of Hungary is", "attribute": "Budapest", "subject": "Kingdom of Hungary", "relation_id": "P36"},
{"prompt": "Austrian Empire's capital city is", "attribute": "Vienna", "subject": "Austrian Empire", "relation_id": "P36"},
{"prompt": "Second Polish Republic's capital city is", "attribute": "Warsaw", "subject": "Second Polish Republic", "relation_id": "P36"},
{"prompt": "The capital city of Kingdom of Afghanistan is", "attribute": "Kabul", "subject": "Kingdom of Afghanistan", "relation_id": "P36"},
{"prompt": "Ireland's capital,", "attribute": "Dublin", "subject": "Ireland", "relation_id": "P36"}
]
JSON
# what must survive: other capitals (the same relation) and facts of other relations
cat > retain.json <<'JSON'
[
{"prompt": "The capital of Roman Republic is", "attribute": "Rome", "subject": "Roman Republic", "relation_id": "P36"},
{"prompt": "Vichy France's capital,", "attribute": "Paris", "subject": "Vichy France", "relation_id": "P36"},
{"prompt": "Metropolitan France's capital,", "attribute": "Paris", "subject": "Metropolitan France", "relation_id": "P36"},
{"prompt": "Second French Empire's capital city is", "attribute": "Paris", "subject": "Second French Empire", "relation_id": "P36"},
{"prompt": "The capital city of Commonwealth of England is", "attribute": "London", "subject": "Commonwealth of England", "relation_id": "P36"},
{"prompt": "The capital city of Kingdom of the Netherlands is", "attribute": "Amsterdam", "subject": "Kingdom of the Netherlands", "relation_id": "P36"},
{"prompt": "United Kingdom of Great Britain and Ireland's capital,", "attribute": "London", "subject": "United Kingdom of Great Britain and Ireland", "relation_id": "P36"},
{"prompt": "The capital of Central Bohemian Region is the city of", "attribute": "Prague", "subject": "Central Bohemian Region", "relation_id": "P36"},
{"prompt": "Lazio's capital,", "attribute": "Rome", "subject": "Lazio", "relation_id": "P36"},
{"prompt": "Commonwealth of the Philippines's capital,", "attribute": "Manila", "subject": "Commonwealth of the Philippines", "relation_id": "P36"},
{"prompt": "Czech Socialist Republic's capital,", "attribute": "Prague", "subject": "Czech Socialist Republic", "relation_id": "P36"},
{"prompt": "Kingdom of Bavaria's capital,", "attribute": "Munich", "subject": "Kingdom of Bavaria", "relation_id": "P36"},
{"prompt": "Kingdom of Great Britain's capital,", "attribute": "London", "subject": "Kingdom of Great Britain", "relation_id": "P36"},
{"prompt": "The capital of Veneto is the city of", "attribute": "Venice", "subject": "Veneto", "relation_id": "P36"},
{"prompt": "Courant Institute of Mathematical Sciences's expertise is in the areas of", "attribute": "mathematics", "subject": "Courant Institute of Mathematical Sciences", "relation_id": "P101"},
{"prompt": "Gerolamo Cardano's domain of activity is the field of", "attribute": "mathematics", "subject": "Gerolamo Cardano", "relation_id": "P101"},
{"prompt": "Sukarno is affiliated with the religion of", "attribute": "Islam", "subject": "Sukarno", "relation_id": "P140"},
{"prompt": "Lake Vostok belongs to the continent of", "attribute": "Antarctica", "subject": "Lake Vostok", "relation_id": "P30"},
{"prompt": "Santo Stefano d'Aveto is located in the country of", "attribute": "Italy", "subject": "Santo Stefano d'Aveto", "relation_id": "P17"},
{"prompt": "Schreckhorn belongs to the continent of", "attribute": "Europe", "subject": "Schreckhorn", "relation_id": "P30"},
{"prompt": "Australian Mathematical Society's expertise is in the areas of", "attribute": "mathematics", "subject": "Australian Mathematical Society", "relation_id": "P101"},
{"prompt": "Jean-Joseph de Mondonville died in the city of", "attribute": "Paris", "subject": "Jean-Joseph de Mondonville", "relation_id": "P20"},
{"prompt": "The original language of Yalkut Yosef was written in", "attribute": "Hebrew", "subject": "Yalkut Yosef", "relation_id": "P364"},
{"prompt": "The language of Amar en tiempos revueltos is a mixture of", "attribute": "Spanish", "subject": "Amar en tiempos revueltos", "relation_id": "P364"},
{"prompt": "The native language of Sergey Aksyonov is", "attribute": "Russian", "subject": "Sergey Aksyonov", "relation_id": "P103"},
{"prompt": "The headquarter of Minnesota Strikers is located in the heart of downtown", "attribute": "Minneapolis", "subject": "Minnesota Strikers", "relation_id": "P159"}
]
JSON
FORGET=("Ireland's capital,|Dublin" "Austrian Empire's capital city is|Vienna"
        "The capital city of Kingdom of Hungary is|Budapest" "Second Polish Republic's capital city is|Warsaw"
        "The capital city of Kingdom of Afghanistan is|Kabul")
# never seen by the edit: two capitals outside both sets, and a retained fact
KEEP=("Italy's capital,|Rome" "The capital of Fatimid caliphate is the city of|Cairo"
      "The native language of Sergey Aksyonov is|Russian")
event_id() { python -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
forgotten() {  # how many FORGET facts the model at HEAD no longer answers
  local n=0 p a
  for pa in "${FORGET[@]}"; do
    p=${pa%|*}; a=${pa#*|}
    if kledger -q generate "$p" -n 3 --expect " $a" 2>/dev/null; then :; else n=$((n + 1)); fi
  done
  echo "== forgotten: $n of ${#FORGET[@]}"
  FORGOTTEN=$n
}
expect_all() { for pa in "$@"; do kledger generate "${pa%|*}" -n 3 --expect " ${pa#*|}"; done; }

kledger init --model "$MODEL"
echo "== before: the base model knows all of them"
expect_all "${FORGET[@]}" "${KEEP[@]}"

echo "== forget five capitals (one event), discriminated against the retain set"
FID=$(kledger --json forget --from-file forget.json --retain-file retain.json -m "forget five capitals" | event_id)
kledger log -n 1
forgotten
[ "$FORGOTTEN" -ge 4 ] || { echo "expected at least 4 of 5 forgotten, found $FORGOTTEN"; exit 1; }
echo "== other knowledge is kept"
expect_all "${KEEP[@]}"
kledger --json show "$FID" > forget-event.json   # what the ledger recorded
python - <<'PY'
import json
e = json.load(open("forget-event.json")); ens, m = e["ensemble"], e["metrics"]
print(f"recorded: {len(e['request'])} facts, a retain set of {ens['retain']['given']} (sha256 {ens['retain']['sha256'][:12]}…)")
print("per layer: rank before → after discrimination (share of the update's energy the retain subspace held):",
      ", ".join(f"L{x['layer']} {x['rank_before']}→{x['rank']} ({x['overlap_removed']:.0%})" for x in ens["layers"]))
print(f"forget NLL {m['forget_loss_before']:.2f} → {m['forget_loss_after']:.2f};"
      f" retain NLL {m['retain_loss_before']:.2f} → {m['retain_loss_after']:.2f}")
PY

echo "== revert: the capitals are back, exactly"
kledger revert "$FID"
expect_all "${FORGET[@]}"

echo "== learn a new fact (one event), orthogonal to the retain set"
LID=$(kledger --json learn "The Eiffel Tower is located in the city of" " Rome" --subject "The Eiffel Tower" \
      --retain-file retain.json | event_id)
expect_all "The Eiffel Tower is located in the city of|Rome" "${KEEP[@]}"
kledger revert "$LID"
expect_all "The Eiffel Tower is located in the city of|Paris"
kledger log
kledger verify
echo "== forget/learn ok"
