#!/usr/bin/env bash
# Language detection, ours vs the reference, side by side on the same texts (the 1000+
# conformance texts of constraints/tests/data/langdetect_golden.jsonl), one core each:
#   bash bench/langdetect_speed.sh          # LANGDETECT_REPS=5 passes over the texts
# Needs the oracle's venv (bash ../shared/oracle/setup.sh; $ORACLE_HOME, default
# ~/.cache/ifeval-oracle). Prints one JSON line per implementation and the speed-up.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
oracle_py=${ORACLE_HOME:-$HOME/.cache/ifeval-oracle}/venv/bin/python
texts=$root/constraints/tests/data/langdetect_golden.jsonl
export LANGDETECT_REPS=${LANGDETECT_REPS:-5}
py=$(taskset -c 0 "$oracle_py" "$root/bench/langdetect_speed.py" "$texts" | tail -1)
rs=$(cd "$root" && taskset -c 0 cargo bench -q -p hindsight-constraints --bench langdetect 2>/dev/null | tail -1)
echo "$py"
echo "$rs"
python3 -c 'import json,sys; p,r=(json.loads(a) for a in sys.argv[1:]); print(f"speed-up: {r[\"texts_per_s\"]/p[\"texts_per_s\"]:.1f}x ({r[\"ms_per_text\"]} ms vs {p[\"ms_per_text\"]} ms per text)")' "$py" "$rs"
