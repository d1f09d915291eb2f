#!/usr/bin/env python3
"""Greedy decoding, ours vs PyTorch + transformers, token by token on IFEval prompts.

Both sides load the same Hugging Face checkpoint of SmolLM2-135M-Instruct (written once
by `hindsight convert` from the GGUF, shared with compare_logits.py) in float32:

- ours: `hindsight eval --model CKPT --bench ifeval --temperature 0 --max-new-tokens 64
  --token-ids FILE` (the evaluator's continuous batching, `--max-batch`; the engine is
  batch-invariant, which `--check-ours` verifies on the first prompts);
- transformers: AutoTokenizer.apply_chat_template(add_generation_prompt=True) on the
  same directory, AutoModelForCausalLM (float32, eager attention), `generate` with
  do_sample=False, the checkpoint's eos ids, 64 new tokens, one prompt at a time by default
  (batch 1 is the faithful reference: no padding; `--hf-batch N` pads on the left, and
  `--check-hf-batch K` compares that with batch 1 on the first K prompts).

Per prompt: whether the prompt token ids are identical (transformers gets its own ids),
whether the generated tokens are identical up to 64 tokens or the first stop token, and
else the first divergent position k and, from transformers' logits at k (the prefix
before k is common to both sides), the gap between its top-1 and top-2 logits and between
its top-1 and the token we chose. A gap of a few 1e-4 is the size of the f32 logit
differences between two correct implementations (compare_logits.py: 1.3e-4 on SmolLM2), so
such a divergence is a near-tie resolved differently by rounding.

Writes OUT/greedy/agreement.json and prints a table; exits 1 if the fraction of identical
prompts is under --threshold. transformers' results are cached per prompt in
OUT/greedy/hf-bN.jsonl, so an interrupted run resumes.

Usage (venv: see bench/README.md):
    bench/.venv/bin/python bench/greedy_agreement.py [--limit N] [--stage all|ours|hf|report] [--bin PATH]
(delete bench/out/greedy to start over, e.g. after re-converting the checkpoint)
"""

import argparse
import json
import os
import sys
import time
from collections import Counter

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_common import HERE, convert, default_bin, run

MAX_NEW = 64
TOPK = 20
PROMPTS = os.path.join(HERE, "..", "constraints", "benchmarks", "ifeval", "input_data.jsonl")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_ours(args, ckpt, out_dir, limit, max_batch, tag):
    """Our greedy tokens: {index: {prompt_ids, token_ids, finished}} and the seconds taken."""
    responses = os.path.join(out_dir, f"ours-{tag}.jsonl")
    ids = os.path.join(out_dir, f"ours-{tag}.ids.jsonl")
    if os.path.exists(responses):
        os.remove(responses)  # a fresh run, not a resume
    _, secs = run([args.bin, "--threads", str(args.threads), "eval", "--no-progress",
                   "--model", ckpt, "--bench", "ifeval", "--limit", str(limit),
                   "--temperature", "0", "--max-new-tokens", str(MAX_NEW),
                   "--max-batch", str(max_batch), "--output", responses, "--token-ids", ids])
    return {r["index"]: r for r in read_jsonl(ids)}, secs


def trim(tokens, eos):
    """Up to and including the first stop token."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


class Transformers:
    def __init__(self, ckpt, threads):
        torch.set_num_threads(threads)
        self.tok = AutoTokenizer.from_pretrained(ckpt)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=torch.float32, attn_implementation="eager")
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        pad = self.tok.pad_token_id
        self.pad = pad if pad is not None else min(self.eos)

    def prompt_ids(self, prompt):
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def generate(self, batch_ids, topk=TOPK):
        """Greedy continuations of a list of prompts (left-padded together): per prompt, the
        tokens (trimmed at the first stop token) and, per step, the ids and logits of the
        top `topk` tokens (enough to explain a divergence without keeping whole rows)."""
        width = max(len(p) for p in batch_ids)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in batch_ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch_ids])
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, temperature=None, top_p=None,
            top_k=None, max_new_tokens=MAX_NEW, eos_token_id=sorted(self.eos),
            pad_token_id=self.pad, output_logits=True, return_dict_in_generate=True)
        top = torch.topk(torch.stack(out.logits, dim=1), topk, dim=-1)  # [B, steps, k]
        gen = out.sequences[:, width:].tolist()
        res = []
        for i, g in enumerate(gen):
            g = trim(g, self.eos)
            res.append((g, top.indices[i, : len(g)].tolist(), top.values[i, : len(g)].tolist()))
        return res


def compare(ours, hf_tokens, top_ids, top_vals):
    """First divergence of two greedy continuations, explained by transformers' logits at
    that step (its top-`TOPK` ids and values)."""
    n = min(len(ours), len(hf_tokens))
    k = next((i for i in range(n) if ours[i] != hf_tokens[i]), None)
    if k is None:
        if len(ours) == len(hf_tokens):
            return {"identical": True}
        k = n  # one side stopped without the other emitting a stop token: cannot happen
        # when both stop on the same ids; kept so that such a mismatch shows
    r = {"identical": False, "position": k,
         "ours_token": ours[k] if k < len(ours) else None,
         "hf_token": hf_tokens[k] if k < len(hf_tokens) else None}
    if k < len(top_ids):
        ids, vals = top_ids[k], top_vals[k]
        r["hf_top2_gap"] = vals[0] - vals[1]
        if r["ours_token"] in ids:
            j = ids.index(r["ours_token"])
            r["hf_gap_to_ours"] = vals[0] - vals[j]
            r["ours_rank_in_hf"] = j
        else:
            r["ours_rank_in_hf"] = f">={len(ids)}"
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=default_bin())
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--limit", type=int, default=0, help="first N IFEval prompts (0 = all 541)")
    ap.add_argument("--threads", type=int, default=2, help="our threads")
    ap.add_argument("--hf-threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine PyTorch's OpenMP "
                         "threads slow down ~8x as soon as anything else runs)")
    ap.add_argument("--max-batch", type=int, default=16, help="our --max-batch")
    ap.add_argument("--hf-batch", type=int, default=1,
                    help="prompts per transformers generate call (> 1: left padding)")
    ap.add_argument("--stage", choices=["all", "ours", "hf", "report"], default="all",
                    help="ours: only our run; hf: only transformers' (cached); report: "
                         "reuse our last run and the cache (computing what is missing); "
                         "ours and hf can run at the same time in two processes")
    ap.add_argument("--check-ours", type=int, default=0, metavar="K",
                    help="also run ours on the first K prompts at batch 1 and again at "
                         "--max-batch, and require tokens identical to the main run's")
    ap.add_argument("--check-hf-batch", type=int, default=0, metavar="K",
                    help="compare --hf-batch with batch 1 on the first K prompts")
    ap.add_argument("--threshold", type=float, default=0.95,
                    help="exit 1 if the fraction of identical prompts is lower")
    ap.add_argument("--tie", type=float, default=1e-3,
                    help="a divergence whose transformers top-1/our-token gap is under this "
                         "is counted as a near-tie")
    args = ap.parse_args()
    prompts = [r["prompt"] for r in read_jsonl(PROMPTS)]
    n = len(prompts) if args.limit <= 0 else min(args.limit, len(prompts))
    ckpt = convert(args.bin, "smollm2", args.out)
    out_dir = os.path.join(args.out, "greedy")
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "ours-main.json")

    repro = {}
    if args.stage in ("all", "ours"):
        ours, ours_secs = run_ours(args, ckpt, out_dir, n, args.max_batch, "main")
        ours_tokens = sum(len(ours[i]["token_ids"]) for i in range(n))
        print(f"ours: {n} prompts, {ours_tokens} tokens in {ours_secs:.1f}s "
              f"(batch {args.max_batch}, {args.threads} threads)", flush=True)
        if args.check_ours:
            k = min(args.check_ours, n)
            for b in sorted({1, args.max_batch}):
                again, _ = run_ours(args, ckpt, out_dir, k, b, f"check-b{b}")
                same = all(again[i]["token_ids"] == ours[i]["token_ids"] for i in range(k))
                repro[f"batch{b}_vs_main"] = {"prompts": k, "identical": same}
                print(f"ours, first {k} prompts at batch {b} vs the main run: "
                      f"{'identical' if same else 'DIFFERENT'}", flush=True)
        with open(meta_path, "w") as f:
            json.dump({"prompts": n, "seconds": ours_secs, "tokens": ours_tokens,
                       "max_batch": args.max_batch, "threads": args.threads,
                       "reproducibility": repro}, f)
        if args.stage == "ours":
            return
    if args.stage in ("all", "report"):
        ours = {r["index"]: r for r in read_jsonl(os.path.join(out_dir, "ours-main.ids.jsonl"))}
        missing = [i for i in range(n) if i not in ours]
        if missing:
            sys.exit(f"our last run lacks {len(missing)} of the first {n} prompts: run --stage ours")

    hf = Transformers(ckpt, args.hf_threads)
    cache_path = os.path.join(out_dir, f"hf-b{args.hf_batch}.jsonl")
    cache = {}
    if os.path.exists(cache_path):
        for r in read_jsonl(cache_path):
            cache[r["index"]] = r
    hf_ids = [hf.prompt_ids(p) for p in prompts[:n]]
    t0 = time.time()
    hf_tokens_done = 0
    with open(cache_path, "a", encoding="utf-8") as cf:
        todo = [i for i in range(n) if i not in cache or cache[i]["prompt_ids"] != hf_ids[i]]
        for s in range(0, len(todo), args.hf_batch):
            idx = todo[s:s + args.hf_batch]
            for i, (toks, top_ids, top_vals) in zip(idx, hf.generate([hf_ids[i] for i in idx])):
                r = {"index": i, "prompt_ids": hf_ids[i], "hf": toks,
                     "top_ids": top_ids, "top_vals": top_vals}
                cache[i] = r
                hf_tokens_done += len(toks)
                cf.write(json.dumps(r) + "\n")
                cf.flush()
            done = s + len(idx)
            if done % 20 < args.hf_batch or done == len(todo):
                el = time.time() - t0
                print(f"transformers: {done}/{len(todo)} prompts, {el:.0f}s, "
                      f"{hf_tokens_done / max(el, 1e-9):.1f} tokens/s", flush=True)
    hf_secs = time.time() - t0
    if args.stage == "hf":
        return

    batch_check = None
    if args.check_hf_batch and args.hf_batch > 1:
        k = min(args.check_hf_batch, n)
        same = 0
        for i in range(k):
            toks = hf.generate([hf_ids[i]])[0][0]
            same += toks == cache[i]["hf"]
        batch_check = {"prompts": k, "identical_to_batch1": same}
        print(f"transformers batch {args.hf_batch} vs batch 1 on the first {k} prompts: "
              f"{same}/{k} identical", flush=True)

    with open(meta_path) as f:
        meta = json.load(f)
    repro = meta["reproducibility"]
    rows = []
    for i in range(n):
        c = cache[i]
        r = {"index": i, "ours": ours[i]["token_ids"], "hf": c["hf"]}
        r.update(compare(ours[i]["token_ids"], c["hf"], c["top_ids"], c["top_vals"]))
        rows.append(r)
    prompt_equal = [ours[i]["prompt_ids"] == hf_ids[i] for i in range(n)]
    identical = sum(r["identical"] for r in rows)
    div = [r for r in rows if not r["identical"]]
    ties = [r for r in div if r.get("hf_gap_to_ours", 1e9) < args.tie]
    frac = identical / n
    hist = Counter(r["position"] // 8 * 8 for r in div)
    # The closest calls both sides made the same way: transformers' top-1/top-2 gaps on the
    # common prefixes (how often the check had a near-tie to get right).
    gaps = sorted((v[0] - v[1], i, k) for i in range(n)
                  for k, v in enumerate(cache[i]["top_vals"][:rows[i].get("position", MAX_NEW)]))
    agreed_ties = [g for g in gaps if g[0] < args.tie]

    print(f"\nprompt token ids identical: {sum(prompt_equal)}/{n}")
    print(f"first {MAX_NEW} greedy tokens identical: {identical}/{n} = {frac:.3f}")
    print(f"divergent: {len(div)}; at a near-tie (transformers' top-1 minus our token "
          f"< {args.tie:g}): {len(ties)}")
    print(f"agreed steps: {len(gaps)}, of which near-ties (transformers' top-1 minus top-2 "
          f"< {args.tie:g}): {len(agreed_ties)}; closest: "
          + ", ".join(f"{g:.1e} (prompt {i}, step {k})" for g, i, k in gaps[:5]))
    print("divergence position histogram:")
    for b in range(0, MAX_NEW, 8):
        print(f"  {b:2d}-{b + 7:2d}: {hist.get(b, 0):4d} {'#' * hist.get(b, 0)}")
    if div:
        print("\n| prompt | position | ours | transformers | hf top1-top2 | hf top1-ours | ours' rank |")
        print("|---|---|---|---|---|---|---|")
        for r in sorted(div, key=lambda r: r["index"]):
            tok = lambda t: repr(hf.tok.decode([t])) if t is not None else "(end)"
            print(f"| {r['index']} | {r['position']} | {tok(r['ours_token'])} | "
                  f"{tok(r['hf_token'])} | {r.get('hf_top2_gap', float('nan')):.2e} | "
                  f"{r.get('hf_gap_to_ours', float('nan')):.2e} | {r.get('ours_rank_in_hf', '')} |")
    summary = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> f32 HF checkpoint)", "checkpoint": ckpt,
        "prompts": n, "max_new_tokens": MAX_NEW, "identical": identical, "fraction": frac,
        "threshold": args.threshold, "prompt_ids_identical": sum(prompt_equal),
        "near_tie_threshold": args.tie, "near_ties": len(ties),
        "agreed_steps": len(gaps), "agreed_near_ties": len(agreed_ties),
        "closest_agreed": [{"gap": g, "prompt": i, "step": k} for g, i, k in gaps[:20]],
        "divergence_histogram": {f"{b}-{b + 7}": hist.get(b, 0) for b in range(0, MAX_NEW, 8)},
        "ours": meta,
        "transformers": {"version": transformers.__version__, "torch": torch.__version__,
                         "batch": args.hf_batch, "attn": "eager", "dtype": "float32",
                         "threads": args.hf_threads,
                         "seconds_this_run": hf_secs, "prompts_generated_this_run": len(todo),
                         "batch_check": batch_check},
        "divergences": sorted(div, key=lambda r: r["index"]),
    }
    path = os.path.join(out_dir, "agreement.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nwrote {path}")
    ok = frac >= args.threshold and all(v["identical"] for v in repro.values())
    if batch_check:
        ok = ok and batch_check["identical_to_batch1"] == batch_check["prompts"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
