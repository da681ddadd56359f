"""How often a PassKey answer's attribution through the memory falls on the key: gradient × input of
log p(answer) on every prompt token (famviz.probes.attribution), the key sentence against every other
span of as many tokens before the question.

    .venv/bin/python scripts/attribution_passkey_rate.py --trials 20 --length 1024 --depth 0
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="adapter directory (default: the shipped one)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--depth", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=3_000_000, help="documents use seeds seed + trial")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    import numpy as np

    from famviz.core.fam_model import FamModel
    from famviz.io.adapters import SHIPPED_ADAPTER, apply_adapter, read_adapter, run_geometry
    from famviz.io.models import load_model
    from famviz.probes.attribution import attribute, key_over_best_other
    from famviz.probes.passkey import make_passkey_document

    adapter = args.adapter or SHIPPED_ADAPTER
    loaded = load_model(None, dtype=args.dtype)
    config = run_geometry(read_adapter(adapter))
    fam_model = FamModel(loaded, config, fam_prompt=apply_adapter(adapter, loaded, config))
    beats, ratios, logprobs = [], [], []
    for trial in range(args.trials):
        document = make_passkey_document(loaded.tokenizer, args.length, args.depth, seed=args.seed + trial)
        prompt = document.token_ids
        result = attribute(fam_model, prompt, document.answer_ids)
        ratio = key_over_best_other(result.scores, document.key_span, document.question_start)
        won = ratio > 1.0
        beats.append(won)
        ratios.append(ratio)
        logprobs.append(result.target_logprob)
        print(
            json.dumps(
                {
                    "trial": trial,
                    "key": document.key,
                    "key_beats": won,
                    "key_over_best_other": ratios[-1],
                    "answer_logprob": result.target_logprob,
                }
            ),
            flush=True,
        )
    print(
        json.dumps(
            {
                "adapter": str(adapter),
                "length": args.length,
                "depth": args.depth,
                "trials": args.trials,
                "key_beats_rate": sum(beats) / len(beats),
                "median_key_over_best_other": float(np.median(ratios)),
                "mean_answer_logprob": float(np.mean(logprobs)),
            }
        )
    )


if __name__ == "__main__":
    main()
