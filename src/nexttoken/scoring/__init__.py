"""Scoring any causal LM on any text: the window planner (pure), the one scoring core every scoring
path calls, plain text, chat responses, and lm-evaluation-harness tasks."""
