"""What goes into the LLM and comes out of it: prompts, answer parsing, SFT examples."""
