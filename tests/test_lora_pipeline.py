"""LoRAs in Pipeline.generate: one attached through the API stays active whatever the prompt says
(a tag naming it overrides its weight for that generation only); one loaded by a `<lora:name:w>`
tag is active for that generation and off on the next prompt without the tag."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_lora

from bonsai.kernels import available_kernels, set_kernel
from bonsai.lora import apply_lora, loaded_loras
from bonsai.pipeline import InvalidRequest, NonFiniteImage, Pipeline

PROMPT = "a red circle"


@pytest.fixture
def pipe(tiny_checkpoint: Path, tmp_path: Path, reference_kernel: None) -> Pipeline:
    """The tiny 1-bit pipeline with two LoRAs in its lora_dir: style.safetensors and ink.safetensors."""
    write_tiny_lora(tiny_checkpoint, tmp_path / "style.safetensors", seed=5)
    write_tiny_lora(tiny_checkpoint, tmp_path / "ink.safetensors", seed=6)
    pipe = Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    pipe.lora_dir = str(tmp_path)
    return pipe


def sample(pipe: Pipeline, prompt: str = PROMPT) -> torch.Tensor:
    return pipe.generate(prompt, seed=3, batch=2).samples


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 0.01


def test_api_lora_stays_active_across_untagged_prompts(pipe: Pipeline) -> None:
    base = sample(pipe)
    apply_lora(pipe.denoiser, Path(pipe.lora_dir) / "style.safetensors", weight=1.0)
    styled = sample(pipe)
    assert differs(styled, base)
    assert torch.equal(sample(pipe), styled)  # still on for the next untagged prompt
    assert loaded_loras(pipe.denoiser) == {"style": 1.0}

    inked = sample(pipe, f"{PROMPT} <lora:ink:0.7>")  # a tag adds a LoRA for one generation
    assert differs(inked, styled)
    assert torch.equal(sample(pipe), styled)
    assert loaded_loras(pipe.denoiser) == {"style": 1.0, "ink": 0.0}

    assert torch.equal(sample(pipe, f"{PROMPT} <lora:style:0>"), base)  # a tag overrides an attached LoRA's weight once
    assert torch.equal(sample(pipe), styled) and loaded_loras(pipe.denoiser)["style"] == 1.0


def test_tag_loaded_lora_is_off_on_the_next_untagged_prompt(pipe: Pipeline) -> None:
    base = sample(pipe)
    inked = sample(pipe, f"{PROMPT} <lora:ink:1>")
    assert differs(inked, base)
    assert torch.equal(sample(pipe), base)
    assert loaded_loras(pipe.denoiser) == {"ink": 0.0}  # kept loaded, switched off
    assert torch.equal(sample(pipe, f"<lora:ink> {PROMPT}"), inked)  # the same image when tagged again (weight 1 by default)


def test_missing_tag_lora_changes_nothing(pipe: Pipeline) -> None:
    base = sample(pipe)
    with pytest.raises(InvalidRequest, match="missing.safetensors"):
        sample(pipe, f"{PROMPT} <lora:ink:1> <lora:missing:1>")
    assert torch.equal(sample(pipe), base)



@pytest.mark.parametrize("name", ["../ink", "sub/../ink", "/tmp/ink.safetensors", "..\\ink"])
def test_a_tag_names_a_file_in_the_lora_dir_never_a_path(pipe: Pipeline, tmp_path: Path, name: str) -> None:
    pipe.lora_dir = str(tmp_path / "loras")  # ink.safetensors lies one level up
    (tmp_path / "loras").mkdir()
    with pytest.raises(InvalidRequest, match="not by a path"):
        sample(pipe, f"{PROMPT} <lora:{name}:1>")


@pytest.mark.skipif("cpu" not in available_kernels(), reason="the compiled CPU kernel is not built")
def test_a_switched_off_lora_leaves_the_fused_path_and_the_image_alone(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # On the compiled kernel a DiT block runs fused (row operations inside the kernel) unless a layer is
    # wrapped; a LoRA a tag loaded stays loaded at weight 0, so the next untagged prompt must still be fused.
    write_tiny_lora(tiny_checkpoint, tmp_path / "ink.safetensors", seed=6)
    pipe = Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    pipe.lora_dir = str(tmp_path)
    set_kernel("cpu")
    try:
        base = sample(pipe)
        assert differs(sample(pipe, f"{PROMPT} <lora:ink:1>"), base)
        assert loaded_loras(pipe.denoiser) == {"ink": 0.0}
        assert torch.equal(sample(pipe), base)
    finally:
        set_kernel(None)


@pytest.mark.skipif("cpu" not in available_kernels(), reason="the compiled CPU kernel is not built")
def test_an_active_lora_runs_in_the_fused_blocks_like_the_unfused_ones(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On CPU its branches are folded into the packed weights' low-rank term (the fused kernel applies it),
    # so a LoRA costs no speed; the images match dit.py's own forward through the LoRA wrappers.
    from bonsai.models import dit_fused

    write_tiny_lora(tiny_checkpoint, tmp_path / "ink.safetensors", seed=6)
    pipe = Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    pipe.lora_dir = str(tmp_path)
    calls = []
    fused_forward = dit_fused.block_forward
    monkeypatch.setattr(dit_fused, "block_forward", lambda *a: calls.append(1) or fused_forward(*a))
    set_kernel("cpu")
    try:
        base = sample(pipe)
        inked = sample(pipe, f"{PROMPT} <lora:ink:0.7>")
        assert len(calls) == 2 * pipe.defaults.steps * pipe.denoiser.config.depth  # both generations: every block fused
        monkeypatch.setattr(dit_fused, "applies", lambda *args: False)
        inked_unfused = sample(pipe, f"{PROMPT} <lora:ink:0.7>")
    finally:
        set_kernel(None)
    assert differs(inked, base)
    # measured: the LoRA moves pixels by up to 0.60 (of 2); fused and unfused agree to 0.0063 (mean 0.0011)
    assert (inked - inked_unfused).abs().max() < 0.03 and (inked - inked_unfused).abs().mean() < 5e-3


def test_a_tag_may_name_a_file_with_dots(pipe: Pipeline) -> None:
    # "detail_v1.5.safetensors" is a common kind of name; its tag failed: "a '.' ... rename the file".
    lora_dir = Path(pipe.lora_dir)
    (lora_dir / "ink.safetensors").rename(lora_dir / "ink_v1.5.safetensors")
    base = sample(pipe)
    inked = sample(pipe, f"{PROMPT} <lora:ink_v1.5:0.7>")
    assert differs(inked, base) and torch.equal(sample(pipe), base)
    assert loaded_loras(pipe.denoiser) == {"ink_v1_5": 0.0}  # the name apply_lora gives that file
    apply_lora(pipe.denoiser, lora_dir / "ink_v1.5.safetensors", weight=0.7)
    assert torch.equal(sample(pipe), inked)  # the tag loaded that file's LoRA at that weight

    # another file that would load under the same name is an error, not a silent swap of LoRAs
    (lora_dir / "style.safetensors").rename(lora_dir / "ink_v1_5.safetensors")
    with pytest.raises(InvalidRequest, match=r"ink_v1.5.safetensors and ink_v1_5.safetensors in .* would load under one name"):
        sample(pipe, f"{PROMPT} <lora:ink_v1.5:0.7>")


def test_an_overflowing_lora_weight_is_named_in_a_warning(pipe: Pipeline) -> None:
    # A finite but huge weight overflows the model to NaN, which the PNG shows as black pixels.
    with pytest.warns(NonFiniteImage) as caught:
        result = pipe.generate(f"{PROMPT} <lora:ink:1e38>", seed=3, batch=2)
    assert not torch.isfinite(result.samples).all()
    assert result.warnings == [str(w.message) for w in caught] == [
        "the images of seeds 3, 4 came out with NaN or infinite pixels, drawn black: the LoRAs' weights may be "
        "too strong (ink:1e+38): lower them"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteImage)
        assert torch.isfinite(sample(pipe, f"{PROMPT} <lora:ink:0.7>")).all()
