// The Duet web page: search by text or image, "more like this", zero-shot classification.
// Plain JS against the service's own API; URL parameters ?q=...&k=...&index=...&filter=... run
// a search on load (bookmarkable queries, and how the headless browser test drives the page).
// The filter box takes the JSON `filter` of POST /search; the fields it can name are listed
// under it (GET /indices).
// Result cards show the index's thumbnails (`thumbnail_url`, signed when the service has a key,
// so an <img> loads them without one), or the image's web `url`, lazily.
// Adding a picture and deleting a result change the index: they are offered only once /indices
// answered, i.e. the page's key is right or the service has none, and refresh the results after.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "duet-api-key";

// The service compares the key's UTF-8 bytes. fetch() sends each character of a header value
// as one byte (and refuses any above U+00FF), so the key goes as its UTF-8 bytes, one per char.
function headers(extra = {}) {
  const key = $("api-key").value.trim();
  if (!key) {
    return extra;
  }
  const bytes = String.fromCharCode(...new TextEncoder().encode(key));
  return { ...extra, "X-API-Key": bytes };
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

let maxK = 100;
let lastSearch = null; // {describe, request}: what "refresh" runs again after an add or delete
let indexInfo = {}; // GET /indices by name (empty until it answers): "writable", "filterable"

// Add and delete are offered when /indices answered (the key is right, or the service has none)
// and the selected index takes updates in this process.
function updateEditable() {
  const info = indexInfo[$("index").value];
  document.body.classList.toggle("editable", Boolean(info) && info.writable !== false);
}

function searchOptions() {
  const k = Math.min(Math.max(1, Math.round(Number($("k").value) || 12)), maxK);
  $("k").value = k;
  const options = { k };
  if ($("index").value) options.index = $("index").value;
  if ($("dedup").checked) options.dedup = Number($("dedup-threshold").value) || 0.95;
  const filter = $("filter").value.trim();
  if (filter) {
    try {
      options.filter = JSON.parse(filter);
    } catch (error) {
      throw new Error(`the filter is not JSON: ${error.message}`);
    }
  }
  return options;
}

function showFilterFields() {
  const info = indexInfo[$("index").value];
  const fields = Object.entries((info && info.filterable) || {});
  $("filter-fields").textContent = !info
    ? ""
    : fields.length
    ? `filterable: ${fields.map(([name, kind]) => `${name} (${kind})`).join(", ")}`
    : "this index has no filterable fields";
}

async function runSearch(describe, request) {
  lastSearch = { describe, request };
  const status = $("status");
  setStatus(status, `searching ${describe} ...`);
  try {
    const body = await request();
    renderResults(body.results, body.index);
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

function showQueryImage(file) {
  const image = $("query-image");
  if (image.src.startsWith("blob:")) URL.revokeObjectURL(image.src);
  image.src = URL.createObjectURL(file);
  $("query-name").textContent = file.name ? `query image: ${file.name}` : "query image";
  $("query-preview").hidden = false;
  $("query").value = "";
}

function hideQueryImage() {
  $("query-preview").hidden = true;
}

function searchImage(file) {
  showQueryImage(file);
  return runSearch(`image ${file.name}`, () => {
    const form = new FormData();
    form.append("image", file);
    for (const [name, value] of Object.entries(searchOptions())) {
      form.append(name, name === "filter" ? JSON.stringify(value) : String(value));
    }
    return api("/search", { method: "POST", body: form });
  });
}

function refreshResults() {
  if (lastSearch) return runSearch(lastSearch.describe, lastSearch.request);
}

function itemPath(index, id) {
  return `/indices/${encodeURIComponent(index)}/items/${id}`;
}

// What a card calls its item: the caption, else the file it was indexed from (a folder's picture:
// `source`, its path in the folder), else its key.
function itemName(hit) {
  if (hit.caption) return { text: hit.caption, file: false };
  const source = hit.metadata && hit.metadata.source;
  return { text: typeof source === "string" && source ? source : hit.key, file: true };
}

async function deleteResult(hit, index) {
  const what = `"${itemName(hit).text}"`;
  if (!confirm(`Delete ${what} (#${hit.id}) from index ${index}? This cannot be undone.`)) return;
  try {
    await api(itemPath(index, hit.id), { method: "DELETE" });
    setStatus($("add-status"), `deleted #${hit.id} from ${index}`);
    await loadChoices();
    await refreshResults();
  } catch (error) {
    setStatus($("add-status"), `delete failed: ${error.message}`, true);
  }
}

async function addPicture(event) {
  event.preventDefault();
  const status = $("add-status");
  const file = $("add-image").files[0];
  if (!file) return setStatus(status, "choose a picture first", true);
  const index = $("index").value;
  const form = new FormData();
  form.append("image", file);
  const caption = $("add-caption").value.trim();
  if (caption) form.append("caption", caption);
  form.append("key", file.name || "");
  setStatus(status, `adding ${file.name} ...`);
  try {
    const body = await api(`/indices/${encodeURIComponent(index)}/items`, { method: "POST", body: form });
    setStatus(status, `added ${file.name} as #${body.ids[0]} to ${body.index}`);
    $("add-form").reset();
    await loadChoices();
    await refreshResults();
  } catch (error) {
    setStatus(status, `adding failed: ${error.message}`, true);
  }
}

function renderResults(results, index) {
  const cards = results.map((hit) => {
    const card = document.createElement("article");
    card.className = "result-card";
    card.dataset.id = hit.id;
    const source = hit.thumbnail_url || hit.url;
    let thumb;
    if (source) {
      thumb = document.createElement("img");
      thumb.loading = "lazy";
      thumb.decoding = "async";
      thumb.alt = itemName(hit).text;
      thumb.src = source;
    } else {
      thumb = document.createElement("div");
      thumb.className = "thumb";
      thumb.textContent = "no picture stored";
    }
    const name = itemName(hit);
    const caption = document.createElement("div");
    caption.className = name.file ? "caption file-name" : "caption";
    caption.textContent = name.text;
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const more = document.createElement("button");
    more.type = "button";
    more.textContent = "more like this";
    more.addEventListener("click", () => {
      hideQueryImage();
      searchJson({ id: hit.id }, `items like #${hit.id}`);
    });
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "delete needs-edit";
    remove.textContent = "delete";
    remove.title = `delete #${hit.id} from index ${index}`;
    remove.addEventListener("click", () => deleteResult(hit, index));
    card.append(thumb, caption, score, more, remove);
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
  const chosen = $("index").value;
  try {
    const body = await api("/indices");
    $("index").replaceChildren(
      ...body.indices.map((info) => new Option(`${info.name} (${info.count})`, info.name)),
    );
    if (chosen) $("index").value = chosen;
    maxK = body.max_k;
    $("k").max = String(maxK);
    if (Number($("k").value) > maxK) $("k").value = maxK;
    const sets = await api("/label-sets");
    $("label-set").replaceChildren(
      new Option("(labels below)", ""),
      ...sets.map((set) => new Option(set.name, set.name)),
    );
    if ($("status").classList.contains("error")) setStatus($("status"), "");
    indexInfo = Object.fromEntries(body.indices.map((info) => [info.name, info]));
    updateEditable();
    showFilterFields();
  } catch (error) {
    indexInfo = {};
    updateEditable();
    showFilterFields();
    setStatus($("status"), `not ready: ${error.message}`, true);
  }
}

function setUpDropZone() {
  const zone = $("drop-zone");
  const input = $("image-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      input.click();
    }
  });
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
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, $("api-key").value);
    loadChoices(); // the lists a key-less request was refused now load
  });
  $("dedup").addEventListener("change", () => {
    $("dedup-threshold").disabled = !$("dedup").checked;
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("query").value.trim();
    if (text) {
      hideQueryImage();
      searchJson({ text }, `"${text}"`);
    }
  });
  $("classify-form").addEventListener("submit", classify);
  $("add-form").addEventListener("submit", addPicture);
  $("index").addEventListener("change", () => {
    updateEditable();
    showFilterFields();
  });
  setUpDropZone();
  const params = new URLSearchParams(location.search);
  if (params.get("k")) $("k").value = params.get("k");
  await loadChoices();
  if (params.get("index")) {
    $("index").value = params.get("index");
    updateEditable();
  }
  if (params.get("filter")) $("filter").value = params.get("filter");
  showFilterFields();
  if (params.get("q")) {
    $("query").value = params.get("q");
    $("search-form").requestSubmit();
  }
}

main();
