#!/usr/bin/env bash
# Language detection, ours vs the reference, side by side on the same texts (the 1000+
# conformance texts of constraints/tests/data/langdetect_golden.jsonl), one core each:
#   bash bench/langdetect_speed.sh          # LANGDETECT_REPS=5 passes over the texts
# Python: $LANGDETECT_PYTHON, else the oracle's venv (bash ../shared/oracle/setup.sh;
# $ORACLE_HOME, default ~/.cache/ifeval-oracle) if it exists, else bench/.venv (which needs
# `bench/.venv/bin/pip install langdetect==1.0.9`). Prints one JSON line per implementation
# and the speed-up.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
oracle_py=${ORACLE_HOME:-$HOME/.cache/ifeval-oracle}/venv/bin/python
[ -x "$oracle_py" ] || oracle_py=$root/bench/.venv/bin/python
oracle_py=${LANGDETECT_PYTHON:-$oracle_py}
texts=$root/constraints/tests/data/langdetect_golden.jsonl
export LANGDETECT_REPS=${LANGDETECT_REPS:-5}
py=$(taskset -c 0 "$oracle_py" "$root/bench/langdetect_speed.py" "$texts" | tail -1)
rs=$(cd "$root" && taskset -c 0 cargo bench -q -p hindsight-constraints --bench langdetect | tail -1)
echo "$py"
echo "$rs"
python3 -c 'import json,sys; p,r=(json.loads(a) for a in sys.argv[1:]); print("speed-up: %.1fx (%s ms vs %s ms per text)" % (r["texts_per_s"]/p["texts_per_s"], r["ms_per_text"], p["ms_per_text"]))' "$py" "$rs"
