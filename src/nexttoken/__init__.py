"""nexttoken: train and evaluate causal language models, with a scoreboard you can trust."""

__version__ = "0.1.0"
