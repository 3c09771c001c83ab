"""Bounds of a generation request, in a module without heavy imports so that the CLI can reject a
bad value before it loads torch and the model."""

MAX_STEPS = 1000
CFG_RANGE = (0.0, 50.0)
MAX_SIDE = 4096
MAX_PROMPT_CHARS = 2000
