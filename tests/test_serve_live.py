"""`bonsai serve` on a real uvicorn at 127.0.0.1:<free port>: real client libraries, disconnects, load."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time
from urllib.parse import urlsplit

import pytest
from PIL import Image

pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from serve_support import Gate, make_config, start_server  # noqa: E402

TOKEN = "live-token"


@pytest.fixture(scope="module")
def gate():
    return Gate()


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_checkpoint, gate):
    tmp = tmp_path_factory.mktemp("live")
    server = start_server(make_config(tmp, tiny_checkpoint, token=TOKEN, max_queue=4), gate)
    yield server
    gate.open()
    server.stop()


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


def test_openai_client(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=TOKEN, max_retries=0)
    result = client.images.generate(model="tiny", prompt="a green leaf", n=2, size="32x32", response_format="b64_json")
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    assert "a green leaf" in images[0].info["parameters"]
    result = client.images.generate(prompt="a green leaf", response_format="url")
    r = httpx.get(result.data[0].url, headers=auth())
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (16, 16)
    with pytest.raises(openai.UnprocessableEntityError, match="multiple of 4"):
        client.images.generate(prompt="x", size="30x30")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_webuiapi_client(live):
    webuiapi = pytest.importorskip("webuiapi")
    port = int(live.url.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="user", password=TOKEN)
    assert "tiny" in api.util_get_model_names()
    result = api.txt2img(prompt="a red apple", negative_prompt="blue", seed=42, steps=3, cfg_scale=2.5, batch_size=2, width=16, height=16)
    assert [im.size for im in result.images] == [(16, 16), (16, 16)]
    assert result.info["all_seeds"] == [42, 43]
    assert "Steps: 3" in result.info["infotexts"][0] and "CFG scale: 2.5" in result.info["infotexts"][0]
    result = api.img2img(images=[result.images[0]], prompt="a red apple", denoising_strength=0.5, steps=4, width=16, height=16)
    assert len(result.images) == 1 and result.images[0].size == (16, 16)
    assert api.get_progress()["state"]["job_count"] == 0


def test_client_disconnect_does_not_kill_the_worker(live, gate):
    gate.close()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/sdapi/v1/txt2img", json={"prompt": "gone", "steps": 3}, headers=auth(), timeout=1.0)
    assert gate.reached.wait(30)
    gate.open()
    deadline = time.monotonic() + 30
    while True:
        jobs = httpx.get(f"{live.url}/api/jobs", headers=auth()).json()["jobs"]
        gone = next(j for j in jobs if j["spec"]["prompt"] == "gone")
        if gone["status"] == "done" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert gone["status"] == "done" and len(gone["images"]) == 1
    assert httpx.get(f"{live.url}/api/health", headers=auth()).json()["ok"] is True


def test_load_50_concurrent_requests(live):
    """50 blocking OpenAI requests and 50 native submits at once: each succeeds or gets 429, none is lost."""

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=live.url, headers=auth(), timeout=120, limits=limits) as c:
            calls = []
            for i in range(50):  # interleaved, so both kinds meet a full queue
                calls.append(c.post("/v1/images/generations", json={"prompt": f"load {i}", "seed": i}))
                calls.append(c.post("/api/jobs", json={"prompt": f"native {i}", "seed": i}))
            results = await asyncio.gather(*calls)
        return list(results[0::2]), list(results[1::2])

    start = time.perf_counter()
    blocking, native = asyncio.run(run())
    elapsed = time.perf_counter() - start
    assert {r.status_code for r in blocking + native} <= {200, 202, 429}, {r.status_code for r in blocking + native}
    ok = [r for r in blocking if r.status_code == 200]
    accepted = [r.json()["id"] for r in native if r.status_code == 202]
    assert len(ok) + len(accepted) >= 4  # at least a queue's worth got in
    for r in ok:
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size == (16, 16)
    with httpx.Client(base_url=live.url, headers=auth(), timeout=60) as c:
        deadline = time.monotonic() + 120
        while c.get("/api/health").json()["waiting"] or c.get("/sdapi/v1/progress").json()["state"]["job"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for job_id in accepted:
            assert c.get(f"/api/jobs/{job_id}").json()["status"] == "done"
        history = c.get("/api/jobs", params={"limit": 500}).json()["jobs"]
        prompts = [j["spec"]["prompt"] for j in history if j["status"] == "done"]
        assert sum(p.startswith("load ") for p in prompts) == len(ok)  # every 200 is in the history, nothing else ran
        assert sum(p.startswith("native ") for p in prompts) == len(accepted)
        assert c.get("/api/health").json()["ok"] is True
        r = c.post("/v1/images/generations", json={"prompt": "after the storm"})
        assert r.status_code == 200
    print(
        f"load: {len(ok)}/50 blocking served, {len(accepted)}/50 submits accepted, "
        f"{100 - len(ok) - len(accepted)} got 429, {elapsed:.1f} s"
    )


def test_ui_and_openapi_served(live):
    r = httpx.get(f"{live.url}/", params={"token": TOKEN}, follow_redirects=True)
    assert r.status_code == 200 and "<title>Bonsai</title>" in r.text
    spec = httpx.get(f"{live.url}/openapi.json", headers=auth()).json()
    assert {"/api/jobs", "/sdapi/v1/txt2img", "/v1/images/generations"} <= set(spec["paths"])
    assert json.loads(httpx.get(f"{live.url}/api/health").text)["error"]["field"] == "token"


def raw_http(url: str, request: str) -> tuple[int, bytes]:
    """Sends `request` as written on one connection to the server at `url`; its status and body."""
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as conn:
        conn.sendall(request.encode("latin-1"))
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_host_header_on_the_wire(live):
    port = urlsplit(live.url).port
    token = f"Authorization: Bearer {TOKEN}\r\n"
    # HTTP/1.0 clients may send no Host; browsers always do, so such a request cannot be a page's.
    status, body = raw_http(live.url, f"GET /api/health HTTP/1.0\r\n{token}\r\n")
    assert status == 200 and json.loads(body)["ok"] is True
    status, body = raw_http(live.url, f"GET /api/health HTTP/1.1\r\nHost: localhost:{port}\r\n{token}Connection: close\r\n\r\n")
    assert status == 200
    # Refused before the token is even looked at.
    status, body = raw_http(live.url, f"GET /api/jobs HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n")
    assert status == 400 and "--allowed-host evil.example" in json.loads(body)["error"]["message"]
