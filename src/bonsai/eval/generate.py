"""Batched generation of many prompts with one seed each, for scoring a model.

`Pipeline.generate` draws a batch for one prompt; evaluation needs a batch of different prompts.
This module feeds per-prompt batches and seeds to the pipeline's own `sample` (text encoder,
guidance, sampler, decoder) and `noise`, so that image i equals `pipe.generate(prompts[i], seed=seeds[i], steps=..., cfg=...)` up to
floating-point differences of the batch size."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch

from ..pipeline import Pipeline
from ..sampling import flow_timesteps


@torch.no_grad()
def generate_prompts(
    pipe: Pipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    cfg: float,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """Images float32 [N, 3, H, W] in [-1, 1] (CPU) for N prompts, image i from seeds[i], and the
    wall-clock seconds spent (text encoding, sampling and decoding; not model loading).
    `on_batch(n)` is called after each batch of n images (e.g. a progress bar's update)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    params = replace(pipe.defaults, prompt=prompts[0] if prompts else "x", steps=steps, cfg=cfg)
    pipe.check(params, max(batch_size, 1))
    timesteps = flow_timesteps(steps, params.shift)
    images, start = [], time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = prompts[lo : lo + batch_size], seeds[lo : lo + batch_size]
        noise = torch.cat([pipe.noise(replace(params, seed=s), 1) for s in chunk_seeds])
        samples = pipe.sample(chunk, [params.negative_prompt] * len(chunk), params, noise, timesteps)
        images.append(samples.float().clamp(-1, 1).cpu())
        if on_batch is not None:
            on_batch(len(chunk))
    return torch.cat(images) if images else torch.empty(0), time.perf_counter() - start
