"""The MODEL-path helpers of the ComfyUI node pack, without ComfyUI: keep patterns on ComfyUI's
(LDM / BFL) module names, 1-bit copies that leave the source alone, model sizes, the empty latent
node and the example workflows. (The nodes' ComfyUI glue runs in scripts/test_comfyui.py against a
real ComfyUI.)"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bonsai.quant import BinarizeConfig, BitLinear, QuantPolicy, fake_quantize, plan

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from comfyui_bonsai import NODE_CLASS_MAPPINGS
from comfyui_bonsai.binarize_model import (
    binarized_layers,
    copy_with,
    keep_patterns,
    model_size,
    size_report,
    swaps_for,
)
from comfyui_bonsai.model_nodes import BonsaiEmptyLatent

WORKFLOWS = ROOT / "comfyui_bonsai" / "workflows"
STOCK_NODES = {"CLIPTextEncode", "KSampler", "VAEDecode", "SaveImage"}


def module_tree(layers: dict[str, nn.Module]) -> nn.Module:
    """A module holding `layers` under their dotted names (containers made as needed)."""
    root = nn.Module()
    for name, layer in layers.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
    return root


def ldm_unet() -> nn.Module:
    """The layer names of ComfyUI's SD UNet (openaimodel), one of each kind, random float weights."""
    torch.manual_seed(0)
    return module_tree({
        "time_embed.0": nn.Linear(64, 128),
        "label_emb.0.0": nn.Linear(96, 128),
        "input_blocks.0.0": nn.Conv2d(4, 64, 3, padding=1),
        "input_blocks.1.0.in_layers.0": nn.GroupNorm(8, 64),
        "input_blocks.1.0.in_layers.2": nn.Conv2d(64, 64, 3, padding=1),
        "input_blocks.1.0.emb_layers.1": nn.Linear(128, 64),
        "input_blocks.1.0.skip_connection": nn.Conv2d(64, 64, 1),
        "input_blocks.1.1.proj_in": nn.Conv2d(64, 64, 1),
        "input_blocks.1.1.transformer_blocks.0.norm1": nn.LayerNorm(64),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": nn.Linear(64, 64),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k": nn.Linear(96, 64, bias=False),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0": nn.Linear(64, 64),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj": nn.Linear(64, 256),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2": nn.Linear(128, 64),
        "input_blocks.1.1.proj_out": nn.Conv2d(64, 64, 1),
        "out.0": nn.GroupNorm(8, 64),
        "out.2": nn.Conv2d(64, 4, 3, padding=1),
    })


UNET_BINARIZED = [
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0",
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
    "input_blocks.1.1.transformer_blocks.0.ff.net.2",
]


def test_unet_keep_patterns_keep_first_last_time_and_transformer_io_layers() -> None:
    unet = ldm_unet()
    assert plan(unet, QuantPolicy(keep=keep_patterns("UNetModel"), convs=False)) == UNET_BINARIZED
    with_convs = plan(unet, QuantPolicy(keep=keep_patterns("UNetModel"), convs=True))
    assert sorted(set(with_convs) - set(UNET_BINARIZED)) == ["input_blocks.1.0.in_layers.2", "input_blocks.1.0.skip_connection"]
    # Bonsai's generic list alone (an unknown class) misses the UNet's own first/last/time layers
    generic = set(plan(unet, QuantPolicy(keep=keep_patterns("SomethingElse"), convs=True)))
    assert {"input_blocks.0.0", "out.2", "input_blocks.1.0.emb_layers.1", "label_emb.0.0"} <= generic
    extra = plan(unet, QuantPolicy(keep=keep_patterns("UNetModel", ("*.ff.*",)), convs=False))
    assert extra == UNET_BINARIZED[:3]


def test_flux_keep_patterns_keep_embedders_and_modulations() -> None:
    flux = module_tree({name: nn.Linear(64, 64) for name in (
        "img_in", "txt_in", "time_in.in_layer", "vector_in.in_layer", "guidance_in.in_layer",
        "double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin", "double_blocks.0.img_attn.qkv",
        "double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.0", "single_blocks.0.modulation.lin",
        "single_blocks.0.linear1", "single_blocks.0.linear2", "final_layer.linear", "final_layer.adaLN_modulation.1",
    )})
    assert plan(flux, QuantPolicy(keep=keep_patterns("Flux"))) == [
        "double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.0",
        "single_blocks.0.linear1", "single_blocks.0.linear2",
    ]


def test_binarized_copy_swaps_planned_layers_and_leaves_the_source_alone(reference_kernel: None) -> None:
    unet = ldm_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    policy = QuantPolicy(BinarizeConfig("mean", 0, 0), keep=keep_patterns("UNetModel"), convs=False)
    layers = binarized_layers(unet, policy)
    copy = copy_with(unet, swaps_for(unet, layers))

    assert list(layers) == UNET_BINARIZED
    assert not any(isinstance(m, BitLinear) for m in unet.modules())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    for name, module in copy.named_modules():
        if name in layers:
            assert module is layers[name]
        elif isinstance(module, (nn.Linear, nn.Conv2d)):  # kept layers: equal weights in storage of their own
            source = unet.get_submodule(name)
            assert torch.equal(module.weight, source.weight) and module.weight.data_ptr() != source.weight.data_ptr()
    # each swapped layer computes with the 1-bit version of its source weight
    x = torch.randn(3, 64)
    for name in ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj"):
        src = unet.get_submodule(name)
        want = F.linear(x, fake_quantize(src.weight, policy.binarize), src.bias)
        torch.testing.assert_close(copy.get_submodule(name)(x), want, rtol=1e-5, atol=1e-5)
        assert (copy.get_submodule(name)(x) - src(x)).abs().max() > 1e-3  # really 1 bit, not the float layer


def test_copy_of_a_used_1bit_model_runs_alike() -> None:
    """A 1-bit layer that has run holds kernel caches that cannot be deep-copied; copy_with rebuilds them."""
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    model[0] = binarized_layers(model, QuantPolicy(keep=("1",)))["0"]
    x = torch.randn(5, 64)
    y = model(x)
    copy = copy_with(model, {})
    torch.testing.assert_close(copy(x), y)
    assert copy[0].signs.data_ptr() != model[0].signs.data_ptr()


class AnswersAnyAttribute:
    """As ComfyUI's model config (supported_models_base.BASE since ComfyUI 0.4): a missing
    attribute, __deepcopy__ and __setstate__ included, reads as None instead of raising."""

    def __init__(self) -> None:
        self.unet_config = {"in_channels": 4}
        self.latent_format = object()

    def __getattr__(self, name: str) -> None:
        return None


def test_copy_of_a_model_holding_a_comfy_style_config() -> None:
    """ComfyUI's BaseModel holds its config as model_config; copying must neither call the None
    that config gives for __setstate__ nor share the config with the source."""
    model = nn.Sequential(nn.Linear(8, 8))
    model.model_config = AnswersAnyAttribute()
    model.model_config.owner_list = [model.model_config]  # a reference back to the config itself
    new = nn.Linear(8, 8)
    copy = copy_with(model, swaps_for(model, {"0": new}))

    assert copy[0] is new and model[0] is not new
    config = copy.model_config
    assert type(config) is AnswersAnyAttribute and config is not model.model_config
    assert config.unet_config == {"in_channels": 4} and config.unet_config is not model.model_config.unet_config
    assert config.owner_list[0] is config


def test_model_size_counts_packed_bits_and_float_weights() -> None:
    n, k = 32, 64
    model = nn.Sequential(nn.Linear(k, n), nn.Linear(k, n))
    model[1] = binarized_layers(model, QuantPolicy(BinarizeConfig("mean", 0, 0), keep=("0",)))["1"]
    float_bytes = (n * k + n) * 4
    bit_bytes = n * math.ceil(k / 8) + 3 * n * 4  # signs; row_scale, row_offset and bias in float32
    ms = model_size(model)
    assert (ms.weights, ms.bytes) == (2 * (n * k + n), float_bytes + bit_bytes)
    bits = model_size(model, only_bit_layers=True)
    assert (bits.weights, bits.bytes) == (n * k + n, bit_bytes)
    assert bits.bits_per_weight == pytest.approx(8 * bit_bytes / (n * k + n))
    report = size_report(model_size(nn.Sequential(nn.Linear(k, n), nn.Linear(k, n))), ms, bits, 1)
    assert report.startswith("1 layers to 1 bit (50.0% of the weights, 2.46 bits/weight")


def test_empty_latent_is_three_zero_channels_at_image_size() -> None:
    (latent,) = BonsaiEmptyLatent().generate(64, 48, 2)
    assert latent["samples"].shape == (2, 3, 48, 64) and not latent["samples"].any()


def test_model_workflows_match_the_nodes() -> None:
    api = json.loads((WORKFLOWS / "bonsai_model_api.json").read_text())
    assert {n["class_type"] for n in api.values()} == STOCK_NODES | {"BonsaiModelLoader", "BonsaiEmptyLatent"}
    for node_id, node in api.items():
        if node["class_type"] in NODE_CLASS_MAPPINGS:
            assert set(node["inputs"]) == set(NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()["required"]), node_id
        for value in node["inputs"].values():
            if isinstance(value, list):  # a link [source node id, output index]
                source = api[value[0]]["class_type"]
                if source in NODE_CLASS_MAPPINGS:
                    assert value[1] < len(NODE_CLASS_MAPPINGS[source].RETURN_TYPES), node_id
    loader = NODE_CLASS_MAPPINGS["BonsaiModelLoader"].RETURN_TYPES
    assert [loader[api["5"]["inputs"]["model"][1]], loader[api["2"]["inputs"]["clip"][1]], loader[api["6"]["inputs"]["vae"][1]]] == ["MODEL", "CLIP", "VAE"]

    ui = json.loads((WORKFLOWS / "bonsai_model_ui.json").read_text())
    by_type = {n["type"]: n for n in ui["nodes"]}
    assert by_type["BonsaiModelLoader"]["widgets_values"] == [api["1"]["inputs"]["ckpt_name"]]
    assert by_type["BonsaiEmptyLatent"]["widgets_values"] == [api["4"]["inputs"][k] for k in ("width", "height", "batch_size")]
    k = api["5"]["inputs"]
    assert by_type["KSampler"]["widgets_values"] == [k["seed"], "fixed", k["steps"], k["cfg"], k["sampler_name"], k["scheduler"], k["denoise"]]
    ids = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        assert ids[src]["outputs"][src_slot]["type"] == kind and link_id in ids[src]["outputs"][src_slot]["links"]
        assert ids[dst]["inputs"][dst_slot]["link"] == link_id


def test_each_loaded_model_keeps_its_own_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    # BonsaiPixelConfig wrote the shift into its class-wide sampling settings: loading a second model changed
    # the first one's. ComfyUI's modules are stubbed with what comfy_model needs to import.
    import importlib
    import types

    class BASE:
        def __init__(self, unet_config: dict):
            self.unet_config = unet_config

    modules = {
        "comfy.conds": {}, "comfy.latent_formats": {"ChromaRadiance": object}, "comfy.model_management": {},
        "comfy.model_base": {"BaseModel": nn.Module}, "comfy.model_patcher": {}, "comfy.sd": {},
        "comfy.supported_models_base": {"BASE": BASE},
    }
    comfy = types.ModuleType("comfy")
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
        setattr(comfy, name.split(".")[1], module)
    import comfyui_bonsai

    monkeypatch.delitem(sys.modules, "comfyui_bonsai.comfy_model", raising=False)
    comfy_model = importlib.import_module("comfyui_bonsai.comfy_model")
    monkeypatch.setitem(sys.modules, "comfyui_bonsai.comfy_model", comfy_model)  # dropped again after the test
    monkeypatch.setattr(comfyui_bonsai, "comfy_model", comfy_model, raising=False)
    t2i, emoji = comfy_model.BonsaiPixelConfig(3.0), comfy_model.BonsaiPixelConfig(1.0)
    assert (t2i.sampling_settings["shift"], emoji.sampling_settings["shift"]) == (3.0, 1.0)
