"""`bonsai eval` on tiny random models, a tiny dataset and a tiny evaluator: batched prompts equal
single runs, the held-out subset is fixed, and the report, table and grid come out right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bonsai.cli import main
from bonsai.data.store import encode_webp, write_bundle
from bonsai.eval import Evaluator, EvaluatorConfig, save_evaluator
from bonsai.eval.compare import held_out_subset
from bonsai.eval.generate import generate_prompts
from bonsai.eval.report import LABEL_HEIGHT
from bonsai.pipeline import Pipeline

from conftest import write_tiny_checkpoint

SIZE = 16  # the tiny DiT's sample size


def _tiny_dataset(root: Path, count: int = 8) -> list[str]:
    """A bundle of `count` random 16x16 images, every other one held out; returns the eval captions."""
    rng = np.random.default_rng(0)
    webp = [encode_webp(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(count)]
    states, mask = torch.randn(count, 4, 384), torch.ones(count, 4, dtype=torch.bool)
    records = [
        {"caption": f"emoji number {i}, number{i}, tests, test style", "name": f"emoji number {i}", "style": "test",
         "split": "eval" if i % 2 else "train"}
        for i in range(count)
    ]
    write_bundle(root, webp, states, mask, records, 8, {"image_size": str(SIZE)})
    return [r["caption"] for r in records if r["split"] == "eval"]


def test_held_out_subset_is_fixed_and_evenly_spaced() -> None:
    assert held_out_subset(10, 4) == [0, 2, 5, 7]
    assert held_out_subset(10, None) == held_out_subset(10, 10) == held_out_subset(10, 50) == list(range(10))
    with pytest.raises(ValueError, match="prompts must be >= 1"):
        held_out_subset(10, 0)


def test_batched_prompts_equal_single_runs(tiny_checkpoint: Path, reference_kernel: None) -> None:
    pipe = Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    prompts, seeds = ["a red apple", "a blue car", "a small cat"], [5, 9, 2]
    images, seconds = generate_prompts(pipe, prompts, seeds, steps=3, cfg=3.0, batch_size=2)
    assert images.shape == (3, 3, SIZE, SIZE) and seconds > 0
    for image, prompt, seed in zip(images, prompts, seeds):
        single = pipe.generate(prompt, seed=seed, steps=3, cfg=3.0).samples[0].clamp(-1, 1)
        torch.testing.assert_close(image, single, rtol=0, atol=1e-5)
    assert not torch.allclose(images[0], images[1])
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate_prompts(pipe, prompts, seeds[:2], steps=3, cfg=3.0)


def test_eval_command_writes_report_table_and_grid(tmp_path: Path, tiny_checkpoint: Path, reference_kernel: None) -> None:
    eval_captions = _tiny_dataset(tmp_path / "data")
    evaluator = tmp_path / "evaluator"
    torch.manual_seed(0)
    save_evaluator(Evaluator(EvaluatorConfig(image_size=SIZE, widths=(8, 16), stem_stride=2, groups=4)), evaluator)
    other = write_tiny_checkpoint(tmp_path / "other.safetensors", seed=1)
    args = [
        "eval", "--model", f"teacher={tiny_checkpoint}", "--model", f"other={other}", "--model", f"same={tiny_checkpoint}",
        "--data", str(tmp_path / "data"), "--evaluator", str(evaluator), "--prompts", "3", "--steps", "2",
        "--batch", "2", "--grid-rows", "2", "-o", str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output

    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert list(report["models"]) == ["teacher", "other", "same"]
    assert report["prompts"] == [eval_captions[i] for i in held_out_subset(len(eval_captions), 3)]
    assert report["seeds"] == [0, 1, 2]
    teacher, other_row, same = (report["models"][k] for k in ("teacher", "other", "same"))
    assert "psnr" not in teacher and "ssim" not in teacher
    assert same["ssim"] == pytest.approx(1.0) and same["psnr"] == float("inf")  # the reference's own file
    assert other_row["ssim"] < 1.0 and np.isfinite(other_row["psnr"])
    for row in (teacher, other_row, same, report["real"]):
        assert 0 <= row["top1"] <= row["top5"] <= 1 and row["fd"] >= 0
        assert row["num_candidates"] == len(eval_captions)  # retrieval among every held-out caption
    assert same["fd"] == pytest.approx(teacher["fd"]) and same["top1"] == teacher["top1"]
    assert report["real"]["chance_top1"] == pytest.approx(1 / len(eval_captions))

    table = (tmp_path / "out" / "eval.md").read_text()
    assert "| teacher |" in table and "| other |" in table and "| chance |" in table
    assert f"1. {report['prompts'][0]} (seed 0)" in table and "3. " not in table.split("rows top to bottom")[1]
    grid = Image.open(tmp_path / "out" / "samples.png")
    assert grid.size == (4 * 2 * SIZE, LABEL_HEIGHT + 2 * 2 * SIZE)  # real + 3 models, 2 rows, upscaled 2x


def test_bare_name_prompts_are_scored_against_the_full_captions(tmp_path: Path, tiny_checkpoint: Path, reference_kernel: None) -> None:
    from bonsai.eval.compare import EvalConfig, compare_models

    eval_captions = _tiny_dataset(tmp_path / "data")
    evaluator = tmp_path / "evaluator"
    torch.manual_seed(0)
    save_evaluator(Evaluator(EvaluatorConfig(image_size=SIZE, widths=(8, 16), stem_stride=2, groups=4)), evaluator)
    runs = {}
    for form in ("full", "name"):
        config = EvalConfig(prompts=3, steps=2, batch_size=2, reference=None, prompt_form=form)
        report, runs[form], _ = compare_models({"m": tiny_checkpoint}, tmp_path / "data", config, evaluator)
        picked = [eval_captions[i] for i in held_out_subset(len(eval_captions), 3)]
        assert report["captions"] == picked  # the retrieval targets stay the full captions
        assert report["models"]["m"]["num_candidates"] == len(eval_captions)
        assert report["prompts"] == (picked if form == "full" else [c.split(",")[0] for c in picked])
    assert not torch.allclose(runs["full"]["m"].images, runs["name"]["m"].images)  # the prompts reached the model
    with pytest.raises(ValueError, match="prompt_form must be one of full, name"):
        EvalConfig(prompt_form="short")


def test_eval_command_rejects_an_unknown_reference(tmp_path: Path, tiny_checkpoint: Path) -> None:
    _tiny_dataset(tmp_path / "data")
    args = ["eval", "--model", f"a={tiny_checkpoint}", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "'teacher' is not one of the --model names ['a']" in result.output
    result = CliRunner().invoke(main, ["eval", "--model", "a-path-without-name", *args[3:]])
    assert result.exit_code == 2 and "write NAME=PATH" in result.output


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"a traceback instead of an error line: {result.exception!r}"
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), result.output


def test_eval_command_checks_models_and_output_before_generating(tmp_path: Path, tiny_checkpoint: Path, monkeypatch) -> None:
    _tiny_dataset(tmp_path / "data")
    (tmp_path / "a-file").write_text("x")
    generated = []  # prompts any model was asked to draw
    monkeypatch.setattr("bonsai.eval.compare.generate_prompts", lambda pipe, prompts, *a, **k: (generated.append(prompts), (torch.zeros(len(prompts), 3, SIZE, SIZE), 1.0))[1])
    base = ["eval", "--reference", "none", "--data", str(tmp_path / "data"), "--steps", "1"]
    missing = tmp_path / "missing.safetensors"
    result = CliRunner().invoke(main, [*base, "--model", f"a={tiny_checkpoint}", "--model", f"b={missing}", "-o", str(tmp_path / "out")])
    _assert_one_line_error(result, str(missing), "no such file")
    result = CliRunner().invoke(main, [*base, "--model", f"a={tiny_checkpoint}", "-o", str(tmp_path / "a-file" / "out")])
    _assert_one_line_error(result, "cannot create output directory", "-o")
    assert generated == []


def test_eval_command_names_a_truncated_dataset_file(tmp_path: Path, tiny_checkpoint: Path) -> None:
    _tiny_dataset(tmp_path / "data")
    images = tmp_path / "data" / "images.safetensors"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])  # a copy cut short
    args = ["eval", "--model", f"a={tiny_checkpoint}", "--reference", "none", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "out")]
    _assert_one_line_error(CliRunner().invoke(main, args), str(images), "bonsai data emoji")
