"""Bounds and shared defaults of a generation request, in a module without heavy imports so that the CLI
can reject a bad value before it loads torch and the model."""

MAX_STEPS = 1000
CFG_RANGE = (0.0, 50.0)
MAX_SIDE = 4096
MAX_PROMPT_CHARS = 2000
MAX_BATCH = 64  # images of one CLI or ComfyUI-sampler run, denoised at once: far more exhausts memory first
MAX_SEED = 2**32 - 1  # for every image's seed
IMG2IMG_STRENGTH = 0.75  # how much of an init image is redrawn unless a request says (CLI, server)
HIRES_STRENGTH = 0.5  # how much the hires fix's second pass redraws unless a request says


def last_seed(batch: int) -> int:
    """The largest first seed of a batch: image i uses seed + i, and each must be at most MAX_SEED."""
    return MAX_SEED - (batch - 1)
