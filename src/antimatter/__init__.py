"""AntiMatter: train GPT-style language models from scratch, every step for real."""

__version__ = "0.1.0"
