"""`bonsai generate` end to end in subprocesses (two rejected requests in-process): a PNG with its parameters,
and each bad input a one-line error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bonsai.cli import main
from bonsai.pipeline import Pipeline

PROMPT = "a red apple"


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # after `bonsai generate PROMPT`; --model defaults to the tiny checkpoint
    message: str = ""  # what the error line must say (empty: the run must succeed)


# {model}, {junk}, {file} are filled in with paths made by the fixture.
CASES = {
    "ok": Case(("--size", "16x16", "--steps", "2", "--seed", "1", "--device", "cpu")),
    "unknown-model": Case(("--model", "no-such-model"), "no model named 'no-such-model'"),
    "random-bytes": Case(("--model", "{junk}"), "{junk}: header too large"),
    "steps-0": Case(("--steps", "0"), "Invalid value for '--steps': 0 is not in the range 1<=x<=1000"),
    "size-syntax": Case(("--size", "16",), "'16' is not WIDTHxHEIGHT"),
    "output-under-a-file": Case(("-o", "{file}/out"), "cannot create output directory {file}/out: Not a directory"),
    "output-is-a-file": Case(("-o", "{file}",), "Directory '{file}' is a file"),
}  # fmt: skip
# Run in-process (click's runner) to spare a subprocess that spends seconds importing torch:
# one request the pipeline rejects after loading the model, and bounds click checks before it.
IN_PROCESS = {
    "size-not-divisible": Case(("--size", "18x16"), "width 18 must be a multiple of 4"),
    "cfg-out-of-range": Case(("--cfg", "99"), "Invalid value for '--cfg': 99.0 is not in the range 0.0<=x<=50.0"),
    "batch-0": Case(("--batch", "0"), "Invalid value for '--batch': 0 is not in the range 1<=x<=64"),
    "batch-too-large": Case(("--batch", "100000"), "Invalid value for '--batch': 100000 is not in the range 1<=x<=64"),
    "seed-negative": Case(("--seed", "-1"), "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295"),
    "seed-too-large": Case(("--seed", str(2**64)), f"Invalid value for '--seed': {2**64} is not in the range 0<=x<=4294967295"),
    "model-path-missing": Case(("--model", "missing/model.safetensors"), "missing/model.safetensors: no such file"),
    "strength-without-init": Case(("--strength", "0.5"), "Invalid value for --strength: applies to img2img only: give --init IMAGE too"),
    "hires-steps-without-hires": Case(("--hires-steps", "3"), "Invalid value for --hires-steps: applies to the second pass only"),
    "hires-scale-1": Case(("--hires", "1"), "Invalid value for '--hires': 1.0 is not in the range 1<x<=4"),
    "hires-too-large": Case(("--size", "2048x2048", "--hires", "3"), "hires scale 3 turns 2048x2048 into 6144x6144, over 4096 px a side"),
    "init-missing": Case(("--init", "missing.png"), "Invalid value for '--init': File 'missing.png' does not exist"),
}


def check_error(returncode: int, stdout: str, stderr: str, message: str, out: Path) -> None:
    """Exit code != 0, exactly one error line (the last), naming the problem; nothing written."""
    assert returncode != 0
    assert "Traceback" not in stderr and stdout == ""
    lines = [line.strip() for line in re.split(r"[\r\n]", stderr) if line.strip()]
    errors = [line for line in lines if "Error" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr
    assert errors[0].startswith("Error: ") and message in errors[0]
    # nothing half-written: the output folder, if it was made at all, is empty
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture(scope="module")
def runs(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Every case run once, concurrently (each subprocess spends seconds importing torch and transformers)."""
    root = tmp_path_factory.mktemp("cli")
    paths = {
        "model": str(tiny_checkpoint),
        "junk": str(root / "junk.safetensors"),
        "file": str(root / "a-file.txt"),
    }
    Path(paths["junk"]).write_bytes(bytes(range(256)) * 8)
    Path(paths["file"]).write_text("not a directory\n")
    env = {**os.environ, "BONSAI_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1"}

    def run(name: str) -> tuple[subprocess.CompletedProcess, Path, dict]:
        out = root / f"out-{name}"
        args = ["--model", "{model}", "-o", str(out), *CASES[name].args]  # later options win
        cmd = [sys.executable, "-m", "bonsai.cli", "generate", PROMPT, *(a.format(**paths) for a in args)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300), out, paths

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(CASES, pool.map(run, CASES)))


def test_generate_writes_a_png_with_its_parameters(runs) -> None:
    result, out, _ = runs["ok"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(out / "00001-1.png")]
    assert "1 image(s) in" in result.stderr and "Traceback" not in result.stderr
    assert sorted(os.listdir(out)) == ["00001-1.png"]  # no temporary file left behind
    with Image.open(out / "00001-1.png") as image:
        assert image.format == "PNG" and image.size == (16, 16)
        parameters = image.text["parameters"]
    assert parameters.splitlines() == [
        PROMPT,
        "Steps: 2, Sampler: euler, CFG scale: 3, Seed: 1, Size: 16x16, Model: tiny-test, Schedule shift: 1",
    ]


def test_generate_is_reproducible_from_its_parameters(runs, tiny_checkpoint: Path) -> None:
    """The same seed and settings give the same pixels in another process, through the Python API."""
    result, out, _ = runs["ok"]
    assert result.returncode == 0, result.stderr
    image = Pipeline.from_pretrained(tiny_checkpoint, device="cpu")(PROMPT, seed=1, steps=2, width=16, height=16)[0]
    with Image.open(out / "00001-1.png") as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(image))


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case.message])
def test_bad_input_fails_with_one_error_line(runs, name: str) -> None:
    result, out, paths = runs[name]
    check_error(result.returncode, result.stdout, result.stderr, CASES[name].message.format(**paths), out)


@pytest.mark.parametrize("name", IN_PROCESS)
def test_bad_request_fails_with_one_error_line(tiny_checkpoint: Path, tmp_path: Path, monkeypatch, name: str) -> None:
    monkeypatch.setenv("BONSAI_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # relative model paths resolve inside the test's folder
    out = tmp_path / "out"
    args = ["generate", PROMPT, "--model", str(tiny_checkpoint), "-o", str(out), *IN_PROCESS[name].args]
    result = CliRunner().invoke(main, args)
    check_error(result.exit_code, result.stdout, result.stderr, IN_PROCESS[name].message, out)


def test_python_dash_m_bonsai_runs_the_bonsai_command() -> None:
    import bonsai

    src = str(Path(bonsai.__file__).parents[1])  # the package under test, not another installed copy
    env = {**os.environ, "PYTHONPATH": src, "COLUMNS": "80"}  # click wraps help at min(COLUMNS, 80) - 2 = 78
    result = subprocess.run([sys.executable, "-m", "bonsai", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    usage, _, rest = result.stdout.partition("\n")
    assert usage == "Usage: python -m bonsai [OPTIONS] COMMAND [ARGS]..."
    script_help = CliRunner().invoke(main, ["--help"], terminal_width=78).output  # the `bonsai` script's entry point
    assert rest == script_help.partition("\n")[2]


def _commands(group: click.Group, ctx: click.Context, path: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        found += _commands(cmd, ctx, f"{path}{name} ") if isinstance(cmd, click.Group) else [(path + name, cmd)]
    return found


def test_every_option_says_what_it_does() -> None:
    commands = _commands(main, click.Context(main))
    assert {"distill", "train-lora", "data emoji", "models pull", "serve"} <= {name for name, _ in commands}
    silent = {name: [p.opts[-1] for p in cmd.params if isinstance(p, click.Option) and not p.help] for name, cmd in commands}
    assert {name: opts for name, opts in silent.items() if opts} == {}


def test_version_names_the_installed_distribution() -> None:
    # The distribution is bonsai-diffusion ("bonsai" on PyPI is an unrelated project); the import name is bonsai.
    from importlib.metadata import version

    result = CliRunner().invoke(main, ["--version"], prog_name="bonsai")
    assert result.exit_code == 0 and result.output.strip() == f"bonsai, version {version('bonsai-diffusion')}", result.output


def test_warnings_print_as_one_line():
    # The library's warnings (e.g. quantize converting a file whole) printed Python's source line under them.
    code = (
        "import sys, warnings, click, bonsai.cli as cli\n"
        "@click.command()\n"
        "def warn():\n"
        "    warnings.warn('converting it whole (memory ~ file size)', stacklevel=2)\n"
        "sys.modules['w'] = type(sys)('w'); sys.modules['w'].warn = warn\n"
        "cli.SUBCOMMANDS['warn'] = 'w:warn'\n"
        "cli.main(['warn'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == "warning: converting it whole (memory ~ file size)\n"


def test_generate_warns_of_prompt_words_the_model_does_not_read(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BONSAI_HOME", str(tmp_path / "home"))
    prompt = " ".join(f"w{i}" for i in range(20))  # 40 word pieces; the text encoder reads 30 and [CLS], [SEP]
    args = ["generate", prompt, "--model", str(tiny_checkpoint), "-o", str(tmp_path / "out"), "--seed", "1", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: the prompt is longer than the 32 tokens tiny-test reads: 'w15 w16 w17 w18 w19' is ignored"
    ]
    assert result.stdout.splitlines() == [str(tmp_path / "out" / "00001-1.png")]


def test_generate_warns_of_black_images_and_still_writes_them(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    from conftest import write_tiny_lora

    monkeypatch.setenv("BONSAI_HOME", str(tmp_path / "home"))
    (tmp_path / "loras").mkdir()
    write_tiny_lora(tiny_checkpoint, tmp_path / "loras" / "ink.safetensors", seed=6)
    args = ["generate", "a red circle <lora:ink:1e38>", "--model", str(tiny_checkpoint), "--lora-dir",
            str(tmp_path / "loras"), "-o", str(tmp_path / "out"), "--seed", "7", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: the image of seed 7 came out with NaN or infinite pixels, drawn black: the LoRAs' weights may be "
        "too strong (ink:1e+38): lower them"
    ]
    assert result.stdout.splitlines() == [str(tmp_path / "out" / "00001-7.png")]


def test_generate_img2img_and_hires_give_the_python_apis_images(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    from bonsai.hires import generate_hires

    monkeypatch.setenv("BONSAI_HOME", str(tmp_path / "home"))
    pipe = Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(init)
    common = ["--model", str(tiny_checkpoint), "--seed", "4", "--steps", "3", "--size", "16x16", "-q"]
    cases = {  # CLI options -> the Python API's images
        "img2img": (["--init", str(init), "--strength", "0.6"],
                    lambda: pipe.generate(PROMPT, seed=4, steps=3, width=16, height=16, strength=0.6,
                                          init_images=[Image.open(init).convert("RGB")])),
        "hires": (["--hires", "2", "--hires-steps", "2"],
                  lambda: generate_hires(pipe, PROMPT, scale=2, hires_steps=2, seed=4, steps=3, width=16, height=16)),
        "img2img-hires": (["--init", str(init), "--strength", "0.6", "--hires", "2"],
                          lambda: generate_hires(pipe, PROMPT, scale=2, seed=4, steps=3, width=16, height=16, strength=0.6,
                                                 init_images=[Image.open(init).convert("RGB")])),
    }
    for name, (options, api) in cases.items():
        out = tmp_path / name
        result = CliRunner().invoke(main, ["generate", PROMPT, *common, *options, "-o", str(out)])
        assert result.exit_code == 0, result.output
        expected = api()
        with Image.open(out / "00001-4.png") as png:
            np.testing.assert_array_equal(np.asarray(png), np.asarray(expected.images[0]))
            assert png.text["parameters"] == expected.images[0].info["parameters"]
    with Image.open(tmp_path / "hires" / "00001-4.png") as png:
        assert png.size == (32, 32)
        assert png.text["parameters"].endswith(
            "Size: 32x32, Model: tiny-test, Schedule shift: 1, Denoising strength: 0.5, Hires upscale: 2, "
            "Hires upscaler: lanczos, First pass size: 16x16, First pass steps: 3")
    with Image.open(tmp_path / "img2img" / "00001-4.png") as png:
        assert "Size: 16x16" in png.text["parameters"] and "Denoising strength: 0.6" in png.text["parameters"]
    with Image.open(tmp_path / "img2img-hires" / "00001-4.png") as png:  # both strengths, each named
        assert png.text["parameters"].endswith(
            "Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: lanczos, First pass size: 16x16, "
            "First pass steps: 3, First pass denoising strength: 0.6")


def test_an_init_file_that_is_not_an_image_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    result = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(tmp_path / "absent.safetensors"),
                                       "--init", str(bad), "-o", str(tmp_path / "out")])
    check_error(result.exit_code, result.stdout, result.stderr, f"{bad} is not an image Bonsai can read", tmp_path / "out")
