"""Prompt -> images on a tiny random 1-bit DiT with the real MiniLM text encoder:
seeds, batching, metadata, bad requests."""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import transparent_image
from bonsai.images import flatten_on_white, next_free_paths, save_numbered, save_png
from bonsai.pipeline import GenerationParams, InvalidRequest, Pipeline, from_pil, pick_device, PromptTruncated
from bonsai.quant import BitLinear

PROMPT = "a red apple on a table"


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint: Path) -> Pipeline:
    """Loaded once per module: the MiniLM load dominates the cost."""
    return Pipeline.from_pretrained(tiny_checkpoint, device="cpu")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_loads_the_checkpoint_with_its_defaults(pipe: Pipeline) -> None:
    assert pipe.name == "tiny-test"
    assert (pipe.defaults.steps, pipe.defaults.cfg, pipe.defaults.width, pipe.defaults.height) == (2, 3.0, 16, 16)
    assert pipe.patch_size == 4 and pipe.device == torch.device("cpu")
    assert sum(isinstance(m, BitLinear) for m in pipe.denoiser.modules()) == 7


def test_same_seed_gives_identical_images(pipe: Pipeline) -> None:
    a = pipe.generate(PROMPT, seed=11)
    b = pipe.generate(PROMPT, seed=11)
    assert torch.equal(a.samples, b.samples)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert a.images[0].size == (16, 16) and a.images[0].mode == "RGB"


def test_different_seeds_give_different_images(pipe: Pipeline) -> None:
    a, b = pipe.generate(PROMPT, seed=11), pipe.generate(PROMPT, seed=12)
    assert (a.samples - b.samples).abs().mean() > 0.05
    assert np.abs(_pixels(a.images[0]) - _pixels(b.images[0])).mean() > 5


def test_prompt_and_negative_prompt_steer_the_image(pipe: Pipeline) -> None:
    # same seed: the text conditioning must reach the output (guidance amplifies it)
    base = pipe.generate(PROMPT, seed=3, cfg=5.0).samples
    other_prompt = pipe.generate("a blue car at night", seed=3, cfg=5.0).samples
    with_negative = pipe.generate(PROMPT, seed=3, cfg=5.0, negative_prompt="blurry").samples
    assert (base - other_prompt).abs().max() > 1e-2
    assert (base - with_negative).abs().max() > 1e-2


def test_batch_of_four_equals_four_single_runs(pipe: Pipeline, reference_kernel) -> None:
    # On the reference kernel: the CPU kernel quantizes activations to int8 per token, so a rounding
    # difference between a batched and a single matmul upstream can move an activation across a
    # quantization step, which is kernel numerics, not the batching and seeding this test is about.
    batch = pipe.generate(PROMPT, batch=4, seed=20, steps=3, sampler="heun")
    assert [p.seed for p in batch.params] == [20, 21, 22, 23]
    for i in range(4):
        single = pipe.generate(PROMPT, seed=20 + i, steps=3, sampler="heun")
        # Batched and single matmuls may block and sum differently, so float results agree to rounding,
        # not bit for bit; a value on a quantization boundary can then land one 8-bit level apart.
        torch.testing.assert_close(batch.samples[i], single.samples[0], rtol=0, atol=1e-4)
        assert np.abs(_pixels(batch.images[i]) - _pixels(single.images[0])).max() <= 1
        assert batch.params[i] == single.params[0]


def test_callback_sees_every_step(pipe: Pipeline) -> None:
    seen = []
    pipe.generate(PROMPT, seed=1, steps=4, callback=lambda step, total, x0: seen.append((step, total, x0.shape)))
    assert seen == [(i, 4, (1, 3, 16, 16)) for i in range(1, 5)]


def test_non_square_size(pipe: Pipeline) -> None:
    image = pipe(PROMPT, seed=1, width=24, height=8)[0]
    assert image.size == (24, 8)


def test_parameters_embedded_in_png(pipe: Pipeline, tmp_path: Path) -> None:
    result = pipe.generate(PROMPT, batch=2, seed=7, negative_prompt="blurry", cfg=2.5)
    paths = next_free_paths(tmp_path, [p.seed for p in result.params])
    assert [p.name for p in paths] == ["00001-7.png", "00002-8.png"]
    for image, params, path in zip(result.images, result.params, paths):
        save_png(image, path)
        with Image.open(path) as png:
            text = png.text["parameters"]
            assert np.array_equal(_pixels(png), _pixels(image))
        assert text == params.to_a1111()
        assert text.splitlines() == [
            PROMPT,
            "Negative prompt: blurry",
            f"Steps: 2, Sampler: euler, CFG scale: 2.5, Seed: {params.seed}, Size: 16x16, Model: tiny-test, "
            "Schedule shift: 1",
        ]
    assert sorted(os.listdir(tmp_path)) == ["00001-7.png", "00002-8.png"]  # no temporary files left
    assert [p.name for p in next_free_paths(tmp_path, [9])] == ["00003-9.png"]


def test_a_name_taken_meanwhile_is_never_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another run saved 00001-5.png between this run's scan of the folder and its write.
    import bonsai.images

    (tmp_path / "00001-5.png").write_bytes(b"the other run's image")
    stale = lambda d, seeds: [d / f"{1 + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]  # noqa: E731
    scans = iter([stale])  # the stale scan, then real ones
    real = bonsai.images.next_free_paths
    monkeypatch.setattr(bonsai.images, "next_free_paths", lambda d, seeds: next(scans, real)(d, seeds))
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert [p.name for p in save_numbered([image, image], [5, 6], tmp_path)] == ["00002-5.png", "00003-6.png"]
    assert (tmp_path / "00001-5.png").read_bytes() == b"the other run's image"
    assert sorted(os.listdir(tmp_path)) == ["00001-5.png", "00002-5.png", "00003-6.png"]  # no temporary files left


def test_numbering_goes_on_past_five_digits(tmp_path: Path) -> None:
    # 99999 images in: the next one is 100000, the one after 100001 (not 100000 again, which would replace it)
    (tmp_path / "99999-7.png").touch()
    assert [p.name for p in next_free_paths(tmp_path, [1])] == ["100000-1.png"]
    (tmp_path / "100000-1.png").touch()
    assert [p.name for p in next_free_paths(tmp_path, [1, 2])] == ["100001-1.png", "100002-2.png"]


def test_png_mode_follows_the_umask(pipe: Pipeline, tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        path = save_png(pipe(PROMPT, seed=1)[0], tmp_path / "a.png")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a1111_text_without_negative_prompt() -> None:
    params = GenerationParams("cat", steps=5, cfg=4.0, seed=3, width=32, height=48, sampler="heun", model="m")
    assert params.to_a1111().splitlines() == [
        "cat",
        "Steps: 5, Sampler: heun, CFG scale: 4, Seed: 3, Size: 32x48, Model: m, Schedule shift: 1",
    ]


@pytest.mark.parametrize(
    "prompt, overrides, message",
    [
        (PROMPT, {"steps": 0}, "steps must be between 1 and 1000, got 0"),
        (PROMPT, {"steps": -2}, "steps must be between 1 and 1000"),
        (PROMPT, {"cfg": -1.0}, "cfg must be between 0 and 50, got -1"),
        (PROMPT, {"cfg": 51.0}, "cfg must be between 0 and 50, got 51"),
        (PROMPT, {"width": 18}, "width 18 must be a multiple of 4"),
        (PROMPT, {"height": 30}, "height 30 must be a multiple of 4"),
        (PROMPT, {"sampler": "ddim"}, "sampler 'ddim' is not one of"),
        (PROMPT, {"batch": 0}, "batch must be >= 1"),
        (PROMPT, {"seed": -1}, "seed must be between 0 and 4294967295 for a batch of 1"),
        (PROMPT, {"seed": 2**32 - 2, "batch": 3}, "seed must be between 0 and 4294967293 for a batch of 3"),
        ("", {}, "prompt is empty"),
        ("   ", {}, "prompt is empty"),
        # a byte that is not UTF-8, as Python decodes it from argv: the tokenizer raised a TypeError
        ("a red \udcff apple", {}, r"prompt is not UTF-8 text \(character 7 is an undecodable byte\)"),
        (PROMPT, {"negative_prompt": "blurry\udce9"}, r"negative prompt is not UTF-8 text \(character 7"),
    ],
)
def test_invalid_requests(pipe: Pipeline, prompt: str, overrides: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        pipe.generate(prompt, **{"seed": 1, **overrides})


@pytest.mark.parametrize("cfg,rows", [(3.0, [1, 1]), (1.0, [1])])
def test_prompts_and_negatives_are_encoded_once_each(pipe: Pipeline, cfg: float, rows: list[int]) -> None:
    """On CPU each distinct text is encoded alone, once whatever the batch: the prompt, then the negative
    prompt (none without guidance, where it would not be used). The images equal guidance built from
    encoding each list of the batch."""
    from bonsai.sampling import SAMPLERS, cfg_velocity, flow_timesteps

    seen = []
    handle = pipe.text_encoder.network.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    try:
        got = pipe.generate(PROMPT, batch=2, seed=3, cfg=cfg, negative_prompt="blurry").samples
    finally:
        handle.remove()
    assert seen == rows

    params = replace(pipe.defaults, prompt=PROMPT, negative_prompt="blurry", seed=3, cfg=cfg)
    cond, uncond = pipe.text_encoder.encode([PROMPT] * 2), pipe.text_encoder.encode(["blurry"] * 2)
    model = cfg_velocity(pipe.denoiser, cond, uncond, cfg)
    with torch.no_grad():
        want = SAMPLERS["euler"](model, pipe.noise(params, 2), flow_timesteps(params.steps, params.shift), None)
    assert torch.allclose(got, want.float(), atol=1e-5)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white_not_the_colour_they_hold(mode: str) -> None:
    # convert("RGB") kept the black that transparent pixels hold: an init image's background turned black.
    image, reference = transparent_image(mode, seed={"RGBA": 1, "LA": 2, "P": 3}[mode])
    flat = np.asarray(flatten_on_white(image), dtype=np.float64)
    assert flat.shape == reference.shape
    assert np.abs(flat - reference).max() <= 1  # 8-bit rounding of the composite
    assert (flat[reference == 255] == 255).all()
    pixels = from_pil([image], *image.size)[0].permute(1, 2, 0).double()
    assert (pixels - torch.from_numpy(reference / 127.5 - 1)).abs().max() <= 1 / 127.5 + 1e-6
    assert flatten_on_white(Image.fromarray(np.zeros((2, 3, 3), np.uint8))).getpixel((0, 0)) == (0, 0, 0)  # no alpha: as it is


@pytest.mark.parametrize("transparent", [False, True])
def test_16_bit_greyscale_keeps_its_tones(transparent: bool, tmp_path: Path) -> None:
    # Pillow's convert("RGB") clips 16-bit grey (mode I;16) at 255: a 16-bit PNG init image came out nearly white.
    values = np.random.default_rng(5).integers(0, 65536, size=(9, 7)).astype(np.uint16)
    values[0, 0] = 4242
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path, transparency=4242) if transparent else Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"
        flat = np.asarray(flatten_on_white(image), dtype=np.float64)
    want = np.repeat((values.astype(np.float64) / 257)[..., None], 3, axis=2)
    if transparent:
        want[values == 4242] = 255.0
    assert flat.shape == want.shape
    assert np.abs(flat - want).max() <= 0.5 + 1e-9  # 8-bit rounding only


def test_img2img_starts_from_a_transparent_image_over_white(pipe: Pipeline) -> None:
    image, reference = transparent_image("RGBA", seed=17, partial=False)
    on_white = Image.fromarray(reference.astype(np.uint8))
    run = dict(strength=0.5, steps=4, seed=9)
    got = pipe.generate(PROMPT, init_images=[image], **run).samples
    assert torch.equal(got, pipe.generate(PROMPT, init_images=[on_white], **run).samples)
    on_black = pipe.generate(PROMPT, init_images=[image.convert("RGB")], **run).samples
    assert (got - on_black).abs().max() > 0.5  # the background matters: the check above can fail


def test_a_converted_diffusers_model_is_named_before_its_weights_load(tmp_path, monkeypatch):
    """`bonsai generate --model` on a `bonsai quantize` output said "text encoder 'diffusers' / decoder 'pixels' is not
    supported", after loading the whole model; it now says where such a model generates, without loading it."""
    pytest.importorskip("diffusers")
    from diffusers_tiny import tiny_model

    import bonsai.models
    from bonsai.convert import quantize_model

    tiny_model("sd3").save_pretrained(tmp_path / "sd3")
    quantize_model(tmp_path / "sd3", tmp_path / "sd3-1bit.safetensors", progress=False)
    monkeypatch.setattr(bonsai.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(InvalidRequest, match="a 1-bit SD3Transformer2DModel .* generates through diffusers: bonsai.diffusers.load_bonsai_pipeline"):
        Pipeline.from_pretrained(tmp_path / "sd3-1bit.safetensors", device="cpu")


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_an_absent_device_is_a_request_error_not_a_crash(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    # "mps" went through unchecked: the first tensor moved there raised a RuntimeError traceback.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InvalidRequest, match=f"device '{device}' was asked for but no .* is available; use --device cpu"):
        pick_device(device)
    assert pick_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("count, batch", [(0, 1), (3, 2), (2, 1)])
def test_init_images_are_one_per_image_or_one_for_all(pipe: Pipeline, count: int, batch: int) -> None:
    # Other counts used the first image alone, silently (three for a batch of two), or raised numpy's
    # "need at least one array to stack" (none).
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    with pytest.raises(InvalidRequest, match=f"init_images holds {count} images: give one for each of the {batch} images, or one for all"):
        pipe.generate(PROMPT, batch=batch, seed=1, strength=0.5, init_images=[image] * count)


def test_a_prompt_past_the_text_encoders_tokens_warns_what_it_ignores(pipe: Pipeline) -> None:
    # The text encoder reads 32 tokens and cut the rest without a word: its end changed nothing.
    words = [f"w{i}" for i in range(80)]  # each "wN" is two word pieces: 15 words and [CLS], [SEP] fill 32
    kept, cut = " ".join(words[:15]), " ".join(words[15:])
    with pytest.warns(PromptTruncated) as caught:
        long = pipe.generate(f"{kept}, {cut}", seed=2, negative_prompt=f"{kept} {cut}").samples
    assert [str(w.message) for w in caught] == [
        f"the {field} is longer than the 32 tokens tiny-test reads: '{cut[:57]}...' is ignored"
        for field in ("prompt", "negative prompt")
    ]
    # what it names as ignored is what the encoder cut: the image is that of the prompt without it
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncated)  # 32 tokens exactly: no warning
        assert torch.equal(long, pipe.generate(kept, seed=2, negative_prompt=kept).samples)


def test_a_pipeline_settles_mkl_vml_before_it_generates(tiny_checkpoint: Path, monkeypatch) -> None:
    # A fresh process's first parallel VML call could run a low-accuracy kernel on one thread's chunk
    # (the position embedding's sin, ~1e-4 off): the same seed then gave another image in that process.
    import bonsai.pipeline as pipeline_module
    from bonsai.vml import VML_OPS, settle_vml

    calls = []
    monkeypatch.setattr(pipeline_module, "settle_vml", lambda: calls.append(1))
    Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    assert calls == [1]
    settle_vml.__wrapped__()  # every op it names exists in torch and takes a one-element float tensor
    assert {"sin", "cos", "exp", "sqrt"} <= set(VML_OPS)


def test_a_cpu_pipeline_keeps_large_freed_blocks_in_the_heap(tiny_checkpoint: Path, monkeypatch) -> None:
    import bonsai.pipeline

    calls = []
    monkeypatch.setattr(bonsai.pipeline, "keep_large_blocks", lambda: calls.append("heap"))
    Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    assert calls == ["heap"]
