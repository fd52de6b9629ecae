// clipdex page: plain JavaScript, no libraries, no build step; talks to this server's /api only.
// The address carries the search (/?q=red+car&folder=...&after=...), so a search can be shared
// as a link and the back button works. Everything from the server is put in the page as text
// (textContent), never as HTML.
"use strict";

const PAGE = 40; // hits per request (the address's k= overrides it); more load as the grid scrolls
const FIELDS = ["q", "like", "folder", "after", "before", "type", "view", "threshold", "k"];

const $ = (id) => document.getElementById(id);
const els = {
  form: $("search-form"), q: $("q"), grid: $("grid"), dups: $("dups"), status: $("status"),
  sentinel: $("sentinel"), folder: $("f-folder"), folders: $("folder-list"), after: $("f-after"),
  before: $("f-before"), type: $("f-type"), threshold: $("f-threshold"), thresholdBox: $("threshold-box"),
  clear: $("f-clear"), dupLink: $("dup-link"), banner: $("like-banner"), likeThumb: $("like-thumb"),
  likeText: $("like-text"), likeClear: $("like-clear"), viewer: $("viewer"), viewerImg: $("viewer-img"),
  viewerName: $("viewer-name"), viewerPath: $("viewer-path"), viewerMeta: $("viewer-meta"),
  moreLike: $("more-like"), original: $("viewer-original"), close: $("viewer-close"),
};

let state = readState();
let results = { hits: [], offset: 0, more: false, done: false, loading: false, generation: 0 };
let viewing = -1; // index in results.hits of the photo open in the viewer

// -- the address ---------------------------------------------------------------------------------
function readState() {
  const params = new URLSearchParams(location.search);
  const out = {};
  for (const name of FIELDS) out[name] = (params.get(name) || "").trim();
  return out;
}

function stateUrl(s) {
  const params = new URLSearchParams();
  for (const name of FIELDS) if (s[name]) params.set(name, s[name]);
  const text = params.toString();
  return text ? `/?${text}` : "/";
}

function go(changes, push) {
  state = { ...state, ...changes };
  const url = stateUrl(state);
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
  render();
}

// -- talking to the server -----------------------------------------------------------------------
async function api(path) {
  const response = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function thumbUrl(id, size = 256) { return `/api/images/${encodeURIComponent(id)}/thumbnail?size=${size}`; }

function filterParams(params) {
  if (state.folder) params.append("folder", state.folder);
  if (state.after) params.set("after", state.after);
  if (state.before) params.set("before", state.before);
  if (state.type) params.set("type", state.type);
  return params;
}

function setStatus(text, isError = false) {
  els.status.textContent = text;
  els.status.classList.toggle("error", isError);
}

// -- rendering -----------------------------------------------------------------------------------
function baseName(path) { return path.split("/").pop() || path; }

function card(hit, position) {
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.tabIndex = 0;
  figure.dataset.id = hit.id;
  const img = document.createElement("img");
  img.className = "thumb";
  img.loading = "lazy";
  img.decoding = "async";
  img.alt = baseName(hit.path);
  img.src = thumbUrl(hit.id);
  const caption = document.createElement("figcaption");
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = baseName(hit.path);
  name.title = hit.path;
  caption.append(name);
  if (typeof hit.score === "number") {
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    score.title = "cosine similarity";
    caption.append(score);
  }
  figure.append(img, caption);
  const open = () => openViewer(position);
  figure.addEventListener("click", open);
  figure.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
  return figure;
}

function render() {
  document.title = state.q ? `${state.q} · clipdex` : "clipdex";
  els.q.value = state.q;
  els.folder.value = state.folder;
  els.after.value = state.after;
  els.before.value = state.before;
  els.type.value = state.type;
  els.threshold.value = state.threshold || "0.95";
  const dupView = state.view === "duplicates";
  els.dupLink.classList.toggle("active", dupView);
  els.thresholdBox.hidden = !dupView;
  els.grid.hidden = dupView;
  els.dups.hidden = !dupView;
  renderLikeBanner();
  closeViewer();
  results = { hits: [], offset: 0, more: false, done: false, loading: false, generation: results.generation + 1 };
  els.grid.replaceChildren();
  els.dups.replaceChildren();
  if (dupView) loadDuplicates();
  else if (state.q || state.like) loadMore();
  else showIntro();
}

function renderLikeBanner() {
  els.banner.hidden = !state.like;
  if (!state.like) return;
  els.likeThumb.src = thumbUrl(state.like, 128);
  els.likeText.textContent = `Photos like #${state.like}` + (state.q ? ` and “${state.q}”` : "");
  api(`/api/images/${encodeURIComponent(state.like)}`)
    .then((r) => { els.likeText.textContent = `Photos like ${baseName(r.path)}` + (state.q ? ` and “${state.q}”` : ""); })
    .catch(() => {});
}

async function showIntro() {
  try {
    const info = await api("/api/info");
    const model = info.model ? `${info.model.arch} (${info.model.pretrained})` : "no model yet";
    setStatus(`${info.images.toLocaleString()} images indexed with ${model}. Type what you are looking for.`);
  } catch (e) {
    setStatus(e.message, true);
  }
  els.q.focus();
}

async function loadMore() {
  if (results.loading || results.done) return;
  const generation = results.generation;
  results.loading = true;
  const params = filterParams(new URLSearchParams());
  if (state.q) params.set("q", state.q);
  if (state.like) params.append("like", state.like);
  params.set("k", /^[1-9][0-9]{0,3}$/.test(state.k) ? state.k : PAGE);
  params.set("offset", results.offset);
  if (results.offset === 0) setStatus("Searching…");
  try {
    const page = await api(`/api/search?${params}`);
    if (generation !== results.generation) return; // a newer search started meanwhile
    const start = results.hits.length;
    results.hits.push(...page.hits);
    results.offset += page.hits.length;
    results.more = page.more;
    results.done = !page.more;
    els.grid.append(...page.hits.map((hit, n) => card(hit, start + n)));
    const count = results.hits.length;
    setStatus(count ? `${count}${results.more ? "+" : ""} results` : "No results (try other words or fewer filters).");
  } catch (e) {
    if (generation === results.generation) { setStatus(e.message, true); results.done = true; }
  } finally {
    if (generation === results.generation) results.loading = false;
  }
  // Re-check after the new cards are laid out (their images load lazily): the observer only
  // reports changes, and a sentinel that stayed in view would otherwise wait for a scroll.
  requestAnimationFrame(() => {
    if (generation === results.generation && results.more && sentinelVisible()) loadMore();
  });
}

async function loadDuplicates() {
  const generation = results.generation;
  const threshold = state.threshold || "0.95";
  setStatus("Looking for near-duplicates…");
  try {
    const data = await api(`/api/duplicates?threshold=${encodeURIComponent(threshold)}`);
    if (generation !== results.generation) return;
    const groups = data.groups;
    for (const group of groups) {
      const box = document.createElement("section");
      box.className = "group";
      const title = document.createElement("h3");
      const lo = group.min_score.toFixed(3), hi = group.max_score.toFixed(3);
      title.textContent = `${group.size} images · cosine ${lo} – ${hi}`;
      const members = document.createElement("div");
      members.className = "members";
      for (const m of group.members) {
        const position = results.hits.length;
        results.hits.push({ id: m.id, path: m.path });
        members.append(card(results.hits[position], position));
      }
      box.append(title, members);
      els.dups.append(box);
    }
    const noun = groups.length === 1 ? "group" : "groups";
    setStatus(groups.length ? `${groups.length} ${noun} of near-duplicates above ${threshold}` :
      `No near-duplicates above ${threshold}.`);
  } catch (e) {
    if (generation === results.generation) setStatus(e.message, true);
  }
}

function sentinelVisible() {
  const box = els.sentinel.getBoundingClientRect();
  return box.top < window.innerHeight + 600;
}

// -- the viewer ----------------------------------------------------------------------------------
function openViewer(position) {
  const hit = results.hits[position];
  if (!hit) return;
  viewing = position;
  els.viewerImg.src = thumbUrl(hit.id, 1024);
  els.viewerImg.alt = baseName(hit.path);
  els.viewerName.textContent = baseName(hit.path);
  els.viewerPath.textContent = hit.path;
  els.viewerMeta.textContent = typeof hit.score === "number" ? `score ${hit.score.toFixed(4)}` : "";
  els.original.href = `/api/images/${encodeURIComponent(hit.id)}/original`;
  els.viewer.hidden = false;
  els.moreLike.focus();
  api(`/api/images/${encodeURIComponent(hit.id)}`).then((r) => {
    if (viewing !== position) return;
    const lines = [`${r.width} × ${r.height}${r.format ? " " + r.format : ""}`, `${(r.size / 1024).toFixed(0)} KB`];
    if (r.taken_at) lines.push(`taken ${new Date(r.taken_at * 1000).toLocaleString()}`);
    if (typeof hit.score === "number") lines.push(`score ${hit.score.toFixed(4)}`);
    els.viewerMeta.textContent = lines.join(" · ");
  }).catch(() => {});
}

function closeViewer() {
  els.viewer.hidden = true;
  els.viewerImg.removeAttribute("src");
  viewing = -1;
}

// -- events --------------------------------------------------------------------------------------
els.form.addEventListener("submit", (e) => {
  e.preventDefault();
  go({ q: els.q.value.trim(), like: "", view: "" }, true);
});
els.dupLink.addEventListener("click", (e) => { e.preventDefault(); go({ view: "duplicates" }, true); });
document.getElementById("home").addEventListener("click", (e) => {
  e.preventDefault();
  go({ q: "", like: "", view: "" }, true);
});
els.folder.addEventListener("change", () => go({ folder: els.folder.value.trim() }, false));
els.after.addEventListener("change", () => go({ after: els.after.value }, false));
els.before.addEventListener("change", () => go({ before: els.before.value }, false));
els.type.addEventListener("change", () => go({ type: els.type.value }, false));
els.threshold.addEventListener("change", () => go({ threshold: els.threshold.value }, false));
els.clear.addEventListener("click", () => go({ folder: "", after: "", before: "", type: "", threshold: "" }, false));
els.likeClear.addEventListener("click", () => go({ like: "" }, true));
els.moreLike.addEventListener("click", () => {
  const hit = results.hits[viewing];
  if (hit) { go({ like: String(hit.id), q: "", view: "" }, true); window.scrollTo(0, 0); }
});
els.close.addEventListener("click", closeViewer);
els.viewer.addEventListener("click", (e) => { if (e.target === els.viewer) closeViewer(); });
document.addEventListener("keydown", (e) => {
  if (els.viewer.hidden) return;
  if (e.key === "Escape") closeViewer();
  else if (e.key === "ArrowRight" && viewing + 1 < results.hits.length) openViewer(viewing + 1);
  else if (e.key === "ArrowLeft" && viewing > 0) openViewer(viewing - 1);
});
window.addEventListener("popstate", () => { state = readState(); render(); });
window.addEventListener("scroll", () => {
  if (results.more && sentinelVisible() && state.view !== "duplicates" && (state.q || state.like)) loadMore();
}, { passive: true });
new IntersectionObserver((entries) => {
  if (entries.some((x) => x.isIntersecting) && state.view !== "duplicates" && (state.q || state.like)) loadMore();
}, { rootMargin: "600px" }).observe(els.sentinel);

api("/api/folders").then((data) => {
  for (const f of data.folders) {
    const option = document.createElement("option");
    option.value = f.path;
    option.label = `${f.images} images`;
    els.folders.append(option);
  }
}).catch(() => {});

render();
