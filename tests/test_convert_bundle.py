"""bonsai quantize --bundle: the output carries (copy) or references the source pipeline's text
encoder, tokenizer, VAE and scheduler; loading checks them and generates without the source."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers_tiny import tiny_model, tiny_sd15_pipeline, tiny_vae
from safetensors.torch import load_file, save_file

from bonsai.cli import main
from bonsai.convert import SourceError, quantize_model
from bonsai.diffusers import load_bonsai_pipeline, load_bonsai_unet
from bonsai.format import CheckpointError, read_header
from bonsai.quant import BitConv2d, BitLinear

pytest.importorskip("diffusers")

PARTS = {"text_encoder", "tokenizer", "vae", "scheduler"}  # of tiny_sd15_pipeline (no safety checker)


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for part in PARTS for p in (folder / part).rglob("*") if p.is_file()}


def _images(pipe) -> np.ndarray:
    calls = [0]
    for m in pipe.unet.modules():
        if isinstance(m, BitLinear):
            m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    images = pipe("a red apple", negative_prompt="blurry", num_inference_steps=2, height=16, width=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    n_bit = sum(isinstance(m, BitLinear) for m in pipe.unet.modules())
    assert n_bit > 0 and calls[0] >= 2 * n_bit  # every 1-bit layer ran in both steps (CFG batched)
    return images


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "sd15"
    tiny_sd15_pipeline(folder, tiny_model("sd15"))
    return folder


def test_copy_generates_from_the_output_alone(sd15, tmp_path):
    src = tmp_path / "sd15"
    shutil.copytree(sd15, src)
    reference = tmp_path / "ref.safetensors"
    quantize_model(src, reference, progress=False)
    expected = _images(load_bonsai_pipeline(reference))

    out = tmp_path / "bundle" / "sd15-1bit.safetensors"
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--bundle", "copy", "-q"])
    assert result.exit_code == 0, result.output
    assert "copied beside it:" in result.output and "text_encoder" in result.output
    pipe_meta = read_header(out).metadata["pipeline"]
    assert pipe_meta["bundle"] == "copy" and pipe_meta["diffusers_source"] is None and set(pipe_meta["parts"]) == PARTS
    assert _digests(out.parent) == _digests(src)  # copied as-is: same bytes, same dtypes
    assert json.loads((out.parent / "model_index.json").read_text())["_bonsai_checkpoint"] == out.name

    shutil.rmtree(src)  # the source is gone: the reference checkpoint no longer loads, the bundle does
    with pytest.raises(CheckpointError, match="pipeline folder .* is missing"):
        load_bonsai_pipeline(reference)
    for path in (out, out.parent):  # the checkpoint, or its folder
        pipe = load_bonsai_pipeline(path)
        assert isinstance(pipe.unet.down_blocks[0].resnets[0].conv1, BitConv2d)
        assert isinstance(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, BitLinear)
        np.testing.assert_array_equal(_images(pipe), expected)  # the same text encoder and VAE as the source's

    # the 20-lines-of-diffusers way: the bundle folder is a pipeline folder whose unet is the Bonsai file
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out.parent, unet=load_bonsai_unet(out))
    np.testing.assert_array_equal(_images(pipe), expected)


def test_parts_are_checked_on_load(sd15, tmp_path):
    out = tmp_path / "b" / "m.safetensors"
    quantize_model(sd15, out, progress=False, bundle="copy")
    vae = out.parent / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae)
    name = "decoder.conv_in.weight"
    tensors[name] = tensors[name].half()
    save_file(tensors, vae)
    with pytest.raises(CheckpointError, match=rf"vae/diffusion_pytorch_model.safetensors: tensor '{name}' is \['F16'"):
        load_bonsai_pipeline(out)
    del tensors[name]
    save_file(tensors, vae)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is missing \(the pipeline parts of .*m.safetensors\)"):
        load_bonsai_pipeline(out)
    shutil.rmtree(out.parent / "text_encoder")
    with pytest.raises(CheckpointError, match=r"b/text_encoder: part 'text_encoder' is missing"):
        load_bonsai_pipeline(out)
    (out.parent / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        load_bonsai_pipeline(out)
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_bonsai_pipeline(out.parent)
    pipe = load_bonsai_pipeline(out, source=sd15)  # an explicit pipeline folder is the caller's choice
    assert isinstance(pipe.unet.down_blocks[0].resnets[0].conv1, BitConv2d)


def test_reference_checks_the_source(sd15, tmp_path):
    src = tmp_path / "sd15"
    shutil.copytree(sd15, src)
    out = tmp_path / "r.safetensors"
    quantize_model(src, out, progress=False)
    pipe_meta = read_header(out).metadata["pipeline"]
    assert pipe_meta["bundle"] == "reference" and pipe_meta["diffusers_source"] == str(src.resolve())
    assert not (tmp_path / "vae").exists()
    (src / "tokenizer" / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer/tokenizer_config.json: file is missing"):
        load_bonsai_pipeline(out)


def test_none_and_bad_choices(sd15, tmp_path):
    out = tmp_path / "n.safetensors"
    result = CliRunner().invoke(main, ["quantize", str(sd15), "-o", str(out), "--bundle", "none", "-q"])
    assert result.exit_code == 0, result.output
    assert read_header(out).metadata["pipeline"]["bundle"] == "none"
    with pytest.raises(CheckpointError, match="records no diffusers pipeline folder"):
        load_bonsai_pipeline(out)
    assert isinstance(load_bonsai_pipeline(out, source=sd15).unet.conv_in, torch.nn.Conv2d)

    unet_only = tmp_path / "unet"
    tiny_model("sd15").save_pretrained(unet_only)
    with pytest.raises(SourceError, match="--bundle copy needs a diffusers pipeline folder"):
        quantize_model(unet_only, tmp_path / "u" / "u.safetensors", progress=False, bundle="copy")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model_index.json").write_text("{}")
    result = CliRunner().invoke(main, ["quantize", str(sd15), "-o", str(foreign / "x.safetensors"), "--bundle", "copy", "-q"])
    assert result.exit_code != 0 and "already exists and is not from bonsai quantize" in result.output
    assert not (foreign / "x.safetensors").exists() and not (foreign / "vae").exists()
    assert not [p for p in foreign.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_copy_again_replaces_the_bundle(sd15, tmp_path):
    out = tmp_path / "b" / "m.safetensors"
    quantize_model(sd15, out, progress=False, bundle="copy")
    (out.parent / "vae" / "stale.json").write_text("{}")
    quantize_model(sd15, out, progress=False, bundle="copy")
    assert not (out.parent / "vae" / "stale.json").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([*PARTS, "model_index.json", out.name])
    assert isinstance(load_bonsai_pipeline(out.parent).unet.conv_in, torch.nn.Conv2d)


def test_source_gets_a_transformer_as_its_transformer(tmp_path):
    """A transformer checkpoint that records no pipeline (as `bonsai distill` writes the student of a bare
    component folder) goes into the `source` pipeline as its transformer, not as an ignored `unet=` beside
    the float one."""
    from diffusers import DDIMScheduler, PixArtSigmaPipeline

    from bonsai.convert import open_source, quantize_source
    from bonsai.models import save_model
    from bonsai.quant import QuantPolicy

    folder = tmp_path / "pixart"
    PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tiny_model("pixart"),
                        scheduler=DDIMScheduler()).save_pretrained(folder)
    source = open_source(folder)
    model, _ = quantize_source(source, QuantPolicy(keep=()), progress=False)
    out = tmp_path / "student.safetensors"
    save_model(model, out, source.adapter.architecture, {k: v for k, v in source.config.items() if not k.startswith("_")})
    assert "pipeline" not in read_header(out).metadata
    pipe = load_bonsai_pipeline(out, source=folder)
    assert sum(isinstance(m, BitLinear) for m in pipe.transformer.modules()) == len(read_header(out).layers) > 0


def test_output_folder_is_made_or_refused_before_converting(sd15, tmp_path, monkeypatch):
    """-o in a folder that does not exist yet works with every --bundle (it worked only with copy, and the
    others failed after the whole conversion); a folder that cannot be made fails before any work."""
    out = tmp_path / "new" / "deeper" / "m.safetensors"
    result = CliRunner().invoke(main, ["quantize", str(sd15), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert read_header(out).metadata["pipeline"]["bundle"] == "reference"

    import bonsai.convert.convert as convert

    monkeypatch.setattr(convert, "open_source", lambda *a: pytest.fail("the source was opened before the output was checked"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["quantize", str(sd15), "-o", str(blocker / "m.safetensors"), "-q"])
    assert result.exit_code == 1 and f"Error: {blocker}: cannot create the output folder" in result.output, result.output


def test_info_of_a_bundle_folder_shows_its_checkpoint(sd15, tmp_path):
    """`bonsai info` takes the folder `--bundle copy` wrote, as load_bonsai_pipeline does, and shows the
    checkpoint inside it; any other folder (here the source pipeline) is still refused."""
    out = tmp_path / "bundle" / "m.safetensors"
    quantize_model(sd15, out, progress=False, bundle="copy")
    for flags in ([], ["--json"]):
        of_folder, of_file = (CliRunner().invoke(main, ["info", *flags, str(path)]) for path in (out.parent, out))
        assert of_folder.exit_code == 0 and of_file.exit_code == 0, of_folder.output
        assert of_folder.output == of_file.output and "1-bit" in of_file.output
    for folder in (sd15, tmp_path):
        result = CliRunner().invoke(main, ["info", str(folder)])
        assert result.exit_code == 1 and result.output == f"Error: {folder}: a folder, not a checkpoint file\n"
    out.unlink()  # a bundle whose checkpoint is gone: the error names that file
    result = CliRunner().invoke(main, ["info", str(out.parent)])
    assert result.exit_code == 1 and str(out) in result.output and result.output.count("\n") == 1, result.output
