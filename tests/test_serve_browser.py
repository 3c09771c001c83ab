"""The web UI in headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

Fills the form, generates, watches progress and the step preview, finds the image in the
gallery, reuses its parameters, and saves screenshots (desktop and phone width) under
tests/artifacts/."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from PIL import Image

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the 'test' extra)")
from conftest import write_tiny_lora  # noqa: E402
from serve_support import Gate, free_port, make_config, start_server  # noqa: E402

CHROMIUM = os.environ.get("BONSAI_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "ui-token"

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason=f"{CHROMIUM} not found: apt-get install -y chromium (or set BONSAI_CHROMIUM)"
)


@pytest.fixture(scope="module")
def gate():
    return Gate()


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_checkpoint, gate):
    server = start_server(make_config(tmp_path_factory.mktemp("ui"), tiny_checkpoint, token=TOKEN), gate)
    yield server
    gate.open()
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_generate_progress_gallery_reuse(live, gate, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{live.url}/?token={TOKEN}")  # sets the cookie, then redirects to /
    assert page.url == f"{live.url}/"
    expect = sync_api.expect
    # The served model comes first (and is selected); the built-in bonsai-emoji follows it.
    expect(page.locator("#model option").first).to_have_text("tiny")
    expect(page.locator("#model")).to_have_value("tiny")
    expect(page.locator("#size option").first).to_have_text("16x16 (native)")
    expect(page.locator("#steps")).to_have_value("2")

    page.fill("#prompt", "a small green tree")
    page.fill("#negative_prompt", "red")
    page.fill("#steps", "3")
    page.fill("#seed", "1234")
    page.check("#seed_lock")
    page.fill("#batch", "2")
    gate.close()
    page.click("#generate")
    expect(page.locator("#progress_text")).to_contain_text("step 1/3", timeout=30_000)
    page.wait_for_function("document.getElementById('preview').naturalWidth > 0", timeout=30_000)
    expect(page.locator("#generate")).to_be_disabled()
    page.screenshot(path=ARTIFACTS / "serve-progress.png", full_page=True)
    gate.open()
    expect(page.locator("#results img")).to_have_count(2, timeout=60_000)
    expect(page.locator("#progress_text")).to_have_text("done")
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.naturalWidth === 16)")
    expect(page.locator("#seed")).to_have_value("1234")

    page.click("nav button[data-tab=gallery]")
    expect(page.locator("#gallery img")).to_have_count(2, timeout=30_000)
    page.locator("#gallery img").nth(1).click()
    expect(page.locator("#detail_params")).to_contain_text("a small green tree")
    expect(page.locator("#detail_params")).to_contain_text("Seed: 1235")
    href = page.get_attribute("#download", "href")
    assert href.endswith("/images/1?download=1")
    page.screenshot(path=ARTIFACTS / "serve-gallery.png", full_page=True)
    page.click("#reuse")
    expect(page.locator("#tab-generate")).to_be_visible()
    expect(page.locator("#prompt")).to_have_value("a small green tree")
    expect(page.locator("#seed")).to_have_value("1235")  # the seed of the image that was reused
    expect(page.locator("#steps")).to_have_value("3")
    expect(page.locator("#batch")).to_have_value("1")
    assert errors == []


def test_models_page_and_phone_width(live, browser):
    page = browser.new_page(viewport={"width": 375, "height": 740}, is_mobile=True)
    page.goto(f"{live.url}/?token={TOKEN}")
    expect = sync_api.expect
    page.click("nav button[data-tab=models]")
    row = page.locator("#models_table tbody tr", has_text="tiny")
    expect(row).to_contain_text("ok")
    expect(row).to_contain_text("MB")
    expect(page.locator("#models_table th", has_text="Bits/weight")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # nothing overflows sideways
    page.click("nav button[data-tab=generate]")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.screenshot(path=ARTIFACTS / "serve-phone.png", full_page=True)


def open_page(live, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(f"{live.url}/?token={TOKEN}")
    sync_api.expect(page.locator("#size option").first).to_have_text("16x16 (native)")
    return page


def generate(page, prompt: str) -> None:
    """Type `prompt`, press Generate and wait for the job to finish."""
    page.fill("#prompt", prompt)
    page.click("#generate")
    sync_api.expect(page.locator("#progress_text")).to_have_text("done", timeout=60_000)


def form_values(page) -> dict:
    return page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#form input, #form select, #form textarea')]"
        ".filter(e => e.id && e.type !== 'file').map(e => [e.id, e.type === 'checkbox' ? e.checked : e.value]))"
    )


def test_reuse_restores_lora_and_hires(live, tiny_checkpoint, browser):
    loras = live.app.state.bonsai.catalog.loras_dir
    loras.mkdir(parents=True, exist_ok=True)
    write_tiny_lora(tiny_checkpoint, loras / "sparkle.safetensors")
    page = open_page(live, browser)
    expect = sync_api.expect
    page.fill("#prompt", "a leaf")
    page.select_option("#lora", "sparkle")
    page.fill("#lora_weight", "0.7")
    page.click("#hires_box summary")
    page.check("#hires")
    page.fill("#hires_scale", "2")
    page.fill("#hires_strength", "0.75")
    page.fill("#hires_steps", "4")
    page.fill("#seed", "42")
    wanted = form_values(page)
    page.click("#generate")
    expect(page.locator("#progress_text")).to_have_text("done", timeout=60_000)
    page.reload()  # a fresh form: every field back to its default
    page.select_option("#lora", "")
    page.click("nav button[data-tab=gallery]")
    page.locator("#gallery img").first.click()
    expect(page.locator("#detail_params")).to_contain_text("<lora:sparkle:0.7>")
    page.click("#reuse")
    assert form_values(page) == {**wanted, "seed_lock": True}


def test_reusing_a_text_to_image_job_drops_a_chosen_init_image(live, browser, tmp_path):
    # The init image chosen for an earlier img2img stayed: the reused text-to-image job ran as img2img.
    page = open_page(live, browser)
    bodies = posted_jobs(page)
    expect = sync_api.expect
    expect(page.locator("#strength")).to_have_value("0.75")  # the server's defaults (/api/config)
    expect(page.locator("#hires_strength")).to_have_value("0.5")
    generate(page, "a rowan")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "init.png")
    page.click("#img2img_box summary")
    page.set_input_files("#init_image", tmp_path / "init.png")
    page.fill("#strength", "0.9")
    generate(page, "a holly")
    assert bodies[-1]["init_image"].startswith("data:image/png;base64,")
    page.click("nav button[data-tab=gallery]")
    page.locator("#gallery img[alt='a rowan']").first.click()
    page.click("#reuse")
    page.click("#generate")
    expect(page.locator("#progress_text")).to_have_text("done", timeout=60_000)
    assert bodies[-1]["prompt"] == "a rowan" and "init_image" not in bodies[-1]
    page.fill("#strength", "0.5")
    page.click("nav button[data-tab=gallery]")
    page.locator("#gallery img[alt='a holly']").first.click()
    page.click("#reuse")
    expect(page.locator("#strength")).to_have_value("0.9")


def test_generate_waits_for_the_init_image_being_read(live, browser, tmp_path):
    # A click on Generate before the chosen file was read sent a text-to-image job.
    page = open_page(live, browser)
    page.evaluate("""() => {
        const read = FileReader.prototype.readAsDataURL;
        FileReader.prototype.readAsDataURL = function (file) { setTimeout(() => read.call(this, file), 1500); };
    }""")
    bodies = posted_jobs(page)
    Image.new("RGB", (16, 16), (30, 200, 30)).save(tmp_path / "slow.png")
    page.click("#img2img_box summary")
    page.set_input_files("#init_image", tmp_path / "slow.png")
    generate(page, "a fern")
    assert bodies[-1]["prompt"] == "a fern" and bodies[-1]["init_image"].startswith("data:image/png;base64,")


def posted_jobs(page) -> list[dict]:
    bodies: list[dict] = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/api/jobs") and bodies.append(r.post_data_json))
    return bodies


def test_any_value_the_server_takes_can_be_submitted(live, browser):
    # The browser's own checks refused a CFG of 4.2 (not a multiple of the spinner's 0.5 step) and
    # silently blocked Generate for a bad value inside the collapsed hires box; the server decides.
    page = open_page(live, browser)
    bodies = posted_jobs(page)
    expect = sync_api.expect
    page.fill("#prompt", "a pine")
    page.fill("#cfg", "4.2")
    page.fill("#seed", "")  # empty means the default: a random seed
    page.click("#generate")
    expect(page.locator("#progress_text")).to_have_text("done", timeout=60_000)
    assert bodies[-1]["cfg"] == 4.2 and "seed" not in bodies[-1]
    page.click("#hires_box summary")
    page.check("#hires")
    page.fill("#hires_scale", "1")
    page.click("#hires_box summary")  # collapsed again
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("hires.scale")


def test_reloading_mid_job_keeps_watching_it(live, gate, browser):
    page = open_page(live, browser)
    expect = sync_api.expect
    page.fill("#prompt", "a fern")
    gate.close()
    page.click("#generate")
    expect(page.locator("#progress_text")).to_contain_text("step 1/", timeout=30_000)
    page.reload()
    expect(page.locator("#progress_text")).to_contain_text("step 1/", timeout=30_000)
    expect(page.locator("#cancel")).to_be_enabled()
    # The gate opens once the server has the cancel: opened at the click, the job's last step could run
    # before the request arrived, and the job finish "done" (seen once in CI).
    with page.expect_response(lambda r: r.url.endswith("/cancel") and r.request.method == "POST") as cancelled:
        page.click("#cancel")
    assert cancelled.value.ok
    gate.open()
    expect(page.locator("#progress_text")).to_have_text("cancelled", timeout=30_000)
    page.reload()  # a finished job is not picked up again
    expect(page.locator("#progress_box")).to_be_hidden()


def test_a_queued_job_counts_the_running_one_ahead_of_it(live, gate, browser):
    # The page showed the job's place among the waiting jobs: "queued (0 ahead)" behind a running job.
    page = open_page(live, browser)
    expect = sync_api.expect
    gate.close()
    running = page.request.post(f"{live.url}/api/jobs", data={"prompt": "a running job"}).json()["id"]
    assert gate.reached.wait(30)
    page.fill("#prompt", "a queued job")
    page.click("#generate")
    expect(page.locator("#progress_text")).to_have_text("queued (1 ahead)")
    page.click("#cancel")
    expect(page.locator("#progress_text")).to_have_text("cancelled")
    page.request.post(f"{live.url}/api/jobs/{running}/cancel")
    gate.open()


def test_overlapping_gallery_loads_show_each_image_once(live, browser):
    # Each click on the Gallery tab (or "Load more") starts a load; two that overlapped both appended.
    page = open_page(live, browser)
    expect = sync_api.expect
    generate(page, "a cedar")
    done = page.request.get(f"{live.url}/api/jobs?status=done&limit=40").json()["jobs"]
    images = sum(len(job["images"]) for job in done)
    page.route("**/api/jobs?*", lambda route: (time.sleep(0.3), route.continue_()))  # slow enough to overlap
    page.dblclick("nav button[data-tab=gallery]")
    expect(page.locator("#gallery img")).to_have_count(images)
    page.wait_for_timeout(800)  # both answers are in
    expect(page.locator("#gallery img")).to_have_count(images)
    page.click("nav button[data-tab=generate]")
    page.click("nav button[data-tab=gallery]")
    page.click("nav button[data-tab=gallery]")
    page.wait_for_timeout(800)
    expect(page.locator("#gallery img")).to_have_count(images)


def test_a_lost_connection_does_not_drop_the_job(live, gate, browser):
    # One failed poll ended the watch: the page showed "Failed to fetch" and enabled Generate while
    # the job still ran, and never showed its images.
    page = open_page(live, browser)
    expect = sync_api.expect
    gate.close()
    page.fill("#prompt", "a larch")
    page.click("#generate")
    expect(page.locator("#progress_text")).to_contain_text("step 1/", timeout=30_000)
    page.route(re.compile(r".*/api/jobs/[0-9a-f]+$"), lambda route: route.abort("connectionrefused"))
    expect(page.locator("#progress_text")).to_have_text("connection lost, retrying…")
    expect(page.locator("#generate")).to_be_disabled()
    expect(page.locator("#error")).to_be_hidden()
    page.unroute(re.compile(r".*/api/jobs/[0-9a-f]+$"))
    gate.open()
    expect(page.locator("#progress_text")).to_have_text("done", timeout=60_000)
    expect(page.locator("#results img")).to_have_count(1)


def test_gallery_opens_from_the_keyboard(live, browser):
    page = open_page(live, browser)
    expect = sync_api.expect
    generate(page, "an oak")
    page.click("nav button[data-tab=gallery]")
    expect(page.locator("#gallery img").first).to_be_visible()
    page.focus("nav button[data-tab=models]")  # the last control before the gallery
    page.keyboard.press("Tab")
    expect(page.locator("#gallery img").first).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#detail_image")).to_have_attribute("alt", "an oak")


def test_a_refused_request_shows_the_servers_message_once(live, browser):
    page = open_page(live, browser)
    page.fill("#prompt", "a birch")
    page.click("#hires_box summary")
    page.check("#hires")
    page.fill("#hires_scale", "5")
    page.click("#generate")
    sync_api.expect(page.locator("#error")).to_have_text("hires.scale must be at most 4, got 5")


def test_a_jobs_warnings_show_under_its_images_until_the_next_job(live, browser):
    page = open_page(live, browser)
    expect = sync_api.expect
    page.fill("#prompt", " ".join(f"w{i}" for i in range(20)))  # more word pieces than the tiny model reads
    page.click("#generate")
    expect(page.locator("#results img")).to_have_count(1, timeout=60_000)
    expect(page.locator("#job_warnings")).to_have_text(
        "warning: the prompt is longer than the 32 tokens tiny-test reads: 'w15 w16 w17 w18 w19' is ignored")
    page.fill("#prompt", "a birch")
    page.click("#generate")
    expect(page.locator("#job_warnings")).to_be_hidden()
    # Wait for the new job's image: the progress text still says the last job's "done" until the
    # new job's POST returns (this test failed once on that, under load).
    expect(page.locator("#results img").first).to_have_attribute("alt", "a birch", timeout=60_000)
    expect(page.locator("#progress_text")).to_have_text("done")
    expect(page.locator("#job_warnings")).to_be_hidden()
    # the gallery's detail view says it too, for that job's images only
    page.click("nav button[data-tab=gallery]")
    expect(page.locator("#gallery img").first).to_have_attribute("alt", "a birch", timeout=30_000)
    page.locator("#gallery img").nth(1).click()
    expect(page.locator("#detail_warnings")).to_contain_text("'w15 w16 w17 w18 w19' is ignored")
    page.click("#close_detail")
    page.locator("#gallery img").first.click()
    expect(page.locator("#detail_warnings")).to_be_hidden()


def test_size_menu_offers_the_models_own_sizes(live, browser):
    # The server's presets start at 512 px, above the tiny model's 64 px limit, so the menu offered
    # its native size only; sizes derived from the model (multiples of its 4 px step) fit.
    page = open_page(live, browser)
    sizes = page.locator("#size option").evaluate_all("options => options.map(o => o.value)")
    assert sizes == ["16x16", "24x16", "16x24", "24x24", "32x32", "48x32", "32x48", "48x48", "64x64"]
    sync_api.expect(page.locator("#size")).to_have_value("16x16")


def test_a_double_click_queues_one_job(live, browser):
    # Generate was disabled only once the server had answered, so the second click queued a second job.
    page = open_page(live, browser)
    bodies = posted_jobs(page)
    expect = sync_api.expect
    page.fill("#prompt", "a maple")
    page.dblclick("#generate")
    expect(page.locator("#progress_text")).to_have_text("done", timeout=60_000)
    assert len(bodies) == 1
    page.fill("#steps", "0")  # refused: Generate is enabled again for the corrected form
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("steps")
    expect(page.locator("#generate")).to_be_enabled()
    assert len(bodies) == 2


def refuse(route):
    route.fulfill(status=503, json={"error": {"message": "the history database is locked"}})


def test_gallery_and_models_errors_are_shown_in_their_tab(live, browser):
    # A failed request on these tabs was an unhandled promise rejection: an empty tab and no message.
    page = open_page(live, browser)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    expect = sync_api.expect
    page.route("**/api/jobs?*", refuse)
    page.click("nav button[data-tab=gallery]")
    expect(page.locator("#gallery_error")).to_have_text("the history database is locked")
    page.unroute("**/api/jobs?*")
    page.route("**/api/models", refuse)
    page.click("nav button[data-tab=models]")
    expect(page.locator("#models_error")).to_have_text("the history database is locked")
    page.unroute("**/api/models")
    page.click("nav button[data-tab=gallery]")  # the next load that works clears the message
    expect(page.locator("#gallery_error")).to_be_hidden()
    assert errors == []


def test_an_error_page_that_is_not_json_shows_its_status(live, browser):
    # A reverse proxy's HTML error page was parsed as JSON: the page showed "Unexpected token '<'...".
    page = open_page(live, browser)
    page.route("**/api/jobs", lambda route: route.fulfill(status=502, content_type="text/html", body="<html>Bad Gateway</html>"))
    page.fill("#prompt", "a spruce")
    page.click("#generate")
    sync_api.expect(page.locator("#error")).to_have_text("the server answered 502 Bad Gateway")
    sync_api.expect(page.locator("#generate")).to_be_enabled()


def test_fields_have_distinct_names_and_tabs_are_tabs(live, browser):
    # The hires box repeated "Steps" and "Denoise": a screen reader named two fields alike.
    page = open_page(live, browser)
    expect = sync_api.expect
    names = page.locator("#form input, #form select, #form textarea").evaluate_all(
        "fields => fields.filter(f => f.labels.length).map(f => [...f.labels[0].childNodes]"
        ".filter(n => n.nodeType === Node.TEXT_NODE).map(n => n.textContent.trim()).join(' ').trim())"
    )
    assert len(names) == len(set(names)), names
    for name in ("Steps", "Denoise", "Hires steps", "Hires denoise"):
        expect(page.get_by_label(name, exact=True)).to_have_count(1)
    expect(page.get_by_role("tablist")).to_have_count(1)
    gallery = page.get_by_role("tab", name="Gallery")
    expect(gallery).to_have_attribute("aria-selected", "false")
    gallery.click()
    expect(gallery).to_have_attribute("aria-selected", "true")
    expect(page.get_by_role("tab", name="Generate")).to_have_attribute("aria-selected", "false")
    expect(page.get_by_role("tabpanel")).to_have_count(1)  # the hidden ones are not exposed
    expect(page.get_by_role("tabpanel")).to_have_attribute("id", "tab-gallery")


def test_panels_and_the_progress_bar_have_names(live, browser):
    # The tab panels and the progress bar had no accessible name: a screen reader announced "tab panel", "progress bar".
    page = open_page(live, browser)
    expect = sync_api.expect
    expect(page.get_by_role("tabpanel", name="Generate", exact=True)).to_be_visible()
    page.get_by_role("tab", name="Models").click()
    expect(page.get_by_role("tabpanel", name="Models", exact=True)).to_be_visible()
    page.get_by_role("tab", name="Generate").click()
    page.fill("#prompt", "a yew")
    page.click("#generate")
    expect(page.get_by_role("progressbar", name="generation progress")).to_be_visible()
    expect(page.locator("#progress_text")).to_have_text("done", timeout=60_000)


def test_a_job_that_has_not_reached_its_first_step_shows_starting(live, browser):
    # A running job reports step 0 of 0 until its first step (the model loads, the prompt is encoded);
    # the page showed "step 0/0". The server's answer is held at that moment to look at it.
    page = open_page(live, browser)
    expect = sync_api.expect
    held = True

    def before_first_step(route):
        if not held:
            return route.continue_()
        job = route.fetch().json()
        job.update(status="running", images=[], preview=None)
        job["progress"] = {"stage": 0, "stages": 1, "step": 0, "total": 0, "fraction": 0}
        route.fulfill(json=job)

    page.route(re.compile(r".*/api/jobs/[0-9a-f]+$"), before_first_step)
    page.fill("#prompt", "a willow")
    page.click("#generate")
    expect(page.locator("#progress_text")).to_have_text("starting…")
    page.wait_for_timeout(500)  # a few polls of the held answer
    expect(page.locator("#progress_text")).to_have_text("starting…")
    held = False
    expect(page.locator("#progress_text")).to_have_text("done", timeout=60_000)


@pytest.fixture
def other_origin(tmp_path):
    """A page of another local web server (same host, another port: another origin, though the same site)."""
    (tmp_path / "index.html").write_text("<!doctype html><title>another local app</title>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


FORGED_POSTS = """async (target) => {
    const body = JSON.stringify({prompt: "forged"});
    const sent = [
        fetch(target + "/sdapi/v1/interrupt", {method: "POST", mode: "no-cors"}),
        fetch(target + "/api/jobs", {method: "POST", mode: "no-cors", body: new Blob([body])}),
        fetch(target + "/api/jobs", {method: "POST", mode: "no-cors", headers: {"content-type": "text/plain"}, body}),
    ];
    await Promise.all(sent);
}"""


def test_a_page_of_another_origin_cannot_post_to_the_server(tmp_path, tiny_checkpoint, gate, browser, other_origin):
    # Without a token, nothing stopped another page open in the browser from interrupting the running
    # job (or, on FastAPI before 0.132, from queuing jobs with a Blob body): no preflight guards these.
    server = start_server(make_config(tmp_path, tiny_checkpoint), gate)
    try:
        page = browser.new_page()
        page.goto(server.url)  # the web UI's own POSTs (with Origin) still pass
        origins: list[str | None] = []
        page.on("request", lambda r: r.method == "POST" and origins.append(r.header_value("origin")))
        page.fill("#prompt", "a spruce")
        gate.close()
        page.click("#generate")
        sync_api.expect(page.locator("#progress_text")).to_contain_text("step 1/", timeout=30_000)
        assert origins == [server.url]
        job_id = httpx.get(f"{server.url}/api/jobs").json()["jobs"][0]["id"]

        other = browser.new_page()
        other.goto(other_origin)
        statuses: list[int] = []
        other.on("response", lambda r: r.request.method == "POST" and statuses.append(r.status))
        other.evaluate(FORGED_POSTS, server.url)
        assert sorted(statuses) == [403, 403, 403]
        assert httpx.get(f"{server.url}/api/jobs/{job_id}").json()["status"] == "running"
        gate.open()
        sync_api.expect(page.locator("#progress_text")).to_have_text("done", timeout=60_000)
        assert [j["id"] for j in httpx.get(f"{server.url}/api/jobs").json()["jobs"]] == [job_id]
    finally:
        gate.open()
        server.stop()


def test_api_docs_render_offline(live, browser):
    # Swagger UI came from a CDN: without the internet /docs was a blank page.
    page = browser.new_page()
    elsewhere: list[str] = []

    def only_this_server(route):
        if route.request.url.startswith(live.url):
            return route.continue_()
        elsewhere.append(route.request.url)
        route.abort()

    page.route("**/*", only_this_server)
    page.goto(f"{live.url}/docs?token={TOKEN}")
    sync_api.expect(page.locator(".swagger-ui .info .title")).to_contain_text("Bonsai", timeout=30_000)
    sync_api.expect(page.locator(".opblock-summary-path", has_text="/sdapi/v1/txt2img")).to_have_count(1)
    assert elsewhere == []


READ_HISTORY = """async () => {
    const r = await fetch("/api/jobs");
    return [r.status, await r.text()];
}"""


def test_a_page_whose_name_is_pointed_at_this_machine_reads_nothing(tmp_path, tiny_checkpoint, gate, browser):
    # DNS rebinding, with Chromium's resolver rules standing in for the attacker's DNS: evil.example resolves
    # to 127.0.0.1, so a page at http://evil.example:PORT is, to the browser, of the server's own origin.
    rebinding = browser.browser_type.launch(
        executable_path=CHROMIUM, headless=True, args=[*ARGS, "--no-proxy-server", "--host-resolver-rules=MAP evil.example 127.0.0.1"]
    )
    servers = [start_server(make_config(tmp_path / name, tiny_checkpoint, **extra), gate)
               for name, extra in [("guarded", {}), ("open", {"allowed_hosts": ("evil.example",)})]]
    try:
        for server in servers:
            job_id = httpx.post(f"{server.url}/api/jobs", json={"prompt": "a private prompt", "steps": 1}).json()["id"]
            deadline = time.monotonic() + 60
            while httpx.get(f"{server.url}/api/jobs/{job_id}").json()["status"] in ("queued", "running"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        guarded, open_to_it = (f"http://evil.example:{urlsplit(s.url).port}" for s in servers)
        page = rebinding.new_page()
        r = page.goto(f"{guarded}/")
        assert r.status == 400 and "--allowed-host evil.example" in r.text()
        status, text = page.evaluate(READ_HISTORY)
        assert status == 400 and "a private prompt" not in text
        # What the check stops: a server that answers to the name serves that page the history.
        assert page.goto(f"{open_to_it}/").status == 200
        status, text = page.evaluate(READ_HISTORY)
        assert status == 200 and "a private prompt" in text
    finally:
        rebinding.close()
        for server in servers:
            server.stop()
