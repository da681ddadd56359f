"""How often the memory lens shows a pass key's digits after the key's block, against the same documents
without the key (famviz.probes.lens), on the shipped adapter or another.

    .venv/bin/python scripts/lens_passkey_rate.py --trials 24 --length 2048 --layers -4,-3,-2,-1 --k 5,10
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="adapter directory (default: the shipped one)")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depth", type=float, default=0.0)
    parser.add_argument("--layers", default="-1", help="comma-separated layers, negative from the top")
    parser.add_argument("--k", default="5,10", help="comma-separated top-k values")
    parser.add_argument("--blocks-after", default="0", help="comma-separated FAM updates after the key's block")
    parser.add_argument("--seed", type=int, default=2_000_000, help="documents use seeds seed + trial")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    from famviz.core.fam_model import FamModel
    from famviz.io.adapters import SHIPPED_ADAPTER, apply_adapter, read_adapter, run_geometry
    from famviz.io.models import load_model
    from famviz.probes.lens import key_in_lens
    from famviz.probes.passkey import make_passkey_document

    adapter = args.adapter or SHIPPED_ADAPTER
    loaded = load_model(None, dtype=args.dtype)
    config = run_geometry(read_adapter(adapter))
    fam_model = FamModel(loaded, config, fam_prompt=apply_adapter(adapter, loaded, config))
    n_layers = loaded.config.num_hidden_layers
    layers = sorted({int(v) % n_layers for v in args.layers.split(",")})
    ks = [int(v) for v in args.k.split(",")]
    rows = []
    for after in (int(v) for v in args.blocks_after.split(",")):
        for k in ks:
            found = [
                key_in_lens(
                    fam_model,
                    loaded.tokenizer,
                    make_passkey_document(loaded.tokenizer, args.length, args.depth, seed=args.seed + trial),
                    layers,
                    k,
                    after,
                )
                for trial in range(args.trials)
            ]
            row = {
                "adapter": str(adapter),
                "layers": layers,
                "k": k,
                "blocks_after": after,
                "trials": args.trials,
                "with_key": sum(f.with_key for f in found) / len(found),
                "without_key": sum(f.without_key for f in found) / len(found),
                "mean_slots_with_key": sum(f.slots_with_key for f in found) / len(found),
                "mean_slots_without_key": sum(f.slots_without_key for f in found) / len(found),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
