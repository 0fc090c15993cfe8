// The celeriac dashboard: one page, views chosen by the URL's hash, data from the JSON API,
// kept live by the server-sent `tick` stream (/api/stream). No framework, no CDN, no build
// step: this file is served as written.
"use strict";

const main = document.getElementById("main");
// Where the server is mounted: `/`, or a prefix such as `/ops/` when nested in an app's router.
const BASE = location.pathname.replace(/\/?$/, "/");
const flashBox = document.getElementById("flash");
let info = { read_only: false, events: true, beat: true, bucket_secs: 5 };
let tick = null; // the latest tick from /api/stream
let current = null; // the mounted view: { name, refresh(tick) }
const workerInfo = {}; // hostname → answers to stats / active_queues / registered

// ---------------------------------------------------------------------------------------------
// Helpers

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function when(t) {
  return t ? new Date(t * 1000).toLocaleTimeString() : "";
}

function ago(t) {
  if (!t) return "";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function secs(v) {
  if (v == null) return "";
  return v < 1 ? `${(v * 1000).toFixed(1)} ms` : `${v.toFixed(2)} s`;
}

/// The server cuts long values; the page cuts them again for table cells.
function clip(v, n = 80) {
  const s = String(v ?? "");
  return s.length > n ? s.slice(0, n) + "…" : s;
}

/// Calls the API. With a body it is a POST carrying the JSON content type and the
/// X-Requested-With header the server's cross-site guard asks for.
async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Requested-With": "celeriac-dashboard" },
    body: JSON.stringify(body),
  };
  const r = await fetch(BASE + path.replace(/^\//, ""), init);
  const data = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(data.error || `${r.status} ${r.statusText}`);
  return data;
}

function flash(message, kind = "ok") {
  const p = document.createElement("p");
  p.className = `flash ${kind}`;
  p.textContent = message;
  flashBox.prepend(p);
  setTimeout(() => p.remove(), kind === "error" ? 10000 : 4000);
}

function fail(e) {
  flash(e.message || String(e), "error");
}

/// A button that changes something: disabled (and hidden by the style sheet) in read-only mode.
function act(label, attrs = "", cls = "") {
  const ro = info.read_only ? ` disabled title="read-only server"` : "";
  return `<button class="mutating ${cls}" ${attrs}${ro}>${esc(label)}</button>`;
}

function state(s) {
  return `<span class="state state-${esc(s)}">${esc(s)}</span>`;
}

function taskLink(id, text) {
  return `<a href="#/task/${encodeURIComponent(id)}">${esc(text ?? id)}</a>`;
}

function on(selector, handler) {
  for (const el of main.querySelectorAll(selector)) el.onclick = (e) => handler(el, e);
}

/// Runs a change, says how it went, then refreshes the view.
function run(promise, done) {
  return promise.then((r) => { if (done) flash(typeof done === "function" ? done(r) : done); refresh(); }).catch(fail);
}

// ---------------------------------------------------------------------------------------------
// Charts: hand-drawn on a canvas, sized to the element and the screen's pixel ratio.

const COLORS = ["#2e7d32", "#c62828", "#b26a00", "#1565c0", "#6a1b9a", "#00838f", "#5d4037", "#ad1457"];

/// Fills the gaps between sparse buckets: one entry per interval over the last `n` intervals.
/// The window follows the data: from its first bucket (at least 2 minutes, at most 10).
function timeline(series, max) {
  const step = info.bucket_secs || 5;
  const now = Math.floor(Date.now() / 1000 / step) * step;
  const first = series && series.length ? series[0].at : now;
  const n = Math.min(max, Math.max(24, Math.floor((now - first) / step) + 2));
  const byAt = new Map((series || []).map((b) => [b.at, b]));
  const out = [];
  for (let at = now - (n - 1) * step; at <= now; at += step) out.push(byAt.get(at) || { at });
  return out;
}

/// Draws `lines` ([{label, color, values}]) as lines, or as stacked bars when `bars`.
function chart(canvas, lines, { bars = false, unit = "" } = {}) {
  if (!canvas) return;
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600, h = canvas.clientHeight || 140;
  canvas.width = w * ratio;
  canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  const n = Math.max(0, ...lines.map((l) => l.values.length));
  const top = 16, left = 44, bottom = h - 4;
  let max = 0;
  if (bars) for (let i = 0; i < n; i++) max = Math.max(max, lines.reduce((s, l) => s + (l.values[i] || 0), 0));
  else for (const l of lines) for (const v of l.values) if (v != null) max = Math.max(max, v);
  max = max || 1;
  const y = (v) => bottom - (v / max) * (bottom - top);
  const x = (i) => left + (i / Math.max(1, n - 1)) * (w - left - 4);
  g.strokeStyle = "#e2e4e7";
  g.fillStyle = "#666";
  g.font = "11px system-ui, sans-serif";
  for (const f of [0, 0.5, 1]) {
    g.beginPath(); g.moveTo(left, y(max * f)); g.lineTo(w, y(max * f)); g.stroke();
    const label = unit === "s" ? secs(max * f) : String(Math.round(max * f * 10) / 10);
    g.fillText(label, 2, y(max * f) + 4);
  }
  if (bars) {
    const bw = Math.max(1, (w - left) / Math.max(1, n) - 1);
    for (let i = 0; i < n; i++) {
      let acc = 0;
      lines.forEach((l) => {
        const v = l.values[i] || 0;
        if (!v) return;
        g.fillStyle = l.color;
        g.fillRect(left + i * (bw + 1), y(acc + v), bw, y(acc) - y(acc + v));
        acc += v;
      });
    }
  } else {
    for (const l of lines) {
      g.strokeStyle = l.color;
      g.lineWidth = 1.5;
      g.beginPath();
      let pen = false;
      l.values.forEach((v, i) => {
        if (v == null) { pen = false; return; }
        if (pen) g.lineTo(x(i), y(v)); else g.moveTo(x(i), y(v));
        pen = true;
      });
      g.stroke();
      // A lone point (no neighbour to join) still shows.
      g.fillStyle = l.color;
      l.values.forEach((v, i) => {
        if (v != null && l.values[i - 1] == null && l.values[i + 1] == null) g.fillRect(x(i) - 2, y(v) - 2, 4, 4);
      });
    }
  }
  let lx = left;
  for (const l of lines) {
    g.fillStyle = l.color;
    g.fillRect(lx, 3, 10, 8);
    g.fillStyle = "#333";
    g.fillText(l.label, lx + 13, 11);
    lx += g.measureText(l.label).width + 28;
  }
}

function throughputChart(canvas, series) {
  const t = timeline(series, 120);
  chart(canvas, [
    { label: "succeeded", color: COLORS[0], values: t.map((b) => b.succeeded || 0) },
    { label: "failed", color: COLORS[1], values: t.map((b) => b.failed || 0) },
    { label: "retried", color: COLORS[2], values: t.map((b) => b.retried || 0) },
  ], { bars: true });
}

function latencyChart(canvas, series) {
  const t = timeline(series, 120);
  const avg = (s, c) => (c ? s / c : null);
  chart(canvas, [
    { label: "runtime (mean)", color: COLORS[3], values: t.map((b) => avg(b.runtime_sum, b.runtime_count)) },
    { label: "queue wait (mean)", color: COLORS[4], values: t.map((b) => avg(b.wait_sum, b.wait_count)) },
  ], { unit: "s" });
}

function depthChart(canvas, series, only) {
  const t = timeline(series, 120);
  const names = new Set();
  for (const b of t) for (const q of Object.keys(b.queues || {})) if (!only || q === only) names.add(q);
  // A sample is taken every few seconds, so a bucket without one carries the last depth on.
  const lines = [...names].sort().slice(0, COLORS.length).map((q, i) => {
    let last = null;
    return { label: q, color: COLORS[(i + 3) % COLORS.length], values: t.map((b) => (last = b.queues && q in b.queues ? b.queues[q] : last)) };
  });
  chart(canvas, lines.length ? lines : [{ label: "no samples yet", color: "#999", values: [] }]);
}

let asking = null, askedAt = 0;

/// Asks every worker for stats, queues and registered tasks (pool, concurrency); at most one
/// request at a time. The answers land in `workerInfo`.
function askWorkers(fresh = false) {
  // After a change, an answer already on its way may predate it: ask again once it is in.
  if (asking && fresh) return asking.catch(() => {}).then(() => askWorkers());
  if (!asking) {
    asking = api("/api/workers?refresh=1").then((data) => {
      for (const w of data.workers) {
        if (w.stats || w.registered) workerInfo[w.hostname] = { stats: w.stats, active_queues: w.active_queues, registered: w.registered };
      }
      askedAt = Date.now();
      return data;
    }).finally(() => { asking = null; });
  }
  return asking;
}

/// Asks again when an online worker has not answered yet (at most every 15 s).
function askIfNew(workers) {
  if (info.events && Date.now() - askedAt > 15000 && workers.some((w) => w.online && !workerInfo[w.hostname])) askWorkers().catch(() => {});
}

// ---------------------------------------------------------------------------------------------
// Tables shared by views

function workerRows(workers) {
  return workers.map((w) => {
    const s = (workerInfo[w.hostname] || {}).stats || {};
    const pool = s.pool || {};
    return `<tr data-worker="${esc(w.hostname)}" class="${w.online ? "" : "offline"}">
      <td><a href="#/workers?host=${encodeURIComponent(w.hostname)}">${esc(w.hostname)}</a></td>
      <td>${w.online ? `<span class="badge on">online</span>` : `<span class="badge off">offline</span>`}</td>
      <td class="num">${w.active ?? ""}</td><td class="num processed">${w.processed ?? ""}</td>
      <td class="num">${w.succeeded ?? ""}</td><td class="num">${w.failed ?? ""}</td>
      <td>${esc((w.loadavg || []).map((l) => l.toFixed(2)).join(" "))}</td>
      <td>${esc(pool.implementation ?? "")}</td><td class="num concurrency">${esc(pool["max-concurrency"] ?? "")}</td>
      <td>${esc(w.sw_ident)} ${esc(w.sw_ver)}</td><td>${ago(w.last_seen)}</td></tr>`;
  }).join("");
}

const WORKER_HEAD = `<thead><tr><th>Worker</th><th>Status</th><th class="num">Active</th><th class="num">Processed</th><th class="num">Succeeded</th>
  <th class="num">Failed</th><th>Load</th><th>Pool</th><th class="num">Concurrency</th><th>Software</th><th>Last seen</th></tr></thead>`;

function queueRows(queues, buttons) {
  return queues.map((q) => `<tr data-queue="${esc(q.name)}"><td>${esc(q.name)}</td><td class="num ready">${q.ready}</td>
    <td class="num">${q.delayed}</td><td class="num">${q.unacked}</td>
    <td class="num">${q.dead ? `<a href="#/dead?queue=${encodeURIComponent(q.name)}">${q.dead}</a>` : 0}</td>
    ${buttons ? `<td>${act("Purge", `data-purge="${esc(q.name)}"`, "danger")}</td>` : ""}</tr>`).join("") ||
    `<tr><td colspan="6" class="empty">No queues yet.</td></tr>`;
}

const QUEUE_HEAD = (buttons) => `<thead><tr><th>Queue</th><th class="num">Ready</th><th class="num">Delayed</th><th class="num">Unacked</th>
  <th class="num">Dead</th>${buttons ? "<th></th>" : ""}</tr></thead>`;

// ---------------------------------------------------------------------------------------------
// Views: `mount` draws the page once, `refresh` updates it (on every tick, or after a change).

const views = {
  overview: {
    async mount() {
      main.innerHTML = `
        <div class="cards" id="totals"></div>
        <div class="charts">
          <section><h2>Throughput <small>tasks per ${info.bucket_secs} s</small></h2><canvas id="throughput"></canvas></section>
          <section><h2>Latency</h2><canvas id="latency"></canvas></section>
          <section><h2>Queue depth</h2><canvas id="depth"></canvas></section>
        </div>
        <h2>Workers</h2><table id="workers">${WORKER_HEAD}<tbody></tbody></table>
        <h2>Queues</h2><table id="queues">${QUEUE_HEAD(false)}<tbody></tbody></table>`;
      await this.refresh();
    },
    async refresh() {
      const [stats, workers, queues] = await Promise.all([api("/api/stats"), api("/api/workers"), api("/api/queues")]);
      const t = stats.totals || {};
      const active = workers.workers.reduce((s, w) => s + (w.online ? w.active || 0 : 0), 0);
      const card = (id, label, n) => `<div class="card" id="card-${id}">${esc(label)}<b>${n ?? 0}</b></div>`;
      main.querySelector("#totals").innerHTML = card("succeeded", "Succeeded", t.SUCCESS) + card("failed", "Failed", t.FAILURE) +
        card("retried", "Retried", t.RETRY) + card("received", "Received", t.RECEIVED) + card("active", "Running now", active) +
        card("workers", "Workers online", `${stats.workers_online} / ${stats.workers}`) + card("kept", "Tasks in memory", stats.tasks_kept);
      throughputChart(main.querySelector("#throughput"), stats.series);
      latencyChart(main.querySelector("#latency"), stats.series);
      depthChart(main.querySelector("#depth"), stats.series);
      main.querySelector("#workers tbody").innerHTML = workerRows(workers.workers) || `<tr><td colspan="11" class="empty">No worker seen yet${info.events ? "" : " (this broker carries no events)"}.</td></tr>`;
      askIfNew(workers.workers);
      main.querySelector("#queues tbody").innerHTML = queueRows(queues.queues, false);
    },
  },

  workers: {
    async mount(params) {
      this.host = new URLSearchParams(params).get("host");
      main.innerHTML = `<h2>Workers <button id="ask">Ask the workers</button> <small id="asked"></small></h2>
        <table id="workers">${WORKER_HEAD}<tbody></tbody></table><div id="worker-detail"></div>`;
      main.querySelector("#ask").onclick = () => this.ask();
      await this.refresh();
      this.ask();
    },
    /// Asks every worker for stats, queues and registered tasks (pool, concurrency).
    async ask(fresh) {
      const note = main.querySelector("#asked");
      if (note) note.textContent = "asking…";
      try {
        await askWorkers(fresh);
        if (note) note.textContent = `answers at ${new Date().toLocaleTimeString()}`;
        if (current === this) await this.refresh(null, true);
      } catch (e) {
        if (note) note.textContent = "";
        fail(e);
      }
    },
    async refresh(_tick, detail) {
      const data = await api("/api/workers");
      main.querySelector("#workers tbody").innerHTML = workerRows(data.workers) || `<tr><td colspan="11" class="empty">No worker seen yet.</td></tr>`;
      const box = main.querySelector("#worker-detail");
      const hosts = this.host ? [this.host] : data.workers.filter((w) => w.online).map((w) => w.hostname);
      // The control forms are drawn once (and again after new answers), not on every tick,
      // so typing in them is not interrupted.
      if (!detail && box.dataset.hosts === hosts.join(",")) return;
      box.dataset.hosts = hosts.join(",");
      box.innerHTML = hosts.map((h) => {
        const i = workerInfo[h] || {};
        const tasks = Array.isArray(i.registered) ? i.registered : [];
        const queues = Array.isArray(i.active_queues) ? i.active_queues.map((q) => q.name || q).join(", ") : "";
        const pool = (i.stats || {}).pool || {};
        return `<section class="worker" data-host="${esc(h)}"><h3>${esc(h)}</h3>
          <p>Pool ${esc(pool.implementation ?? "?")}, concurrency <b>${esc(pool["max-concurrency"] ?? "?")}</b>,
             ${(pool.processes || []).length ? `processes ${esc(pool.processes.join(" "))};` : ""} queues ${esc(queues || "?")}; prefetch ${esc((i.stats || {}).prefetch_count ?? "?")}.</p>
          <div class="controls">
            <label>Rate limit <select name="task">${tasks.map((t) => `<option>${esc(String(t).split(" ")[0])}</option>`).join("")}</select>
              <input name="rate" placeholder="10/m, 1/s, 0 = none" size="12"></label> ${act("Set", `data-rate="${esc(h)}"`)}
            ${act("Pool +1", `data-grow="${esc(h)}"`)} ${act("Pool −1", `data-shrink="${esc(h)}"`)}
            ${act("Shut down", `data-shutdown="${esc(h)}"`, "danger")}
          </div></section>`;
      }).join("");
      const one = (h) => ({ destination: [h] });
      on("button[data-rate]", (b) => {
        const s = b.closest("section");
        const task = s.querySelector("select[name=task]").value, rate = s.querySelector("input[name=rate]").value.trim();
        if (!task) return flash("no registered task is known: ask the workers first", "error");
        run(api("/api/control/rate_limit", { ...one(b.dataset.rate), arguments: { task_name: task, rate_limit: rate || "0" } }),
          (r) => `rate limit of ${task}: ${JSON.stringify(Object.values(r.replies)[0] ?? "no answer")}`);
      });
      on("button[data-grow]", (b) => run(api("/api/control/pool_grow", { ...one(b.dataset.grow), arguments: { n: 1 } }), "pool grown").then(() => this.ask(true)));
      on("button[data-shrink]", (b) => run(api("/api/control/pool_shrink", { ...one(b.dataset.shrink), arguments: { n: 1 } }), "pool shrunk").then(() => this.ask(true)));
      on("button[data-shutdown]", (b) => confirm(`Shut down ${b.dataset.shutdown}? It finishes its running tasks first.`) &&
        run(api("/api/control/shutdown", one(b.dataset.shutdown)), `shutdown sent to ${b.dataset.shutdown}`));
    },
  },

  tasks: {
    async mount(params) {
      this.q = new URLSearchParams(params);
      const q = this.q;
      const workers = (await api("/api/workers")).workers;
      main.innerHTML = `
        <form class="filters" id="filters">
          <input name="search" type="search" placeholder="search id, name, args, result" value="${esc(q.get("search"))}">
          <select name="state">${["", "PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE", "RETRY", "REVOKED", "REJECTED"]
            .map((s) => `<option value="${s}" ${q.get("state") === s ? "selected" : ""}>${s || "any state"}</option>`).join("")}</select>
          <input name="name" placeholder="task name" list="task-names" value="${esc(q.get("name"))}"><datalist id="task-names"></datalist>
          <select name="worker"><option value="">any worker</option>${workers.map((w) => `<option ${q.get("worker") === w.hostname ? "selected" : ""}>${esc(w.hostname)}</option>`).join("")}</select>
          <button>Filter</button> <a href="#/tasks">clear</a>
        </form>
        <table id="tasks"><thead><tr><th>Id</th><th>Name</th><th>State</th><th>Args</th><th>Kwargs</th><th>Result</th><th>Worker</th><th>Received</th><th class="num">Runtime</th></tr></thead><tbody></tbody></table>
        <p id="tasks-count"></p>`;
      main.querySelector("#filters").onsubmit = (e) => {
        e.preventDefault();
        const f = new URLSearchParams(new FormData(e.target));
        for (const [k, v] of [...f]) if (!v) f.delete(k);
        location.hash = "#/tasks?" + f.toString();
      };
      await this.refresh();
    },
    async refresh(t) {
      if (t && (!t.changed.length || this.q.get("before"))) return;
      const data = await api("/api/tasks?" + this.q.toString());
      const names = new Set(data.tasks.map((x) => x.name).filter(Boolean));
      main.querySelector("#task-names").innerHTML = [...names].map((n) => `<option value="${esc(n)}">`).join("");
      main.querySelector("#tasks tbody").innerHTML = data.tasks.map((x) => `<tr data-id="${esc(x.id)}">
        <td class="id">${taskLink(x.id, x.id.slice(0, 8) + "…")}</td><td>${esc(x.name)}</td><td>${state(x.state)}</td>
        <td class="code">${esc(clip(x.args))}</td><td class="code">${esc(clip(x.kwargs))}</td>
        <td class="code">${esc(clip(x.result ?? x.exception))}</td><td>${esc(x.worker)}</td><td>${when(x.received)}</td>
        <td class="num">${x.runtime == null ? "" : secs(x.runtime)}</td></tr>`).join("") ||
        `<tr><td colspan="9" class="empty">No task matches.</td></tr>`;
      const last = data.tasks[data.tasks.length - 1];
      const older = new URLSearchParams(this.q);
      if (last) older.set("before", last.seq);
      main.querySelector("#tasks-count").innerHTML = `${data.tasks.length} shown, ${data.kept} kept in memory.
        ${last && data.tasks.length >= Number(this.q.get("limit") || 100) ? `<a href="#/tasks?${older}">older →</a>` : ""}`;
    },
  },

  task: {
    async mount(_params, id) {
      this.id = id;
      await this.refresh();
    },
    async refresh(t) {
      const id = this.id;
      if (t && !t.changed.includes(id)) return;
      let x;
      try {
        x = await api("/api/tasks/" + encodeURIComponent(id));
      } catch (e) {
        main.innerHTML = `<h2>Task ${esc(id)}</h2><p class="empty">${esc(e.message)}</p>`;
        return;
      }
      const row = (k, v) => (v == null || v === "" ? "" : `<tr><th>${esc(k)}</th><td>${v}</td></tr>`);
      const code = (v) => (v == null ? null : `<pre class="value">${esc(v)}</pre>`);
      const finished = ["SUCCESS", "FAILURE", "REVOKED", "REJECTED"].includes(x.state);
      main.innerHTML = `<h2>Task <code>${esc(id)}</code> ${state(x.state)}</h2>
        <p class="actions">${act("Revoke", `id="revoke"${finished ? " disabled" : ""}`)} ${act("Revoke and terminate", `id="terminate"${finished ? " disabled" : ""}`, "danger")}</p>
        <table id="task">
          ${row("name", esc(x.name))}${row("state", state(x.state))}${row("worker", esc(x.worker))}${row("queue", esc(x.queue))}
          ${row("args", code(x.args))}${row("kwargs", code(x.kwargs))}
          ${row("result", code(x.result))}${row("exception", x.exception == null ? null : `<pre class="value exception">${esc(x.exception)}</pre>`)}
          ${row("retries", esc(x.retries ?? 0))}${row("runtime", secs(x.runtime))}
          ${row("sent", when(x.sent))}${row("received", when(x.received))}${row("started", when(x.started))}${row("finished", when(x.finished))}
          ${row("done at", esc(x.date_done))}${row("eta", esc(x.eta))}${row("expires", esc(x.expires))}
        </table>
        <h3>Canvas</h3><table id="canvas">
          ${row("parent", x.parent_id ? taskLink(x.parent_id) : "")}${row("root", x.root_id && x.root_id !== id ? taskLink(x.root_id) : "")}
          ${row("group", x.group_id ? `<code>${esc(x.group_id)}</code> <span id="group-progress"></span>` : "")}
          ${row("children", (x.children || []).map((c) => taskLink(c)).join("<br>"))}
        </table>
        ${x.traceback ? `<h3>Traceback</h3><pre id="traceback">${esc(x.traceback)}</pre>` : ""}`;
      if (!x.parent_id && !x.root_id && !x.group_id && !(x.children || []).length) main.querySelector("#canvas").innerHTML = `<tr><td class="empty">Not part of a workflow.</td></tr>`;
      if (x.group_id) {
        api("/api/groups/" + encodeURIComponent(x.group_id)).then((g) => {
          const el = main.querySelector("#group-progress");
          if (el) el.innerHTML = `<progress max="${g.total}" value="${g.completed}"></progress> ${g.completed}/${g.total} done, ${g.failed} failed`;
        }).catch(() => {});
      }
      const revoke = (terminate) => run(api(`/api/tasks/${encodeURIComponent(id)}/revoke`, { terminate }), `revoked ${id}`);
      const r = main.querySelector("#revoke"), k = main.querySelector("#terminate");
      if (r) r.onclick = () => revoke(false);
      if (k) k.onclick = () => confirm("Terminate the task if it is running?") && revoke(true);
    },
  },

  queues: {
    async mount() {
      main.innerHTML = `<h2>Queues</h2><table id="queues">${QUEUE_HEAD(true)}<tbody></tbody></table>
        <h2>Depth over time <small>ready messages</small></h2><canvas id="depth" class="tall"></canvas>`;
      await this.refresh();
    },
    async refresh() {
      const [data, stats] = await Promise.all([api("/api/queues"), api("/api/stats")]);
      main.querySelector("#queues tbody").innerHTML = queueRows(data.queues, true);
      depthChart(main.querySelector("#depth"), stats.series);
      on("button[data-purge]", (b) => confirm(`Purge every ready message of ${b.dataset.purge}?`) &&
        run(api(`/api/queues/${encodeURIComponent(b.dataset.purge)}/purge`, {}), (r) => `purged ${r.purged} from ${r.queue}`));
    },
  },

  dead: {
    async mount(params) {
      this.queue = new URLSearchParams(params).get("queue");
      await this.refresh();
    },
    async refresh(t) {
      if (t) return; // dead letters change by hand; the buttons refresh
      const overview = await api("/api/dead");
      const queue = this.queue || (overview.queues.find((q) => q.count) || overview.queues[0] || {}).queue;
      const letters = queue ? (await api(`/api/dead/${encodeURIComponent(queue)}`)).letters : [];
      const q = encodeURIComponent(queue || "");
      main.innerHTML = `<h2>Dead letters</h2>
        <p class="tabs">${overview.queues.map((d) => `<a href="#/dead?queue=${encodeURIComponent(d.queue)}" class="${d.queue === queue ? "active" : ""}">${esc(d.queue)} <b>${d.count}</b></a>`).join(" ") || "No dead letters."}</p>
        ${queue ? `<table id="letters"><tr><th>Id</th><th>Task</th><th>Reason</th><th>When</th><th>Worker</th><th class="num">Deliveries</th><th>Args</th><th></th></tr>
        ${letters.map((d) => `<tr data-id="${esc(d.id)}"><td class="id">${taskLink(d.id, d.id.slice(0, 8) + "…")}</td><td>${esc(d.task)}</td><td>${esc(clip(d.reason, 120))}</td>
          <td>${esc(d.dead_at)}</td><td>${esc(d.worker)}</td><td class="num">${esc(d.deliveries)}</td><td class="code">${esc(clip(d.args))}</td>
          <td>${act("Requeue", `data-requeue="${esc(d.id)}"`)}</td></tr>`).join("") || `<tr><td colspan="8" class="empty">None left in ${esc(queue)}.</td></tr>`}</table>
        <p>${act("Requeue all", `id="requeue-all"`)} ${act("Purge", `id="purge-dead"`, "danger")}</p>` : ""}`;
      on("button[data-requeue]", (b) => run(api(`/api/dead/${q}/requeue`, { ids: [b.dataset.requeue] }), (r) => `requeued ${r.requeued} to ${r.queue}`));
      on("#requeue-all", () => run(api(`/api/dead/${q}/requeue`, {}), (r) => `requeued ${r.requeued} to ${r.queue}`));
      on("#purge-dead", () => confirm(`Purge the dead letters of ${queue}?`) && run(api(`/api/dead/${q}/purge`, {}), (r) => `purged ${r.purged}`));
    },
  },

  beat: {
    async mount() {
      await this.refresh();
    },
    async refresh(t) {
      if (t) return;
      if (!info.beat) {
        main.innerHTML = `<h2>Periodic tasks</h2><p class="empty">This server was started without a beat store.</p>`;
        return;
      }
      const data = await api("/api/beat");
      main.innerHTML = `<h2>Periodic tasks</h2><table id="beat"><tr><th>Name</th><th>Task</th><th>Schedule</th><th>State</th><th>Last run</th><th>Next run</th><th class="num">Runs</th><th></th></tr>
        ${data.entries.map((e) => `<tr data-entry="${esc(e.name)}"><td>${esc(e.name)}</td><td>${esc(e.task)}</td><td>${esc(e.schedule)}</td>
          <td>${e.invalid ? `<span class="state-FAILURE">invalid: ${esc(e.invalid)}</span>` : e.paused ? `<span class="badge off">paused</span>` : `<span class="badge on">active</span>`}</td>
          <td>${esc(e.last_run_at)}</td><td>${esc(e.next_run_at)}</td><td class="num">${e.total_run_count}</td>
          <td>${act(e.paused ? "Resume" : "Pause", `data-beat="${esc(e.name)}" data-action="${e.paused ? "resume" : "pause"}"`)}
          ${act("Run now", `data-beat="${esc(e.name)}" data-action="trigger"`)}</td></tr>`).join("") || `<tr><td colspan="8" class="empty">No entries.</td></tr>`}</table>`;
      on("button[data-beat]", (b) => run(api(`/api/beat/${encodeURIComponent(b.dataset.beat)}/${b.dataset.action}`, {}), `${b.dataset.beat}: ${b.dataset.action}`));
    },
  },
};

// ---------------------------------------------------------------------------------------------
// Routing and the live stream

let busy = false;

async function refresh(t) {
  if (!current || busy) return;
  busy = true;
  try {
    await current.refresh(t);
  } catch (e) {
    if (!t) fail(e);
  } finally {
    busy = false;
  }
}

async function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, params] = hash.split("?");
  const [view, arg] = path.split("/");
  const name = views[view] ? view : "overview";
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.view === name);
  current = null;
  main.dataset.view = name;
  main.innerHTML = `<p class="empty">Loading…</p>`;
  const v = views[name];
  try {
    await v.mount(params || "", arg && decodeURIComponent(arg));
    current = v;
    main.dataset.ready = name;
  } catch (e) {
    main.innerHTML = "";
    fail(e);
  }
}

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource(BASE + "api/stream");
  source.addEventListener("tick", (e) => {
    tick = JSON.parse(e.data);
    live.classList.add("on");
    live.title = `live, last update ${new Date().toLocaleTimeString()}`;
    refresh(tick);
  });
  source.onerror = () => { live.classList.remove("on"); live.title = "reconnecting…"; };
}

async function start() {
  try {
    info = await api("/api/info");
  } catch (e) {
    fail(e);
  }
  document.body.classList.toggle("read-only", !!info.read_only);
  document.getElementById("server").textContent = `${info.broker || ""}${info.read_only ? " · read-only" : ""} · v${info.version || "?"}`;
  window.addEventListener("hashchange", route);
  await route();
  connect();
}

start();
