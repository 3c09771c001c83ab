"""End-to-end check of the Bonsai node pack against a real ComfyUI, headless on the CPU.

    python scripts/test_comfyui.py --comfyui /path/to/ComfyUI --python /path/to/comfy-venv/bin/python

Starts `main.py --cpu` on 127.0.0.1 with a throw-away base directory (custom_nodes/ holding a
symlink to comfyui_bonsai/, models/ holding a link to the built-in checkpoint and a few random
test models), then POSTs API-format workflows to /prompt, waits on /history and fetches the
results from /view:

1. pipeline: the example workflow on a Bonsai pipeline (Bonsai Sampler); the image must equal the
   library's own for the same prompt and seed.
2. model: the example workflow on ComfyUI's own types (Bonsai MODEL/CLIP/VAE, KSampler euler +
   simple schedule, VAE Decode); ComfyUI draws the same noise and takes the same Euler steps, so
   the image must match the library's closely.
3. lora: Bonsai LoRA (MODEL) at strength 0 gives the base image, at strength 1 another one.
4. quantize: a random SD1.5-layout UNet (models/unet, loaded by ComfyUI's UNETLoader) with a random
   CLIP-L, quantized to 1 bit by the Bonsai node; KSampler runs on the float and the 1-bit MODEL.

ComfyUI needs `bonsai` importable in its own environment. Prints one line per check and the
seconds each workflow took; exit status 0 when every check passes.
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
WORKFLOWS = PACK / "workflows"
NODES = {
    "BonsaiCheckpointLoader", "BonsaiSampler", "BonsaiLoRA", "BonsaiQuantize",
    "BonsaiModelLoader", "BonsaiEmptyLatent", "BonsaiQuantizeModel", "BonsaiModelLoRA",
}

# Run by ComfyUI's Python in its checkout: a small random UNet in SD1.5's layout (320 channels and
# a 768-wide context, which ComfyUI's detection needs; one level) and a random CLIP-L, as files.
RANDOM_SD15 = """
import sys
unet_path, clip_path = sys.argv[1:3]
sys.argv = sys.argv[:1] + ["--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch, comfy.ops, comfy.sd1_clip
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import save_file
torch.manual_seed(0)
def randomized(module):
    return {k: (torch.randn_like(v) * 0.02).half() if v.is_floating_point() else v for k, v in module.state_dict().items()}
unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
                 transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
                 num_heads=8, use_spatial_transformer=True, legacy=False, use_linear_in_transformer=False,
                 adm_in_channels=None, operations=comfy.ops.disable_weight_init)
save_file(randomized(unet), unet_path)
clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
save_file({k.removeprefix("transformer."): v for k, v in randomized(clip).items()}, clip_path)
"""

# Run by ComfyUI's Python: a random rank-2 LoRA on every block layer of bonsai-emoji (PEFT layout).
RANDOM_LORA = """
import sys, torch
from bonsai.hub import resolve
from bonsai.lora import add_trainable_lora, lora_targets, save_lora
from bonsai.models import load_model
model, _ = load_model(resolve("bonsai-emoji"))
torch.manual_seed(5)  # before the LoRA is made: its down factors start random too
add_trainable_lora(model, "style", rank=2, patterns=("blocks.*",))
for layer in lora_targets(model).values():
    if "style" in getattr(layer, "ups", {}):
        layer.ups["style"].data.normal_(std=0.5)
save_lora(model, "style", sys.argv[1])
"""


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


class Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, ok: bool, what: str) -> bool:
        print(("PASS " if ok else "FAIL ") + what, flush=True)
        if not ok:
            self.failures.append(what)
        return ok


def run_prompt(url: str, workflow: dict, name: str, timeout: float, check: Checks) -> dict:
    """POST `workflow` to /prompt, wait on /history; the outputs by node id ({} if it failed)."""
    started = time.monotonic()
    queued = json.loads(http(f"{url}/prompt", {"prompt": workflow, "client_id": "bonsai-test"}))
    if not check("prompt_id" in queued and not queued.get("node_errors"), f"{name}: /prompt accepted the workflow ({queued})"):
        return {}
    deadline = started + timeout
    while time.monotonic() < deadline:
        entry = json.loads(http(f"{url}/history/{queued['prompt_id']}")).get(queued["prompt_id"])
        if entry and entry.get("status", {}).get("completed") is not None:
            status = entry["status"].get("status_str")
            check(status == "success", f"{name}: workflow ran: {status} in {time.monotonic() - started:.1f} s")
            return entry.get("outputs", {}) if status == "success" else {}
        time.sleep(1)
    check(False, f"{name}: did not finish within {timeout:.0f} s")
    return {}


def view(url: str, item: dict) -> bytes:
    return http(f"{url}/view?" + urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type")}))


def image(url: str, outputs: dict, node: str) -> np.ndarray | None:
    """The one image SaveImage node `node` wrote, as uint8 [H, W, 3]."""
    images = outputs.get(node, {}).get("images", [])
    return np.asarray(Image.open(io.BytesIO(view(url, images[0]))).convert("RGB")) if len(images) == 1 else None


def library_image(ckpt: str, prompt: str, negative: str, seed: int, steps: int, cfg: float, sampler: str, shift: float) -> np.ndarray | None:
    """The same image made by the bonsai library in this process, or None if bonsai is not importable."""
    try:
        from bonsai.pipeline import Pipeline
    except ImportError:
        return None
    gen = Pipeline.from_pretrained(ckpt, device="cpu").generate(
        prompt, negative_prompt=negative, seed=seed, steps=steps, cfg=cfg, sampler=sampler, shift=shift)
    # ComfyUI's SaveImage writes clip(255 * x) truncated to uint8, x in [0, 1]
    return np.clip(255.0 * (gen.samples[0].clamp(-1, 1).numpy() + 1) / 2, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def check_image(pixels: np.ndarray | None, name: str, check: Checks, save: Path | None) -> bool:
    if not check(pixels is not None and pixels.shape == (64, 64, 3), f"{name}: /view returned one 64x64 RGB PNG"):
        return False
    check(pixels.std() > 10, f"{name}: image is not blank (pixel std {pixels.std():.1f})")
    if save is not None:
        Image.fromarray(pixels).save(save.with_name(f"{save.stem}_{name}{save.suffix}"))
    return True


def test_pipeline(url: str, args: argparse.Namespace, check: Checks) -> None:
    wf = json.loads((WORKFLOWS / "bonsai_emoji_api.json").read_text())
    s = wf["2"]["inputs"]
    s["steps"] = args.steps or s["steps"]
    pixels = image(url, run_prompt(url, wf, "pipeline", args.run_timeout, check), "3")
    if check_image(pixels, "pipeline", check, args.save) and not args.no_compare:
        expected = library_image(wf["1"]["inputs"]["ckpt_name"], s["prompt"], s["negative_prompt"], s["seed"], s["steps"], s["cfg"], s["sampler"], s["shift"])
        if expected is not None:
            diff = np.abs(pixels.astype(int) - expected.astype(int))
            check(diff.mean() < 1.0 and diff.max() <= 8, f"pipeline: matches the library's image (mean |diff| {diff.mean():.3f}, max {diff.max()} levels)")


def model_workflow(steps: int) -> dict:
    wf = json.loads((WORKFLOWS / "bonsai_model_api.json").read_text())
    wf["5"]["inputs"]["steps"] = steps or wf["5"]["inputs"]["steps"]
    return wf


def test_model(url: str, args: argparse.Namespace, check: Checks) -> None:
    wf = model_workflow(args.steps)
    pixels = image(url, run_prompt(url, wf, "model", args.run_timeout, check), "7")
    if check_image(pixels, "model", check, args.save) and not args.no_compare:
        k = wf["5"]["inputs"]
        expected = library_image(wf["1"]["inputs"]["ckpt_name"], wf["2"]["inputs"]["text"], wf["3"]["inputs"]["text"],
                                 k["seed"], k["steps"], k["cfg"], k["sampler_name"], 1.0)
        if expected is not None:
            diff = np.abs(pixels.astype(int) - expected.astype(int))
            close = (diff <= 8).mean()
            check(diff.mean() < 3.0 and close > 0.95,
                  f"model: KSampler's image matches the library's (mean |diff| {diff.mean():.2f} levels, {close:.1%} of values within 8, max {diff.max()})")


def test_lora(url: str, args: argparse.Namespace, check: Checks) -> None:
    """Base MODEL, and the MODEL with the random LoRA at strength 0 and 1, sampled alike."""
    wf = model_workflow(args.lora_steps)
    for node, strength in (("10", 0.0), ("20", 1.0)):
        branch = str(int(node) + 1)
        wf[node] = {"class_type": "BonsaiModelLoRA", "inputs": {"model": ["1", 0], "lora_name": "style.safetensors", "strength": strength}}
        wf[branch] = {"class_type": "KSampler", "inputs": {**wf["5"]["inputs"], "model": [node, 0]}}
        wf[str(int(node) + 2)] = {"class_type": "VAEDecode", "inputs": {"samples": [branch, 0], "vae": ["1", 2]}}
        wf[str(int(node) + 3)] = {"class_type": "SaveImage", "inputs": {"images": [str(int(node) + 2), 0], "filename_prefix": f"lora_{strength:g}"}}
    outputs = run_prompt(url, wf, "lora", args.run_timeout, check)
    base, off, on = (image(url, outputs, n) for n in ("7", "13", "23"))
    if all(check_image(p, n, check, args.save) for p, n in ((base, "lora_base"), (off, "lora_0"), (on, "lora_1"))):
        check(np.array_equal(base, off), "lora: strength 0 gives the base image")
        change = np.abs(on.astype(int) - base.astype(int)).mean()
        check(change > 2.0, f"lora: strength 1 changes the image (mean |diff| {change:.1f} levels)")


def test_quantize(url: str, args: argparse.Namespace, check: Checks) -> None:
    """UNETLoader (random SD1.5 UNet) -> KSampler, and -> Bonsai quantize -> KSampler; both latents saved."""
    text = {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["2", 0]}}
    sampler = {"seed": 3, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "positive": ["3", 0],
               "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "random_sd15.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "random_clip_l.safetensors", "type": "stable_diffusion", "device": "default"}},
        "3": text,
        "4": {**text, "inputs": {**text["inputs"], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "BonsaiQuantizeModel", "inputs": {"model": ["1", 0], "scheme": "mean", "group_size": 0, "rank": 0, "convs": False, "keep_extra": ""}},
        "7": {"class_type": "KSampler", "inputs": {**sampler, "model": ["1", 0]}},
        "8": {"class_type": "KSampler", "inputs": {**sampler, "model": ["6", 0]}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "latents/float"}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "latents/onebit"}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["6", 1]}},
    }
    outputs = run_prompt(url, wf, "quantize", args.run_timeout, check)
    if not outputs:
        return
    report = outputs.get("11", {}).get("text", [""])[0]
    layers = int(report.split()[0]) if report[:1].isdigit() else 0
    check(layers > 0 and "bits/weight" in report, f"quantize: report: {report!r}")
    from safetensors.numpy import load

    latents = [load(view(url, outputs[n]["latents"][0]))["latent_tensor"] for n in ("9", "10") if outputs.get(n, {}).get("latents")]
    if check(len(latents) == 2 and all(a.shape == (1, 4, 8, 8) and np.isfinite(a).all() for a in latents),
             "quantize: KSampler ran on the float and the 1-bit MODEL (finite [1, 4, 8, 8] latents)"):
        check(not np.array_equal(*latents), f"quantize: 1-bit latents differ from float ones (max |diff| {np.abs(latents[0] - latents[1]).max():.4f})")


def prepare(base_dir: Path, args: argparse.Namespace) -> None:
    """custom_nodes/ with the pack, and models/ with the test models."""
    (base_dir / "custom_nodes").mkdir()
    (base_dir / "custom_nodes" / "comfyui_bonsai").symlink_to(PACK, target_is_directory=True)
    models = base_dir / "models"
    for folder in ("diffusion_models", "unet", "text_encoders", "loras"):
        (models / folder).mkdir(parents=True)
    (models / "diffusion_models" / "emoji-copy.safetensors").symlink_to(ROOT / "src" / "bonsai" / "weights" / "bonsai-emoji.safetensors")
    started = time.monotonic()
    for code, files in ((RANDOM_SD15, [models / "unet" / "random_sd15.safetensors", models / "text_encoders" / "random_clip_l.safetensors"]),
                        (RANDOM_LORA, [models / "loras" / "style.safetensors"])):
        subprocess.run([args.python, "-c", code, *map(str, files)], cwd=args.comfyui, check=True)
    print(f"test models written in {time.monotonic() - started:.1f} s", flush=True)


def run(args: argparse.Namespace) -> list[str]:
    check = Checks()
    with tempfile.TemporaryDirectory(prefix="comfy-base-") as tmp:
        base_dir = Path(tmp)
        prepare(base_dir, args)
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
            check(NODES <= info.keys(), f"/object_info lists the {len(NODES)} Bonsai nodes")
            check(all(info[n]["category"] == "Bonsai" for n in NODES & info.keys()), "category Bonsai")
            for loader in ("BonsaiCheckpointLoader", "BonsaiModelLoader"):
                if loader in info:
                    choices = info[loader]["input"]["required"]["ckpt_name"][0]
                    check({"bonsai-emoji", "emoji-copy.safetensors"} <= set(choices),
                          f"{loader} sees the built-in model and models/diffusion_models ({choices})")
            for name in args.only or ("pipeline", "model", "lora", "quantize"):
                TESTS[name](url, args, check)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
            text = (base_dir / "comfyui.log").read_text()
            for line in text.splitlines():
                if "Bonsai quantize" in line:
                    print("log: " + line.strip())
            if check.failures or args.verbose:
                print(text[-6000:])
    return check.failures


TESTS = {"pipeline": test_pipeline, "model": test_model, "lora": test_lora, "quantize": test_quantize}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", required=True, type=Path, help="a ComfyUI checkout (the folder with main.py)")
    p.add_argument("--python", default=sys.executable, help="the Python of ComfyUI's environment (bonsai installed there)")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--steps", type=int, default=0, help="override the example workflows' steps (0: keep)")
    p.add_argument("--lora-steps", type=int, default=8, help="steps of the three LoRA samplings")
    p.add_argument("--only", nargs="+", choices=sorted(TESTS), help="run only these workflows")
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--run-timeout", type=float, default=900)
    p.add_argument("--save", type=Path, help="also write the fetched PNGs as SAVE_<workflow>.png")
    p.add_argument("--no-compare", action="store_true", help="skip the comparisons with the library's own images")
    p.add_argument("--verbose", action="store_true", help="print the end of ComfyUI's log")
    args = p.parse_args()
    if not (args.comfyui / "main.py").is_file():
        raise SystemExit(f"{args.comfyui}: no main.py here; give the folder of a ComfyUI checkout")
    failures = run(args)
    print("ALL PASSED" if not failures else f"{len(failures)} FAILED")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
