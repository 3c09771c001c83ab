"""CUDA-graph replay of the denoiser (and the text encoder): capture one forward per input
signature, replay it every step.

Why: on a GPU, a 1-bit denoiser step is host-bound. Each 1-bit linear costs kernel launches plus
Python work, and the GPU waits for it. A captured graph replays every kernel of a forward with one
launch. The sampler calls the denoiser with the same shapes at every step, so one capture serves a
whole generation (and later ones of the same size). The text encoder runs once per image, but
its forward is the same pattern (bonsai-4b's 1-bit BERT: ~3 ms of GPU work behind ~25 ms of
launches), so a pipeline that keeps its weights on the device replays it too.

    graphed = GraphedModule(denoiser)      # on CPU/MPS, in training or with gradients: plain calls
    graphed.sync()                         # before sampling: drops graphs if the model changed
    v = graphed(x, t, text, mask)          # 1st call of a signature: 2 eager warm-ups, capture, replay

What a graph relies on, and how each is kept true:
- It reads parameters, buffers and cached weight layouts at the addresses they had at capture, and
  Python numbers of the forward (LoRA weights, the chosen kernel) are baked in. `model_state`
  fingerprints all of these; `sync()` drops every graph when the fingerprint changed (a LoRA
  attached, removed or re-weighted, a tensor replaced or moved). While graphs exist, the
  fingerprinted objects are kept alive, so a moved tensor cannot leave a new one at the old
  address. In-place updates (`param.copy_`) keep addresses, and a replay reads the new values.
- Inputs are copied into the graph's own buffers before a replay; the output is cloned after it
  (a sampler may hold one output while asking for the next: Heun does).
- The first call of a signature runs the module twice eagerly on a side stream first: Triton
  autotuning, kernel compilation, lazily built weight layouts and cuBLAS workspaces happen there,
  never during capture.
- Any error while warming up or capturing turns graphs off for this wrapper with one warning; the
  call then runs eagerly (and raises only if the eager call itself fails).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable

import torch
from torch import nn

ENV_VAR = "BONSAI_CUDA_GRAPH"
MAX_GRAPHS = 4  # signatures kept (e.g. batch sizes, image sizes); each holds its own activation memory
WARMUP_CALLS = 2  # the first autotunes Triton kernels, the second compiles the direct launches of the chosen configs
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def env_choice() -> bool | None:
    """BONSAI_CUDA_GRAPH: 1/on/true forces graphs on, 0/off/false off; unset, empty or 'auto': None."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{ENV_VAR}={value!r}: use 1 (on), 0 (off) or auto")


def use_cuda_graph(option: bool | None, device: torch.device, memory: str) -> bool:
    """Whether a pipeline replays its denoiser from CUDA graphs.

    An explicit option wins, then BONSAI_CUDA_GRAPH, then the automatic choice: on for CUDA in the
    "normal" and "lean" memory modes. Never off CUDA, and never in "offload" (its hooks move weights
    during the forward, which a graph cannot replay). In "lean" the graphs are captured anew for
    every generation (the weights visit the device at new addresses each time) and freed after it:
    two warm-up calls and a capture still cost less than the launch overhead of a 24-step image."""
    chosen = env_choice() if option is None else option  # read (and checked) on every device
    if device.type != "cuda" or memory == "offload":
        return False
    return chosen is None or chosen


def model_state(module: nn.Module) -> tuple[tuple[Hashable, ...], list[Any]]:
    """(fingerprint, objects it refers to by address or id) of everything a captured forward of
    `module` depends on besides its inputs: the module tree, every parameter and buffer (address,
    shape, dtype), the packed views of 1-bit layers (their cached kernel layouts), LoRA weights and
    scales, and the forced kernel choice."""
    from .kernels import dispatch
    from .lora import LoRALayer
    from .quant import BitLinear

    keys: list[Hashable] = [("kernel", dispatch._forced, os.environ.get("BONSAI_KERNEL"))]
    alive: list[Any] = []
    for name, m in module.named_modules():
        keys.append((name, type(m).__name__, id(m), m.training))
        alive.append(m)
        if isinstance(m, BitLinear):
            keys.append((name, "packed", id(m._packed)))
            alive.append(m._packed)
        if isinstance(m, LoRALayer):
            keys.append((name, "lora", tuple(sorted(m.weights.items())), tuple(sorted(m.scales.items()))))
        for kind, store in (("p", m._parameters), ("b", m._buffers)):
            for key, t in store.items():
                if t is not None:
                    keys.append((name, kind, key, t.data_ptr(), tuple(t.shape), t.dtype, str(t.device)))
                    alive.append(t)
    return tuple(keys), alive


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager_calls: int = 0
    evictions: int = 0
    failure: str | None = None  # why graphs were turned off for this wrapper


class _Entry:
    """One captured forward: the graph, its input buffers (in argument order) and its output."""

    def __init__(self, graph: Any, inputs: list[torch.Tensor], output: torch.Tensor, device: torch.device):
        self.graph, self.inputs, self.output, self.device = graph, inputs, output, device

    def run(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        with torch.cuda.device(self.device):  # replay goes to the current stream of the current device
            for buffer, t in zip(self.inputs, tensors):
                buffer.copy_(t)
            self.graph.replay()
            return self.output.clone()


class GraphedModule:
    """Calls `module(*args, **kwargs)` through CUDA graphs, one per input signature (the shapes,
    dtypes and devices of the tensor arguments and the values of the others), at most
    `max_graphs` of them (the oldest dropped first). The module must return one tensor.

    Falls back to a plain call off CUDA, with gradients enabled, in training mode, or for
    arguments that are not hashable. Call `sync()` whenever the module may have changed (the
    pipeline does, before each sampling) and `reset()` to free the graphs' memory."""

    def __init__(self, module: nn.Module, max_graphs: int = MAX_GRAPHS, warmup_calls: int = WARMUP_CALLS, name: str = "the module"):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.module, self.name = module, name
        self.max_graphs, self.warmup_calls = max_graphs, warmup_calls
        self.enabled = True
        self.stats = GraphStats()
        self._graphs: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._state: tuple | None = None
        self._alive: list[Any] = []
        self._lock = threading.Lock()  # the input buffers are shared state: one replay at a time

    def __len__(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every graph (their memory goes back to the caching allocator)."""
        with self._lock:
            self._graphs.clear()
            self._state, self._alive = None, []

    def sync(self) -> bool:
        """Drop every graph if the module changed since they were captured; True if it did."""
        if not self._graphs:
            return False
        state, _ = model_state(self.module)
        if state == self._state:
            return False
        self.reset()
        return True

    def signature(self, args: tuple, kwargs: dict) -> Hashable | None:
        """The key a graph is captured under, or None when these arguments must run eagerly."""
        parts: list[Hashable] = []
        has_tensor = False
        for value in _arguments(args, kwargs):
            if isinstance(value, torch.Tensor):
                if value.device.type != "cuda" or value.requires_grad:
                    return None
                parts.append(("tensor", tuple(value.shape), value.dtype, value.device))
                has_tensor = True
            else:
                try:
                    hash(value)
                except TypeError:
                    return None
                parts.append(("value", type(value), value))
        if not has_tensor:
            return None
        autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        return tuple(sorted(kwargs)), tuple(parts), autocast

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        key = None
        if self.enabled and not torch.is_grad_enabled() and not self.module.training:
            key = self.signature(args, kwargs)
        if key is None:
            self.stats.eager_calls += 1
            return self.module(*args, **kwargs)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture_or_disable(key, args, kwargs)
                if entry is None:
                    self.stats.eager_calls += 1
                    return self.module(*args, **kwargs)
            else:
                self._graphs.move_to_end(key)
            self.stats.replays += 1
            return entry.run([v for v in _arguments(args, kwargs) if isinstance(v, torch.Tensor)])

    def _capture_or_disable(self, key: Hashable, args: tuple, kwargs: dict) -> _Entry | None:
        try:
            entry = self._capture(args, kwargs)
        except Exception as e:  # noqa: BLE001 - any capture failure must leave generation working
            self._disable(f"{type(e).__name__}: {e}")
            return None
        self.stats.captures += 1
        self._graphs[key] = entry
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
            self.stats.evictions += 1
        # Taken after the warm-up, which builds what the module makes lazily (packed views, layouts).
        self._state, self._alive = model_state(self.module)
        return entry

    def _disable(self, reason: str) -> None:
        self.enabled = False
        self.stats.failure = reason
        self._graphs.clear()
        self._state, self._alive = None, []
        warnings.warn(f"CUDA graph capture failed, {self.name} runs eagerly from now on ({reason})", RuntimeWarning, stacklevel=4)

    def _capture(self, args: tuple, kwargs: dict) -> _Entry:
        """Warm up on a side stream, then capture one call on static copies of the tensor arguments."""
        device = next(v.device for v in _arguments(args, kwargs) if isinstance(v, torch.Tensor))
        static_args = tuple(_static_copy(v) for v in args)
        static_kwargs = {k: _static_copy(v) for k, v in kwargs.items()}
        inputs = [v for v in _arguments(static_args, static_kwargs) if isinstance(v, torch.Tensor)]
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_calls):
                    self.module(*static_args, **static_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work of other threads (a server's) does not invalidate the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = self.module(*static_args, **static_kwargs)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"the module returned {type(output).__name__}, not one tensor")
        return _Entry(graph, inputs, output, device)


def _arguments(args: tuple, kwargs: dict) -> list[Any]:
    """Positional arguments, then keyword arguments by name: one order for signatures and buffers."""
    return [*args, *(kwargs[k] for k in sorted(kwargs))]


def _static_copy(value: Any) -> Any:
    """A tensor argument's own buffer (contiguous, same values); other arguments as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    buffer = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    buffer.copy_(value)
    return buffer
