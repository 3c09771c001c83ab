"""`bonsai serve` HTTP APIs in-process (FastAPI TestClient) with the tiny 1-bit model."""

from __future__ import annotations

import base64
import io
import json
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonsai.limits import HIRES_STRENGTH, IMG2IMG_STRENGTH

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from conftest import transparent_image, write_tiny_lora  # noqa: E402
from serve_support import Gate, loader, make_config  # noqa: E402

from bonsai.format import summarize  # noqa: E402
from bonsai.pipeline import InvalidRequest, Pipeline  # noqa: E402
from bonsai.serve.app import create_app  # noqa: E402
from bonsai.serve.db import JobDB  # noqa: E402
from bonsai.serve.spec import decode_image  # noqa: E402

FINAL = {"done", "failed", "cancelled", "interrupted"}


@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.open()


def open_app(tmp_path: Path, ckpt: Path, gate: Gate, **overrides) -> TestClient:
    return TestClient(create_app(make_config(tmp_path, ckpt, **overrides), loader(gate)))


@pytest.fixture
def client(tmp_path, tiny_checkpoint, gate):
    with open_app(tmp_path, tiny_checkpoint, gate) as c:
        yield c


def wait(client: TestClient, job_id: str, until=FINAL, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def wait_running(client: TestClient, gate: Gate, job_id: str) -> dict:
    assert gate.reached.wait(30)
    return wait(client, job_id, {"running"})


def usable(client: TestClient) -> list[str]:
    """Names of the usable models: the tiny one first, then the built-in model once its weights ship."""
    names = [m["name"] for m in client.get("/api/models").json()["models"] if m["status"] == "ok"]
    assert names[0] == "tiny"
    return names


def png_b64(size=(16, 16), color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def image_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def submit(client: TestClient, **body) -> str:
    r = client.post("/api/jobs", json={"prompt": "a red circle", **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_models_config_loras(client, tiny_checkpoint, tmp_path):
    doc = client.get("/api/models").json()
    tiny = next(m for m in doc["models"] if m["name"] == "tiny")
    expected = summarize(tiny_checkpoint)
    assert doc["default"] == "tiny"
    assert tiny["status"] == "ok"
    assert tiny["file_bytes"] == tiny_checkpoint.stat().st_size
    assert tiny["bits_per_weight"] == pytest.approx(expected["bits_per_weight"])
    assert tiny["bits_per_weight_1bit"] == pytest.approx(expected["bits_per_weight_1bit"])
    assert tiny["defaults"] == {"steps": 2, "cfg": 3.0, "width": 16, "height": 16, "sampler": "euler"}
    assert "bonsai-emoji" in [m["name"] for m in doc["models"]]
    config = client.get("/api/config").json()
    assert config["size_presets"] == ["512x512", "768x512", "512x768", "1024x1024"]
    assert config["defaults"] == {"strength": IMG2IMG_STRENGTH, "hires_strength": HIRES_STRENGTH}
    assert client.get("/api/loras").json()["loras"] == []
    (tmp_path / "home" / "loras").mkdir(parents=True)
    (tmp_path / "home" / "loras" / "style.safetensors").write_bytes(b"x")
    loras = client.get("/api/loras").json()
    assert loras == {"loras": ["style"], "folder": str(tmp_path / "home" / "loras")}
    assert "/api/jobs" in client.get("/openapi.json").json()["paths"]
    assert client.get("/api/health").json()["ok"] is True


def test_api_docs_pages_load_their_scripts_from_this_server(client):
    # /docs loaded Swagger UI from a CDN: offline, the page stayed blank.
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert {a.rsplit(".", 1)[-1] for a in assets} >= {"js", "css"}, assets
    for url in assets:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert "url: '/openapi.json'" in r.text
    assert client.get("/redoc").status_code == 404  # ReDoc fetches its logo from the web


def test_generate_matches_pipeline_and_embeds_parameters(client, tiny_checkpoint):
    job = wait(client, submit(client, seed=7, batch=2, negative_prompt="blue"))
    assert job["status"] == "done", job
    assert len(job["images"]) == 2 and len(job["parameters"]) == 2
    pipe = Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    expected = pipe.generate("a red circle", batch=2, seed=7, negative_prompt="blue")
    for n, url in enumerate(job["images"]):
        r = client.get(url)
        assert r.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(r.content))
        assert image.info["parameters"] == job["parameters"][n] == expected.params[n].to_a1111()
        assert f"Seed: {7 + n}" in image.info["parameters"]
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected.images[n]))
    r = client.get(job["images"][1] + "?download=1")
    assert r.headers["content-disposition"].startswith("attachment")


def _pixels_and_parameters(client: TestClient, job_id: str) -> tuple[np.ndarray, str]:
    job = wait(client, job_id)
    assert job["status"] == "done", job
    image = Image.open(io.BytesIO(client.get(job["images"][0]).content))
    return np.asarray(image), image.info["parameters"]


def test_loras_apply_from_the_lora_folder_only(client, tiny_checkpoint, tmp_path):
    folder = tmp_path / "home" / "loras"
    folder.mkdir(parents=True)
    write_tiny_lora(tiny_checkpoint, folder / "style.safetensors")
    plain, _ = _pixels_and_parameters(client, submit(client, seed=3))
    by_field, parameters = _pixels_and_parameters(client, submit(client, seed=3, loras=[{"name": "style", "weight": 1}]))
    by_tag, _ = _pixels_and_parameters(client, submit(client, seed=3, prompt="a red circle <lora:style:1>"))
    assert np.abs(by_field.astype(int) - plain).max() > 0
    np.testing.assert_array_equal(by_field, by_tag)
    assert parameters.startswith("a red circle <lora:style:1>\n")  # the image says how to make it again
    np.testing.assert_array_equal(_pixels_and_parameters(client, submit(client, seed=3))[0], plain)  # off again
    # A prompt comes from a client: its tags name files of the LoRA folder, never paths on the server.
    outside = tmp_path / "outside.safetensors"
    write_tiny_lora(tiny_checkpoint, outside)
    for tag in [f"<lora:{outside}:1>", f"<lora:{outside.with_suffix('')}:1>", "<lora:../outside:1>", "<lora:gone:1>"]:
        r = client.post("/api/jobs", json={"prompt": f"a red circle {tag}"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "prompt", (tag, r.text)


def test_jobs_keep_what_the_generation_warned_of(client, tiny_checkpoint, tmp_path):
    folder = tmp_path / "home" / "loras"
    folder.mkdir(parents=True)
    write_tiny_lora(tiny_checkpoint, folder / "ink.safetensors", seed=6)
    assert wait(client, submit(client, seed=3))["warnings"] == []
    long = " ".join(f"w{i}" for i in range(20))  # 40 word pieces: the tiny model reads 30
    job = wait(client, submit(client, seed=3, prompt=f"{long} <lora:ink:1e38>"))
    assert job["status"] == "done" and len(job["images"]) == 1, job  # the images are still there
    assert job["warnings"] == [
        "the prompt is longer than the 32 tokens tiny-test reads: 'w15 w16 w17 w18 w19' is ignored",
        "the image of seed 3 came out with NaN or infinite pixels, drawn black: the LoRAs' weights may be too "
        "strong (ink:1e+38): lower them",
    ]
    assert client.get("/api/jobs").json()["jobs"][0]["warnings"] == job["warnings"]  # in the history too
    r = client.post("/sdapi/v1/txt2img", json={"prompt": long, "seed": 3})
    assert json.loads(r.json()["info"])["warnings"] == job["warnings"][:1]


def test_a_history_from_before_warnings_opens_with_none(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, source TEXT NOT NULL, "
        "status TEXT NOT NULL, spec TEXT NOT NULL, params TEXT NOT NULL DEFAULT '[]', images INTEGER NOT NULL "
        "DEFAULT 0, error TEXT, created REAL NOT NULL, started REAL, finished REAL);"
        "INSERT INTO jobs (id, source, status, spec, params, images, created) "
        "VALUES ('a', 'api', 'done', '{}', '[\"p\"]', 1, 1.0);")
    old.close()
    db = JobDB(path)
    assert db.get("a").warnings == [] and db.get("a").params == ["p"]
    db.insert("b", "api", {}, 2.0)
    db.finished("b", "done", 3.0, ["q"], warnings=["w"])
    assert db.get("b").warnings == ["w"]
    db.close()


def test_history_newest_first_with_cursor(client):
    ids = [submit(client, seed=i) for i in range(3)]
    for job_id in ids:
        wait(client, job_id)
    page = client.get("/api/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    rest = client.get("/api/jobs", params={"limit": 2, "before": page["next"]}).json()
    assert [j["id"] for j in rest["jobs"]] == [ids[0]] and rest["next"] is None
    assert client.get("/api/jobs", params={"status": "failed"}).json()["jobs"] == []


def test_img2img_and_hires(client):
    job = wait(client, submit(client, init_image=png_b64((40, 24)), strength=0.5, steps=4, seed=3))
    assert job["status"] == "done", job
    assert "Denoising strength: 0.5" in job["parameters"][0]
    job = wait(client, submit(client, hires={"scale": 2, "strength": 0.6}, seed=3))
    assert job["status"] == "done", job
    image = Image.open(io.BytesIO(client.get(job["images"][0]).content))
    assert image.size == (32, 32)
    assert "Hires upscale: 2, Hires upscaler: lanczos, First pass size: 16x16" in image.info["parameters"]


def test_a_transparent_init_image_is_taken_over_white(client):
    # Its transparent pixels hold black; convert("RGB") made them the job's black background.
    for i, mode in enumerate(["RGBA", "LA", "P"]):
        image, reference = transparent_image(mode, seed=100 + i)
        decoded = np.asarray(decode_image(image_b64(image), "init_image", 1 << 20), dtype=np.float64)
        assert np.abs(decoded - reference).max() <= 1, mode
    image, reference = transparent_image("RGBA", seed=7, partial=False)
    on_white = Image.fromarray(reference.astype(np.uint8))
    jobs = [wait(client, submit(client, init_image=image_b64(im), strength=0.5, steps=4, seed=3)) for im in (image, on_white)]
    got, want = (np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]).content))) for job in jobs)
    assert np.array_equal(got, want)


def sideways_photo() -> tuple[bytes, np.ndarray]:
    """A 6x4 PNG whose EXIF says "turn me 90 degrees clockwise" (orientation 6, as phones write), and the
    upright 4x6 pixels it shows."""
    pixels = np.random.default_rng(3).integers(0, 255, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", exif=exif)
    return buf.getvalue(), np.rot90(pixels, k=-1)


def test_an_init_image_is_turned_upright_as_its_exif_says(tmp_path):
    from bonsai.cli_generate import _open_image

    data, upright = sideways_photo()
    np.testing.assert_array_equal(np.asarray(decode_image(base64.b64encode(data).decode(), "init_image", 1 << 20)), upright)
    (tmp_path / "photo.png").write_bytes(data)
    np.testing.assert_array_equal(np.asarray(_open_image(tmp_path / "photo.png")), upright)


def test_strength_that_leaves_no_step_is_refused_up_front(client, tiny_checkpoint):
    # The pipeline refused it only in the worker (with hires, after the whole first pass); the server
    # now answers 422 by the pipeline's own rule. tiny's 2 steps run at t = 1, 0.5, 0.
    pipe = Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    accepted = 0
    for strength in (0.49, 0.5):
        try:
            pipe.generate("a cat", init_images=[Image.new("RGB", (16, 16))], strength=strength, steps=2, seed=0)
            runs = True
        except InvalidRequest:
            runs = False
        assert runs == (strength >= 0.5)
        for body, field in [
            ({"init_image": png_b64(), "strength": strength, "steps": 2}, "strength"),
            ({"hires": {"strength": strength, "steps": 2}}, "hires.strength"),
            ({"hires": {"strength": strength}, "steps": 2}, "hires.strength"),  # hires steps default to the first pass's
        ]:
            r = client.post("/api/jobs", json={"prompt": "a cat", **body})
            if runs:
                assert r.status_code == 202, r.text
                accepted += 1
            else:
                assert (r.status_code, r.json()["error"]["field"]) == (422, field), r.text
                steps = field.replace("strength", "steps")
                assert r.json()["error"]["message"] == f"{field} 0.49 leaves no step to run with {steps} 2: raise {steps} or {field}"
    assert len(client.get("/api/jobs").json()["jobs"]) == accepted


LONG = "x" * 2001


@pytest.mark.parametrize(
    "body, field",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 100000}, "steps"),
        ({"width": 18}, "width"),
        ({"width": 0}, "width"),
        ({"height": 0}, "height"),
        ({"height": 99992}, "height"),
        ({"prompt": LONG}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"negative_prompt": LONG}, "negative_prompt"),
        ({"model": "../../etc/passwd"}, "model"),
        ({"model": "bonsai-emoji-nope"}, "model"),
        ({"batch": 0}, "batch"),
        ({"batch": 9}, "batch"),
        ({"cfg": -1}, "cfg"),
        ({"sampler": "ddim"}, "sampler"),
        ({"seed": -5}, "seed"),
        ({"seed": 2**32 - 1, "batch": 2}, "seed"),
        ({"strength": 0.5}, "strength"),
        ({"init_image": "not base64!"}, "init_image"),
        ({"init_image": base64.b64encode(b"GIF89a nope").decode()}, "init_image"),
        ({"init_image": png_b64(), "strength": 1.5}, "strength"),
        ({"hires": {"scale": 8}}, "hires.scale"),
        ({"hires": {"upscaler": "esrgan"}}, "hires.upscaler"),
        ({"hires": {"strength": 0}}, "hires.strength"),
        ({"loras": [{"name": "missing"}]}, "loras.0.name"),
        ({"colour": "red"}, "colour"),
        ({"steps": "many"}, "steps"),
    ],
)
def test_invalid_fields_are_named(client, body, field):
    r = client.post("/api/jobs", json={"prompt": "a cat", **body})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field, r.json()
    assert client.get("/api/jobs").json()["jobs"] == []  # nothing was queued


def test_sizes_are_limited_by_the_model(client):
    # 1024x1024 (an OpenAI client's default) on a 64x64 model ran for minutes a step and held the queue.
    reason = "tiny draws up to 64 px per side (4x its native 16)"
    for path, body, field in [
        ("/api/jobs", {"width": 128}, "width"),
        ("/api/jobs", {"height": 72}, "height"),
        ("/api/jobs", {"width": 32, "hires": {"scale": 4}}, "hires.scale"),
        ("/v1/images/generations", {"size": "1024x1024"}, "size"),
        ("/sdapi/v1/txt2img", {"width": 1024, "height": 1024}, "width"),
        ("/sdapi/v1/txt2img", {"width": 32, "enable_hr": True, "hr_scale": 4}, "hr_scale"),
    ]:
        r = client.post(path, json={"prompt": "a cat", **body})
        assert (r.status_code, r.json()["error"]["field"]) == (422, field), (path, r.text)
        assert reason in r.json()["error"]["message"], r.text
    assert client.get("/api/jobs").json()["jobs"] == []
    tiny = next(m for m in client.get("/api/models").json()["models"] if m["name"] == "tiny")
    assert tiny["max_side"] == 64  # the web UI offers no larger preset
    wide = wait(client, submit(client, width=64, height=16))
    assert (wide["status"], wide["spec"]["width"]) == ("done", 64), wide
    hires = wait(client, submit(client, hires={"scale": 4}))  # the native size at the largest hires scale
    assert (hires["status"], hires["spec"]["hires"]["width"]) == ("done", 64), hires


def test_server_limits_still_apply(tmp_path, tiny_checkpoint, gate):
    with open_app(tmp_path, tiny_checkpoint, gate, max_side=32, max_pixels=2 * 32 * 32) as c:
        r = c.post("/api/jobs", json={"prompt": "a cat", "width": 48})
        assert (r.status_code, r.json()["error"]["field"]) == (422, "width")
        assert "this server draws up to 32 px per side" in r.json()["error"]["message"]
        r = c.post("/api/jobs", json={"prompt": "a cat", "hires": {"scale": 3}})
        assert (r.status_code, r.json()["error"]["field"]) == (422, "hires.scale")
        r = c.post("/api/jobs", json={"prompt": "a cat", "batch": 3, "width": 32, "height": 32})
        assert (r.status_code, r.json()["error"]["field"]) == (422, "batch")


def test_missing_prompt_and_bad_json(client):
    r = client.post("/api/jobs", json={})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "prompt")
    r = client.post("/api/jobs", content=b'{"prompt": "x",}', headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "body")
    message = r.json()["error"]["message"]
    assert message.startswith("body is not valid JSON") and "at character 15" in message


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_text_that_is_not_utf8_is_refused(client, field):
    # A lone surrogate is valid JSON but not UTF-8: stored, it would break every history listing.
    body = json.dumps({"prompt": "a cat", field: "a \ud800 cat"})  # json.dumps escapes it as \ud800
    r = client.post("/api/jobs", content=body, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["field"]) == (422, field), r.text
    assert client.get("/api/jobs").json()["jobs"] == []


def test_base64_with_line_breaks_is_accepted(client):
    wrapped = base64.encodebytes(base64.b64decode(png_b64((40, 24))))  # MIME style: a newline every 76 characters
    assert b"\n" in wrapped.strip()
    job = wait(client, submit(client, init_image=wrapped.decode(), strength=0.5, steps=4))
    assert job["status"] == "done", job


def test_body_limit(tmp_path, tiny_checkpoint, gate):
    with open_app(tmp_path, tiny_checkpoint, gate, max_body_bytes=2000) as c:
        r = c.post("/api/jobs", json={"prompt": "a cat", "init_image": "A" * 4000})
        assert (r.status_code, r.json()["error"]["field"]) == (413, "body")

        def chunks():
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        r = c.post("/api/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/api/jobs", json={"prompt": "a cat"}).status_code == 202


@pytest.mark.parametrize("length", ["ten", "-5", "1e3", ""])
def test_content_length_that_is_not_a_number_is_a_bad_request(client, length):
    # It was answered 413, as though the body were too large.
    r = client.post("/api/jobs", content=b'{"prompt": "a cat"}', headers={"content-type": "application/json", "content-length": length})
    err = r.json()["error"]
    assert (r.status_code, err["field"]) == (400, "content-length"), r.text
    assert err["message"] == f"Content-Length {length!r} is not a number of bytes", r.text
    assert client.get("/api/jobs").json()["jobs"] == []


def test_upload_pixel_limit(tmp_path, tiny_checkpoint, gate):
    with open_app(tmp_path, tiny_checkpoint, gate, max_upload_pixels=100) as c:
        r = c.post("/api/jobs", json={"prompt": "a cat", "init_image": png_b64((11, 10))})
        assert (r.status_code, r.json()["error"]["field"]) == (422, "init_image")


def test_file_routes_take_ids_only(client, tmp_path):
    job_id = submit(client)
    wait(client, job_id)
    (tmp_path / "secret.txt").write_text("contents that must not leak")
    for path in [
        f"/api/jobs/{job_id}/images/1",
        f"/api/jobs/{job_id}/images/-1",
        "/api/jobs/..%2F..%2Fsecret.txt/images/0",
        "/api/jobs/../../secret.txt",
        f"/api/jobs/{job_id[:-1]}G/images/0",
        f"/api/jobs/{'0' * 32}/images/0",
        "/static/../serve/jobs.sqlite3",
        "/static/%2e%2e/%2e%2e/secret.txt",
    ]:
        r = client.get(path)
        assert r.status_code in (404, 422), (path, r.status_code)
        assert b"must not leak" not in r.content and b"SQLite" not in r.content  # an error may name the path it was asked
    assert client.get(f"/api/jobs/{job_id}/images/0").status_code == 200


def test_cancel_running_and_queued(client, gate):
    gate.close()
    running = submit(client, steps=3)
    job = wait_running(client, gate, running)
    assert job["progress"]["step"] == 1 and job["progress"]["total"] == 3
    preview = client.get(job["preview"])
    assert preview.status_code == 200 and Image.open(io.BytesIO(preview.content)).size == (16, 16)
    queued = submit(client)
    assert client.get(f"/api/jobs/{queued}").json()["position"] == 0
    assert client.post(f"/api/jobs/{queued}/cancel").json()["status"] == "cancelled"
    assert client.post(f"/api/jobs/{running}/cancel").status_code == 200
    gate.open()
    job = wait(client, running)
    assert job["status"] == "cancelled" and job["images"] == []
    assert wait(client, queued)["status"] == "cancelled"
    assert client.post(f"/api/jobs/{running}/cancel").status_code == 409
    assert wait(client, submit(client))["status"] == "done"  # the worker lives on


def test_fifo_order_and_full_queue(tmp_path, tiny_checkpoint, gate):
    with open_app(tmp_path, tiny_checkpoint, gate, max_queue=3) as c:
        gate.close()
        first = submit(c)
        wait_running(c, gate, first)
        waiting = [submit(c, seed=i) for i in range(3)]
        assert [c.get(f"/api/jobs/{j}").json()["position"] for j in waiting] == [0, 1, 2]
        r = c.post("/api/jobs", json={"prompt": "one too many"})
        assert r.status_code == 429 and r.headers["retry-after"] == "5"
        gate.open()
        jobs = [wait(c, j) for j in [first, *waiting]]
        assert all(j["status"] == "done" for j in jobs)
        starts = [j["started"] for j in jobs]
        assert starts == sorted(starts)


def test_restart_keeps_history_and_reports_interrupted(tmp_path, tiny_checkpoint, gate):
    with open_app(tmp_path, tiny_checkpoint, gate) as c:
        done = wait(c, submit(c, seed=11))
        png = c.get(done["images"][0]).content
        gate.close()
        stopped = submit(c)
        wait_running(c, gate, stopped)
        gate.open()  # shutdown cancels the running job after its current step
    # A crash leaves rows queued or running; simulate one.
    db = JobDB(tmp_path / "serve" / "jobs.sqlite3")
    db.insert("f" * 32, "api", {"prompt": "lost"}, time.time())
    db.close()
    with open_app(tmp_path, tiny_checkpoint, gate) as c:
        assert c.get(done["images"][0]).content == png
        assert c.get(f"/api/jobs/{done['id']}").json()["status"] == "done"
        for job_id in (stopped, "f" * 32):
            job = c.get(f"/api/jobs/{job_id}").json()
            assert job["status"] == "interrupted" and "server stopped" in job["error"], job
        assert wait(c, submit(c))["status"] == "done"


def test_token_auth(tmp_path, tiny_checkpoint, gate):
    with open_app(tmp_path, tiny_checkpoint, gate, token="s3cret") as c:
        assert c.get("/api/models").status_code == 401
        assert c.get("/openapi.json").status_code == 401
        assert c.get("/api/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        basic = base64.b64encode(b"user:s3cret").decode()
        assert c.get("/sdapi/v1/sd-models", headers={"authorization": f"Basic {basic}"}).status_code == 200
        assert c.get("/api/models", params={"token": "s3cret"}).status_code == 200
        r = c.get("/", params={"token": "s3cret"}, follow_redirects=False)
        assert r.status_code == 303 and "bonsai_token=s3cret" in r.headers["set-cookie"]
        assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=strict" in r.headers["set-cookie"]
        c.cookies.set("bonsai_token", "s3cret")
        assert c.get("/api/models").status_code == 200
        # The cookie of an old token (the server restarted with a new one) does not lock the browser out:
        # opening /?token=NEW works and replaces it.
        c.cookies.clear()
        c.cookies.set("bonsai_token", "old")
        assert c.get("/api/models").status_code == 401
        r = c.get("/", params={"token": "s3cret"}, follow_redirects=False)
        assert r.status_code == 303 and "bonsai_token=s3cret" in r.headers["set-cookie"]


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def test_a_browser_without_the_token_gets_a_page_that_says_how_to_open_it(tmp_path, tiny_checkpoint, gate):
    # Opening / without the token showed the browser raw 401 JSON.
    with open_app(tmp_path, tiny_checkpoint, gate, token="s3cret") as c:
        for path in ("/", "/docs"):
            r = c.get(path, headers={"accept": BROWSER_ACCEPT})
            assert (r.status_code, r.headers["content-type"]) == (401, "text/html; charset=utf-8"), path
            assert "/?token=TOKEN" in r.text and r.headers["www-authenticate"] == 'Bearer realm="bonsai"'
        # API clients keep the JSON error, whatever they accept.
        for path in ("/", "/api/models", "/sdapi/v1/sd-models", "/v1/models"):
            headers = {} if path == "/" else {"accept": BROWSER_ACCEPT}
            r = c.get(path, headers=headers)
            assert (r.status_code, r.json()["error"]["field"]) == (401, "token"), path
            assert r.headers["www-authenticate"] == 'Bearer realm="bonsai"'


def test_any_page_opened_with_the_token_keeps_it_in_a_cookie(tmp_path, tiny_checkpoint, gate):
    # A bookmarked /docs?token=T loaded, but its fetch of /openapi.json got 401 until /?token=T had set the cookie.
    with open_app(tmp_path, tiny_checkpoint, gate, token="s3cret") as c:
        r = c.get("/docs", params={"token": "wrong"})
        assert r.status_code == 401 and "set-cookie" not in r.headers
        assert c.get("/openapi.json").status_code == 401
        index_cookie = c.get("/", params={"token": "s3cret"}, follow_redirects=False).headers["set-cookie"]
        c.cookies.clear()
        r = c.get("/docs", params={"token": "s3cret"})
        assert r.status_code == 200 and r.headers["set-cookie"] == index_cookie
        assert c.get("/openapi.json").status_code == 200  # no token in the request: the cookie carries it
        assert c.get("/api/models", headers={"authorization": "Bearer s3cret"}).headers.get("set-cookie") is None


REBOUND = {"host": "evil.example:7860", "origin": "http://evil.example:7860"}


def host_refusal(r) -> str:
    """The message of a 400 from the Host check (fails on any other answer)."""
    assert (r.status_code, r.json()["error"]["field"]) == (400, "host"), r.text
    return r.json()["error"]["message"]


def test_a_page_whose_name_is_pointed_at_this_machine_is_refused(client):
    # DNS rebinding: a page at http://evil.example:7860 whose name now resolves to 127.0.0.1 is, to the browser,
    # of the server's own origin (Origin and Host agree), so it may read the answers and its POSTs pass the
    # cross-origin guard. Only the name in Host gives it away.
    job = wait(client, submit(client, steps=1))
    for path in ("/", "/api/jobs", f"/api/jobs/{job['id']}", job["images"][0], "/sdapi/v1/options", "/openapi.json"):
        message = host_refusal(client.get(path, headers=REBOUND))
        assert "'evil.example'" in message and "DNS rebinding" in message and "--allowed-host evil.example" in message
    for route in ("/api/jobs", "/sdapi/v1/txt2img", "/v1/images/generations", "/sdapi/v1/interrupt"):
        host_refusal(client.post(route, json={"prompt": "forged", "steps": 1}, headers=REBOUND))
    assert [j["id"] for j in client.get("/api/jobs").json()["jobs"]] == [job["id"]]  # nothing was queued


@pytest.mark.parametrize(
    "host",
    [
        "localhost:7860", "LocalHost", "127.0.0.1:7860", "127.0.0.1", "127.8.9.10:7860", "[::1]:7860", "[::1]",
        "192.168.1.5:7860", "[fe80::1]:7860", "0.0.0.0:7860",  # no DNS name in them, nothing to re-point
    ],
)
def test_localhost_and_ip_addresses_pass(client, host):
    assert client.get("/api/jobs", headers={"host": host}).status_code == 200
    r = client.post("/sdapi/v1/interrupt", headers={"host": host, "origin": f"http://{host.lower()}"})
    assert r.json() == {"interrupted": False}, r.text


@pytest.mark.parametrize(
    "host",
    ["evil.example", "app.localhost:7860", "localhost.:7860", "localhost.evil.example", "127.0.0.1.evil.example:7860", "testserver.evil.example"],
)
def test_other_names_are_refused(client, host):
    assert f"--allowed-host {host.partition(':')[0]}" in host_refusal(client.get("/api/jobs", headers={"host": host}))


@pytest.mark.parametrize("host", ["a b", "evil.example:port", "::1", "::1:7860", "[zz]:7860", "[::1]x", "user@127.0.0.1"])
def test_a_host_header_that_is_not_host_and_port_is_refused(client, host):
    assert "is not host[:port]" in host_refusal(client.get("/api/jobs", headers={"host": host}))


def test_allowed_hosts_add_names(tmp_path, tiny_checkpoint, gate):
    allowed = ("testserver", "Bonsai.LAN", "*.Example.org")
    with open_app(tmp_path, tiny_checkpoint, gate, allowed_hosts=allowed) as c:
        for host in ("bonsai.lan:7860", "BONSAI.lan", "a.example.org", "b.a.example.org:443", "127.0.0.1:7860", "localhost"):
            assert c.get("/api/jobs", headers={"host": host}).status_code == 200, host
        for host in ("example.org", "evil.example", "bonsai.lan.evil.example", "aexample.org"):
            host_refusal(c.get("/api/jobs", headers={"host": host}))
    with open_app(tmp_path, tiny_checkpoint, gate, allowed_hosts=("*",)) as c:
        assert c.get("/api/jobs", headers=REBOUND).status_code == 200
    for value, reason in [("bonsai.lan:7860", "has a port"), ("http://bonsai.lan", "without scheme"), ("bon*sai", "not a host name")]:
        with pytest.raises(ValueError, match=reason):
            open_app(tmp_path, tiny_checkpoint, gate, allowed_hosts=(value,))


def test_a_server_bound_to_another_address_accepts_any_name_unless_told(tmp_path, tiny_checkpoint, gate):
    # On a LAN, clients use the machine's names, which the server cannot know.
    with open_app(tmp_path, tiny_checkpoint, gate, host="0.0.0.0", allowed_hosts=()) as c:
        assert c.get("/api/jobs", headers=REBOUND).status_code == 200
    with open_app(tmp_path, tiny_checkpoint, gate, host="0.0.0.0", allowed_hosts=("bonsai.lan",)) as c:
        host_refusal(c.get("/api/jobs", headers=REBOUND))
        for host in ("bonsai.lan:7860", "192.168.1.5:7860", "localhost:7860"):
            assert c.get("/api/jobs", headers={"host": host}).status_code == 200, host


def test_a1111_endpoints(client, gate):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == usable(client)
    body = {"prompt": "cat", "seed": 5, "batch_size": 1, "n_iter": 2, "sampler_name": "Euler a", "steps": 3}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert len(doc["images"]) == 2
    info = json.loads(doc["info"])
    assert info["all_seeds"] == [5, 6] and info["steps"] == 3 and info["sd_model_name"] == "tiny"
    first = Image.open(io.BytesIO(base64.b64decode(doc["images"][0])))
    assert first.size == (16, 16) and "Seed: 5" in first.info["parameters"]
    r = client.post("/sdapi/v1/img2img", json={"prompt": "cat", "init_images": [png_b64()], "denoising_strength": 0.5, "steps": 4})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "cat", "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent"})
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (32, 32)
    for body, field in [
        ({"cfg_scale": 99}, "cfg_scale"), ({"batch_size": 5, "n_iter": 2}, "batch_size"), ({"sampler_name": "DDIM"}, "sampler_name"),
        ({"override_settings": {"sd_model_checkpoint": "sdxl"}}, "override_settings.sd_model_checkpoint"),
        ({"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, "hr_upscaler"),
        ({"enable_hr": True, "hr_scale": 1}, "hr_scale"), ({"enable_hr": True, "denoising_strength": 2}, "denoising_strength"),
        ({"override_settings": {"sd_model_checkpoint": 5}}, "override_settings.sd_model_checkpoint"),
        ({"batch_size": -1, "n_iter": -1}, "batch_size"), ({"width": 0}, "width"),
    ]:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "cat", **body})
        assert (r.status_code, r.json()["error"]["field"]) == (422, field), r.text
    assert client.post("/sdapi/v1/img2img", json={"prompt": "cat"}).json()["error"]["field"] == "init_images"
    assert client.get("/sdapi/v1/options").json() == {"sd_model_checkpoint": "tiny"}
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 422
    assert [s["aliases"][0] for s in client.get("/sdapi/v1/samplers").json()] == ["euler", "heun", "dpmpp_2m"]

    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["current_image"] is None
    gate.close()
    job_id = submit(client, steps=4)
    wait_running(client, gate, job_id)
    busy = client.get("/sdapi/v1/progress").json()
    assert busy["state"]["job"] == job_id and busy["state"]["sampling_step"] == 1 and busy["state"]["sampling_steps"] == 4
    assert busy["progress"] == pytest.approx(0.25)
    assert Image.open(io.BytesIO(base64.b64decode(busy["current_image"]))).size == (16, 16)
    assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": True}
    gate.open()
    assert wait(client, job_id)["status"] == "cancelled"


def test_a1111_call_interrupted_answers_without_images(client, gate):
    # It answered 409: A1111 answers an interrupted txt2img with what it has, and its clients treat errors as failures.
    gate.close()
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.post, "/sdapi/v1/txt2img", json={"prompt": "cat", "steps": 4})
        assert gate.reached.wait(30)
        assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": True}
        gate.open()
        r = call.result(timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["images"] == [] and json.loads(body["info"])["interrupted"] is True
    assert client.get(f"/api/jobs/{json.loads(body['info'])['job_id']}").json()["status"] == "cancelled"


def test_a1111_errors_name_a1111_fields(client):
    # The 422's field was translated, but its message still named the native field the client never sent.
    for path, body, field, message in [
        ("txt2img", {"cfg_scale": 99}, "cfg_scale", "cfg_scale must be between 0 and 50, got 99"),
        ("txt2img", {"batch_size": 5, "n_iter": 2}, "batch_size", "batch_size * n_iter must be between 1 and 8, got 10"),
        ("img2img", {"init_images": ["not base64!"]}, "init_images", "init_images is not valid base64"),
        (
            "img2img", {"init_images": [png_b64()], "denoising_strength": 0.4, "steps": 2}, "denoising_strength",
            "denoising_strength 0.4 leaves no step to run with steps 2: raise steps or denoising_strength",
        ),
        (
            "txt2img", {"enable_hr": True, "denoising_strength": 0.4, "hr_second_pass_steps": 2}, "denoising_strength",
            "denoising_strength 0.4 leaves no step to run with hr_second_pass_steps 2: raise hr_second_pass_steps or denoising_strength",
        ),
    ]:
        r = client.post(f"/sdapi/v1/{path}", json={"prompt": "cat", **body})
        assert (r.status_code, r.json()["error"]["field"], r.json()["error"]["message"]) == (422, field, message), r.text
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "cat", "width": 32, "enable_hr": True, "hr_scale": 4})
    assert r.json()["error"]["message"].startswith("hr_scale 4 turns 32x16 into 128x64, but tiny draws up to 64 px"), r.text
    # The native API keeps its own names.
    for body, message in [
        ({"cfg": 99}, "cfg must be between 0 and 50, got 99"), ({"batch": 9}, "batch must be between 1 and 8, got 9"),
        ({"init_image": "not base64!"}, "init_image is not valid base64"),
    ]:
        r = client.post("/api/jobs", json={"prompt": "cat", **body})
        assert r.json()["error"]["message"] == message, r.text


def test_openai_endpoint(client):
    r = client.post("/v1/images/generations", json={"prompt": "cat", "n": 2, "size": "32x16", "quality": "hd", "user": "u"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).size for d in data] == [(32, 16), (32, 16)]
    r = client.post("/v1/images/generations", json={"prompt": "cat", "response_format": "url"})
    url = r.json()["data"][0]["url"]
    assert url.startswith("http://testserver/api/jobs/") and client.get(url).status_code == 200
    cases = [
        ({"size": "1002x1000"}, "size"), ({"size": "4096x4096"}, "size"), ({"size": "big"}, "size"), ({"size": "0x0"}, "size"),
        ({"n": 20}, "n"),
    ]
    for body, field in [*cases, ({"model": "dall-e-3"}, "model")]:
        r = client.post("/v1/images/generations", json={"prompt": "cat", **body})
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["type"]) == (422, field, "invalid_request_error"), r.text
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == usable(client)


def test_openai_errors_name_openai_fields(tmp_path, tiny_checkpoint, gate):
    # The 422's param was size or n, but its message named width, height or batch, which an OpenAI request has not.
    limit = "use a multiple of 4 between 4 and 64; tiny draws up to 64 px per side (4x its native 16)"
    with open_app(tmp_path, tiny_checkpoint, gate, max_pixels=2 * 64 * 64) as c:
        for body, field, message in [
            ({"size": "1002x64"}, "size", f"size's width 1002 is not allowed: {limit}"),
            ({"size": "64x72"}, "size", f"size's height 72 is not allowed: {limit}"),
            ({"n": 20}, "n", "n must be between 1 and 8, got 20"),
            ({"n": 3, "size": "64x64"}, "n", "n 3 of 64x64 exceeds this server's 8192 pixels per job; lower n or size"),
            ({"size": "big"}, "size", "size 'big' is not WIDTHxHEIGHT, e.g. 512x512"),
        ]:
            r = c.post("/v1/images/generations", json={"prompt": "cat", **body})
            assert (r.status_code, r.json()["error"]["param"], r.json()["error"]["message"]) == (422, field, message), r.text
        # The native API keeps its own names.
        for body, message in [
            ({"width": 1002}, f"width 1002 is not allowed: {limit}"),
            ({"batch": 3, "width": 64, "height": 64}, "batch 3 of 64x64 exceeds this server's 8192 pixels per job; lower batch or size"),
        ]:
            r = c.post("/api/jobs", json={"prompt": "cat", **body})
            assert r.json()["error"]["message"] == message, r.text


def test_null_fields_take_their_defaults_in_compatible_apis(client):
    # A1111 declares every field Optional and OpenAI marks n, size and response_format nullable: clients
    # send null for "unset" (Python None), which was refused as "Input should be a valid integer".
    nulls = {k: None for k in (
        "seed", "batch_size", "n_iter", "enable_hr", "hr_scale", "hr_second_pass_steps", "override_settings", "sampler_name", "negative_prompt",
    )}
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "cat", "steps": 2, **nulls})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1 and json.loads(r.json()["info"])["sd_model_name"] == "tiny"
    r = client.post("/sdapi/v1/img2img", json={"prompt": "cat", "steps": 4, "init_images": [png_b64()], "mask": None, **nulls})
    assert r.status_code == 200, r.text
    r = client.post("/v1/images/generations", json={"prompt": "cat", "steps": 2, **dict.fromkeys(("n", "size", "response_format", "model", "seed"))})
    assert r.status_code == 200, r.text
    assert [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).size for d in r.json()["data"]] == [(16, 16)]
    r = client.post("/v1/images/generations", json={"prompt": None})
    assert (r.status_code, r.json()["error"]["param"]) == (422, "prompt")


def test_unknown_endpoints_and_methods_answer_in_the_common_error_shape(client):
    # They answered {"detail": "Not Found"}: an OpenAI client reading error.message found nothing.
    for method, path, status, message in [
        ("POST", "/v1/images/edits", 404, "POST /v1/images/edits: no such endpoint on this server (see /docs)"),
        ("GET", "/sdapi/v1/upscalers", 404, "GET /sdapi/v1/upscalers: no such endpoint on this server (see /docs)"),
        ("GET", "/static/nothing.js", 404, "GET /static/nothing.js: no such endpoint on this server (see /docs)"),
        ("DELETE", "/api/jobs", 405, "DELETE is not allowed on /api/jobs"),
    ]:
        r = client.request(method, path)
        error = r.json()["error"]
        assert (r.status_code, r.json()["detail"]) == (status, error["message"]), r.text
        assert error["message"].startswith(message) and error["type"] == "invalid_request_error", r.text
    assert client.delete("/api/jobs").headers["allow"]


def test_a1111_inpainting_mask_is_refused_not_ignored(client):
    # The mask was dropped with the other unused fields: the client got the whole image redrawn.
    body = {"prompt": "cat", "steps": 4, "init_images": [png_b64()]}
    r = client.post("/sdapi/v1/img2img", json={**body, "mask": png_b64(color=(255, 255, 255))})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "mask"), r.text
    assert "inpainting is not supported" in r.json()["error"]["message"]
    for no_mask in ({"mask": ""}, {"mask": None}, {}):  # as A1111 takes them: no mask
        r = client.post("/sdapi/v1/img2img", json={**body, **no_mask})
        assert r.status_code == 200, r.text


def test_a1111_hires_target_size_is_honoured(client):
    # hr_resize_x / hr_resize_y (A1111's "Resize width/height to", taken before hr_scale) were ignored:
    # the second pass drew hr_scale's default 2x instead of the size asked for.
    def hires(**body):
        return client.post("/sdapi/v1/txt2img", json={"prompt": "cat", "steps": 2, "enable_hr": True, "hr_second_pass_steps": 4, **body})

    for body, size in [
        ({"hr_resize_x": 48}, (48, 48)), ({"hr_resize_y": 40}, (40, 40)),
        ({"width": 32, "height": 16, "hr_resize_y": 32}, (64, 32)), ({"hr_resize_x": 48, "hr_resize_y": 48, "hr_scale": 3}, (48, 48)),
    ]:
        r = hires(**body)
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == size, body
        assert (json.loads(r.json()["info"])["width"], json.loads(r.json()["info"])["height"]) == size
    for body, field, message in [
        ({"hr_resize_x": 64, "hr_resize_y": 32}, "hr_resize_x", "hr_resize_x x hr_resize_y 64x32 is not the shape of the first pass's 16x16"),
        ({"hr_resize_y": 16}, "hr_resize_y", "hr_resize_y 16 does not enlarge the first pass's 16x16"),
        ({"hr_resize_x": 128}, "hr_resize_x", "hr_resize_x 128 is 8x the first pass's 16x16; at most 4x is allowed"),
    ]:
        r = hires(**body)
        assert (r.status_code, r.json()["error"]["field"]) == (422, field), r.text
        assert r.json()["error"]["message"].startswith(message), r.text


def test_cli_bounds_the_shutdown_wait(tmp_path, tiny_checkpoint, monkeypatch):
    # uvicorn waits for open requests before the app's shutdown cancels jobs; blocking A1111/OpenAI
    # requests would hold Ctrl+C or SIGTERM until every job they wait on had finished.
    import uvicorn
    from click.testing import CliRunner

    from bonsai.serve.cli import SHUTDOWN_GRACE_S, serve

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    result = CliRunner().invoke(serve, ["--data-dir", str(tmp_path / "serve"), "--model", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert calls[0]["host"] == "127.0.0.1"
    assert 0 < calls[0]["timeout_graceful_shutdown"] == SHUTDOWN_GRACE_S <= 30


def test_cli_allowed_origin_option(tmp_path, tiny_checkpoint, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    from bonsai.serve.cli import serve

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    base = ["--data-dir", str(tmp_path / "serve"), "--model", str(tiny_checkpoint)]
    result = CliRunner().invoke(serve, [*base, "--allowed-origin", "https://bonsai.example.org/path"])
    assert result.exit_code == 2 and "is not an origin" in result.output and not apps
    result = CliRunner().invoke(serve, [*base, "--allowed-origin", "https://bonsai.example.org"])
    assert result.exit_code == 0, result.output
    with TestClient(apps[0]) as c:  # bound to loopback, it accepts loopback Host names only
        for origin, status in [("https://bonsai.example.org", 200), ("https://evil.example", 403)]:
            r = c.post("/sdapi/v1/interrupt", headers={"origin": origin, "host": "127.0.0.1:7860"})
            assert r.status_code == status, r.text


def test_cli_allowed_host_option(tmp_path, tiny_checkpoint, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    from bonsai.serve.cli import serve

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    base = ["--data-dir", str(tmp_path / "serve"), "--model", str(tiny_checkpoint)]
    for value, reason in [("bonsai.lan:7860", "has a port"), ("http://bonsai.lan/", "without scheme"), ("*bonsai", "not a host name"), ("", "not a host name")]:
        result = CliRunner().invoke(serve, [*base, "--allowed-host", value])
        assert result.exit_code == 2 and reason in result.output and not apps, (value, result.output)
    assert "(DNS rebinding)" in " ".join(CliRunner().invoke(serve, ["--help"]).output.split())

    def start(*args: str) -> tuple[TestClient, str]:
        """The app that `bonsai serve ARGS` runs, and the host:port of the address it prints."""
        result = CliRunner().invoke(serve, [*base, *args])
        assert result.exit_code == 0, result.output
        return TestClient(apps[-1]), re.search(r"Bonsai on http://([^/]+)/", result.output)[1]

    for args, accepted, refused in [
        ((), ["localhost:7860"], ["evil.example:7860", "bonsai.lan"]),
        (("--allowed-host", "bonsai.lan", "--allowed-host", "*.example.org"), ["bonsai.lan:7860", "a.example.org"], ["evil.example"]),
        (("--host", "127.0.0.2"), [], ["evil.example"]),
        (("--host", "::1"), ["127.0.0.1:7860"], ["evil.example"]),
        (("--host", "0.0.0.0", "--token", "t"), ["evil.example:7860", "bonsai.lan"], []),
        (("--host", "0.0.0.0", "--token", "t", "--allowed-host", "bonsai.lan"), ["bonsai.lan", "192.168.1.5:7860"], ["evil.example"]),
    ]:
        client, printed = start(*args)
        assert not printed.startswith("0.0.0.0"), "browsers may refuse 0.0.0.0: the any-address prints as loopback"
        headers = {"authorization": "Bearer t"}
        with client:
            for host in (printed, *accepted):  # the printed address always works
                assert client.get("/api/jobs", headers={**headers, "host": host}).status_code == 200, (args, host)
            for host in refused:
                host_refusal(client.get("/api/jobs", headers={**headers, "host": host}))


def test_latent_model_sizes_are_checked_in_pixels(tmp_path, gate):
    # bonsai-t2i: patch 2 on latents 2x smaller (BONSAI_4B_TINY), so sides are multiples of 4 pixels, not of 2.
    pytest.importorskip("diffusers")
    from bonsai.models.bonsai4b import BONSAI_4B_TINY, build_random, save_t2i

    ckpt = tmp_path / "tiny4b.safetensors"
    save_t2i(build_random(BONSAI_4B_TINY, seed=3), str(ckpt), "tiny4b")
    with open_app(tmp_path, ckpt, gate) as client:
        model = next(m for m in client.get("/api/models").json()["models"] if m["name"] == "tiny4b")
        assert model["size_step"] == 4
        r = client.post("/api/jobs", json={"prompt": "a fox", "model": "tiny4b", "width": 30, "height": 32})
        assert r.status_code == 422 and "multiple of 4" in r.json()["error"]["message"], r.text


CROSS_SITE = {"origin": "https://evil.example"}


def test_posts_from_a_page_of_another_origin_are_refused(client, gate):
    # A page on another site, open in the user's browser, could send these without a CORS preflight:
    # a body-less POST, or a body with no Content-Type (fetch with a Blob) or text/plain.
    gate.close()
    job_id = submit(client, steps=2)
    wait_running(client, gate, job_id)
    for route in ("/sdapi/v1/interrupt", f"/api/jobs/{job_id}/cancel"):
        r = client.post(route, headers=CROSS_SITE)
        assert (r.status_code, r.json()["error"]["field"]) == (403, "origin"), (route, r.text)
        assert "https://evil.example" in r.json()["error"]["message"] and "--allowed-origin" in r.json()["error"]["message"]
    body = json.dumps({"prompt": "a cat", "steps": 1})
    for route in ("/api/jobs", "/sdapi/v1/txt2img", "/v1/images/generations", "/sdapi/v1/options"):
        for content_type in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
            r = client.post(route, content=body, headers={**CROSS_SITE, **content_type})
            assert r.status_code == 403, (route, content_type, r.text)
    # Without an Origin header, the browser's Sec-Fetch-Site still tells where the request comes from.
    for site in ("cross-site", "same-site"):
        r = client.post("/sdapi/v1/interrupt", headers={"sec-fetch-site": site})
        assert r.status_code == 403 and site in r.json()["error"]["message"], r.text
    assert client.get(f"/api/jobs/{job_id}").json()["status"] == "running"
    gate.open()
    assert wait(client, job_id)["status"] == "done"
    assert [j["id"] for j in client.get("/api/jobs").json()["jobs"]] == [job_id]  # nothing else was queued


@pytest.mark.parametrize(
    "origin, allowed",
    [
        ("http://testserver", True),  # the web UI's own requests
        ("http://testserver:80", True),  # the default port, spelled out
        ("HTTP://TestServer", True),
        ("https://testserver", False),  # same host, other scheme: another origin
        ("http://testserver:8080", False),  # same host, other port: another origin (though the same site)
        ("http://testserver.evil.example", False),
        ("null", False),  # sandboxed frames and file:// pages
        ("not an origin", False),
    ],
)
def test_same_origin_check_compares_scheme_host_and_port(client, origin, allowed):
    r = client.post("/sdapi/v1/options", json={}, headers={"origin": origin})
    assert r.status_code == (200 if allowed else 403), r.text


def test_clients_without_browser_headers_and_reads_are_not_checked(client):
    # curl, Python clients, A1111 and ComfyUI clients send neither Origin nor Sec-Fetch-Site.
    assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": False}
    for site in ("same-origin", "none"):  # "none": the user typed the address or opened a bookmark
        assert client.post("/sdapi/v1/interrupt", headers={"sec-fetch-site": site}).status_code == 200
    # A cross-origin read is the browser's to withhold (the server sends no CORS headers).
    r = client.get("/api/models", headers=CROSS_SITE)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_allowed_origins_admit_a_reverse_proxy_address(tmp_path, tiny_checkpoint, gate):
    # Behind a proxy at https://bonsai.example.org the browser's Origin is the proxy's, not the Host the server sees.
    with open_app(tmp_path, tiny_checkpoint, gate, allowed_origins=("https://Bonsai.example.org:443/",)) as c:
        assert c.post("/sdapi/v1/interrupt", headers={"origin": "https://bonsai.example.org"}).status_code == 200
        assert c.post("/sdapi/v1/interrupt", headers={"origin": "http://bonsai.example.org"}).status_code == 403
        assert c.post("/sdapi/v1/interrupt", headers={"origin": "http://testserver"}).status_code == 200
    with open_app(tmp_path, tiny_checkpoint, gate, allowed_origins=("*",)) as c:
        assert c.post("/sdapi/v1/interrupt", headers=CROSS_SITE).status_code == 200
    with pytest.raises(ValueError, match="not an origin"):
        open_app(tmp_path, tiny_checkpoint, gate, allowed_origins=("https://example.org/path",))


def test_a_blocking_request_that_times_out_says_where_its_job_is(tmp_path, tiny_checkpoint, gate):
    # The 504 said "still queued" of a job that was running.
    with open_app(tmp_path, tiny_checkpoint, gate, sync_timeout_s=0.5) as c:
        gate.close()
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a birch", "steps": 2})
        assert r.status_code == 504
        message = r.json()["error"]["message"]
        job_id = c.get("/api/jobs").json()["jobs"][0]["id"]
        assert "still running" in message and f"/api/jobs/{job_id}" in message
        gate.open()
        assert wait(c, job_id)["status"] == "done"  # the job went on after its request gave up
