"""Evaluation: needle in a haystack, perplexity, the methods compared, run info."""
