"""A self-contained HTML status page over the JSON of ``{prefix}/nodes``.

The page is static: it fetches the JSON route every second and renders it with DOM
calls (``textContent``, never ``innerHTML`` of data), so a node name or an error text
cannot inject markup. Nothing is loaded from elsewhere; its Content-Security-Policy
allows only its own inline script and style and requests to its own origin.

Example::

    from fastapi.responses import HTMLResponse

    @app.get("/health/ui", response_class=HTMLResponse)
    async def ui() -> str:
        return status_page("nodes")  # relative: /health/nodes
"""

from __future__ import annotations

import html
from urllib.parse import urlsplit

__all__ = ["status_page"]

_DROPPED = dict.fromkeys(map(ord, "\t\n\r"))
_TRIMMED = "".join(map(chr, range(0x21)))


def status_page(data_path: str) -> str:
    """The status page, as one HTML document.

    Args:
        data_path: where the page fetches ``router.status().to_dict()`` as JSON, a URL
            relative to the page (``nodes``) or to its origin (``/health/nodes``).

    Raises:
        ValueError: ``data_path`` is empty or names another origin.
    """
    # Read the path as a browser would: tabs and newlines dropped, controls and spaces
    # trimmed, a backslash taken for a slash (two of them start another origin). The
    # page's policy (connect-src 'self') refuses another origin anyway.
    probe = data_path.translate(_DROPPED).strip(_TRIMMED).replace("\\", "/")
    parts = urlsplit(probe)
    if not probe or parts.scheme or parts.netloc or probe.startswith("//"):
        raise ValueError(
            f"data_path must be a path on the page's own origin, like 'nodes' or "
            f"'/health/nodes', got {data_path!r}"
        )
    return _PAGE.replace("__DATA_PATH__", html.escape(data_path, quote=True))


# The data path reaches the script through a data- attribute (HTML-escaped), never by
# pasting text into the script.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; \
script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
base-uri 'none'; form-action 'none'">
<meta name="referrer" content="no-referrer">
<title>replica-router status</title>
<style>
:root { color-scheme: light dark; --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700;
  --line: #d0d7de; --muted: #656d76; --head: #f6f8fa; }
@media (prefers-color-scheme: dark) {
  :root { --ok: #3fb950; --bad: #f85149; --warn: #d29922; --line: #30363d;
    --muted: #8b949e; --head: #161b22; }
}
body { font: 13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px 20px; }
h1 { font-size: 18px; margin: 0 0 4px; display: flex; gap: 12px; align-items: baseline; }
h2 { font-size: 15px; margin: 20px 0 6px; }
#state { font-size: 13px; font-weight: 600; padding: 1px 8px; border-radius: 10px;
  border: 1px solid currentColor; }
#state.live { color: var(--ok); }
#state.unreachable { color: var(--bad); }
#state.waiting { color: var(--muted); }
#updated { font-size: 13px; font-weight: normal; color: var(--muted); }
#summary { color: var(--muted); }
#summary b { color: CanvasText; font-weight: 600; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 3px 6px; text-align: left;
  white-space: nowrap; }
th { background: var(--head); font-weight: 600; font-size: 11.5px; white-space: normal;
  vertical-align: bottom; }
th.num { max-width: 6.5em; }
td.num, th.num { text-align: right; }
td.url { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 11.5px;
  white-space: normal; }
td.url span { white-space: nowrap; }
.scroll { overflow-x: auto; }
td.ok { color: var(--ok); }
td.bad { color: var(--bad); font-weight: 600; }
td.warn { color: var(--warn); font-weight: 600; }
td.zero { color: var(--muted); }
.stale table, .stale #summary { opacity: 0.6; }
footer { margin-top: 16px; font-size: 12px; color: var(--muted); }
#warnings { color: var(--warn); margin: 6px 0 0; padding-left: 18px; }
</style>
</head>
<body data-source="__DATA_PATH__">
<h1>replica-router <span id="state" class="waiting">connecting</span>
<span id="updated"></span></h1>
<div id="summary"></div>
<ul id="warnings"></ul>
<main>
<h2>Nodes</h2>
<div class="scroll"><table id="nodes">
<thead><tr>
<th>name</th><th>role</th><th>server role</th><th>URL</th><th>healthy</th>
<th class="num">lag s</th><th class="num">lag bytes</th><th class="num">in flight</th>
<th class="num">latency ms</th><th class="num">sessions</th>
<th class="num">checkout failures</th><th class="num">ejections</th>
<th class="num">retries</th><th class="num">failovers</th>
</tr></thead>
<tbody></tbody>
</table></div>
<h2>Read decisions</h2>
<div class="scroll"><table id="reads"><thead></thead><tbody></tbody></table></div>
</main>
<footer>Refreshed every second from <span id="source"></span>.</footer>
<script>
"use strict";
(function () {
  const source = document.body.dataset.source;
  const DASH = "\\u2013";
  const $ = (id) => document.getElementById(id);
  let lastUpdate = null;
  $("source").textContent = source;

  const missing = (v) => v === null || v === undefined;
  const fixed = (digits) => (v) => (missing(v) ? DASH : Number(v).toFixed(digits));
  const count = (v) => (missing(v) ? DASH : String(v));
  function bytes(v) {
    if (missing(v)) return DASH;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let x = Number(v), i = 0;
    while (x >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
    return i === 0 ? x + " B" : x.toFixed(1) + " " + units[i];
  }
  function cell(row, text, cls, title) {
    const td = row.insertCell();
    td.textContent = text;
    if (cls) td.className = cls;
    if (title) td.title = title;
    return td;
  }
  function urlCell(row, url) {
    // May wrap after the user name, nowhere else (a host name stays whole).
    const td = cell(row, "", "url", url);
    const at = url.indexOf("@") + 1;
    const parts = at > 0 ? [url.slice(0, at), url.slice(at)] : [url];
    parts.forEach((part, i) => {
      if (i) td.append(document.createElement("wbr"));
      const span = document.createElement("span");
      span.textContent = part;
      td.append(span);
    });
  }
  function numeric(row, value, format, alert) {
    // alert: the class of a count above zero ("bad" for failures, "warn" for retries).
    const cls = "num" + (value === 0 ? " zero" : alert && value > 0 ? " " + alert : "");
    return cell(row, format(value), cls);
  }
  function strong(parent, label, value) {
    if (parent.childNodes.length) parent.append(" \\u00b7 ");
    parent.append(label + " ");
    const b = document.createElement("b");
    b.textContent = value;
    parent.append(b);
  }

  function renderSummary(data) {
    const summary = $("summary");
    summary.replaceChildren();
    const nodes = data.nodes || [];
    strong(summary, "strategy", String(data.strategy));
    const ryw = String(data.read_your_writes);
    const inactive = ryw !== "off" && data.read_your_writes_active === false;
    strong(summary, "read-your-writes", inactive ? ryw + " (inactive)" : ryw);
    strong(summary, "health checks", data.health_checks_running ? "running" : "stopped");
    strong(summary, "fallback in flight", data.fallback_in_flight + " / " + data.fallback_cap);
    strong(summary, "healthy", nodes.filter((n) => n.healthy).length + " of " + nodes.length);
    const warnings = $("warnings");
    warnings.replaceChildren();
    for (const text of data.warnings || []) {
      const item = document.createElement("li");
      item.textContent = String(text);
      warnings.append(item);
    }
  }

  function renderNodes(nodes) {
    const body = $("nodes").tBodies[0];
    body.replaceChildren();
    for (const n of nodes) {
      const row = body.insertRow();
      cell(row, String(n.name));
      cell(row, String(n.role));
      const mismatch = !missing(n.server_role) && n.server_role !== n.role;
      cell(row, missing(n.server_role) ? DASH : String(n.server_role), mismatch ? "warn" : "");
      urlCell(row, String(n.url));
      const health = n.healthy ? "\\u2713 yes" : "\\u2717 " + (n.reason || "no");
      const title = n.last_error ? "last error: " + n.last_error : "";
      cell(row, health, n.healthy ? "ok" : "bad", title);
      numeric(row, n.lag_seconds, fixed(2));
      const lag = numeric(row, n.lag_bytes, bytes);
      if (!missing(n.patroni_lag_bytes)) {
        // A member Patroni lists: its figure counts beside the probes' own.
        lag.textContent += " (Patroni " + bytes(n.patroni_lag_bytes) + ")";
      }
      numeric(row, n.in_flight, count);
      numeric(row, n.latency_ms, fixed(1));
      numeric(row, n.sessions, count);
      numeric(row, n.checkout_failures, count, "bad");
      numeric(row, n.ejections, count, "bad");
      numeric(row, n.retries, count, "warn");
      numeric(row, n.failovers, count, "warn");
    }
  }

  function renderReads(reads) {
    const table = $("reads");
    const decisions = [];
    for (const policy of reads) {
      for (const key of Object.keys(policy.decisions || {})) {
        if (!decisions.includes(key)) decisions.push(key);
      }
    }
    const head = table.tHead;
    head.replaceChildren();
    const top = head.insertRow();
    for (const [label, cls] of [["read policy", ""], ["read-your-writes", ""],
                                ["max lag s", "num"]]) {
      const th = document.createElement("th");
      th.textContent = label;
      if (cls) th.className = cls;
      top.append(th);
    }
    for (const key of [...decisions, "total"]) {
      const th = document.createElement("th");
      th.textContent = key.replaceAll("_", " ");
      th.className = "num";
      top.append(th);
    }
    const body = table.tBodies[0];
    body.replaceChildren();
    for (const policy of reads) {
      const row = body.insertRow();
      const values = policy.decisions || {};
      cell(row, String(policy.name));
      cell(row, String(policy.read_your_writes));
      numeric(row, policy.max_lag_seconds, fixed(1));
      let total = 0;
      for (const key of decisions) {
        const value = values[key] || 0;
        total += value;
        numeric(row, value, count);
      }
      numeric(row, total, count);
    }
  }

  function showState(ok, detail, label) {
    const state = $("state");
    state.className = ok ? "live" : "unreachable";
    state.textContent = ok ? "live" : label || "unreachable";
    state.title = detail || "";
    document.body.classList.toggle("stale", !ok);
    const when = lastUpdate ? lastUpdate.toLocaleTimeString() : "never";
    $("updated").textContent = (ok ? "updated " : "last data from ") + when +
      (detail ? " (" + detail + ")" : "");
  }

  async function poll() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 3000);
    try {
      let data;
      try {
        const response = await fetch(source, {
          cache: "no-store", headers: { Accept: "application/json" }, signal: abort.signal,
        });
        if (!response.ok) throw new Error("HTTP " + response.status);
        data = await response.json();
      } catch (error) {
        showState(false, error.name === "AbortError" ? "timed out" : String(error.message));
        return;
      }
      try {
        renderSummary(data);
        renderNodes(data.nodes || []);
        renderReads(data.reads || []);
      } catch (error) {
        showState(false, String(error.message), "unexpected data");
        return;
      }
      lastUpdate = new Date();
      const down = (data.nodes || []).filter((n) => !n.healthy).length;
      document.title = (down ? "\\u26a0 " + down + " down \\u00b7 " : "") +
        "replica-router status";
      showState(true, "");
    } finally {
      clearTimeout(timer);
      setTimeout(poll, 1000);
    }
  }
  poll();
})();
</script>
</body>
</html>
"""
