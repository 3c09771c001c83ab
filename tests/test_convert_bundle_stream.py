"""The memory-saving parts of `bonsai quantize`'s streaming: plain-read tensor files and
row-block binarization must give exactly what the straightforward path gives."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from bonsai.convert.source import SourceError, TensorFile
from bonsai.quant.binarize import BinarizeConfig, binarize, row_separable


@pytest.mark.parametrize("config", [BinarizeConfig("mean"), BinarizeConfig("xnor"), BinarizeConfig("mean", 16), BinarizeConfig("xnor", 24)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_binarize_by_row_blocks_equals_whole(config, dtype):
    torch.manual_seed(0)
    w = (torch.randn(300, 200) * 0.02 + torch.randn(300, 1) * 0.01).to(dtype)
    whole, blocks = binarize(w.float(), config, block_weights=10**9).tensors(), binarize(w, config, block_weights=64 * 200 - 1).tensors()
    assert row_separable(config) and whole.keys() == blocks.keys()
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)  # bit for bit, over 5 blocks of rows


@pytest.mark.parametrize("config", [BinarizeConfig("onebit", rank=4), BinarizeConfig("mean", rank=3), BinarizeConfig("xnor", 16, 2)])
def test_streaming_binarization_equals_the_in_memory_layers(config):
    from torch import nn

    from bonsai.convert.stream import _binarize_module
    from bonsai.quant.layers import binarize_conv, binarize_linear

    torch.manual_seed(0)
    linear, conv = nn.Linear(48, 40).bfloat16(), nn.Conv2d(8, 12, 3, padding=1).bfloat16()
    pairs = [(_binarize_module(linear, config), binarize_linear(linear.float(), config)),
             (_binarize_module(conv, config), binarize_conv(conv.float(), config))]
    for streamed, in_memory in pairs:
        a, b = streamed.state_dict(), in_memory.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_not_row_separable():
    assert not row_separable(BinarizeConfig("onebit")) and not row_separable(BinarizeConfig("mean", rank=2))


def test_tensor_file_reads_like_safetensors(tmp_path):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 5).half(), "b": torch.randn(7).bfloat16(), "c": torch.randn(2, 3, 4), "d": torch.arange(6),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "t.safetensors")
    f, ref = TensorFile(tmp_path / "t.safetensors"), load_file(tmp_path / "t.safetensors")
    for name, t in ref.items():
        got = f.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    with pytest.raises(SourceError, match="tensor 'nope' is missing"):
        f.read("nope")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(SourceError, match=r"cut.safetensors is not a readable safetensors file \(.*file is truncated: tensor '\w+' ends at data byte \d+"):
        TensorFile(tmp_path / "cut.safetensors")  # the header's offsets are checked against the file size on opening
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(SourceError, match="bad.safetensors is not a readable safetensors file"):
        TensorFile(tmp_path / "bad.safetensors")
