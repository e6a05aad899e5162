// iotnode live dashboard: plain JS, no framework, no network but this node.
//
// Login: ?token=<client jwt> in the address (removed from it at once) or the form;
// the token stays in sessionStorage for this tab.  Data: GET v1/devices (contexts of
// the devices the token allows), the live stream ws .../v1/stream (the same token),
// GET v1/health every second (node-wide numbers).  Every endpoint checks the token.
"use strict";

const STALE_AFTER_S = 10; // a device not heard from for this long is marked stale
const SERIES_POINTS = 60; // sparkline length (messages)
const MAX_FIELDS = 3; // numeric fields drawn per device
const MAX_ROWS = 400; // rows drawn at once (the filter narrows the rest)
const MAX_STREAM_DEVICES = 1024; // the stream's limit of device parameters
const HEALTH_EVERY_MS = 1000;
const COLORS = ["#1f77b4", "#d62728", "#2ca02c"];
const TOKEN_KEY = "iotnode-dashboard-token";
const SVG = "http://www.w3.org/2000/svg";

const state = {
  token: null,
  allowed: [],
  registry: false,
  contexts: new Map(), // device id -> registry context
  devices: new Map(), // device id -> {id, data, seq, seenAt, series: Map, row}
  groups: new Map(), // group key -> section element
  ws: null,
  backoff: 1000,
  timers: [],
  running: false,
};

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function showMessage(text, kind) {
  const box = $("message");
  box.textContent = text;
  box.className = "message" + (kind ? " " + kind : "");
  box.hidden = !text;
}

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = "status" + (kind ? " " + kind : "");
}

function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const d = digits === undefined ? (Math.abs(value) >= 100 ? 0 : 1) : digits;
  return value.toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: 0 });
}

function fmtAge(seconds) {
  if (seconds === null) return "never";
  if (seconds < 60) return seconds.toFixed(1) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min";
  return Math.floor(seconds / 3600) + " h";
}

// ------------------------------------------------------------------ API
class Refused extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path) {
  let response;
  try {
    response = await fetch(path, { headers: { Authorization: "Bearer " + state.token }, cache: "no-store" });
  } catch (err) {
    throw new Refused(0, "cannot reach the node");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) throw new Refused(response.status, (body && body.error) || "HTTP " + response.status);
  return body;
}

// ------------------------------------------------------------------ login
function showLogin() {
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  setStatus("not connected");
}

function stop() {
  state.running = false;
  for (const t of state.timers) clearTimeout(t);
  state.timers = [];
  if (state.ws) {
    const ws = state.ws;
    state.ws = null;
    ws.close(1000);
  }
}

function refused(err) {
  stop();
  sessionStorage.removeItem(TOKEN_KEY);
  const what =
    err.status === 401 ? "Token refused" : err.status === 403 ? "Access refused" : "Cannot open the dashboard";
  showMessage(what + ": " + err.message + ". Log in again with a valid client token.");
  setStatus("refused", "bad");
  showLogin();
}

function logout() {
  stop();
  sessionStorage.removeItem(TOKEN_KEY);
  state.devices.clear();
  state.groups.clear();
  $("groups").replaceChildren();
  showMessage("");
  showLogin();
}

async function login(token) {
  stop();
  state.token = token.trim();
  if (!state.token) {
    showMessage("Paste a client token first.");
    return;
  }
  setStatus("checking token…");
  let info;
  try {
    info = await api("v1/devices");
  } catch (err) {
    refused(err);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, state.token);
  state.allowed = info.allowed;
  state.registry = info.registry;
  state.contexts = new Map(info.devices.map((c) => [c.device_id, c]));
  state.devices.clear();
  state.groups.clear();
  $("groups").replaceChildren();
  for (const c of info.devices) device(c.device_id);
  showMessage("");
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  state.running = true;
  connect();
  pollHealth();
  renderLoop();
}

// ------------------------------------------------------------------ live stream
function streamUrl() {
  const url = new URL("v1/stream", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (state.allowed.includes("*")) url.searchParams.append("device", "*");
  else for (const d of state.allowed.slice(0, MAX_STREAM_DEVICES)) url.searchParams.append("device", d);
  url.searchParams.append("token", state.token); // a browser WebSocket cannot send headers
  return url.toString();
}

function connect() {
  if (!state.running) return;
  const ws = new WebSocket(streamUrl());
  state.ws = ws;
  setStatus("connecting…", "warn");
  ws.onopen = () => {
    state.backoff = 1000;
    setStatus("live", "ok");
  };
  ws.onmessage = (event) => {
    try {
      record(JSON.parse(event.data));
    } catch (err) {
      console.warn("bad stream frame", err);
    }
  };
  ws.onclose = (event) => closed(ws, event);
}

async function closed(ws, event) {
  if (state.ws !== ws || !state.running) return;
  state.ws = null;
  if (event.code === 1008) {
    refused(new Refused(401, event.reason || "token expired"));
    return;
  }
  // A refused handshake shows as 1006 in a browser: ask the node why.
  try {
    await api("v1/devices");
  } catch (err) {
    if (err.status === 401 || err.status === 403) {
      refused(err);
      return;
    }
  }
  const wait = Math.min(30000, state.backoff) * (0.5 + Math.random() / 2);
  state.backoff = Math.min(30000, state.backoff * 2);
  const why = event.code === 1013 ? "node asked to retry later (1013)" : "stream closed (" + event.code + ")";
  setStatus(why + ", reconnecting in " + (wait / 1000).toFixed(1) + " s", "warn");
  state.timers.push(setTimeout(connect, wait));
}

function device(id) {
  let d = state.devices.get(id);
  if (!d) {
    d = { id, data: undefined, seq: null, seenAt: null, series: new Map(), row: null, count: 0 };
    state.devices.set(id, d);
  }
  return d;
}

function numericFields(data) {
  if (typeof data === "number" && Number.isFinite(data)) return [["value", data]];
  if (data && typeof data === "object" && !Array.isArray(data)) {
    return Object.entries(data).filter(([, v]) => typeof v === "number" && Number.isFinite(v));
  }
  return [];
}

function record(r) {
  if (typeof r.device !== "string") return;
  const d = device(r.device);
  d.data = r.data;
  d.seq = r.seq;
  d.seenAt = Date.now() / 1000;
  d.count += 1;
  for (const [field, value] of numericFields(r.data)) {
    let series = d.series.get(field);
    if (!series) {
      if (d.series.size >= MAX_FIELDS) continue;
      series = [];
      d.series.set(field, series);
    }
    series.push(value);
    if (series.length > SERIES_POINTS) series.shift();
  }
}

// ------------------------------------------------------------------ devices
function groupOf(id) {
  const c = state.contexts.get(id);
  if (c && c.type !== "unknown") return [c.type, c.class, c.region].join(" · ");
  const dash = id.indexOf("-");
  return "prefix " + (dash > 0 ? id.slice(0, dash) : id);
}

function searchText(d) {
  const c = state.contexts.get(d.id);
  if (!c) return d.id.toLowerCase();
  const labels = Object.entries(c.labels || {}).map(([k, v]) => k + "=" + v);
  return [d.id, c.type, c.class, c.region, c.site, ...labels].join(" ").toLowerCase();
}

function sparkline(svg, d) {
  const w = 160;
  const h = 26;
  svg.replaceChildren();
  const titles = [];
  let i = 0;
  for (const [field, values] of d.series) {
    const lo = Math.min(...values);
    const hi = Math.max(...values);
    const span = hi - lo || 1;
    const step = values.length > 1 ? w / (SERIES_POINTS - 1) : 0;
    const x0 = w - step * (values.length - 1);
    const points = values
      .map((v, k) => (x0 + k * step).toFixed(1) + "," + (h - 2 - ((v - lo) / span) * (h - 4)).toFixed(1))
      .join(" ");
    svg.append(svgEl("polyline", { points, fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": "1.5" }));
    titles.push(field + " " + fmt(values[values.length - 1], 3) + " (" + fmt(lo, 3) + "…" + fmt(hi, 3) + ")");
    i += 1;
  }
  const title = svgEl("title");
  title.textContent = titles.join("\n");
  svg.append(title);
}

function row(d) {
  if (!d.row) {
    const r = el("div", "device");
    r.dataset.device = d.id;
    const c = state.contexts.get(d.id);
    r.append(el("span", "id", d.id));
    r.append(el("span", "site", c && c.site !== "unknown" ? c.site : ""));
    r.append(el("span", "value", "–"));
    const svg = svgEl("svg", { class: "spark", width: "160", height: "26", viewBox: "0 0 160 26" });
    r.append(svg);
    r.append(el("span", "age", "never"));
    r.title = d.id;
    d.row = r;
    d.shownCount = -1;
  }
  return d.row;
}

function updateRow(d, now) {
  const r = row(d);
  const age = d.seenAt === null ? null : Math.max(0, now - d.seenAt);
  const stale = age === null || age > STALE_AFTER_S;
  r.classList.toggle("stale", stale);
  r.querySelector(".age").textContent = fmtAge(age);
  if (d.shownCount !== d.count) {
    d.shownCount = d.count;
    let text = d.data === undefined ? "–" : JSON.stringify(d.data);
    if (text.length > 120) text = text.slice(0, 117) + "…";
    const value = r.querySelector(".value");
    value.textContent = text;
    value.title = "seq " + d.seq + ": " + text;
    sparkline(r.querySelector("svg.spark"), d);
  }
  return stale;
}

function render() {
  const now = Date.now() / 1000;
  const filter = $("filter").value.trim().toLowerCase();
  const all = [...state.devices.values()];
  let staleCount = 0;
  const shown = [];
  for (const d of all) {
    const stale = d.seenAt === null || now - d.seenAt > STALE_AFTER_S;
    if (stale) staleCount += 1;
    if (!filter || searchText(d).includes(filter)) shown.push(d);
  }
  $("device-count").textContent = String(all.length);
  $("stale-count").textContent = String(staleCount);
  shown.sort((a, b) => groupOf(a.id).localeCompare(groupOf(b.id)) || a.id.localeCompare(b.id));
  const drawn = shown.slice(0, MAX_ROWS);
  $("shown-note").textContent =
    (filter ? shown.length + " match" + (shown.length === 1 ? "" : "es") : "") +
    (drawn.length < shown.length ? " (first " + drawn.length + " drawn: narrow the filter)" : "");

  const byGroup = new Map();
  for (const d of drawn) {
    const key = groupOf(d.id);
    if (!byGroup.has(key)) byGroup.set(key, []);
    byGroup.get(key).push(d);
  }
  const container = $("groups");
  for (const [key, section] of state.groups) {
    if (!byGroup.has(key)) {
      section.remove();
      state.groups.delete(key);
    }
  }
  const drawnSet = new Set(drawn);
  for (const d of all) if (d.row && !drawnSet.has(d)) d.row.remove();
  for (const [key, members] of byGroup) {
    let section = state.groups.get(key);
    if (!section) {
      section = el("section", "group");
      section.dataset.group = key;
      const h = el("h2", null, key + " ");
      h.append(el("span", "count"));
      section.append(h);
      state.groups.set(key, section);
    }
    container.append(section); // keeps the groups in order
    const stale = members.filter((d) => updateRow(d, now)).length;
    section.querySelector("h2 .count").textContent =
      members.length + " device" + (members.length === 1 ? "" : "s") + (stale ? ", " + stale + " stale" : "");
    for (const d of members) section.append(d.row);
  }
  drawMap(shown, now);
}

function renderLoop() {
  if (!state.running) return;
  render();
  state.timers.push(setTimeout(renderLoop, 1000));
}

// ------------------------------------------------------------------ map
function ticks(lo, hi, count) {
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(+v.toFixed(6));
  return out;
}

function drawMap(shown, now) {
  const placed = shown
    .map((d) => [d, state.contexts.get(d.id)])
    .filter(([, c]) => c && typeof c.lat === "number" && typeof c.lon === "number");
  const panel = $("map-panel");
  panel.hidden = placed.length === 0;
  if (!placed.length) return;
  const svg = $("map");
  svg.replaceChildren();
  const W = 380;
  const H = 280;
  const L = 44;
  const R = 10;
  const T = 10;
  const B = 30;
  let [lat0, lat1, lon0, lon1] = [90, -90, 180, -180];
  for (const [, c] of placed) {
    lat0 = Math.min(lat0, c.lat);
    lat1 = Math.max(lat1, c.lat);
    lon0 = Math.min(lon0, c.lon);
    lon1 = Math.max(lon1, c.lon);
  }
  const padLat = Math.max(0.005, (lat1 - lat0) * 0.1);
  const padLon = Math.max(0.005, (lon1 - lon0) * 0.1);
  lat0 -= padLat;
  lat1 += padLat;
  lon0 -= padLon;
  lon1 += padLon;
  const x = (lon) => L + ((lon - lon0) / (lon1 - lon0)) * (W - L - R);
  const y = (lat) => H - B - ((lat - lat0) / (lat1 - lat0)) * (H - T - B);
  for (const v of ticks(lon0, lon1, 5)) {
    svg.append(svgEl("line", { class: "grid", x1: x(v), x2: x(v), y1: T, y2: H - B }));
    const t = svgEl("text", { x: x(v), y: H - B + 14, "text-anchor": "middle" });
    t.textContent = v + "°";
    svg.append(t);
  }
  for (const v of ticks(lat0, lat1, 5)) {
    svg.append(svgEl("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    const t = svgEl("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" });
    t.textContent = v + "°";
    svg.append(t);
  }
  svg.append(svgEl("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  svg.append(svgEl("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  const xl = svgEl("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" });
  xl.textContent = "longitude";
  const yl = svgEl("text", { x: 10, y: (T + H - B) / 2, transform: `rotate(-90 10 ${(T + H - B) / 2})`, "text-anchor": "middle" });
  yl.textContent = "latitude";
  svg.append(xl, yl);
  for (const [d, c] of placed) {
    const stale = d.seenAt === null || now - d.seenAt > STALE_AFTER_S;
    const dot = svgEl("circle", { cx: x(c.lon).toFixed(1), cy: y(c.lat).toFixed(1), r: 5, class: stale ? "stale" : "" });
    dot.dataset.device = d.id;
    const title = svgEl("title");
    title.textContent = d.id + " (" + c.site + ", " + c.lat + ", " + c.lon + ")" + (stale ? ", stale" : "");
    dot.append(title);
    svg.append(dot);
  }
}

// ------------------------------------------------------------------ health
function setNum(id, text, alert) {
  const node = $(id);
  node.textContent = text;
  node.closest(".tile").classList.toggle("alert", !!alert);
}

function showHealth(h) {
  setNum("h-acks", fmt(h.rates.acked));
  setNum("h-p99", h.ack_latency_ms.p99 === null ? "–" : fmt(h.ack_latency_ms.p99, 1) + " ms");
  setNum("h-stored", fmt(h.rates.stored));
  for (const ring of ["ingress", "fanin"]) {
    const r = h.rings[ring];
    setNum("h-" + ring, fmt(r.depth, 0), r.fill !== null && r.fill > 0.5);
    $("h-" + ring + "-fill").textContent = r.fill === null ? "" : (100 * r.fill).toFixed(2) + " % full";
  }
  setNum("h-lag", h.store_lag_s === null ? "–" : fmt(h.store_lag_s * 1000, 0) + " ms", h.store_lag_s > 5);
  const bp = h.backpressure;
  setNum("h-bp", fmt(bp.paused_connections, 2), bp.paused_connections > 0.01);
  $("h-bp-sub").textContent =
    "paused conns · " + fmt(bp.pauses_per_s, 1) + " pauses/s · ring full " + fmt(bp.ring_full_per_s, 1) + "/s";
  setNum("h-conns", fmt(h.device_connections, 0));
  setNum("h-clients", fmt(h.fanout_clients, 0));
  setNum("h-1013", fmt(h.closes_1013.total, 0), h.closes_1013.per_s > 0);
  $("h-1013-sub").textContent = h.closes_1013.per_s ? fmt(h.closes_1013.per_s, 2) + "/s" : "";
  const names = Object.keys(h.processes);
  const down = names.filter((n) => !h.processes[n].up);
  setNum("h-procs", names.length - down.length + "/" + names.length + " up", down.length > 0);
  $("h-procs-sub").textContent = down.length ? "down: " + down.join(", ") : "";
}

async function pollHealth() {
  if (!state.running) return;
  const started = Date.now();
  try {
    showHealth(await api("v1/health"));
  } catch (err) {
    if (err.status === 401 || err.status === 403) {
      refused(err);
      return;
    }
    setStatus("health: " + err.message, "warn");
  }
  if (state.running) state.timers.push(setTimeout(pollHealth, Math.max(100, HEALTH_EVERY_MS - (Date.now() - started))));
}

// ------------------------------------------------------------------ start
function start() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    login($("token-input").value);
  });
  $("logout").addEventListener("click", logout);
  $("filter").addEventListener("input", () => state.running && render());
  const url = new URL(location.href);
  let token = url.searchParams.get("token");
  if (token) {
    url.searchParams.delete("token"); // keep it out of the history and of bookmarks
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  } else {
    token = sessionStorage.getItem(TOKEN_KEY);
  }
  if (token) login(token);
  else showLogin();
}

start();
