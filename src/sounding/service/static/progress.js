// Follows a running job: updates the progress bar, reloads the page when the job is over.
(function () {
  "use strict";
  var box = document.getElementById("job");
  if (!box) { return; }
  var id = box.getAttribute("data-job");
  function tick() {
    fetch("/app/jobs/" + id + "/progress.json", {credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (p) {
        if (!p) { return; }
        document.getElementById("bar").value = p.percent;
        document.getElementById("bar").textContent = p.percent + " %";
        document.getElementById("percent").textContent = p.percent;
        document.getElementById("done").textContent = p.done;
        document.getElementById("state").textContent = p.state;
        if (p.state !== "queued" && p.state !== "running") {
          window.location.reload();
          return;
        }
        window.setTimeout(tick, 700);
      })
      .catch(function () { window.setTimeout(tick, 2000); });
  }
  window.setTimeout(tick, 500);
})();
