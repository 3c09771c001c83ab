"""The ComfyUI node pack without ComfyUI: it imports, its nodes declare consistent interfaces,
the example workflows match those interfaces, and the nodes run on a tiny random checkpoint
found through a stub `folder_paths` (ComfyUI's model-folder module)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_DEFAULTS, random_dit, write_tiny_checkpoint, write_tiny_lora

from bonsai.lora import loaded_loras
from bonsai.models import save_model
from bonsai.quant import BitLinear, QuantPolicy, plan

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the pack lives at the repository root, as in ComfyUI/custom_nodes/

from comfyui_bonsai import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from comfyui_bonsai.model_nodes import BonsaiModelLoader, BonsaiModelLoRA  # noqa: E402
from comfyui_bonsai.nodes import (  # noqa: E402
    BonsaiCheckpointLoader,
    BonsaiLoRA,
    BonsaiQuantize,
    BonsaiSampler,
)

WORKFLOWS = ROOT / "comfyui_bonsai" / "workflows"
SAMPLE = dict(negative_prompt="", seed=3, steps=2, cfg=3.0, sampler="euler", shift=1.0, width=0, height=0)


def test_pack_imports_without_comfyui() -> None:
    code = (
        "import json, sys, comfyui_bonsai as p; "
        "assert 'folder_paths' not in sys.modules and 'comfy' not in sys.modules; "
        "print(json.dumps(sorted(p.NODE_CLASS_MAPPINGS)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [
        "BonsaiCheckpointLoader", "BonsaiEmptyLatent", "BonsaiLoRA", "BonsaiModelLoRA", "BonsaiModelLoader",
        "BonsaiQuantize", "BonsaiQuantizeModel", "BonsaiSampler",
    ]


@pytest.mark.parametrize("key", sorted(NODE_CLASS_MAPPINGS))
def test_declared_interface(key: str) -> None:
    cls = NODE_CLASS_MAPPINGS[key]
    assert NODE_DISPLAY_NAME_MAPPINGS[key]
    assert cls.CATEGORY == "Bonsai"
    inputs = cls.INPUT_TYPES()
    assert set(inputs) <= {"required", "optional", "hidden"} and inputs["required"]
    for name, spec in inputs["required"].items():
        assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, name
        assert isinstance(spec[0], (str, list)), name  # a type name, or the choices of a combo
        if len(spec) == 2:
            assert isinstance(spec[1], dict), name
            if "default" in spec[1] and isinstance(spec[0], list):
                assert spec[1]["default"] in spec[0], name
    assert all(isinstance(t, str) for t in cls.RETURN_TYPES)
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    params = list(inspect.signature(getattr(cls, cls.FUNCTION)).parameters)
    assert params == ["self", *inputs["required"]]


def _stub_folder_paths(folders: dict[str, Path]) -> types.ModuleType:
    """ComfyUI's folder_paths API as the nodes use it: list files of a folder, map a name to a path."""
    fp = types.ModuleType("folder_paths")

    def get_filename_list(folder: str) -> list[str]:
        if folder not in folders:
            raise KeyError(folder)
        return sorted(p.name for p in folders[folder].iterdir())

    def get_full_path(folder: str, name: str) -> str | None:
        path = folders[folder] / name
        return str(path) if path.is_file() else None

    fp.get_filename_list, fp.get_full_path = get_filename_list, get_full_path
    return fp


@pytest.fixture
def comfy_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """ComfyUI-style model folders with a tiny 1-bit checkpoint, its float original, a file that is
    not a Bonsai checkpoint, and a LoRA for the tiny model; an empty Bonsai store."""
    folders = {name: tmp_path / name for name in ("diffusion_models", "checkpoints", "loras")}
    for path in folders.values():
        path.mkdir()
    write_tiny_checkpoint(folders["diffusion_models"] / "tiny-1bit.safetensors")
    save_model(random_dit(TINY), folders["checkpoints"] / "tiny-float.safetensors", "dit", TINY.to_dict(),
               pipeline={"text_encoder": "minilm", "defaults": TINY_DEFAULTS})
    (folders["checkpoints"] / "not-bonsai.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    write_tiny_lora(folders["diffusion_models"] / "tiny-1bit.safetensors", folders["loras"] / "style.safetensors")
    monkeypatch.setitem(sys.modules, "folder_paths", _stub_folder_paths(folders))
    monkeypatch.setenv("BONSAI_HOME", str(tmp_path / "store"))
    return folders


def _load(name: str):
    return BonsaiCheckpointLoader().load(name, "comfy")[0]


def _sample(pipe, prompt: str = "a red circle", batch_size: int = 2) -> torch.Tensor:
    return BonsaiSampler().sample(pipe, prompt, batch_size=batch_size, **SAMPLE)[0]


def test_loader_lists_bonsai_checkpoints_of_comfy_folders(comfy_models: dict[str, Path]) -> None:
    choices = BonsaiCheckpointLoader.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert choices == ["bonsai-emoji", "tiny-1bit.safetensors", "tiny-float.safetensors"]
    assert BonsaiLoRA.INPUT_TYPES()["required"]["lora_name"][0] == ["style.safetensors"]
    with pytest.raises(ValueError, match="not-bonsai.safetensors"):
        _load("not-bonsai.safetensors")


def test_loader_and_sampler_give_a_comfy_image(comfy_models: dict[str, Path], reference_kernel: None) -> None:
    pipe = _load("tiny-1bit.safetensors")
    images = _sample(pipe)
    assert images.shape == (2, 16, 16, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.01
    assert not torch.equal(images[0], images[1])  # seed, seed + 1
    # same numbers as the library itself, mapped from [-1, 1] to [0, 1]
    direct = pipe.generate("a red circle", batch=2, **{k: v for k, v in SAMPLE.items() if k not in ("width", "height")})
    torch.testing.assert_close(images, (direct.samples.clamp(-1, 1) + 1).permute(0, 2, 3, 1) / 2)
    wide = BonsaiSampler().sample(pipe, "a red circle", batch_size=1, **{**SAMPLE, "width": 32})[0]
    assert wide.shape == (1, 16, 32, 3)


def test_sampler_shift_0_is_the_models_as_in_bonsai_generate(comfy_models: dict[str, Path], reference_kernel: None) -> None:
    pipe = _load("tiny-1bit.safetensors")
    pipe.defaults = replace(pipe.defaults, shift=3.0)  # as bonsai-t2i's checkpoints recommend
    own = BonsaiSampler().sample(pipe, "a red circle", batch_size=1, **{**SAMPLE, "shift": 0.0})[0]
    generated = pipe.generate("a red circle", seed=SAMPLE["seed"], steps=SAMPLE["steps"], cfg=SAMPLE["cfg"]).samples
    torch.testing.assert_close(own, (generated.clamp(-1, 1) + 1).permute(0, 2, 3, 1) / 2)
    assert (BonsaiSampler().sample(pipe, "a red circle", batch_size=1, **SAMPLE)[0] - own).abs().max() > 1e-3  # shift 1


def test_lora_node_changes_the_image_and_leaves_its_input_alone(comfy_models: dict[str, Path], reference_kernel: None) -> None:
    pipe = _load("tiny-1bit.safetensors")
    base = _sample(pipe)
    styled = BonsaiLoRA().apply(pipe, "style.safetensors", 1.0)[0]
    off = BonsaiLoRA().apply(pipe, "style.safetensors", 0.0)[0]
    styled_images = _sample(styled)  # the prompt names no LoRA: the attached one stays on
    assert (styled_images - base).abs().max() > 0.01
    torch.testing.assert_close(_sample(styled), styled_images)
    assert loaded_loras(styled.denoiser) == {"style": 1.0}
    torch.testing.assert_close(_sample(off), base)
    torch.testing.assert_close(_sample(pipe), base)  # the loader's pipeline has no LoRA attached
    with pytest.raises(ValueError, match="missing.safetensors"):
        BonsaiLoRA().apply(pipe, "missing.safetensors", 1.0)


def test_lora_nodes_at_strength_0_give_their_input(comfy_models: dict[str, Path]) -> None:
    """Strength 0 is the base image bit for bit on any kernel, also the compiled CPU one whose fused
    DiT blocks a LoRA-wrapped layer would leave (as ComfyUI's LoraLoader, the input comes back)."""
    pipe = _load("tiny-1bit.safetensors")
    base = _sample(pipe)
    off = BonsaiLoRA().apply(pipe, "style.safetensors", 0.0)[0]
    assert torch.equal(_sample(off), base)
    model = object()  # a MODEL; strength 0 needs nothing of ComfyUI
    assert BonsaiModelLoRA().apply(model, "style.safetensors", 0.0)[0] is model
    with pytest.raises(ValueError, match="missing.safetensors"):
        BonsaiModelLoRA().apply(model, "missing.safetensors", 0.0)


def test_quantize_node_binarizes_a_float_model(comfy_models: dict[str, Path], reference_kernel: None) -> None:
    pipe = _load("tiny-float.safetensors")
    expected = plan(pipe.denoiser, QuantPolicy())
    quantized, count = BonsaiQuantize().quantize(pipe, "mean", 0, 0, "")
    assert count == len(expected) > 0
    assert all(isinstance(quantized.denoiser.get_submodule(n), BitLinear) for n in expected)
    assert not any(isinstance(m, BitLinear) for m in pipe.denoiser.modules())  # input untouched
    assert quantized.text_encoder is pipe.text_encoder
    images = _sample(quantized)
    assert images.shape == (2, 16, 16, 3) and 0 <= images.min() and images.max() <= 1
    _, kept_more = BonsaiQuantize().quantize(pipe, "mean", 0, 0, "*attn*, *mlp*")
    assert kept_more < count
    _, again = BonsaiQuantize().quantize(quantized, "mean", 0, 0, "")
    assert again == 0  # 1-bit layers are left alone


def _ui_widget_inputs(cls: type) -> list[str]:
    """The widget inputs of a node in UI order (links such as BONSAI_PIPELINE are not widgets);
    a seed with control_after_generate stores one extra value (the control mode) after it."""
    names = []
    for name, spec in cls.INPUT_TYPES()["required"].items():
        if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            names.append(name)
            if len(spec) == 2 and spec[1].get("control_after_generate"):
                names.append(f"{name}:control")
    return names


def test_example_workflows_match_the_nodes() -> None:
    api = json.loads((WORKFLOWS / "bonsai_emoji_api.json").read_text())
    types_used = set()
    for node_id, node in api.items():
        if node["class_type"] not in NODE_CLASS_MAPPINGS:
            assert node["class_type"] in ("SaveImage", "PreviewImage"), node_id
            continue
        types_used.add(node["class_type"])
        assert set(node["inputs"]) == set(NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()["required"]), node_id
        for value in node["inputs"].values():
            if isinstance(value, list):  # a link: [source node id, output index]
                assert value[0] in api and value[1] < len(NODE_CLASS_MAPPINGS[api[value[0]]["class_type"]].RETURN_TYPES)
    assert {"BonsaiCheckpointLoader", "BonsaiSampler"} <= types_used
    assert any(n["class_type"] == "SaveImage" for n in api.values())

    ui = json.loads((WORKFLOWS / "bonsai_emoji_ui.json").read_text())
    ids = {n["id"] for n in ui["nodes"]}
    for node in ui["nodes"]:
        if node["type"] in NODE_CLASS_MAPPINGS:
            assert len(node["widgets_values"]) == len(_ui_widget_inputs(NODE_CLASS_MAPPINGS[node["type"]])), node["type"]
    for link in ui["links"]:  # [id, from node, from slot, to node, to slot, type]
        assert link[1] in ids and link[3] in ids


def test_any_seed_the_sampler_widget_allows_fits_any_batch(comfy_models: dict[str, Path], reference_kernel: None) -> None:
    required = BonsaiSampler.INPUT_TYPES()["required"]
    top_seed, top_batch = required["seed"][1]["max"], required["batch_size"][1]["max"]
    pipe = _load("tiny-1bit.safetensors")
    images = BonsaiSampler().sample(pipe, "a red circle", batch_size=2, **{**SAMPLE, "seed": top_seed, "steps": 1})[0]
    assert images.shape[0] == 2
    pipe.check(replace(pipe.defaults, prompt="x", seed=top_seed), top_batch)  # the largest batch too: no error


def test_loaders_do_not_offer_converted_diffusers_models(comfy_models: dict[str, Path]) -> None:
    """A `bonsai quantize` output in models/diffusion_models was offered, then failed to load ('text encoder
    'diffusers' / decoder 'pixels' is not supported'): the loaders have no diffusers text encoder or VAE."""
    pytest.importorskip("diffusers")
    from diffusers_tiny import tiny_model

    from bonsai.convert import quantize_model

    tiny_model("sd3").save_pretrained(comfy_models["checkpoints"].parent / "sd3")
    quantize_model(comfy_models["checkpoints"].parent / "sd3", comfy_models["diffusion_models"] / "sd3-1bit.safetensors", progress=False)
    assert BonsaiCheckpointLoader.INPUT_TYPES()["required"]["ckpt_name"][0] == ["bonsai-emoji", "tiny-1bit.safetensors", "tiny-float.safetensors"]
    assert "sd3-1bit.safetensors" not in BonsaiModelLoader.INPUT_TYPES()["required"]["ckpt_name"][0]
