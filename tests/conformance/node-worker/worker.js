#!/usr/bin/env node
// An Interlock agent worker in Node.js, written from contracts/ alone (contracts/README.md,
// "Writing a worker in another language", and contracts/asyncapi.json): the conformance test of
// the wire contract. Subjects, streams, buckets and protocol numbers are read from asyncapi.json,
// never spelled here. It serves the example workflow's topics
// (tools/interlock/devstack/examples/incident-remediation) with the same trivial behaviour as the
// Python agents there, and conformance.echo (returns its input: large payloads both ways).
//
// Environment: INTERLOCK_NATS_URL (comma-separated), INTERLOCK_CREDS (.creds file),
// INTERLOCK_TENANT (default "default"), INTERLOCK_WORKER_NAME, INTERLOCK_WORKER_CONCURRENCY,
// INTERLOCK_CONTRACTS (the contracts directory), INTERLOCK_SIDE_EFFECTS (a file recording side
// effects, optional), INTERLOCK_TLS_CA / _CERT / _KEY (optional).
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { connect, credsAuthenticator, nkeys } = require("nats");

const contractsDir = process.env.INTERLOCK_CONTRACTS || path.resolve(__dirname, "..", "..", "..", "contracts");
const doc = JSON.parse(fs.readFileSync(path.join(contractsDir, "asyncapi.json"), "utf8"));
const protocol = doc["x-interlock-protocol"];
const channel = (id) => doc.channels[id];
const subject = (id, values) => channel(id).address.replace(/\{(\w+)\}/g, (_, name) => {
  if (!(name in values)) throw new Error(`channel ${id}: no value for {${name}}`);
  return values[name];
});
const JOBS_STREAM = channel("jobs")["x-interlock"].stream;
const AGENTS_BUCKET = Object.keys(doc["x-interlock-key-value"])[0];
const PAYLOADS_STORE = Object.keys(doc["x-interlock-object-stores"])[0];

const TOKEN = /^[A-Za-z0-9_-]+$/;
const tenant = process.env.INTERLOCK_TENANT || "default";
if (!TOKEN.test(tenant)) throw new Error(`INTERLOCK_TENANT ${JSON.stringify(tenant)} is not a subject token`);
const name = process.env.INTERLOCK_WORKER_NAME || "node-worker";
const workerId = `${name}-${os.hostname()}-${process.pid}`.replace(/[^A-Za-z0-9_-]/g, "_");
const concurrency = Number(process.env.INTERLOCK_WORKER_CONCURRENCY || 8);
const startedAt = new Date().toISOString();

function log(...parts) {
  console.log(new Date().toISOString(), `[${workerId}]`, ...parts);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- the example's agents (agents.py, from the contract's point of view) -------------------
class RetryableError extends Error {}
class FatalError extends Error {}

// json.dumps(value, sort_keys=True) of Python: ", " and ": " separators, non-ASCII as \uXXXX
function pythonDumps(value) {
  if (value === null || typeof value !== "object") {
    if (typeof value === "string") return JSON.stringify(value).replace(/[\u007f-\uffff]/g,
      (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
    if (typeof value === "number" && Number.isInteger(value)) return String(value);
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return "[" + value.map(pythonDumps).join(", ") + "]";
  return "{" + Object.keys(value).sort().map((k) => `${pythonDumps(k)}: ${pythonDumps(value[k])}`).join(", ") + "}";
}

// a side effect happens once per idempotency key (a retry after a crash does nothing)
function recordSideEffect(ctx, what) {
  const file = process.env.INTERLOCK_SIDE_EFFECTS;
  if (!file) return true;
  const lines = fs.existsSync(file) ? fs.readFileSync(file, "utf8").split("\n") : [];
  for (const line of lines) {
    try {
      if (JSON.parse(line).key === ctx.job.idempotency_key) return false;
    } catch { /* a partial line */ }
  }
  fs.appendFileSync(file, JSON.stringify({ key: ctx.job.idempotency_key, job: ctx.job.job_id, what }) + "\n");
  return true;
}

const HANDLERS = {
  "incident.detect": {
    version: "1", capabilities: ["alerts"],
    async run(ctx) {
      const alert = (ctx.input && ctx.input.alert) || {};
      return { host: alert.host || "web-1", service: alert.service || "checkout", symptom: alert.symptom || "5xx spike" };
    },
  },
  "incident.classify": {
    version: "1", capabilities: ["llm"],
    async run(ctx) {
      await sleep(50); // stands in for a model call
      const symptom = ctx.input.signal.symptom;
      return { severity: symptom.includes("5xx") ? "high" : "medium", category: "availability" };
    },
  },
  "incident.enrich": {
    version: "1", capabilities: ["cmdb"],
    async run(ctx) {
      await sleep(50); // stands in for a CMDB lookup
      return { host: ctx.input.host, service: "checkout", owner: "payments-team", region: "eu-west-1" };
    },
  },
  "incident.plan": {
    version: "1", capabilities: ["llm"],
    async run(ctx) {
      const digest = crypto.createHash("sha256").update(pythonDumps(ctx.input)).digest("hex").slice(0, 8);
      return { patch_id: `PATCH-${digest}`, action: "rollback-deploy", host: ctx.input.host };
    },
  },
  "incident.apply": {
    version: "1", capabilities: ["ssh"],
    async run(ctx) {
      await ctx.heartbeat("connecting");
      if (ctx.job.attempt === 1) throw new RetryableError("ssh: connection reset by peer (simulated, first attempt only)");
      recordSideEffect(ctx, `applied ${ctx.input.plan.patch_id}`);
      return { applied: ctx.input.plan.patch_id, attempt: ctx.job.attempt };
    },
  },
  // not in the example: returns its input, so the test can send a large payload both ways
  "conformance.echo": {
    version: "1", capabilities: [],
    async run(ctx) {
      return { echo: ctx.input };
    },
  },
  "incident.rollback": {
    version: "1", capabilities: ["ssh"],
    async run(ctx) {
      recordSideEffect(ctx, `rolled back ${ctx.input.step}`);
      return { rolled_back: ctx.input.step };
    },
  },
};

// -- connecting (README "Connecting") --------------------------------------------------------
function readCreds(file) {
  const text = fs.readFileSync(file, "utf8");
  const blocks = [...text.matchAll(/-{3,}[^\n]*-{3,}\r?\n([\w\-.=]+)\r?\n-{3,}[^\n]*-{3,}/g)].map((m) => m[1]);
  if (blocks.length < 2) throw new Error(`${file}: not a .creds file (no user JWT and nkey seed)`);
  const publicKey = nkeys.fromSeed(new TextEncoder().encode(blocks[1])).getPublicKey();
  return { bytes: new TextEncoder().encode(text), publicKey };
}

async function open() {
  const credsFile = process.env.INTERLOCK_CREDS;
  if (!credsFile) throw new Error("INTERLOCK_CREDS is not set: a worker connects with its .creds file");
  const creds = readCreds(credsFile);
  // README "Connecting": INTERLOCK_NATS_URL, else what `interlock up` wrote, else the default
  const urlFile = path.join(".interlock", "nats.url");
  const fromFile = fs.existsSync(urlFile) ? fs.readFileSync(urlFile, "utf8").trim() : "";
  const servers = (process.env.INTERLOCK_NATS_URL || fromFile || "nats://127.0.0.1:4222").split(",");
  const options = {
    servers, name: `interlock-worker-${name}`, authenticator: credsAuthenticator(creds.bytes),
    inboxPrefix: `_INBOX.${creds.publicKey}`, maxReconnectAttempts: -1, reconnectTimeWait: 250,
  };
  if (process.env.INTERLOCK_TLS_CA) {
    options.tls = { caFile: process.env.INTERLOCK_TLS_CA };
    if (process.env.INTERLOCK_TLS_CERT) Object.assign(options.tls, {
      certFile: process.env.INTERLOCK_TLS_CERT, keyFile: process.env.INTERLOCK_TLS_KEY });
  }
  return connect(options);
}

// -- the worker ------------------------------------------------------------------------------
const REQUIRED = { job_id: "string", run_id: "string", tenant: "string", workflow_id: "string", step_id: "string",
  topic: "string", attempt: "number", idempotency_key: "string", job_hash: "string" };

function decodeJob(data) {
  let job;
  try {
    job = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(data));
  } catch (e) {
    return { problem: `invalid job: not UTF-8 JSON (${e.message})` };
  }
  if (job === null || typeof job !== "object" || Array.isArray(job)) return { problem: "invalid job: not a JSON object" };
  for (const [field, type] of Object.entries(REQUIRED)) {
    if (typeof job[field] !== type) return { problem: `invalid job: ${field} missing or not a ${type}` };
  }
  if (!Number.isInteger(job.attempt) || job.attempt < 1) return { problem: "invalid job: attempt is not a whole number >= 1" };
  return { job };
}

function consumerName(topic) {
  const digest = crypto.createHash("sha256").update(`${tenant}\n${topic}`).digest("hex").slice(0, 16);
  return `worker_${tenant}_${topic.replace(/\./g, "_")}_${digest}`;
}

// canonical JSON: keys sorted, no whitespace (what the inline limit is measured on)
function canonical(value) {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return "[" + value.map(canonical).join(",") + "]";
  return "{" + Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",") + "}";
}

class Worker {
  constructor(nc) {
    this.nc = nc;
    this.js = nc.jetstream();
    this.running = new Map(); // job id -> AbortController
    this.stopping = false;
    this.slots = concurrency;
    this.waiters = [];
    this.iterators = [];
    this.loops = [];
  }

  async start() {
    const jsm = await this.nc.jetstreamManager();
    this.kv = await this.js.views.kv(AGENTS_BUCKET, { bindOnly: true });
    this.nc.subscribe(subject("cancelNotices", { tenant, run_id: "*" }), { callback: (err, msg) => this.onCancel(err, msg) });
    const settings = protocol.worker_consumer;
    for (const topic of Object.keys(HANDLERS)) {
      const durable = consumerName(topic);
      try {
        await jsm.consumers.add(JOBS_STREAM, {
          name: durable, durable_name: durable, filter_subject: subject("jobs", { tenant, topic }),
          ack_policy: settings.ack_policy, ack_wait: settings.ack_wait, max_ack_pending: settings.max_ack_pending,
          max_deliver: settings.max_deliver, deliver_policy: settings.deliver_policy,
        });
      } catch (e) { // exists with other settings: use it as it is
        log(`consumer ${durable}: ${e.message}; using it as it is`);
      }
      const consumer = await this.js.consumers.get(JOBS_STREAM, durable);
      const messages = await consumer.consume({ max_messages: concurrency });
      this.iterators.push(messages);
      this.loops.push(this.pull(messages, topic));
    }
    await this.register();
    this.registryTimer = setInterval(() => this.register().catch((e) => log("registry:", e.message)),
      protocol.registry.refresh_s * 1000);
    log(`serving ${Object.keys(HANDLERS).join(", ")} for tenant ${tenant}`);
  }

  async acquire() {
    if (this.slots > 0) { this.slots -= 1; return; }
    await new Promise((resolve) => this.waiters.push(resolve));
  }

  release() {
    const next = this.waiters.shift();
    if (next) next(); else this.slots += 1;
  }

  async pull(messages, topic) {
    for await (const msg of messages) {
      if (this.stopping) break;
      await this.acquire();
      this.handle(msg, topic).catch((e) => log(`job on ${msg.subject}: ${e.stack || e}`)).finally(() => this.release());
    }
  }

  async handle(msg, topic) {
    const { job, problem } = decodeJob(msg.data);
    if (problem || job.tenant !== tenant) {
      await this.deadLetter(msg, problem || `job ${job.job_id} of tenant ${JSON.stringify(job.tenant)} reached a worker of tenant ${JSON.stringify(tenant)}`);
      await msg.ackAck();
      return;
    }
    // acked once decoded: from here the job's lease is its heartbeats
    await msg.ackAck();
    await this.runJob(job, topic);
  }

  async deadLetter(msg, reason) {
    const data = Buffer.from(msg.data);
    const limits = protocol.dead_letter;
    const hdrs = {};
    if (msg.headers) for (const k of msg.headers.keys()) hdrs[k] = msg.headers.get(k);
    const letter = {
      service: "worker", subject: msg.subject, reason: reason.slice(0, limits.reason_limit_chars),
      data_b64: data.subarray(0, limits.prefix_limit_bytes).toString("base64"), headers: hdrs,
      at: new Date().toISOString(), size: data.length, sha256: crypto.createHash("sha256").update(data).digest("hex"),
      truncated: data.length > limits.prefix_limit_bytes,
    };
    log(`dead-lettering a message from ${msg.subject}: ${reason}`);
    await this.js.publish(subject("deadLetters", { service: "worker" }), JSON.stringify(letter));
  }

  beat(job, progress) {
    const hb = { job_id: job.job_id, run_id: job.run_id, tenant: job.tenant, step_id: job.step_id,
      attempt: job.attempt, worker: workerId, progress: progress ?? null };
    // JetStream publish, no msg id; a lost beat is no error and never holds up the work
    return this.js.publish(subject("heartbeats", { tenant: job.tenant, run_id: job.run_id }), JSON.stringify(hb),
      { timeout: 2000 }).catch((e) => log(`heartbeat for ${job.job_id}: ${e.message}`));
  }

  async resolveInput(job) {
    if (!job.input_ref) return job.input ?? null;
    const store = await this.js.views.os(job.input_ref.object_store || PAYLOADS_STORE);
    const data = await store.getBlob(job.input_ref.key);
    if (data === null) throw new FatalError(`input ${job.input_ref.key} is not in the object store`);
    if (crypto.createHash("sha256").update(data).digest("hex") !== job.input_ref.sha256) {
      throw new FatalError(`input ${job.input_ref.key} does not match its sha256`);
    }
    return JSON.parse(new TextDecoder().decode(data));
  }

  async offload(output) {
    const bytes = Buffer.from(canonical(output ?? null), "utf8");
    if (bytes.length <= protocol.inline_limit_bytes) return { output: output ?? null };
    const digest = crypto.createHash("sha256").update(bytes).digest("hex");
    const store = await this.js.views.os(PAYLOADS_STORE);
    await store.putBlob({ name: digest }, new Uint8Array(bytes));
    return { output: null, output_ref: { object_store: PAYLOADS_STORE, key: digest, sha256: digest, size: bytes.length } };
  }

  async runJob(job, topic) {
    const abort = new AbortController();
    this.running.set(job.job_id, abort);
    await this.beat(job, "started");
    const beating = setInterval(() => this.beat(job, null), Math.max(50, job.heartbeat_interval_ms || 2000));
    let result;
    let deadlineTimer;
    try {
      const input = await this.resolveInput(job);
      const ctx = { job, input, workerId, signal: abort.signal, heartbeat: (progress) => this.beat(job, progress) };
      const work = HANDLERS[topic].run(ctx);
      const stopped = new Promise((_, reject) => {
        abort.signal.addEventListener("abort", () => reject(abort.signal.reason), { once: true });
        if (job.deadline) {
          const ms = Math.max(0, Date.parse(job.deadline) - Date.now());
          deadlineTimer = setTimeout(() => reject(new DeadlineError()), ms);
        }
      });
      const output = await Promise.race([work, stopped]);
      result = { ok: true, ...(await this.offload(output)) };
    } catch (e) {
      if (e instanceof Stopped) {
        log(`job ${job.job_id}: ${e.message}; no result`);
        return;
      }
      if (e instanceof DeadlineError) {
        result = { ok: false, error: { message: "the handler ran past the job deadline", retryable: true, kind: "timeout" } };
      } else if (e instanceof FatalError) {
        result = { ok: false, error: { message: e.message || "fatal", retryable: false, kind: "fatal" } };
      } else {
        log(`job ${job.job_id} failed: ${e.message}`);
        result = { ok: false, error: { message: `${e.constructor.name}: ${e.message}`, retryable: true, kind: "error" } };
      }
    } finally {
      clearInterval(beating);
      clearTimeout(deadlineTimer);
      this.running.delete(job.job_id);
    }
    await this.publishResult(job, result);
  }

  async publishResult(job, outcome) {
    const body = JSON.stringify({ job_id: job.job_id, run_id: job.run_id, tenant: job.tenant, step_id: job.step_id,
      attempt: job.attempt, worker: workerId, ...outcome });
    const until = Date.now() + 120_000;
    for (let delay = 200; ; delay = Math.min(delay * 2, 2000)) {
      try { // the same msg id on every try: stored once
        await this.js.publish(subject("results", { tenant: job.tenant, run_id: job.run_id }), body,
          { msgID: `result:${job.job_id}`, timeout: 5000 });
        return;
      } catch (e) {
        if (Date.now() > until) throw e;
        log(`result of ${job.job_id}: ${e.message}; retrying`);
        await sleep(delay);
      }
    }
  }

  onCancel(err, msg) {
    if (err) return;
    let notice;
    try { notice = JSON.parse(new TextDecoder().decode(msg.data)); } catch { return; }
    if (!notice || typeof notice.run_id !== "string") return;
    for (const [jobId, abort] of this.running) {
      if (jobId.startsWith(notice.run_id + ":")) abort.abort(new Stopped(`run ${notice.run_id} ended`));
    }
  }

  registration(topic, handler) {
    return JSON.stringify({ worker_id: workerId, topic, tenant, version: handler.version,
      capabilities: handler.capabilities, host: os.hostname(), pid: process.pid, started_at: startedAt,
      last_heartbeat: new Date().toISOString() });
  }

  async register() {
    for (const [topic, handler] of Object.entries(HANDLERS)) {
      await this.kv.put(`${tenant}.${topic}.${workerId}`, this.registration(topic, handler));
    }
  }

  // clean shutdown: stop pulling, stop jobs in hand without results (their leases retry them),
  // delete the registry entries, drain
  async stop() {
    this.stopping = true;
    clearInterval(this.registryTimer);
    for (const messages of this.iterators) messages.stop();
    for (const abort of this.running.values()) abort.abort(new Stopped("shutting down"));
    for (const topic of Object.keys(HANDLERS)) {
      await this.kv.delete(`${tenant}.${topic}.${workerId}`).catch((e) => log("registry delete:", e.message));
    }
    await this.nc.drain();
  }
}

class Stopped extends Error {}
class DeadlineError extends Error {}

async function main() {
  const nc = await open();
  const worker = new Worker(nc);
  let stopping = null;
  const shutdown = (signal) => {
    if (stopping) return;
    log(`${signal}: shutting down`);
    stopping = worker.stop().then(() => process.exit(0), (e) => { log(`shutdown: ${e.message}`); process.exit(1); });
  };
  process.on("SIGTERM", () => shutdown("SIGTERM"));
  process.on("SIGINT", () => shutdown("SIGINT"));
  await worker.start();
  console.log("READY", workerId);
}

main().catch((e) => {
  console.error(`worker failed: ${e.stack || e}`);
  process.exit(1);
});
