//! A real browser against the real reference app: headless Chromium, driven over WebDriver by
//! fantoccini, clicks the inbox buttons and `static/stored-messages.js` answers through the
//! JSON API, without a page load. Rocket's local client cannot run that script; this can.
//! An admin broadcasts through the forms and a recipient sees it once; a background
//! broadcast's page follows the job with `static/admin.js` until it is done.
//!
//! Needs `chromium` and `chromedriver` on PATH (Debian: `apt-get install chromium
//! chromium-driver`). Without them the tests skip with one line, unless
//! `STORED_MESSAGES_REQUIRE_SERVICES=1`, which makes that a failure naming what is missing.

use std::future::Future;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::key::Key;
use fantoccini::wd::{Capabilities, TimeoutConfiguration};
use fantoccini::{Client, ClientBuilder, Locator};
use rocket::fairing::AdHoc;
use rocket::figment::Figment;
use rocket::tokio::io::{AsyncReadExt, AsyncWriteExt};
use rocket::tokio::net::TcpStream;
use rocket::tokio::sync::oneshot;
use rocket::tokio::task::JoinHandle;
use rocket::tokio::time::{sleep, timeout};
use serde_json::json;
use sqlx::Connection;
use stored_messages::{Level, ListQuery, MessageId, NewMessage, Store, UserId};

use crate::common::{service_available, test_figment, urlencode, TestApp};

/// How long a page may take to show what a test waits for.
const WAIT: Duration = Duration::from_secs(10);
/// How long the server, chromedriver and Chromium may take to start on a busy machine.
const STARTUP: Duration = Duration::from_secs(30);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);

/// The flags every headless Chromium of this project runs with (plus a fresh profile).
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_read_button_updates_the_count_in_place_and_reads_exactly_that_message() {
    let Some(session) = Session::start(3).await else {
        return;
    };
    let client = &session.served.client;

    // arrange: logged in, on the inbox page
    session.login_and_open_inbox().await;
    assert_eq!(unread_count_text(client).await.as_deref(), Some("3"));
    let url_before = client.current_url().await.unwrap();
    mark_page_as_loaded(client).await;
    let first = client
        .find(Locator::Css("ul.stored-messages-inbox li.message"))
        .await
        .expect("an inbox item");
    let clicked: MessageId = first
        .attr("data-id")
        .await
        .unwrap()
        .expect("inbox items carry data-id")
        .parse()
        .unwrap();

    // act
    first
        .find(Locator::Css("form.sm-mark-read button"))
        .await
        .expect("a \"Mark read\" button in the item")
        .click()
        .await
        .unwrap();

    // assert: the count drops in place, the item leaves the list, the page stays
    wait_for_unread_count(client, "2").await;
    assert_same_page(client, &url_before).await;
    let still_listed = client
        .find_all(Locator::Css(&format!(
            "ul.stored-messages-inbox li[data-id=\"{clicked}\"]"
        )))
        .await
        .unwrap();
    assert!(still_listed.is_empty(), "message {clicked} is still listed");
    let listed = client
        .find_all(Locator::Css("ul.stored-messages-inbox li.message"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);

    // assert: in the backend, exactly that message was read
    let mut expected = session.messages.clone();
    expected.retain(|id| *id != clicked);
    assert_eq!(session.inbox_ids().await, expected);
    assert_eq!(
        session.archive_len().await,
        3,
        "the archive keeps all three"
    );

    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_all_read_button_drops_the_count_to_zero_in_place() {
    let Some(session) = Session::start(3).await else {
        return;
    };
    let client = &session.served.client;

    // arrange
    session.login_and_open_inbox().await;
    assert_eq!(unread_count_text(client).await.as_deref(), Some("3"));
    let url_before = client.current_url().await.unwrap();
    mark_page_as_loaded(client).await;

    // act
    client
        .find(Locator::Css("form.sm-mark-all-read button"))
        .await
        .expect("a \"Mark all read\" button")
        .click()
        .await
        .unwrap();

    // assert: count 0, the list says it is empty, its button is gone, the page stays
    wait_for_unread_count(client, "0").await;
    assert_same_page(client, &url_before).await;
    let empty = client
        .find(Locator::Css("ul.stored-messages-inbox li.empty"))
        .await
        .expect("the empty-list note");
    assert_eq!(empty.text().await.unwrap(), "No unread messages.");
    assert!(client
        .find_all(Locator::Css(
            "ul.stored-messages-inbox li.message, form.sm-mark-all-read"
        ))
        .await
        .unwrap()
        .is_empty());

    // assert: in the backend, the inbox is empty and the archive full
    assert!(session.inbox_ids().await.is_empty());
    assert_eq!(session.archive_len().await, 3);

    session.stop().await;
}

/// Live updates: with the inbox page open, a message sent by the CLI (another process)
/// appears without a reload and the badge goes up; marking it read in a second tab brings
/// the first tab's badge down and takes it out of the first tab's list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_by_the_cli_appears_live_and_a_read_in_another_tab_follows() {
    a_message_sent_by_the_cli_appears_live_and_a_read_in_another_tab_follows_with(
        Session::start(1).await,
    )
    .await;
}

/// The same, with the stream served by the stream listener (another port, through a
/// redirect and CORS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_by_the_cli_appears_live_and_a_read_in_another_tab_follows_through_the_stream_listener(
) {
    a_message_sent_by_the_cli_appears_live_and_a_read_in_another_tab_follows_with(
        Session::start_listener(1).await,
    )
    .await;
}

async fn a_message_sent_by_the_cli_appears_live_and_a_read_in_another_tab_follows_with(
    session: Option<Session>,
) {
    let Some(session) = session else {
        return;
    };
    let client = &session.served.client;
    session.login_and_open_inbox().await;
    assert_eq!(unread_count_text(client).await.as_deref(), Some("1"));
    let url_before = client.current_url().await.unwrap();
    mark_page_as_loaded(client).await;
    let first_tab = client.window().await.unwrap();
    // The stream is open once its first count arrived (the page's own count is right).
    sleep(Duration::from_millis(500)).await;
    // Where the browser is served its stream: here, or at the stream listener.
    let stream_url = client
        .execute_async(
            "var done = arguments[arguments.length - 1]; var stop = new AbortController(); \
             fetch('/messages/stream', { signal: stop.signal }) \
               .then(function (r) { done(r.status + ' ' + r.url); stop.abort(); }) \
               .catch(function (e) { done(String(e)); });",
            vec![],
        )
        .await
        .unwrap();
    let stream_url = stream_url.as_str().unwrap_or_default();
    let listener = session.served.store.config().stream_address.is_some();
    assert!(stream_url.starts_with("200 http://"), "{stream_url}");
    assert_eq!(
        !stream_url.starts_with(&format!("200 {}/", session.served.base)),
        listener,
        "{stream_url}"
    );

    // act: the CLI, another process on the same database, sends alice a message
    let sent = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_stored-messages"))
        .args(["send", "--to", "alice", "Live <b>from</b> the CLI"])
        .env(
            "ROCKET_DATABASES",
            format!("{{stored_messages={{url=\"{}\"}}}}", session._app.url),
        )
        .env("ROCKET_LOG_LEVEL", "off")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // assert: it appears in the list, escaped, with its button; the badge goes up
    let text = wait_for_text(
        client,
        "ul.stored-messages-inbox li.message:last-child",
        |t| t.contains("Live <b>from</b> the CLI"),
    )
    .await;
    wait_for_unread_count(client, "2").await;
    println!("the CLI's message appeared after {:?}", sent.elapsed());
    assert!(text.contains("Mark read"), "{text}");
    assert_same_page(client, &url_before).await;
    let live_id = client
        .find(Locator::Css(
            "ul.stored-messages-inbox li.message:last-child",
        ))
        .await
        .unwrap()
        .attr("data-id")
        .await
        .unwrap()
        .expect("the live item carries its id");

    // act: a second tab marks it read
    let second_tab = client.new_window(true).await.unwrap();
    client.switch_to_window(second_tab.handle).await.unwrap();
    session.served.goto("/inbox").await;
    click(
        client,
        &format!("ul.stored-messages-inbox li[data-id=\"{live_id}\"] form.sm-mark-read button"),
    )
    .await;
    wait_for_unread_count(client, "1").await;

    // assert: the first tab follows, without a reload
    client.switch_to_window(first_tab).await.unwrap();
    wait_for_unread_count(client, "1").await;
    eventually(
        "the read message to leave the first tab's list",
        WAIT,
        || async {
            let left = client
                .find_all(Locator::Css(&format!(
                    "ul.stored-messages-inbox li[data-id=\"{live_id}\"]"
                )))
                .await
                .map_err(|e| e.to_string())?;
            if left.is_empty() {
                Ok(())
            } else {
                Err("still listed".to_string())
            }
        },
    )
    .await;
    assert_same_page(client, &url_before).await;
    let mut expected = session.messages.clone();
    expected.sort();
    assert_eq!(
        session.inbox_ids().await,
        expected,
        "only the live one was read"
    );

    session.stop().await;
}

/// Eight tabs opened one after another, each after a new message (so each page shows
/// another inbox): they share one stream (browsers allow six connections per host; with one
/// stream per tab the seventh never loaded), each stays current, and when the tab holding
/// the stream closes another takes it over without announcing old messages again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tabs_opened_at_different_moments_share_one_stream_and_hand_it_over_quietly() {
    tabs_opened_at_different_moments_share_one_stream_and_hand_it_over_quietly_with(
        Session::start(1).await,
    )
    .await;
}

/// The same, with the stream served by the stream listener (another port, through a
/// redirect and CORS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tabs_opened_at_different_moments_share_one_stream_and_hand_it_over_quietly_through_the_stream_listener(
) {
    tabs_opened_at_different_moments_share_one_stream_and_hand_it_over_quietly_with(
        Session::start_listener(1).await,
    )
    .await;
}

async fn tabs_opened_at_different_moments_share_one_stream_and_hand_it_over_quietly_with(
    session: Option<Session>,
) {
    let Some(session) = session else {
        return;
    };
    let client = &session.served.client;
    let store = &session.served.store;
    session.login_and_open_inbox().await;
    let first_tab = client.window().await.unwrap();
    let mut tabs = vec![first_tab.clone()];
    for i in 2..=8 {
        let text = format!("Before tab {i}");
        send(store, session.user, &text).await;
        // the open tabs follow before the next one opens
        wait_for_unread_count(client, &i.to_string()).await;
        let tab = client.new_window(true).await.unwrap();
        client.switch_to_window(tab.handle.clone()).await.unwrap();
        timeout(WAIT, session.served.goto("/inbox"))
            .await
            .unwrap_or_else(|_| panic!("tab {i} did not load"));
        wait_for_text(
            client,
            "ul.stored-messages-inbox li.message:last-child",
            |t| t.contains(&text),
        )
        .await;
        tabs.push(tab.handle);
    }
    eventually("one stream for all the tabs", WAIT, || async {
        match store.open_streams() {
            1 => Ok(()),
            n => Err(format!("{n} streams are open")),
        }
    })
    .await;

    // act: the last tab marks the first message read
    click(
        client,
        "ul.stored-messages-inbox li.message:first-child form.sm-mark-read button",
    )
    .await;
    wait_for_unread_count(client, "7").await;

    // assert: every other tab follows
    for (n, tab) in tabs.iter().enumerate().take(7) {
        client.switch_to_window(tab.clone()).await.unwrap();
        wait_for_unread_count(client, "7").await;
        let listed = client
            .find_all(Locator::Css("ul.stored-messages-inbox li.message"))
            .await
            .unwrap()
            .len();
        assert_eq!(listed, 7, "tab {}", n + 1);
        // and says why the message left (once its burst of news is over)
        wait_for_text(client, ".messages[aria-live] .sr-note", |t| {
            t.contains("Read elsewhere: Stored message 1")
        })
        .await;
    }

    // act: the first tab, which holds the stream, closes; the second records what it says
    client.switch_to_window(tabs[1].clone()).await.unwrap();
    client
        .execute(
            "window.smNotes = []; new MutationObserver(function (records) { \
               records.forEach(function (r) { r.addedNodes.forEach(function (n) { \
                 if (n.classList && n.classList.contains('sr-note')) window.smNotes.push(n.textContent); \
               }); }); \
             }).observe(document.querySelector('.messages[aria-live]'), { childList: true });",
            vec![],
        )
        .await
        .unwrap();
    client.switch_to_window(tabs[0].clone()).await.unwrap();
    client.close_window().await.unwrap();
    client.switch_to_window(tabs[1].clone()).await.unwrap();
    sleep(Duration::from_secs(1)).await;
    send(store, session.user, "After the hand-over").await;

    // assert: the second tab shows the new message and announced it, and only it
    wait_for_text(
        client,
        "ul.stored-messages-inbox li.message:last-child",
        |t| t.contains("After the hand-over"),
    )
    .await;
    wait_for_unread_count(client, "8").await;
    eventually("the announcement", WAIT, || async {
        let notes = client
            .execute("return window.smNotes;", vec![])
            .await
            .unwrap();
        match notes.as_array() {
            Some(notes) if !notes.is_empty() => Ok(()),
            _ => Err("nothing announced yet"),
        }
    })
    .await;
    sleep(Duration::from_millis(500)).await;
    let notes = client
        .execute("return window.smNotes;", vec![])
        .await
        .unwrap();
    assert_eq!(
        notes,
        json!(["New info message: After the hand-over."]),
        "first seen: {notes:?}"
    );

    session.stop().await;
}

/// A tab left open across a logout and another user's login in the same browser stops
/// following: it never shows the new user's messages or count (its stream ends with the
/// session, and its reconnects name the session the page was drawn for), and it says so
/// instead of retrying in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tab_left_open_after_logout_does_not_follow_the_next_login_and_says_so() {
    a_tab_left_open_after_logout_does_not_follow_the_next_login_and_says_so_with(
        Session::start(1).await,
    )
    .await;
}

/// The same, with the stream served by the stream listener (another port, through a
/// redirect and CORS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tab_left_open_after_logout_does_not_follow_the_next_login_and_says_so_through_the_stream_listener(
) {
    a_tab_left_open_after_logout_does_not_follow_the_next_login_and_says_so_with(
        Session::start_listener(1).await,
    )
    .await;
}

async fn a_tab_left_open_after_logout_does_not_follow_the_next_login_and_says_so_with(
    session: Option<Session>,
) {
    let Some(session) = session else {
        return;
    };
    let client = &session.served.client;
    let store = &session.served.store;
    let bob = session._app.user("bob", false).await.user_id();
    session.login_and_open_inbox().await;
    let first_tab = client.window().await.unwrap();
    sleep(Duration::from_millis(500)).await;

    // act: another tab logs out and logs in as bob, who then gets a message
    let second = client.new_window(true).await.unwrap();
    client.switch_to_window(second.handle).await.unwrap();
    session.served.goto("/inbox").await;
    session.served.log_out().await;
    session.served.log_in("bob", "/inbox").await;
    send(store, bob, "For bob only").await;
    wait_for_text(
        client,
        "ul.stored-messages-inbox li.message:last-child",
        |t| t.contains("For bob only"),
    )
    .await;

    // assert: the first tab says that it stopped, with a way to reload; it still shows
    // alice's page, and nothing of bob's
    client.switch_to_window(first_tab).await.unwrap();
    wait_for_text(client, ".messages[aria-live] .sm-ended", |t| {
        t.contains("This page has stopped updating: its session ended.")
    })
    .await;
    let reload = client
        .find(Locator::Css(".sm-ended a"))
        .await
        .expect("a reload link");
    assert_eq!(reload.text().await.unwrap(), "Reload the page");
    let href = reload.attr("href").await.unwrap().unwrap_or_default();
    assert!(href.ends_with("/inbox"), "{href}");
    sleep(Duration::from_secs(1)).await;
    // Its buttons say why they cannot work, in words, not as a token error.
    click(
        client,
        "ul.stored-messages-inbox li.message form.sm-mark-read button",
    )
    .await;
    wait_for_text(client, ".messages[aria-live] .sr-note", |t| {
        t == "Not marked read: this page's session ended."
    })
    .await;
    let texts = client
        .find_all(Locator::Css("ul.stored-messages-inbox li.message"))
        .await
        .unwrap();
    assert_eq!(
        texts.len(),
        1,
        "alice's one message, nothing added or removed"
    );
    assert!(!texts[0].text().await.unwrap().contains("For bob only"));
    assert_eq!(unread_count_text(client).await.as_deref(), Some("1"));

    session.stop().await;
}

/// An inbox longer than the page: the page lists the oldest 100 and says how many wait
/// behind them; a live message is counted there, not listed (the list stays what a reload
/// shows) but still announced; marking one read brings the next one into the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_inbox_lists_the_oldest_and_counts_the_rest_live() {
    let Some(session) = Session::start(101).await else {
        return;
    };
    let client = &session.served.client;
    let store = &session.served.store;
    session.login_and_open_inbox().await;
    let listed = || async {
        client
            .find_all(Locator::Css("ul.stored-messages-inbox li.message"))
            .await
            .unwrap()
            .len()
    };
    assert_eq!(listed().await, 100);
    assert_eq!(unread_count_text(client).await.as_deref(), Some("101"));
    assert_eq!(waiting_text(client).await.as_deref(), Some("1"));
    sleep(Duration::from_millis(500)).await;

    // act: a message arrives
    send(store, session.user, "Beyond the page").await;

    // assert: counted and announced, not listed
    wait_for_unread_count(client, "102").await;
    wait_for_text(client, ".messages[aria-live] .sr-note", |t| {
        t.contains("Beyond the page")
    })
    .await;
    assert_eq!(waiting_text(client).await.as_deref(), Some("2"));
    assert_eq!(listed().await, 100);

    // act: the first listed message is marked read
    click(
        client,
        "ul.stored-messages-inbox li.message:first-child form.sm-mark-read button",
    )
    .await;

    // assert: the next one comes in, the note and the badge follow
    wait_for_unread_count(client, "101").await;
    wait_for_text(
        client,
        "ul.stored-messages-inbox li.message:last-child",
        |t| t.contains("Stored message 101 for the browser"),
    )
    .await;
    eventually("the list to be full again", WAIT, || async {
        match listed().await {
            100 => Ok(()),
            n => Err(format!("{n} listed")),
        }
    })
    .await;
    assert_eq!(waiting_text(client).await.as_deref(), Some("1"));

    session.stop().await;
}

/// Past `live::KNOWN_LIMIT` unread messages the stream sends counts only: a new message
/// there still raises the badge and is announced, as a count ("1 new message").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_message_past_the_streams_limit_is_announced_by_its_count() {
    let limit = stored_messages::live::KNOWN_LIMIT as usize;
    let Some(session) = Session::start(limit + 1).await else {
        return;
    };
    let client = &session.served.client;
    let store = &session.served.store;
    session.login_and_open_inbox().await;
    let unread = (limit + 1).to_string();
    assert_eq!(
        unread_count_text(client).await.as_deref(),
        Some(unread.as_str())
    );
    sleep(Duration::from_millis(500)).await;

    send(store, session.user, "Past the limit").await;

    wait_for_unread_count(client, &(limit + 2).to_string()).await;
    wait_for_text(client, ".messages[aria-live] .sr-note", |t| {
        t == "1 new message."
    })
    .await;
    session.stop().await;
}

/// A message that appears live is labelled as the server labels it: its "Mark read" names
/// the text's first 40 characters, and a long text shows its first 200, counted as a reader
/// sees characters (`Intl.Segmenter` in the script, Unicode's grapheme clusters in the
/// crate), so neither cut splits an emoji or leaves an accent behind; and a long text's
/// start ends at the same space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_messages_cut_their_texts_where_the_server_does() {
    let Some(session) = Session::start(0).await else {
        return;
    };
    let client = &session.served.client;
    let store = &session.served.store;
    session.login_and_open_inbox().await;
    sleep(Duration::from_millis(500)).await;
    // One emoji of five code points, where each cut falls.
    let family = "\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467}";
    let short = format!("{}{family}{family} e\u{301}tude", "x".repeat(39));
    let long = format!("{}{family}{}", "y".repeat(199), "z".repeat(200));
    // Its last space is before the middle of its start in characters, past it in bytes
    // (the crate's measure): the start ends there.
    let wide = format!("{} {}", "€".repeat(80), "a".repeat(300));

    send(store, session.user, &short).await;
    send(store, session.user, &long).await;
    send(store, session.user, &wide).await;
    let live = eventually("the messages to appear live", WAIT, || async {
        let labels = list_labels(client).await;
        if labels.len() == 3 {
            Ok(labels)
        } else {
            Err(format!("{labels:?}"))
        }
    })
    .await;
    session.served.goto("/inbox").await;
    let served = list_labels(client).await;

    assert_eq!(live, served, "the script's labels against the page's");
    assert_eq!(
        served,
        vec![
            (
                format!("Mark read: {}{family}…", "x".repeat(39)),
                String::new()
            ),
            (
                format!("Mark read: {}…", "y".repeat(40)),
                format!("{}{family}…", "y".repeat(199))
            ),
            (
                format!("Mark read: {}…", "€".repeat(40)),
                format!("{}…", "€".repeat(80))
            ),
        ]
    );
    session.stop().await;
}

/// Each listed message's "Mark read" label (without its date) and the start shown of a
/// long text (empty for a short one).
async fn list_labels(client: &Client) -> Vec<(String, String)> {
    let labels = client
        .execute(
            "return Array.from(document.querySelectorAll('ul.stored-messages-inbox li.message'), \
               function (li) { \
                 var label = li.querySelector('form.sm-mark-read button').getAttribute('aria-label'); \
                 var head = li.querySelector('.long .head'); \
                 return [label.slice(0, label.lastIndexOf(', ')), head ? head.textContent : '']; \
               });",
            vec![],
        )
        .await
        .unwrap();
    serde_json::from_value(labels).unwrap()
}

/// Stores a message for `user` (the request-free `Store`, as any process would).
async fn send(store: &Store, user: UserId, text: &str) {
    store
        .add_message_for(&[user], NewMessage::new(Level::STORED_INFO, text).unwrap())
        .await
        .unwrap();
}

/// How many unread messages the inbox page's note says are not listed, when it shows.
async fn waiting_text(client: &Client) -> Option<String> {
    let shown = client
        .execute(
            "var n = document.querySelector('[data-sm-more]'); \
             return n && !n.hidden ? n.querySelector('[data-sm-waiting]').textContent : null;",
            vec![],
        )
        .await
        .unwrap();
    shown.as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_broadcasts_to_two_named_users_and_one_of_them_sees_it_once() {
    let Some(tools) = browser_tools() else {
        return;
    };
    let Some(app) = TestApp::sqlite().await else {
        return;
    };
    // arrange: an admin and three users, before launch (so no first admin is made)
    app.user("root", true).await;
    let alice = app.user("alice", false).await.user_id();
    let bob = app.user("bob", false).await.user_id();
    let carol = app.user("carol", false).await.user_id();
    let served = Served::start(tools, test_figment(&app.url)).await;
    let client = &served.client;
    let text = "Disk maintenance at 22:00: save your work";

    // act: the admin fills the broadcast form and previews it
    served.log_in("root", "/admin/broadcast").await;
    click(client, "input[name=recipients][value=list]").await;
    type_into(client, "#usernames", "alice, bob").await;
    client
        .find(Locator::Css("select#level"))
        .await
        .expect("a level select")
        .select_by_value("stored_warning")
        .await
        .unwrap();
    type_into(client, "#message", text).await;
    click(client, "button[name=action][value=preview]").await;

    // assert: the preview shows the message as recipients will see it, the form keeps what
    // was entered, and nothing was sent
    let preview = wait_for_text(client, "section.preview li.message", |t| t.contains(text)).await;
    assert!(
        preview.to_lowercase().contains("warning"),
        "the preview names the level: {preview:?}"
    );
    assert!(client
        .find(Locator::Css("input[name=recipients][value=list]"))
        .await
        .unwrap()
        .is_selected()
        .await
        .unwrap());
    assert_eq!(
        field_value(client, "#usernames").await,
        "alice, bob",
        "the usernames are kept"
    );
    assert_eq!(field_value(client, "#message").await, text);
    assert!(
        served.inbox_texts(alice).await.is_empty(),
        "a preview sends nothing"
    );

    // act: send it
    click(client, "button[name=action][value=send]").await;

    // assert: back on the form with a flash saying how many and how long
    let flash = wait_for_text(client, "div.messages li.message", |t| t.contains("Sent to")).await;
    let sent = flash
        .split_once("Sent to 2 users in ")
        .and_then(|(_, rest)| rest.strip_suffix(" ms."))
        .and_then(|ms| ms.parse::<f64>().ok());
    assert!(
        sent.is_some(),
        "the flash says \"Sent to 2 users in … ms.\": {flash:?}"
    );
    assert_eq!(
        served
            .wait_for_location("the form page", |at| at == "/admin/broadcast")
            .await,
        "/admin/broadcast"
    );
    // The page opens on its notice, so a screen reader reads the result out.
    assert_focus(
        client,
        "#stored-messages",
        "the message area with the result",
    )
    .await;

    // assert: the audit lists it, newest first
    served.goto("/admin/audit").await;
    let cells: Vec<String> = {
        let row = client
            .find(Locator::Css("table tbody tr"))
            .await
            .expect("an audit row");
        let mut cells = Vec::new();
        for cell in row.find_all(Locator::Css("td")).await.unwrap() {
            cells.push(cell.text().await.unwrap());
        }
        cells
    };
    assert_eq!(cells.len(), 7, "{cells:?}");
    assert_eq!(cells[1], "root", "who: {cells:?}");
    assert_eq!(cells[2], "Warning (31)", "level: {cells:?}");
    assert_eq!(cells[3], text, "{cells:?}");
    assert_eq!(cells[4], "alice, bob", "audience: {cells:?}");
    assert_eq!(cells[5], "2", "size: {cells:?}");
    assert!(cells[6].ends_with(" ms"), "time: {cells:?}");

    // act: alice logs in and lands on the home page
    served.log_out().await;
    served.log_in("alice", "/").await;

    // assert: the merged stream shows the broadcast exactly once
    let shown = stream_texts(client).await;
    assert_eq!(
        shown.iter().filter(|t| t.contains(text)).count(),
        1,
        "once in the stream: {shown:?}"
    );

    // assert: shown means consumed: a reload no longer has it, the archive does
    client.refresh().await.unwrap();
    served
        .wait_for_location("the reloaded home page", |at| at == "/")
        .await;
    let shown = stream_texts(client).await;
    assert!(
        shown.iter().all(|t| !t.contains(text)),
        "gone from the stream after it was shown: {shown:?}"
    );
    assert!(served.inbox_texts(alice).await.is_empty(), "alice read it");
    served.goto("/archive").await;
    wait_for_text(client, "ul.stored-messages-archive", |t| t.contains(text)).await;

    // assert: bob still has it unread; carol never got it
    assert_eq!(served.inbox_texts(bob).await, [text]);
    assert!(served.inbox_texts(carol).await.is_empty(), "carol got it");

    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_broadcast_shows_progress_until_done() {
    let Some(tools) = browser_tools() else {
        return;
    };
    // PostgreSQL, so the test can hold the delivery back with a table lock (and so see the
    // page while the job runs) without blocking the request that queues it.
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    // arrange: an admin and 30 users (one password hash for all: argon2 is slow on purpose)
    app.user("root", true).await;
    let hash = stored_messages_app::users::hash_password("horse-battery-9").unwrap();
    let mut everyone = vec![app.users.by_name("root").await.unwrap().unwrap().user_id()];
    for i in 1..=30 {
        let user = app
            .users
            .insert_hashed(&format!("user{i:02}"), &hash, false)
            .await
            .unwrap();
        everyone.push(user.user_id());
    }
    let figment = test_figment(&app.url).merge(("admin.background_threshold", 2));
    let served = Served::start(tools, figment).await;
    let client = &served.client;
    let text = "New terms of service from Monday";
    served.log_in("root", "/admin/broadcast").await;
    type_into(client, "#message", text).await;
    click(client, "input[name=recipients][value=everyone]").await;

    // Deliveries wait for this lock; reading them (the pages, the header's count) does not.
    let mut hold = sqlx::PgConnection::connect(&app.url).await.unwrap();
    let mut held = hold.begin().await.unwrap();
    sqlx::query("lock table sm_deliveries in exclusive mode")
        .execute(&mut *held)
        .await
        .unwrap();

    // act: send to everyone, and confirm
    click(client, "button[name=action][value=send]").await;
    let question = wait_for_text(client, "#confirm-title", |t| t.contains("31 users")).await;
    assert!(
        question.contains("Send this to everyone (31 users)?"),
        "{question}"
    );
    click(client, "section.confirm button[name=action][value=send]").await;

    // assert: on the job's page, running, nothing delivered yet
    served
        .wait_for_location("the job page", |at| {
            at.strip_prefix("/admin/jobs/")
                .is_some_and(|id| id.parse::<i64>().is_ok())
        })
        .await;
    wait_for_text(client, "[data-job-field=status]", |t| t == "Running").await;
    assert_eq!(progress(client).await, (0.0, 31.0));
    assert!(
        running_note_shown(client).await,
        "the page says it updates itself"
    );
    // assert: no progress for a while (shortened here to half a second) is said, with a
    // way to resume
    client
        .execute(
            "document.querySelector('[data-stall-ms]').setAttribute('data-stall-ms', '500');",
            vec![],
        )
        .await
        .unwrap();
    wait_for_text(client, "[data-job-field=stalled]", |t| {
        t.contains("may be stuck")
    })
    .await;
    // axe on this state too (the page of a running, stalled job), when it is installed
    if let Some(axe) = axe_source() {
        for width in [390, 1280] {
            client.set_window_size(width, 1000).await.unwrap();
            let found = run_axe(client, &axe).await;
            assert!(
                found.is_empty(),
                "job page, stalled, at {width} px: {found:?}"
            );
        }
    }
    click(client, "[data-job-field=stalled] button").await;
    wait_for_text(client, "div.messages li.message", |t| {
        t.contains("Asked to go on")
    })
    .await;
    wait_for_text(client, "[data-job-field=status]", |t| t == "Running").await;
    let url_before = client.current_url().await.unwrap();
    mark_page_as_loaded(client).await;

    // act: let the deliveries through
    held.commit().await.unwrap();

    // assert: the page follows the job to its end by itself
    wait_for_text(client, "[data-job-field=status]", |t| t == "Done").await;
    eventually("the progress bar to be full", WAIT, || async {
        match progress(client).await {
            (value, max) if value == max => Ok(()),
            other => Err(format!("(value, max) = {other:?}")),
        }
    })
    .await;
    assert_eq!(progress(client).await, (31.0, 31.0));
    assert_eq!(
        client
            .find(Locator::Css("[data-job-field=delivered]"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "31"
    );
    assert!(
        !running_note_shown(client).await,
        "the \"updates by itself\" note is gone once the job is done"
    );
    assert!(
        !client
            .find(Locator::Css("[data-job-field=stalled]"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap(),
        "no stall notice once done"
    );
    // the heading and the live region follow the status
    wait_for_text(client, "h1", |t| t.ends_with(" sent")).await;
    let said = client
        .find(Locator::Css("[data-job-field=said]"))
        .await
        .unwrap()
        .prop("textContent")
        .await
        .unwrap()
        .unwrap_or_default();
    assert_eq!(said, "Broadcast sent to 31 users.");
    assert_same_page(client, &url_before).await;

    // assert: everyone has it, once
    for user in everyone {
        assert_eq!(served.inbox_texts(user).await, [text], "user {user:?}");
    }

    served.stop().await;
}

/// The keyboard alone: Tab reaches the first "Mark read", Enter marks it read, focus lands
/// on the next message's button and the live region names the message; "Mark all read"
/// then leaves focus on the page's heading and the empty list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_read_by_keyboard_moves_focus_to_the_next_message() {
    let Some(session) = Session::start(3).await else {
        return;
    };
    let client = &session.served.client;
    session.login_and_open_inbox().await;
    mark_page_as_loaded(client).await;

    // the skip link comes first
    press(client, Key::Tab).await;
    assert_eq!(
        active(client, "el.textContent.trim()").await,
        "Skip to content"
    );

    // act: Tab until the first message's "Mark read", then Enter
    tab_to_mark_read(client, session.messages[0]).await;
    press(client, Key::Enter).await;

    // assert: focus on the next message's button, the message named, the count down
    let second = session.messages[1];
    eventually("focus on the next message", WAIT, || async {
        let at = active(
            client,
            "el.closest('li') ? el.closest('li').dataset.id + ' ' + el.textContent.trim() : el.tagName",
        )
        .await;
        if at == format!("{second} Mark read") {
            Ok(())
        } else {
            Err(format!("focus is on {at:?}"))
        }
    })
    .await;
    wait_for_unread_count(client, "2").await;
    let said = wait_for_text(client, "div.messages .sr-note", |t| {
        t.contains("Marked read")
    })
    .await;
    // quoted and isolated, as the notice of a plain button
    assert_eq!(
        said,
        "Marked read: \u{201c}\u{2068}Stored message 1 for the browser\u{2069}\u{201d}."
    );
    assert_eq!(session.inbox_ids().await, session.messages[1..]);

    // act: Shift+Tab back to "Mark all read", Enter
    let mut tabs = 0;
    while active(client, "el.textContent.trim()").await != "Mark all read" {
        tabs += 1;
        assert!(tabs < 40, "Shift+Tab never reached \"Mark all read\"");
        press_with_shift(client, Key::Tab).await;
    }
    press(client, Key::Enter).await;

    // assert: focus on the heading, the list says it is empty, the count is 0, same page
    eventually("focus on the page heading", WAIT, || async {
        let at = active(client, "el.tagName + ' ' + el.textContent.trim()").await;
        if at == "H1 Inbox" {
            Ok(())
        } else {
            Err(format!("focus is on {at:?}"))
        }
    })
    .await;
    wait_for_unread_count(client, "0").await;
    wait_for_text(client, "div.messages .sr-note", |t| {
        t == "All 2 messages marked read."
    })
    .await;
    wait_for_text(client, "ul.stored-messages-inbox li.empty", |t| {
        t == "No unread messages."
    })
    .await;
    assert!(session.inbox_ids().await.is_empty());
    let url = client.current_url().await.unwrap();
    assert_same_page(client, &url).await;

    session.stop().await;
}

/// axe-core (from npm, see `.ci/run`) on every page and state of the reference app, at 390
/// and 1280 px wide: no violation of WCAG 2.1 A/AA or of axe's best practices. With
/// `STORED_MESSAGES_SCREENSHOTS=DIR`, it also saves a screenshot of each state and width.
/// Without JavaScript, a "Mark read" button is a plain form: the page it returns to opens
/// on its message area, with focus on the notice that says what the button did (a screen
/// reader reads it), and the next Tab goes on to the list rather than to the top of the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_javascript_mark_read_returns_focus_to_its_notice() {
    let Some(session) = Session::start_with(2, &["--blink-settings=scriptEnabled=false"]).await
    else {
        return;
    };
    let client = &session.served.client;
    session.login_and_open_inbox().await;

    // act: Tab to the first message's "Mark read", then Enter
    tab_to_mark_read(client, session.messages[0]).await;
    press(client, Key::Enter).await;

    // assert: back on the inbox, at its notice, with focus there
    eventually("the button to come back to its notice", WAIT, || async {
        let url = client.current_url().await.map_err(|e| e.to_string())?;
        if url.path() == "/inbox" && url.fragment() == Some("stored-messages") {
            Ok(())
        } else {
            Err(format!("the browser is at {url}"))
        }
    })
    .await;
    assert_focus(client, "#stored-messages", "the message area").await;
    let notice = wait_for_text(client, "#stored-messages", |t| t.contains("Marked read")).await;
    assert_eq!(
        notice,
        "Success\nMarked read: \u{201c}\u{2068}Stored message 1 for the browser\u{2069}\u{201d}."
    );
    assert_eq!(session.inbox_ids().await, session.messages[1..]);
    press(client, Key::Tab).await;
    assert_eq!(
        active(client, "el.textContent.trim()").await,
        "Mark all read",
        "the next Tab goes on to the list"
    );
    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_and_state_passes_axe_at_two_widths() {
    let Some(axe) = axe_source() else {
        return;
    };
    let Some(tools) = browser_tools() else {
        return;
    };
    let Some(app) = TestApp::sqlite().await else {
        return;
    };
    // arrange: an admin, alice with messages (one long, one linked), and two more users
    app.user("root", true).await;
    let alice = app.user("alice", false).await.user_id();
    app.user("bob", false).await;
    app.user("carol", false).await;
    let figment = test_figment(&app.url).merge(("admin.background_threshold", 2));
    let served = Served::start(tools, figment).await;
    let client = &served.client;
    let long = format!(
        "A long message: {}",
        "all work and no play makes a dull day. ".repeat(30)
    );
    let texts = [
        (
            "Your export is ready",
            Level::STORED_SUCCESS,
            Some("/archive"),
        ),
        (
            "Disk 91% full on the build server",
            Level::STORED_WARNING,
            None,
        ),
        (long.as_str(), Level::STORED_INFO, None),
        ("Payment failed: card expired", Level::STORED_ERROR, None),
    ];
    let mut last = MessageId(0);
    for (text, level, url) in texts {
        let message = NewMessage::parse(level, text, "", url, None).unwrap();
        last = served
            .store
            .add_message_for(&[alice], message)
            .await
            .unwrap()
            .message
            .id;
    }
    let mut audit = Audit {
        client,
        axe: &axe,
        shots: std::env::var_os("STORED_MESSAGES_SCREENSHOTS").map(PathBuf::from),
        checked: Vec::new(),
        violations: Vec::new(),
    };

    // anonymous
    served.goto("/").await;
    audit.check("home, anonymous").await;
    served.goto("/login").await;
    audit.check("login").await;
    type_into(client, "#username", "alice").await;
    type_into(client, "#password", "not-her-password").await;
    click(client, "form.card button[type=submit]").await;
    wait_for_text(client, ".form-error", |t| !t.is_empty()).await;
    assert_focus(client, "#login-error", "the login error").await;
    audit.check("login, wrong password").await;
    served.goto("/no/such/page").await;
    audit.check("404 page").await;
    // the harness sees a violation when there is one: an image without a text alternative
    client
        .execute(
            "document.querySelector('main').appendChild(document.createElement('img'));",
            vec![],
        )
        .await
        .unwrap();
    let found = run_axe(client, &axe).await;
    assert!(
        found.iter().any(|v| v.starts_with("image-alt")),
        "axe reports a planted image without alt: {found:?}"
    );

    // alice
    served.log_in("alice", "/inbox").await;
    audit.check("inbox, four unread").await;
    // a long message arrives live: shortened like the server's, with its button
    let live = format!(
        "Arrived live: {}",
        "long enough to be shortened. ".repeat(12)
    );
    let message = NewMessage::new(Level::STORED_INFO, &live).unwrap();
    served
        .store
        .add_message_for(&[alice], message)
        .await
        .unwrap();
    eventually("the live message to be shortened", WAIT, || async {
        let n = client
            .find_all(Locator::Css(
                "ul.stored-messages-inbox li.message details.long",
            ))
            .await
            .map_err(|e| e.to_string())?
            .len();
        if n == 2 {
            Ok(())
        } else {
            Err(format!("{n} shortened"))
        }
    })
    .await;
    let item = wait_for_text(
        client,
        "ul.stored-messages-inbox li.message:last-child",
        |t| t.contains("Arrived live") && t.contains("Show more"),
    )
    .await;
    assert!(item.contains("Mark read"), "{item}");
    audit.check("inbox, a long message arrived live").await;
    served.goto("/archive").await;
    audit.check("archive").await;
    served.goto("/?keep=1").await;
    audit.check("home, stream kept unread").await;
    served.goto("/account").await;
    audit.check("account").await;
    type_into(client, "#current", "not-her-password").await;
    type_into(client, "#new", "short").await;
    type_into(client, "#confirm", "other").await;
    click(client, "form.card button[type=submit]").await;
    wait_for_text(client, ".error-summary", |t| !t.is_empty()).await;
    assert_focus(
        client,
        ".error-summary",
        "the password form's error summary",
    )
    .await;
    audit.check("account, password form with errors").await;
    served.goto("/").await;
    audit.check("home, stream shown and marked read").await;
    served.goto("/").await;
    audit.check("home, nothing new").await;
    type_into(client, "#url", "javascript:alert(1)").await;
    click(client, "form.card button[type=submit]").await;
    wait_for_text(client, ".error-summary", |t| !t.is_empty()).await;
    assert_focus(client, ".error-summary", "the demo form's error summary").await;
    audit.check("home, demo form with errors").await;
    served.goto("/inbox").await;
    audit.check("inbox, empty").await;
    served.log_out().await;
    audit.check("login, after logout").await;

    // the admin
    served.log_in("root", "/admin").await;
    audit.check("admin overview").await;
    served.goto("/admin/broadcast").await;
    audit.check("broadcast form").await;
    click(client, "button[name=action][value=send]").await;
    wait_for_text(client, ".error-summary", |t| !t.is_empty()).await;
    assert_focus(client, ".error-summary", "the broadcast's error summary").await;
    audit.check("broadcast form with errors").await;
    click(client, "input[name=recipients][value=list]").await;
    type_into(client, "#usernames", "alice, bob").await;
    type_into(client, "#message", "Maintenance tonight at 22:00").await;
    click(client, "button[name=action][value=preview]").await;
    wait_for_text(client, "section.preview li.message", |t| {
        t.contains("Maintenance")
    })
    .await;
    assert_focus(client, "section.preview", "the preview").await;
    audit.check("broadcast preview").await;
    served.goto("/admin/broadcast").await;
    click(client, "input[name=recipients][value=everyone]").await;
    type_into(client, "#message", "New terms of service from Monday").await;
    click(client, "button[name=action][value=send]").await;
    wait_for_text(client, "#confirm-title", |t| t.contains("4 users")).await;
    assert_focus(
        client,
        "section.confirm button[value=send]",
        "the confirmation's button",
    )
    .await;
    audit.check("broadcast confirmation").await;
    click(client, "section.confirm button[name=action][value=send]").await;
    served
        .wait_for_location("the job page", |at| at.starts_with("/admin/jobs/"))
        .await;
    wait_for_text(client, "[data-job-field=status]", |t| t == "Done").await;
    audit.check("job page, done").await;
    // the same job as if it had failed (the worker leaves a done job alone)
    let job_path = served
        .wait_for_location("the job page", |at| at.starts_with("/admin/jobs/"))
        .await;
    let job_id: i64 = job_path.trim_start_matches("/admin/jobs/").parse().unwrap();
    if let stored_messages::SqlPool::Sqlite(pool) = app.users.pool() {
        sqlx::query("update app_broadcast_jobs set status = 'failed', error = 'disk I/O error' where id = $1")
            .bind(job_id)
            .execute(pool)
            .await
            .unwrap();
    }
    client.refresh().await.unwrap();
    wait_for_text(client, "h1", |t| t.ends_with("stopped")).await;
    audit.check("job page, failed").await;
    if let stored_messages::SqlPool::Sqlite(pool) = app.users.pool() {
        sqlx::query("update app_broadcast_jobs set status = 'done', error = null where id = $1")
            .bind(job_id)
            .execute(pool)
            .await
            .unwrap();
    }
    served.goto("/admin").await;
    let row = wait_for_text(client, "table tbody tr", |t| {
        t.contains("New terms of service")
    })
    .await;
    assert!(row.contains("Done") && row.contains("4 of 4"), "{row}");
    audit
        .check("admin overview, with a background broadcast")
        .await;
    served.goto("/admin/jobs").await;
    audit.check("background broadcasts").await;
    served.goto("/admin/messages").await;
    audit.check("messages browser").await;
    type_into(client, "#q", "terms").await;
    click(client, "form.search button[type=submit]").await;
    wait_for_text(client, "form.search + p", |t| {
        t.contains("1 message matches")
    })
    .await;
    audit.check("messages browser, search").await;
    served.goto("/admin/messages?recipient=nobody").await;
    assert_focus(client, "#recipient", "the recipient field").await;
    audit.check("messages browser, unknown recipient").await;
    served.goto("/admin/audit").await;
    audit.check("audit").await;
    served
        .goto(&format!("/admin/messages/{}/delete", last.0))
        .await;
    audit.check("delete confirmation").await;
    served.goto("/admin/jobs/999999").await;
    audit.check("404 page, admin").await;

    println!(
        "axe checked {} states at 390 and 1280 px:\n  {}",
        audit.checked.len(),
        audit.checked.join("\n  ")
    );
    assert!(
        audit.violations.is_empty(),
        "axe found violations:\n{}",
        audit.violations.join("\n")
    );
    served.stop().await;
}

/// What axe checked and found in one run of [`every_page_and_state_passes_axe_at_two_widths`].
struct Audit<'a> {
    client: &'a Client,
    axe: &'a str,
    shots: Option<PathBuf>,
    checked: Vec<String>,
    violations: Vec<String>,
}

impl Audit<'_> {
    /// Runs axe on the page as it is now, at each width (resizing does not reload it), and
    /// checks that it fits 320 px, the narrowest width it must fit.
    async fn check(&mut self, state: &str) {
        self.client.set_window_size(320, 1000).await.unwrap();
        self.shoot(state, 320).await;
        for width in [390, 1280] {
            self.client.set_window_size(width, 1000).await.unwrap();
            let found = run_axe(self.client, self.axe).await;
            for v in found {
                self.violations.push(format!("{state} at {width} px: {v}"));
            }
            self.shoot(state, width).await;
        }
        self.checked.push(state.to_string());
    }

    /// Checks that the page does not scroll sideways at this width, and takes a screenshot
    /// when screenshots are asked for.
    async fn shoot(&mut self, state: &str, width: u32) {
        if let Some(dir) = &self.shots {
            std::fs::create_dir_all(dir).unwrap();
            let name: String = state
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(dir.join(format!("{name}-{width}.png")), png).unwrap();
        }
        let wider = self
            .client
            .execute(
                "return document.documentElement.scrollWidth > document.documentElement.clientWidth;",
                vec![],
            )
            .await
            .unwrap();
        if wider == json!(true) {
            self.violations
                .push(format!("{state} at {width} px: the page scrolls sideways"));
        }
    }
}

/// The WCAG 2.1 A/AA rules and axe's best practices.
const AXE_TAGS: &[&str] = &["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"];

/// axe-core's script: `node_modules/axe-core/axe.min.js` at the workspace root, where
/// `.ci/run` installs it (`npm install axe-core@4`), or the file `AXE_CORE_JS` names. `None`
/// after one line when it is missing (a failure when services are required).
fn axe_source() -> Option<String> {
    let path = std::env::var_os("AXE_CORE_JS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../node_modules/axe-core/axe.min.js"
            ))
        });
    let source = std::fs::read_to_string(&path).ok();
    let name = format!(
        "axe-core at {} (npm install --no-save axe-core@4, as .ci/run does)",
        path.display()
    );
    if !service_available(&name, source.is_some()) {
        return None;
    }
    source
}

/// Runs axe on the current page (injecting it first when the page does not have it) and
/// returns one line per violation: rule, impact, help and up to five of its nodes.
async fn run_axe(client: &Client, axe: &str) -> Vec<String> {
    let loaded = client
        .execute("return typeof window.axe === 'object';", vec![])
        .await
        .unwrap();
    if loaded != json!(true) {
        client
            .execute(&format!("{axe}\n;return true;"), vec![])
            .await
            .expect("axe-core loads");
    }
    let result = client
        .execute_async(
            r#"
            var done = arguments[arguments.length - 1];
            axe.run(document, { runOnly: { type: "tag", values: arguments[0] }, resultTypes: ["violations"] })
              .then(function (r) {
                done(r.violations.map(function (v) {
                  return v.id + " (" + v.impact + "): " + v.help + " — " + v.nodes.slice(0, 5).map(function (n) {
                    return n.target.join(" ") + " [" + (n.failureSummary || "").replace(/\s+/g, " ") + "]";
                  }).join("; ");
                }));
              }, function (e) { done(["axe failed: " + e]); });
            "#,
            vec![json!(AXE_TAGS)],
        )
        .await
        .expect("axe runs");
    serde_json::from_value(result).expect("a list of violations")
}

/// Waits until the element `css` finds has focus (a page that takes it there on load).
async fn assert_focus(client: &Client, css: &str, what: &str) {
    eventually(&format!("focus on {what}"), WAIT, || async {
        let focused = client
            .execute(
                "return document.activeElement === document.querySelector(arguments[0]);",
                vec![json!(css)],
            )
            .await
            .map_err(|e| e.to_string())?;
        if focused == json!(true) {
            Ok(())
        } else {
            Err(active(client, "el.outerHTML.slice(0, 120)").await)
        }
    })
    .await;
}

/// Presses Tab until focus is on the "Mark read" button of message `id`.
async fn tab_to_mark_read(client: &Client, id: MessageId) {
    let mut tabs = 0;
    while active(
        client,
        "el.closest('li') ? el.closest('li').dataset.id + ' ' + el.textContent.trim() : ''",
    )
    .await
        != format!("{id} Mark read")
    {
        tabs += 1;
        assert!(
            tabs < 40,
            "Tab never reached the \"Mark read\" of message {id}"
        );
        press(client, Key::Tab).await;
    }
}

/// Evaluates `expression` with `el` the focused element.
async fn active(client: &Client, expression: &str) -> String {
    let value = client
        .execute(
            &format!("var el = document.activeElement; return String({expression});"),
            vec![],
        )
        .await
        .unwrap();
    value.as_str().unwrap_or_default().to_string()
}

/// Presses and releases `key`, as a keyboard does (on whatever has focus).
async fn press(client: &Client, key: Key) {
    let keys = KeyActions::new("keyboard".into())
        .then(KeyAction::Down {
            value: char::from(key),
        })
        .then(KeyAction::Up {
            value: char::from(key),
        });
    client.perform_actions(keys).await.unwrap();
}

/// Shift + `key`.
async fn press_with_shift(client: &Client, key: Key) {
    let keys = KeyActions::new("keyboard".into())
        .then(KeyAction::Down {
            value: char::from(Key::Shift),
        })
        .then(KeyAction::Down {
            value: char::from(key),
        })
        .then(KeyAction::Up {
            value: char::from(key),
        })
        .then(KeyAction::Up {
            value: char::from(Key::Shift),
        });
    client.perform_actions(keys).await.unwrap();
}

/// The reference app served on a port of its own, and a WebDriver session on a fresh
/// Chromium pointed at it.
struct Served {
    client: Client,
    /// `http://127.0.0.1:PORT`.
    base: String,
    /// The running app's store, to look at the backend behind the pages.
    store: Store,
    processes: Processes,
}

impl Served {
    /// Serves the app built from `figment` (a test figment: its database, its settings; the
    /// port and shutdown settings are added here), starts chromedriver and opens a session.
    async fn start(tools: BrowserTools, figment: Figment) -> Served {
        Served::start_with(tools, figment, &[]).await
    }

    /// As [`Served::start`], with more Chromium flags (`--blink-settings=scriptEnabled=false`
    /// for a browser without JavaScript).
    async fn start_with(tools: BrowserTools, figment: Figment, flags: &[&str]) -> Served {
        // the server, on a port the OS picks and liftoff reports
        let (port_tx, port_rx) = oneshot::channel();
        let figment = figment
            .merge(("port", 0))
            .merge(("shutdown.ctrlc", false))
            .merge(("shutdown.signals", Vec::<String>::new()))
            .merge(("shutdown.grace", 1))
            .merge(("shutdown.mercy", 1));
        let rocket = stored_messages_app::rocket_from(figment)
            .attach(AdHoc::on_liftoff("report the port", move |rocket| {
                let port = rocket.config().port;
                Box::pin(async move {
                    let _ = port_tx.send(port);
                })
            }))
            .ignite()
            .await
            .expect("the app ignites");
        let store = rocket.state::<Store>().expect("store is managed").clone();
        let mut processes = Processes {
            shutdown: Some(rocket.shutdown()),
            server: Some(rocket::tokio::spawn(rocket.launch())),
            chromedriver: None,
            driver_port: 0,
            session_id: None,
            profile: tempfile::tempdir().unwrap(),
        };
        let port = timeout(STARTUP, port_rx)
            .await
            .expect("the server lifts off in time")
            .expect("the server lifts off");
        let base = format!("http://127.0.0.1:{port}");
        eventually("the app to answer /health", STARTUP, || async {
            http_get(port, "/health")
                .await
                .filter(|(status, _)| *status == 200)
                .ok_or("no answer yet")
        })
        .await;

        // chromedriver, on a port that was free a moment ago
        let driver_port = free_port();
        processes.driver_port = driver_port;
        let child = Command::new(&tools.chromedriver)
            .arg(format!("--port={driver_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tools.chromedriver.display()));
        processes.chromedriver = Some(child);
        eventually("chromedriver to be ready", STARTUP, || {
            if let Some(Ok(Some(status))) = processes.chromedriver.as_mut().map(Child::try_wait) {
                panic!("chromedriver exited early with {status}");
            }
            async {
                http_get(driver_port, "/status")
                    .await
                    .filter(|(status, body)| *status == 200 && body.contains("\"ready\":true"))
                    .ok_or("not ready yet")
            }
        })
        .await;

        // a Chromium with a fresh profile
        let mut args: Vec<String> = CHROMIUM_FLAGS
            .iter()
            .chain(flags)
            .map(|f| f.to_string())
            .collect();
        // More flags for a look at the pages, e.g. `--force-dark-mode` (dark colour scheme).
        if let Ok(extra) = std::env::var("STORED_MESSAGES_CHROMIUM_FLAGS") {
            args.extend(extra.split_whitespace().map(str::to_string));
        }
        args.push(format!(
            "--user-data-dir={}",
            processes.profile.path().display()
        ));
        let mut capabilities = Capabilities::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": tools.chromium, "args": args }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = timeout(
            STARTUP,
            ClientBuilder::new(connector)
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{driver_port}")),
        )
        .await
        .expect("chromedriver opens a session in time")
        .expect("chromedriver opens a session");
        processes.session_id = client.session_id().await.unwrap();
        client
            .update_timeouts(TimeoutConfiguration::new(
                Some(WAIT),
                Some(STARTUP),
                Some(Duration::ZERO),
            ))
            .await
            .unwrap();

        Served {
            client,
            base,
            store,
            processes,
        }
    }

    /// Opens `path` of the app.
    async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("opening {path}: {e}"));
    }

    /// Logs in as `username` (password "horse-battery-9") through the login form, asked to come
    /// back to `next` (a path with its query), and waits until the browser is there.
    async fn log_in(&self, username: &str, next: &str) {
        let client = &self.client;
        self.goto(&format!("/login?next={}", urlencode(next))).await;
        client
            .find(Locator::Id("username"))
            .await
            .unwrap()
            .send_keys(username)
            .await
            .unwrap();
        client
            .find(Locator::Id("password"))
            .await
            .unwrap()
            .send_keys("horse-battery-9")
            .await
            .unwrap();
        client
            .find(Locator::Css("form.card button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        self.wait_for_location(&format!("the login of {username} to go to {next}"), |at| {
            at == next
        })
        .await;
        let logout = client
            .find(Locator::Css("header.site form button"))
            .await
            .expect("a logout button once logged in");
        assert_eq!(logout.text().await.unwrap(), format!("Log out {username}"));
    }

    /// Logs out with the header's button and waits for the login page.
    async fn log_out(&self) {
        self.client
            .find(Locator::Css("header.site form[action=\"/logout\"] button"))
            .await
            .expect("a logout button in the header")
            .click()
            .await
            .unwrap();
        self.wait_for_location("the logout to land on /login", |at| at == "/login")
            .await;
        wait_for_text(&self.client, "div.messages", |text| {
            text.contains("You are logged out.")
        })
        .await;
    }

    /// Waits until the browser's path and query (`/a/b?c=d`) satisfy `arrived`; returns them.
    async fn wait_for_location(&self, what: &str, arrived: impl Fn(&str) -> bool) -> String {
        eventually(what, WAIT, || async {
            let url = self.client.current_url().await.map_err(|e| e.to_string())?;
            let at = url[url::Position::BeforePath..url::Position::AfterQuery].to_string();
            if arrived(&at) {
                Ok(at)
            } else {
                Err(format!("the browser is at {at}"))
            }
        })
        .await
    }

    /// The inbox of `user` in the backend, as message texts.
    async fn inbox_texts(&self, user: UserId) -> Vec<String> {
        self.store
            .backend()
            .inbox_list(user, ListQuery::ALL)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.message)
            .collect()
    }

    /// Ends the WebDriver session (Chromium quits), stops chromedriver and the server, and
    /// checks the server really ended.
    async fn stop(mut self) {
        self.client.close().await.expect("the browser session ends");
        self.processes.session_id = None;
        let server = self.processes.server.take();
        drop(self.processes);
        if let Some(server) = server {
            timeout(STARTUP, server)
                .await
                .expect("the server stops in time")
                .expect("the server task did not panic")
                .expect("the server shut down cleanly");
        }
    }
}

/// The served app with one logged-in-able user (`alice`) who has stored messages.
struct Session {
    served: Served,
    user: UserId,
    /// The user's stored messages, oldest first.
    messages: Vec<MessageId>,
    /// Owns the database directory; dropped after the server is told to stop.
    _app: TestApp,
}

impl Session {
    /// Starts everything, or `None` (after one line) when the browser tools are missing.
    async fn start(message_count: usize) -> Option<Session> {
        Session::start_with(message_count, &[]).await
    }

    /// As [`Session::start`], with more Chromium flags.
    async fn start_with(message_count: usize, flags: &[&str]) -> Option<Session> {
        Session::start_from(message_count, flags, |figment| figment).await
    }

    /// As [`Session::start`], with live streams served by the stream listener.
    async fn start_listener(message_count: usize) -> Option<Session> {
        Session::start_from(message_count, &[], |figment| {
            figment.merge(("stored_messages.stream_address", "127.0.0.1:0"))
        })
        .await
    }

    async fn start_from(
        message_count: usize,
        flags: &[&str],
        configure: impl FnOnce(Figment) -> Figment,
    ) -> Option<Session> {
        let tools = browser_tools()?;

        // the app's database, with the user in it before launch (so no first admin is made)
        let app = TestApp::sqlite().await?;
        let user = app.user("alice", false).await.user_id();
        let figment = configure(test_figment(&app.url));
        let served = Served::start_with(tools, figment, flags).await;

        // the user's messages
        let mut messages = Vec::new();
        for i in 1..=message_count {
            let text = format!("Stored message {i} for the browser");
            let delivery = served
                .store
                .add_message_for(&[user], NewMessage::new(Level::STORED_INFO, &text).unwrap())
                .await
                .unwrap();
            messages.push(delivery.message.id);
        }

        Some(Session {
            served,
            user,
            messages,
            _app: app,
        })
    }

    /// Logs in through the form and lands on the inbox page, which lists the unread
    /// messages with their buttons and marks nothing read by showing them.
    async fn login_and_open_inbox(&self) {
        self.served.log_in("alice", "/inbox").await;
    }

    async fn inbox_ids(&self) -> Vec<MessageId> {
        self.served
            .store
            .backend()
            .inbox_list(self.user, ListQuery::ALL)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect()
    }

    async fn archive_len(&self) -> usize {
        self.served
            .store
            .backend()
            .archive_list(self.user, ListQuery::ALL)
            .await
            .unwrap()
            .len()
    }

    async fn stop(self) {
        self.served.stop().await;
    }
}

/// What the browser tests start, stopped on drop, so also when an assertion fails.
struct Processes {
    shutdown: Option<rocket::Shutdown>,
    server: Option<JoinHandle<Result<rocket::Rocket<rocket::Ignite>, rocket::Error>>>,
    chromedriver: Option<Child>,
    driver_port: u16,
    session_id: Option<String>,
    profile: tempfile::TempDir,
}

impl Drop for Processes {
    fn drop(&mut self) {
        // A session still open means the test failed before `stop`: end it the blocking way
        // (the runtime may be unwinding) so chromedriver quits Chromium before it goes itself.
        if let Some(id) = self.session_id.take() {
            delete_session(self.driver_port, &id);
        }
        if let Some(mut driver) = self.chromedriver.take() {
            let _ = driver.kill();
            let _ = driver.wait();
        }
        if let Some(shutdown) = self.shutdown.take() {
            shutdown.notify();
        }
    }
}

/// Where the browser programs are.
struct BrowserTools {
    chromium: PathBuf,
    chromedriver: PathBuf,
}

/// `chromium` and `chromedriver` from PATH, or `None` after the skip line (or a panic
/// naming what is missing when services are required).
fn browser_tools() -> Option<BrowserTools> {
    let chromium = on_path("chromium");
    let chromedriver = on_path("chromedriver");
    let missing: Vec<&str> = [("chromium", &chromium), ("chromedriver", &chromedriver)]
        .into_iter()
        .filter(|(_, found)| found.is_none())
        .map(|(name, _)| name)
        .collect();
    let name = format!(
        "{} on PATH (Debian packages chromium, chromium-driver)",
        missing.join(" and ")
    );
    if !service_available(&name, missing.is_empty()) {
        return None;
    }
    Some(BrowserTools {
        chromium: chromium?,
        chromedriver: chromedriver?,
    })
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// A port nobody listened on a moment ago (chromedriver needs a number up front).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free local port")
        .port()
}

/// A plain GET on 127.0.0.1: the status and the body, or `None` if nothing answers. HTTP/1.1,
/// because chromedriver refuses 1.0 requests.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        let mut chunk = [0; 4096];
        loop {
            let read = stream.read(&mut chunk).await.ok()?;
            response.extend_from_slice(&chunk[..read]);
            if let Some(complete) = complete_response(&response) {
                return Some(complete);
            }
            if read == 0 {
                return None;
            }
        }
    };
    timeout(Duration::from_secs(2), exchange).await.ok()?
}

/// The status and body of `bytes` once they hold a whole response, by its `Content-Length`
/// (chromedriver answers `Connection: close` and still keeps the connection open).
fn complete_response(bytes: &[u8]) -> Option<(u16, String)> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..head_end]);
    let body = &bytes[head_end + 4..];
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let length: usize = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            value.trim().parse().ok()
        } else {
            None
        }
    })?;
    (body.len() >= length).then(|| (status, String::from_utf8_lossy(body).into_owned()))
}

/// Ends a WebDriver session without a runtime (from `Drop`); errors are moot by then.
fn delete_session(port: u16, id: &str) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(WAIT));
    let _ = stream.set_write_timeout(Some(WAIT));
    let request = format!(
        "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return;
    }
    // Wait for the answer: chromedriver answers once Chromium has quit.
    let mut response = Vec::new();
    let mut chunk = [0; 4096];
    while let Ok(read @ 1..) = stream.read(&mut chunk) {
        response.extend_from_slice(&chunk[..read]);
        if complete_response(&response).is_some() {
            break;
        }
    }
}

/// Polls `check` until it succeeds, or fails the test after `limit` with the last reason.
async fn eventually<T, E, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(reason) if Instant::now() >= deadline => {
                panic!("gave up waiting {limit:?} for {what}: {reason}")
            }
            Err(_) => sleep(POLL).await,
        }
    }
}

/// The text of the header's unread count, if the page has one.
async fn unread_count_text(client: &Client) -> Option<String> {
    let count = client
        .find(Locator::Css("[data-unread-count]"))
        .await
        .ok()?;
    Some(count.text().await.ok()?.trim().to_string())
}

async fn wait_for_unread_count(client: &Client, expected: &str) {
    eventually(
        &format!("the unread count to show {expected}"),
        WAIT,
        || async {
            match unread_count_text(client).await {
                Some(text) if text == expected => Ok(()),
                other => Err(format!("it shows {other:?}")),
            }
        },
    )
    .await;
}

/// Leaves a mark in the page's JavaScript state; any page load wipes it.
async fn mark_page_as_loaded(client: &Client) {
    client
        .execute("window.storedMessagesTestMark = true;", vec![])
        .await
        .unwrap();
}

/// The page was not reloaded or left since [`mark_page_as_loaded`].
async fn assert_same_page(client: &Client, url_before: &url::Url) {
    let mark = client
        .execute("return window.storedMessagesTestMark === true;", vec![])
        .await
        .unwrap();
    assert_eq!(mark, json!(true), "the page was reloaded");
    assert_eq!(&client.current_url().await.unwrap(), url_before);
}

/// Clicks the element `css` finds.
async fn click(client: &Client, css: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
}

/// Types `text` into the field `css` finds.
async fn type_into(client: &Client, css: &str, text: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .send_keys(text)
        .await
        .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
}

/// The current value of the form field `css` finds.
async fn field_value(client: &Client, css: &str) -> String {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default()
}

/// Waits until the element `css` finds has a text that satisfies `wanted`; returns it.
async fn wait_for_text(client: &Client, css: &str, wanted: impl Fn(&str) -> bool) -> String {
    eventually(&format!("the text of {css}"), WAIT, || async {
        let element = client
            .find(Locator::Css(css))
            .await
            .map_err(|_| "not on the page".to_string())?;
        let text = element.text().await.map_err(|e| e.to_string())?;
        if wanted(text.trim()) {
            Ok(text.trim().to_string())
        } else {
            Err(format!("it says {text:?}"))
        }
    })
    .await
}

/// The texts of the merged stream's messages on the current page (once it has loaded).
async fn stream_texts(client: &Client) -> Vec<String> {
    client
        .find(Locator::Css("div.messages"))
        .await
        .expect("the page has the merged stream");
    let mut texts = Vec::new();
    for item in client
        .find_all(Locator::Css("div.messages li.message"))
        .await
        .unwrap()
    {
        texts.push(item.text().await.unwrap());
    }
    texts
}

/// The job page's progress bar: `(value, max)`, as the browser has them now.
async fn progress(client: &Client) -> (f64, f64) {
    let pair = client
        .execute(
            "var bar = document.querySelector('progress'); return [bar.value, bar.max];",
            vec![],
        )
        .await
        .unwrap();
    let number = |i: usize| pair[i].as_f64().unwrap_or(f64::NAN);
    (number(0), number(1))
}

/// Whether the job page shows its "updates by itself while the broadcast runs" note.
async fn running_note_shown(client: &Client) -> bool {
    client
        .find(Locator::Css("[data-job-while-running]"))
        .await
        .expect("the job page has the note")
        .is_displayed()
        .await
        .unwrap()
}
