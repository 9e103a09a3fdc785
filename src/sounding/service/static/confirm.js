// Asks before a destructive form is sent (forms with class "confirm" and a data-confirm text).
// Without JavaScript the forms still work; they are CSRF-protected on the server.
(function () {
  "use strict";
  document.querySelectorAll("form.confirm").forEach(function (f) {
    f.addEventListener("submit", function (e) {
      if (!window.confirm(f.getAttribute("data-confirm") || "Are you sure?")) { e.preventDefault(); }
    });
  });
})();
