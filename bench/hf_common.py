"""Helpers shared by the bench scripts that compare us with Hugging Face transformers:
where things are, running the `hindsight` binary, and converting a model to a Hugging Face
checkpoint directory with `hindsight convert` (once; reused by later runs)."""

import os
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (hindsight model spec, extra `convert` flags)
MODELS = {
    "smollm2": ("smollm2", []),
    "tiny-llama": ("tiny:1", []),
    "tiny-llama3": ("tiny-llama3:1", ["--dtype", "bf16", "--shards", "2"]),
    "tiny-qwen2": ("tiny-qwen2:1", ["--shards", "2"]),
}


def default_bin():
    """The hindsight binary: $CARGO_TARGET_DIR or ./target, release if built, else debug."""
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    for profile in ("release", "debug"):
        p = os.path.join(target, profile, "hindsight")
        if os.path.isfile(p):
            return p
    return os.path.join(target, "debug", "hindsight")


def run(cmd, **kw):
    """Runs cmd in the repository root; returns (stdout, seconds). Raises on failure."""
    t = time.time()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, **kw)
    return out.stdout, time.time() - t


def convert(bin_path, name, out_dir, force=False):
    """The Hugging Face checkpoint directory of MODELS[name] under out_dir, written by
    `hindsight convert` unless it is already there (or force)."""
    spec, flags = MODELS[name]
    ckpt = os.path.join(out_dir, name)
    if force or not os.path.isfile(os.path.join(ckpt, "config.json")):
        _, dt = run([bin_path, "convert", "--input", spec, "--output", ckpt, *flags])
        print(f"[{name}] converted {spec} -> {ckpt} in {dt:.1f}s", flush=True)
    return ckpt
