"""Baselines scored on the stored candidate lists: popularity, SASRec and trivial rankers (random, min-id)."""
