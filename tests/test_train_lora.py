"""`bonsai train-lora` on the tiny 1-bit model: a few steps reduce the flow-matching loss, the packed
base is bit-identical afterwards, the LoRA loads and changes the output, gradients through the
fast kernel's BitLinear match the reference path, and malformed inputs give one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, tiny_inputs
from PIL import Image

from bonsai.cli import main
from bonsai.kernels import set_kernel
from bonsai.lora import add_trainable_lora, apply_lora, loaded_loras
from bonsai.models import load_model
from bonsai.pipeline import Pipeline
from bonsai.quant import BitLinear
from bonsai.train.lora import input_grads

CAPTIONS = ["a red square", "a blue circle", "a green square", "a yellow circle", "a purple square"]


def write_images(folder: Path, layout: str = "txt") -> Path:
    """Five 16x16 shape images with captions in the given layout (txt, jsonl or sidecar)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        img = np.full((16, 16, 3), 255, np.uint8)
        img[4:12, 4:12] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(folder / f"{i}.png")
        rows.append((f"{i}.png", caption))
    if layout == "txt":
        (folder / "captions.txt").write_text("".join(f"{f}\t{c}\n" for f, c in rows))
    elif layout == "jsonl":
        (folder / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in rows))
    else:
        for f, c in rows:
            (folder / f).with_suffix(".txt").write_text(c)
    return folder


def packed_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of every BitLinear, by layer name (a layer wrapped by a LoRA keeps its name)."""
    return {f"{n.removesuffix('.base')}.{k}": v.clone() for n, m in model.named_modules() if isinstance(m, BitLinear)
            for k, v in m.state_dict().items()}


def test_train_lora_cli(tiny_checkpoint: Path, tmp_path: Path, reference_kernel: None) -> None:
    images = write_images(tmp_path / "imgs")
    out = tmp_path / "shapes.safetensors"
    args = ["train-lora", str(tiny_checkpoint), "-o", str(out), "--images", str(images), "--rank", "4",
            "--lr", "1e-2", "--batch", "4", "--log-every", "5", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--steps", "20"])
    assert result.exit_code == 0, result.output
    before, after = map(float, re.search(r"([\d.]+) before, ([\d.]+) after", result.output).groups())
    assert after < 0.95 * before

    pipe = Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    base = pipe.generate("a red square", seed=1).samples
    assert apply_lora(pipe.denoiser, out) == "shapes"
    assert (pipe.generate("a red square", seed=1).samples - base).abs().max() > 1e-3
    pipe.lora_dir = str(tmp_path)
    assert loaded_loras(pipe.denoiser) == {"shapes": 1.0}

    result = CliRunner().invoke(main, [*args, "--steps", "25"])  # resumes from shapes.run/state.pt
    assert result.exit_code == 0 and "resumed" in result.output and "at step 20" in result.output
    steps = [json.loads(line)["step"] for line in (tmp_path / "shapes.run" / "log.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25]


@pytest.mark.parametrize("layout", ["jsonl", "sidecar"])
def test_base_stays_packed_and_bit_identical(tiny_checkpoint: Path, tmp_path: Path, layout: str) -> None:
    from bonsai.train.images import captioned_images
    from bonsai.train.loop import TrainConfig
    from bonsai.train.lora import LoRAConfig, folder_data, train_lora

    pipe = Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    files, captions = captioned_images(write_images(tmp_path / "imgs", layout))
    assert captions == CAPTIONS
    data = folder_data(pipe.text_encoder, files, captions, 16, 16)
    assert data.pixels.shape == (5, 3, 16, 16) and data.states.shape[0] == 5
    packed = packed_state(pipe.denoiser)
    cfg = LoRAConfig(rank=2, batch=2)
    train_lora(pipe.denoiser, "x", data, pipe.text_encoder.encode([""]), cfg, TrainConfig(steps=3, lr=1e-2, warmup=1), tmp_path / "run")
    after = packed_state(pipe.denoiser)
    assert after.keys() == packed.keys() and all(torch.equal(after[k], packed[k]) for k in packed)
    trainable = [n for n, p in pipe.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all(".downs.x" in n or ".ups.x" in n for n in trainable)
    assert sum(isinstance(m, BitLinear) for m in pipe.denoiser.modules()) == 7


def test_input_grads_match_the_reference_path(tiny_checkpoint: Path) -> None:
    """The CPU kernel computes the forward only; with input_grads the LoRA gradients equal (up to
    the kernel's int8 activations) those of the autograd-traced reference kernel."""
    model, _ = load_model(tiny_checkpoint)
    torch.manual_seed(0)
    add_trainable_lora(model, "x", 2, ("blocks.*",))
    for name, p in model.named_parameters():
        if ".ups." in name:
            p.data.normal_(std=0.1)
    x, t, text, mask = tiny_inputs(TINY)

    def grads(kernel: str) -> torch.Tensor:
        set_kernel(kernel)
        try:
            model.zero_grad()
            with input_grads(model):
                model(x, t, text, mask).square().mean().backward()
        finally:
            set_kernel(None)
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])

    ref, fast = grads("reference"), grads("cpu")
    qkv_down = model.get_submodule("blocks.0.attn.qkv").downs["x"].grad
    assert qkv_down.abs().max() > 0  # reaches the first layer, through the 1-bit ones after it
    assert ((fast - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such folder"),
    (lambda d: d.mkdir(), "no .png"),
    (lambda d: (write_images(d, "sidecar"), (d / "3.txt").unlink()), "1 of 5 image(s) have no caption"),
    (lambda d: (write_images(d), (d / "captions.txt").write_text("0.png a cat\n")), "captions.txt:1: expected FILE<TAB>CAPTION"),
    (lambda d: (write_images(d), (d / "captions.txt").open("a").write("9.png\ta dog\n")), "not in the folder, e.g. '9.png'"),
    (lambda d: (write_images(d), (d / "1.png").write_bytes(b"not a png")), "1.png: not a readable image"),
])
def test_malformed_inputs_give_one_line_errors(tiny_checkpoint: Path, tmp_path: Path, setup, message: str) -> None:
    folder = tmp_path / "imgs"
    setup(folder)
    result = CliRunner().invoke(main, ["train-lora", str(tiny_checkpoint), "-o", str(tmp_path / "l.safetensors"),
                                       "--images", str(folder), "--steps", "1", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]  # an unreadable image shows after the text encoder's loading progress
    assert last.startswith("Error: ") and message in last and "Traceback" not in result.output
    assert not (tmp_path / "l.safetensors").exists()


def test_usage_errors(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train-lora", str(tiny_checkpoint), "-o", str(tmp_path / "l.safetensors")])
    assert result.exit_code == 2 and "exactly one of --images DIR or --data BUNDLE" in result.output
    result = CliRunner().invoke(main, ["train-lora", str(tiny_checkpoint), "-o", str(tmp_path / "l.safetensors"), "--data", str(tmp_path)])
    last = result.output.strip().splitlines()[-1]  # after the text encoder's loading progress
    assert result.exit_code == 1 and last.startswith("Error: ") and "captions.json: missing" in last


@pytest.mark.parametrize("option, value", [("--rank", "0"), ("--steps", "0"), ("--lr", "0"), ("--batch", "0"), ("--log-every", "0"),
                                           ("--checkpoint-every", "0")])
def test_out_of_range_options_are_usage_errors(tmp_path: Path, option: str, value: str) -> None:
    """Refused before anything loads: never a traceback, an unhelpful torch message, or a LoRA that trained nothing."""
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(main, ["train-lora", str(tmp_path / "base.safetensors"), "-o", str(out), "--images", str(tmp_path), option, value])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
    assert not out.exists()
