"""Row operations fused into the compiled CPU kernel (bonsai.kernels.fusion), and the DiT block that uses them.

For each fusion, on every ISA path this machine runs, with fresh random inputs of odd sizes:
1. against float64: epilogue(prologue(x) @ W.T + bias) computed in float64 from the dequantized
   weight. The kernel's error is its int8 activation quantization (see test_kernel_cpu.py),
   passed through the epilogue: relative error below 2e-2.
2. against the unfused kernel: the same product with the prologue and epilogue done by torch in
   float32 around it. Only float32 rounding separates the two: ~1e-7, except where it moves an
   activation of the prologue's output across an int8 rounding boundary, which shifts that row by
   one quantization step of one term (~3e-4 relative each, rare): relative error below 2e-3, five
   times below the quantization error of check 1.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bonsai.kernels import Epilogue, Prologue, bitmatmul, dispatch, fuses_rows, set_kernel
from bonsai.kernels.cpu import available_isas, bitmatmul_cpu
from bonsai.kernels.fusion import apply_epilogue, apply_prologue
from bonsai.lora.formats import LoRAFactors
from bonsai.lora.layers import LoRALayer
from bonsai.models import dit_fused
from bonsai.pipeline import Pipeline

from test_kernel_cpu import random_weight
from tiny_dits import CONFIG, dit_inputs, fused_and_unfused, one_bit_dit

ISAS = available_isas()

# (B, T, K, N, rank, prologue, epilogue): K never a multiple of 8; T past AMX tiles; heads of 8
# or 16 columns inside N, with columns after them left alone.
CASES = [
    (1, 7, 203, 77, 0, "modulated", "gelu"),
    (3, 13, 301, 96, 3, "affine", "heads-q"),
    (2, 37, 203, 3 * 48, 5, "modulated", "heads-qk"),
    (2, 19, 77, 45, 16, "modulated", "gated"),
    (1, 33, 1283, 50, 2, None, "residual"),
    (3, 17, 99, 130, 0, "affine", None),
    (2, 21, 130, 64, 4, "modulated", "gelu+gated"),
    (2, 21, 3203, 130, 0, "modulated", "gelu+gated"),  # AMX: two passes over K, the epilogue on the last
    (2, 1027, 67, 4096, 0, "modulated", "gelu+gated"),  # a 32.1 MiB output: tiles streamed after their epilogue
]


def make_prologue(kind: str | None, b: int, k: int, gen: torch.Generator) -> Prologue | None:
    if kind is None:
        return None
    if kind == "affine":
        return Prologue(1e-5, torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen) * 0.1)
    return Prologue(1e-6, shift=torch.randn(b, k, generator=gen) * 0.5, scale=torch.randn(b, k, generator=gen) * 0.5)


def make_epilogue(kind: str | None, b: int, t: int, n: int, gen: torch.Generator) -> Epilogue | None:
    if kind is None:
        return None
    if kind == "heads-q":  # one part: 5 heads of 16 of 96 columns
        return Epilogue(norm_weight=torch.rand(1, 16, generator=gen) + 0.5, norm_cols=80, norm_eps=1e-6)
    if kind == "heads-qk":  # q and k: two parts of 6 heads of 8, then v untouched
        return Epilogue(norm_weight=torch.rand(2, 8, generator=gen) + 0.5, norm_cols=96, norm_eps=1e-6)
    residual = torch.randn(b, t, n, generator=gen) if kind != "gelu" else None
    gate = torch.randn(b, n, generator=gen) if "gated" in kind else None
    return Epilogue(gelu="gelu" in kind, residual=residual, gate=gate)


def as_float64(op: Prologue | Epilogue | None) -> Prologue | Epilogue | None:
    if op is None:
        return None
    fields = {name: (v.double() if isinstance(v, torch.Tensor) else v) for name, v in vars(op).items()}
    return type(op)(**fields)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}->{c[3]}-r{c[4]}-{c[5]}-{c[6]}")
@pytest.mark.parametrize("isa", ISAS)
def test_fused_rows_match_float64_and_the_unfused_kernel(monkeypatch, isa: str, case: tuple) -> None:
    monkeypatch.setenv("BONSAI_CPU_ISA", isa)
    b, t, k, n, rank, pro_kind, epi_kind = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    w = random_weight(gen, n, k, 0, False, True, rank)
    x = torch.randn(b, t, k, generator=gen) * 2 + 0.3  # a mean for the LayerNorm to remove
    bias = torch.randn(n, generator=gen)
    prologue, epilogue = make_prologue(pro_kind, b, k, gen), make_epilogue(epi_kind, b, t, n, gen)

    y = bitmatmul_cpu(x, w, bias, prologue, epilogue)

    x64 = x.double() if prologue is None else apply_prologue(x.double(), as_float64(prologue))
    y64 = x64 @ w.dequantize(torch.float64).T + bias.double()
    y64 = y64 if epilogue is None else apply_epilogue(y64, as_float64(epilogue))
    assert y.shape == (b, t, n) and y.dtype == torch.float32
    assert rel(y, y64) < 2e-2

    xs = x if prologue is None else apply_prologue(x, prologue)
    unfused = bitmatmul_cpu(xs, w, bias)
    unfused = unfused if epilogue is None else apply_epilogue(unfused, epilogue)
    assert rel(y, unfused) < 2e-3


def test_dispatcher_composes_the_reference_ops_for_kernels_that_do_not_fuse(reference_kernel) -> None:
    gen = torch.Generator().manual_seed(3)
    w = random_weight(gen, 40, 51, 0, False, True, 2)
    x, bias = torch.randn(2, 9, 51, generator=gen), torch.randn(40, generator=gen)
    prologue = make_prologue("modulated", 2, 51, gen)
    epilogue = make_epilogue("gelu+gated", 2, 9, 40, gen)
    assert not fuses_rows(x, w)
    expected = apply_epilogue(bitmatmul(apply_prologue(x, prologue), w, bias), epilogue)
    torch.testing.assert_close(bitmatmul(x, w, bias, prologue, epilogue), expected, rtol=0, atol=0)


def test_malformed_fusions_are_clear_errors() -> None:
    gen = torch.Generator().manual_seed(4)
    w = random_weight(gen, 16, 24, 0, False, False, 0)
    with pytest.raises(ValueError, match="per-sample shift/scale/gate need x"):
        bitmatmul_cpu(torch.randn(6, 24), w, None, make_prologue("modulated", 2, 24, gen))
    with pytest.raises(ValueError, match="per-sample shift/scale/gate need x"):
        bitmatmul_cpu(torch.randn(3, 2, 24), w, None, make_prologue("modulated", 2, 24, gen))
    with pytest.raises(ValueError, match="not 2 parts of heads of 8"):
        Epilogue(norm_weight=torch.ones(2, 8), norm_cols=24)
    with pytest.raises(ValueError, match="a gate needs a residual"):
        Epilogue(gate=torch.ones(1, 16))
    with pytest.raises(ValueError, match="shift and scale must be given together"):
        Prologue(1e-6, shift=torch.ones(1, 24))


def test_dit_takes_the_fused_block_on_cpu_and_matches_its_own_forward(monkeypatch) -> None:
    fused, unfused = fused_and_unfused(one_bit_dit(), dit_inputs(), monkeypatch)
    assert torch.isfinite(fused).all() and fused.abs().max() > 0.1
    assert rel(fused, unfused) < 3e-2  # both quantize activations to int8, at slightly different values


def test_dit_fused_block_matches_the_reference_path() -> None:
    model, (_, _, _, mask) = one_bit_dit(), dit_inputs()
    block, x = model.blocks[0], torch.randn(2, 15, CONFIG.hidden_size)
    mod, text = torch.randn(2, 6, CONFIG.hidden_size) * 0.3, torch.randn(2, 7, CONFIG.hidden_size)
    with torch.no_grad():
        assert dit_fused.applies(block, x)
        fused = dit_fused.block_forward(block, x, mod, text, mask)
        set_kernel("reference")
        try:
            assert not dit_fused.applies(block, x)
            reference = block(x, mod, text, mask)
        finally:
            set_kernel(None)
    assert rel(fused, reference) < 2e-2


def test_without_the_compiled_kernel_blocks_run_dit_forward(monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "_registry", [])  # as when bonsai.kernels.cpu could not be imported
    model, inputs = one_bit_dit(), dit_inputs()
    with torch.no_grad():
        assert not dit_fused.applies(model.blocks[0], torch.randn(2, 15, CONFIG.hidden_size))
        out = model(*inputs)
        set_kernel("reference")
        try:
            torch.testing.assert_close(out, model(*inputs), rtol=0, atol=0)
        finally:
            set_kernel(None)


def test_fused_block_is_skipped_for_training() -> None:
    model = one_bit_dit()
    block, x = model.blocks[0], torch.randn(2, 15, CONFIG.hidden_size)
    with torch.no_grad():
        assert dit_fused.applies(block, x)
    assert not dit_fused.applies(block, x.requires_grad_())  # gradients: dit.py's own forward


@pytest.mark.parametrize("layer", ["attn.qkv", "cross.kv", "mlp.fc1", "mlp.fc2"])
def test_fused_block_runs_a_lora_folded_into_the_low_rank_term(layer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA on one layer (whose own low-rank term it joins): switched off, the plain fused block bit for
    bit; on, the fused block matches dit.py's own forward through the LoRA wrapper up to the bf16 rounding
    of the folded factors, at each weight it is given."""
    model, (_, _, _, mask) = one_bit_dit(), dit_inputs()
    block, x = model.blocks[0], torch.randn(2, 15, CONFIG.hidden_size)
    mod, text = torch.randn(2, 6, CONFIG.hidden_size) * 0.3, torch.randn(2, 7, CONFIG.hidden_size)
    parent, _, name = layer.rpartition(".")
    base = block.get_submodule(layer)
    gen = torch.Generator().manual_seed(5)
    wrapped = LoRALayer(base)
    down, up = torch.randn(2, base.in_features, generator=gen) * 0.3, torch.randn(base.out_features, 2, generator=gen) * 0.3
    wrapped.add("ink", LoRAFactors(down, up, 2.0), 0.0, torch.bfloat16)
    setattr(block.get_submodule(parent), name, wrapped)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            assert dit_fused.applies(block, x)
            fused = dit_fused.block_forward(block, x, mod, text, mask)
            with monkeypatch.context() as m:
                m.setattr(dit_fused, "applies", lambda *args: False)
                return fused, block(x, mod, text, mask)  # dit.py's own forward, LoRA through the wrapper

    plain, plain_unfused = both()
    setattr(block.get_submodule(parent), name, base)
    with torch.no_grad():
        torch.testing.assert_close(dit_fused.block_forward(block, x, mod, text, mask), plain, rtol=0, atol=0)
    setattr(block.get_submodule(parent), name, wrapped)
    for weight in (1.0, 0.5):
        wrapped.weights["ink"] = weight
        fused, unfused = both()
        assert rel(fused, plain) > 1e-2 and rel(unfused, plain_unfused) > 1e-2  # the LoRA reaches the output
        assert rel(fused, unfused) < 2e-2  # measured <= 5.5e-3: the folded factors are rounded to bf16
    assert rel(fused, both()[0]) == 0
    copied = copy.deepcopy(block)  # the folded weight holds kernel caches (C structs): a copy folds again
    with torch.no_grad():
        assert rel(dit_fused.block_forward(copied, x, mod, text, mask), fused) == 0
    wrapped.remove("ink")  # the same name, new factors: folded anew
    wrapped.add("ink", LoRAFactors(down.flip(0), up, 2.0), 0.5, torch.bfloat16)
    refolded, unfused = both()
    assert rel(refolded, fused) > 1e-3 and rel(refolded, unfused) < 2e-2


def test_pipeline_on_cpu_runs_the_fused_blocks(tiny_checkpoint, monkeypatch) -> None:
    pipe = Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    calls = []
    fused_forward = dit_fused.block_forward
    monkeypatch.setattr(dit_fused, "block_forward", lambda *a: calls.append(1) or fused_forward(*a))
    pipe.generate("a red apple", steps=2, seed=0)
    assert len(calls) == 2 * pipe.denoiser.config.depth  # every block of every step (CFG: one batch of 2)
