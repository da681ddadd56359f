"""The engine: FAM configuration, attention over [memory | FAM | block], the per-layer FAM step, the block
stream, decoding from a stream state, the learned initial FAM, tokenization and the per-block trace."""
