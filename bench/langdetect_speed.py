"""Times the reference language detector (PyPI langdetect 1.0.9, seeded with 0 as the
oracle does) on the conformance texts; one JSON line like the Rust bench's.
Run by bench/langdetect_speed.sh with the oracle's Python."""
import json
import os
import sys
import time

import langdetect
from langdetect import DetectorFactory, LangDetectException

path = sys.argv[1]
reps = int(os.environ.get("LANGDETECT_REPS", "5"))
texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
DetectorFactory.seed = 0
t0 = time.perf_counter()
try:
    langdetect.detect("warm up: load the profiles")
except LangDetectException:
    pass
load_s = time.perf_counter() - t0
t0 = time.perf_counter()
detected = 0
for _ in range(reps):
    for t in texts:
        try:
            langdetect.detect(t)
            detected += 1
        except LangDetectException:
            pass
secs = time.perf_counter() - t0
n = len(texts) * reps
print(json.dumps({"impl": "python-langdetect", "texts": len(texts), "reps": reps,
                  "detected": detected // reps, "seconds": round(secs, 4),
                  "texts_per_s": round(n / secs, 1), "ms_per_text": round(secs * 1000 / n, 4),
                  "profile_load_s": round(load_s, 4)}))
