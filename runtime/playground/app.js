// The tenantflow playground: write a workflow, run it, follow any instance live.
//
// Hand-written, no dependencies, no build step: the supervisor serves this file as it
// is. Everything it shows comes from the admin API (SPEC 8) plus /v1/playground; every
// value that came from tenant code (step names, outputs, log lines) is written with
// textContent, never as HTML.

const FINISHED = new Set(["complete", "errored", "terminated"]);
const STATUSES = ["queued", "running", "paused", "errored", "terminated", "complete",
  "waiting", "waitingForPause", "unknown"];
const INDENT = "    ";
const MAX_RECONNECT_MS = 5000;

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function pretty(value) {
  return JSON.stringify(value, null, 2);
}

function timeOf(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

function say(id, text, isError = false) {
  const node = $(id);
  node.textContent = text;
  node.classList.toggle("error", isError);
}

// ---------------------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
    this.detail = error;
  }
}

// The session cookie authenticates the page; the extra header is what the server asks
// of state-changing requests made with it (a cross-site form cannot send it).
async function api(method, path, body) {
  const init = {
    method,
    credentials: "same-origin",
    headers: { "accept": "application/json", "x-tenantflow-playground": "1" },
  };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    if (response.status === 401) showBanner("Not logged in: open /playground?token=<admin token> again.");
    throw new ApiError(response.status, data);
  }
  return data;
}

function instancePath(tenant, id) {
  return `/v1/tenants/${encodeURIComponent(tenant)}/instances/${encodeURIComponent(id)}`;
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

function parseJson(text, what) {
  if (!text.trim()) return null;
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`${what} is not valid JSON: ${error.message}`);
  }
}

// ---------------------------------------------------------------------------- editor

// Where the line holding offset `at` starts. (lastIndexOf would read a negative
// start as 0 and find a newline at offset 0 for a cursor before it.)
function lineStart(text, at) {
  return at === 0 ? 0 : text.lastIndexOf("\n", at - 1) + 1;
}

// A textarea with a line-number gutter. Edits go through execCommand("insertText") so
// the browser's undo history keeps them; setRangeText is the fallback.
class Editor {
  constructor(textarea, gutter, band) {
    this.area = textarea;
    this.gutter = gutter;
    this.band = band;
    this.lines = 0;
    this.errorLine = null;
    this.tabLeaves = false;
    textarea.addEventListener("input", () => {
      this.clearError();
      this.renderGutter();
    });
    textarea.addEventListener("scroll", () => this.syncScroll());
    textarea.addEventListener("keydown", (event) => this.onKey(event));
    textarea.addEventListener("blur", () => { this.tabLeaves = false; });
    new ResizeObserver(() => this.syncScroll()).observe(textarea);
    this.renderGutter();
  }

  get value() {
    return this.area.value;
  }

  set value(text) {
    this.area.value = text;
    this.clearError();
    this.renderGutter();
  }

  lineHeight() {
    return parseFloat(getComputedStyle(this.area).lineHeight) || 20;
  }

  renderGutter() {
    const count = this.area.value.split("\n").length;
    if (count !== this.lines) {
      const fragment = document.createDocumentFragment();
      for (let n = 1; n <= count; n += 1) fragment.append(el("div", { dataset: { line: n } }, String(n)));
      this.gutter.replaceChildren(fragment);
      this.lines = count;
    }
    this.markGutter();
    this.syncScroll();
  }

  markGutter() {
    for (const node of this.gutter.querySelectorAll(".error")) node.classList.remove("error");
    if (this.errorLine !== null) {
      const node = this.gutter.querySelector(`[data-line="${this.errorLine}"]`);
      if (node) node.classList.add("error");
    }
  }

  syncScroll() {
    this.gutter.scrollTop = this.area.scrollTop;
    if (this.errorLine !== null) {
      const top = (this.errorLine - 1) * this.lineHeight() - this.area.scrollTop;
      this.band.style.transform = `translateY(${top}px)`;
      this.band.style.height = `${this.lineHeight()}px`;
    }
  }

  // Highlight a line and put the cursor at its start, scrolled into view.
  showError(line) {
    const count = this.area.value.split("\n").length;
    this.errorLine = Math.min(Math.max(1, line), count);
    this.band.hidden = false;
    const starts = this.lineStarts();
    const start = starts[this.errorLine - 1];
    const end = this.errorLine < starts.length ? starts[this.errorLine] - 1 : this.area.value.length;
    this.area.focus();
    this.area.setSelectionRange(start, end);
    const height = this.lineHeight();
    const wanted = (this.errorLine - 1) * height - this.area.clientHeight / 3;
    this.area.scrollTop = Math.max(0, wanted);
    this.markGutter();
    this.syncScroll();
  }

  clearError() {
    this.errorLine = null;
    this.band.hidden = true;
    this.markGutter();
  }

  lineStarts() {
    const starts = [0];
    const text = this.area.value;
    for (let i = 0; i < text.length; i += 1) if (text[i] === "\n") starts.push(i + 1);
    return starts;
  }

  replace(start, end, text) {
    const area = this.area;
    area.focus();
    area.setSelectionRange(start, end);
    const command = text === "" ? "delete" : "insertText";
    if (start === end && text === "") return;
    if (!document.execCommand(command, false, text)) {
      area.setRangeText(text, start, end, "end");
      area.dispatchEvent(new Event("input"));
    }
  }

  onKey(event) {
    if (event.key === "Escape") {
      // Tab is the editor's; Esc hands the next Tab back to the page (no keyboard trap).
      this.tabLeaves = true;
      return;
    }
    if (event.key === "Tab" && !event.ctrlKey && !event.altKey && !event.metaKey) {
      if (this.tabLeaves) return;
      event.preventDefault();
      if (event.shiftKey) this.dedent();
      else this.indent();
      return;
    }
    this.tabLeaves = false;
    if (event.key === "Enter" && !event.ctrlKey && !event.altKey && !event.metaKey && !event.shiftKey) {
      event.preventDefault();
      this.newline();
    }
  }

  // The [first line start, last line end) range the selection touches.
  selectedLines() {
    const text = this.area.value;
    const { selectionStart: s, selectionEnd: e } = this.area;
    const first = lineStart(text, s);
    // A selection ending at a line start does not take that line in.
    const endAt = e > s && text[e - 1] === "\n" ? e - 1 : e;
    let last = text.indexOf("\n", endAt);
    if (last === -1) last = text.length;
    return [first, last];
  }

  indent() {
    const area = this.area;
    const { selectionStart: s, selectionEnd: e } = area;
    const text = area.value;
    if (!text.slice(s, e).includes("\n")) {
      const column = s - lineStart(text, s);
      this.replace(s, e, " ".repeat(INDENT.length - (column % INDENT.length)));
      return;
    }
    const [first, last] = this.selectedLines();
    const lines = text.slice(first, last).split("\n");
    const block = lines.map((line) => (line ? INDENT + line : line)).join("\n");
    this.replace(first, last, block);
    area.setSelectionRange(first, first + block.length);
  }

  dedent() {
    const area = this.area;
    const { selectionStart: s, selectionEnd: e } = area;
    const [first, last] = this.selectedLines();
    const lines = area.value.slice(first, last).split("\n");
    const removed = lines.map((line) => line.length - line.replace(/^ {1,4}/, "").length);
    if (removed.every((n) => n === 0)) return;
    const block = lines.map((line, i) => line.slice(removed[i])).join("\n");
    this.replace(first, last, block);
    if (s === e) {
      const cursor = Math.max(first, s - removed[0]);
      area.setSelectionRange(cursor, cursor);
    } else {
      area.setSelectionRange(first, first + block.length);
    }
  }

  // Enter keeps the line's indentation, one level more after a line ending in ':'.
  newline() {
    const { selectionStart: s, selectionEnd: e } = this.area;
    const text = this.area.value;
    const before = text.slice(lineStart(text, s), s);
    let indent = before.match(/^[ \t]*/)[0];
    if (before.trimEnd().endsWith(":")) indent += INDENT;
    this.replace(s, e, "\n" + indent);
  }
}

// Step names in the source, in source order: shown as "pending" until they run. A
// guess from the text (loops and branches can change the order), so a step the
// journal records replaces its placeholder and unmatched ones go when the run ends.
function expectedSteps(source) {
  const pattern = /step\.(do|sleep|sleep_until|wait_for_event)\(\s*(["'])((?:(?!\2).)+)\2/g;
  const kinds = { do: "do", sleep: "sleep", sleep_until: "sleep", wait_for_event: "waitForEvent" };
  // Comment lines out; the rest as one text, as a call may put its name on the next line.
  const code = source.split("\n").filter((line) => !line.trimStart().startsWith("#")).join("\n");
  return [...code.matchAll(pattern)].map((match) => ({ name: match[3], type: kinds[match[1]] }));
}

// ---------------------------------------------------------------------------- live view

// One instance followed through its /logs event stream. A stream that drops (the
// supervisor restarted, the network blinked) is reopened with a backoff; each
// (re)connection first re-reads the instance, and the stream then replays the whole
// history, so the view always ends up where the instance is.
class InstanceView {
  constructor() {
    this.generation = 0;
    this.source = null;
    this.timer = null;
    this.actionsBound = false;
  }

  open(tenant, id, expected = []) {
    this.close();
    this.generation += 1;
    Object.assign(this, {
      tenant, id, expected,
      steps: new Map(),
      logIds: new Set(),
      status: null,
      finished: false,
      attempt: 0,
    });
    $("view-empty").hidden = true;
    $("view").hidden = false;
    $("view-tenant").textContent = tenant;
    $("view-id").textContent = id;
    $("view-version").textContent = "";
    $("steps").replaceChildren();
    $("logs").replaceChildren();
    $("result").replaceChildren();
    say("action-message", "");
    this.setStatus(null);
    const hash = `#/instances/${encodeURIComponent(tenant)}/${encodeURIComponent(id)}`;
    if (location.hash !== hash) history.replaceState(null, "", hash);
    this.connect(this.generation);
  }

  close() {
    if (this.source) this.source.close();
    this.source = null;
    clearTimeout(this.timer);
  }

  current(generation) {
    return generation === this.generation;
  }

  setConn(state, text) {
    const conn = $("view-conn");
    conn.dataset.state = state;
    conn.textContent = text;
  }

  async connect(generation) {
    if (!this.current(generation)) return;
    this.setConn("connecting", "connecting…");
    let snapshot;
    try {
      snapshot = await api("GET", instancePath(this.tenant, this.id));
    } catch (error) {
      if (!this.current(generation)) return;
      if (error instanceof ApiError && error.status < 500) {
        this.setConn("closed", "not available");
        say("action-message", error.message, true);
        return;
      }
      this.retry(generation);
      return;
    }
    if (!this.current(generation)) return;
    this.applySnapshot(snapshot);
    const source = new EventSource(`${instancePath(this.tenant, this.id)}/logs`);
    this.source = source;
    source.addEventListener("open", () => {
      if (!this.current(generation)) return;
      this.attempt = 0;
      this.setConn("live", "live");
    });
    source.addEventListener("step", (event) => this.guard(generation, () => this.applyStep(JSON.parse(event.data))));
    source.addEventListener("log", (event) => this.guard(generation, () => this.applyLog(JSON.parse(event.data))));
    source.addEventListener("status", (event) => this.guard(generation, () => this.setStatus(JSON.parse(event.data).status)));
    source.addEventListener("done", (event) => this.guard(generation, () => {
      source.close();
      this.applyDone(JSON.parse(event.data));
    }));
    // "error" is both the stream's own event (a server-side error, with data) and
    // EventSource's connection failure (without): the second one means reconnect.
    source.addEventListener("error", (event) => this.guard(generation, () => {
      source.close();
      if (event.data) {
        const body = JSON.parse(event.data);
        this.setConn("closed", "stream error");
        say("action-message", (body.error && body.error.message) || "stream failed", true);
        return;
      }
      if (!this.finished) this.retry(generation);
    }));
  }

  guard(generation, apply) {
    if (this.current(generation)) apply();
  }

  retry(generation) {
    this.close();
    const delay = Math.min(MAX_RECONNECT_MS, 250 * 2 ** this.attempt);
    this.attempt += 1;
    this.setConn("reconnecting", "reconnecting…");
    this.timer = setTimeout(() => this.connect(generation), delay);
  }

  applySnapshot(snapshot) {
    $("view-version").textContent = (snapshot.code_version || "").slice(0, 12);
    $("view-version").title = snapshot.code_version || "";
    this.steps = new Map();
    for (const step of snapshot.steps) this.steps.set(`${step.name}#${step.count}`, step);
    this.setStatus(snapshot.status);
    this.renderSteps();
    if (FINISHED.has(snapshot.status)) this.applyDone(snapshot, false);
    else $("result").replaceChildren(el("p", { class: "hint" }, "Not finished yet."));
  }

  applyStep(step) {
    this.steps.set(`${step.name}#${step.count}`, step);
    this.renderSteps();
  }

  applyLog(line) {
    if (this.logIds.has(line.id)) return;
    this.logIds.add(line.id);
    const item = el("li", { class: `level-${line.level}` },
      el("time", { datetime: line.ts }, timeOf(line.ts)),
      el("span", { class: "level" }, line.level),
      el("span", { class: "text" }, line.message));
    $("logs").append(item);
  }

  applyDone(done, fromStream = true) {
    this.finished = true;
    this.setStatus(done.status);
    this.renderSteps();
    const result = $("result");
    if (done.error) {
      result.replaceChildren(el("p", { class: "error", id: "result-error" },
        `${done.error.name}: ${done.error.message}`));
    } else if (done.status === "complete") {
      result.replaceChildren(el("pre", { id: "result-output" }, pretty(done.output)));
    } else {
      result.replaceChildren(el("p", { class: "hint" }, `The instance is ${done.status}.`));
    }
    if (fromStream) this.setConn("finished", "finished");
  }

  setStatus(status) {
    this.status = status;
    const badge = $("view-status");
    badge.textContent = status || "…";
    badge.dataset.status = status || "";
    const finished = FINISHED.has(status);
    $("send-event").disabled = !status || finished;
    for (const button of document.querySelectorAll("[data-action]")) {
      const action = button.dataset.action;
      const allowed = {
        pause: ["queued", "running", "waiting"].includes(status),
        resume: ["paused", "waitingForPause"].includes(status),
        terminate: Boolean(status) && !finished,
        restart: Boolean(status),
      };
      button.disabled = !allowed[action];
    }
  }

  renderSteps() {
    const list = $("steps");
    const items = [];
    const ran = new Map();
    for (const step of this.steps.values()) {
      items.push(renderStep(step));
      ran.set(step.name, (ran.get(step.name) || 0) + 1);
    }
    if (!this.finished) {
      for (const guess of this.expected) {
        const left = ran.get(guess.name) || 0;
        if (left > 0) {
          ran.set(guess.name, left - 1);
          continue;
        }
        items.push(renderStep({ name: guess.name, type: guess.type, status: "pending", attempts: 0 }));
      }
    }
    list.replaceChildren(...items);
  }
}

function stepState(step) {
  switch (step.status) {
    case "running":
      return `running · attempt ${step.attempts}`;
    case "retrying":
      return `retrying · attempt ${step.attempts} failed`;
    case "waiting":
      return step.type === "waitForEvent" ? "waiting for an event" : "sleeping";
    default:
      return step.status;
  }
}

function renderStep(step) {
  const detail = [];
  if (step.status === "complete" && step.output !== null && step.output !== undefined) {
    detail.push(el("pre", { class: "output" }, pretty(step.output)));
  }
  if (step.error) {
    detail.push(el("p", { class: "error" }, `${step.error.name}: ${step.error.message}`));
  }
  const count = step.count > 1 ? ` (${step.count})` : "";
  return el("li", { class: "step", dataset: { status: step.status, name: step.name } },
    el("span", { class: "mark", "aria-hidden": "true" }),
    el("span", { class: "name" }, step.name + count),
    el("span", { class: "kind" }, step.type),
    el("span", { class: "state" }, stepState(step)),
    ...detail);
}

// ---------------------------------------------------------------------------- panes

const view = new InstanceView();
let editor;
let example = "";
let browsing = { tenant: null, cursor: null };

function selectTab(name) {
  for (const tab of ["write", "browse"]) {
    const on = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(on));
    $(`pane-${tab}`).hidden = !on;
  }
  if (name === "browse") loadTenants();
}

function showCompileError(error) {
  const where = error.line ? `${error.file || "main.py"}, line ${error.line}` : "";
  // The message names the place too ("main.py:4: ..." or "... (at main.py:4)"): say it once.
  const what = where
    ? error.message.replace(/^[\w.]+:\d+: /, "").replace(/ \(at [\w.]+:\d+\)$/, "")
    : error.message;
  $("compile-error-text").textContent = where ? `${where}: ${what}` : what;
  $("compile-error").hidden = false;
  $("compile-error").dataset.line = error.line || "";
  $("compile-error-goto").hidden = !error.line;
  if (error.line) editor.showError(error.line);
}

function clearCompileError() {
  $("compile-error").hidden = true;
  editor.clearError();
}

async function checkSource() {
  clearCompileError();
  say("run-message", "Checking…");
  const checked = await api("POST", "/v1/playground/code", { source: editor.value });
  if (!checked.ok) {
    say("run-message", "The code does not load.", true);
    showCompileError(checked.error);
    return null;
  }
  say("run-message", `Code version ${checked.code_version.slice(0, 12)} loads.`);
  return checked;
}

async function runSource() {
  let params;
  try {
    params = parseJson($("params").value, "The payload");
  } catch (error) {
    say("run-message", error.message, true);
    return;
  }
  const source = editor.value;
  // Checking first turns a compile error into an answer, not a failed request.
  const checked = await checkSource();
  if (!checked) return;
  const body = { source, params };
  const id = $("run-id").value.trim();
  if (id) body.id = id;
  try {
    const created = await api("POST", "/v1/playground/runs", body);
    say("run-message", `Started ${created.id} on code version ${created.code_version.slice(0, 12)}.`);
    view.open(created.tenant, created.id, expectedSteps(source));
  } catch (error) {
    if (error.code === "tenant.load_failed") showCompileError(error.detail);
    say("run-message", error.message, true);
  }
}

async function withButton(button, work) {
  button.disabled = true;
  try {
    await work();
  } catch (error) {
    say("run-message", error.message, true);
  } finally {
    button.disabled = false;
  }
}

async function loadTenants() {
  say("browse-message", "");
  let tenants;
  try {
    tenants = await api("GET", "/v1/tenants");
  } catch (error) {
    say("browse-message", error.message, true);
    return;
  }
  const items = tenants.map((tenant) => {
    const total = Object.values(tenant.instances).reduce((a, b) => a + b, 0);
    const button = el("button", { type: "button", class: "tenant", dataset: { tenant: tenant.tenant } },
      el("span", { class: "name" }, tenant.tenant),
      el("span", { class: "count" }, `${total} instance${total === 1 ? "" : "s"}`),
      tenant.source === "database" ? el("span", { class: "tag" }, "database") : null,
      tenant.load_error ? el("span", { class: "tag error" }, "load error") : null);
    if (tenant.load_error) button.title = tenant.load_error;
    button.setAttribute("aria-pressed", String(tenant.tenant === browsing.tenant));
    button.addEventListener("click", () => loadInstances(tenant.tenant));
    return el("li", {}, button);
  });
  $("tenants").replaceChildren(...items);
  if (browsing.tenant) await loadInstances(browsing.tenant);
}

async function loadInstances(tenant, more = false) {
  if (!more) browsing = { tenant, cursor: null };
  for (const button of document.querySelectorAll("#tenants button")) {
    button.setAttribute("aria-pressed", String(button.dataset.tenant === tenant));
  }
  const query = new URLSearchParams({ limit: "25" });
  const status = $("status-filter").value;
  if (status) query.set("status", status);
  if (more && browsing.cursor) query.set("cursor", browsing.cursor);
  let page;
  try {
    page = await api("GET", `/v1/tenants/${encodeURIComponent(tenant)}/instances?${query}`);
  } catch (error) {
    say("browse-message", error.message, true);
    return;
  }
  browsing.cursor = page.next_cursor;
  $("instances-title").textContent = `Instances of ${tenant}`;
  const rows = page.instances.map((instance) => {
    const open = el("button", { type: "button", class: "link" }, instance.id);
    open.addEventListener("click", () => view.open(tenant, instance.id));
    return el("tr", { dataset: { id: instance.id } },
      el("td", {}, open),
      el("td", {}, el("span", { class: "badge", dataset: { status: instance.status } }, instance.status)),
      el("td", {}, timeOf(instance.created_at)),
      el("td", {}, timeOf(instance.updated_at)));
  });
  const body = $("instances").tBodies[0];
  if (more) body.append(...rows);
  else body.replaceChildren(...rows);
  $("instances-empty").hidden = body.rows.length > 0;
  $("more").hidden = !page.next_cursor;
}

async function control(action) {
  const path = `${instancePath(view.tenant, view.id)}/${action}`;
  try {
    const answer = await api("POST", path);
    say("action-message", `${action}: the instance is ${answer.status}.`);
    // A restart discards the journal: start the view afresh.
    if (action === "restart") view.open(view.tenant, view.id, view.expected);
  } catch (error) {
    say("action-message", `${action}: ${error.message}`, true);
  }
}

async function sendEvent() {
  const type = $("event-type").value.trim();
  let payload;
  try {
    payload = parseJson($("event-payload").value, "The event payload");
  } catch (error) {
    say("action-message", error.message, true);
    return;
  }
  try {
    await api("POST", `${instancePath(view.tenant, view.id)}/events`, { type, payload });
    say("action-message", `Sent a "${type}" event.`);
  } catch (error) {
    say("action-message", `send event: ${error.message}`, true);
  }
}

function openFromHash() {
  const match = location.hash.match(/^#\/instances\/([^/]+)\/([^/]+)$/);
  if (match) view.open(decodeURIComponent(match[1]), decodeURIComponent(match[2]));
}

async function start() {
  editor = new Editor($("source"), $("gutter"), $("error-band"));
  $("source").setAttribute("aria-label", "Workflow source, main.py");
  for (const status of STATUSES) $("status-filter").append(el("option", { value: status }, status));
  $("tab-write").addEventListener("click", () => selectTab("write"));
  $("tab-browse").addEventListener("click", () => selectTab("browse"));
  $("run").addEventListener("click", () => withButton($("run"), runSource));
  $("check").addEventListener("click", () => withButton($("check"), checkSource));
  $("reset-example").addEventListener("click", () => {
    editor.value = example;
    clearCompileError();
  });
  $("compile-error-goto").addEventListener("click", () => {
    const line = Number($("compile-error").dataset.line);
    if (line) editor.showError(line);
  });
  $("refresh").addEventListener("click", () => loadTenants());
  $("status-filter").addEventListener("change", () => {
    if (browsing.tenant) loadInstances(browsing.tenant);
  });
  $("more").addEventListener("click", () => loadInstances(browsing.tenant, true));
  $("send-event").addEventListener("click", sendEvent);
  for (const button of document.querySelectorAll("[data-action]")) {
    button.addEventListener("click", () => control(button.dataset.action));
  }
  window.addEventListener("hashchange", openFromHash);
  try {
    const playground = await api("GET", "/v1/playground");
    example = playground.example;
    if (!editor.value) editor.value = playground.source;
    if (!$("params").value) $("params").value = pretty(playground.params);
    $("event-type").value = playground.event.type;
    $("event-payload").value = JSON.stringify(playground.event.payload);
  } catch (error) {
    say("run-message", `Cannot load the playground: ${error.message}`, true);
  }
  openFromHash();
  document.body.dataset.ready = "true";
}

start();
