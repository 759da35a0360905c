// Live progress of a background broadcast: polls the job's status and updates the page in
// place: the progress bar, the status (in a live region, so it is announced), the heading,
// a notice when the job makes no progress for a while, and "Resume" when it failed. Without JavaScript the page
// refreshes itself slowly (a <noscript> meta refresh) and offers a Refresh link.
(function () {
  "use strict";
  var box = document.querySelector("[data-job-status-url]");
  if (!box) return;
  var url = box.getAttribute("data-job-status-url");
  var bar = box.querySelector("progress");
  var heading = document.querySelector("[data-job-heading]");
  // No change in the delivered count for this long (the page's data-stall-ms, 30 s by
  // default): say the job may be stuck.
  function stallMs() {
    return parseInt(box.getAttribute("data-stall-ms"), 10) || 30000;
  }
  // The page says whether the job already looked stuck to the server.
  var stalledNotice = box.querySelector('[data-job-field="stalled"]');
  var lastDelivered = parseInt(box.querySelector('[data-job-field="delivered"]').textContent, 10);
  var lastProgress = stalledNotice && !stalledNotice.hidden ? 0 : Date.now();
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
        var status = field("status");
        if (status.textContent !== job.status_label) {
          status.textContent = job.status_label;
          status.className = "status " + job.status;
        }
        if (heading && heading.getAttribute("data-" + job.status)) {
          heading.textContent = heading.getAttribute("data-" + job.status);
        }
        field("delivered").textContent = String(job.delivered);
        var err = field("error");
        if (job.error) { err.textContent = job.error; err.hidden = false; }
        if (job.delivered !== lastDelivered) {
          lastDelivered = job.delivered;
          lastProgress = Date.now();
        }
        var stalled = field("stalled");
        if (job.status === "running") {
          if (stalled) stalled.hidden = Date.now() - lastProgress < stallMs();
          setTimeout(poll, 1000);
          return;
        }
        if (stalled) stalled.hidden = true;
        // Ended: the live region says how (a failed job shows its "Resume" button), and
        // the "updates by itself" note goes.
        if (job.status === "failed") {
          var resume = field("resume");
          if (resume) resume.hidden = false;
          field("said").textContent = "Broadcast stopped after " + job.delivered + " users.";
        } else {
          field("said").textContent = "Broadcast sent to " + job.delivered + " users.";
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
  if (field("status").classList.contains("running")) setTimeout(poll, 500);
})();
