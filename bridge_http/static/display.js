// A kiosk display: the latest picture of one display, crossfaded in; step previews while a new
// one renders (when the appliance sends them); an optional caption. Options in the query string:
//   caption=prompt   show each picture's prompt        text=...     a fixed caption instead
//   fade=1200        crossfade in milliseconds         fit=cover    fill the screen (crop)
//   previews=off     ignore step previews
"use strict";

(function () {
  const { LiveStream, ensureKey } = window.Live;
  const $ = (id) => document.getElementById(id);
  const name = decodeURIComponent(location.pathname.replace(/^\/display\//, "").replace(/\/$/, ""));
  const options = new URLSearchParams(location.search);
  const fade = Math.max(0, Math.min(10000, Number(options.get("fade") || 1200)));
  const captionMode = options.get("caption") || "none";
  const fixedText = options.get("text");
  const previews = options.get("previews") !== "off";

  let front = $("layer-a");
  let back = $("layer-b");
  let shown = null; // sha256 of the picture on screen
  let wanted = null; // sha256 of the newest picture announced
  const metas = new Map(); // sha256 -> description
  let lostSince = null;
  let previewTimer = null;
  const PREVIEW_LIFETIME = 30000;

  document.title = name;
  for (const layer of [front, back]) layer.style.transitionDuration = fade + "ms";
  if (options.get("fit") === "cover") document.body.classList.add("cover");
  if (fixedText) showCaption(fixedText);

  function showCaption(text) {
    const caption = $("caption");
    caption.textContent = text || "";
    caption.hidden = !text;
  }

  function captionFor(sha) {
    if (fixedText) return;
    const meta = metas.get(sha);
    showCaption(captionMode === "prompt" && meta ? meta.prompt : "");
  }

  async function showImage(data) {
    if (data.sha256 && (data.sha256 === shown || data.sha256 === wanted)) return; // a reconnect's snapshot
    wanted = data.sha256;
    const next = back;
    next.src = data.src;
    try {
      await next.decode();
    } catch (_) {
      return; // replaced before it loaded, or gone: the next event brings the newer one
    }
    if (wanted !== data.sha256) return;
    next.classList.add("shown");
    front.classList.remove("shown");
    back = front;
    front = next;
    shown = data.sha256;
    document.body.dataset.shown = shown || "";
    document.body.dataset.swaps = String(Number(document.body.dataset.swaps || 0) + 1);
    $("preview").classList.remove("shown");
    captionFor(shown);
  }

  const handlers = {
    image: showImage,
    meta(meta) {
      if (!meta || !meta.sha256) return;
      metas.set(meta.sha256, meta);
      while (metas.size > 8) metas.delete(metas.keys().next().value);
      if (meta.sha256 === shown) captionFor(shown);
    },
    preview(data) {
      if (!previews) return;
      const preview = $("preview");
      preview.src = data.src;
      preview.classList.add("shown");
      // A picture that never comes (refused, failed): the draft goes away after a while.
      clearTimeout(previewTimer);
      previewTimer = setTimeout(() => preview.classList.remove("shown"), PREVIEW_LIFETIME);
      document.body.dataset.previews = String(Number(document.body.dataset.previews || 0) + 1);
    },
  };

  // A red dot in the corner only after 5 s without the appliance; the picture stays up meanwhile.
  function linkStatus(status) {
    document.body.dataset.link = status;
    if (status === "live") {
      lostSince = null;
      $("status").hidden = true;
    } else if (status === "connecting" && lostSince === null) {
      lostSince = Date.now();
      setTimeout(() => { if (lostSince !== null) $("status").hidden = false; }, 5000);
    } else if (status === "login") {
      signIn();
    }
  }

  const stream = new LiveStream("/display/" + encodeURIComponent(name) + "/events", handlers, linkStatus);

  async function signIn() {
    stream.stop();
    await ensureKey();
    stream.start();
  }

  document.addEventListener("DOMContentLoaded", signIn);
})();
