"""Fine-tuning the FAM (LoRA + learned initial FAM, RPO, RSP, read-out probes): data, loop, checkpoints,
training card, and the evaluation of an adapter."""
