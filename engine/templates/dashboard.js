// The dashboard's one script (included in every page under its CSP nonce). Vanilla JS:
// local times, live regions refreshed on a server push, the timeline's zoom, autosubmit.
(function () {
  "use strict";
  var page = JSON.parse(document.getElementById("ploy-page").textContent);
  var MIN_REFRESH_MS = 1000;  // a busy log refreshes the page at most once a second
  function pad(n, w) { return String(n).padStart(w || 2, "0"); }
  // Times come as epoch milliseconds; the server writes UTC, the browser shows local time.
  function localTimes(root) {
    root.querySelectorAll("time[data-ms]").forEach(function (el) {
      var d = new Date(Number(el.getAttribute("data-ms")));
      el.textContent = d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
        pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()) + "." + pad(d.getMilliseconds(), 3);
    });
  }
  function setIndicator(live) {
    var el = document.getElementById("live-indicator");
    el.classList.toggle("on", live);
    el.textContent = live ? "live" : "final";
  }

  // -- the timeline: zoom (buttons, ctrl+wheel) and pan (its scrollbar, or drag) ------
  var zoom = 1;
  function applyZoom() {
    document.querySelectorAll("[data-zoomable]").forEach(function (el) {
      el.style.setProperty("--zoom", String(zoom));
      var label = document.getElementById("zoom-level");
      if (label) { label.textContent = zoom + "×"; }
    });
  }
  function zoomBy(factor) {
    zoom = Math.min(Math.max(Math.round(zoom * factor), 1), 256);
    applyZoom();
  }
  document.addEventListener("click", function (ev) {
    var button = ev.target.closest ? ev.target.closest("[data-zoom]") : null;
    if (!button) { return; }
    var how = button.getAttribute("data-zoom");
    if (how === "in") { zoomBy(2); } else if (how === "out") { zoomBy(0.5); } else { zoom = 1; applyZoom(); }
  });
  document.addEventListener("wheel", function (ev) {
    var scroller = ev.target.closest ? ev.target.closest("[data-pan]") : null;
    if (!scroller || !ev.ctrlKey) { return; }
    ev.preventDefault();
    zoomBy(ev.deltaY < 0 ? 2 : 0.5);
  }, { passive: false });
  var drag = null;
  document.addEventListener("mousedown", function (ev) {
    var scroller = ev.target.closest ? ev.target.closest("[data-pan]") : null;
    if (scroller && zoom > 1) { drag = { el: scroller, x: ev.clientX, left: scroller.scrollLeft }; }
  });
  document.addEventListener("mousemove", function (ev) {
    if (drag) { drag.el.scrollLeft = drag.left - (ev.clientX - drag.x); }
  });
  document.addEventListener("mouseup", function () { drag = null; });

  // -- live regions: re-fetch the page and swap the elements marked data-live ----------
  // Pages with a stream (an execution's events, the list's changes) refresh when the
  // server pushes; a page whose stream fails falls back to polling every refresh_ms.
  var streaming = false;
  var last = 0;
  var pending = null;
  function swap(html) {
    var doc = new DOMParser().parseFromString(html, "text/html");
    var open = {};
    document.querySelectorAll("details[open][id]").forEach(function (d) { open[d.id] = true; });
    var scrolls = {};
    document.querySelectorAll("[data-pan][id]").forEach(function (el) { scrolls[el.id] = el.scrollLeft; });
    document.querySelectorAll("[data-live]").forEach(function (el) {
      var fresh = doc.getElementById(el.id);
      // A region where an action's form is open keeps what the operator is typing: it
      // refreshes once the form is submitted or closed.
      if (!fresh || el.querySelector("details[open] form")) { return; }
      fresh.querySelectorAll("details[id]").forEach(function (d) { if (open[d.id]) { d.open = true; } });
      localTimes(fresh);
      el.replaceWith(document.adoptNode(fresh));
    });
    applyZoom();
    document.querySelectorAll("[data-pan][id]").forEach(function (el) {
      if (scrolls[el.id] !== undefined) { el.scrollLeft = scrolls[el.id]; }
    });
    var next = doc.getElementById("ploy-page");
    if (next) { page = JSON.parse(next.textContent); }
    setIndicator(page.live);
    // Actions on a live execution (cancel) go once it has ended.
    document.querySelectorAll("[data-hide-when-final]").forEach(function (el) { el.hidden = !page.live; });
  }
  function refresh() {
    if (document.hidden && !streaming) { return schedule(); }
    last = Date.now();
    fetch(location.href, { credentials: "same-origin", cache: "no-store", headers: { "Accept": "text/html" } })
      .then(function (res) { return res.ok ? res.text() : null; })
      .then(function (html) { if (html !== null) { swap(html); } })
      .catch(function () {})
      .then(schedule);
  }
  function schedule() { if (page.live && !streaming) { setTimeout(refresh, page.refresh_ms); } }
  function soon() {  // coalesce a burst of pushes into one refresh
    if (pending !== null) { return; }
    var wait = Math.max(60, MIN_REFRESH_MS - (Date.now() - last));
    pending = setTimeout(function () { pending = null; refresh(); }, wait);
  }
  function stream() {
    if (!page.live || !page.stream || !window.EventSource) { return false; }
    var source = new EventSource(page.stream, { withCredentials: true });
    source.onmessage = soon;
    source.addEventListener("end", function () { source.close(); streaming = false; soon(); });
    source.onerror = function () {  // the server went away: poll instead
      source.close();
      if (streaming) { streaming = false; schedule(); }
    };
    streaming = true;
    return true;
  }

  // Time filters travel in UTC (the URL means the same to everyone); the browser shows
  // and takes them in local time, as it shows every other time.
  function localInput(d) {
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + "T" + pad(d.getHours()) + ":" + pad(d.getMinutes());
  }
  document.querySelectorAll("input[data-utc]").forEach(function (el) {
    if (el.value) { el.value = localInput(new Date(el.value + "Z")); }
  });
  document.querySelectorAll("[data-local-label]").forEach(function (el) {
    el.textContent = el.getAttribute("data-local-label");
  });
  // Filters: a select applies at once; empty fields stay out of the URL.
  document.querySelectorAll("form[data-autosubmit] select").forEach(function (el) {
    el.addEventListener("change", function () { el.form.requestSubmit(); });
  });
  document.querySelectorAll("form[data-autosubmit]").forEach(function (form) {
    form.addEventListener("submit", function () {
      form.querySelectorAll("input[data-utc]").forEach(function (el) {
        if (el.value) { el.value = new Date(el.value).toISOString().slice(0, 16); }
      });
      form.querySelectorAll("input, select").forEach(function (el) { if (!el.value) { el.disabled = true; } });
    });
  });
  localTimes(document);
  applyZoom();
  if (!stream()) { schedule(); }
})();
