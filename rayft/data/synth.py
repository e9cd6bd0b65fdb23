"""`rayft data synth`: a synthetic labeled corpus for tests and benchmarks.

Review-like sentences with log-normal lengths, a learnable sentiment label, and chosen
rates of exact duplicates, near duplicates (one character appended to a long row) and bad
rows of every kind the reader and extractor quarantine. ``_manifest.json`` records the true
counts, so a data report can be checked against them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from typing import Any

import numpy as np

POSITIVE = "great superb lovely moving brilliant charming delightful gripping warm funny".split()
NEGATIVE = "dull awful clumsy boring tedious bland messy weak shallow predictable".split()
NEUTRAL = (
    "the film story plot cast music ending scene actor director camera pacing script dialogue "
    "score editing character villain hero world book season episode show audience theatre "
    "was felt seemed looked played became remained turned stayed grew and but with although "
    "because while often rarely quite very too almost really never always mostly somewhat"
).split()
BAD_KINDS = (
    "invalid_json",
    "json_not_an_object",
    "missing_text",
    "text_not_a_string",
    "empty_text",
    "missing_label",
    "invalid_utf8",
)


def _sentence(rng: np.random.Generator, label: int) -> str:
    words = int(np.clip(rng.lognormal(mean=2.8, sigma=0.6), 3, 400))
    cue = POSITIVE if label == 1 else NEGATIVE
    picks = rng.choice(NEUTRAL, size=words)
    cues = rng.random(words) < 0.15
    picks[cues] = rng.choice(cue, size=int(cues.sum()))
    return f"{str(picks[0]).capitalize()} {' '.join(picks[1:])}. {rng.integers(1_000_000)}"


def _bad_line(kind: str, rng: np.random.Generator) -> bytes:
    text = _sentence(rng, 1)
    lines = {
        "invalid_json": b'{"text": "unterminated',
        "json_not_an_object": b"[1, 2, 3]",
        "missing_text": json.dumps({"label": 1}).encode(),
        "text_not_a_string": json.dumps({"text": 12345, "label": 0}).encode(),
        "empty_text": json.dumps({"text": "   ", "label": 1}).encode(),
        "missing_label": json.dumps({"text": text}).encode(),
        "invalid_utf8": b'{"text": "caf\xe9 \xff\xfe", "label": 1}',
    }
    return lines[kind]


def synthesize(
    out: str,
    rows: int,
    *,
    files: int = 4,
    duplicate_rate: float = 0.05,
    near_duplicate_rate: float = 0.02,
    bad_rate: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Write `rows` rows as `files` jsonl files under `out`; return (and write) the manifest."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    counts: Counter = Counter()
    bad: Counter = Counter()
    originals: list[tuple[str, int]] = []  # a sample of written rows to copy from
    with contextlib.ExitStack() as stack:
        handles = [
            stack.enter_context(open(os.path.join(out, f"part-{i:04d}.jsonl"), "wb"))
            for i in range(files)
        ]
        for i in range(rows):
            handle = handles[i % files]
            draw = rng.random()
            if draw < bad_rate:
                kind = BAD_KINDS[int(rng.integers(len(BAD_KINDS)))]
                handle.write(_bad_line(kind, rng) + b"\n")
                bad[kind] += 1
                continue
            if originals and draw < bad_rate + duplicate_rate:
                text, label = originals[int(rng.integers(len(originals)))]
                counts["exact_duplicates"] += 1
            elif originals and draw < bad_rate + duplicate_rate + near_duplicate_rate:
                text, label = originals[int(rng.integers(len(originals)))]
                text = text + "!"  # one appended character: Jaccard ~0.99 on long rows
                counts["near_duplicates"] += 1
            else:
                label = int(rng.integers(2))
                text = _sentence(rng, label)
                counts["unique"] += 1
                if len(originals) < 10_000:
                    originals.append((text, label))
                elif rng.random() < 0.01:
                    originals[int(rng.integers(len(originals)))] = (text, label)
            record = {"text": text, "label": label}
            handle.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
    manifest = {
        "rows": rows,
        "files": files,
        "seed": seed,
        "bad_rows": dict(bad),
        "bad_total": sum(bad.values()),
        **dict(counts),
    }
    with open(os.path.join(out, "_manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=2)
    return manifest
