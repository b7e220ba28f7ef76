"""Classic baselines scored on the stored candidate lists: popularity and SASRec."""
