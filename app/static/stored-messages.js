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

  // Set by the live part below: brings a list that shows only the oldest unread messages
  // up to date after some of them were marked read here.
  var refill = function () {};

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
    text = text.split(/\s+/).filter(Boolean).join(" ");
    var chars = characters(text);
    return chars.length > 40 ? chars.slice(0, 40).join("") + "\u2026" : text;
  }

  // The characters of a text as a reader sees them (a letter with its accents, a flag, an
  // emoji with its modifiers), as the crate counts them; code points in a browser that
  // cannot tell (no Intl.Segmenter).
  var graphemes = window.Intl && Intl.Segmenter ? new Intl.Segmenter(undefined, { granularity: "grapheme" }) : null;
  function characters(text) {
    if (!graphemes) return Array.from(text);
    return Array.from(graphemes.segment(text), function (s) { return s.segment; });
  }

  // The start of a text over 300 characters (about 200, cut at its last space if that is
  // past the middle), exactly as the crate's StreamMessage::head: the same spaces (Unicode's
  // White_Space), and the middle in UTF-8 bytes; null for a shorter text.
  var spaces = /[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$/;
  var utf8 = new TextEncoder();
  function longHead(text) {
    if (text.length <= 300) return null;
    var chars = characters(text);
    if (chars.length <= 300) return null;
    var head = chars.slice(0, 200).join("");
    var space = -1;
    for (var i = head.length - 1; i >= 0; i--) {
      if (spaces.test(head.charAt(i))) { space = i; break; }
    }
    if (space < 0 || utf8.encode(head.slice(0, space)).length <= utf8.encode(head).length / 2) {
      return head;
    }
    return head.slice(0, space).replace(spaces, "");
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
    // Being marked read here: the stream's `read` event for it is not news.
    (item ? [item] : list ? Array.from(list.querySelectorAll("li.message")) : []).forEach(function (li) {
      li.setAttribute("data-marking", "");
    });
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
          // Not logged in, or a token of another session: this page's session ended.
          if (result.status === 401 || result.status === 403) sessionEnded();
          throw new Error(result.body && result.body.error ? result.body.error.message : "request failed");
        }
        if (single) {
          if (item) item.remove();
          showEmptyIfNeeded(list);
          focusAfterRemoval(list, next, previous);
          // Quoted and isolated, as the server's notice: the text's own direction
          // characters do not reorder the words around it.
          announce("Marked read: \u201c\u2068" + name + "\u2069\u201d.");
        } else {
          if (list) list.querySelectorAll("li.message").forEach(function (li) { li.remove(); });
          showEmptyIfNeeded(list);
          focusAfterRemoval(list, null, null);
          var n = result.ok && typeof result.body.marked === "number" ? result.body.marked : shown;
          announce(n === 1 ? "1 message marked read." : "All " + n + " messages marked read.");
        }
        if (result.ok && typeof result.body.unread === "number") {
          setCount(result.body.unread);
          refill();
        } else {
          // The API's count, next to the route the form posted to (the API's base is the
          // host's choice): <base>/inbox/<id>/read or <base>/mark_all_read.
          var countUrl = form.action.replace(/\/(inbox\/[^\/]+\/read|mark_all_read)$/, "/count");
          fetch(countUrl, { credentials: "same-origin", headers: { "Accept": "application/json" } })
            .then(function (r) { return r.json(); })
            .then(function (b) { if (typeof b.unread === "number") setCount(b.unread); });
          refill();
        }
      })
      .catch(function (error) {
        if (item) item.removeAttribute("data-marking");
        if (button) button.disabled = false;
        announce(ended ? "Not marked read: this page's session ended." : "Could not update messages: " + error.message);
      });
  });

  // ---- Live updates -------------------------------------------------------------------

  var streamMeta = document.querySelector('meta[name="stored-messages-stream"]');
  if (!streamMeta || !window.EventSource) return;
  var streamUrl = streamMeta.getAttribute("content");
  var streamPath = streamUrl.split("?")[0];
  var api = streamPath.replace(/\/stream$/, "");
  // The page says which inbox it showed (`?since=<id>`): the stream then sends what changed
  // after it. Without that, a first count that differs from the page's means it missed
  // something.
  var sinceMatch = /[?&]since=([^&]+)/.exec(streamUrl);
  var pageSince = sinceMatch ? decodeURIComponent(sinceMatch[1]) : null;
  // The newest event id this tab applied (its own stream's, or the tab holding the stream's):
  // a tab that takes the stream over resumes from it, so nothing is replayed or announced
  // twice.
  var lastId = pageSince;

  // An event id is `<largest id>-<hash of the unread set>`: two ids with the same hash name
  // the same inbox.
  function sameInbox(a, b) {
    return !!a && !!b && a.split("-")[1] === b.split("-")[1];
  }

  function inboxList() {
    return document.querySelector("ul.stored-messages-inbox");
  }

  // A page that lists only the oldest N unread messages says so (`data-sm-more="N"`): live
  // messages beyond them are counted there, not listed, so the list stays what a reload
  // would show.
  var moreNote = document.querySelector("[data-sm-more]");
  var cap = moreNote ? parseInt(moreNote.getAttribute("data-sm-more"), 10) || 200 : 200;

  function listed(list) {
    return list ? list.querySelectorAll("li.message").length : 0;
  }

  // Shows or hides the "not shown yet" note for `unread` messages in all.
  function showWaiting(unread) {
    if (!moreNote) return;
    var waiting = unread - listed(inboxList());
    moreNote.hidden = waiting <= 0;
    var n = moreNote.querySelector("[data-sm-waiting]");
    if (n && waiting > 0) n.textContent = String(waiting);
  }

  // What the live stream brought since the last note, said in one note a moment later: a
  // burst of messages is one announcement, not several that replace one another.
  var news = { added: [], read: [], unlisted: 0, timer: null };

  // Past this many unread messages the stream sends counts only (the crate's
  // live::KNOWN_LIMIT): then a count that rises is how new messages are known.
  var KNOWN_LIMIT = 500;
  // Whether a `message` event came since the last `count`, and that count (the badge may
  // have moved since, by a resync or a Mark read here).
  var messageSinceCount = false;
  var lastStreamCount = null;

  function levelWord(level) {
    var label = levelLabel(level);
    return label === "Message" ? "message" : label.toLowerCase() + " message";
  }

  function sayNews() {
    news.timer = null;
    var parts = [];
    if (news.added.length === 1) {
      var m = news.added[0];
      parts.push("New " + levelWord(m.level) + ": " + (longHead(m.message) === null ? m.message : summary(m.message)));
    } else if (news.added.length > 1) {
      parts.push(news.added.length + " new messages. The latest: " + summary(news.added[news.added.length - 1].message));
    }
    if (news.read.length === 1) {
      parts.push("Read elsewhere: " + news.read[0]);
    } else if (news.read.length > 1) {
      parts.push(news.read.length + " messages were read elsewhere");
    }
    if (news.unlisted > 0) {
      parts.push(news.unlisted === 1 ? "1 new message" : news.unlisted + " new messages");
    }
    news.added = [];
    news.read = [];
    news.unlisted = 0;
    if (parts.length) announce(parts.join(". ") + ".");
  }

  function queueNews() {
    if (!news.timer) news.timer = setTimeout(sayNews, 250);
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
    var dateText = m.date.slice(0, 16).replace("T", " ") + " UTC";
    time.textContent = dateText;
    li.appendChild(time);
    showTimes(li);
    var form = document.createElement("form");
    form.method = "post";
    form.action = api + "/inbox/" + encodeURIComponent(m.id) + "/read";
    form.className = "sm-mark-read";
    form.appendChild(hidden("csrf_token", token));
    form.appendChild(hidden("next", location.pathname + location.search));
    // Named with the date, as the partial does: repeated texts get distinct buttons.
    form.appendChild(button("Mark read", "Mark read: " + summary(m.message) + ", " + dateText));
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

  function itemOf(list, id) {
    return list ? list.querySelector('li[data-id="' + CSS.escape(String(id)) + '"]') : null;
  }

  // Messages this tab already showed or announced: an event that brings one again (a
  // resync, a second tab's view) is not news.
  var seen = {};
  (function () {
    var list = inboxList();
    if (list) list.querySelectorAll("li.message[data-id]").forEach(function (li) { seen[li.getAttribute("data-id")] = true; });
  })();

  // While a resync's requests run, what events changed meanwhile wins over their answers.
  var pending = null;

  // Lists `m` at the end of the list, unless it is there already or the list is full (the
  // page then counts it as waiting).
  function listMessage(list, m) {
    if (!list || itemOf(list, m.id)) return;
    if (listed(list) >= cap) {
      if (moreNote) moreNote.hidden = false;
      return;
    }
    var empty = list.querySelector("li.empty");
    if (empty) empty.remove();
    list.appendChild(messageItem(m));
    ensureMarkAll(list);
  }

  function addMessage(m) {
    messageSinceCount = true;
    var id = String(m.id);
    if (pending) {
      pending.added[id] = true;
      delete pending.removed[id];
    }
    listMessage(inboxList(), m);
    if (!seen[id]) {
      seen[id] = true;
      news.added.push(m);
      queueNews();
    }
  }

  function removeMessages(ids) {
    var list = inboxList();
    if (!list) return;
    var full = listed(list) >= cap;
    var removed = 0;
    ids.forEach(function (id) {
      if (pending) {
        pending.removed[String(id)] = true;
        delete pending.added[String(id)];
      }
      var item = itemOf(list, id);
      if (!item) return;
      removed += 1;
      if (!item.hasAttribute("data-marking")) {
        var text = item.querySelector(".text, a");
        news.read.push(text ? summary(text.textContent) : "a message");
      }
      // Read elsewhere while focused here: focus moves on as after "Mark read".
      var focused = item.contains(document.activeElement);
      var next = item.nextElementSibling;
      var previous = item.previousElementSibling;
      item.remove();
      if (focused) focusAfterRemoval(list, next, previous);
    });
    if (removed) queueNews();
    showEmptyIfNeeded(list);
    // A full list that lost some fills up again from the messages waiting behind it.
    if (removed && full && moreNote && !moreNote.hidden) resync();
  }

  // Reloads the list and the count from the API (after `resync`, when another tab's view
  // of the inbox is not this page's, or when the first count shows that the page missed
  // something between its rendering and the stream's start).
  function resync() {
    if (pending) {
      pending.again = true;
      return;
    }
    var run = { added: {}, removed: {}, counted: false, again: false };
    pending = run;
    var json = function (r) {
      if (!r.ok) {
        var failed = new Error("status " + r.status);
        failed.status = r.status;
        throw failed;
      }
      return r.json();
    };
    var headers = { credentials: "same-origin", headers: { "Accept": "application/json" } };
    var list = inboxList();
    // Of this page's session only: after a logout and another login in this browser, the
    // API answers 401 instead of the new session's inbox.
    Promise.all([
      fetch(api + "/count" + (sessionQuery ? "?" + sessionQuery : ""), headers).then(json),
      list ? fetch(api + "/inbox?limit=" + cap + (sessionQuery ? "&" + sessionQuery : ""), headers).then(json) : Promise.resolve(null)
    ])
      .then(function (answers) {
        var count = answers[0];
        var page = answers[1];
        list = inboxList();
        if (list && page && page.messages) {
          var wanted = {};
          page.messages.forEach(function (m) { wanted[String(m.id)] = true; });
          list.querySelectorAll("li.message").forEach(function (li) {
            var id = li.getAttribute("data-id");
            if (!wanted[id] && !run.added[id]) li.remove();
          });
          page.messages.forEach(function (m) {
            var id = String(m.id);
            if (run.removed[id]) return;
            seen[id] = true;
            listMessage(list, m);
          });
          showEmptyIfNeeded(list);
        }
        // A count the stream sent meanwhile is newer than this one.
        if (!run.counted && count && typeof count.unread === "number") setCount(count.unread);
        if (currentCount() !== null) showWaiting(currentCount());
      })
      .catch(function (error) {
        if (error && error.status === 401) sessionEnded();
      })
      .then(function () {
        pending = null;
        if (run.again) resync();
      });
  }

  refill = function () {
    if (moreNote && !moreNote.hidden) resync();
  };

  var firstCount = true;

  // New messages that only a rising count tells of (see KNOWN_LIMIT): counted as news.
  function countedNews(data, untracked) {
    if (!data || typeof data.unread !== "number") return;
    var before = lastStreamCount;
    if (untracked && !messageSinceCount && before !== null && data.unread > before) {
      news.unlisted += data.unread - before;
      queueNews();
    }
    messageSinceCount = false;
    lastStreamCount = data.unread;
  }

  function handle(type, data) {
    if (type === "message") {
      addMessage(data);
    } else if (type === "read") {
      removeMessages(data.ids || []);
    } else if (type === "count") {
      if (firstCount && !pageSince && currentCount() !== null && currentCount() !== data.unread) {
        resync();
      }
      countedNews(data, data.unread > KNOWN_LIMIT);
      firstCount = false;
      if (pending) pending.counted = true;
      setCount(data.unread);
      showWaiting(data.unread);
    } else if (type === "resync") {
      // A burst, or an inbox past KNOWN_LIMIT: the messages are not sent one by one, so
      // what rose is said as a number.
      countedNews(data, true);
      resync();
    }
  }

  // Tabs of one session share one stream: the channel and the lock are named after the
  // session's CSRF token, so a tab left open from before a logout never gets another
  // user's events.
  var shared = "stored-messages:" + streamPath + ":" + token;
  var channel = window.BroadcastChannel ? new BroadcastChannel(shared) : null;
  var holding = false;
  // Whether this tab's stream has brought an event yet (then `lastId` is the stream's).
  var streaming = false;
  var asked = false;
  var checked = false;

  function tell(message) {
    if (channel) channel.postMessage(message);
  }

  // A tab that does not hold the stream checks, once, that the page it shows is the inbox
  // the stream is at; if not (something changed between the two), it reloads from the API.
  function check(id) {
    if (checked || holding) return;
    checked = true;
    if (!pageSince || !sameInbox(id, pageSince)) resync();
  }

  if (channel) {
    channel.onmessage = function (event) {
      var message = event.data;
      if (!message) return;
      if (message.kind === "event" && !holding) {
        if (message.id) lastId = message.id;
        handle(message.type, message.data);
      } else if (message.kind === "hello" && holding) {
        if (streaming) tell({ kind: "state", id: lastId });
        else asked = true;
      } else if (message.kind === "state") {
        check(message.id);
      } else if (message.kind === "ended") {
        sessionEnded();
      }
    };
  }

  // Opens the stream and passes its events on to the other tabs. EventSource reconnects by
  // itself (sending Last-Event-ID) after a network error; an answer that is not a stream
  // (a 401 after logout, a 503) closes it, and then this tries again later, from the last
  // event applied.
  // The session this page was drawn for, as the stream checks it (`?session=`, the crate's
  // live::page_tag: FNV-1a of the CSRF token): after a logout, a reconnect of this tab is
  // refused rather than following whoever logs in next in this browser.
  function pageTag(text) {
    var hash = 0x811c9dc5;
    for (var i = 0; i < text.length; i++) {
      hash ^= text.charCodeAt(i);
      hash = Math.imul(hash, 0x01000193) >>> 0;
    }
    return ("0000000" + hash.toString(16)).slice(-8);
  }
  var sessionQuery = token ? "session=" + pageTag(token) : "";

  function open() {
    var delay = 2000;
    var params = sessionQuery ? [sessionQuery] : [];
    function connect() {
      if (ended) return;
      var query = lastId ? params.concat(["since=" + encodeURIComponent(lastId)]) : params;
      var url = streamPath + (query.length ? "?" + query.join("&") : "");
      var source = new EventSource(url, { withCredentials: true });
      ["message", "read", "count", "resync"].forEach(function (type) {
        source.addEventListener(type, function (event) {
          var data;
          try { data = JSON.parse(event.data); } catch (e) { return; }
          delay = 2000;
          if (event.lastEventId) lastId = event.lastEventId;
          handle(type, data);
          tell({ kind: "event", type: type, data: data, id: lastId });
          if (!streaming) {
            streaming = true;
            if (asked) tell({ kind: "state", id: lastId });
          }
        });
      });
      source.onerror = function () {
        if (source.readyState !== EventSource.CLOSED) return;
        // EventSource does not say why: ask once more, and read the status.
        whyClosed(url).then(function (status) {
          if (status === 401) {
            sessionEnded();
            tell({ kind: "ended" });
            return;
          }
          setTimeout(connect, delay);
          delay = Math.min(delay * 2, 60000);
        });
      };
    }
    connect();
  }

  // The status of the stream's answer at `url` (0 if there was none). A stream that answers
  // after all is closed at once: the next connect opens it properly.
  function whyClosed(url) {
    var abort = window.AbortController ? new AbortController() : null;
    return fetch(url, {
      credentials: "same-origin",
      headers: { "Accept": "text/event-stream" },
      signal: abort ? abort.signal : undefined
    })
      .then(function (response) {
        if (abort) abort.abort();
        return response.status;
      })
      .catch(function () { return 0; });
  }

  // The session this page was drawn for has ended (a logout, here or in another tab, or it
  // expired): the page stops following the inbox and says so, visibly and through the live
  // region, instead of retrying in silence.
  var ended = false;
  function sessionEnded() {
    if (ended) return;
    ended = true;
    var region = document.querySelector(".messages[aria-live]");
    if (!region) return;
    var note = document.createElement("p");
    note.className = "sm-ended";
    note.appendChild(document.createTextNode("This page has stopped updating: its session ended. "));
    var reload = document.createElement("a");
    reload.href = location.href;
    reload.textContent = "Reload the page";
    note.appendChild(reload);
    note.appendChild(document.createTextNode(" to sign in again or see current messages."));
    region.appendChild(note);
  }

  if (channel && navigator.locks && navigator.locks.request) {
    // One tab holds the lock and the stream; when it closes, the next tab takes over.
    navigator.locks.request(shared, function () {
      holding = true;
      firstCount = !lastId || lastId === pageSince;
      open();
      return new Promise(function () {});
    });
    tell({ kind: "hello" });
    // No answer (the tab holding the stream is itself starting, or has no stream yet):
    // reload from the API rather than trust the page.
    setTimeout(function () { check(null); }, 3000);
  } else {
    holding = true;
    open();
  }
})();
