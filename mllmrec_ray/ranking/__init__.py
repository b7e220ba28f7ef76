"""Ranking candidates and measuring it: scorers and readouts, metrics and records, the serving logic."""
