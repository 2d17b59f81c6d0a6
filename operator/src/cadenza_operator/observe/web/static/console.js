// Live regions: an element with data-live="URL" is replaced by the HTML fragment the server
// renders at URL, every data-every milliseconds, until the fragment holds [data-done] (a run
// that ended). <details> left open stay open. Everything else is plain HTML forms.
"use strict";
for (const region of document.querySelectorAll("[data-live]")) {
  const every = Number(region.dataset.every) || 1500;
  let last = null;
  const tick = async () => {
    try {
      const reply = await fetch(region.dataset.live, { cache: "no-store" });
      if (reply.ok) {
        const html = await reply.text();
        if (html !== last) {
          const open = new Set([...region.querySelectorAll("details[open]")].map((d) => d.id));
          region.innerHTML = html;
          for (const d of region.querySelectorAll("details")) if (open.has(d.id)) d.open = true;
          last = html;
        }
      }
    } catch (_) { /* the server restarts or the network drops: try again next time */ }
    if (!region.querySelector("[data-done]")) setTimeout(tick, every);
  };
  if (!region.querySelector("[data-done]")) setTimeout(tick, every);
}
