"""`bonsai distill` on a tiny random diffusers UNet: the loss to the teacher falls, runs resume,
and two CPU processes train it together through DDP or FSDP (gloo)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from diffusers_tiny import tiny_model, tiny_sd15_pipeline, tiny_vae

from bonsai.cli import main
from bonsai.convert import quantize_model
from bonsai.diffusers import load_bonsai_pipeline, load_bonsai_unet
from bonsai.format import read_header
from bonsai.models import DiT, DiTConfig, save_model
from bonsai.quant import BitLinear

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher") / "unet"
    tiny_model("sd15").save_pretrained(d)
    return d


def test_distill_reduces_loss_and_resumes(teacher, tmp_path):
    args = ["distill", str(teacher), "-o", str(tmp_path / "run"), "--batch", "2", "--lr", "2e-3", "--log-every", "2"]
    result = CliRunner().invoke(main, [*args, "--steps", "6"])
    assert result.exit_code == 0, result.output
    assert "has no text encoder: distilling on random N(0, I) text states" in result.output  # a bare UNet folder
    before, after = map(float, re.search(r"([\d.]+) before, ([\d.]+) after", result.output).groups())
    assert after < before
    student = load_bonsai_unet(tmp_path / "run" / "student.safetensors")
    assert sum(isinstance(m, BitLinear) for m in student.modules()) > 0
    assert "pipeline" not in read_header(tmp_path / "run" / "student.safetensors").metadata  # no pipeline around the UNet
    result = CliRunner().invoke(main, [*args, "--steps", "8"])
    assert result.exit_code == 0 and "resumed" in result.output and "at step 6" in result.output
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_distill_ddp_two_cpu_processes(teacher, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m", "bonsai.cli",
           "distill", str(teacher), "-o", str(tmp_path / "ddp"), "--steps", "3", "--batch", "1", "--log-every", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # rank 0 alone logs
    assert (tmp_path / "ddp" / "student.safetensors").exists()


def test_distill_fsdp_two_cpu_processes_resumes(teacher, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for steps in ("2", "3"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518", "-m", "bonsai.cli", "distill",
               str(teacher), "-o", str(tmp_path / "fsdp"), "--steps", steps, "--batch", "1", "--log-every", "1", "--no-samples", "--fsdp"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" in proc.stdout and "at step 2" in proc.stdout  # the gathered checkpoint loads back into the shards
    steps = [json.loads(line)["step"] for line in (tmp_path / "fsdp" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    student = load_bonsai_unet(tmp_path / "fsdp" / "student.safetensors")
    assert sum(isinstance(m, BitLinear) for m in student.modules()) > 0


def _tiny_pixart_pipeline(folder):
    from diffusers import DDIMScheduler, PixArtSigmaPipeline

    PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tiny_model("pixart"),
                        scheduler=DDIMScheduler()).save_pretrained(folder)


@pytest.mark.parametrize("kind", ["sd15", "pixart"])
def test_student_of_a_pipeline_folder_references_it_as_quantize_does(kind, tmp_path):
    """The student records the teacher's pipeline folder exactly as `bonsai quantize --bundle reference`
    of the same folder does (subfolder, parts and their tensors), so load_bonsai_pipeline needs no source=."""
    folder = tmp_path / kind
    tiny_sd15_pipeline(folder, tiny_model("sd15")) if kind == "sd15" else _tiny_pixart_pipeline(folder)
    result = CliRunner().invoke(main, ["distill", str(folder), "-o", str(tmp_path / "run"), "--steps", "1", "--batch", "1",
                                       "--latent-size", "8", "--no-samples", "--no-compile"])
    assert result.exit_code == 0, result.output
    student = tmp_path / "run" / "student.safetensors"
    quantize_model(folder, tmp_path / "quantized.safetensors", progress=False)
    assert read_header(student).metadata["pipeline"] == read_header(tmp_path / "quantized.safetensors").metadata["pipeline"]
    assert read_header(student).metadata["pipeline"]["diffusers_source"] == str(folder.resolve())
    pipe = load_bonsai_pipeline(student)
    denoiser = pipe.unet if kind == "sd15" else pipe.transformer
    assert sum(isinstance(m, BitLinear) for m in denoiser.modules()) == len(read_header(student).layers) > 0


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--batch", "0"), ("--log-every", "0"), ("--checkpoint-every", "0"),
                                           ("--sample-steps", "0"), ("--sample-every", "-1"), ("--latent-size", "0"), ("--lr", "0"),
                                           ("--group-size", "-1"), ("--rank", "-1")])
def test_out_of_range_options_are_usage_errors(tmp_path, option, value):
    """Refused before the teacher loads (here a folder with no model in it), never a traceback or a run that trains nothing."""
    result = CliRunner().invoke(main, ["distill", str(tmp_path), "-o", str(tmp_path / "run"), option, value])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_empty_prompts_file_and_unusable_run_folder_are_one_line_errors(tmp_path):
    """Both fail before the teacher loads (here a folder with no model in it): --prompts that hold no
    prompt are not silently replaced by random text states, and a run folder that cannot be made is
    named instead of a traceback."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    result = CliRunner().invoke(main, ["distill", str(tmp_path), "-o", str(tmp_path / "run"), "--prompts", str(prompts)])
    assert result.exit_code == 1 and f"{prompts} holds no prompts" in result.output and "Traceback" not in result.output
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["distill", str(tmp_path), "-o", str(blocker / "run")])
    assert result.exit_code == 1 and f"{blocker / 'run'}: cannot create the run folder" in result.output, result.output


def test_options_that_do_not_go_together_are_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["distill", str(tmp_path), "-o", str(tmp_path / "run"), "--scheme", "onebit", "--group-size", "64"])
    assert result.exit_code == 2 and "use group_size=0 with it" in result.output, result.output  # before the teacher loads
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind, size, multiple", [("sd15", 3, 2), ("pixart", 3, 2), ("dit", 6, 4)])
def test_latent_size_the_teacher_cannot_take_is_a_usage_error(tmp_path, kind, size, multiple):
    """A UNet halves the latents once per down block but the last (here 2 blocks: a multiple of 2), a transformer
    cuts them into patches (PixArt 2x2, the DiT 4x4): refused before the teacher is used, not a traceback there."""
    if kind == "dit":
        config = DiTConfig(hidden_size=32, depth=1, num_heads=2, patch_size=4, sample_size=8, text_dim=16)
        teacher = tmp_path / "dit.safetensors"
        save_model(DiT(config), teacher, "dit", config.to_dict())
    else:
        teacher = tmp_path / kind
        tiny_model(kind).save_pretrained(teacher)
    result = CliRunner().invoke(main, ["distill", str(teacher), "-o", str(tmp_path / "run"), "--latent-size", str(size), "--steps", "1"])
    assert result.exit_code == 2 and f"Invalid value for '--latent-size': {size} is not a multiple of {multiple}" in result.output, result.output
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_a_1bit_teacher_names_the_model_to_distill_from(teacher, tmp_path):
    # A quantized checkpoint as teacher failed at the first forward ("bitmatmul: x has K=..."); it is refused up front.
    from bonsai.convert import quantize_model
    from bonsai.quant import QuantPolicy

    quantized = tmp_path / "q.safetensors"
    quantize_model(teacher, quantized, QuantPolicy())
    result = CliRunner().invoke(main, ["distill", str(quantized), "-o", str(tmp_path / "run"), "--steps", "1"])
    assert result.exit_code == 1 and "is a 1-bit model" in result.output and f"distill from {teacher.resolve()}" in result.output, result.output


def test_a_run_folder_resumes_only_its_own_run(teacher, tmp_path):
    """Another teacher's state was a load_state_dict traceback listing every key; another binarization resumed
    silently, changing the student's scheme mid-run. Both are one-line errors; the same run resumes."""
    tiny_model("sd3").save_pretrained(tmp_path / "sd3")
    run = ["-o", str(tmp_path / "run"), "--batch", "1", "--no-samples", "--no-compile", "--latent-size", "8"]
    result = CliRunner().invoke(main, ["distill", str(teacher), *run, "--steps", "2"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["distill", str(teacher), *run, "--steps", "3", "--scheme", "xnor"])
    assert result.exit_code == 1 and "holds a run with --scheme mean --group-size 0 --rank 0" in result.output, result.output
    result = CliRunner().invoke(main, ["distill", str(tmp_path / "sd3"), *run, "--steps", "3"])
    assert result.exit_code == 1 and "holds a run with another teacher (diffusers:UNet2DConditionModel" in result.output, result.output
    result = CliRunner().invoke(main, ["distill", str(teacher), *run, "--steps", "3"])
    assert result.exit_code == 0 and "resumed" in result.output and "at step 2" in result.output, result.output
