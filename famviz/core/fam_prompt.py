"""The FAM prompt: the embedding-level initial FAM (docs/algorithm.md §3).

Without training, famviz derives it deterministically from the model's own token embeddings:
the embeddings of a fixed neutral text (``UNTRAINED_PROMPT_TEXT``) tokenised without special
tokens, repeated until ``fam_len`` rows are filled. Real token embeddings keep the FAM rows in the
distribution the layers were trained on (the paper suggests this or embedding statistics). A
trained prompt comes from an adapter directory (see ``famviz.io.adapters``).
"""

from __future__ import annotations

import torch

from famviz.core.model import LoadedModel

UNTRAINED_PROMPT_TEXT = " Summary of the text so far:"


def default_fam_prompt(loaded: LoadedModel, fam_len: int) -> torch.Tensor:
    """(fam_len, d) prompt: embeddings of UNTRAINED_PROMPT_TEXT, tiled."""
    embed = loaded.model.get_input_embeddings()
    ids = loaded.tokenizer(UNTRAINED_PROMPT_TEXT, add_special_tokens=False)["input_ids"] if loaded.tokenizer else []
    if not ids:  # a tokenizer-less test model: fall back to the first token ids
        ids = list(range(1, 9))
    ids = torch.tensor([ids[i % len(ids)] for i in range(fam_len)], dtype=torch.long, device=embed.weight.device)
    with torch.no_grad():
        return embed(ids).detach().clone()
