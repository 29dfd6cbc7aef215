// phiclip's search page: plain JavaScript, no framework, no network access beyond this server.
// Every value from the server is put on the page with textContent or attributes, never as HTML.
"use strict";

(function () {
  const $ = (sel) => document.querySelector(sel);
  const els = {
    form: $("#search-form"), q: $("#q"), label: $("#label-filter"), collection: $("#collection"),
    collectionName: $("#collection-name"), meta: $("#collection-meta"), file: $("#file"), drop: $("#drop"),
    query: $("#query"), queryImage: $("#query-image"), queryText: $("#query-text"), clear: $("#clear"),
    status: $("#status"), results: $("#results"), mapToggle: $("#map-toggle"), mapPanel: $("#map-panel"),
    mapFrame: $("#map-frame"),
  };
  const K = 24;
  const state = { collections: [], current: null, busy: 0, lastBlob: null };

  async function api(path, options) {
    const res = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    if (!res.ok) {
      const msg = body && body.error && body.error.message ? body.error.message : "HTTP " + res.status;
      throw new Error(msg);
    }
    return body;
  }

  function setStatus(text, isError) {
    els.status.textContent = text;
    els.status.classList.toggle("error", Boolean(isError));
  }

  function basename(source) {
    const s = String(source || "");
    const cut = s.split(/[\\/]/).pop();
    return cut || s;
  }

  function current() {
    return state.collections.find((c) => c.name === state.current) || state.collections[0];
  }

  function showCollection() {
    const c = current();
    if (!c) return;
    els.collectionName.textContent = c.name;
    const what = c.kind === "text" ? "texts" : "images";
    const parts = [c.count.toLocaleString() + " " + what, c.encoder.spec, c.index.type + " index"];
    if (!c.complete) parts.push("incomplete");
    els.meta.textContent = parts.join(" · ");
    els.meta.title = c.encoder.spec;
    const canText = c.encoder.modalities.indexOf("text") >= 0;
    els.q.disabled = !canText;
    els.q.placeholder = canText ? "Describe what you are looking for…" : "This encoder embeds images only: drop an image";
    // The label filter: shown only when the collection has labels.
    const keep = els.label.value;
    while (els.label.options.length > 1) els.label.remove(1);
    if (c.labels && c.labels.length) {
      for (const name of c.labels) {
        const opt = document.createElement("option");
        opt.value = name;
        opt.textContent = name;
        els.label.appendChild(opt);
      }
      els.label.hidden = false;
      els.label.value = c.labels.indexOf(keep) >= 0 ? keep : "";
    } else {
      els.label.hidden = true;
      els.label.value = "";
    }
  }

  // The map (GET map?collection=NAME, made by the server at its first request): shown in a frame on demand.
  // A click on a point there opens "more like this" for it in this page (?like=ID).
  function mapSrc() {
    return "map?" + new URLSearchParams({ collection: state.current || "" }).toString();
  }

  function showMap(open) {
    els.mapPanel.hidden = !open;
    els.mapToggle.setAttribute("aria-expanded", String(open));
    els.mapToggle.classList.toggle("on", open);
    if (open && els.mapFrame.getAttribute("src") !== mapSrc()) els.mapFrame.setAttribute("src", mapSrc());
  }

  function showQuery(text, imageSrc) {
    els.query.hidden = false;
    els.queryText.textContent = text;
    if (imageSrc) {
      els.queryImage.src = imageSrc;
      els.queryImage.hidden = false;
    } else {
      els.queryImage.removeAttribute("src");
      els.queryImage.hidden = true;
    }
  }

  function render(body) {
    els.results.textContent = "";
    const results = body.results || [];
    const q = body.query || {};
    if (q.id && results.length && results[0].id === q.id) {  // name the item by what the results say of it
      const r = results[0];
      showQuery("More like " + (r.caption || r.label || basename(r.source)), r.thumbnail || null);
    }
    for (const r of results) {
      const li = document.createElement("li");
      li.className = "card";
      li.dataset.id = r.id;
      const button = document.createElement("button");
      button.type = "button";
      button.className = "hit";
      const name = r.caption || r.label || r.text || basename(r.source);
      button.setAttribute("aria-label", "More like this: " + name + ", rank " + r.rank + ", score " + r.score.toFixed(3));
      button.title = "More like this";
      if (r.thumbnail) {
        const img = document.createElement("img");
        img.src = r.thumbnail;
        img.alt = name;
        img.loading = "lazy";
        img.decoding = "async";
        img.addEventListener("error", () => { img.replaceWith(placeholder("no preview")); });
        button.appendChild(img);
      } else {
        button.appendChild(placeholder(r.text || "no preview"));
      }
      button.addEventListener("click", () => moreLike(r));
      li.appendChild(button);

      const info = document.createElement("div");
      info.className = "info";
      const score = document.createElement("div");
      score.className = "score";
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = Math.max(0, Math.min(1, r.score)) * 100 + "%";
      const num = document.createElement("span");
      num.className = "num";
      num.textContent = "#" + r.rank + " · " + r.score.toFixed(3);
      score.append(bar, num);
      info.appendChild(score);
      if (r.label) {
        const chip = document.createElement("span");
        chip.className = "chip";
        chip.textContent = r.label;
        info.appendChild(chip);
      }
      if (r.caption) {
        const cap = document.createElement("p");
        cap.className = "caption";
        cap.textContent = r.caption;
        info.appendChild(cap);
      }
      const src = document.createElement("p");
      src.className = "source";
      src.textContent = basename(r.source);
      src.title = r.source || "";
      info.appendChild(src);
      li.appendChild(info);
      els.results.appendChild(li);
    }
    const ms = body.took_ms !== undefined ? " in " + Math.round(body.took_ms) + " ms" : "";
    const filter = body.label ? " labelled “" + body.label + "”" : "";
    setStatus(results.length ? results.length + " results" + filter + ms : "No results" + filter + ".");
  }

  function placeholder(text) {
    const div = document.createElement("div");
    div.className = "placeholder";
    div.textContent = text;
    return div;
  }

  async function run(label, promise) {
    state.busy += 1;
    document.body.classList.add("busy");
    setStatus(label);
    try {
      render(await promise);
    } catch (e) {
      setStatus(e.message, true);
    } finally {
      state.busy -= 1;
      if (!state.busy) document.body.classList.remove("busy");
    }
  }

  function params(extra) {
    const p = new URLSearchParams(extra);
    p.set("k", String(K));
    if (state.current) p.set("collection", state.current);
    if (els.label.value) p.set("label", els.label.value);
    return p;
  }

  function remember(query) {
    const url = new URL(window.location.href);
    url.search = "";
    for (const [key, value] of Object.entries(query)) url.searchParams.set(key, value);
    if (state.current && state.collections.length > 1) url.searchParams.set("collection", state.current);
    if (els.label.value) url.searchParams.set("label", els.label.value);
    window.history.pushState(query, "", url);
  }

  function searchText(text, push) {
    text = text.trim();
    if (!text) { els.q.focus(); return Promise.resolve(); }
    showQuery("Results for “" + text + "”", null);
    if (push) remember({ q: text });
    return run("Searching…", api("api/search?" + params({ text: text }).toString()));
  }

  function moreLike(r, push) {
    if (push !== false) remember({ like: r.id });
    showQuery("More like " + (r.caption || r.label || basename(r.source) || r.id), r.thumbnail || null);
    els.q.value = "";
    const form = new FormData();
    for (const [key, value] of params({})) form.append(key, value);
    if (r.thumbnail) form.append("image_url", r.thumbnail);
    else form.append("id", r.id);
    return run("Finding similar items…", api("api/search", { method: "POST", body: form }));
  }

  function searchFile(file) {
    if (!file) return Promise.resolve();
    if (!/^image\//.test(file.type || "image/")) {
      setStatus(file.name + " is not an image", true);
      return Promise.resolve();
    }
    if (state.lastBlob) URL.revokeObjectURL(state.lastBlob);
    state.lastBlob = URL.createObjectURL(file);
    showQuery("Similar to " + (file.name || "the pasted image"), state.lastBlob);
    els.q.value = "";
    const form = new FormData();
    for (const [key, value] of params({})) form.append(key, value);
    form.append("image", file, file.name || "pasted.png");
    return run("Uploading and searching…", api("api/search", { method: "POST", body: form }));
  }

  function clear() {
    els.results.textContent = "";
    els.query.hidden = true;
    els.q.value = "";
    setStatus("");
    window.history.pushState({}, "", window.location.pathname);
    els.q.focus();
  }

  function fromUrl() {
    const p = new URLSearchParams(window.location.search);
    if (p.get("collection") && state.collections.some((c) => c.name === p.get("collection"))) {
      state.current = p.get("collection");
      els.collection.value = state.current;
      showCollection();
    }
    if (p.get("label") !== null) els.label.value = p.get("label");
    if (p.get("q")) {
      els.q.value = p.get("q");
      searchText(p.get("q"), false);
    } else if (p.get("like")) {
      moreLike({ id: p.get("like") }, false);
    }
  }

  async function init() {
    try {
      const body = await api("api/collections");
      state.collections = body.collections;
      state.current = body.default;
    } catch (e) {
      setStatus("Cannot list the collections: " + e.message, true);
      return;
    }
    for (const c of state.collections) {
      const opt = document.createElement("option");
      opt.value = c.name;
      opt.textContent = c.name;
      els.collection.appendChild(opt);
    }
    els.collection.hidden = state.collections.length < 2;
    els.collectionName.hidden = state.collections.length > 1;
    els.collection.value = state.current;
    showCollection();
    fromUrl();
    document.body.classList.add("ready");
  }

  els.form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    searchText(els.q.value, true);
  });
  els.mapToggle.addEventListener("click", () => showMap(els.mapPanel.hidden));
  els.collection.addEventListener("change", () => {
    state.current = els.collection.value;
    showCollection();
    if (!els.mapPanel.hidden) showMap(true);
    if (els.q.value.trim()) searchText(els.q.value, true);
  });
  els.label.addEventListener("change", () => {
    if (els.q.value.trim()) searchText(els.q.value, true);
  });
  els.file.addEventListener("change", () => {
    searchFile(els.file.files[0]);
    els.file.value = "";
  });
  els.clear.addEventListener("click", clear);
  ["dragenter", "dragover"].forEach((type) => els.drop.addEventListener(type, (ev) => {
    ev.preventDefault();
    els.drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => els.drop.addEventListener(type, () => els.drop.classList.remove("over")));
  els.drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    const file = ev.dataTransfer && ev.dataTransfer.files[0];
    searchFile(file);
  });
  document.addEventListener("paste", (ev) => {
    const items = (ev.clipboardData && ev.clipboardData.files) || [];
    if (items.length && /^image\//.test(items[0].type)) searchFile(items[0]);
  });
  document.addEventListener("keydown", (ev) => {
    const typing = /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName);
    if (ev.key === "/" && !typing) {
      ev.preventDefault();
      els.q.focus();
      els.q.select();
    } else if (ev.key === "Escape" && document.activeElement === els.q && els.q.value) {
      els.q.value = "";
    }
  });
  window.addEventListener("popstate", () => { els.results.textContent = ""; els.query.hidden = true; fromUrl(); });
  init();
})();
