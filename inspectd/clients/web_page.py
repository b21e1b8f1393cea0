"""The web view's page (`inspectd web`): one HTML document with its style and script inline, no build step and nothing
fetched from elsewhere. It asks /api/state for the state every POLL_MS with a plain request (see inspectd.clients.web:
no connection is held per open page) and renders it; each defect's overlay <img> carries `data-archive-id`,
`data-loaded-at` (epoch ms) once the browser has drawn it, `data-retries` while it is asked for again and
`data-missing` once the page has given up on it; each live frame's <img> carries `data-asked-at` (epoch ms) while an
ask for it is pending, and class `stale` (greyed) unless the state gives it an age under LIVE_STALE_S. The live frame
is sampled (one a second at most), not the `last` result printed beside it: the camera's stats say how old it is. A
camera the daemon's status no longer lists has its section marked `gone` (greyed, labelled, its live frame hidden and
no longer asked for), and so has a section the page drew from a web view since restarted, whose state no longer names
that camera."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>inspectd</title>
<style>
  :root { --ok: #2e7d32; --bad: #c62828; --warn: #ef6c00; --fg: #1d1d1f; --muted: #6b6b70; --line: #dcdce0; }
  body { font: 14px/1.4 system-ui, sans-serif; color: var(--fg); margin: 0; background: #f6f6f8; }
  header { display: flex; gap: 1.5em; align-items: baseline; padding: .7em 1.2em; background: #fff;
           border-bottom: 1px solid var(--line); flex-wrap: wrap; }
  header h1 { font-size: 1.2em; margin: 0; }
  .pill { padding: .1em .6em; border-radius: 1em; color: #fff; font-weight: 600; }
  .pill.ok { background: var(--ok); } .pill.bad { background: var(--bad); } .pill.warn { background: var(--warn); }
  .muted { color: var(--muted); }
  #alarms { margin: 0; padding: .4em 1.2em; background: #fdecea; color: var(--bad); list-style: none; }
  #alarms:empty { display: none; }
  main { display: grid; gap: 1em; padding: 1em; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); }
  section.camera { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: .8em; }
  section.camera h2 { margin: 0 0 .5em; font-size: 1.1em; }
  .top { display: grid; grid-template-columns: 200px 1fr; gap: .8em; }
  .live { width: 200px; height: 200px; object-fit: contain; background: #222; border-radius: 4px; }
  img.live.absent, section.camera.gone img.live { visibility: hidden; }
  img.live.stale { filter: grayscale(1); opacity: .5; }
  table.stats td { padding: 0 .8em 0 0; } table.stats td:first-child { color: var(--muted); }
  svg.hist { width: 100%; height: 90px; margin-top: .4em; }
  .defects { display: flex; gap: .5em; overflow-x: auto; margin-top: .6em; min-height: 150px; }
  .defect { flex: none; text-align: center; font-size: 12px; }
  .defect img { width: 128px; height: 128px; object-fit: contain; background: #222; border-radius: 4px;
                display: block; }
  .verdict-defect { color: var(--bad); font-weight: 600; } .verdict-ok { color: var(--ok); }
  .verdict-error { color: var(--warn); font-weight: 600; }
  .hist-note { font-size: 11px; }
  section.camera.gone { filter: grayscale(1); opacity: .55; }
  .gone-note { display: none; font-weight: normal; font-size: .85em; }
  section.camera.gone .gone-note { display: inline; }
</style>
</head>
<body>
<header>
  <h1>inspectd <span id="station" class="muted"></span></h1>
  <span id="health" class="pill warn">connecting</span>
  <span id="model" class="muted"></span>
  <span id="feed" class="muted"></span>
</header>
<ul id="alarms"></ul>
<main id="cameras"></main>
<script>
"use strict";
const $ = (sel, root = document) => root.querySelector(sel);
const fmt = (v, digits = 3) => v === null || v === undefined ? "-" : Number(v).toPrecision(digits);
// Status fields come from whoever publishes on the endpoint: a rate that is not a number must not stop the render.
const rate = (v) => typeof v === "number" ? `${v.toFixed(1)} frames/s` : "-";
const when = (t) => new Date(t * 1000).toLocaleTimeString();
// Text from the status message goes into markup only escaped: whoever can publish on the endpoint must not script
// the operator's page.
const esc = (v) => String(v).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                                          "'": "&#39;"})[c]);

function cameraSection(name) {
  let section = document.getElementById("camera-" + name);
  if (section) return section;
  section = document.createElement("section");
  section.className = "camera";
  section.id = "camera-" + name;
  section.innerHTML = `
    <h2><span class="name"></span> <span class="gone-note muted">not in the daemon's config</span></h2>
    <div class="top">
      <img class="live" alt="live frame (sampled)">
      <div>
        <table class="stats"><tbody></tbody></table>
        <svg class="hist" viewBox="0 0 210 90" preserveAspectRatio="none"></svg>
        <div class="muted hist-note"></div>
      </div>
    </div>
    <div class="defects"></div>`;
  $("h2 .name", section).textContent = name;
  const live = $("img.live", section);
  live.onerror = () => { delete live.dataset.askedAt; live.classList.add("absent"); };
  live.onload = () => { delete live.dataset.askedAt; live.classList.remove("absent"); };
  $("#cameras").appendChild(section);
  return section;
}

function stats(view, cameraStatus, since) {
  if (view.gone) cameraStatus = {state: "not in the daemon's config"};
  // The daemon's own counters when its status carries them; this view's start with it and miss what it dropped.
  const c = view.daemon_counts || view.counts, last = view.last || {};
  const scope = view.daemon_counts ? "daemon, since it started" : `this view, since ${when(since)}`;
  const rows = [
    ["state", cameraStatus ? esc(cameraStatus.state) : "-"],
    ["ok / defect / error", `${c.ok} / ${c.defect} / ${c.error} <span class="muted">(${scope})</span>`],
    ["throughput", rate(view.throughput_fps)],
    ["latency p50 / p99", `${fmt(view.latency_ms.p50)} / ${fmt(view.latency_ms.p99)} ms`],
    // The live frame is one frame a second at most, not the result in the row below: its age says which is which.
    ["live frame", typeof view.live_age_s === "number" ? `sampled, ${view.live_age_s.toFixed(0)} s old` : "-"],
    ["last", last.verdict ? `<span class="verdict-${last.verdict}">${last.verdict}</span> ` +
                            `score ${fmt(last.score)} (threshold ${fmt(last.threshold)})` : "-"],
  ];
  return rows.map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join("");
}

function histogram(svg, hist) {
  const bins = hist.bins, n = bins.length, max = Math.max(1, ...bins), w = 200 / (n - 1);
  let out = "";
  bins.forEach((count, i) => {
    const h = 80 * count / max, x = i * w;
    const colour = i >= (n - 1) / 2 ? "#c62828" : "#2e7d32";
    out += `<rect x="${x + 0.5}" y="${80 - h}" width="${w - 1}" height="${h}" fill="${colour}"></rect>`;
  });
  out += `<line x1="100" y1="0" x2="100" y2="80" stroke="#1d1d1f" stroke-dasharray="3,2"></line>`;
  out += `<text x="102" y="89" font-size="8">threshold ${fmt(hist.threshold)}</text>`;
  out += `<text x="0" y="89" font-size="8">0</text><text x="190" y="89" font-size="8">2x</text>`;
  svg.innerHTML = out;
}

const overlayUrl = (id, tries) => `/archive/${encodeURIComponent(id)}/overlay` + (tries ? `?try=${tries}` : "");

// A result can reach the page before its overlay reaches the disk (the daemon's archive writer behind, a daemon
// just started): a failed overlay is asked for again, less and less often, for about a minute, and only then said
// to be missing. The server waits a moment before its 404 only for an id of the last few seconds.
const OVERLAY_RETRY_MS = [500, 1000, 2000, 4000, 8000, 15000, 30000];

function overlayFailed(img, caption) {
  if (!img.isConnected) return;  // dropped from the strip meanwhile
  const tries = Number(img.dataset.retries || 0);
  if (tries >= OVERLAY_RETRY_MS.length) {
    img.dataset.missing = "1";
    caption.textContent += " - overlay not in the archive";
    return;
  }
  img.dataset.retries = String(tries + 1);
  setTimeout(() => { if (img.isConnected) img.src = overlayUrl(img.dataset.archiveId, tries + 1); },
             OVERLAY_RETRY_MS[tries]);
}

// Without an archive id (archive off or behind) a defect is its seq and publish time: seqs start again when the
// daemon's journal is wiped or off, and a new defect must not take an old one's place and caption.
const defectKey = (d) => d.archive_id || `seq-${d.seq}-${d.t_publish}`;

function defects(strip, list) {
  const wanted = new Set(list.map(defectKey));
  for (const el of Array.from(strip.children)) if (!wanted.has(el.dataset.key)) el.remove();
  for (const d of list) {  // newest first; appending an element that is already there moves it, never reloads it
    const key = defectKey(d);
    let el = strip.querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (!el) {
      el = document.createElement("div");
      el.className = "defect";
      el.dataset.key = key;
      const img = document.createElement("img"), caption = document.createElement("div");
      img.alt = "defect overlay";
      caption.textContent = `${fmt(d.score)} @ ${when(d.t_capture)} (${d.regions} region${d.regions === 1 ? "" : "s"})`;
      if (d.archive_id) {
        img.dataset.archiveId = d.archive_id;
        img.onload = () => { img.dataset.loadedAt = String(Date.now()); };
        img.onerror = () => overlayFailed(img, caption);
        img.src = overlayUrl(d.archive_id, 0);
      }
      el.append(img, caption);
    }
    strip.appendChild(el);
  }
}

// Each camera's last view as drawn, and the start of the web view that sent it.
const drawn = new Map();

function render(state) {
  const status = state.status || {};
  $("#station").textContent = status.station || "";
  const health = $("#health");
  if (!state.daemon_reporting) { health.className = "pill warn"; health.textContent = "daemon not reporting"; }
  else if (status.healthy) { health.className = "pill ok"; health.textContent = "healthy"; }
  else { health.className = "pill bad"; health.textContent = "UNHEALTHY"; }
  $("#model").textContent = status.model_id ? `model ${status.model_id}, thresholds v${status.thresholds_version}` : "";
  $("#feed").textContent = status.throughput_fps !== undefined ? rate(status.throughput_fps) : "";
  $("#alarms").innerHTML = "";
  for (const alarm of state.alarms) {
    const li = document.createElement("li");
    li.textContent = alarm;
    $("#alarms").appendChild(li);
  }
  const cameraStatus = status.cameras || {};
  for (const [name, view] of Object.entries(state.cameras)) {
    const section = cameraSection(name);
    // A camera the daemon no longer runs keeps its tile, greyed and labelled, rather than vanishing without a word:
    // the operator sees what was removed (by intent or by a wrong config) and that its figures are no longer live.
    section.classList.toggle("gone", Boolean(view.gone));
    $("img.live", section).classList.toggle("stale", !(view.live_age_s <= LIVE_STALE_S));
    $("table.stats tbody", section).innerHTML = stats(view, cameraStatus[name], state.view_started);
    histogram($("svg.hist", section), view.histogram);
    $(".hist-note", section).textContent = `scores received by this view since ${when(state.view_started)}`;
    defects($(".defects", section), view.defects);
    drawn.set(name, {view, since: state.view_started});
  }
  // A web view restarted (with a daemon that no longer runs a camera) names only what it has heard of since: every
  // camera its last status lists and every one that sent a result. A tile this page drew from the view before it
  // is then a camera gone, shown as the view shows one it saw go: the tile kept, greyed and labelled, with its last
  // figures (counted by the view that received them), not removed without a word. Before the view's first status
  // it cannot know the daemon's cameras, and the tile is left as it was.
  const listed = status.cameras !== null && typeof status.cameras === "object" && !Array.isArray(status.cameras);
  for (const [name, last] of drawn) {
    if (!listed || Object.hasOwn(state.cameras, name)) continue;
    const section = cameraSection(name);
    section.classList.add("gone");
    const frozen = {...last.view, daemon_counts: null, throughput_fps: 0, gone: true};
    $("table.stats tbody", section).innerHTML = stats(frozen, undefined, last.since);
  }
}

// A camera's live frame is asked for again only once the last ask ended: on a slow link a frame can take longer than
// LIVE_MS, and the next ask would cut it off (no newer frame ever drawn, and a connection lost each time). An ask the
// link never answers is given up on after LIVE_GIVE_UP_MS, so the frame is not stopped for good.
const LIVE_MS = 1000, LIVE_GIVE_UP_MS = 10000;
// A live frame this much older than its camera's sampling (once a second) is greyed: the camera stopped sending.
const LIVE_STALE_S = 5;

function refreshLive() {
  const now = Date.now();
  for (const img of document.querySelectorAll("section.camera:not(.gone) img.live")) {
    if (now - Number(img.dataset.askedAt || 0) < LIVE_GIVE_UP_MS) continue;
    const name = img.closest("section").id.slice("camera-".length);
    img.dataset.askedAt = String(now);
    img.src = `/live/${encodeURIComponent(name)}.jpg?t=${now}`;
  }
}

// Asked for, not streamed: a stream would hold one of the browser's six connections to this host for as long as the
// page is open, and six open pages would leave none for frames, overlays or a seventh. Each ask is cut off after
// POLL_TIMEOUT_MS, so a web view that went away is said and asked again, never waited on for good.
const POLL_MS = 500, POLL_TIMEOUT_MS = 5000;

async function fetchState() {
  const abort = new AbortController(), timer = setTimeout(() => abort.abort(), POLL_TIMEOUT_MS);
  try {
    const reply = await fetch("/api/state", {cache: "no-store", signal: abort.signal});
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    return await reply.json();
  } catch (e) {
    $("#health").className = "pill warn";
    $("#health").textContent = "web view reconnecting";
    return null;
  } finally {
    clearTimeout(timer);
  }
}

async function poll() {
  try {
    const state = await fetchState();
    if (state) render(state);
  } finally {  // a state the page cannot draw must not end the asking
    setTimeout(poll, POLL_MS);
  }
}

poll();
setInterval(refreshLive, LIVE_MS);
</script>
</body>
</html>
"""
