// lockgate's web view: renders /api/status (the `status --json` contract), the rollout timeline and
// /api/history, and follows /events (server-sent events) for every status change. Read-only; every
// string from the mesh or from Git goes into the page as text (textContent), never as HTML.
"use strict";

const view = { status: null, decisions: [], history: null, traffic: null, page: "mesh" };
const SVG = "http://www.w3.org/2000/svg";

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v; else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

const short = (sha) => (sha ? String(sha).slice(0, 12) : "-");
const clock = (t) => (t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : "-");
const stamp = (t) => (t ? new Date(t * 1000).toLocaleString([], { hour12: false }) : "-");
const badge = (text, kind) => h("span", { class: `badge ${kind || text}` }, text);
const num = (v) => (v === null || v === undefined ? "no values" : Number(v).toPrecision(4).replace(/\.?0+$/, ""));

function table(head, rows, empty) {
  if (!rows.length) return h("p", { class: "empty" }, empty || "none");
  return h("table", {}, h("thead", {}, h("tr", {}, head.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => (c instanceof Node && c.tagName === "TD" ? c : h("td", {}, c)))))));
}

// --- header -------------------------------------------------------------------------------------

function renderSummary() {
  const st = view.status;
  const el = document.getElementById("summary");
  if (!st) return;
  const rev = st.revision || {};
  const lg = st.lockgate || {};
  el.replaceChildren(
    `applied ${short(rev.applied)}`,
    rev.head && rev.head !== rev.applied ? `  head ${short(rev.head)}` : "",
    rev.failed ? `  refused ${short(rev.failed)}` : "",
    "  ",
    lg.suspended ? badge("suspended", "suspended") : "",
  );
}

// --- Mesh ---------------------------------------------------------------------------------------

function renderMesh() {
  const st = view.status;
  const page = document.getElementById("page-mesh");
  if (!st) return;
  const cards = [];
  const rev = st.revision || {};
  if (rev.lastError && rev.lastError.length) {
    cards.push(h("div", { class: "card" }, h("h2", { class: "error" }, `revision ${short(rev.failed)} refused`),
      h("ul", {}, rev.lastError.map((e) => h("li", { class: "mono" }, e)))));
  }
  for (const c of st.clusters || []) {
    const proxies = (c.proxies || []).map((p) => [
      h("td", { class: "mono" }, p.id), p.kind, badge(p.state || "-", p.state),
      p.connected ? "yes" : "no", h("td", { class: "mono" }, short(p.ackedRevision)),
      h("td", { class: "nack" }, p.nack ? `${p.nackType || ""}: ${p.nack}` : ""),
    ]);
    const services = {};
    for (const w of (st.workloads || []).filter((x) => x.cluster === c.name)) {
      const key = `${w.service}.${w.namespace} ${w.version}`;
      services[key] = services[key] || { service: `${w.service}.${w.namespace}`, version: w.version, ready: 0, all: 0 };
      services[key].all += 1;
      if (w.ready) services[key].ready += 1;
    }
    const svcRows = Object.values(services).sort((a, b) => (a.service + a.version).localeCompare(b.service + b.version))
      .map((x) => [x.service, x.version, `${x.ready}/${x.all} ready`]);
    const edges = ((view.traffic && view.traffic.clusters) || []).find((t) => t.name === c.name);
    const converged = c.convergedRevision ? `converged ${short(c.convergedRevision)}` : "converging";
    cards.push(h("div", { class: "card", "data-cluster": c.name },
      h("h2", {}, `cluster ${c.name}`),
      h("div", { class: "meta mono" }, `ingress http://${c.ingress}  ·  control plane ${c.controlPlane}  ·  applied ${short(c.appliedRevision)}  ·  ${converged}`),
      h("h3", {}, "services and versions"),
      table(["service", "version", "instances"], svcRows, "no workloads"),
      h("h3", {}, "traffic per edge", c.prometheus && c.prometheus.url ? ` (Prometheus, last ${(view.traffic && view.traffic.window) || "1m"})` : ""),
      !(c.prometheus && c.prometheus.url) ? h("p", { class: "empty" }, "no Prometheus for this cluster")
        : edges && edges.error ? h("p", { class: "error" }, edges.error)
          : table(["from", "to", "version", "req/s", "5xx/s"], ((edges && edges.edges) || []).map((e) =>
            [e.from, e.to, e.version || "any", e.rps.toFixed(2), e.errorRps.toFixed(2)]), "no requests yet"),
      h("h3", {}, "proxies"),
      table(["proxy", "kind", "state", "connected", "ACKed revision", "NACK"], proxies, "no proxies yet")));
  }
  if (!cards.length) cards.push(h("p", { class: "empty" }, "no cluster yet: nothing applied"));
  page.replaceChildren(...cards);
}

// --- Rollout ------------------------------------------------------------------------------------

function runDecisions(r) {
  const id = `${r.namespace}/${r.name}`;
  return view.decisions.filter((d) => d.rollout === id && r.canaryRevision && d.canaryRevision === r.canaryRevision);
}

function markClass(action) {
  return ["promote", "step", "start", "hold", "rollback"].includes(action) ? action : "other";
}

function chart(r, decisions) {
  const W = 900, H = 200, L = 40, R = 12, T = 12, B = 26;
  const svg = s("svg", { class: "timeline", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
    "aria-label": `weight of ${r.canary || "the canary"} over time` });
  const now = Date.now() / 1000;
  const t0 = r.startedAt || (decisions[0] && decisions[0].at) || now - 60;
  const t1 = Math.max(r.finishedAt || now, t0 + 1);
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (w) => T + (1 - w / 100) * (H - T - B);
  for (const w of [0, 25, 50, 75, 100]) {
    svg.append(s("line", { class: "grid", x1: L, x2: W - R, y1: y(w), y2: y(w) }));
    svg.append(s("text", { class: "label", x: 4, y: y(w) + 4 }, `${w}%`));
  }
  svg.append(s("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  svg.append(s("text", { class: "label", x: L, y: H - 8 }, clock(t0)));
  svg.append(s("text", { class: "label", x: W - R - 60, y: H - 8 }, clock(t1)));
  let points = [];
  let last = 0;
  for (const d of decisions) {
    points.push(`${x(d.at)},${y(last)}`, `${x(d.at)},${y(d.weight)}`);
    last = d.weight;
  }
  if (!r.finishedAt) points.push(`${x(t1)},${y(last)}`);
  if (points.length) svg.append(s("polyline", { class: "weights", points: points.join(" ") }));
  for (const d of decisions) {
    const mark = s("circle", { class: `mark ${markClass(d.action)}`, cx: x(d.at), cy: y(d.weight), r: 5 });
    mark.append(s("title", {}, `${clock(d.at)} ${d.action} ${d.weight}%: ${(d.reasons || []).join("; ")}`));
    svg.append(mark);
  }
  return svg;
}

function checksTable(checks) {
  return table(["metric", "cluster", "value", "threshold", "result"], (checks || []).map((c) => [
    c.metric, c.cluster, num(c.value),
    [c.min !== null && c.min !== undefined ? `min ${c.min}` : "", c.max !== null && c.max !== undefined ? `max ${c.max}` : ""].filter(Boolean).join(", ") || "-",
    badge(c.result === c.effective ? c.result : `${c.result} (${c.effective})`, c.effective),
  ]), "no analysis yet");
}

function renderRollout() {
  const st = view.status;
  const page = document.getElementById("page-rollout");
  if (!st) return;
  const rollouts = st.rollouts || [];
  if (!rollouts.length) {
    page.replaceChildren(h("p", { class: "empty" }, "no Rollout in the applied revision"));
    return;
  }
  page.replaceChildren(...rollouts.map((r) => {
    const id = `${r.namespace}/${r.name}`;
    const decisions = runDecisions(r);
    const last = r.lastDecision;
    const listed = decisions.length ? decisions.slice().reverse()
      : view.decisions.filter((d) => d.rollout === id).slice(-10).reverse();
    const step = r.step ? `step ${r.step}/${(r.steps || []).length}` : "";
    return h("div", { class: "card rollout", "data-rollout": id, "data-phase": r.phase, "data-weight": r.weight },
      h("h2", {}, `rollout ${id} `, badge(r.phase, r.phase), r.paused ? " " : "", r.paused ? badge("paused", "hold") : "",
        st.lockgate && st.lockgate.suspended ? " " : "", st.lockgate && st.lockgate.suspended ? badge("held: lockgate is suspended", "suspended") : ""),
      h("div", { class: "row" },
        h("span", { class: "weight", "data-weight": r.weight }, `${r.weight}%`),
        h("span", {}, `to ${r.canary || "-"} (stable ${r.stable}, ${r.strategy}, service ${r.service}) ${step}`),
        h("span", { class: "meta" }, `failed checks ${r.failedChecks}/${r.failureThreshold ?? "-"}`,
          r.nextAnalysisAt && r.phase === "progressing" ? ` · next analysis ${clock(r.nextAnalysisAt)}` : "")),
      h("h3", {}, "weight over the run"),
      r.canaryRevision ? chart(r, decisions) : h("p", { class: "empty" }, "no run yet"),
      h("h3", {}, "metrics against their thresholds (last analysis)"),
      checksTable(last && last.checks),
      h("h3", {}, "decisions"),
      listed.length ? h("ol", { class: "decisions" }, listed.map((d) => h("li", { class: "decision", "data-action": d.action, "data-weight": d.weight },
        h("span", { class: "mono" }, clock(d.at)), " ", badge(d.action, d.action), ` ${d.weight}% `,
        h("div", { class: "reasons" }, (d.reasons || []).join("; ") || "-"))))
        : last ? h("ol", { class: "decisions" }, h("li", { class: "decision", "data-action": last.action },
          h("span", { class: "mono" }, clock(last.at)), " ", badge(last.action, last.action), " ",
          h("div", { class: "reasons" }, (last.reasons || []).join("; "))))
          : h("p", { class: "empty" }, "no decision yet"));
  }));
}

// --- History ------------------------------------------------------------------------------------

function renderHistory() {
  const page = document.getElementById("page-history");
  const events = view.history;
  if (events === null) { page.replaceChildren(h("p", { class: "empty" }, "loading…")); return; }
  if (events.error) { page.replaceChildren(h("p", { class: "error" }, events.error)); return; }
  page.replaceChildren(h("div", { class: "card" }, h("h2", {}, "history (from Git)"), table(["when", "commit", "what", "detail"], events.map((e) => {
    if (e.type === "commit") {
      return [stamp(e.at), h("td", { class: "mono" }, short(e.sha)), e.automated ? badge(`lockgate: ${e.decision}`, e.decision) : "commit",
        `${e.automated ? "lockgate" : e.author}: ${e.subject}`];
    }
    if (e.type === "applied") return [stamp(e.at), h("td", { class: "mono" }, short(e.sha)), badge("applied", "ok"), `to ${(e.clusters || []).join(", ")}`];
    return [stamp(e.at), h("td", { class: "mono" }, short(e.sha)), badge(e.action || "decision", e.action),
      `${e.rollout}: ${e.weight}% ${(e.reasons || []).join("; ")}`];
  }), "no commits")));
}

// --- data ---------------------------------------------------------------------------------------

function render() {
  renderSummary();
  if (view.page === "mesh") renderMesh();
  if (view.page === "rollout") renderRollout();
  if (view.page === "history") renderHistory();
}

async function getJSON(path) {
  const resp = await fetch(path, { cache: "no-store" });
  return resp.json();
}

let historyFor = null;
async function loadHistory() {
  const rev = view.status && view.status.revision && view.status.revision.head;
  if (historyFor === rev && view.history !== null) return;
  historyFor = rev;
  try { view.history = await getJSON("/api/history?limit=100"); } catch (e) { view.history = { error: String(e) }; }
  if (view.page === "history") renderHistory();
}

async function loadTraffic() {
  try { view.traffic = await getJSON("/api/traffic"); } catch (e) { view.traffic = null; }
  if (view.page === "mesh") renderMesh();
}

function show(page) {
  view.page = ["mesh", "rollout", "history"].includes(page) ? page : "mesh";
  for (const el of document.querySelectorAll(".page")) el.classList.toggle("active", el.id === `page-${view.page}`);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === view.page);
  if (view.page === "history") loadHistory();
  if (view.page === "mesh") loadTraffic();
  render();
}

function follow() {
  const live = document.getElementById("live");
  const events = new EventSource("/events");
  events.addEventListener("open", () => { live.dataset.state = "live"; live.textContent = "live"; });
  events.addEventListener("error", () => { live.dataset.state = "lost"; live.textContent = "reconnecting"; });
  events.addEventListener("status", (e) => {
    const data = JSON.parse(e.data);
    view.status = data.status;
    view.decisions = data.decisions || [];
    render();
    if (view.page === "history") loadHistory();
  });
}

async function start() {
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  try {
    const [status, timeline] = await Promise.all([getJSON("/api/status"), getJSON("/api/timeline")]);
    view.status = status;
    view.decisions = timeline;
  } catch (e) {
    document.getElementById("summary").textContent = `cannot read /api/status: ${e}`;
  }
  show(location.hash.slice(1));
  follow();
  setInterval(() => { if (view.page === "mesh") loadTraffic(); }, 5000);
}

start();
