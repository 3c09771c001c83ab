"""The bonsai-emoji recipe: teacher (full precision) -> binarize -> distill -> ship.

    python -m bonsai.train.emoji_recipe prepare -o .carry/emoji      # CPU: dataset + text states
    python -m bonsai.train.emoji_recipe gpu --data .carry/emoji --out runs/emoji   # GPU: teacher + distill
    python -m bonsai.train.emoji_recipe export --run runs/emoji      # CPU: teacher/PTQ/distilled checkpoints

`gpu` needs only torch and safetensors (the GPU machine has no network and no text encoder
weights: the dataset carries precomputed token states). Every stage is resumable."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..models import DiT, DiTConfig, save_model
from ..quant import BinarizeConfig, QuantPolicy, quantize_, to_inference_
from .distill import distill_loss, evaluate_loss, make_student
from .flow import drop_text, flow_matching_loss
from .loop import TrainConfig, train

MODEL_CONFIG = DiTConfig(in_channels=3, patch_size=4, hidden_size=320, depth=8, num_heads=5, sample_size=64)
PIPELINE = {"text_encoder": "minilm", "decoder": "pixels", "defaults": {"steps": 20, "cfg": 4.0, "width": 64, "height": 64, "sampler": "euler", "shift": 1.0}}
LICENSE = "Apache-2.0 (model); training images: Noto Emoji (Apache-2.0) and Twemoji (CC-BY-4.0)"
CFG_DROPOUT = 0.1
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"  # the empty prompt's token states, for CFG dropout
# Candidate schemes tried briefly; the best by held-out distillation loss is trained further.
CANDIDATES: dict[str, BinarizeConfig] = {
    "mean": BinarizeConfig("mean"),
    "onebit": BinarizeConfig("onebit"),
    "mean-g64": BinarizeConfig("mean", group_size=64),
    "mean-r16": BinarizeConfig("mean", rank=16),
}


def load_bundle(root: Path, device: torch.device):
    """Train-split tensors on `device` and the empty prompt's encoding."""
    from safetensors.torch import load_file

    from ..data import load_emoji_dataset

    ds = load_emoji_dataset(root).subset("train")
    empty = load_file(str(root / EMPTY_PROMPT_FILE))
    return (
        ds.images.to(device),
        ds.states.float().to(device),
        ds.mask.to(device),
        (empty["states"].float().to(device), empty["mask"].to(device)),
    )


def random_batches(images, states, masks, empty, batch_size: int, seed: int, dropout: float = CFG_DROPOUT):
    """Endless random batches (x0, text, mask), with the text dropped to the empty prompt at rate `dropout`."""
    g = torch.Generator(device=images.device).manual_seed(seed)
    while True:
        idx = torch.randint(0, images.shape[0], (batch_size,), device=images.device, generator=g)
        text, mask = drop_text(states[idx], masks[idx], empty, dropout, generator=g)
        yield images[idx], text, mask


def _flow_loss(model, batch):
    x0, text, mask = batch
    return flow_matching_loss(model, x0, text, mask)


def run_teacher(data: Path, out: Path, device: torch.device, batch_size: int, steps: int, seconds: float) -> DiT:
    images, states, masks, empty = load_bundle(data, device)
    print(f"teacher: {images.shape[0]} training images on {device}", flush=True)
    torch.manual_seed(0)
    model = DiT(MODEL_CONFIG).to(device)
    cfg = TrainConfig(steps=steps, lr=3e-4, warmup=500, ema_decay=0.999, log_every=100, checkpoint_every=500, max_seconds=seconds)
    state = train(model, _flow_loss, random_batches(images, states, masks, empty, batch_size, seed=1), cfg, out / "teacher")
    teacher = state.ema if state.ema is not None else state.model
    (out / "teacher" / "done.json").write_text(json.dumps({"step": state.step, "complete": state.step >= steps}))
    return teacher


def _held_out_batches(images, states, masks, n: int, batch_size: int) -> list:
    g = torch.Generator().manual_seed(1234)
    idx = torch.randperm(images.shape[0], generator=g)[: n * batch_size].to(images.device)
    return [(images[i], states[i], masks[i]) for i in idx.split(batch_size)]


def run_distill(teacher: DiT, data: Path, out: Path, device: torch.device, batch_size: int, trial_steps: int, steps: int, seconds: float) -> dict:
    """Short distillation per candidate scheme, then the best one trained for `steps`."""
    images, states, masks, empty = load_bundle(data, device)
    teacher = teacher.to(device).eval()
    held = _held_out_batches(images, states, masks, 4, batch_size)
    base_loss = distill_loss(teacher)
    report: dict = {"trials": {}}
    for name, bcfg in CANDIDATES.items():
        student = make_student(teacher, QuantPolicy(bcfg))
        ptq = evaluate_loss(base_loss, student, held)
        cfg = TrainConfig(steps=trial_steps, lr=2e-4, warmup=50, log_every=100, checkpoint_every=trial_steps)
        train(student, base_loss, random_batches(images, states, masks, empty, batch_size, seed=2), cfg, out / f"trial-{name}")
        after = evaluate_loss(base_loss, student, held)
        report["trials"][name] = {"ptq_loss": ptq, "distilled_loss": after, "steps": trial_steps}
        print(f"trial {name}: fixed-batch distill loss PTQ {ptq:.4f} -> {after:.4f}", flush=True)
    best = min(report["trials"], key=lambda k: report["trials"][k]["distilled_loss"])
    report["best"] = best
    student = make_student(teacher, QuantPolicy(CANDIDATES[best]))
    cfg = TrainConfig(steps=steps, lr=2e-4, warmup=100, log_every=100, checkpoint_every=500, max_seconds=seconds)
    state = train(student, base_loss, random_batches(images, states, masks, empty, batch_size, seed=3), cfg, out / "student")
    report["final"] = {"scheme": best, "steps": state.step, "fixed_batch_loss": evaluate_loss(base_loss, state.model, held)}
    (out / "distill.json").write_text(json.dumps(report, indent=2))
    return report


def teacher_from_state(run: Path) -> DiT:
    payload = torch.load(run / "teacher" / "state.pt", map_location="cpu", weights_only=True)
    model = DiT(MODEL_CONFIG)
    model.load_state_dict(payload["ema"] or payload["model"])
    return model.eval()


def student_from_state(run: Path, teacher: DiT, scheme: BinarizeConfig) -> torch.nn.Module:
    payload = torch.load(run / "student" / "state.pt", map_location="cpu", weights_only=True)
    student = make_student(teacher, QuantPolicy(scheme))
    student.load_state_dict(payload["model"])
    return student


def export(teacher: DiT, student: torch.nn.Module, report: dict, out_dir: Path) -> dict[str, Path]:
    """Write the teacher (bf16), 1-bit PTQ and 1-bit distilled checkpoints."""
    from ..data.emoji import ATTRIBUTION

    scheme = CANDIDATES[report["best"]]
    teacher, student = teacher.float().cpu().eval(), student.float().cpu().eval()
    to_inference_(student)
    ptq = DiT(MODEL_CONFIG)
    ptq.load_state_dict(teacher.state_dict())
    quantize_(ptq, QuantPolicy(scheme))

    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"architecture": "dit", "config": MODEL_CONFIG.to_dict(), "license": LICENSE, "pipeline": PIPELINE}
    provenance = {
        "data": ATTRIBUTION,
        "recipe": "python -m bonsai.train.emoji_recipe prepare / gpu / export",
        "distillation": report,
        "date": time.strftime("%Y-%m-%d"),
    }
    paths = {v: out_dir / f"bonsai-emoji-{v}.safetensors" for v in ("teacher", "ptq", "distilled")}
    variants = {
        "teacher": (teacher, "bonsai-emoji-teacher", "full-precision teacher (bf16)"),
        "ptq": (ptq, "bonsai-emoji-ptq", f"1-bit post-training binarization ({report['best']})"),
        "distilled": (student, "bonsai-emoji", f"1-bit distilled ({report['best']})"),
    }
    for key, (model, name, variant) in variants.items():
        save_model(model, paths[key], **common, name=name, provenance={**provenance, "variant": variant})
    return paths


def prepare(out: Path) -> None:
    """Build the dataset (npm) and the empty prompt's encoding into `out`."""
    from safetensors.torch import save_file

    from ..data.build import build_emoji_dataset
    from ..data.fetch import package_dirs
    from ..text import TextEncoder

    encoder = TextEncoder()
    if not (out / "captions.json").is_file():
        build_emoji_dataset(package_dirs(None), out, encoder.encode)
    states, mask = encoder.encode([""])
    save_file({"states": states[0].half().contiguous(), "mask": mask[0].contiguous()}, str(out / EMPTY_PROMPT_FILE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("-o", "--out", type=Path, default=Path("data/emoji"))
    g = sub.add_parser("gpu")
    g.add_argument("--data", type=Path, required=True)
    g.add_argument("--out", type=Path, default=Path("runs/emoji"))
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--teacher-steps", type=int, default=8000)
    g.add_argument("--teacher-seconds", type=float, default=420)
    g.add_argument("--trial-steps", type=int, default=300)
    g.add_argument("--distill-steps", type=int, default=4000)
    g.add_argument("--distill-seconds", type=float, default=300)
    e = sub.add_parser("export")
    e.add_argument("--run", type=Path, default=Path("runs/emoji"))
    e.add_argument("-o", "--out", type=Path, default=Path("runs/emoji/export"))
    args = parser.parse_args()
    if args.stage == "prepare":
        prepare(args.out)
    elif args.stage == "gpu":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        teacher = run_teacher(args.data, args.out, device, args.batch_size, args.teacher_steps, args.teacher_seconds)
        report = run_distill(teacher.float(), args.data, args.out, device, args.batch_size, args.trial_steps, args.distill_steps, args.distill_seconds)
        _print_paths(export(teacher, student_from_state(args.out, teacher.cpu(), CANDIDATES[report["best"]]), report, args.out / "export"))
    else:
        report = json.loads((args.run / "distill.json").read_text())
        teacher = teacher_from_state(args.run)
        _print_paths(export(teacher, student_from_state(args.run, teacher, CANDIDATES[report["best"]]), report, args.out))


def _print_paths(paths: dict[str, Path]) -> None:
    for variant, path in paths.items():
        print(variant, path, f"{path.stat().st_size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
