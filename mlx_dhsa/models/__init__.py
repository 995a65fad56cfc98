"""Real models that ship inside PyPI packages as GGUF files, and GGUF conversion."""
