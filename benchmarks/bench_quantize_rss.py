"""Peak memory of `bonsai quantize` on full-size models: does conversion really stream?

For each model, a full-size random UNet is written as a diffusers component folder (config.json +
fp16 diffusion_pytorch_model.safetensors) under --workdir, one tensor at a time (the model is
never built in memory). Then `bonsai quantize` runs on it in a child process, and this script
records the child's peak RSS (the larger of its ru_maxrss, from wait4, and a /proc poll
of the child that also splits RSS into anonymous and file-backed pages), the wall
time, the output size and its bits per weight. The claim under test: peak RSS well under the
size of the fp16 weights.

    python benchmarks/bench_quantize_rss.py                      # SD 1.5 UNet (~860M params, ~1.7 GB fp16)
    python benchmarks/bench_quantize_rss.py --models sd15 sdxl   # and the SDXL UNet (~2.6B, ~5.1 GB)
    python benchmarks/bench_quantize_rss.py --keep-files         # leave the big files in --workdir

The files are deleted afterwards unless --keep-files; --workdir must have room for the fp16 file
and the output (check `df -h /tmp`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from bonsai.convert.adapters import ADAPTERS
from bonsai.format import summarize

_SD15_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
CONFIGS = {  # the UNet configs of the published diffusers pipelines
    "sd15": dict(
        _class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
        center_input_sample=False, cross_attention_dim=768, down_block_types=_SD15_DOWN, downsample_padding=1,
        flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
        norm_num_groups=32, out_channels=4, sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    ),
    "sdxl": dict(
        _class_name="UNet2DConditionModel", act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256,
        attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
        flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
        norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
        transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        use_linear_projection=True,
    ),
}
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}


def write_random_model(kind: str, folder: Path, seed: int = 0) -> tuple[int, int]:
    """A random full-size model as a diffusers component folder; returns (parameters, weight file bytes).

    The skeleton is built on the meta device; each tensor is drawn (std 0.02, fp16), written and freed."""
    config = CONFIGS[kind]
    skeleton = ADAPTERS[config["_class_name"]].build(config)
    shapes = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    gen = torch.Generator().manual_seed(seed)
    weights = folder / "diffusion_pytorch_model.safetensors"
    with open(weights, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            f.write((torch.randn(shape, generator=gen) * 0.02).to(torch.float16).numpy().tobytes())
    return sum(torch.Size(s).numel() for s in shapes.values()), weights.stat().st_size


def _rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    fields[key] = int(value.split()[0])
    except OSError:
        pass
    return fields


class Poller(threading.Thread):
    """Peak RSS of a process (and its anonymous / file-backed parts), sampled every `interval` seconds.
    Complements ru_maxrss, which can miss peaks whose memory is released with madvise (malloc_trim)."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.done = pid, interval, threading.Event()
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}

    def run(self) -> None:
        while not self.done.is_set():
            now = _rss_kib(self.pid)
            if now.get("VmRSS", 0) > self.peak["VmRSS"]:
                self.peak = {k: now.get(k, 0) for k in self.peak}  # the parts at the moment of the peak
            self.done.wait(self.interval)


def measure(kind: str, workdir: Path, extra: list[str]) -> dict:
    src, out = workdir / f"{kind}-unet", workdir / f"{kind}-1bit.safetensors"
    t0 = time.perf_counter()
    params, fp16_bytes = write_random_model(kind, src)
    write_s = time.perf_counter() - t0
    print(f"{kind}: wrote {params:,} parameters, {fp16_bytes / 1e9:.2f} GB fp16 in {write_s:.0f} s", flush=True)
    cmd = [sys.executable, "-c", "from bonsai.cli import main; main()", "quantize", str(src), "-o", str(out), "-q", *extra]
    t0 = time.perf_counter()
    with open(workdir / f"{kind}.log", "w+") as logf:
        child = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        poller = Poller(child.pid)
        poller.start()
        _, status, usage = os.wait4(child.pid, 0)  # this child's own ru_maxrss (KiB on Linux)
        wall = time.perf_counter() - t0
        poller.done.set()
        poller.join()
        logf.seek(0)
        log = logf.read()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}):\n{log}")
    s = summarize(out)
    row = {
        "model": kind, "parameters": params, "fp16_bytes": fp16_bytes, "ru_maxrss_bytes": usage.ru_maxrss * 1024,
        "polled_rss_bytes": poller.peak["VmRSS"] * 1024, "polled_anon_bytes": poller.peak["RssAnon"] * 1024,
        "polled_file_bytes": poller.peak["RssFile"] * 1024, "output_bytes": s["file_bytes"],
        "bits_per_weight": s["bits_per_weight"], "bits_per_weight_1bit": s["bits_per_weight_1bit"],
        "fraction_1bit": s["fraction_1bit"], "wall_s": wall, "command": " ".join(["bonsai", *cmd[3:]]), "log": log.strip(),
    }
    row["peak_rss_bytes"] = max(row["ru_maxrss_bytes"], row["polled_rss_bytes"])
    row["ratio"] = row["peak_rss_bytes"] / fp16_bytes
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=["sd15"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bonsai-quantize-rss"))
    ap.add_argument("--keep-files", action="store_true", help="leave the fp16 and 1-bit files in --workdir")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("quantize_args", nargs=argparse.REMAINDER, help="after --: extra `bonsai quantize` options")
    args = ap.parse_args()
    extra = [a for a in args.quantize_args if a != "--"]
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    try:
        for kind in args.models:
            rows.append(measure(kind, args.workdir, extra))
            r = rows[-1]
            print(f"{kind}: peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB (ru_maxrss {r['ru_maxrss_bytes'] / 2**30:.2f}, polled {r['polled_rss_bytes'] / 2**30:.2f} GiB = "
                  f"{r['polled_anon_bytes'] / 2**30:.2f} anon + {r['polled_file_bytes'] / 2**30:.2f} file) vs fp16 "
                  f"{r['fp16_bytes'] / 2**30:.2f} GiB -> ratio {r['ratio']:.2f}; output {r['output_bytes'] / 2**20:.0f} MiB, "
                  f"{r['bits_per_weight']:.2f} bits/weight ({r['bits_per_weight_1bit']:.2f} in 1-bit layers, "
                  f"{r['fraction_1bit']:.1%} of weights 1-bit); {r['wall_s']:.0f} s", flush=True)
            if not args.keep_files:
                shutil.rmtree(args.workdir / f"{kind}-unet", ignore_errors=True)
                (args.workdir / f"{kind}-1bit.safetensors").unlink(missing_ok=True)
    finally:
        if not args.keep_files:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
