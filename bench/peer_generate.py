#!/usr/bin/env python3
"""Peer side of `hindsight bench generate`: the same generation work with llama.cpp
(llama-cpp-python, low-level batched API) and PyTorch + transformers `generate`.

Reads a JSON job written by `hindsight bench generate`:
    {"gguf": PATH, "hf_dir": PATH, "threads": N, "new_tokens": 128,
     "batch_sizes": [1, 8, 32], "prompts": [[ids...], ...], "peers": ["llama.cpp", "torch"],
     "seed": 0, "repeats": 1, "device": "cpu"}
and prints one JSON object per line: {"peer", "batch", "seconds", "tokens", "tok_per_s", ...}.

Both peers get exactly the same prompt token ids as ours, sample at temperature 1 with no
top-k/top-p, never stop early (every sequence makes `new_tokens` tokens), and run on
`threads` threads. Timing covers prefill + decode + sampling, as ours does.
"""

import ctypes
import json
import os
import sys
import time

import numpy as np


def emit(obj):
    print(json.dumps(obj), flush=True)


def sample_rows(logits, rng):
    """One token per row of `logits` [B, V] at temperature 1 (inverse CDF, vectorised)."""
    z = logits - logits.max(axis=1, keepdims=True)
    cdf = np.cumsum(np.exp(z), axis=1)
    u = rng.random((logits.shape[0], 1)) * cdf[:, -1:]
    return [int(i) for i in (cdf < u).sum(axis=1).clip(max=logits.shape[1] - 1)]


def run_llama_cpp(job):
    import llama_cpp as L

    threads = job["threads"]
    new = job["new_tokens"]
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    load = getattr(L, "llama_model_load_from_file", None) or L.llama_load_model_from_file
    model = load(job["gguf"].encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {job['gguf']}")
    vocab_of = getattr(L, "llama_model_get_vocab", None)
    n_vocab = (
        L.llama_vocab_n_tokens(vocab_of(model)) if vocab_of else L.llama_n_vocab(model)
    )
    rng = np.random.default_rng(job["seed"])
    for b in job["batch_sizes"]:
        prompts = [job["prompts"][i % len(job["prompts"])] for i in range(b)]
        longest = max(len(p) for p in prompts)
        cparams = L.llama_context_default_params()
        cparams.n_ctx = b * (longest + new + 16)
        cparams.n_batch = max(sum(len(p) for p in prompts), b)
        cparams.n_ubatch = min(cparams.n_batch, 512)
        cparams.n_seq_max = b
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        init = getattr(L, "llama_init_from_model", None) or L.llama_new_context_with_model
        for rep in range(job.get("repeats", 1) + 1):  # first run = warm-up
            ctx = init(model, cparams)
            if not ctx:
                raise RuntimeError("llama.cpp could not create a context")
            batch = L.llama_batch_init(cparams.n_batch, 0, 1)
            t0 = time.perf_counter()
            # Prefill every prompt (own sequence id), logits at each prompt's last token.
            n = 0
            last_idx = []
            for s, p in enumerate(prompts):
                for pos, tok in enumerate(p):
                    batch.token[n] = tok
                    batch.pos[n] = pos
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = s
                    batch.logits[n] = pos == len(p) - 1
                    if pos == len(p) - 1:
                        last_idx.append(n)
                    n += 1
            batch.n_tokens = n
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed (prefill)")
            pos = [len(p) for p in prompts]
            rows = np.stack(
                [
                    np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, last_idx[s]), shape=(n_vocab,))
                    for s in range(b)
                ]
            )
            toks = sample_rows(rows, rng)
            generated = b
            for _ in range(new - 1):
                for s in range(b):
                    batch.token[s] = toks[s]
                    batch.pos[s] = pos[s]
                    batch.n_seq_id[s] = 1
                    batch.seq_id[s][0] = s
                    batch.logits[s] = True
                    pos[s] += 1
                batch.n_tokens = b
                if L.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed (decode)")
                # Every token of this batch has logits: one [b, n_vocab] block.
                rows = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(b, n_vocab))
                toks = sample_rows(rows, rng)
                generated += b
            dt = time.perf_counter() - t0
            L.llama_batch_free(batch)
            L.llama_free(ctx)
            if rep > 0:
                emit(
                    {
                        "peer": "llama.cpp",
                        "weights": "gguf (as shipped)",
                        "batch": b,
                        "seconds": dt,
                        "tokens": generated,
                        "tok_per_s": generated / dt,
                        "version": getattr(L, "__version__", "?"),
                    }
                )


def run_torch(job):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    dev = "cuda" if str(job.get("device", "cpu")).startswith("cuda") else "cpu"
    model = AutoModelForCausalLM.from_pretrained(job["hf_dir"], dtype=torch.float32).to(dev)
    model.eval()
    new = job["new_tokens"]
    pad = 0
    for b in job["batch_sizes"]:
        prompts = [job["prompts"][i % len(job["prompts"])] for i in range(b)]
        longest = max(len(p) for p in prompts)
        ids = torch.full((b, longest), pad, dtype=torch.long)
        mask = torch.zeros((b, longest), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as generate expects
            ids[i, longest - len(p) :] = torch.tensor(p)
            mask[i, longest - len(p) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        for rep in range(job.get("repeats", 1) + 1):
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=pad,
                )
            if dev == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            generated = (out.shape[1] - longest) * b
            if rep > 0:
                emit(
                    {
                        "peer": "torch",
                        "weights": f"f32 on {dev}",
                        "batch": b,
                        "seconds": dt,
                        "tokens": generated,
                        "tok_per_s": generated / dt,
                        "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
                    }
                )


def main():
    job = json.load(open(sys.argv[1]))
    os.environ.setdefault("OMP_NUM_THREADS", str(job["threads"]))
    for peer in job["peers"]:
        try:
            if peer == "llama.cpp":
                run_llama_cpp(job)
            elif peer == "torch":
                run_torch(job)
            else:
                raise ValueError(f"unknown peer {peer}")
        except Exception as e:  # report and go on with the other peer
            emit({"peer": peer, "error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
