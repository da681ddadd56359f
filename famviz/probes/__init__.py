"""Experiments on a FAM model: PassKey retrieval and retention, and causal interventions on the FAM
(ablation, patching, when the key was written)."""
