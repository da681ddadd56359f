"""What comes from disk: Hugging Face models (loaded and checked), FAM adapters and their training cards,
documents (txt, md, pdf, html, with limits and true messages) and training / evaluation corpora."""
