#!/usr/bin/env python3
"""Compare Hindsight's logits with Hugging Face transformers on the same checkpoints.

For each model: `hindsight convert` writes a Hugging Face checkpoint directory
(SmolLM2 from its GGUF, and tiny random Llama / Llama-3-rope-scaled / Qwen2
models), then `hindsight convert --input DIR --dump-logits` loads that directory
with our loader and writes the logits of a few chat prompts (sampler and trainer
forward). transformers loads the same directory (AutoTokenizer +
AutoModelForCausalLM, float32, eager attention), renders the chat template with
apply_chat_template, and we report per prompt: whether the rendered prompt and the
token ids are identical, and the max |logit difference| (goal: < 1e-3).

Usage (see bench/README.md for the venv):
    bench/.venv/bin/python bench/compare_logits.py [--bin target/debug/hindsight] [--models smollm2,tiny,...]
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_common import HERE, MODELS, convert, default_bin, run

PROMPTS = [
    "What is 2+2?",
    "Write a haiku about rain. Do not use any commas.",
    "Explain photosynthesis in at least 50 words, héllo wörld 😀.",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=default_bin())
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--force", action="store_true", help="re-convert existing checkpoints")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    results = []
    worst = 0.0
    for name in args.models.split(","):
        ckpt = convert(args.bin, name, args.out, args.force)
        dump = os.path.join(args.out, f"{name}.logits.safetensors")
        cmd = [args.bin, "convert", "--input", ckpt, "--dump-logits", dump]
        for p in PROMPTS:
            cmd += ["--prompt", p]
        stdout, dt = run(cmd)
        ours_meta = json.loads(stdout)
        ours = load_file(dump)
        print(f"[{name}] hindsight loaded the checkpoint and ran {len(PROMPTS)} prompts in {dt:.1f}s", flush=True)

        tok = AutoTokenizer.from_pretrained(ckpt)
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        for i, p in enumerate(PROMPTS):
            text = tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            hf_ids = tok(text, add_special_tokens=False)["input_ids"]
            ids = [int(x) for x in ours[f"ids.{i}"]]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float().numpy()
            d_s = float(np.abs(logits - ours[f"logits.{i}"]).max())
            d_t = float(np.abs(logits - ours[f"train_logits.{i}"]).max())
            worst = max(worst, d_s, d_t)
            r = {
                "model": name,
                "prompt": p,
                "tokens": len(ids),
                "template_equal": text == ours_meta[i]["text"],
                "ids_equal": hf_ids == ids,
                "max_abs_diff_sampler": d_s,
                "max_abs_diff_trainer": d_t,
                "max_abs_logit": float(np.abs(logits).max()),
            }
            results.append(r)
            print(
                f"[{name}] prompt {i}: {len(ids)} tokens, template equal {r['template_equal']}, "
                f"ids equal {r['ids_equal']}, max|dlogit| sampler {d_s:.3e} trainer {d_t:.3e} "
                f"(max|logit| {r['max_abs_logit']:.1f})",
                flush=True,
            )
            if not r["template_equal"]:
                print(f"  transformers: {text!r}\n  hindsight:    {ours_meta[i]['text']!r}")
    ok = all(r["template_equal"] and r["ids_equal"] for r in results) and worst < 1e-3
    print(f"worst max|dlogit| = {worst:.3e}; {'PASS' if ok else 'FAIL'} (goal < 1e-3, identical prompts)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "worst": worst, "ok": ok,
                       "torch": torch.__version__, "transformers": __import__("transformers").__version__}, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
