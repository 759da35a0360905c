// Progressive enhancement for the message list: the "mark read" and "mark all read" buttons
// are plain forms that work without JavaScript (POST, then redirect back). With JavaScript,
// they call the JSON API with the page's CSRF token and update the list and the unread count
// in place (focus moves to the next message, the live region names the one marked read),
// and the page follows the inbox live (`<meta name="stored-messages-stream">`):
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

  // The live region says one thing at a time: the newest note replaces the last.
  function announce(text) {
    var region = document.querySelector(".messages[aria-live]");
    if (!region) return;
    region.querySelectorAll(".sr-note").forEach(function (old) { old.remove(); });
    var note = document.createElement("p");
    note.className = "sr-note";
    note.textContent = text;
    region.appendChild(note);
  }

  // The level in a word, as the templates write it (Level::label in the crate).
  function levelLabel(level) {
    switch (level) {
      case 10: case 11: return "Debug";
      case 20: case 21: return "Info";
      case 25: case 26: return "Success";
      case 30: case 31: return "Warning";
      case 40: case 41: return "Error";
      default: return "Message";
    }
  }

  function summary(text) {
    var chars = Array.from(text);
    return chars.length > 40 ? chars.slice(0, 40).join("") + "\u2026" : text;
  }

  // The start of a text over 300 characters (about 200, cut at a space), as the crate's
  // StreamMessage::head; null for a shorter one.
  function longHead(text) {
    var chars = Array.from(text);
    if (chars.length <= 300) return null;
    var head = chars.slice(0, 200).join("");
    var space = Math.max(head.lastIndexOf(" "), head.lastIndexOf("\n"), head.lastIndexOf("\t"));
    return space > head.length / 2 ? head.slice(0, space).replace(/\s+$/, "") : head;
  }

  // ---- Dates ---------------------------------------------------------------------------
  // Pages write every date once, as <time datetime="RFC 3339">2026-11-25 14:05 UTC</time>.
  // Here they become relative ("3 min ago") for the last day, and the reader's local date
  // and time before that; the full local time is in the title.

  var longFormat = window.Intl ? new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" }) : null;

  function relative(date, now) {
    var seconds = Math.round((now - date) / 1000);
    if (seconds < 45) return "just now";
    var minutes = Math.round(seconds / 60);
    if (minutes < 60) return minutes + " min ago";
    var hours = Math.round(minutes / 60);
    if (hours < 24) return hours + (hours === 1 ? " hour ago" : " hours ago");
    return null;
  }

  function showTimes(root) {
    if (!longFormat) return;
    var now = Date.now();
    (root || document).querySelectorAll("time[datetime]").forEach(function (el) {
      var date = new Date(el.getAttribute("datetime"));
      if (isNaN(date.getTime())) return;
      var full = longFormat.format(date);
      el.title = full;
      el.textContent = relative(date, now) || full;
    });
  }

  showTimes(document);
  setInterval(function () { showTimes(document); }, 60000);

  function currentCount() {
    var badge = document.querySelector("[data-unread-count]");
    var n = badge ? parseInt(badge.textContent, 10) : NaN;
    return isNaN(n) ? null : n;
  }

  function showEmptyIfNeeded(list) {
    if (list && !list.querySelector("li.message, li.empty")) {
      var empty = document.createElement("li");
      empty.className = "empty";
      empty.textContent = "No unread messages.";
      list.appendChild(empty);
      var all = document.querySelector("form.sm-mark-all-read");
      if (all) all.remove();
    }
  }

  // Where focus goes once an item leaves the list: the next item's button (or the one
  // before it, at the end; either may have left meanwhile through the live stream), else
  // the page's heading.
  function focusAfterRemoval(list, next, previous) {
    var target = [next, previous].filter(function (li) { return li && li.isConnected; })[0];
    if (!target && list) target = list.querySelector("li.message");
    var button = target && target.querySelector("form.sm-mark-read button");
    if (button) {
      button.focus();
      return;
    }
    var heading = document.querySelector("main h1");
    if (heading) {
      if (!heading.hasAttribute("tabindex")) heading.setAttribute("tabindex", "-1");
      heading.focus();
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
    // What the page shows now: the live stream may change it while the request runs.
    var list = document.querySelector("ul.stored-messages-inbox");
    var item = single ? form.closest("li") : null;
    var next = item ? item.nextElementSibling : null;
    var previous = item ? item.previousElementSibling : null;
    var text = item ? item.querySelector(".text, a") : null;
    var name = text ? summary(text.textContent) : "the message";
    var shown = list ? list.querySelectorAll("li.message").length : 0;
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
        if (single) {
          if (item) item.remove();
          showEmptyIfNeeded(list);
          focusAfterRemoval(list, next, previous);
          announce("Marked read: " + name + ".");
        } else {
          if (list) list.querySelectorAll("li.message").forEach(function (li) { li.remove(); });
          showEmptyIfNeeded(list);
          focusAfterRemoval(list, null, null);
          var n = result.ok && typeof result.body.marked === "number" ? result.body.marked : shown;
          announce(n === 1 ? "1 message marked read." : "All " + n + " messages marked read.");
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

  // The same markup as the list partial (stored_messages/list.html.tera), built with text
  // nodes only: nothing from a message is parsed as HTML.
  function messageItem(m) {
    var li = document.createElement("li");
    li.className = "message " + m.tags;
    li.setAttribute("data-id", m.id);
    var level = document.createElement("span");
    level.className = "level";
    level.textContent = levelLabel(m.level);
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
    var head = longHead(m.message);
    if (head === null) {
      li.appendChild(text);
    } else {
      // As the partial writes a long text: its start, the whole behind "Show more".
      var details = document.createElement("details");
      details.className = "long";
      var more = document.createElement("summary");
      [["head", head + "\u2026"], ["more", "Show more"], ["less", "Show less"]].forEach(function (part, i) {
        var span = document.createElement("span");
        span.className = part[0];
        span.textContent = part[1];
        if (i === 1) more.appendChild(document.createTextNode(" "));
        more.appendChild(span);
      });
      details.appendChild(more);
      details.appendChild(text);
      li.appendChild(details);
    }
    var time = document.createElement("time");
    time.setAttribute("datetime", m.date);
    time.textContent = m.date.slice(0, 16).replace("T", " ") + " UTC";
    li.appendChild(time);
    showTimes(li);
    var form = document.createElement("form");
    form.method = "post";
    form.action = api + "/inbox/" + encodeURIComponent(m.id) + "/read";
    form.className = "sm-mark-read";
    form.appendChild(hidden("csrf_token", token));
    form.appendChild(hidden("next", location.pathname + location.search));
    form.appendChild(button("Mark read", "Mark read: " + summary(m.message)));
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
    if (!quiet) announce("New message: " + (longHead(m.message) === null ? m.message : summary(m.message)));
  }

  function removeMessages(ids) {
    var list = inboxList();
    if (!list) return;
    ids.forEach(function (id) {
      var item = list.querySelector('li[data-id="' + CSS.escape(String(id)) + '"]');
      if (!item) return;
      // Read elsewhere while focused here: focus moves on as after "Mark read".
      var focused = item.contains(document.activeElement);
      var next = item.nextElementSibling;
      var previous = item.previousElementSibling;
      item.remove();
      if (focused) focusAfterRemoval(list, next, previous);
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
