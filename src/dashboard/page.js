// relayrate's live dashboard. Everything shown comes from this node's
// /api/* and is put in the page as text (textContent, createElement):
// keys are chosen by the clients, never markup.
"use strict";

const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";
let token = sessionStorage.getItem("relayrate-token") || "";

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

function row(cells) {
  const tr = el("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

function time(ms) {
  return ms ? new Date(ms).toLocaleString() : "-";
}

function showProblem(text) {
  const p = document.getElementById("problem");
  p.textContent = text;
  p.hidden = !text;
}

class NeedToken extends Error {}

async function api(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const r = await fetch(path, { headers, cache: "no-store" });
  if (r.status === 401) throw new NeedToken();
  const body = await r.json();
  if (!r.ok) throw new Error(path + ": " + (body.error || r.status));
  return body;
}

function definitions(dl, pairs) {
  clear(dl);
  for (const [name, value, cls] of pairs) {
    dl.appendChild(el("dt", name));
    dl.appendChild(el("dd", value, cls));
  }
}

function showStatus(s) {
  definitions(document.getElementById("node"), [
    ["this node", s.id + " (" + s.role + ")"],
    ["leader", s.leader_id ? s.leader_id + " at " + s.leader_addr : "none", s.leader_id ? "" : "bad"],
    ["decides", s.ready ? "yes" : "no", s.ready ? "" : "bad"],
    ["term", s.term],
    ["log / applied", s.last_log_index + " / " + s.last_applied_index],
    ["counters / leases", s.counters + " / " + s.leases],
  ]);
  const members = document.querySelector("#members tbody");
  clear(members);
  for (const m of s.members) {
    members.appendChild(row([m.id, m.addr, m.voter ? "yes" : "no",
      el("td", m.health, "health-" + m.health), m.matched_index]));
  }
}

// The policy's files, fetched again only when its hash changes.
let policyHash = null;

async function showPolicy(s) {
  if (s.policy_hash === policyHash) return;
  const p = await api("api/policy");
  policyHash = s.policy_hash;
  definitions(document.getElementById("policy"), [
    ["hash", p.hash],
    ["applied", time(p.applied_unix_ms)],
    ["files", p.files.map((f) => f.name).join(", ")],
  ]);
  const files = document.getElementById("policy-files");
  clear(files);
  for (const f of p.files) {
    const d = el("details");
    d.appendChild(el("summary", f.name));
    d.appendChild(el("pre", f.text, "policy"));
    files.appendChild(d);
  }
}

function showTop(t) {
  const body = document.querySelector("#top tbody");
  clear(body);
  if (t.keys.length === 0) {
    const tr = row(["no key counted"]);
    body.appendChild(tr);
  }
  for (const k of t.keys) {
    const of = el("td");
    if (k.limit > 0) {
      const bar = el("span", null, k.percent >= 80 ? "bar high" : "bar");
      bar.style.width = Math.min(k.percent, 100) / 2 + "px";
      of.appendChild(bar);
      of.appendChild(document.createTextNode(k.percent.toFixed(0) + "%"));
    } else {
      of.textContent = "no limit";
    }
    body.appendChild(row([k.check, el("td", k.key, "key"), k.count,
      k.limit || "-", of, k.window_secs ? k.window_secs + " s" : "-"]));
  }
  const unusual = document.querySelector("#unusual tbody");
  clear(unusual);
  if (t.unusual.length === 0) unusual.appendChild(row(["no unusual key"]));
  for (const k of t.unusual) {
    unusual.appendChild(row([k.check, el("td", k.key, "key"), k.bucket_count,
      k.baseline == null ? "-" : k.baseline.toFixed(1), k.count, k.limit || "-"]));
  }
}

// Per-minute rates between samples of the running totals.
function rates(samples, field) {
  const points = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = samples[i].unix_ms - samples[i - 1].unix_ms;
    if (dt <= 0) continue;
    const dv = samples[i][field] - samples[i - 1][field];
    points.push([samples[i].unix_ms, Math.max(dv, 0) * 60000 / dt]);
  }
  return points;
}

function chart(id, series) {
  const box = document.getElementById(id);
  clear(box);
  const w = 600, h = 160, left = 40, bottom = 16;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  svg.setAttribute("preserveAspectRatio", "none");
  const now = Date.now(), from = now - 3600 * 1000;
  let max = 1;
  for (const s of series) for (const [, v] of s.points) max = Math.max(max, v);
  const x = (t) => left + (w - left) * Math.min(Math.max(t - from, 0) / (now - from), 1);
  const y = (v) => (h - bottom) - (h - bottom - 4) * v / max;
  const axis = document.createElementNS(SVG, "path");
  axis.setAttribute("d", "M" + left + " 0 V" + (h - bottom) + " H" + w);
  axis.setAttribute("class", "axis");
  svg.appendChild(axis);
  const label = (text, lx, ly) => {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", lx);
    t.setAttribute("y", ly);
    t.textContent = text;
    svg.appendChild(t);
  };
  label(max.toFixed(max < 10 ? 1 : 0), 2, 12);
  label("0", 2, h - bottom);
  label("-60 min", left, h - 2);
  label("now", w - 24, h - 2);
  for (const s of series) {
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", s.points.map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1)).join(" "));
    line.setAttribute("class", "line-" + s.name);
    svg.appendChild(line);
    // The latest point, visible even when it is the only one.
    const last = s.points[s.points.length - 1];
    if (last) {
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("cx", x(last[0]).toFixed(1));
      dot.setAttribute("cy", y(last[1]).toFixed(1));
      dot.setAttribute("r", "2.5");
      dot.setAttribute("class", "line-" + s.name);
      svg.appendChild(dot);
    }
    if (s.points.length) label(s.name, w - 60, s.name === "refused" ? 24 : 12);
  }
  box.appendChild(svg);
}

function showHistory(hist) {
  const s = hist.samples;
  chart("chart-decisions", [
    { name: "allowed", points: rates(s, "allowed") },
    { name: "refused", points: rates(s, "refused") },
  ]);
  chart("chart-refusals", [{ name: "refused", points: rates(s, "milter_refused") }]);
}

function showRefusals(r) {
  const body = document.querySelector("#refusals tbody");
  clear(body);
  if (r.refusals.length === 0) body.appendChild(row(["none yet"]));
  for (const e of r.refusals) {
    body.appendChild(row([time(e.unix_ms), el("td", e.client, "key"), e.check,
      el("td", e.counted, "key"), e.count + " / " + e.limit, e.stage,
      el("td", e.sender, "key"), el("td", e.auth, "key"), e.dry_run ? "yes" : "no"]));
  }
}

// Each part is shown on its own: a leader out of reach leaves this node's
// own status and history on the page, with the reason above.
async function refresh() {
  const parts = [
    ["api/status", async (s) => { showStatus(s); await showPolicy(s); }],
    ["api/top", showTop],
    ["api/history", showHistory],
    ["api/refusals", showRefusals],
  ];
  const results = await Promise.allSettled(parts.map(async ([path, show]) => show(await api(path))));
  const failures = results.filter((r) => r.status === "rejected").map((r) => r.reason);
  if (failures.some((e) => e instanceof NeedToken)) {
    document.getElementById("login").hidden = false;
    showProblem(token ? "wrong admin token" : "");
    return;
  }
  document.getElementById("login").hidden = true;
  showProblem(failures.map((e) => String(e.message || e)).join("; "));
  if (failures.length < parts.length) {
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }
}

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = document.getElementById("token").value;
  sessionStorage.setItem("relayrate-token", token);
  refresh();
});

refresh();
setInterval(refresh, REFRESH_MS);
