// Interlock console: live refresh of server-rendered fragments, and confirmations. No dependencies.
"use strict";

// An element with data-live="URL" is refreshed from URL every data-live-every ms. The URL answers
// JSON {"html": {element id: inner HTML}, "done": bool}: each named element's content is replaced;
// once done is true the refresh stops (a finished run changes no more).
function startLive(el) {
  const url = el.dataset.live;
  const every = parseInt(el.dataset.liveEvery || "2000", 10);
  let stopped = false;
  let failures = 0;
  async function tick() {
    if (stopped) return;
    try {
      const res = await fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } });
      if (res.status === 401 || res.status === 403) { stopped = true; window.location.reload(); return; }
      if (!res.ok) throw new Error("HTTP " + res.status);
      const body = await res.json();
      for (const [id, html] of Object.entries(body.html || {})) {
        const target = document.getElementById(id);
        if (target && target.innerHTML !== html) {
          const open = [...target.querySelectorAll("details[open]")].map(d => d.closest("[id]")?.id + "|" + d.querySelector("summary")?.textContent);
          target.innerHTML = html;
          target.querySelectorAll("details").forEach(d => {
            if (open.includes(d.closest("[id]")?.id + "|" + d.querySelector("summary")?.textContent)) d.open = true;
          });
        }
      }
      failures = 0;
      document.body.dataset.liveAt = String(Date.now());
      if (body.done) { stopped = true; document.body.dataset.liveDone = "true"; return; }
    } catch (err) {
      failures += 1;  // the API restarting: back off, keep trying
    }
    setTimeout(tick, Math.min(every * (1 + failures), 15000));
  }
  setTimeout(tick, every);
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
