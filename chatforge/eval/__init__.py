"""Evaluation: held-out perplexity and bits per byte (more metrics arrive with later stages)."""
