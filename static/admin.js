// Live progress of a background broadcast: polls the job's status and updates the page in
// place. Without JavaScript the page refreshes itself (a <noscript> meta refresh).
(function () {
  "use strict";
  var box = document.querySelector("[data-job-status-url]");
  if (!box) return;
  var url = box.getAttribute("data-job-status-url");
  var bar = box.querySelector("progress");
  function field(name) { return box.querySelector('[data-job-field="' + name + '"]'); }
  function poll() {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.json(); })
      .then(function (job) {
        bar.max = job.total;
        bar.value = job.delivered;
        field("status").textContent = job.status;
        field("status").className = "status " + job.status;
        field("delivered").textContent = String(job.delivered);
        var err = field("error");
        if (job.error) { err.textContent = job.error; err.hidden = false; }
        if (job.status === "running") {
          setTimeout(poll, 1000);
          return;
        }
        // Ended: a failed job reloads for its "Resume" button; a finished one drops the
        // "updates by itself" note.
        if (job.status === "failed") {
          window.location.reload();
          return;
        }
        var notes = box.querySelectorAll("[data-job-while-running]");
        for (var i = 0; i < notes.length; i++) notes[i].hidden = true;
      })
      .catch(function () { setTimeout(poll, 3000); });
  }
  if (field("status").textContent === "running") setTimeout(poll, 500);
})();
