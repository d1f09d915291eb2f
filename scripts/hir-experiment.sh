#!/usr/bin/env bash
# The paper's comparison on this machine: HiR (hindsight on, binary reward) against RL with the
# binary reward and RL with the constraint-level (CLA) reward, same model, seed, prompts and
# generation budget; then IFEval on the final checkpoints, one figure and one table.
#
#   scripts/hir-experiment.sh [--model smollm2] [--budget 3840] [--rounds 4] [--out DIR]
#                             [--seed 0] [--actors 2] [--lr 5e-6] [--max-new-tokens 128]
#                             [--prompts-per-batch 4] [--group-size 8] [--responses-per-prompt 6]
#                             [--num-prompts 256] [--eval-limit 100] [--eval-max-new-tokens 1280]
#                             [--no-eval] [--arms "hir binary cla"] [--deadline +MINUTES|EPOCH]
#
# Budget: every arm stops once its actors have generated about --budget responses (the
# `generated_responses` of steps.jsonl). A HiR step generates m (--responses-per-prompt) of
# the n (--group-size) samples of each prompt and fills the rest with replays; a baseline step
# generates all n. So HiR takes budget / (P * m) steps and the baselines budget / (P * n), and
# every step trains on P * n samples. Arms are compared at equal generated responses.
#
# Noise: the arms run interleaved in --rounds rounds (each round trains every arm a further
# 1/rounds of its steps, `hindsight up --resume`, in an order rotated each round), so a slow
# period of the shared machine falls on every arm alike. The wall time of an arm is the sum of
# its rounds.
#
# Time box: with --deadline (minutes from now as +N, or a Unix time), a round after the first
# starts only if it would end by then, judged by the previous round's duration. Rounds end on
# equal budgets, so a boxed run still compares the arms at equal generated responses (k/rounds
# of --budget each); table.md says how many rounds ran. Evaluation comes after the box.
#
# Output (--out, default runs/hir-experiment-<time>): one run directory per arm (hir, binary,
# cla: steps.jsonl, summary.json, checkpoints/, plot.png ...), prompts.jsonl, figure.png and
# figure.svg (`hindsight plot` of all arms), eval-<arm>.jsonl / eval-<arm>.json (`hindsight
# eval` of each final checkpoint and of the base model) and table.md.
#
# Environment: HINDSIGHT_BIN (default target/release/hindsight); any other HINDSIGHT_* variable
# reaches every arm alike (e.g. HINDSIGHT_MINI_BATCHES=2).
set -euo pipefail

cd "$(dirname "$0")/.."
BIN=${HINDSIGHT_BIN:-target/release/hindsight}
MODEL=smollm2
BUDGET=3840
ROUNDS=4
OUT=""
SEED=0
ACTORS=2
LR=5e-6
MAX_NEW_TOKENS=128
PROMPTS_PER_BATCH=4
GROUP_SIZE=8
RESPONSES_PER_PROMPT=6
NUM_PROMPTS=256
EVAL_LIMIT=100
EVAL_MAX_NEW_TOKENS=1280
EVAL=1
DEADLINE=""
ARMS="hir binary cla"

die() { echo "hir-experiment: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --actors) ACTORS=$2; shift 2 ;;
        --lr) LR=$2; shift 2 ;;
        --max-new-tokens) MAX_NEW_TOKENS=$2; shift 2 ;;
        --prompts-per-batch) PROMPTS_PER_BATCH=$2; shift 2 ;;
        --group-size) GROUP_SIZE=$2; shift 2 ;;
        --responses-per-prompt) RESPONSES_PER_PROMPT=$2; shift 2 ;;
        --num-prompts) NUM_PROMPTS=$2; shift 2 ;;
        --eval-limit) EVAL_LIMIT=$2; shift 2 ;;
        --eval-max-new-tokens) EVAL_MAX_NEW_TOKENS=$2; shift 2 ;;
        --no-eval) EVAL=0; shift ;;
        --deadline) DEADLINE=$2; shift 2 ;;
        --arms) ARMS=$2; shift 2 ;;
        -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ -x "$BIN" ] || die "no hindsight binary at $BIN (cargo build --release --bin hindsight, or set HINDSIGHT_BIN)"
for n in "$BUDGET" "$ROUNDS" "$ACTORS" "$PROMPTS_PER_BATCH" "$GROUP_SIZE" "$RESPONSES_PER_PROMPT" "$NUM_PROMPTS" "$EVAL_LIMIT" "$EVAL_MAX_NEW_TOKENS"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "expected a positive integer, got '$n'"
done
[ "$RESPONSES_PER_PROMPT" -le "$GROUP_SIZE" ] || die "--responses-per-prompt must be at most --group-size"
case "$DEADLINE" in
    "") ;;
    +*) [[ "${DEADLINE#+}" =~ ^[0-9]+$ ]] || die "--deadline takes +MINUTES or a Unix time, got '$DEADLINE'"
        DEADLINE=$(($(date +%s) + 60 * ${DEADLINE#+})) ;;
    *) [[ "$DEADLINE" =~ ^[0-9]+$ ]] || die "--deadline takes +MINUTES or a Unix time, got '$DEADLINE'" ;;
esac
# Fail now, not after hours of training, when the evaluation cannot run.
if [ "$EVAL" = 1 ] && ! "$BIN" eval --help >/dev/null 2>&1; then
    die "this build of hindsight has no 'eval' subcommand (hindsight eval --model CHECKPOINT --bench ifeval ...); build one that has it, or pass --no-eval to train and plot only"
fi
OUT=${OUT:-runs/hir-experiment-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

# The training prompts: 2 or 3 constraints from a pool that SmolLM2-135M sometimes meets in
# full (keywords present / absent / repeated, a word-count bound it can reach in
# --max-new-tokens, a postscript, an end phrase), so that the binary reward is not all zeros
# and partial successes (HiR's replay candidates) are common. Same seed, same file.
python3 - "$OUT/prompts.jsonl" "$SEED" "$NUM_PROMPTS" <<'PY'
import json, random, sys
path, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
topics = ["the water cycle", "honeybees", "the moon", "volcanoes", "public libraries",
          "bicycles", "coffee", "the ocean", "friendship", "rain", "chess", "trees",
          "the solar system", "music", "cooking", "trains", "winter", "dogs", "museums", "bread"]
forms = ["Write a short paragraph about {}.", "Describe {} in a few sentences.",
         "Tell me something interesting about {}.", "Explain {} simply."]
words = ["water", "light", "friend", "day", "world", "time", "people", "home", "life", "nature"]
ends = ["Any other questions?", "Is there anything else I can help with?"]
def constraint(kind, used):
    free = [w for w in words if w not in used]
    if kind == "existence":
        w = rng.choice(free); used.add(w)
        return {"instruction_id": "keywords:existence", "kwargs": {"keywords": [w]}}
    if kind == "forbidden":
        w = rng.choice(free); used.add(w)
        return {"instruction_id": "keywords:forbidden_words", "kwargs": {"forbidden_words": [w]}}
    if kind == "frequency":
        w = rng.choice(free); used.add(w)
        return {"instruction_id": "keywords:frequency",
                "kwargs": {"keyword": w, "frequency": 2, "relation": "at least"}}
    if kind == "length":
        if rng.random() < 0.5:
            return {"instruction_id": "length_constraints:number_words",
                    "kwargs": {"relation": "less than", "num_words": rng.choice([60, 80, 100])}}
        return {"instruction_id": "length_constraints:number_words",
                "kwargs": {"relation": "at least", "num_words": rng.choice([20, 30, 40])}}
    if kind == "postscript":
        return {"instruction_id": "detectable_content:postscript", "kwargs": {"postscript_marker": "P.S."}}
    return {"instruction_id": "startend:end_checker", "kwargs": {"end_phrase": rng.choice(ends)}}
kinds = ["existence", "forbidden", "frequency", "length", "postscript", "end"]
with open(path, "w") as f:
    for i in range(count):
        used = set()
        chosen = rng.sample(kinds, rng.choice([2, 3]))
        rec = {"id": f"exp-{seed}-{i}",
               "question": rng.choice(forms).format(rng.choice(topics)),
               "constraints": [constraint(k, used) for k in chosen],
               "template": rng.choice(["type1", "type2", "type4"])}
        f.write(json.dumps(rec) + "\n")
PY

# Arm -> the flags that make it; steps for the budget.
arm_flags() {
    case "$1" in
        hir) echo "--hindsight on --reward binary" ;;
        binary) echo "--hindsight off --reward binary" ;;
        cla) echo "--hindsight off --reward cla" ;;
        *) die "unknown arm $1 (hir, binary, cla)" ;;
    esac
}
arm_steps() {
    local per_prompt=$GROUP_SIZE
    [ "$1" = hir ] && per_prompt=$RESPONSES_PER_PROMPT
    local per_step=$((PROMPTS_PER_BATCH * per_prompt))
    echo $(((BUDGET + per_step - 1) / per_step))
}
read -r -a arms <<<"$ARMS"
[ ${#arms[@]} -gt 0 ] || die "--arms is empty"
for arm in "${arms[@]}"; do arm_flags "$arm" >/dev/null; rm -f "$OUT/$arm/wall-seconds.txt"; done

echo "hir-experiment: arms ${arms[*]}, budget $BUDGET generated responses each, $ROUNDS rounds, out $OUT"
rounds_run=0
last_round_seconds=0
for ((round = 1; round <= ROUNDS; round++)); do
    now=$(date +%s)
    if [ -n "$DEADLINE" ] && [ "$round" -gt 1 ] && [ $((now + last_round_seconds)) -gt "$DEADLINE" ]; then
        echo "== deadline: round $round would end at $(date -d @$((now + last_round_seconds)) +%H:%M:%S), after $(date -d @"$DEADLINE" +%H:%M:%S); stopping after $rounds_run of $ROUNDS rounds"
        break
    fi
    for ((k = 0; k < ${#arms[@]}; k++)); do
        arm=${arms[$(((k + round - 1) % ${#arms[@]}))]}
        total=$(arm_steps "$arm")
        target=$(((total * round + ROUNDS - 1) / ROUNDS))
        resume=()
        [ "$round" -gt 1 ] && resume=(--resume)
        echo "== round $round/$ROUNDS: $arm to step $target of $total"
        mkdir -p "$OUT/$arm"
        started=$(date +%s.%N)
        # shellcheck disable=SC2046
        "$BIN" up --model "$MODEL" --actors "$ACTORS" --steps "$target" --run-dir "$OUT/$arm" \
            --seed "$SEED" --prompts "$OUT/prompts.jsonl" --lr "$LR" \
            --max-new-tokens "$MAX_NEW_TOKENS" --prompts-per-batch "$PROMPTS_PER_BATCH" \
            --group-size "$GROUP_SIZE" --responses-per-prompt "$RESPONSES_PER_PROMPT" \
            --checkpoint-every 1000000 --insecure $(arm_flags "$arm") "${resume[@]}"
        echo "$(date +%s.%N) $started" | awk '{printf "%.1f\n", $1 - $2}' >>"$OUT/$arm/wall-seconds.txt"
    done
    last_round_seconds=$(($(date +%s) - now))
    rounds_run=$round
done
echo "$rounds_run $ROUNDS" >"$OUT/rounds.txt"

dirs=()
for arm in "${arms[@]}"; do dirs+=("$OUT/$arm"); done
"$BIN" plot "${dirs[@]}" --output "$OUT/figure.png"
"$BIN" plot "${dirs[@]}" --output "$OUT/figure.svg"

if [ "$EVAL" = 1 ]; then
    for arm in base "${arms[@]}"; do
        if [ "$arm" = base ]; then
            model=$MODEL
        else
            model="$OUT/$arm/checkpoints/$(cat "$OUT/$arm/checkpoints/latest")"
        fi
        echo "== eval $arm: $model"
        "$BIN" eval --model "$model" --bench ifeval --limit "$EVAL_LIMIT" --max-new-tokens "$EVAL_MAX_NEW_TOKENS" \
            --output "$OUT/eval-$arm.jsonl" --summary "$OUT/eval-$arm.json"
    done
fi

python3 - "$OUT" "${arms[@]}" >"$OUT/table.md" <<'PY'
import json, os, sys
out, arms = sys.argv[1], sys.argv[2:]
def steps(arm):
    with open(os.path.join(out, arm, "steps.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]
def smooth(rows):
    # Trailing mean over a tenth of the run (at least 3 steps): one batch is a few prompts.
    w = max(3, len(rows) // 10)
    vals = [r["success_rate"] for r in rows]
    return [sum(vals[max(0, i - w + 1):i + 1]) / len(vals[max(0, i - w + 1):i + 1]) for i in range(len(vals))], w
def scores(name):
    try:
        with open(os.path.join(out, f"eval-{name}.json")) as f:
            s = json.load(f)
    except (OSError, ValueError):
        return None
    def find(*keys):
        for scope in (s, s.get("overall", {}) if isinstance(s, dict) else {}, s.get("scores", {}) if isinstance(s, dict) else {}):
            for k in keys:
                if isinstance(scope, dict) and isinstance(scope.get(k), (int, float)):
                    return scope[k]
        return None
    ps = find("prompt_strict", "prompt_level_strict")
    ins = find("instruction_strict", "instruction_level_strict")
    return ps, ins
def fmt(v, p=3):
    return "n/a" if v is None else f"{v:.{p}f}"
data = {}
for arm in arms:
    rows = steps(arm)
    sm, w = smooth(rows)
    wall = 0.0
    try:
        with open(os.path.join(out, arm, "wall-seconds.txt")) as f:
            wall = sum(float(l) for l in f if l.strip())
    except OSError:
        pass
    gen = [r.get("generated_responses") or 0 for r in rows]
    data[arm] = dict(rows=rows, sm=sm, w=w, gen=gen, wall=wall)
ref = data.get("binary")
target = ref["sm"][-1] if ref else None
def reach(arm):
    if target is None:
        return None
    d = data[arm]
    for s, g in zip(d["sm"], d["gen"]):
        if s >= target:
            return g
    return None
names = {"hir": "HiR", "binary": "binary", "cla": "CLA"}
try:
    with open(os.path.join(out, "rounds.txt")) as f:
        done, planned = (int(x) for x in f.read().split())
    if done < planned:
        print(f"Time-boxed: {done} of {planned} rounds ran, so every arm trained on {done}/{planned} of its budget.\n")
except (OSError, ValueError):
    pass
print(f"| arm | steps | generated responses | first training success (mean of first {data[arms[0]]['w']} steps) | final training success (mean of last {data[arms[0]]['w']} steps) | responses to reach binary's final success{'' if target is None else f' ({target:.3f})'} | IFEval prompt strict | IFEval instruction strict | wall time |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
base = scores("base")
if base:
    print(f"| base model | 0 | 0 | | | | {fmt(base[0])} | {fmt(base[1])} | |")
for arm in arms:
    d = data[arm]
    sc = scores(arm) or (None, None)
    r = reach(arm)
    ratio = "" if (r is None or not ref or not ref["gen"][-1]) else f" ({r / ref['gen'][-1]:.2f}x)"
    first = [r["success_rate"] for r in d["rows"][:d["w"]]]
    print(f"| {names.get(arm, arm)} | {d['rows'][-1]['step']} | {d['gen'][-1]} | {sum(first) / len(first):.3f} | {d['sm'][-1]:.3f} | {'not reached' if r is None else r}{ratio} | {fmt(sc[0])} | {fmt(sc[1])} | {d['wall'] / 60:.1f} min |")
PY
cat "$OUT/table.md"
echo "hir-experiment: figure $OUT/figure.png, table $OUT/table.md"
