// The Duet web page: search by text or image, "more like this", zero-shot classification.
// Plain JS against the service's own API; URL parameters ?q=...&k=...&index=... run a search
// on load (bookmarkable queries, and how the headless browser test drives the page).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "duet-api-key";

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(body.error || `HTTP ${response.status}`);
  }
  return body;
}

function setStatus(element, text, isError = false) {
  element.textContent = text;
  element.classList.toggle("error", isError);
}

function searchOptions() {
  const options = { k: Number($("k").value) || 12 };
  if ($("index").value) options.index = $("index").value;
  if ($("dedup").checked) options.dedup = 0.95;
  return options;
}

async function runSearch(describe, request) {
  const status = $("status");
  setStatus(status, `searching ${describe} ...`);
  try {
    const body = await request();
    renderResults(body.results);
    setStatus(status, `${body.results.length} results for ${describe} in ${body.took_ms} ms (index ${body.index})`);
  } catch (error) {
    $("results").replaceChildren();
    setStatus(status, `search failed: ${error.message}`, true);
  }
}

function searchJson(query, describe) {
  return runSearch(describe, () =>
    api("/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...query, ...searchOptions() }),
    }),
  );
}

function searchImage(file) {
  const form = new FormData();
  form.append("image", file);
  for (const [name, value] of Object.entries(searchOptions())) form.append(name, String(value));
  return runSearch(`image ${file.name}`, () => api("/search", { method: "POST", body: form }));
}

function renderResults(results) {
  const cards = results.map((hit) => {
    const card = document.createElement("article");
    card.className = "result-card";
    card.dataset.id = hit.id;
    let thumb;
    if (hit.url) {
      thumb = document.createElement("img");
      thumb.src = hit.url;
      thumb.alt = hit.caption;
      thumb.loading = "lazy";
    } else {
      thumb = document.createElement("div");
      thumb.className = "thumb";
      thumb.textContent = hit.caption;
    }
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = hit.caption;
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const more = document.createElement("button");
    more.type = "button";
    more.textContent = "more like this";
    more.addEventListener("click", () => searchJson({ id: hit.id }, `items like #${hit.id}`));
    card.append(thumb, caption, score, more);
    return card;
  });
  $("results").replaceChildren(...cards);
}

async function classify(event) {
  event.preventDefault();
  const status = $("classify-status");
  const file = $("classify-image").files[0];
  if (!file) return setStatus(status, "choose an image first", true);
  const form = new FormData();
  form.append("image", file);
  if ($("label-set").value) {
    form.append("label_set", $("label-set").value);
  } else {
    form.append("labels", $("labels").value);
  }
  setStatus(status, "classifying ...");
  try {
    const body = await api("/classify", { method: "POST", body: form });
    const items = body.predictions.slice(0, 10).map((p) => {
      const item = document.createElement("li");
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${(100 * p.probability).toFixed(1)}%`;
      item.append(`${p.label}: ${(100 * p.probability).toFixed(1)}%`, bar);
      return item;
    });
    $("predictions").replaceChildren(...items);
    setStatus(status, "");
  } catch (error) {
    setStatus(status, `classification failed: ${error.message}`, true);
  }
}

async function loadChoices() {
  try {
    const { indices } = await api("/indices");
    $("index").replaceChildren(
      ...indices.map((info) => new Option(`${info.name} (${info.count})`, info.name)),
    );
    const sets = await api("/label-sets");
    for (const set of sets) $("label-set").append(new Option(set.name, set.name));
  } catch (error) {
    setStatus($("status"), `not ready: ${error.message}`, true);
  }
}

function setUpDropZone() {
  const zone = $("drop-zone");
  const input = $("image-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => (e.key === "Enter" ? input.click() : null));
  input.addEventListener("change", () => input.files[0] && searchImage(input.files[0]));
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) searchImage(file);
  });
}

async function main() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => localStorage.setItem(KEY_STORAGE, $("api-key").value));
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("query").value.trim();
    if (text) searchJson({ text }, `"${text}"`);
  });
  $("classify-form").addEventListener("submit", classify);
  setUpDropZone();
  const params = new URLSearchParams(location.search);
  if (params.get("k")) $("k").value = params.get("k");
  await loadChoices();
  if (params.get("index")) $("index").value = params.get("index");
  if (params.get("q")) {
    $("query").value = params.get("q");
    $("search-form").requestSubmit();
  }
}

main();
