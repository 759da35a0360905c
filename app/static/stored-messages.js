// Progressive enhancement for the message list: the "mark read" and "mark all read" buttons
// are plain forms that work without JavaScript (POST, then redirect back). With JavaScript,
// they call the JSON API with the page's CSRF token and update the list and the unread count
// in place, and the page follows the inbox live (`<meta name="stored-messages-stream">`):
// new messages appear in the list (announced by the live region) and messages read
// elsewhere leave it; the unread badge follows. A message that appears live stays unread
// until it is marked read or a page shows it. Tabs of one browser share one stream (the
// first tab opens it and passes its events on), since browsers allow only six connections
// per host. No build step, no dependencies.
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

  function currentCount() {
    var badge = document.querySelector("[data-unread-count]");
    var n = badge ? parseInt(badge.textContent, 10) : NaN;
    return isNaN(n) ? null : n;
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

  // ---- Live updates -------------------------------------------------------------------

  var streamMeta = document.querySelector('meta[name="stored-messages-stream"]');
  if (!streamMeta || !window.EventSource) return;
  var streamUrl = streamMeta.getAttribute("content");
  var api = streamUrl.replace(/\/stream(\?.*)?$/, "");
  // The page says which inbox it showed (`?since=`): the stream then sends what changed
  // after it. Without that, a first count that differs from the page's means it missed
  // something.
  var pageState = /[?&]since=[^&]/.test(streamUrl);

  function inboxList() {
    return document.querySelector("ul.stored-messages-inbox");
  }

  function hidden(name, value) {
    var input = document.createElement("input");
    input.type = "hidden";
    input.name = name;
    input.value = value;
    return input;
  }

  function button(text, label) {
    var b = document.createElement("button");
    b.type = "submit";
    b.className = "secondary";
    b.textContent = text;
    if (label) b.setAttribute("aria-label", label);
    return b;
  }

  function summary(text) {
    var chars = Array.from(text);
    return chars.length > 40 ? chars.slice(0, 40).join("") + "\u2026" : text;
  }

  // The same markup as the list partial (stored_messages/list.html.tera), built with text
  // nodes only: nothing from a message is parsed as HTML.
  function messageItem(m) {
    var li = document.createElement("li");
    li.className = "message " + m.tags;
    li.setAttribute("data-id", m.id);
    var level = document.createElement("span");
    level.className = "level";
    level.textContent = m.level_tag;
    li.appendChild(level);
    var text;
    if (m.url) {
      text = document.createElement("a");
      text.href = m.url;
    } else {
      text = document.createElement("span");
      text.className = "text";
    }
    text.textContent = m.message;
    li.appendChild(text);
    var time = document.createElement("time");
    time.setAttribute("datetime", m.date);
    time.textContent = m.date.slice(0, 19).replace("T", " ") + " UTC";
    li.appendChild(time);
    var form = document.createElement("form");
    form.method = "post";
    form.action = api + "/inbox/" + encodeURIComponent(m.id) + "/read";
    form.className = "sm-mark-read";
    form.appendChild(hidden("csrf_token", token));
    form.appendChild(hidden("next", location.pathname + location.search));
    form.appendChild(button("Mark read", "Mark \u201c" + summary(m.message) + "\u201d read"));
    li.appendChild(form);
    return li;
  }

  function ensureMarkAll(list) {
    if (document.querySelector("form.sm-mark-all-read")) return;
    var form = document.createElement("form");
    form.method = "post";
    form.action = api + "/mark_all_read";
    form.className = "sm-mark-all-read";
    form.appendChild(hidden("csrf_token", token));
    form.appendChild(hidden("next", location.pathname + location.search));
    form.appendChild(button("Mark all read"));
    list.parentNode.insertBefore(form, list);
  }

  function addMessage(m, quiet) {
    var list = inboxList();
    if (list && !list.querySelector('li[data-id="' + CSS.escape(String(m.id)) + '"]')) {
      var empty = list.querySelector("li.empty");
      if (empty) empty.remove();
      list.appendChild(messageItem(m));
      ensureMarkAll(list);
    }
    if (!quiet) announce("New message: " + m.message);
  }

  function removeMessages(ids) {
    var list = inboxList();
    if (!list) return;
    ids.forEach(function (id) {
      var item = list.querySelector('li[data-id="' + CSS.escape(String(id)) + '"]');
      if (item) item.remove();
    });
    showEmptyIfNeeded(list);
  }

  // Reloads the list and the count from the API (after `resync`, or when the first count
  // shows that the page missed something between its rendering and the stream's start).
  function resync() {
    fetch(api + "/count", { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.json(); })
      .then(function (b) { if (typeof b.unread === "number") setCount(b.unread); });
    var list = inboxList();
    if (!list) return;
    fetch(api + "/inbox?limit=200", { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.json(); })
      .then(function (page) {
        if (!page || !page.messages) return;
        var wanted = {};
        page.messages.forEach(function (m) { wanted[String(m.id)] = true; });
        list.querySelectorAll("li.message").forEach(function (li) {
          if (!wanted[li.getAttribute("data-id")]) li.remove();
        });
        page.messages.forEach(function (m) { addMessage(m, true); });
        showEmptyIfNeeded(list);
      });
  }

  var firstCount = true;

  function handle(type, data) {
    if (type === "message") {
      addMessage(data, false);
    } else if (type === "read") {
      removeMessages(data.ids || []);
    } else if (type === "count") {
      if (firstCount && !pageState && currentCount() !== null && currentCount() !== data.unread) {
        resync();
      }
      firstCount = false;
      setCount(data.unread);
    } else if (type === "resync") {
      resync();
    }
  }

  var channel = window.BroadcastChannel ? new BroadcastChannel("stored-messages:" + streamUrl) : null;
  if (channel) {
    channel.onmessage = function (event) {
      if (event.data && event.data.type) handle(event.data.type, event.data.data);
    };
  }

  // Opens the stream and passes its events on to the other tabs. EventSource reconnects by
  // itself (sending Last-Event-ID) after a network error; an answer that is not a stream
  // (a 401 after logout, a 503) closes it, and then this tries again later.
  function open() {
    var delay = 2000;
    function connect() {
      var source = new EventSource(streamUrl, { withCredentials: true });
      ["message", "read", "count", "resync"].forEach(function (type) {
        source.addEventListener(type, function (event) {
          var data;
          try { data = JSON.parse(event.data); } catch (e) { return; }
          delay = 2000;
          handle(type, data);
          if (channel) channel.postMessage({ type: type, data: data });
        });
      });
      source.onerror = function () {
        if (source.readyState === EventSource.CLOSED) {
          setTimeout(connect, delay);
          delay = Math.min(delay * 2, 60000);
        }
      };
    }
    connect();
  }

  if (channel && navigator.locks && navigator.locks.request) {
    // One tab holds the lock and the stream; when it closes, the next tab takes over.
    navigator.locks.request("stored-messages-stream:" + streamUrl, function () {
      open();
      firstCount = true;
      return new Promise(function () {});
    });
  } else {
    open();
  }
})();
