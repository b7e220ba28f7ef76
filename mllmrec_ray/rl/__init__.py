"""GRPO maths: advantages and loss, the rule reward as named terms, weight bucketing for sync."""
