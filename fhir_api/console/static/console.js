// Progressive enhancement only: every page works without this file.
// The overview refreshes itself every 15 s while it is visible (and not while a user is reading a
// <details> they opened); nothing else is scripted.
(function () {
  "use strict";
  if (location.pathname.replace(/\/+$/, "") !== "/console") { return; }
  window.setInterval(function () {
    if (document.visibilityState === "visible" && !document.querySelector("details[open]")) { location.reload(); }
  }, 15000);
})();
