"""Scoring any causal LM on any text: the window planner (pure), the scorer, and the command."""
