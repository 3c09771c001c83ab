"""Image quality of the GPU kernels on a real model: the same prompts and seeds through
bonsai-emoji with each bitmatmul kernel forced, scored with `bonsai eval`'s metrics.

    # CPU: the held-out prompts and seeds (as `bonsai eval --prompts N --seed S` picks them)
    python benchmarks/kernel_quality.py prompts --data data/emoji --prompts 128 --seed 100 -o DIR/prompts.json
    # GPU (no dataset, no evaluator needed there): one images-<kernel>.safetensors per kernel
    PYTHONPATH=src python benchmarks/kernel_quality.py generate --model M.safetensors \
        --text-encoder DIR/text_encoder --prompts-file DIR/prompts.json -o OUT
    # CPU: FD / top-1 / top-5 per kernel, PSNR/SSIM against the reference kernel's images
    python benchmarks/kernel_quality.py score --data data/emoji --images OUT
    # CPU only: W1A8's activation rounding (int8 or float8 e4m3) without the GPU kernels, on the shipped model
    PYTHONPATH=src python benchmarks/kernel_quality.py generate --model bonsai-emoji --device cpu \
        --kernels reference,emulated-w1a8,emulated-w1a8-fp8 --prompts-file DIR/prompts.json -o OUT

The reference kernel (dequantize, then a dense matmul in the model's dtype) is the yardstick:
the Triton kernels should draw the same images up to their rounding (W1A16: bf16 products,
float32 accumulation; W1A8: activations rounded to int8 per token).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KERNELS = ("reference", "triton-w1a16", "triton-w1a8", "auto")  # auto: the dispatcher's own choice per layer
# W1A8's numerics in float32 on any device (kernels.reference.bitmatmul_w1a8_reference), by activation format.
EMULATED = {"emulated-w1a8": "int8", "emulated-w1a8-fp8": "fp8"}


def register_emulated(names: list[str]) -> None:
    from bonsai.kernels import Kernel, register_kernel
    from bonsai.kernels.reference import bitmatmul_w1a8_reference

    for name in names:
        if name in EMULATED:
            fn = lambda x, w, a=EMULATED[name]: bitmatmul_w1a8_reference(x, w, a)  # noqa: E731
            register_kernel(Kernel(name, ("cpu", "cuda", "mps"), fn, lambda x, w: False))


def write_prompts(data: Path, n: int, seed: int, out: Path) -> None:
    from bonsai.data import load_emoji_dataset
    from bonsai.eval.compare import held_out_subset

    held = load_emoji_dataset(data).subset("eval")
    pick = held_out_subset(len(held), n)
    out.write_text(json.dumps({"prompts": [held.captions[i] for i in pick], "seeds": [seed + i for i in range(len(pick))]}, indent=1))
    print(f"{out}: {len(pick)} prompts")


def generate(
    model: Path, text_encoder: Path | None, prompts_file: Path, out: Path, kernels: list[str], steps: int, cfg: float,
    device: torch.device,
) -> None:
    from bonsai.eval.generate import generate_prompts
    from bonsai.hub import resolve
    from bonsai.kernels import set_kernel
    from bonsai.models import load_model
    from bonsai.pipeline import Pipeline
    from bonsai.text import TextEncoder

    spec = json.loads(prompts_file.read_text())
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # as Pipeline.from_pretrained picks
    net, meta = load_model(resolve(str(model)), device="cpu", dtype=dtype)
    encoder = TextEncoder() if text_encoder is None else TextEncoder(text_encoder)
    pipe = Pipeline(net, encoder, meta, device, meta.get("name", model.stem), None, "normal")
    register_emulated(kernels)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    for kernel in kernels:
        set_kernel(None if kernel == "auto" else kernel)
        generate_prompts(pipe, spec["prompts"][:8], spec["seeds"][:8], 2, cfg)  # compile / autotune outside the timing
        if device.type == "cuda":
            torch.cuda.synchronize()
        images, seconds = generate_prompts(pipe, spec["prompts"], spec["seeds"], steps, cfg)
        timings[kernel] = seconds
        save_file({"images": images.contiguous()}, str(out / f"images-{kernel}.safetensors"))
        print(f"{kernel}: {len(images)} images in {seconds:.2f} s", flush=True)
    set_kernel(None)
    info = {
        "model": str(model), "steps": steps, "cfg": cfg, "dtype": str(dtype), "seconds": timings,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
        **spec,
    }
    (out / "generate.json").write_text(json.dumps(info, indent=1))


def score(data: Path, images_dir: Path, reference: str) -> dict:
    from bonsai.data import load_emoji_dataset
    from bonsai.eval.compare import DEFAULT_EVALUATOR
    from bonsai.eval.evaluate import evaluate_images
    from bonsai.eval.evaluator import load_evaluator
    from bonsai.text import TextEncoder

    info = json.loads((images_dir / "generate.json").read_text())
    held = load_emoji_dataset(data).subset("eval")
    evaluator, text_encoder = load_evaluator(DEFAULT_EVALUATOR), TextEncoder()
    runs = {k: load_file(str(images_dir / f"images-{k}.safetensors"))["images"].float() for k in info["seconds"]}
    if reference not in runs:
        raise SystemExit(f"{images_dir}: no images of the reference kernel {reference!r}; have {sorted(runs)}")
    rows = {}
    for kernel, images in runs.items():
        teacher = None if kernel == reference else runs[reference]
        rows[kernel] = evaluate_images(images, info["prompts"], evaluator, text_encoder, held.images, teacher, held.captions)
    print(f"{len(info['prompts'])} prompts, {info['steps']} steps, cfg {info['cfg']}, {info['device']}; PSNR/SSIM vs {reference}")
    print("| kernel | FD | top-1 | top-5 | PSNR (dB) | SSIM | s (all images) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kernel, r in rows.items():
        cells = [f"{r['fd']:.2f}", f"{r['top1']:.3f}", f"{r['top5']:.3f}", f"{r.get('psnr', float('nan')):.2f}", f"{r.get('ssim', float('nan')):.3f}"]
        print(f"| {kernel} | {' | '.join(cells)} | {info['seconds'][kernel]:.2f} |")
    (images_dir / "score.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prompts")
    a.add_argument("--data", type=Path, default=Path("data/emoji"))
    a.add_argument("--prompts", type=int, default=128)
    a.add_argument("--seed", type=int, default=100)
    a.add_argument("-o", "--out", type=Path, required=True)
    g = sub.add_parser("generate")
    g.add_argument("--model", type=Path, required=True, help="checkpoint file or catalog name (bonsai-emoji)")
    g.add_argument("--text-encoder", type=Path, help="int8 MiniLM folder (emoji_recipe prepare); default: the shipped one")
    g.add_argument("--prompts-file", type=Path, required=True)
    g.add_argument("--kernels", default=",".join(KERNELS),
                   help=f"comma-separated kernel names or auto (on CPU: reference, cpu, {', '.join(EMULATED)})")
    g.add_argument("--device", default="cuda")
    g.add_argument("--steps", type=int, default=12)
    g.add_argument("--cfg", type=float, default=4.0)
    g.add_argument("-o", "--out", type=Path, required=True)
    s = sub.add_parser("score")
    s.add_argument("--data", type=Path, default=Path("data/emoji"))
    s.add_argument("--images", type=Path, required=True)
    s.add_argument("--reference", default="reference")
    args = p.parse_args(argv)
    if args.cmd == "prompts":
        write_prompts(args.data, args.prompts, args.seed, args.out)
    elif args.cmd == "generate":
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA GPU here (on CPU: --device cpu --kernels reference,cpu)")
        generate(args.model, args.text_encoder, args.prompts_file, args.out, args.kernels.split(","), args.steps, args.cfg, device)
    else:
        score(args.data, args.images, args.reference)


if __name__ == "__main__":
    main()
