// Follows a running job: the bar, the counts so far, the time left and the status chart;
// reloads the page (with its results) when the job is over.
(function () {
  "use strict";
  var box = document.getElementById("job");
  if (!box) { return; }
  var id = box.getAttribute("data-job");
  function text(elId, value) {
    var el = document.getElementById(elId);
    if (el) { el.textContent = value; }
  }
  function bars(chart) {
    var summary = [];
    chart.forEach(function (b) {
      var rect = document.querySelector('#chart rect[data-status="' + b.label + '"]');
      var label = document.querySelector('#chart text[data-count="' + b.label + '"]');
      if (rect) { rect.setAttribute("width", b.w); }
      if (label) { label.setAttribute("x", 126 + b.w); label.textContent = b.n + " (" + b.pct + " %)"; }
      summary.push(b.label + " " + b.n + " (" + b.pct + " %)");
    });
    text("chart-title", "Status breakdown: " + summary.join(", "));
  }
  var announced = -1;
  function announce(p) {  // for screen readers: every quarter of the way, not every poll
    var quarter = Math.floor(p.percent / 25);
    if (quarter !== announced) {
      announced = quarter;
      text("live", p.done + " of " + p.total + " rows done" + (p.eta_text ? ", about " + p.eta_text + " left" : ""));
    }
  }
  function tick() {
    fetch("/app/jobs/" + id + "/progress.json", {credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (p) {
        if (!p) { return; }
        var bar = document.getElementById("bar");
        bar.value = p.percent;
        bar.textContent = p.percent + " %";
        text("percent", p.percent);
        text("done", p.done);
        var state = document.getElementById("state");
        state.textContent = p.state;
        state.className = "badge state-" + p.state;
        document.getElementById("eta-box").hidden = !p.eta_text;
        document.getElementById("eta-wait").hidden = !!p.eta_text;
        text("eta", p.eta_text || "");
        if (p.chart) { bars(p.chart); }
        announce(p);
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
