"""Differential fuzzing input for the in-scope IFEval verifiers.

Writes random records in the oracle's input format (key, prompt, instruction_id_list,
kwargs, response) built from fragments that exercise the checkers' edge cases. Run:

    python3 scripts/fuzz/gen_ifeval_fuzz.py OUT_DIR [N] [SEED]
    $ORACLE_HOME/venv/bin/python ../shared/oracle/verify.py --bench ifeval \
        --input OUT_DIR/fuzz_in.jsonl --output OUT_DIR/fuzz.expected.jsonl --summary OUT_DIR/s.json
    hindsight verify --bench ifeval --input OUT_DIR/fuzz_in.jsonl --output OUT_DIR/ours.jsonl
    $ORACLE_HOME/venv/bin/python ../shared/oracle/compare.py OUT_DIR/ours.jsonl --other OUT_DIR/fuzz.expected.jsonl
"""
import json, random, sys

out = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
random.seed(int(sys.argv[3]) if len(sys.argv) > 3 else 1)

FRAGS = [
    "*", "**", "***", "* ", "- ", "-", "\n", "\n\n", " ", "\t", "\r\n", "\u00a0", "\u2028",
    "\u001c", "\u0085", ",", ".", "!", "?", "\"", "'", "<<", ">>", "<<Title>>", "<< >>",
    "P.S.", "p.s.", "P. S.", "P.P.S", "p. p. s", "ps", "Any other questions?",
    "Is there anything else I can help with?", "```", "```json", "```JSON", "{", "}", "[", "]",
    ":", "\"a\"", "1", "0", "-1", "1.5e3", "NaN", "Infinity", "null", "true", "\\", "\\u00e9",
    "\\ud800", "river", "River", "RIVER", "rivers", "land", "the", "The", "THE", "run",
    "running", "rerun", "run_", "_run", "run\u0301", "ИВАН", "é", "e\u0301", "ß", "İ", "ǅ",
    "Σ", "σ", "x²", "½", "日本", "😀", "\u200d", "hello world", "HELLO WORLD", "word",
    "*highlight*", "**bold**", "* item", "- item", "  * nested", "1. one", "colour", "color",
    "t-shirt", "T-Shirt", "key", "keys", "bc", "BC", "300BC",
]

def response():
    k = random.randint(0, 25)
    s = "".join(random.choice(FRAGS) + (random.choice(["", " "])) for _ in range(k))
    if random.random() < 0.1:
        s = "\"" + s + "\""
    if random.random() < 0.1:
        s = "```json\n" + json.dumps(random.choice([{}, [1, 2], {"a": [None, "x"]}, "s", 3])) + "\n```"
    return s

SPECS = [
    ("punctuation:no_comma", lambda: {}),
    ("change_case:english_lowercase", lambda: {}),
    ("change_case:english_capital", lambda: {}),
    ("keywords:existence", lambda: {"keywords": random.sample(["river", "land", "the", "run", "colou?r", "t-shirt", "é", "日本"], random.randint(1, 3))}),
    ("keywords:forbidden_words", lambda: {"forbidden_words": random.sample(["river", "land", "the", "run", "key", "bc", "é", "t-shirt", "x"], random.randint(1, 3))}),
    ("keywords:frequency", lambda: {"keyword": random.choice(["river", "the", "run", "x", "*"[:0] or "word"]), "frequency": random.randint(1, 4), "relation": random.choice(["less than", "at least"])}),
    ("length_constraints:number_words", lambda: {"num_words": random.randint(1, 30), "relation": random.choice(["less than", "at least"])}),
    ("startend:end_checker", lambda: {"end_phrase": random.choice(["Any other questions?", "Is there anything else I can help with?", "river", "Peace!"])}),
    ("startend:quotation", lambda: {}),
    ("detectable_format:title", lambda: {}),
    ("detectable_content:postscript", lambda: {"postscript_marker": random.choice(["P.S.", "P.P.S"])}),
    ("detectable_format:number_bullet_lists", lambda: {"num_bullets": random.randint(1, 4)}),
    ("detectable_format:number_highlighted_sections", lambda: {"num_highlights": random.randint(1, 4)}),
    ("detectable_format:json_format", lambda: {}),
]

with open(f"{out}/fuzz_in.jsonl", "w") as f:
    for i in range(n):
        specs = random.sample(SPECS, random.randint(1, 4))
        f.write(json.dumps({
            "key": i, "prompt": f"p{i}",
            "instruction_id_list": [s[0] for s in specs],
            "kwargs": [s[1]() for s in specs],
            "response": response(),
        }) + "\n")
