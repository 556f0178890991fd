// The page's script, served from the service itself: its Content-Security-Policy allows no inline
// script or style, so styles are set through the CSSOM (node.style), never as attributes.
const API = "/api/v1";
const rows = [];
const $ = (id) => document.getElementById(id);
let cards = {};
let csrf = null;  // the login session's CSRF token, sent with every post

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function postHeaders() {
  return csrf ? { "X-CSRF-Token": csrf } : {};
}

function thresholdText(t) {
  if (t == null) return "most probable class";
  if (typeof t === "object") return "each label at its validation threshold";
  return "at threshold " + t.toFixed(3);
}

function bar(name, p, cls) {
  const fill = el("div", { class: "fill", style: `width:${(100 * p).toFixed(1)}%` });
  return el("div", { class: `bar ${cls}`, "data-name": name },
    el("span", {}, name), el("div", { class: "track" }, fill), el("span", { class: "prob-value" }, p.toFixed(3)));
}

function showCard(name) {
  const c = cards[name], dl = $("card");
  dl.replaceChildren();
  const val = c.metrics.validation || {};
  const items = [["Architecture", `${c.architecture} (${c.backbone})`], ["Modality", c.modality],
    ["Classes", c.classes.join(", ")], ["Lesions", c.lesions.join(", ") || "none"],
    ["Operating threshold", c.task !== "binary" ? (c.task === "multiclass" ? "most probable class" : "per label, chosen on validation") : (c.threshold == null ? "0.5" : c.threshold.toFixed(3))],
    ["Validation", Object.entries(val).filter(([k, v]) => typeof v === "number").map(([k, v]) => `${k} ${v.toFixed(3)}`)
      .concat(Object.entries(val.auc_by_head || {}).map(([k, v]) => `${k} AUC ${(+v).toFixed(3)}`)).join(", ") || "n/a"],
    ["Inference", c.backend + (c.heatmaps ? ", Grad-CAM++ heat maps" : "")], ["Intended use", c.intended_use]];
  for (const [k, v] of items) dl.append(el("dt", {}, k), el("dd", {}, v));
}

async function loadModels() {
  const res = await fetch(`${API}/models`);
  if (!res.ok) return;
  const body = await res.json();
  for (const c of body.models) {
    cards[c.name] = c;
    $("model").append(el("option", { value: c.name }, `${c.name} (${c.modality})`));
  }
  $("model").value = body.default;
  showCard(body.default);
}

function showResult(file, body, ok) {
  const box = $("results");
  if (!rows.length && box.querySelector(".muted")) box.replaceChildren();
  const item = el("div", { class: "result", "data-file": file.name });
  if (!ok) {
    item.append(el("div", {}, file.name), el("div", { class: "error" }, body.error ? body.error.message : "request failed"));
    box.prepend(item);
    return;
  }
  const overlay = el("div", { class: "overlay" });
  const info = el("div", {}, el("div", { class: "muted" }, file.name),
    el("div", { class: "label", "data-testid": "prediction" },
       Array.isArray(body.prediction) ? (body.prediction.join(", ") || "no finding above its threshold") : `${body.prediction}`),
    el("div", { class: "muted" }, `${thresholdText(body.threshold)} · ${body.timings_ms.total.toFixed(0)} ms · study ${body.study_id}`));
  const marks = typeof body.threshold === "object" && body.threshold ? body.threshold : null;
  for (const [name, p] of Object.entries(body.probabilities))
    info.append(bar(name + (marks && p >= marks[name] ? " ●" : ""), p, "class"));
  if (body.lesions) {
    info.append(el("h4", {}, "Lesion findings"));
    for (const [name, p] of Object.entries(body.lesions)) info.append(bar(name + (p >= 0.5 ? " ●" : ""), p, "lesion"));
  }
  if (body.montage_png) {  // a sequence model's slices weighted by its attention, a volume model's attention
    item.append(el("div", {}, el("img", { src: body.montage_png, class: "montage", alt: "attention montage",
      "data-testid": "montage" })), info);
  } else if (body.heatmap) {
    const heat = el("img", { src: body.heatmap.heatmap_png, class: "heat", alt: "heat map", style: "opacity:0.45" });
    overlay.append(el("img", { src: body.heatmap.image_png, alt: "image" }), heat);
    if (body.crop_box) {  // the model's own crop (AG-CNN's local branch input)
      const c = body.crop_box, [h, w] = c.grid;
      overlay.append(el("div", { class: "crop", title: "the model's crop", "data-testid": "crop-box",
        style: `left:${100 * c.x0 / w}%;top:${100 * c.y0 / h}%;width:${100 * (c.x1 - c.x0) / w}%;height:${100 * (c.y1 - c.y0) / h}%` }));
    }
    const slider = el("input", { type: "range", min: "0", max: "1", step: "0.05", value: "0.45", class: "opacity" });
    slider.addEventListener("input", () => { heat.style.opacity = slider.value; });
    const left = el("div", {}, overlay, el("label", {}, `${body.heatmap.method} opacity `, slider));
    item.append(left, info);
  } else {
    item.append(el("div", { class: "muted" }, "no heat map for this model"), info);
  }
  box.prepend(item);
  rows.push({ file: file.name, study_id: body.study_id, prediction: body.prediction, threshold: body.threshold,
              ...Object.fromEntries(Object.entries(body.probabilities).map(([k, v]) => [`p_${k}`, v])),
              ...Object.fromEntries(Object.entries(body.lesions || {}).map(([k, v]) => [`p_${k}`, v])) });
  $("csv").disabled = false;
}

async function waitForJob(file, job) {  // a volume too slow for one request: poll its job until it ends
  for (;;) {
    $("status").textContent = `${file.name}: job ${job.status}…`;
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const res = await fetch(job.status_url);
    if (!res.ok) return { ok: false, body: await res.json().catch(() => ({ error: { message: `HTTP ${res.status}` } })) };
    job = await res.json();
    if (job.status === "done") return { ok: true, body: job.result };
    if (job.status === "failed") return { ok: false, body: { error: job.error } };
  }
}

async function send(files) {
  let done = 0;
  for (const file of files) {
    $("status").textContent = `analysing ${file.name} (${done + 1}/${files.length})…`;
    const form = new FormData();
    form.append("file", file);
    form.append("model", $("model").value);
    try {
      const res = await fetch(`${API}/predict`, { method: "POST", body: form, headers: postHeaders() });
      if (res.status === 401) { showLogin("Your session has ended; log in again."); return; }
      if (res.status === 403 && csrf) await start();  // a login in another tab renewed the session
      if (res.status === 202) {
        const out = await waitForJob(file, await res.json());
        showResult(file, out.body, out.ok);
      } else {
        showResult(file, await res.json(), res.ok);
      }
    } catch (err) {
      showResult(file, { error: { message: String(err) } }, false);
    }
    done += 1;
  }
  $("status").textContent = `${done} file(s) analysed`;
}

function downloadCsv() {
  const cols = [...new Set(rows.flatMap(Object.keys))];
  // A text cell that starts like a formula (= + - @, tab, CR) is prefixed with ' so that a
  // spreadsheet shows it instead of running it (CSV injection).
  const neutral = (v) => (typeof v === "string" && /^[=+\-@\t\r]/.test(v) ? `'${v}` : v);
  const quote = (raw) => {
    const v = neutral(raw);
    return v == null ? "" : /[",\n\r]/.test(String(v)) ? `"${String(v).replaceAll('"', '""')}"` : String(v);
  };
  const text = [cols.join(","), ...rows.map((r) => cols.map((c) => quote(r[c])).join(","))].join("\n");
  const link = el("a", { href: URL.createObjectURL(new Blob([text], { type: "text/csv" })), download: "chestdx_results.csv" });
  link.click();
}

$("model").addEventListener("change", () => showCard($("model").value));
$("drop").addEventListener("click", () => $("files").click());
$("files").addEventListener("change", () => send([...$("files").files]));
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => { e.preventDefault(); $("drop").classList.remove("over"); send([...e.dataTransfer.files]); });
$("csv").addEventListener("click", downloadCsv);

function showLogin(message) {
  csrf = null;
  $("app").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

async function showApp(me) {
  csrf = me.csrf_token;
  $("login").hidden = true;
  $("app").hidden = false;
  $("who").hidden = !me.auth;
  $("who-name").textContent = me.actor.replace(/^user:/, "");
  if (!Object.keys(cards).length) await loadModels();
}

async function start() {
  const res = await fetch(`${API}/me`);
  if (res.ok) await showApp(await res.json()); else showLogin("");
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const res = await fetch(`${API}/login`, { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ username: $("username").value, password: $("password").value }) });
  $("password").value = "";
  if (!res.ok) {  // a proxy's own error page is not JSON
    const body = await res.json().catch(() => null);
    showLogin(body && body.error ? body.error.message : `login failed (HTTP ${res.status})`);
    return;
  }
  await start();
});

$("logout").addEventListener("click", async () => {
  await fetch(`${API}/logout`, { method: "POST", headers: postHeaders() });
  rows.length = 0;
  $("results").replaceChildren(el("p", { class: "muted" }, "No images yet."));
  $("csv").disabled = true;
  showLogin("Logged out.");
});

start();
