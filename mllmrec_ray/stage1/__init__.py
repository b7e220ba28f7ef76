"""Stage I (offline): captions, CoT prompts, MDA selection, the resumable part store."""
