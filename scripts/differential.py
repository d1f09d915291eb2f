#!/usr/bin/env python3
"""Differential check of `hindsight verify` against the live reference oracle.

Mutates the benchmark responses (case, commas, whitespace, bullets, quotes, markdown,
truncation, ...), verifies every mutated record with both the reference
(../shared/oracle/verify.py, after `bash ../shared/oracle/setup.sh`) and ours, and prints
the per-instruction agreement rate (strict and loose) and the disagreements by id.
Entries the oracle marks random (`random_used`) or erroring (`errors`) are not compared.

usage: scripts/differential.py [--bench ifeval|ifbench] [--per-record 20] [--seed 0]
                               [--hindsight target/release/hindsight] [--oracle-dir DIR]
"""
import argparse
import collections
import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def read_jsonl(p):
    with open(p, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def truncate(rng, s):
    return s[: rng.randint(0, len(s))] if s else s


def mutate(rng, s):
    ops = [
        lambda s: s.lower(),
        lambda s: s.upper(),
        lambda s: s.title(),
        lambda s: s.replace(",", ""),
        lambda s: s.replace(" ", ", ", rng.randint(1, 5)),
        lambda s: s.replace("\n", " "),
        lambda s: s.replace("\n\n", "\n"),
        lambda s: s.replace("\n", "\n\n"),
        lambda s: s.replace(". ", ".\n\n", rng.randint(1, 4)),
        lambda s: "  \n" + s + "\n\t ",
        lambda s: " ".join(s.split()),
        lambda s: "\n".join("* " + l if l.strip() else l for l in s.split("\n")),
        lambda s: "\n".join("- " + l if l.strip() else l for l in s.split("\n")),
        lambda s: s.replace("*", ""),
        lambda s: '"' + s + '"',
        lambda s: s.strip('"'),
        lambda s: s.replace('"', "\u201c"),
        lambda s: s.replace("'", "\u2019"),
        lambda s: "<<" + s.split("\n")[0][:40] + ">>\n" + s,
        lambda s: s + "\nP.S. " + s[:30],
        lambda s: s.replace("\n\n", "\n***\n"),
        lambda s: s.replace("\n\n", "\n******\n", 1),
        lambda s: s.replace(". ", "! ", rng.randint(1, 5)),
        lambda s: s.replace(". ", "... "),
        lambda s: s.replace(".", ". ", 3),
        lambda s: s.replace(" ", " *", 3).replace(" ", "* ", 3),
        lambda s: "```json\n" + s + "\n```",
        lambda s: "SECTION 1\n" + s + "\nSECTION 2\n" + s[: len(s) // 2],
        lambda s: s + " [name] [address]",
        lambda s: "Mr. Smith went to Washington D.C. on Jan. 5. " + s,
        lambda s: s.replace("a", "A").replace("the", "THE"),
        lambda s: s + "\nIs there anything else I can help with?",
        lambda s: truncate(rng, s),
        lambda s: truncate(rng, s),
        lambda s: "",
        lambda s: s[::-1][:200],
    ]
    for _ in range(rng.randint(1, 3)):
        s = rng.choice(ops)(s)
    return s


def load(bench, d):
    if bench == "ifeval":
        prompts = read_jsonl(os.path.join(d, "data/ifeval/input_data.jsonl"))
        resp = read_jsonl(os.path.join(d, "data/ifeval/input_response_data_gpt4_20231107_145030.jsonl"))
    else:
        prompts = read_jsonl(os.path.join(d, "data/ifbench/IFBench_test.jsonl"))
        resp = read_jsonl(os.path.join(d, "data/ifbench/sample_output.jsonl"))
    p2r = {r["prompt"]: r["response"] for r in resp}
    return [(p, p2r.get(p["prompt"], "")) for p in prompts]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="ifeval", choices=["ifeval", "ifbench"])
    ap.add_argument("--per-record", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hindsight", default=os.path.join(ROOT, "target/release/hindsight"))
    ap.add_argument("--oracle-dir", default=os.environ.get("HINDSIGHT_ORACLE_DIR", os.path.join(ROOT, "../shared/oracle")))
    ap.add_argument("--oracle-python", default=os.path.join(
        os.environ.get("ORACLE_HOME", os.path.expanduser("~/.cache/ifeval-oracle")), "venv/bin/python"))
    ap.add_argument("--show", type=int, default=15, help="disagreements to print")
    a = ap.parse_args()

    rng = random.Random(a.seed)
    recs = []
    for p, resp in load(a.bench, a.oracle_dir):
        for j in range(a.per_record):
            r = {k: p[k] for k in ("prompt", "instruction_id_list", "kwargs")}
            r["key"] = f"{p['key']}~{j}"
            r["response"] = resp if j == 0 else mutate(rng, resp)
            recs.append(r)
    tmp = tempfile.mkdtemp(prefix="hindsight-diff-")
    inp = os.path.join(tmp, "in.jsonl")
    with open(inp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    ref_out, our_out = os.path.join(tmp, "ref.jsonl"), os.path.join(tmp, "ours.jsonl")
    print(f"{len(recs)} records ({a.bench}), verifying with the reference ...", file=sys.stderr)
    subprocess.run([a.oracle_python, os.path.join(a.oracle_dir, "verify.py"), "--bench", a.bench,
                    "--input", inp, "--output", ref_out], check=True, stdout=subprocess.DEVNULL)
    print("... and with hindsight verify", file=sys.stderr)
    subprocess.run([a.hindsight, "verify", "--bench", a.bench, "--allow-unsupported", "--input", inp,
                    "--output", our_out], check=True, stdout=subprocess.DEVNULL)
    ref = {r["key"]: r for r in read_jsonl(ref_out)}
    ours = {r["key"]: r for r in read_jsonl(our_out)}
    byrec = {r["key"]: r for r in recs}
    n = agree = skipped = 0
    bad = collections.Counter()
    per_id = collections.Counter()
    shown = []
    for key, g in ref.items():
        o = ours[key]
        skip = set(g.get("random_used", [])) | {e["index"] for e in g.get("errors", [])}
        skip |= {e["index"] for e in o.get("errors", [])}
        for i, iid in enumerate(g["instruction_id_list"]):
            if i in skip:
                skipped += 1
                continue
            for mode in ("strict", "loose"):
                f = f"follow_instruction_list_{mode}"
                n += 1
                per_id[iid] += 1
                if g[f][i] == o[f][i]:
                    agree += 1
                else:
                    bad[iid] += 1
                    if len(shown) < a.show:
                        shown.append((key, i, iid, mode, g[f][i], byrec[key]["response"][:160]))
    print(f"records: {len(recs)}  verdicts compared: {n} (strict + loose)  skipped (random/error): {skipped}")
    print(f"agreement: {agree}/{n} = {100.0 * agree / max(n, 1):.4f}%")
    if bad:
        print("disagreements by instruction id:")
        for iid, c in bad.most_common():
            print(f"  {iid:<50} {c} of {per_id[iid]}")
        for s in shown:
            print("  key=%s index=%d %s %s reference=%s response=%r" % s)


if __name__ == "__main__":
    main()
