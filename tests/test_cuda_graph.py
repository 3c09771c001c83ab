"""CUDA-graph replay of the denoiser (bonsai.cuda_graph).

On the CPU: when graphs are used at all, that the wrapper is a plain call where it must be, the
signature / cache / fallback logic (with a stand-in for the capture), and that the model
fingerprint notices what makes a graph stale (LoRAs, replaced tensors) and only that. The `gpu`
tests capture real graphs and compare their replays with eager calls on fresh inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY, write_tiny_lora

from bonsai.cuda_graph import ENV_VAR, GraphedModule, model_state, use_cuda_graph
from bonsai.lora import apply_lora, set_lora_weights
from bonsai.pipeline import InvalidRequest, Pipeline
from bonsai.quant import QuantPolicy, quantize_

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --- when graphs are used --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option,env,device,memory,expected",
    [
        (None, None, CUDA, "normal", True),  # automatic: CUDA, everything resident
        (None, None, CUDA, "lean", True),  # captured anew for each generation
        (None, None, CUDA, "offload", False),
        (None, None, CPU, "normal", False),
        (None, None, torch.device("mps"), "normal", False),
        (None, "0", CUDA, "normal", False),  # the environment overrides the automatic choice
        (None, "1", CUDA, "lean", True),
        (None, "auto", CUDA, "lean", True),
        (None, "0", CUDA, "lean", False),
        (False, "1", CUDA, "normal", False),  # an explicit option overrides the environment
        (True, "0", CUDA, "lean", True),
        (True, "1", CUDA, "offload", False),  # never: offload hooks move weights inside the forward
        (True, "1", CPU, "normal", False),  # never off CUDA
    ],
)
def test_use_cuda_graph(monkeypatch, option, env, device, memory, expected) -> None:
    if env is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, env)
    assert use_cuda_graph(option, device, memory) is expected


def test_bad_environment_value_is_a_clear_error(monkeypatch, tiny_checkpoint: Path) -> None:
    monkeypatch.setenv(ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=ENV_VAR):
        use_cuda_graph(None, CUDA, "normal")
    with pytest.raises(InvalidRequest, match=ENV_VAR):
        Pipeline.from_pretrained(tiny_checkpoint, device="cpu")


# --- the wrapper off CUDA: a plain call ------------------------------------------------------------------


class Counting(torch.nn.Module):
    """y = 2x + t, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.scale = torch.nn.Parameter(torch.tensor(2.0), requires_grad=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, flag: bool = False) -> torch.Tensor:
        self.calls += 1
        return self.scale * x + t + (1.0 if flag else 0.0)


@torch.no_grad()
def test_cpu_calls_pass_through() -> None:
    module = Counting().eval()
    graphed = GraphedModule(module)
    x, t = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(graphed(x, t), 2 * x + t)
    assert torch.equal(graphed(x, t, flag=True), 2 * x + t + 1)
    assert module.calls == 2 and graphed.stats.eager_calls == 2
    assert graphed.stats.captures == graphed.stats.replays == 0 and len(graphed) == 0


# --- signature, cache and fallback, with a stand-in capture ----------------------------------------------


class FakeEntry:
    """Stands in for a captured graph: records its inputs, replays by calling the module."""

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        self.module, self.kwargs = module, kwargs
        self.shapes = [tuple(a.shape) for a in args]

    def run(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return self.module(*tensors, **{k: v for k, v in self.kwargs.items() if not isinstance(v, torch.Tensor)})


class CpuGraphed(GraphedModule):
    """GraphedModule whose 'device' is the CPU and whose capture is FakeEntry (or raises `fail`)."""

    fail: Exception | None = None

    def signature(self, args, kwargs):
        return ("cpu", tuple((tuple(a.shape), a.dtype) for a in args), tuple(sorted(kwargs.items())))

    def _capture(self, args, kwargs):
        if self.fail is not None:
            raise self.fail
        self.module(*args, **kwargs)  # the warm-up, which builds what the module makes lazily
        return FakeEntry(self.module, args, kwargs)


@torch.no_grad()
def test_one_graph_per_signature_oldest_evicted() -> None:
    module = Counting().eval()
    graphed = CpuGraphed(module, max_graphs=2)
    xs = {b: (torch.randn(b, 4), torch.randn(b, 4)) for b in (1, 2)}
    for b in (1, 2, 1, 2):
        assert torch.equal(graphed(*xs[b]), 2 * xs[b][0] + xs[b][1])
    assert graphed.stats.captures == 2 and graphed.stats.replays == 4
    assert torch.allclose(graphed(*xs[1], flag=True), 2 * xs[1][0] + xs[1][1] + 1)  # another value: another graph
    assert graphed.stats.captures == 3 and graphed.stats.evictions == 1 and len(graphed) == 2
    graphed(*xs[2])  # used last before the flag: still there
    assert graphed.stats.captures == 3
    graphed(*xs[1])  # the least recently used: evicted by the flag's graph, captured again
    assert graphed.stats.captures == 4 and graphed.stats.evictions == 2


@torch.no_grad()
def test_capture_failure_falls_back_to_eager_with_one_warning() -> None:
    module = Counting().eval()
    graphed = CpuGraphed(module)
    graphed.fail = RuntimeError("operation not permitted when stream is capturing")
    x, t = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.warns(RuntimeWarning, match="not permitted"):
        assert torch.equal(graphed(x, t), 2 * x + t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        assert torch.equal(graphed(x, t), 2 * x + t)
    assert not graphed.enabled and graphed.stats.eager_calls == 2 and graphed.stats.captures == 0
    assert "not permitted" in graphed.stats.failure


def test_gradients_or_training_run_eagerly() -> None:
    module = Counting()
    graphed = CpuGraphed(module)
    x, t = torch.randn(2, 4), torch.randn(2, 4)
    graphed(x, t)  # gradients enabled
    with torch.no_grad():
        module.train()
        graphed(x, t)
    assert graphed.stats.eager_calls == 2 and graphed.stats.captures == 0


# --- what makes a graph stale ------------------------------------------------------------------------------


def _bit_dit(make_dit):
    model = make_dit()
    quantize_(model, QuantPolicy())
    return model


def test_fingerprint_follows_loras_and_replaced_tensors(make_dit, tmp_path: Path, tiny_checkpoint: Path) -> None:
    model = _bit_dit(make_dit)
    state = lambda: model_state(model)[0]  # noqa: E731
    before = state()
    assert state() == before  # deterministic
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # in place: a graph reads the new values at the same addresses
    assert state() == before

    apply_lora(model, write_tiny_lora(tiny_checkpoint, tmp_path / "ink.safetensors"), weight=0.8)
    with_lora = state()
    assert with_lora != before  # modules wrapped, factors added
    set_lora_weights(model, {"ink": 0.0})
    assert state() != with_lora  # a LoRA weight is a Python number inside the forward
    set_lora_weights(model, {"ink": 0.8})
    assert state() == with_lora

    model.final_proj.weight = torch.nn.Parameter(model.final_proj.weight.detach().clone(), requires_grad=False)
    assert state() != with_lora  # a new tensor lives at a new address


def test_sync_drops_graphs_when_the_model_changed(make_dit, make_inputs, tmp_path: Path, tiny_checkpoint: Path) -> None:
    model = _bit_dit(make_dit).eval()
    graphed = CpuGraphed(model)
    inputs = make_inputs()
    with torch.no_grad():
        graphed(*inputs)
    assert len(graphed) == 1 and not graphed.sync()  # nothing changed
    apply_lora(model, write_tiny_lora(tiny_checkpoint, tmp_path / "ink.safetensors"), weight=1.0)
    assert graphed.sync() and len(graphed) == 0


def test_pipeline_on_cpu_uses_no_graphs(tiny_checkpoint: Path) -> None:
    pipe = Pipeline.from_pretrained(tiny_checkpoint, device="cpu", cuda_graph=True)
    pipe.generate("a red apple", seed=1, steps=2)
    assert pipe.cuda_graphs is None


@pytest.mark.parametrize("flag,expected", [((), None), (("--cuda-graph",), True), (("--no-cuda-graph",), False)])
def test_cli_flag_reaches_the_pipeline(monkeypatch, tmp_path: Path, flag, expected) -> None:
    from click.testing import CliRunner

    from bonsai.cli import main

    seen = {}

    def from_pretrained(name, **kwargs):
        seen.update(kwargs)
        raise InvalidRequest("stop here")

    monkeypatch.setattr(Pipeline, "from_pretrained", from_pretrained)
    result = CliRunner().invoke(main, ["generate", "a red apple", "-o", str(tmp_path), *flag])
    assert "stop here" in result.output + (result.stderr or "")
    assert seen["cuda_graph"] is expected


# --- real capture on CUDA --------------------------------------------------------------------------------


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _fresh_inputs(make_inputs, config, batch: int, side: int, seed: int, dtype: torch.dtype):
    x, t, text, mask = make_inputs(config, batch=batch, height=side, width=side, seed=seed)
    return x.to(CUDA, dtype), t.to(CUDA, dtype), text.to(CUDA, dtype), mask.to(CUDA)


def _check_replays(model, make_inputs, config, cases, dtype, tol) -> GraphedModule:
    """For each (batch, side): capture, then replay on new inputs; every output equals the eager one.
    An output held from an earlier call must not change (replays write into the graph's own output)."""
    graphed = GraphedModule(model)
    held = []
    with torch.no_grad():
        for seed, (batch, side) in enumerate(cases):
            inputs = _fresh_inputs(make_inputs, config, batch, side, seed, dtype)
            got = graphed(*inputs)
            want = model(*inputs)
            assert got.shape == want.shape and want.abs().max() > 0
            err = _relative_error(got, want)
            assert err <= tol, f"batch {batch}, side {side}: relative error {err:.2e}"
            held.append((got.clone(), got))
    for copy, out in held:
        assert torch.equal(copy, out)
    assert graphed.stats.failure is None and graphed.stats.eager_calls == 0
    assert graphed.stats.replays == len(cases)
    return graphed


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_float_dit_replays_match_eager(make_dit, make_inputs, dtype, tol) -> None:
    model = make_dit().to(CUDA, dtype)
    cases = [(2, 16), (3, 16), (2, 16), (3, 16), (2, 32)]  # two batch sizes, then new inputs, then a new size
    graphed = _check_replays(model, make_inputs, TINY, cases, dtype, tol)
    assert graphed.stats.captures == 3 and len(graphed) == 3


@pytest.mark.gpu
@cuda_only
def test_one_bit_dit_on_triton_replays_match_eager(make_dit, make_inputs) -> None:
    """Layers of 1024 x 1024 go to the Triton kernels: W1A16 for 2 x 64 tokens, W1A8 for 2 x 1024
    (the first calls autotune; that must happen in the warm-up, not in the capture)."""
    from bonsai.kernels.dispatch import select_kernel
    from bonsai.models import DiTConfig

    config = DiTConfig(in_channels=4, patch_size=2, hidden_size=1024, depth=1, num_heads=8, text_dim=64, sample_size=16)
    model = make_dit(config)
    quantize_(model, QuantPolicy())
    model = model.to(CUDA, torch.bfloat16)
    packed = model.blocks[0].attn.proj.packed
    assert select_kernel(torch.empty(128, 1024, device=CUDA, dtype=torch.bfloat16), packed).name == "triton-w1a16"
    assert select_kernel(torch.empty(2048, 1024, device=CUDA, dtype=torch.bfloat16), packed).name == "triton-w1a8"
    cases = [(2, 16), (2, 64), (2, 16), (2, 64)]
    graphed = _check_replays(model, make_inputs, config, cases, torch.bfloat16, 1e-2)
    assert graphed.stats.captures == 2


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_pipeline_with_graphs_matches_eager_and_follows_loras(tiny_checkpoint: Path, tmp_path: Path, sampler: str) -> None:
    """Same seeds give the same images with and without graphs, before and after a LoRA is attached
    (a graph captured without the LoRA would ignore it), and at a second batch size."""
    eager = Pipeline.from_pretrained(tiny_checkpoint, device="cuda", cuda_graph=False)
    graphed = Pipeline.from_pretrained(tiny_checkpoint, device="cuda", cuda_graph=True)
    lora = write_tiny_lora(tiny_checkpoint, tmp_path / "ink.safetensors")

    def compare(batch: int, seed: int) -> None:
        kw = dict(batch=batch, seed=seed, steps=4, sampler=sampler)
        want, got = eager.generate("a red apple", **kw).samples, graphed.generate("a red apple", **kw).samples
        err = _relative_error(got, want)
        assert err <= 1e-2, f"batch {batch}: relative error {err:.2e}"

    compare(1, 3)
    compare(2, 4)
    stats = graphed.cuda_graphs.stats
    assert stats.captures == 2 and stats.replays > 0 and stats.failure is None
    without = graphed.generate("a red apple", seed=5, steps=4, sampler=sampler).samples
    for pipe in (eager, graphed):
        apply_lora(pipe.denoiser, lora, weight=1.0)
    compare(1, 5)
    with_lora = graphed.generate("a red apple", seed=5, steps=4, sampler=sampler).samples
    assert _relative_error(with_lora, without) > 5e-2  # the LoRA changes the images (0.14 on CPU): the check above can fail
    assert graphed.cuda_graphs.stats.captures == 3


class FailsUnderCapture(torch.nn.Module):
    """Runs eagerly, raises while a CUDA graph captures it (as an op that cannot be captured does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("operation not permitted when stream is capturing")
        return x * 2 if x.sum() > 0 else x * 3


@pytest.mark.gpu
@cuda_only
def test_uncapturable_module_falls_back_to_eager_on_cuda() -> None:
    module = FailsUnderCapture().eval()  # modules in training mode run eagerly
    graphed = GraphedModule(module)
    x = torch.rand(4, 8, device=CUDA) + 0.1
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="capture failed"):
            assert torch.equal(graphed(x), x * 2)
        assert torch.equal(graphed(-x), -x * 3)
    assert not graphed.enabled and graphed.stats.failure and graphed.stats.captures == 0
    assert graphed.stats.eager_calls == 2
    y = torch.randn(64, 64, device=CUDA)
    assert torch.allclose(y @ y, (y.double() @ y.double()).float(), rtol=1e-3, atol=1e-3)  # the device still works
