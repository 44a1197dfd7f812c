// Interlock console: live refresh of server-rendered fragments, and confirmations. No dependencies.
"use strict";

// An element with data-live="URL" is refreshed from URL every data-live-every ms. The URL answers
// JSON {"html": {element id: inner HTML}, "done": bool}: each named element's content is replaced;
// once done is true the refresh stops (a finished run changes no more). With data-events="URL"
// (a run's Server-Sent Events) each event of the types in data-event-types triggers a refresh at
// once, and polling slows down to a safety net while the stream is open.
function startLive(el) {
  const url = el.dataset.live;
  const every = parseInt(el.dataset.liveEvery || "2000", 10);
  let stopped = false, failures = 0, timer = null, busy = false, again = false;
  let source = null, streaming = false;

  function schedule(ms) {
    clearTimeout(timer);
    if (!stopped) timer = setTimeout(tick, ms);
  }

  function replace(html) {
    for (const [id, inner] of Object.entries(html || {})) {
      const target = document.getElementById(id);
      if (!target || target.innerHTML === inner) continue;
      const key = d => (d.closest("[id]")?.id || "") + "|" + (d.querySelector("summary")?.textContent || "");
      const open = new Set([...target.querySelectorAll("details[open]")].map(key));
      target.innerHTML = inner;
      target.querySelectorAll("details").forEach(d => { if (open.has(key(d))) d.open = true; });
    }
  }

  async function tick() {
    if (stopped) return;
    if (busy) { again = true; return; }
    busy = true;
    try {
      const res = await fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } });
      if (res.status === 401) { stop(); window.location.reload(); return; }
      if (!res.ok) throw new Error("HTTP " + res.status);
      const body = await res.json();
      replace(body.html);
      failures = 0;
      document.body.dataset.liveAt = String(Date.now());
      if (body.done) { stop(); document.body.dataset.liveDone = "true"; return; }
    } catch (err) {
      failures += 1;  // the API restarting: back off, keep trying
    } finally {
      busy = false;
    }
    if (again) { again = false; schedule(50); return; }
    schedule(Math.min((streaming ? every * 6 : every) * (1 + failures), 15000));
  }

  function stop() {
    stopped = true;
    clearTimeout(timer);
    if (source) source.close();
  }

  if (el.dataset.events && window.EventSource) {
    source = new EventSource(el.dataset.events);
    const soon = () => schedule(100);
    source.onopen = () => { streaming = true; };
    source.onerror = () => { streaming = false; };  // it reconnects by itself; polling covers the gap
    (el.dataset.eventTypes || "").split(",").filter(Boolean).forEach(type => source.addEventListener(type, soon));
    source.addEventListener("end", () => { source.close(); streaming = false; soon(); });
  }
  schedule(every);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(startLive);
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) event.preventDefault();
    const reject = event.submitter && event.submitter.value === "reject";
    const reason = form.querySelector("input[name=reason]");
    if (reject && reason && !reason.value.trim()) {
      event.preventDefault();
      reason.setCustomValidity("A rejection needs a reason");
      reason.reportValidity();
      reason.addEventListener("input", () => reason.setCustomValidity(""), { once: true });
    }
  });
});
