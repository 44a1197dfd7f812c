// Interlock console: live refresh of server-rendered fragments, and confirmations. No dependencies.
"use strict";

// An element with data-live="URL" is refreshed from URL every data-live-every ms. The URL answers
// JSON {"html": {element id: inner HTML}, "done": bool}: each named element's content is replaced;
// once done is true the refresh stops (a finished run changes no more). With data-events="URL"
// (a run's Server-Sent Events) each event of the types in data-event-types triggers a refresh at
// once, and polling slows down to a safety net while the stream is open.
// A live refresh never takes a form away from someone using it: one holding the focus, a value
// they typed, a submission on its way or its outcome (inUse). Such a form stays the very node it
// was (text, caret and focus untouched) while everything around it is redrawn, as long as the
// fresh HTML still offers a form of the same key (a form's content is fixed by its key: the
// same template, session and target); a form the server no longer offers goes.
function formKey(form) {
  return form.dataset.api || form.getAttribute("action") || form.id || "";
}

function inUse(form) {
  if (form.contains(document.activeElement) || form.dataset.sending) return true;
  if (form.querySelector("output.api-result")?.textContent) return true;
  return [...form.elements].some(f => {
    if (f.type === "checkbox" || f.type === "radio") return f.checked !== f.defaultChecked;
    if (f.tagName === "SELECT") return [...f.options].some(o => o.selected !== o.defaultSelected);
    return (f.tagName === "TEXTAREA" || (f.tagName === "INPUT" && f.type !== "hidden")) && f.value !== f.defaultValue;
  });
}

function offers(node, key) {
  if (node.nodeType !== Node.ELEMENT_NODE) return false;
  return (node.matches("form") && formKey(node) === key) || [...node.querySelectorAll("form")].some(f => formKey(f) === key);
}

// live's children become fresh's, except each child holding a kept form: that one stays in the
// document (moving it would blur the field being typed in) and is patched the same way. The
// open state of a <details> that holds a kept form is left as the person set it.
function patchChildren(live, fresh, kept) {
  const freshKids = [...fresh.childNodes];
  const stays = new Map();  // fresh child -> the live child that stands in for it
  for (const child of live.children) {
    const form = kept.find(f => child === f || child.contains(f));
    if (!form) continue;
    const twin = freshKids.find(n => !stays.has(n) && n.nodeType === Node.ELEMENT_NODE
                                     && n.tagName === child.tagName && offers(n, formKey(form)));
    if (twin) stays.set(twin, child);
  }
  const staying = new Set(stays.values());
  [...live.childNodes].forEach(n => { if (!staying.has(n)) n.remove(); });
  let next = live.firstChild;  // the next staying child
  for (const n of freshKids) {
    const old = stays.get(n);
    if (!old) { live.insertBefore(n, next); continue; }
    if (old !== next) live.insertBefore(old, next);  // the server reordered them (not seen so far)
    next = old.nextSibling;
    if (kept.includes(old)) continue;
    for (const a of [...old.attributes]) {
      if (!n.hasAttribute(a.name) && !(old.tagName === "DETAILS" && a.name === "open")) old.removeAttribute(a.name);
    }
    for (const a of [...n.attributes]) old.setAttribute(a.name, a.value);
    patchChildren(old, n, kept);
  }
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
      const fresh = document.createElement("template");
      fresh.innerHTML = inner;
      patchChildren(target, fresh.content, [...target.querySelectorAll("form")].filter(inUse));
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
  form.dataset.sending = "true";  // in use until the outcome is shown (see inUse)
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
    delete form.dataset.sending;
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
