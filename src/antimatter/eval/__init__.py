"""Evaluation: perplexity and bits per byte, continuation quality, speed, size, plots and the report."""
