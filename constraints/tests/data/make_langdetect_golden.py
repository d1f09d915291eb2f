"""Writes the golden answers of the reference language detector (PyPI `langdetect` 1.0.9,
seeded with 0 as the reference oracle seeds it) for `constraints/tests/langdetect_conformance.rs`:

  langdetect_golden.jsonl            {"text", "lang"}: variants of langdetect_texts.py
  langdetect_oracle_responses.jsonl  {"set", "index", "lang", "upper", "lower"}: the
                                     benchmark responses of the oracle (by line index),
                                     as given and upper-/lower-cased

"lang" is langdetect.detect(text), or null where it raises (no features).
Run with the oracle's Python (after `bash shared/oracle/setup.sh`):

  ~/.cache/ifeval-oracle/venv/bin/python constraints/tests/data/make_langdetect_golden.py
"""
import json
import os
import sys
import unicodedata

import langdetect
from langdetect import DetectorFactory, LangDetectException

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from langdetect_texts import BASE, EXTRA  # noqa: E402

ORACLE = os.environ.get(
    "HINDSIGHT_ORACLE_DIR", os.path.join(HERE, "..", "..", "..", "..", "shared", "oracle")
)
DetectorFactory.seed = 0


def detect(text):
    try:
        return langdetect.detect(text)
    except LangDetectException:
        return None


def variants():
    langs = sorted(BASE)
    for i, lang in enumerate(langs):
        text = BASE[lang]
        other = BASE[langs[(i + 1) % len(langs)]]
        words = text.split()
        sentences = [s for s in text.replace("! ", ". ").replace("。", "。\n").replace("। ", ".\n").split(". ") if s.strip()]
        yield text
        for k in (1, 2, 3, 4, 6, 9, 14, 20):
            yield " ".join(words[:k])
        yield from sentences
        yield text.upper()
        yield text.lower()
        yield text.title()
        yield unicodedata.normalize("NFD", text)
        yield "## " + sentences[0] + "\n\n" + "\n".join(f"- **{s.strip()}**" for s in sentences[1:]) + "\n"
        yield text + "\n\n```python\nimport math\nprint(math.sqrt(2))\n```\n"
        yield text + " https://example.com/docs/photosynthesis?lang=" + lang + " info@example.org"
        half, ohalf = len(text) // 2, len(other) // 2
        yield text[:half] + " " + other[ohalf:]
        yield BASE["en"][: len(BASE["en"]) // 2] + " " + text[half:]
        yield text + " " + BASE["en"]
        yield "1. " + words[0] + "\n2. " + " ".join(words[1:3]) + "\n3. 42"
        if lang in ("en", "de", "ru", "ja", "ar", "vi"):
            yield (text + " ") * 40
    for t in EXTRA:
        yield t
        yield t.upper()
        yield t.lower()


def main():
    seen, golden = set(), []
    for text in variants():
        if text in seen:
            continue
        seen.add(text)
        golden.append({"text": text, "lang": detect(text)})
    with open(os.path.join(HERE, "langdetect_golden.jsonl"), "w", encoding="utf-8") as f:
        for g in golden:
            f.write(json.dumps(g, ensure_ascii=False) + "\n")

    sets = {
        "ifeval_gpt4": "data/ifeval/input_response_data_gpt4_20231107_145030.jsonl",
        "ifbench_sample": "data/ifbench/sample_output.jsonl",
    }
    with open(os.path.join(HERE, "langdetect_oracle_responses.jsonl"), "w", encoding="utf-8") as f:
        for name, path in sets.items():
            with open(os.path.join(ORACLE, path), encoding="utf-8") as src:
                for index, line in enumerate(src):
                    r = json.loads(line)["response"]
                    f.write(json.dumps({"set": name, "index": index, "lang": detect(r),
                                        "upper": detect(r.upper()), "lower": detect(r.lower())}) + "\n")
    langs = {g["lang"] for g in golden}
    print(f"{len(golden)} texts, {len(langs)} distinct answers: {sorted(map(str, langs))}")


if __name__ == "__main__":
    main()
