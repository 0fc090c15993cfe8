// The celeriac dashboard: one page, views by the URL's hash, data from the JSON API, live
// through the server-sent `tick` stream. No framework, no CDN.
"use strict";

const main = document.getElementById("main");
let tick = null; // the latest tick from /api/stream

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function when(t) {
  return t ? new Date(t * 1000).toLocaleTimeString() : "";
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Requested-With": "celeriac" },
    body: JSON.stringify(body),
  };
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function fail(e) {
  main.insertAdjacentHTML("afterbegin", `<p class="error">${esc(e.message || e)}</p>`);
}

function state(s) {
  return `<span class="state-${esc(s)}">${esc(s)}</span>`;
}

function taskLink(id) {
  return `<a href="#/task/${encodeURIComponent(id)}">${esc(id)}</a>`;
}

const views = {
  async overview() {
    const [stats, workers, queues] = await Promise.all([api("/api/stats"), api("/api/workers"), api("/api/queues")]);
    const t = stats.totals;
    const card = (label, n) => `<div class="card">${esc(label)}<b>${n ?? 0}</b></div>`;
    main.innerHTML = `
      <div class="cards" id="totals">${card("Succeeded", t.SUCCESS)}${card("Failed", t.FAILURE)}${card("Retried", t.RETRY)}${card("Received", t.RECEIVED)}${card("Workers online", stats.workers_online)}</div>
      <h2>Throughput (tasks per ${stats.bucket_secs} s)</h2><canvas id="chart" width="900" height="160"></canvas>
      <h2>Workers</h2>${workerTable(workers.workers)}
      <h2>Queues</h2>${queueTable(queues.queues, false)}`;
    drawChart(stats.series);
  },

  async tasks(params) {
    const q = new URLSearchParams(params);
    const data = await api("/api/tasks?" + q.toString());
    main.innerHTML = `
      <form class="filters" id="filters">
        <input name="search" placeholder="search id, name, args, result" value="${esc(q.get("search"))}">
        <select name="state">${["", "RECEIVED", "STARTED", "SUCCESS", "FAILURE", "RETRY", "REVOKED", "REJECTED"]
          .map((s) => `<option ${q.get("state") === s ? "selected" : ""}>${s}</option>`).join("")}</select>
        <input name="name" placeholder="task name" value="${esc(q.get("name"))}">
        <button>Filter</button>
      </form>
      <table id="tasks"><tr><th>Id</th><th>Name</th><th>State</th><th>Args</th><th>Result</th><th>Worker</th><th>Received</th><th class="num">Runtime</th></tr>
      ${data.tasks.map((t) => `<tr data-id="${esc(t.id)}"><td>${taskLink(t.id)}</td><td>${esc(t.name)}</td><td>${state(t.state)}</td>
        <td>${esc(t.args)}</td><td>${esc(t.result ?? t.exception)}</td><td>${esc(t.worker)}</td><td>${when(t.received)}</td>
        <td class="num">${t.runtime == null ? "" : t.runtime.toFixed(3)}</td></tr>`).join("")}</table>
      <p>${data.tasks.length} shown, ${data.kept} kept in memory.</p>`;
    document.getElementById("filters").onsubmit = (e) => {
      e.preventDefault();
      const f = new URLSearchParams(new FormData(e.target));
      for (const [k, v] of [...f]) if (!v) f.delete(k);
      location.hash = "#/tasks?" + f.toString();
    };
  },

  async task(_params, id) {
    const t = await api("/api/tasks/" + encodeURIComponent(id));
    const rows = ["state", "name", "worker", "queue", "args", "kwargs", "result", "exception", "retries", "runtime", "parent_id", "root_id", "group_id", "date_done"]
      .filter((k) => t[k] != null)
      .map((k) => `<tr><th>${k}</th><td>${k.endsWith("_id") ? taskLink(t[k]) : k === "state" ? state(t[k]) : esc(t[k])}</td></tr>`).join("");
    main.innerHTML = `<h2>Task ${esc(id)}</h2><table id="task">${rows}</table>
      ${t.children && t.children.length ? `<h3>Children</h3><ul>${t.children.map((c) => `<li>${taskLink(c)}</li>`).join("")}</ul>` : ""}
      ${t.traceback ? `<h3>Traceback</h3><pre id="traceback">${esc(t.traceback)}</pre>` : ""}
      <p><button id="revoke">Revoke</button> <button id="terminate">Revoke and terminate</button></p>`;
    const revoke = (terminate) => api(`/api/tasks/${encodeURIComponent(id)}/revoke`, { terminate })
      .then(() => route()).catch(fail);
    document.getElementById("revoke").onclick = () => revoke(false);
    document.getElementById("terminate").onclick = () => revoke(true);
  },

  async queues() {
    const data = await api("/api/queues");
    main.innerHTML = `<h2>Queues</h2>${queueTable(data.queues, true)}`;
    for (const b of main.querySelectorAll("button[data-purge]")) {
      b.onclick = () => {
        if (confirm(`Purge every ready message of ${b.dataset.purge}?`)) {
          api(`/api/queues/${encodeURIComponent(b.dataset.purge)}/purge`, {}).then(() => route()).catch(fail);
        }
      };
    }
  },

  async dead(params) {
    const overview = await api("/api/dead");
    const queue = new URLSearchParams(params).get("queue") || (overview.queues[0] || {}).queue;
    let letters = [];
    if (queue) letters = (await api(`/api/dead/${encodeURIComponent(queue)}`)).letters;
    main.innerHTML = `<h2>Dead letters</h2>
      <p>${overview.queues.map((q) => `<a href="#/dead?queue=${encodeURIComponent(q.queue)}">${esc(q.queue)}</a> (${q.count})`).join(" · ") || "None."}</p>
      ${queue ? `<h3>${esc(queue)}</h3><table id="letters"><tr><th>Id</th><th>Task</th><th>Reason</th><th>When</th><th>Worker</th><th>Args</th><th></th></tr>
      ${letters.map((d) => `<tr><td>${taskLink(d.id)}</td><td>${esc(d.task)}</td><td>${esc(d.reason)}</td><td>${esc(d.dead_at)}</td>
        <td>${esc(d.worker)}</td><td>${esc(d.args)}</td><td><button data-requeue="${esc(d.id)}">Requeue</button></td></tr>`).join("")}</table>
      <button id="requeue-all">Requeue all</button> <button id="purge-dead">Purge</button>` : ""}`;
    for (const b of main.querySelectorAll("button[data-requeue]")) {
      b.onclick = () => api(`/api/dead/${encodeURIComponent(queue)}/requeue`, { ids: [b.dataset.requeue] }).then(() => route()).catch(fail);
    }
    const all = document.getElementById("requeue-all");
    if (all) all.onclick = () => api(`/api/dead/${encodeURIComponent(queue)}/requeue`, {}).then(() => route()).catch(fail);
    const purge = document.getElementById("purge-dead");
    if (purge) purge.onclick = () => confirm(`Purge the dead letters of ${queue}?`) &&
      api(`/api/dead/${encodeURIComponent(queue)}/purge`, {}).then(() => route()).catch(fail);
  },

  async beat() {
    const data = await api("/api/beat");
    main.innerHTML = `<h2>Periodic tasks</h2><table id="beat"><tr><th>Name</th><th>Task</th><th>Schedule</th><th>Last run</th><th>Next run</th><th class="num">Runs</th><th></th></tr>
      ${data.entries.map((e) => `<tr><td>${esc(e.name)}</td><td>${esc(e.task)}</td><td>${esc(e.schedule)}</td><td>${esc(e.last_run_at)}</td>
        <td>${esc(e.next_run_at)}</td><td class="num">${e.total_run_count}</td>
        <td><button data-beat="${esc(e.name)}" data-action="${e.paused ? "resume" : "pause"}">${e.paused ? "Resume" : "Pause"}</button>
        <button data-beat="${esc(e.name)}" data-action="trigger">Run now</button></td></tr>`).join("")}</table>`;
    for (const b of main.querySelectorAll("button[data-beat]")) {
      b.onclick = () => api(`/api/beat/${encodeURIComponent(b.dataset.beat)}/${b.dataset.action}`, {}).then(() => route()).catch(fail);
    }
  },
};

function workerTable(workers) {
  return `<table id="workers"><tr><th>Worker</th><th>Status</th><th class="num">Active</th><th class="num">Processed</th><th class="num">Succeeded</th><th class="num">Failed</th><th>Load</th><th>Software</th></tr>
    ${workers.map((w) => `<tr data-worker="${esc(w.hostname)}"><td>${esc(w.hostname)}</td><td>${w.online ? "online" : "offline"}</td>
      <td class="num">${w.active ?? ""}</td><td class="num">${w.processed ?? ""}</td><td class="num">${w.succeeded ?? ""}</td><td class="num">${w.failed ?? ""}</td>
      <td>${esc((w.loadavg || []).join(" "))}</td><td>${esc(w.sw_ident)} ${esc(w.sw_ver)}</td></tr>`).join("")}</table>`;
}

function queueTable(queues, purge) {
  return `<table id="queues"><tr><th>Queue</th><th class="num">Ready</th><th class="num">Delayed</th><th class="num">Unacked</th><th class="num">Dead</th>${purge ? "<th></th>" : ""}</tr>
    ${queues.map((q) => `<tr><td>${esc(q.name)}</td><td class="num">${q.ready}</td><td class="num">${q.delayed}</td><td class="num">${q.unacked}</td>
      <td class="num">${q.dead ? `<a href="#/dead?queue=${encodeURIComponent(q.name)}">${q.dead}</a>` : 0}</td>
      ${purge ? `<td><button data-purge="${esc(q.name)}">Purge</button></td>` : ""}</tr>`).join("")}</table>`;
}

function drawChart(series) {
  const canvas = document.getElementById("chart");
  if (!canvas || !series) return;
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  g.clearRect(0, 0, w, h);
  const last = series.slice(-120);
  const max = Math.max(1, ...last.map((b) => b.succeeded + b.failed));
  const step = w / Math.max(1, last.length);
  last.forEach((b, i) => {
    const ok = (b.succeeded / max) * (h - 10), bad = (b.failed / max) * (h - 10);
    g.fillStyle = "#6a9f58";
    g.fillRect(i * step, h - ok, Math.max(1, step - 1), ok);
    g.fillStyle = "#c62828";
    g.fillRect(i * step, h - ok - bad, Math.max(1, step - 1), bad);
  });
  g.fillStyle = "#555";
  g.fillText(String(max), 2, 10);
}

async function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, params] = hash.split("?");
  const [view, arg] = path.split("/");
  const name = views[view] ? view : "overview";
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.view === name);
  try {
    await views[name](params || "", arg && decodeURIComponent(arg));
  } catch (e) {
    main.innerHTML = "";
    fail(e);
  }
}

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/stream");
  source.addEventListener("tick", (e) => {
    tick = JSON.parse(e.data);
    live.classList.add("on");
    const view = location.hash.replace(/^#\/?/, "").split(/[/?]/)[0] || "overview";
    // The overview follows every tick; a task list or task page when one of its tasks changed.
    if (view === "overview") route();
    else if (view === "tasks" && tick.changed.length) route();
    else if (view === "task" && tick.changed.includes(decodeURIComponent(location.hash.split("/")[2] || ""))) route();
  });
  source.onerror = () => live.classList.remove("on");
}

window.addEventListener("hashchange", route);
route();
connect();
