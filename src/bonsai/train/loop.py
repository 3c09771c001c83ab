"""One training loop for teacher training and distillation: AdamW, warmup, bf16 autocast on
CUDA, optional torch.compile of the forward on CUDA (eager if compiling fails), EMA, JSON-lines
logs, periodic checkpoints that make a run resumable, and DDP when launched by torchrun (each
rank draws its own batches; rank 0 logs and saves).

Checkpoints hold the plain module's state_dict (never the compiled wrapper's, whose keys carry
an `_orig_mod.` prefix), so they load into an uncompiled model."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_write
from ..vml import settle_vml
from .fsdp import full_training_state, is_sharded, load_training_state


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    lr: float = 3e-4
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0: no EMA copy
    log_every: int = 50
    checkpoint_every: int = 1000
    sample_every: int = 0  # 0: never
    max_seconds: float = 0.0  # stop early (and checkpoint) after this wall time; 0: no limit
    compile: bool = True  # torch.compile the forward on CUDA (never on CPU); eager if it fails


def scaled_lr(base_lr: float, batch_size: int, base_batch: int = 256) -> float:
    """Square-root learning-rate scaling for AdamW: base_lr was tuned at base_batch."""
    return base_lr * math.sqrt(batch_size / base_batch)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _elapsed(start: float, cfg: TrainConfig, device: torch.device) -> float:
    """Seconds since `start`, the same on every rank (the largest): a time-bounded run's learning
    rate and its last step must agree across DDP ranks, or the replicas drift apart and a rank
    that stops first leaves the others waiting in the gradient all-reduce forever."""
    seconds = time.perf_counter() - start
    if not cfg.max_seconds or world_size() == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Warmup, then cosine decay to 10% over the run; a run bounded by max_seconds decays by
    whichever of steps or time runs out first."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    progress = min(1.0, max(step / max(1, cfg.steps), elapsed / cfg.max_seconds if cfg.max_seconds else 0.0))
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine to 10%


@dataclass
class TrainState:
    model: nn.Module
    ema: nn.Module | None
    optimizer: torch.optim.Optimizer
    step: int = 0


def _state_path(out_dir: Path) -> Path:
    return out_dir / "state.pt"


def save_state(state: TrainState, out_dir: Path) -> None:
    """Resumable state (model, EMA, optimizer, step), written atomically by rank 0. Read back with
    weights_only=True. Call on every rank: an FSDP-sharded model is gathered first (a collective)."""
    model, optimizer = full_training_state(state.model, state.optimizer) if is_sharded(state.model) else (None, None)
    if rank() != 0:
        return
    payload = {
        "model": model or state.model.state_dict(),
        "ema": None if state.ema is None else state.ema.state_dict(),
        "optimizer": optimizer or state.optimizer.state_dict(),
        "step": state.step,
    }
    atomic_write(_state_path(out_dir), lambda tmp: torch.save(payload, tmp))


def load_state(state: TrainState, out_dir: Path) -> bool:
    path = _state_path(out_dir)
    if not path.exists():
        return False
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if is_sharded(state.model):
        load_training_state(state.model, state.optimizer, payload["model"], payload["optimizer"])
        state.step = int(payload["step"])
        return True
    state.model.load_state_dict(payload["model"])
    if state.ema is not None and payload["ema"] is not None:
        state.ema.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.step = int(payload["step"])
    return True


def _drop_log_after(path: Path, step: int) -> None:
    """Remove the records of steps after `step` from the log at `path` (rewritten atomically): a run
    killed after its last checkpoint logged steps it will train again. A torn last line goes too."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) < len(lines):
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, in one multi-tensor kernel per dtype."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


@contextlib.contextmanager
def _stop_after_step_on_interrupt() -> Iterator[list[bool]]:
    """While a single-process run trains, the first Ctrl+C (SIGINT) only marks the returned list, so the
    loop can finish its step and checkpoint before stopping; a second one stops at once. Elsewhere (DDP,
    where a checkpoint may be collective; a thread; SIGINT not at Python's default) nothing changes."""
    interrupted: list[bool] = []
    if (world_size() > 1 or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield interrupted
        return

    def on_sigint(signum, frame) -> None:
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        print("interrupted: saving a checkpoint after this step (Ctrl+C again to stop now)", flush=True)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def compile_forward(module: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile(module) on CUDA when enabled, else module itself. The compiled wrapper shares
    the parameters; save and load the plain module."""
    device = next(module.parameters()).device
    return torch.compile(module) if enabled and device.type == "cuda" else module


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    batches: Iterator[object],
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    on_sample: Callable[[nn.Module, int], None] | None = None,
) -> TrainState:
    """Train `model` (already on its device) on `loss_fn(model, batch)`; resumes from out_dir/state.pt.

    Returns the final state; state.ema (or state.model) is what to ship."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    settle_vml()  # as Pipeline does: else a fresh process's first sin/exp may take MKL's low-accuracy kernel
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda" and all(p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), fused=fused)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay else None
    state = TrainState(model, ema, opt)
    if load_state(state, out) and rank() == 0:
        print(f"resumed from {_state_path(out)} at step {state.step}", flush=True)
    eager: nn.Module = model
    if world_size() > 1 and not is_sharded(model):  # an FSDP-sharded model syncs its own gradients
        eager = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net = compile_forward(eager, cfg.compile)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    if rank() == 0:
        _drop_log_after(out / "log.jsonl", state.step)
    log = open(out / "log.jsonl", "a") if rank() == 0 else None
    start, seen, t0 = time.perf_counter(), 0, time.perf_counter()
    first_step = state.step
    with _stop_after_step_on_interrupt() as interrupted:
        while state.step < cfg.steps:
            elapsed = _elapsed(start, cfg, device)
            lr = _lr_at(state.step, cfg, elapsed)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = next(batches)
            opt.zero_grad(set_to_none=True)
            try:
                with autocast:
                    loss = loss_fn(net, batch)
                loss.backward()
            except Exception as err:  # a compile failure shows on the first step: train eagerly instead
                if net is eager or state.step != first_step:
                    raise
                print(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); training without it", flush=True)
                net = eager
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if ema is not None:
                _update_ema(ema, model, cfg.ema_decay)
            state.step += 1
            seen += 1
            if log is not None and (state.step % cfg.log_every == 0 or state.step == cfg.steps):
                rate = seen / (time.perf_counter() - t0)
                record = {"step": state.step, "loss": loss.item(), "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm), "lr": lr, "steps_per_s": rate}
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(json.dumps(record), flush=True)
                seen, t0 = 0, time.perf_counter()
            out_of_time = bool(cfg.max_seconds) and elapsed > cfg.max_seconds
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps or out_of_time or interrupted:
                save_state(state, out)
            if interrupted:
                raise KeyboardInterrupt
            if rank() == 0 and on_sample is not None and cfg.sample_every and state.step % cfg.sample_every == 0:
                on_sample(ema if ema is not None else model, state.step)
            if out_of_time:
                break
    if log is not None:
        log.close()
    return state


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
