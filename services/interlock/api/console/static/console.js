// Interlock console: live refresh of server-rendered fragments, and confirmations. No dependencies.
"use strict";

// An element with data-live="URL" is refreshed from URL every data-live-every ms. The URL answers
// JSON {"html": {element id: inner HTML}, "done": bool}: each named element's content is replaced;
// once done is true the refresh stops (a finished run changes no more). With data-events="URL"
// (a run's Server-Sent Events) each event of the types in data-event-types triggers a refresh at
// once, and polling slows down to a safety net while the stream is open.
// What a person typed into an API form, and the outcome shown in it, survive a refresh.
function keptForms(root) {
  const kept = new Map();
  root.querySelectorAll("form[data-api]").forEach(form => {
    const values = {};
    form.querySelectorAll("input:not([type=hidden]), textarea").forEach(f => { if (f.value) values[f.name] = f.value; });
    const out = form.querySelector("output.api-result");
    kept.set(form.dataset.api, { values, text: out ? out.textContent : "", cls: out ? out.className : "" });
  });
  return kept;
}

function restoreForms(root, kept) {
  root.querySelectorAll("form[data-api]").forEach(form => {
    const was = kept.get(form.dataset.api);
    if (!was) return;
    for (const [name, value] of Object.entries(was.values)) {
      const f = form.querySelector(`[name="${name}"]`);
      if (f && !f.value) f.value = value;
    }
    const out = form.querySelector("output.api-result");
    if (out && was.text) { out.textContent = was.text; out.className = was.cls; }
  });
}

function startLive(el) {
  const url = el.dataset.live || el.dataset.liveIdle;
  const every = parseInt(el.dataset.liveEvery || "2000", 10);
  let stopped = false, failures = 0, timer = null, busy = false, again = false;
  let source = null, streaming = false;
  const lastHtml = new Map();

  function schedule(ms) {
    clearTimeout(timer);
    if (!stopped) timer = setTimeout(tick, ms);
  }

  function replace(html) {
    for (const [id, inner] of Object.entries(html || {})) {
      const target = document.getElementById(id);
      // compared with what the server sent last (the page's own outcome messages are not a change)
      if (!target) continue;
      const before = lastHtml.has(id) ? lastHtml.get(id) : target.innerHTML;
      lastHtml.set(id, inner);
      if (before === inner) continue;
      const key = d => (d.closest("[id]")?.id || "") + "|" + (d.querySelector("summary")?.textContent || "");
      const open = new Set([...target.querySelectorAll("details[open]")].map(key));
      const kept = keptForms(target);
      target.innerHTML = inner;
      target.querySelectorAll("details").forEach(d => { if (open.has(key(d))) d.open = true; });
      restoreForms(target, kept);
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

  // an intervention (sendToApi below) changes the run: refresh now, even a page that had stopped
  el.addEventListener("interlock:refresh", () => { stopped = false; schedule(50); });

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

// A form with data-api="URL" is sent to that API route as JSON (same origin, the session cookie
// and its CSRF token in the X-CSRF-Token header): each named field is a string, except
// data-json ones (parsed; "optional" ones left out when empty) and data-number ones. The
// outcome goes in the form's <output>: the problem+json detail on an error.
async function sendToApi(form) {
  const out = form.querySelector("output.api-result");
  const say = (text, ok) => { if (out) { out.textContent = text; out.className = "api-result " + (ok ? "ok" : "error"); } };
  const body = {};
  let csrf = "";
  for (const field of form.querySelectorAll("[name]")) {
    const raw = field.value;
    if (field.name === "csrf_token") { csrf = raw; continue; }
    if (field.dataset.json || field.dataset.number) {
      if (!raw.trim()) {
        if ((field.dataset.json || field.dataset.number) === "optional") continue;
        say(field.name + ": give a JSON value", false); return;
      }
      if (field.dataset.number) { body[field.name] = Number(raw); continue; }
      try { body[field.name] = JSON.parse(raw); } catch (err) { say(field.name + " is not JSON: " + err.message, false); return; }
      continue;
    }
    body[field.name] = raw;
  }
  const button = form.querySelector("button[type=submit]");
  if (button) button.disabled = true;
  try {
    const res = await fetch(form.dataset.api, {
      method: "POST", credentials: "same-origin", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrf },
    });
    const reply = await res.json().catch(() => ({}));
    if (!res.ok) { say(reply.detail ? (typeof reply.detail === "string" ? reply.detail : JSON.stringify(reply.detail)) : "HTTP " + res.status, false); return; }
    say(reply.detail && typeof reply.detail === "string" ? "done: " + reply.detail : "done", true);
    form.querySelectorAll("input:not([type=hidden]), textarea").forEach(f => { f.value = ""; });
    document.querySelectorAll("[data-live], [data-live-idle]").forEach(live => live.dispatchEvent(new Event("interlock:refresh")));
  } catch (err) {
    say("could not reach the API: " + err.message, false);
  } finally {
    if (button) button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(startLive);
  // data-live-idle: the same, started by the first intervention on the page
  document.querySelectorAll("[data-live-idle]").forEach(el => el.addEventListener("interlock:refresh", () => startLive(el), { once: true }));
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.dataset.api) { event.preventDefault(); sendToApi(form); return; }
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
