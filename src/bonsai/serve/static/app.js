// Bonsai web UI: plain JS over the native API (/api). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], config: null, job: null, initImage: null, cursor: null, detail: null };

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  // An error page that is not this server's JSON (a reverse proxy's 502 page) is told by its status.
  const body = response.status === 204 ? null : await response.json().catch(() => undefined);
  if (!response.ok) {
    // The server's messages name their field already ("steps must be between 1 and 200, got 0").
    const error = new Error(body && body.error ? body.error.message : `the server answered ${response.status} ${response.statusText}`.trim());
    error.status = response.status;
    throw error;
  }
  if (body === undefined) throw new Error(`the server's answer to ${path} is not JSON`);
  return body;
}

// Each tab has its own alert (#error on Generate), so that a message shows in the tab the user looks at.
function showError(message, id = "error") {
  $(id).textContent = message || "";
  $(id).hidden = !message;
}

// What a finished job warned of (a prompt cut short, black images), under its progress or in the gallery's
// detail view (id): the images stay.
function showWarnings(warnings, id = "job_warnings") {
  $(id).textContent = warnings.map((w) => `warning: ${w}`).join("\n");
  $(id).hidden = !warnings.length;
}

function option(value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text ?? value;
  return o;
}

// ---- tabs
document.querySelectorAll("nav button").forEach((b) =>
  b.addEventListener("click", () => showTab(b.dataset.tab)));

function showTab(name) {
  document.querySelectorAll("nav button").forEach((b) => {
    b.classList.toggle("active", b.dataset.tab === name);
    b.setAttribute("aria-selected", String(b.dataset.tab === name));
  });
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.id === `tab-${name}`));
  if (name === "gallery") loadGallery(true);
  if (name === "models") loadModels();
}

// ---- form setup
function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

// The sizes offered for model m, native first: its native size scaled by 1.5 to 4 (square), 3:2 and
// 2:3 shapes of its native and twice native size, and the server's presets, smallest first. The
// server's fixed presets alone would exceed a small model's limit; each side is a multiple of the
// model's size_step and within the limits the server enforces.
function modelSizes(m) {
  const { width, height } = m.defaults;
  const step = m.size_step;
  const side = (x) => Math.max(step, Math.round(x / step) * step);
  const size = (w, h) => `${side(w)}x${side(h)}`;
  const derived = [1.5, 2, 3, 4].map((k) => size(width * k, height * k));
  for (const k of [1, 2]) derived.push(size(width * k * 1.5, height * k), size(width * k, height * k * 1.5));
  const maxSide = Math.min(m.max_side, state.config.limits.max_side);
  const fits = (s) => s.split("x").every((x) => Number(x) <= maxSide);
  const pixels = (s) => s.split("x").reduce((a, b) => a * b, 1);
  const native = `${width}x${height}`;
  const others = new Set([...derived, ...state.config.size_presets].filter((s) => s !== native && fits(s)));
  return [native, ...[...others].sort((a, b) => pixels(a) - pixels(b))];
}

function applyModelDefaults() {
  const m = currentModel();
  if (!m) return;
  const d = m.defaults;
  const native = `${d.width}x${d.height}`;
  $("size").replaceChildren(...modelSizes(m).map((s) => option(s, s === native ? `${s} (native)` : s)));
  $("steps").value = d.steps ?? 20;
  $("cfg").value = d.cfg ?? 4;
  if (d.sampler) $("sampler").value = d.sampler;
}

async function init() {
  const [config, models, loras] = await Promise.all([api("/api/config"), api("/api/models"), api("/api/loras")]);
  state.config = config;
  state.models = models.models.filter((m) => m.status === "ok");
  $("model").replaceChildren(...state.models.map((m) => option(m.name)));
  if (models.default) $("model").value = models.default;
  $("sampler").replaceChildren(...config.samplers.map((s) => option(s)));
  $("strength").value = config.defaults.strength;
  $("hires_strength").value = config.defaults.hires_strength;
  $("steps").max = config.limits.max_steps;
  $("batch").max = config.limits.max_batch;
  $("lora").append(...loras.loras.map((n) => option(n)));
  $("lora").disabled = loras.loras.length === 0;
  $("lora_note").textContent = `LoRA files are read from ${loras.folder}.`;
  if (!state.models.length) showError("No usable model: run 'bonsai models list' on the server.");
  applyModelDefaults();
  if (sessionStorage.getItem(WATCHED)) watch(sessionStorage.getItem(WATCHED));
}

$("model").addEventListener("change", applyModelDefaults);
$("seed_random").addEventListener("click", () => { $("seed").value = -1; $("seed_lock").checked = false; });
// state.initImage holds the read as a promise: Generate waits for it, so a click before the file is
// read sends the img2img job it means (not a text-to-image one), and a later pick replaces an earlier one.
function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

$("init_image").addEventListener("change", () => {
  const file = $("init_image").files[0];
  state.initImage = file ? readDataURL(file) : null;
});
$("clear_init").addEventListener("click", () => { $("init_image").value = ""; state.initImage = null; });

// The form is not checked by the browser (novalidate): the server is the one judge of a value, and
// its messages name the field. An empty number field is left out, so the server's default applies.
function fieldNumber(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

async function request() {
  const [width, height] = $("size").value.split("x").map(Number);
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    model: $("model").value || null,
    width, height,
    steps: fieldNumber("steps"),
    cfg: fieldNumber("cfg"),
    sampler: $("sampler").value,
    seed: fieldNumber("seed"),
    batch: fieldNumber("batch"),
  };
  if ($("lora").value) body.loras = [{ name: $("lora").value, weight: fieldNumber("lora_weight") }];
  if ($("hires").checked) {
    body.hires = { scale: fieldNumber("hires_scale"), strength: fieldNumber("hires_strength"), steps: fieldNumber("hires_steps") };
  }
  if (state.initImage) {
    body.init_image = await state.initImage;
    body.strength = fieldNumber("strength");
  }
  return body;
}

// ---- generate, progress, cancel
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  showWarnings([]);
  $("generate").disabled = true;  // now, not when the server answers: a double click queued two jobs
  try {
    const job = await api("/api/jobs", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(await request()),
    });
    if ($("seed_lock").checked) $("seed").value = job.spec.seed;
    watch(job.id);
  } catch (e) {
    $("generate").disabled = false;
    showError(e.message);
  }
});

// The job being watched is kept in sessionStorage, so that reloading the page picks it up again.
const WATCHED = "bonsai_job";

function watch(id) {
  state.job = id;
  sessionStorage.setItem(WATCHED, id);
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("progress_box").hidden = false;
  $("progress").value = 0;
  $("progress_text").textContent = "starting…";
  $("preview").removeAttribute("src");
  poll(id);
}

$("cancel").addEventListener("click", async () => {
  if (state.job) await api(`/api/jobs/${state.job}/cancel`, { method: "POST" }).catch((e) => showError(e.message));
});

async function poll(id) {
  let job;
  try {
    job = await api(`/api/jobs/${id}`);
  } catch (e) {
    // No answer (the network dropped, the server restarts, its proxy answers 502-504): the job may
    // still run, or its end be recorded; keep watching rather than leave it for lost.
    if (e instanceof TypeError || [502, 503, 504].includes(e.status)) {
      $("progress_text").textContent = "connection lost, retrying…";
      setTimeout(() => poll(id), 1000);
      return;
    }
    showError(e.message);
    return finish();
  }
  if (job.status === "queued") {
    // position counts the jobs waiting before this one; a job waits only while another one runs, so add that one.
    $("progress_text").textContent = `queued (${(job.position ?? 0) + 1} ahead)`;
  } else if (job.status === "running") {
    const p = job.progress;
    $("progress").value = p.fraction;
    const stage = p.stages > 1 ? `pass ${p.stage}/${p.stages}, ` : "";
    // Before its first step (loading the model, encoding the prompt) a job reports step 0 of 0.
    $("progress_text").textContent = p.total ? `${stage}step ${p.step}/${p.total}` : "starting…";
    if (job.preview && $("preview").dataset.src !== job.preview) {
      $("preview").src = job.preview;
      $("preview").dataset.src = job.preview;
    }
  }
  if (job.status === "queued" || job.status === "running") {
    setTimeout(() => poll(id), 250);
    return;
  }
  $("progress").value = job.status === "done" ? 1 : $("progress").value;
  $("progress_text").textContent = job.status + (job.error ? `: ${job.error}` : "");
  if (job.status === "failed") showError(job.error);
  showWarnings(job.warnings ?? []);
  $("results").replaceChildren(...job.images.map((url, n) => figure(job, url, n)));
  finish();
}

function finish() {
  state.job = null;
  sessionStorage.removeItem(WATCHED);
  $("generate").disabled = false;
  $("cancel").disabled = true;
}

function figure(job, url, n) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = url;
  img.alt = job.spec.prompt;
  img.loading = "lazy";
  img.tabIndex = 0;  // reachable and opened from the keyboard too
  img.setAttribute("role", "button");
  img.addEventListener("click", () => openDetail(job, n));
  img.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); openDetail(job, n); }
  });
  const cap = document.createElement("figcaption");
  cap.textContent = `${job.spec.seed + n} · ${job.spec.prompt}`;
  fig.append(img, cap);
  return fig;
}

// ---- gallery and detail
// Only the latest load may fill the gallery: two that overlap (a double click on the tab or on
// "Load more") would both append their page.
let galleryLoad = 0;

async function loadGallery(reset) {
  const ticket = ++galleryLoad;
  if (reset) { state.cursor = null; $("gallery").replaceChildren(); }
  const q = new URLSearchParams({ status: "done", limit: "40" });
  if (state.cursor !== null) q.set("before", state.cursor);
  let page;
  try {
    page = await api(`/api/jobs?${q}`);
  } catch (e) {
    if (ticket === galleryLoad) showError(e.message, "gallery_error");
    return;
  }
  if (ticket !== galleryLoad) return;
  showError("", "gallery_error");
  for (const job of page.jobs) $("gallery").append(...job.images.map((url, n) => figure(job, url, n)));
  state.cursor = page.next;
  $("more").hidden = page.next === null;
}
$("more").addEventListener("click", () => loadGallery(false));

function openDetail(job, n) {
  state.detail = { job, n };
  $("detail_image").src = job.images[n];
  $("detail_image").alt = job.spec.prompt;
  $("detail_params").textContent = job.parameters[n] || "";
  showWarnings(job.warnings ?? [], "detail_warnings");
  $("download").href = `${job.images[n]}?download=1`;
  $("detail").showModal();
}
$("close_detail").addEventListener("click", () => $("detail").close());

$("reuse").addEventListener("click", () => {
  const { job, n } = state.detail;
  const s = job.spec;
  if (state.models.some((m) => m.name === s.model)) { $("model").value = s.model; applyModelDefaults(); }
  $("prompt").value = s.prompt;
  $("negative_prompt").value = s.negative_prompt;
  const size = `${s.width}x${s.height}`;
  if (![...$("size").options].some((o) => o.value === size)) $("size").append(option(size));
  $("size").value = size;
  $("steps").value = s.steps;
  $("cfg").value = s.cfg;
  $("sampler").value = s.sampler;
  $("seed").value = s.seed + n;
  $("seed_lock").checked = true;
  $("batch").value = 1;
  $("hires").checked = Boolean(s.hires);
  if (s.hires) {
    $("hires_scale").value = s.hires.scale;
    $("hires_strength").value = s.hires.strength;
    $("hires_steps").value = s.hires.steps;
  }
  $("lora").value = s.loras.length ? s.loras[0][0] : "";
  if (s.loras.length) $("lora_weight").value = s.loras[0][1];
  // The source image is not kept: an img2img job's strength comes back, the user picks the image again.
  // A text-to-image job must not turn into img2img on an image left chosen from before.
  if (s.img2img) {
    $("strength").value = s.strength;
  } else {
    $("init_image").value = "";
    state.initImage = null;
  }
  $("detail").close();
  showTab("generate");
});

// ---- models page
function megabytes(n) { return n == null ? "?" : `${(n / 1e6).toFixed(n < 1e7 ? 2 : 1)} MB`; }
function number(x, digits = 2) { return x == null ? "?" : x.toFixed(digits); }

async function loadModels() {
  let models;
  try {
    ({ models } = await api("/api/models"));
  } catch (e) {
    return showError(e.message, "models_error");
  }
  showError("", "models_error");
  const rows = models.map((m) => {
    const tr = document.createElement("tr");
    const d = m.defaults || {};
    const cells = [
      m.name, m.status, megabytes(m.file_bytes),
      m.parameters == null ? "?" : m.parameters.toLocaleString(),
      number(m.bits_per_weight), m.bits_per_weight_1bit == null ? "?" : `${number(m.bits_per_weight_1bit)} b/w · ${number(100 * (m.fraction_1bit || 0), 0)}%`,
      d.width ? `${d.width}x${d.height}` : "?",
    ];
    tr.replaceChildren(...cells.map((c) => { const td = document.createElement("td"); td.textContent = c; return td; }));
    return tr;
  });
  document.querySelector("#models_table tbody").replaceChildren(...rows);
}

init().catch((e) => showError(e.message));
