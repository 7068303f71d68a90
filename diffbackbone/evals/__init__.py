"""Evaluations that reproduce published numbers (`diffbackbone eval ...`)."""
