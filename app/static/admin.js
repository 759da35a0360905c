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
      .then(function (r) {
        // A login page instead of JSON: the session ended; polling cannot go on.
        var type = r.headers.get("Content-Type") || "";
        if (!r.ok || type.indexOf("json") === -1) throw new Error("session");
        return r.json();
      })
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
      .catch(function (error) {
        if (error.message === "session") {
          var err = field("error");
          err.textContent = "Progress stopped updating: your session ended. Log in again and reload this page.";
          err.hidden = false;
          return;
        }
        setTimeout(poll, 3000);
      });
  }
  if (field("status").textContent === "running") setTimeout(poll, 500);
})();
