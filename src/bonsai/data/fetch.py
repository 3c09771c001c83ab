"""Fetch the emoji-datasource npm packages into a cache folder (npm pack + tar), or find them in a
folder the user already has."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .emoji import PACKAGE_VERSION, STYLES


def default_cache_dir() -> Path:
    return Path(os.environ.get("BONSAI_CACHE", Path.home() / ".cache" / "bonsai")) / "npm"


def package_name(emoji_set: str) -> str:
    return f"emoji-datasource-{emoji_set}"


def find_package(source: Path, emoji_set: str) -> Path:
    """The package folder for `emoji_set` under `source`: one holding emoji.json and img/<set>/64/.
    Accepts the package folder itself, <source>/package/ and <source>/<package>/package/ (unpacked
    npm pack), <source>/<package>[-<version>]/ (also the cache this module fills) and
    <source>/node_modules/<package>/ (npm install --prefix)."""
    name = package_name(emoji_set)
    candidates = (source, source / "package", source / name, source / name / "package",
                  source / f"{name}-{PACKAGE_VERSION}", source / "node_modules" / name)
    for cand in candidates:
        if (cand / "emoji.json").is_file() and (cand / "img" / emoji_set / "64").is_dir():
            return cand
    raise FileNotFoundError(
        f"{source}: no {name} package with emoji.json and img/{emoji_set}/64/ found; "
        f"pass the folder that holds it (e.g. node_modules/{name}) or leave --source out to fetch it with npm"
    )


def npm_reason(stderr: str) -> str:
    """The line of npm's error output that says what went wrong: the first 'npm error' line after
    the code/syscall/errno lines ('FetchError: request to ... failed, reason: ...', '404 Not Found - GET ...')."""
    lines = [line.removeprefix("npm error").removeprefix("npm ERR!").strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("code ", "syscall ", "errno "))]
    return lines[0] if lines else "no error message"


def fetch_package(emoji_set: str, cache_dir: Path, version: str = PACKAGE_VERSION) -> Path:
    """npm pack <package>@<version> into cache_dir and unpack its emoji.json, LICENSE and 64-pixel
    images; reuses an earlier unpacked copy. Returns the package folder."""
    name = package_name(emoji_set)
    target = cache_dir / f"{name}-{version}"
    if (target / "emoji.json").is_file():
        return target
    if shutil.which("npm") is None:
        raise RuntimeError(f"npm is needed to fetch {name}@{version}; install Node.js or pass --source with the unpacked package")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        npm = subprocess.run(
            ["npm", "pack", f"{name}@{version}", "--loglevel=error", "--pack-destination", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        if npm.returncode != 0:
            raise RuntimeError(
                f"npm pack {name}@{version} failed ({npm_reason(npm.stderr)}); check the network and npm's registry "
                f"setting, or pass --source with the unpacked package"
            )
        (tgz,) = Path(tmp).glob("*.tgz")
        unpacked = Path(tmp) / "unpacked"
        keep = ("package/emoji.json", "package/LICENSE", f"package/img/{emoji_set}/64/")
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(keep)]
            tar.extractall(unpacked, members=members, filter="data")
        os.replace(unpacked / "package", target)
    return target


def package_dirs(source: Path | None, cache_dir: Path | None = None) -> dict[str, Path]:
    """{npm set: package folder} for every style, from `source` or fetched into the cache."""
    if source is not None:
        return {s: find_package(source, s) for s in STYLES}
    cache = cache_dir or default_cache_dir()
    return {s: fetch_package(s, cache) for s in STYLES}
