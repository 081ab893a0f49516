"""llara-dist: distributed LLaRA post-training of decoder LLMs into dense retrievers."""

__version__ = "0.1.0"
