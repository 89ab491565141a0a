"""stabench: LLM-pretraining stabilizer benchmark (import package ``bench``)."""
__version__ = "0.1.0"
