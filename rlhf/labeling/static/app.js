// rlhf labeling page. No framework, no build step.
//
// Security: every piece of text from the server (prompts, model responses,
// names, reasons) is put on the page with textContent or text nodes, never
// innerHTML, so it can never become markup; prompts and responses are shown
// as Markdown built element by element (renderMarkdown); an image pair's PNG
// data URIs become <img> elements (renderImage). The server's
// Content-Security-Policy forbids inline scripts as a second line of defence.
//
// Durability: each label gets a client id when the pair is shown; a failed
// request (network error or 5xx) is retried with the same id, which the
// server stores at most once. A 4xx answer is final: retrying cannot change it.
"use strict";

const TOKEN_KEY = "rlhf-labeling-token";
const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  me: null,
  pair: null,          // the pair on screen
  shownAt: 0,          // when it was shown (for duration_ms)
  clientId: null,      // the id of the label being made for it
  revising: null,      // {label_id, choice, strength, both_bad, reason} when revising an earlier label
  strength: null,      // how much better, picked before answering A or B (optional)
  bothBad: false,      // "both bad" marked, before answering
  history: [],         // own labels, newest first (for U)
  historyIndex: -1,
  busy: false,
  rankOrder: null,     // a ranking item: its response indices as now ordered, best first
  rankTyped: [],       // the indices placed so far by pressing their numbers
};

// ------------------------------------------------------------------ helpers

function newClientId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  // randomUUID needs a secure context; getRandomValues does not.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function show(viewId) {
  for (const id of ["signin-view", "label-view", "done-view", "admin-view"]) $(id).hidden = id !== viewId;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

class HttpError extends Error {
  constructor(status, detail, code) { super(detail); this.status = status; this.code = code || null; }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await res.json(); } catch (_) { /* empty or non-JSON body */ }
  if (!res.ok) {
    const detail = data && (data.error || (typeof data.detail === "string" ? data.detail : null));
    throw new HttpError(res.status, detail || `HTTP ${res.status}`, data && data.code);
  }
  return data;
}

function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

// Network errors and 5xx are retried (same body, so the same client id);
// 4xx answers are final.
async function apiWithRetry(method, path, body) {
  let delay = 300;
  for (let attempt = 0; ; attempt++) {
    try {
      return await api(method, path, body);
    } catch (e) {
      const transient = !(e instanceof HttpError) || e.status >= 500;
      if (!transient || attempt >= 8) throw e;
      setStatus(`Connection problem, retrying… (${attempt + 1})`, true);
      await sleep(delay);
      delay = Math.min(delay * 2, 5000);
    }
  }
}

// ------------------------------------------------------------------ rendering

// Markdown, hand-written on purpose. A vendored Markdown library turns text
// into an HTML string, which would then need an HTML sanitiser on top (and
// both kept up to date); this builds the DOM directly with createElement and
// text nodes, so model text can never become markup, a script or a link:
// raw HTML shows as the characters it is, and [text](url) shows as
// "text (url)", never a clickable <a>. It covers what models write: fenced
// code blocks, `inline code`, paragraphs and line breaks (newlines kept, as
// generated), **bold**, *italic*, - / * / + and 1. lists (nested by
// indentation) and # headings (h4 to h6, under the page's own h2/h3).
// Anything else is shown as plain text.

function node(tag, text, className) {
  const el = document.createElement(tag);
  if (text !== undefined) el.textContent = text;
  if (className) el.className = className;
  return el;
}

// Leftmost first: `code` (a run of backticks, closed by the same run), **bold**,
// *italic*, [text](url) with at most one level of parentheses in the url.
const INLINE = new RegExp([
  /(`+)([\s\S]*?[^`])\1(?!`)/.source,
  /\*\*(?!\s)([\s\S]*?[^\s])\*\*/.source,
  /\*(?![\s*])([\s\S]*?[^\s*])\*/.source,
  /\[([^[\]\n]+)\]\(([^()\s]*(?:\([^()\s]*\)[^()\s]*)*)\)/.source,
].join("|"), "g");

function appendInline(parent, text) {
  let at = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > at) parent.append(text.slice(at, m.index));  // append(string) makes a text node
    if (m[1] !== undefined) parent.append(node("code", m[2]));
    else if (m[5] !== undefined) {
      const link = node("span", undefined, "md-link");
      appendInline(link, m[5]);
      link.append(node("span", ` (${m[6]})`, "md-url"));
      parent.append(link);
    } else {
      const em = node(m[3] !== undefined ? "strong" : "em");
      appendInline(em, m[3] !== undefined ? m[3] : m[4]);
      parent.append(em);
    }
    at = m.index + m[0].length;
  }
  if (at < text.length) parent.append(text.slice(at));
}

function renderMarkdown(el, source) {
  el.replaceChildren();
  const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
  let para = null;     // the <p> being filled
  let lists = [];      // open lists, outermost first: {indent, tag, el, li}
  let blank = false;   // a blank line since the last list item
  const container = (indent) =>  // where a block indented this much goes
    lists.length && indent >= lists[lists.length - 1].indent + 2 ? lists[lists.length - 1].li : el;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^(\s*)(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/);
    const heading = line.match(/^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/);
    const item = line.match(/^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/);
    if (fence) {  // ``` or ~~~, optional language; runs to the same fence or the end
      const indent = fence[1].length;
      const body = [];
      const close = new RegExp(`^\\s*${fence[2][0]}{${fence[2].length},}\\s*$`);
      while (++i < lines.length && !close.test(lines[i])) {
        body.push(lines[i].replace(new RegExp(`^ {0,${indent}}`), ""));
      }
      const pre = node("pre");
      const code = node("code", body.join("\n"));
      if (fence[3]) pre.dataset.lang = fence[3];  // shown by CSS (attr()), never interpreted
      pre.append(code);
      const parent = container(indent);
      if (parent === el) lists = [];
      parent.append(pre);
      para = null;
    } else if (!line.trim()) {
      para = null;
      blank = true;
    } else if (heading) {
      const h = node(`h${Math.min(heading[1].length + 3, 6)}`);
      appendInline(h, heading[2]);
      el.append(h);
      para = null;
      lists = [];
    } else if (item) {
      const indent = item[1].replace(/\t/g, "    ").length;
      const tag = /\d/.test(item[2]) ? "ol" : "ul";
      while (lists.length && lists[lists.length - 1].indent > indent) lists.pop();
      let list = lists[lists.length - 1];
      if (!list || indent >= list.indent + 2 || list.tag !== tag) {
        if (list && indent < list.indent + 2) lists.pop();  // same level, other kind: a new list
        const parent = container(indent);
        list = { indent, tag, el: node(tag), li: null };
        const start = parseInt(item[2], 10);
        if (tag === "ol" && start !== 1) list.el.start = start;
        parent.append(list.el);
        lists.push(list);
      }
      list.li = node("li");
      appendInline(list.li, item[3]);
      list.el.append(list.li);
      para = null;
      blank = false;
    } else if (lists.length && !blank) {  // a wrapped list item
      const li = lists[lists.length - 1].li;
      li.append("\n");
      appendInline(li, line.trimStart());
    } else {
      if (para) para.append("\n");
      else { para = node("p"); el.append(para); lists = []; }
      appendInline(para, line);
    }
  }
}

// An image pair's response: a PNG data URI, drawn as an <img> whose src is set
// as a property (never parsed as markup). Anything that is not a PNG data URI
// is shown as the text it is; a data: image cannot run script, and the CSP
// allows images only from this app and data: URIs (img-src 'self' data:).
const PNG_DATA_URI = /^data:image\/png;base64,[A-Za-z0-9+/]+={0,2}$/;

function renderImage(el, source) {
  el.replaceChildren();
  if (typeof source !== "string" || !PNG_DATA_URI.test(source)) {
    el.append(document.createTextNode(String(source)));
    return;
  }
  const img = document.createElement("img");
  img.className = "pair-image";
  img.alt = el.getAttribute("aria-label") || "image";
  img.src = source;
  el.append(img);
}

function renderPrompt(el, prompt) {
  el.replaceChildren();
  if (typeof prompt === "string") { renderMarkdown(el, prompt); return; }
  for (const msg of prompt) {  // chat messages
    const turn = node("div", undefined, "turn");
    const content = node("div", undefined, "content");
    renderMarkdown(content, msg.content);
    turn.append(node("span", `${msg.role}:`, "role"), content);
    el.append(turn);
  }
}

// "remaining" is what the server can still hand this labeler now (see the
// #progress-text title), so it is 0 exactly when the page says "All done".
function renderProgress(p) {
  if (!p) return;
  $("progress").hidden = false;
  const total = p.done + p.remaining;
  $("progress-bar").max = Math.max(total, 1);
  $("progress-bar").value = p.done;
  $("progress-text").textContent = `${p.done} done · ${p.remaining} remaining`;
  $("done-others").hidden = p.project_complete >= p.project_pairs;
}

const STRENGTH_WORDS = {
  significantly_better: "significantly better", better: "better", slightly_better: "slightly better",
  negligibly_better: "negligibly better or unsure",
};

function setStrength(strength) {
  state.strength = strength;
  for (const b of document.querySelectorAll(".strengths button")) {
    b.setAttribute("aria-pressed", String(b.dataset.strength === strength));
  }
}

function setBothBad(on) {
  state.bothBad = on;
  $("both-bad").setAttribute("aria-pressed", String(on));
  $("rank-both-bad").setAttribute("aria-pressed", String(on));
}

// ------------------------------------------------------------------ ranking items

// Draws the responses in state.rankOrder (best first). Each keeps the number it
// was shown with ("Response 3"); `focusIndex` keeps keyboard focus on a moved one.
function renderRanking(focusIndex) {
  const list = $("ranking");
  const responses = state.pair.responses;
  list.replaceChildren(...state.rankOrder.map((idx, place) => {
    const li = node("li");
    li.tabIndex = 0;
    li.draggable = true;
    li.dataset.index = String(idx);
    li.id = `rank-item-${idx + 1}`;
    if (state.rankTyped.includes(idx)) li.classList.add("placed");
    li.setAttribute("aria-label", `Place ${place + 1}: response ${idx + 1}`);
    const head = node("div", undefined, "rank-head");
    head.append(node("span", `#${place + 1}`, "rank-place"), node("span", `Response ${idx + 1}`, "rank-name"),
      node("kbd", String(idx + 1)), moveButton(idx, place, -1), moveButton(idx, place, 1));
    const body = node("div", undefined, "text pane");
    renderMarkdown(body, responses[idx]);
    li.append(head, body);
    li.addEventListener("dragstart", (e) => {
      e.dataTransfer.setData("text/plain", String(idx));
      e.dataTransfer.effectAllowed = "move";
      li.classList.add("dragging");
    });
    li.addEventListener("dragend", () => li.classList.remove("dragging"));
    li.addEventListener("dragover", (e) => { e.preventDefault(); e.dataTransfer.dropEffect = "move"; });
    li.addEventListener("drop", (e) => {
      e.preventDefault();
      const from = parseInt(e.dataTransfer.getData("text/plain"), 10);
      if (Number.isNaN(from) || from === idx) return;
      moveTo(from, state.rankOrder.indexOf(idx));
    });
    return li;
  }));
  if (focusIndex !== undefined) $(`rank-item-${focusIndex + 1}`).focus();
}

// Up / down buttons: a phone has no keyboard and its browser may not drag. Out
// of the Tab order (-1): keyboard users move the focused item with the arrows.
function moveButton(idx, place, delta) {
  const b = node("button", delta < 0 ? "\u25B2" : "\u25BC", "secondary rank-move");
  b.type = "button";
  b.tabIndex = -1;
  b.id = `rank-${delta < 0 ? "up" : "down"}-${idx + 1}`;
  b.setAttribute("aria-label", `Move response ${idx + 1} ${delta < 0 ? "up" : "down"}`);
  b.disabled = delta < 0 ? place === 0 : place === state.rankOrder.length - 1;
  b.addEventListener("click", () => moveTo(idx, place + delta));
  return b;
}

function moveTo(idx, place) {  // put response `idx` at `place` (0 = best)
  const order = state.rankOrder.filter((i) => i !== idx);
  order.splice(Math.max(0, Math.min(place, order.length)), 0, idx);
  state.rankOrder = order;
  renderRanking(idx);
}

// A number key: that response goes to the next place after those already typed.
function typeRank(idx) {
  if (idx >= state.rankOrder.length || state.rankTyped.includes(idx)) return;
  state.rankTyped.push(idx);
  state.rankOrder = [...state.rankTyped, ...state.rankOrder.filter((i) => !state.rankTyped.includes(i))];
  renderRanking();
  const order = state.rankOrder.map((i) => i + 1).join(" > ");
  setStatus(state.rankTyped.length === state.rankOrder.length
    ? `Order: ${order}. Enter submits.` : `Placed ${state.rankTyped.length} of ${state.rankOrder.length}.`);
}

function resetRanking() {
  state.rankOrder = state.pair.responses.map((_, i) => i);
  state.rankTyped = [];
  renderRanking();
  setStatus("");
}

function moveFocused(delta) {
  const li = document.activeElement;
  if (!li || !li.dataset || li.dataset.index === undefined || !$("ranking").contains(li)) return false;
  const idx = parseInt(li.dataset.index, 10);
  moveTo(idx, state.rankOrder.indexOf(idx) + delta);
  return true;
}

// Q W E N pick a strength (the same key again clears it); X marks both bad.
function toggleStrength(strength) { setStrength(state.strength === strength ? null : strength); }

function renderPair(pair, revising) {
  state.pair = pair;
  state.revising = revising;
  state.clientId = newClientId();
  state.shownAt = performance.now();
  renderPrompt($("prompt"), pair.prompt);
  const ranked = Array.isArray(pair.responses);
  $("rank-view").hidden = $("rank-bar").hidden = !ranked;
  $("pair-responses").hidden = $("action-bar").hidden = ranked;
  if (ranked) {
    state.rankOrder = revising && revising.ranking ? revising.ranking.slice() : pair.responses.map((_, i) => i);
    state.rankTyped = [];
    renderRanking();
  } else {
    state.rankOrder = null;
    const draw = pair.kind === "image" ? renderImage : renderMarkdown;
    draw($("response-a"), pair.response_a);
    draw($("response-b"), pair.response_b);
  }
  for (const id of ["prompt", "response-a", "response-b"]) $(id).scrollTop = 0;  // each pane scrolls by itself
  $("reason").value = revising ? revising.reason || "" : "";
  $("revising").hidden = !revising;
  if (revising) {
    $("revising-pair").textContent = String(pair.id);
    $("revising-was").textContent = revising.choice;
  }
  for (const b of document.querySelectorAll(".choices button[data-choice]")) {
    b.classList.toggle("chosen", !!revising && b.dataset.choice === revising.choice);
  }
  setStrength(revising ? revising.strength || null : null);
  setBothBad(!!revising && !!revising.both_bad);
  show("label-view");
  window.scrollTo(0, 0);
}

// ------------------------------------------------------------------ flow

async function loadNext() {
  showNext(await apiWithRetry("GET", "/api/next"));
  setStatus("");
}

function showNext(data) {  // {pair, progress}, from GET /api/next or a submission
  renderProgress(data.progress);
  state.historyIndex = -1;
  if (data.pair) {
    renderPair(data.pair, null);
  } else {
    state.pair = null;
    state.rankOrder = null;
    show("done-view");
  }
}

function labelBody(choice) {
  const body = {
    client_id: state.clientId,
    pair_id: state.pair.id,
    choice,
    reason: $("reason").value.trim(),
    duration_ms: Math.round(performance.now() - state.shownAt),
  };
  // A strength says how much better A or B is; a skip passes no judgement at all.
  if (state.strength && (choice === "A" || choice === "B")) body.strength = state.strength;
  if (state.bothBad && choice !== "skip") body.both_bad = true;
  if (state.revising) body.supersedes = state.revising.label_id;
  if (choice === "rank") body.ranking = state.rankOrder.slice();
  return body;
}

function savedText(body) {
  if (body.choice === "rank") {
    return `Saved: ranking ${body.ranking.map((i) => i + 1).join(" > ")}${body.both_bad ? ", all bad" : ""}.`;
  }
  const side = body.choice === "A" || body.choice === "B";
  let text = side ? `${body.choice} is ${STRENGTH_WORDS[body.strength] || "better"}` : body.choice;
  if (body.both_bad) text += ", both bad";
  return `Saved: ${text}.`;
}

async function submit(choice) {
  if (state.busy || !state.pair) return;
  state.busy = true;
  for (const b of document.querySelectorAll(".choices button, .strengths button")) b.disabled = true;
  const body = labelBody(choice);
  try {
    setStatus("Saving…");
    const saved = await apiWithRetry("POST", "/api/labels?next=true", body);
    showNext(saved.next);
    setStatus(savedText(body));
  } catch (e) {
    if (e.status === 401) return signOut("Your token is no longer valid.");
    if (e.code === "pair_full") {
      // Our hold on the pair lapsed and others filled it: this label can never be stored. Move on.
      const why = `Not saved: your hold on pair ${body.pair_id} lapsed and others labeled it meanwhile`;
      try {
        await loadNext();
        setStatus(`${why}; here is your next pair.`, true);
      } catch (err) {
        setStatus(`${why}. Could not load the next pair: ${err.message}`, true);
      }
      return;
    }
    setStatus(`Not saved: ${e.message}`, true);
  } finally {
    state.busy = false;
    for (const b of document.querySelectorAll(".choices button, .strengths button")) b.disabled = false;
  }
}

// U: step back through your own labels, newest first, and revise one.
async function reviseEarlier() {
  if (state.busy) return;
  try {
    if (state.historyIndex < 0) state.history = (await api("GET", "/api/history?limit=50")).labels;
    const next = state.historyIndex + 1;
    if (next >= state.history.length) { setStatus("No earlier labels to revise."); return; }
    const data = await api("GET", `/api/pairs/${state.history[next].pair_id}`);
    state.historyIndex = next;
    renderPair(data.pair, data.label);
    setStatus("Revising: choose again; the earlier label is kept in the history.");
  } catch (e) {
    setStatus(`Could not load an earlier label: ${e.message}`, true);
  }
}

// ------------------------------------------------------------------ admin view

function cell(text, numeric = false) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "n/a" : String(text);
  if (numeric) td.className = "num";
  return td;
}

function fmt(x, digits = 3) { return typeof x === "number" ? x.toFixed(digits) : "n/a"; }

async function loadAdmin() {
  const st = await api("GET", "/api/admin/stats");
  const p = st.pairs, l = st.labels, a = st.agreement;
  $("admin-summary").textContent =
    `${p.complete} of ${p.total} pairs complete (overlap ${st.overlap}); ${p.with_labels} have labels. ` +
    `${l.current} current labels: ${l.A} A, ${l.B} B, ${l.tie} tie, ${l.skip} skip; ${l.both_bad} both bad, ` +
    `${l.with_strength} with a strength; ${l.superseded} revised.`;
  $("admin-agreement").textContent =
    `Agreement over ${a.pairs_with_2plus_votes} pairs with 2+ votes: Fleiss' kappa ${fmt(a.fleiss_kappa)}, ` +
    `mean Cohen's kappa ${fmt(a.cohen_kappa_mean)}, raw agreement ${fmt(a.percent_agreement)}.`;
  $("admin-rows").replaceChildren(...st.labelers.map((r) => {
    const tr = document.createElement("tr");
    tr.append(cell(r.name), cell(r.labels, true), cell(r.skips, true), cell(r.revisions, true),
      cell(r.labels_per_hour, true), cell(r.median_seconds_per_label, true), cell(r.active_minutes, true));
    return tr;
  }));
  $("admin-cohen-empty").hidden = a.cohen_kappa.length > 0;
  $("admin-cohen").replaceChildren(...a.cohen_kappa.map((c) => {
    const tr = document.createElement("tr");
    tr.append(cell(c.labelers.join(" & ")), cell(c.shared_pairs, true), cell(fmt(c.kappa), true));
    return tr;
  }));
  setStatus(`Updated ${new Date().toLocaleTimeString()}.`);
}

// ------------------------------------------------------------------ sign-in

function signOut(message) {
  localStorage.removeItem(TOKEN_KEY);
  state.token = null;
  $("sign-out").hidden = true;
  $("progress").hidden = true;
  show("signin-view");
  $("signin-error").textContent = message || "";
  setStatus("");
}

async function start() {
  try {
    state.me = await api("GET", "/api/me");
  } catch (e) {
    if (e.status === 401) return signOut(state.token ? "That token is not valid for this project." : "");
    setStatus(`Cannot reach the server: ${e.message}`, true);
    return;
  }
  const me = state.me;
  $("project-name").textContent = me.project;
  $("who").textContent = `· ${me.name}${me.role === "admin" ? " (admin)" : ""}`;
  $("sign-out").hidden = false;
  $("guidelines").textContent = me.guidelines;
  if (me.role === "admin") {
    show("admin-view");
    await loadAdmin();
    setInterval(() => loadAdmin().catch((e) => setStatus(e.message, true)), 10000);
    return;
  }
  if (location.pathname === "/admin") history.replaceState(null, "", "/");
  await loadNext();
}

// ------------------------------------------------------------------ keyboard

const KEYS = { 1: "A", a: "A", 2: "B", b: "B", 3: "tie", t: "tie", s: "skip" };
const STRENGTH_KEYS = { q: "significantly_better", w: "better", e: "slightly_better", n: "negligibly_better" };

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || !state.token) return;
  const typing = e.target instanceof HTMLTextAreaElement || e.target instanceof HTMLInputElement;
  if (typing) {
    if (e.key === "Escape") e.target.blur();  // leave the box; shortcuts work again
    return;
  }
  const key = e.key.toLowerCase();
  const onPair = !$("label-view").hidden;
  if (onPair && state.rankOrder) {  // a ranking item
    const n = parseInt(key, 10);
    let handled = true;
    if (n >= 1 && n <= 9) typeRank(n - 1);
    else if (key === "arrowup" || key === "k") handled = moveFocused(-1);
    else if (key === "arrowdown" || key === "j") handled = moveFocused(1);
    else if (key === "enter") submit("rank");
    else if (key === "backspace") resetRanking();
    else if (key === "s") submit("skip");
    else if (key === "x") setBothBad(!state.bothBad);
    else if (key === "r") $("reason").focus();
    else if (key === "g") $("guidelines-box").open = !$("guidelines-box").open;
    else if (key === "u") reviseEarlier();
    else if (key === "escape" && state.revising) loadNext();
    else handled = false;
    if (handled) e.preventDefault();
    return;
  }
  if (onPair && KEYS[key]) { e.preventDefault(); submit(KEYS[key]); }
  else if (onPair && STRENGTH_KEYS[key]) { e.preventDefault(); toggleStrength(STRENGTH_KEYS[key]); }
  else if (onPair && key === "x") { e.preventDefault(); setBothBad(!state.bothBad); }
  else if (onPair && key === "r") { e.preventDefault(); $("reason").focus(); }
  else if (key === "u") { e.preventDefault(); reviseEarlier(); }
  else if (onPair && key === "g") { e.preventDefault(); $("guidelines-box").open = !$("guidelines-box").open; }
  else if (key === "escape" && state.revising) { e.preventDefault(); loadNext(); }
});

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll(".choices button[data-choice]")) {
    b.addEventListener("click", () => submit(b.dataset.choice));
  }
  for (const b of document.querySelectorAll(".strengths button")) {
    b.addEventListener("click", () => toggleStrength(b.dataset.strength));
  }
  $("both-bad").addEventListener("click", () => setBothBad(!state.bothBad));
  $("rank-both-bad").addEventListener("click", () => setBothBad(!state.bothBad));
  $("submit-ranking").addEventListener("click", () => submit("rank"));
  $("reset-ranking").addEventListener("click", () => resetRanking());
  $("rank-skip").addEventListener("click", () => submit("skip"));
  $("cancel-revise").addEventListener("click", () => loadNext());
  $("check-again").addEventListener("click", () => loadNext());
  $("revise-last").addEventListener("click", () => reviseEarlier());
  $("sign-out").addEventListener("click", () => signOut(""));
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value.trim();
    localStorage.setItem(TOKEN_KEY, state.token);
    $("token-input").value = "";
    start();
  });
  // A sign-in link carries the token in the fragment, which browsers never
  // send to the server; keep it, then remove it from the address bar.
  const takeLinkToken = () => {
    const m = location.hash.match(/token=([A-Za-z0-9_\-]+)/);
    if (!m) return false;
    localStorage.setItem(TOKEN_KEY, m[1]);
    history.replaceState(null, "", location.pathname);
    return true;
  };
  takeLinkToken();
  state.token = localStorage.getItem(TOKEN_KEY);
  if (state.token) start(); else signOut("");
  // A sign-in link opened in a tab already on this page only changes the
  // fragment: no reload, so sign in with the new token here.
  window.addEventListener("hashchange", () => {
    if (!takeLinkToken()) return;
    state.token = localStorage.getItem(TOKEN_KEY);
    start();
  });
});
