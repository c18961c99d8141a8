"""Models: the built-in GPT (and, elsewhere in this package, adapters for other causal LMs)."""

from nexttoken.models.gpt import GPT, PRESETS, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS"]
