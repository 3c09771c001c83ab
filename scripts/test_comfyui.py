"""End-to-end check of the Bonsai node pack against a real ComfyUI, headless on the CPU.

    python scripts/test_comfyui.py --comfyui /path/to/ComfyUI --python /path/to/comfy-venv/bin/python

Starts `main.py --cpu` on 127.0.0.1 with a throw-away base directory (custom_nodes/ holding a
symlink to comfyui_bonsai/, models/diffusion_models/ holding a link to the built-in checkpoint),
checks that /object_info lists the Bonsai nodes and sees the checkpoint in ComfyUI's model folder,
POSTs the API-format example workflow to /prompt, waits on /history, fetches the image from /view
and checks it: size, not blank, and (when bonsai imports here) equal to the library's own image
for the same prompt and seed. ComfyUI needs `bonsai` importable in its own environment.
Exit status 0 when every check passes; prints one line per check.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / "comfyui_bonsai"
WORKFLOW = PACK / "workflows" / "bonsai_emoji_api.json"
NODES = {"BonsaiCheckpointLoader", "BonsaiSampler", "BonsaiLoRA", "BonsaiQuantize"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 30) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def wait_until_up(base: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"ComfyUI exited with status {server.returncode} before it answered; see its log")
        try:
            http(f"{base}/system_stats", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise SystemExit(f"ComfyUI did not answer on {base} within {timeout:.0f} s")


def wait_for_history(base: str, prompt_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = json.loads(http(f"{base}/history/{prompt_id}"))
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(1)
    raise SystemExit(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def library_image(workflow: dict) -> np.ndarray | None:
    """The same image made by the bonsai library in this process, or None if bonsai is not importable."""
    try:
        from bonsai.pipeline import Pipeline
    except ImportError:
        return None
    s = workflow["2"]["inputs"]
    pipe = Pipeline.from_pretrained(workflow["1"]["inputs"]["ckpt_name"], device="cpu")
    gen = pipe.generate(s["prompt"], negative_prompt=s["negative_prompt"], seed=s["seed"], steps=s["steps"],
                        cfg=s["cfg"], sampler=s["sampler"], shift=s["shift"])
    # ComfyUI's SaveImage writes clip(255 * x) truncated to uint8, x in [0, 1]
    return np.clip(255.0 * (gen.samples[0].clamp(-1, 1).numpy() + 1) / 2, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def check(ok: bool, what: str, failures: list[str]) -> None:
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def run(args: argparse.Namespace) -> list[str]:
    workflow = json.loads(WORKFLOW.read_text())
    if args.steps:
        workflow["2"]["inputs"]["steps"] = args.steps
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="comfy-base-") as tmp:
        base_dir = Path(tmp)
        (base_dir / "custom_nodes").mkdir()
        (base_dir / "custom_nodes" / "comfyui_bonsai").symlink_to(PACK, target_is_directory=True)
        models = base_dir / "models" / "diffusion_models"
        models.mkdir(parents=True)
        builtin = ROOT / "src" / "bonsai" / "weights" / "bonsai-emoji.safetensors"
        (models / "emoji-copy.safetensors").symlink_to(builtin)
        port = args.port or free_port()
        cmd = [args.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base_dir),
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        log = open(base_dir / "comfyui.log", "w")
        env = {**os.environ, "BONSAI_HOME": str(base_dir / "bonsai-home")}
        server = subprocess.Popen(cmd, cwd=args.comfyui, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            started = time.monotonic()
            wait_until_up(url, server, args.start_timeout)
            print(f"ComfyUI up in {time.monotonic() - started:.1f} s on {url}", flush=True)
            info = json.loads(http(f"{url}/object_info", timeout=60))
            check(NODES <= info.keys(), "/object_info lists the four Bonsai nodes", failures)
            if "BonsaiCheckpointLoader" in info:
                choices = info["BonsaiCheckpointLoader"]["input"]["required"]["ckpt_name"][0]
                check({"bonsai-emoji", "emoji-copy.safetensors"} <= set(choices),
                      f"loader sees the built-in model and models/diffusion_models ({choices})", failures)
                check(all(info[n]["category"] == "Bonsai" for n in NODES), "category Bonsai", failures)
            started = time.monotonic()
            queued = json.loads(http(f"{url}/prompt", {"prompt": workflow, "client_id": "bonsai-test"}))
            check("prompt_id" in queued and not queued.get("node_errors"), f"/prompt accepted the workflow ({queued})", failures)
            entry = wait_for_history(url, queued["prompt_id"], args.run_timeout)
            seconds = time.monotonic() - started
            status = entry["status"]
            check(status.get("status_str") == "success", f"workflow ran: {status.get('status_str')} in {seconds:.1f} s", failures)
            images = entry.get("outputs", {}).get("3", {}).get("images", [])
            check(len(images) == 1, f"SaveImage reported {len(images)} image(s)", failures)
            if images:
                query = urllib.parse.urlencode({k: images[0][k] for k in ("filename", "subfolder", "type")})
                png = Image.open(io.BytesIO(http(f"{url}/view?{query}")))
                pixels = np.asarray(png.convert("RGB"))
                check(png.size == (64, 64), f"/view returned a {png.size[0]}x{png.size[1]} {png.mode} PNG", failures)
                check(pixels.std() > 10, f"image is not blank (pixel std {pixels.std():.1f})", failures)
                if args.save:
                    png.save(args.save)
                expected = None if args.no_compare else library_image(workflow)
                if expected is not None:
                    diff = np.abs(pixels.astype(int) - expected.astype(int))
                    check(diff.mean() < 1.0 and diff.max() <= 8,
                          f"matches the bonsai library's image (mean |diff| {diff.mean():.3f}, max {diff.max()} levels)", failures)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
            if failures or args.verbose:
                print((base_dir / "comfyui.log").read_text()[-6000:])
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", required=True, type=Path, help="a ComfyUI checkout (the folder with main.py)")
    p.add_argument("--python", default=sys.executable, help="the Python of ComfyUI's environment (bonsai installed there)")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--steps", type=int, default=0, help="override the workflow's steps (0: keep)")
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--run-timeout", type=float, default=600)
    p.add_argument("--save", type=Path, help="also write the fetched PNG here")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison with the library's own image")
    p.add_argument("--verbose", action="store_true", help="print the end of ComfyUI's log")
    args = p.parse_args()
    if not (args.comfyui / "main.py").is_file():
        raise SystemExit(f"{args.comfyui}: no main.py here; give the folder of a ComfyUI checkout")
    failures = run(args)
    print("ALL PASSED" if not failures else f"{len(failures)} FAILED")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
