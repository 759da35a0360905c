// Progressive enhancement for the message list: the "mark read" and "mark all read" buttons
// are plain forms that work without JavaScript (POST, then redirect back). With JavaScript,
// they call the JSON API with the page's CSRF token and update the list and the unread count
// in place. No build step, no dependencies.
(function () {
  "use strict";

  var meta = document.querySelector('meta[name="csrf-token"]');
  var token = meta ? meta.getAttribute("content") : "";

  function setCount(unread) {
    document.querySelectorAll("[data-unread-count]").forEach(function (el) {
      el.textContent = String(unread);
    });
  }

  function announce(text) {
    var region = document.querySelector(".messages[aria-live]");
    if (!region) return;
    var note = document.createElement("p");
    note.className = "sr-note";
    note.textContent = text;
    region.appendChild(note);
  }

  function showEmptyIfNeeded(list) {
    if (list && !list.querySelector("li.message")) {
      var empty = document.createElement("li");
      empty.className = "empty";
      empty.textContent = "No unread messages.";
      list.appendChild(empty);
      var all = document.querySelector("form.sm-mark-all-read");
      if (all) all.remove();
    }
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var single = form.classList.contains("sm-mark-read");
    var all = form.classList.contains("sm-mark-all-read");
    if (!single && !all) return;
    event.preventDefault();
    var button = form.querySelector("button");
    if (button) button.disabled = true;
    fetch(form.action, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRF-Token": token, "Accept": "application/json" }
    })
      .then(function (response) {
        return response.json().then(function (body) {
          return { ok: response.ok, status: response.status, body: body };
        });
      })
      .then(function (result) {
        if (!result.ok && result.status !== 404) {
          throw new Error(result.body && result.body.error ? result.body.error.message : "request failed");
        }
        var list = document.querySelector("ul.stored-messages-inbox");
        if (single) {
          var item = form.closest("li");
          if (item) item.remove();
          announce("Message marked read.");
        } else if (list) {
          list.querySelectorAll("li.message").forEach(function (li) { li.remove(); });
          announce("All messages marked read.");
        }
        if (result.ok && typeof result.body.unread === "number") {
          setCount(result.body.unread);
        } else {
          // The API's count, next to the route the form posted to (the API's base is the
          // host's choice): <base>/inbox/<id>/read or <base>/mark_all_read.
          var countUrl = form.action.replace(/\/(inbox\/[^\/]+\/read|mark_all_read)$/, "/count");
          fetch(countUrl, { credentials: "same-origin", headers: { "Accept": "application/json" } })
            .then(function (r) { return r.json(); })
            .then(function (b) { if (typeof b.unread === "number") setCount(b.unread); });
        }
        showEmptyIfNeeded(list);
      })
      .catch(function (error) {
        if (button) button.disabled = false;
        announce("Could not update messages: " + error.message);
      });
  });
})();
