// Progressive enhancement only: every page and action works without this file.
"use strict";

document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form instanceof HTMLFormElement ? form.dataset.confirm : undefined;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

// Tables marked data-refresh="N" are fetched again every N seconds (the page itself, re-rendered by the server).
// The table is looked up by id on every tick: the one in the page is a new element after each refresh.
for (const table of document.querySelectorAll("table[data-refresh]")) {
  const seconds = Number(table.dataset.refresh) || 5;
  window.setInterval(async () => {
    if (document.hidden) return;
    try {
      const response = await fetch(window.location.href, { credentials: "same-origin" });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById(table.id);
      const current = document.getElementById(table.id);
      if (fresh && current) current.replaceWith(fresh);
    } catch (_) {
      // the next tick tries again
    }
  }, seconds * 1000);
}
