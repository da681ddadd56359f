"""Where the FAM's reads go on a real text: the read mass of each block's first token, of whitespace,
punctuation and common words (``famviz.viz.inspector.sink_like``'s classes) against content words.

    .venv/bin/python scripts/fam_read_targets.py --tokens 2048 [--adapter DIR] [--text PATH]
"""

from __future__ import annotations

import argparse
import json


def token_class(text: str, position: int, block_starts: set[int]) -> str:
    from famviz.viz.inspector import COMMON_WORDS

    word = text.strip()
    if position in block_starts:
        return "block start"
    if not word:
        return "whitespace"
    if all(not c.isalnum() for c in word):
        return "punctuation"
    return "common word" if word.lower() in COMMON_WORDS else "content"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="adapter directory (default: the shipped one)")
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    import numpy as np

    import famviz
    from famviz.io.adapters import SHIPPED_ADAPTER, apply_adapter, read_adapter, run_geometry

    adapter = args.adapter or SHIPPED_ADAPTER
    loaded = famviz.load_model(dtype=args.dtype)
    config = run_geometry(read_adapter(adapter))
    prompt = apply_adapter(adapter, loaded, config)
    with open(args.text, encoding="utf-8") as handle:
        ids = famviz.tokenize_document(loaded.tokenizer, handle.read())[0][: args.tokens]
    trace = famviz.Stream(loaded, config, channels=["fam.*.read"], fam_prompt=prompt).run(ids).trace
    reads = trace.array("fam.read").astype(np.float64).mean(axis=0)  # per token, mean over layers (and slots)
    starts = set(trace.block_starts)
    classes = np.array([token_class(loaded.tokenizer.decode([t]), i, starts) for i, t in enumerate(ids)])
    top = np.argsort(-reads)[:40]
    rows = {}
    for name in ("block start", "whitespace", "punctuation", "common word", "content"):
        chosen = classes == name
        rows[name] = {
            "tokens": float(chosen.mean()),
            "read_share": float(reads[chosen].sum() / reads.sum()),
            "read_vs_mean_token": float(reads[chosen].mean() / reads.mean()) if chosen.any() else None,
            "of_the_40_most_read": int((classes[top] == name).sum()),
        }
    print(json.dumps({"adapter": str(adapter), "text": args.text, "tokens": len(ids), "classes": rows}, indent=1))


if __name__ == "__main__":
    main()
