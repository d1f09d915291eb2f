#!/usr/bin/env python3
"""Peer side of `hindsight bench train`: one learner step with PyTorch + transformers.

Reads a JSON job written by `hindsight bench train`:
    {"checkpoint": HF_DIR, "threads": N, "steps": 5, "warmup": 1, "lr": 1e-6,
     "weight_decay": 0.01, "attn": "sdpa", "ids": [[...T+1 ids...], ...],
     "advantages": [[...T floats...], ...]}
and prints one JSON object: per-step seconds (total, forward + loss, backward + optimizer),
losses, and memory (ru_maxrss of the whole process, and the peak resident set after the
model is loaded, VmHWM after /proc/self/clear_refs).

The work is the same as ours: the checkpoint in float32, input ids[:, :T], loss
-(sum over all B*T positions of log_softmax(logits)[target] * advantage) / (B*T),
backward, and an AdamW step (betas 0.9/0.999, eps 1e-8, weight decay on the >= 2-D
parameters only, as ours), on `threads` threads (torch.set_num_threads).
"""

import json
import os
import resource
import sys
import time


def vm_kb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    job = json.load(open(sys.argv[1]))
    threads = int(job["threads"])
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kwargs = dict(attn_implementation=job.get("attn", "sdpa"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            job["checkpoint"], dtype=torch.float32, **kwargs
        )
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(
            job["checkpoint"], torch_dtype=torch.float32, **kwargs
        )
    dev = "cuda" if str(job.get("device", "cpu")).startswith("cuda") else "cpu"
    model = model.to(dev)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": float(job["weight_decay"])},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = bool(job.get("fused_adamw", True))
    try:
        opt = torch.optim.AdamW(groups, lr=float(job["lr"]), betas=(0.9, 0.999), eps=1e-8, fused=fused)
    except (RuntimeError, TypeError, ValueError):
        fused = False
        opt = torch.optim.AdamW(groups, lr=float(job["lr"]), betas=(0.9, 0.999), eps=1e-8)

    ids = torch.tensor(job["ids"], dtype=torch.long, device=dev)
    adv = torch.tensor(job["advantages"], dtype=torch.float32, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    b, t1 = ids.shape
    t = t1 - 1
    inp, tgt = ids[:, :t], ids[:, 1:]
    n_tokens = b * t

    rss_loaded = vm_kb("VmRSS")
    reset_ok = reset_peak()
    steps, fwd, bwd, losses = [], [], [], []
    for i in range(int(job["warmup"]) + int(job["steps"])):
        t0 = time.perf_counter()
        logits = model(input_ids=inp, use_cache=False).logits
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        loss = -(logp * adv).sum() / n_tokens
        sync()
        t1_ = time.perf_counter()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        del logits, logp
        if i >= int(job["warmup"]):
            steps.append(t2 - t0)
            fwd.append(t1_ - t0)
            bwd.append(t2 - t1_)
            losses.append(float(loss.detach()))
        del loss
    out = {
        "side": "pytorch",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "attn": job.get("attn", "sdpa"),
        "fused_adamw": fused,
        "threads": torch.get_num_threads(),
        "step_s": steps,
        "fwd_s": fwd,
        "bwd_opt_s": bwd,
        "loss": losses,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "rss_after_load_mb": (rss_loaded or 0) / 1024.0,
        "train_peak_rss_mb": (vm_kb("VmHWM") or 0) / 1024.0 if reset_ok else None,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
