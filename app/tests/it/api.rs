//! The JSON API under /messages, on every backend: the original's REST tests plus ownership,
//! pagination under concurrent writes, bad ids, CSRF and the error shape.

use std::collections::BTreeSet;

use rocket::http::{ContentType, Header, Status};
use rocket::serde::json::Value;
use stored_messages::api::{ApiMessage, Page};
use stored_messages::{Level, ListQuery, NewMessage, UserId};

use crate::common::{Browser, TestApp};

app_tests!(
    list_of_two_then_retrieve_then_read_empties_the_list,
    anonymous_requests_get_401_json,
    mark_all_read_says_how_many,
    another_users_unknown_and_malformed_ids_are_404,
    pages_follow_next_without_gaps_while_messages_arrive_and_are_read,
    archive_is_newest_first_and_paginated,
    bad_limits_and_cursors_are_clear_errors,
    posts_without_a_valid_csrf_header_are_403_and_change_nothing,
    rocket_errors_under_messages_have_the_json_shape,
    trailing_slash_is_optional,
    plain_forms_redirect_back,
    a_plain_buttons_notice_is_never_stored,
    count_says_unread,
    a_thousand_streams_opened_and_closed_leave_none_open,
    a_burst_beyond_the_limit_is_one_resync,
    a_page_of_an_ended_session_gets_no_stream_nor_inbox,
    a_session_the_database_cannot_read_is_503_not_anonymous,
    a_stream_that_falls_behind_the_feed_catches_up_exactly,
    a_page_hands_its_inbox_over_to_the_stream,
);

/// Reads a stream until `count` events arrived; their names, in order.
async fn event_names(
    response: &mut rocket::local::asynchronous::LocalResponse<'_>,
    until: &str,
) -> Vec<String> {
    use rocket::tokio::io::AsyncReadExt;
    let mut text = String::new();
    let mut chunk = [0u8; 4096];
    while !text.contains(&format!("event:{until}")) {
        let n = rocket::tokio::time::timeout(
            std::time::Duration::from_secs(10),
            response.read(&mut chunk),
        )
        .await
        .expect("an event in time")
        .unwrap();
        assert!(n > 0, "the stream ended: {text}");
        text.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("event:"))
        .map(str::to_string)
        .collect()
}

/// A page names the inbox it showed (`stored_messages_stream_id()` in the stream's url): a
/// stream opened with it sends only what changed after the page, nothing twice.
async fn a_page_hands_its_inbox_over_to_the_stream(app: &TestApp) {
    let (b, alice) = user(app, "alice").await;
    send(&b, alice, "one").await;
    send(&b, alice, "two").await;
    let (_, page) = b.get_html("/?keep=1").await;
    let url = page
        .split("name=\"stored-messages-stream\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page names its stream")
        .replace("&#x2F;", "/")
        .to_string();
    assert!(
        url.starts_with("/messages/stream?since=") && url.len() > 25,
        "{url}"
    );
    // Nothing changed since the page: the count only.
    let mut stream = b.client.get(url.clone()).dispatch().await;
    assert_eq!(event_names(&mut stream, "count").await, ["count"]);
    drop(stream);
    // A message after the page: replayed, then the count.
    send(&b, alice, "three").await;
    let mut stream = b.client.get(url).dispatch().await;
    assert_eq!(
        event_names(&mut stream, "count").await,
        ["message", "count"]
    );
}

/// Clients that go away free their streams: 1,008 opened (each has read its first event),
/// as many at a time as one user may hold, then dropped; the store counts none open
/// afterwards. One more than a user may hold is refused with 429 and the JSON error.
async fn a_thousand_streams_opened_and_closed_leave_none_open(app: &TestApp) {
    use rocket::tokio::io::AsyncReadExt;
    use stored_messages::live::MAX_STREAMS_PER_USER;
    let (b, _) = user(app, "alice").await;
    let store = TestApp::store(&b).clone();
    let before = store.open_streams();
    for round in 0..1008 / MAX_STREAMS_PER_USER {
        let mut open = Vec::new();
        for _ in 0..MAX_STREAMS_PER_USER {
            let mut response = b.client.get("/messages/stream").dispatch().await;
            assert_eq!(response.status(), Status::Ok);
            let mut first = [0u8; 64];
            let n = response.read(&mut first).await.unwrap();
            assert!(n > 0, "the stream started");
            open.push(response);
        }
        assert_eq!(
            store.open_streams(),
            before + MAX_STREAMS_PER_USER,
            "round {round}"
        );
        if round == 0 {
            let refused = b.client.get("/messages/stream").dispatch().await;
            assert_eq!(refused.status(), Status::TooManyRequests);
            let body: serde_json::Value = refused.into_json().await.unwrap();
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("too many live streams"),
                "{body}"
            );
        }
        drop(open);
        assert_eq!(store.open_streams(), before, "round {round}: all closed");
    }
}

/// A page's stream, and the inbox and count its script reloads, are of the session the page
/// was drawn for (`?session=`): a tab left open across a logout and a new login (here as
/// bob) gets 401 instead of bob's inbox; a page of the new session gets them; without the
/// parameter any session will do.
async fn a_page_of_an_ended_session_gets_no_stream_nor_inbox(app: &TestApp) {
    use stored_messages::live::page_tag;
    let (b, _) = user(app, "alice").await;
    app.user("bob", false).await;
    let page = page_tag(&b.csrf_token().await);
    let mut stream = b
        .client
        .get(format!("/messages/stream?session={page}"))
        .dispatch()
        .await;
    assert_eq!(stream.status(), Status::Ok);
    assert_eq!(event_names(&mut stream, "count").await, ["count"]);
    drop(stream);

    let r = b.post_form("/logout", &[]).await;
    assert_eq!(r.status(), Status::SeeOther);
    b.login_as("bob").await;
    for path in [
        format!("/messages/stream?session={page}"),
        format!("/messages/inbox?limit=100&session={page}"),
        format!("/messages/count?session={page}"),
    ] {
        let r = b.client.get(path.as_str()).dispatch().await;
        assert_eq!(r.status(), Status::Unauthorized, "{path}");
        let body: Value = r.into_json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("reload"),
            "{path}: {body}"
        );
    }

    let fresh = page_tag(&b.csrf_token().await);
    assert_ne!(fresh, page, "a new session, a new token");
    for path in [
        format!("/messages/inbox?limit=100&session={fresh}"),
        format!("/messages/count?session={fresh}"),
        "/messages/inbox".to_string(),
        "/messages/count".to_string(),
    ] {
        let r = b.client.get(path.as_str()).dispatch().await;
        assert_eq!(r.status(), Status::Ok, "{path}");
    }
    let ok = b
        .client
        .get(format!("/messages/stream?session={fresh}"))
        .dispatch()
        .await;
    assert_eq!(ok.status(), Status::Ok);
    drop(ok);
    let plain = b.client.get("/messages/stream").dispatch().await;
    assert_eq!(plain.status(), Status::Ok);
}

/// More new messages at once than a stream sends one by one: `resync` instead (the client
/// reloads from the API); up to the limit, each is sent. (Opening and following share the
/// comparison, so this holds after a burst on an open stream too.)
async fn a_burst_beyond_the_limit_is_one_resync(app: &TestApp) {
    use stored_messages::live::MAX_BURST;
    let (b, alice) = user(app, "alice").await;
    let store = TestApp::store(&b).clone();
    store.changes().wait_live().await;
    let empty = "0-0000000000000000";
    for _ in 0..MAX_BURST {
        send(&b, alice, "one of a burst").await;
    }
    let mut stream = b
        .client
        .get(format!("/messages/stream?since={empty}"))
        .dispatch()
        .await;
    let mut expected = vec!["message"; MAX_BURST];
    expected.push("count");
    assert_eq!(event_names(&mut stream, "count").await, expected);
    drop(stream);
    send(&b, alice, "one too many").await;
    let mut stream = b
        .client
        .get(format!("/messages/stream?since={empty}"))
        .dispatch()
        .await;
    assert_eq!(event_names(&mut stream, "resync").await, ["resync"]);
}

/// A stream whose client reads nothing while more changes pass than the feed keeps for a
/// receiver (4,096), its own among the oldest, still sends exactly what the client lacks
/// once read: it was signalled (a signal waits for it however many changes follow), and
/// it reads the whole inbox. Nothing is dropped silently.
async fn a_stream_that_falls_behind_the_feed_catches_up_exactly(app: &TestApp) {
    let (b, alice) = user(app, "alice").await;
    let bob = app.user("bob", false).await.user_id();
    let store = TestApp::store(&b).clone();
    store.changes().wait_live().await;
    let mut stream = b.client.get("/messages/stream").dispatch().await;
    assert_eq!(event_names(&mut stream, "count").await, ["count"]);
    // Three messages for alice, then 4,200 changes for bob, all reported while nobody reads
    // the stream: the changes that concern alice are older than what the feed keeps.
    let mut expected = Vec::new();
    for round in 0..3 {
        expected.push(send(&b, alice, &format!("alice {round}")).await);
    }
    for round in 0..3 {
        for chunk in 0..14 {
            let sends = (0..100).map(|i| {
                let store = store.clone();
                async move {
                    let text = format!("bob {round} {chunk} {i}");
                    let m = NewMessage::new(Level::STORED_INFO, &text).unwrap();
                    store.add_message_for(&[bob], m).await.unwrap();
                }
            });
            rocket::futures::future::join_all(sends).await;
        }
    }
    assert!(
        store.changes().sync().await,
        "the feed reported every change"
    );
    // The stream catches up: alice's three messages, then the count.
    assert_eq!(
        event_names(&mut stream, "count").await,
        ["message", "message", "message", "count"]
    );
    let (_, inbox) = get_json(&b, "/messages/inbox").await;
    let ids: Vec<&str> = inbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, expected);
}

/// A users database that cannot read a session (its table renamed away, the session cache
/// emptied) is 503 for that browser, never an anonymous visitor: not 401 from the API or the
/// stream (a page's script would take that for a logout), not the login page; and its CSRF
/// cookie is kept (a new one would break its open pages). Once the table is back, the same
/// cookies work again.
async fn a_session_the_database_cannot_read_is_503_not_anonymous(app: &TestApp) {
    use std::sync::Arc;
    use stored_messages::backend::sql::SqlPool;
    use stored_messages::csrf::CSRF_COOKIE;
    let (b, alice) = user(app, "alice").await;
    let csrf = || {
        b.client
            .cookies()
            .get_private(CSRF_COOKIE)
            .map(|c| c.value().to_string())
    };
    assert_eq!(
        b.client.get("/messages/count").dispatch().await.status(),
        Status::Ok
    );
    let before = csrf().expect("a CSRF cookie");
    let rename = |from: &'static str, to: &'static str| async move {
        let sql = format!("alter table {from} rename to {to}");
        match app.users.pool() {
            SqlPool::Sqlite(pool) => sqlx::query(&sql).execute(pool).await.map(|_| ()),
            SqlPool::Postgres(pool) => sqlx::query(&sql).execute(pool).await.map(|_| ()),
        }
        .unwrap();
    };
    rename("app_sessions", "app_sessions_away").await;
    let users = b
        .client
        .rocket()
        .state::<Arc<stored_messages_app::users::Users>>()
        .unwrap();
    if let Some(cache) = users.session_cache() {
        cache.forget_user(alice.0);
    }

    for path in [
        "/messages/inbox",
        "/messages/count",
        "/messages/stream",
        "/inbox",
        "/",
    ] {
        let r = b.client.get(path).dispatch().await;
        assert_eq!(r.status(), Status::ServiceUnavailable, "{path}");
    }
    assert_eq!(
        csrf().as_deref(),
        Some(before.as_str()),
        "the CSRF cookie is kept"
    );
    // Meanwhile a POST changes nothing: a foreign token is still refused, and the browser's
    // own token reaches a handler that cannot tell the user either.
    for (token, status) in [
        ("A".repeat(43), Status::Forbidden),
        (crate::common::token_of(&before), Status::ServiceUnavailable),
    ] {
        let r = b
            .client
            .post("/messages/mark_all_read")
            .header(Header::new("X-CSRF-Token", token))
            .dispatch()
            .await;
        assert_eq!(r.status(), status);
    }

    rename("app_sessions_away", "app_sessions").await;
    let r = b.client.get("/messages/count").dispatch().await;
    assert_eq!(r.status(), Status::Ok);
    assert_eq!(csrf().as_deref(), Some(before.as_str()));
}

async fn user(app: &TestApp, name: &str) -> (Browser, UserId) {
    let id = app.user(name, false).await.user_id();
    let b = app.browser_with(app.rocket()).await;
    b.login_as(name).await;
    (b, id)
}

async fn send(b: &Browser, to: UserId, text: &str) -> String {
    let m = NewMessage::parse(Level::STORED_WARNING, text, "t1", Some("/go"), None).unwrap();
    TestApp::store(b)
        .add_message_for(&[to], m)
        .await
        .unwrap()
        .message
        .id
        .to_string()
}

async fn get_json(b: &Browser, path: &str) -> (Status, Value) {
    let r = b
        .client
        .get(path.to_string())
        .header(ContentType::JSON)
        .dispatch()
        .await;
    let status = r.status();
    assert_eq!(
        r.content_type(),
        Some(ContentType::JSON),
        "{path} answers JSON"
    );
    (status, r.into_json().await.unwrap_or(Value::Null))
}

async fn post_json(b: &Browser, path: &str) -> (Status, Value) {
    let token = b.csrf_token().await;
    let r = b
        .client
        .post(path.to_string())
        .header(Header::new("X-CSRF-Token", token))
        .dispatch()
        .await;
    let status = r.status();
    assert_eq!(
        r.content_type(),
        Some(ContentType::JSON),
        "{path} answers JSON"
    );
    (status, r.into_json().await.unwrap_or(Value::Null))
}

fn assert_error(body: &Value, status: Status) {
    assert_eq!(body["error"]["status"], status.code, "{body}");
    assert!(
        body["error"]["code"].is_string() && body["error"]["message"].is_string(),
        "{body}"
    );
}

async fn list_of_two_then_retrieve_then_read_empties_the_list(app: &TestApp) {
    let (b, alice) = user(app, "alice").await;
    let first = send(&b, alice, "first ❤").await;
    send(&b, alice, "second").await;
    let (status, body) = get_json(&b, "/messages/inbox").await;
    assert_eq!(status, Status::Ok);
    let page: Page = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(page.messages.len(), 2);
    assert!(page.next.is_none() && page.next_cursor.is_none());
    let m: &ApiMessage = &page.messages[0];
    assert_eq!(
        (m.id.to_string(), m.message.as_str(), m.level),
        (first.clone(), "first ❤", 31)
    );
    assert_eq!(
        (m.level_tag.as_str(), m.tags.as_str(), m.extra_tags.as_str()),
        ("stored warning", "t1 stored warning", "t1")
    );
    assert_eq!(m.url.as_deref(), Some("/go"));
    assert!(body["messages"][0]["id"].is_string(), "ids are strings");
    assert!(
        m.date.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(&m.date).is_ok(),
        "{}",
        m.date
    );
    // retrieve
    let (status, one) = get_json(&b, &format!("/messages/inbox/{first}")).await;
    assert_eq!(status, Status::Ok);
    assert_eq!(one["message"], "first ❤");
    // mark read, then the list has one
    let (status, body) = post_json(&b, &format!("/messages/inbox/{first}/read")).await;
    assert_eq!(status, Status::Ok);
    assert_eq!(body["read"], true);
    assert_eq!(body["unread"], 1);
    let (_, body) = get_json(&b, "/messages/inbox").await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 1);
    // reading it again is 404: it is not in the inbox any more
    let (status, body) = post_json(&b, &format!("/messages/inbox/{first}/read")).await;
    assert_eq!(status, Status::NotFound);
    assert_error(&body, Status::NotFound);
}

async fn anonymous_requests_get_401_json(app: &TestApp) {
    let b = app.browser_with(app.rocket()).await;
    for path in [
        "/messages/inbox",
        "/messages/inbox/1",
        "/messages/archive",
        "/messages/count",
    ] {
        let (status, body) = get_json(&b, path).await;
        assert_eq!(status, Status::Unauthorized, "{path}");
        assert_error(&body, Status::Unauthorized);
    }
    for path in ["/messages/mark_all_read", "/messages/inbox/1/read"] {
        let (status, body) = post_json(&b, path).await;
        assert_eq!(status, Status::Unauthorized, "{path}");
        assert_error(&body, Status::Unauthorized);
    }
}

async fn mark_all_read_says_how_many(app: &TestApp) {
    let (b, alice) = user(app, "alice").await;
    for i in 0..20 {
        send(&b, alice, &format!("m{i}")).await;
    }
    let (status, body) = post_json(&b, "/messages/mark_all_read").await;
    assert_eq!(status, Status::Ok);
    assert_eq!(body["marked"], 20);
    let (_, body) = get_json(&b, "/messages/count").await;
    assert_eq!(body["unread"], 0);
    let (_, body) = post_json(&b, "/messages/mark_all_read").await;
    assert_eq!(body["marked"], 0);
}

async fn another_users_unknown_and_malformed_ids_are_404(app: &TestApp) {
    let (alice_b, alice) = user(app, "alice").await;
    let (bob_b, _) = user(app, "bob").await;
    let id = send(&alice_b, alice, "alice's").await;
    for path in [
        format!("/messages/inbox/{id}"),
        "/messages/inbox/999999".into(),
        "/messages/inbox/abc".into(),
        "/messages/inbox/-1".into(),
        "/messages/inbox/1e3".into(),
    ] {
        let (status, body) = get_json(&bob_b, &path).await;
        assert_eq!(status, Status::NotFound, "{path}");
        assert_error(&body, Status::NotFound);
        let (status, _) = post_json(&bob_b, &format!("{path}/read")).await;
        assert_eq!(status, Status::NotFound, "{path}/read");
    }
    // alice's message is untouched
    let (status, _) = get_json(&alice_b, &format!("/messages/inbox/{id}")).await;
    assert_eq!(status, Status::Ok);
    // Read, it is still in her archive: the 404 says where it is not, not that it does not
    // exist, and reads the same as bob's for it.
    post_json(&alice_b, &format!("/messages/inbox/{id}/read")).await;
    let expected = format!("message {id} is not in your inbox");
    for b in [&alice_b, &bob_b] {
        let (status, body) = get_json(b, &format!("/messages/inbox/{id}")).await;
        assert_eq!(status, Status::NotFound);
        assert_eq!(body["error"]["message"], expected.as_str(), "{body}");
        let (status, body) = post_json(b, &format!("/messages/inbox/{id}/read")).await;
        assert_eq!(status, Status::NotFound);
        assert_eq!(body["error"]["message"], expected.as_str(), "{body}");
    }
}

async fn pages_follow_next_without_gaps_while_messages_arrive_and_are_read(app: &TestApp) {
    let (b, alice) = user(app, "alice").await;
    for i in 0..25 {
        send(&b, alice, &format!("m{i:02}")).await;
    }
    let mut seen = Vec::new();
    let mut next = Some("/messages/inbox?limit=10".to_string());
    let mut round = 0;
    while let Some(path) = next {
        let (status, body) = get_json(&b, &path).await;
        assert_eq!(status, Status::Ok, "{path}: {body}");
        let page: Page = serde_json::from_value(body).unwrap();
        // Between pages: what was listed gets read, and new messages arrive.
        for m in &page.messages {
            seen.push(m.message.clone());
            if round == 0 {
                post_json(&b, &format!("/messages/inbox/{}/read", m.id)).await;
            }
        }
        if round < 2 {
            send(&b, alice, &format!("new{round}")).await;
        }
        round += 1;
        next = page.next;
    }
    let mut expected: Vec<String> = (0..25).map(|i| format!("m{i:02}")).collect();
    expected.extend(["new0".to_string(), "new1".to_string()]);
    assert_eq!(seen, expected, "no duplicates, no gaps");
    let unique: BTreeSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len());
}

async fn archive_is_newest_first_and_paginated(app: &TestApp) {
    let (b, alice) = user(app, "alice").await;
    for i in 0..5 {
        send(&b, alice, &format!("a{i}")).await;
    }
    TestApp::store(&b).mark_all_read(alice).await.unwrap();
    let (_, body) = get_json(&b, "/messages/archive?limit=3").await;
    let page: Page = serde_json::from_value(body).unwrap();
    let texts: Vec<_> = page.messages.iter().map(|m| m.message.as_str()).collect();
    assert_eq!(texts, ["a4", "a3", "a2"]);
    let (_, body) = get_json(&b, page.next.as_deref().unwrap()).await;
    let page: Page = serde_json::from_value(body).unwrap();
    let texts: Vec<_> = page.messages.iter().map(|m| m.message.as_str()).collect();
    assert_eq!(texts, ["a1", "a0"]);
    assert!(page.next.is_none());
}

async fn bad_limits_and_cursors_are_clear_errors(app: &TestApp) {
    let (b, alice) = user(app, "alice").await;
    send(&b, alice, "x").await;
    for (path, status) in [
        ("/messages/inbox?limit=0", Status::UnprocessableEntity),
        ("/messages/inbox?limit=201", Status::UnprocessableEntity),
        ("/messages/inbox?limit=-1", Status::UnprocessableEntity),
        (
            "/messages/inbox?limit=99999999999999999999",
            Status::UnprocessableEntity,
        ),
        ("/messages/inbox?limit=ten", Status::BadRequest),
        ("/messages/inbox?cursor=%25%25", Status::BadRequest),
        ("/messages/archive?cursor=bm9wZQ", Status::BadRequest),
    ] {
        let (got, body) = get_json(&b, path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert_error(&body, status);
    }
    let (status, _) = get_json(&b, "/messages/inbox?limit=200").await;
    assert_eq!(status, Status::Ok);
}

async fn posts_without_a_valid_csrf_header_are_403_and_change_nothing(app: &TestApp) {
    let (b, alice) = user(app, "alice").await;
    let id = send(&b, alice, "x").await;
    for path in [
        format!("/messages/inbox/{id}/read"),
        "/messages/mark_all_read".to_string(),
    ] {
        let r = b.client.post(path.clone()).dispatch().await;
        assert_eq!(r.status(), Status::Forbidden, "{path}");
        let body: Value = r.into_json().await.unwrap();
        assert_error(&body, Status::Forbidden);
        assert!(body["error"]["message"].as_str().unwrap().contains("CSRF"));
        let r = b
            .client
            .post(path.clone())
            .header(Header::new("X-CSRF-Token", "nope"))
            .dispatch()
            .await;
        assert_eq!(r.status(), Status::Forbidden, "{path}");
    }
    let inbox = TestApp::store(&b)
        .backend()
        .inbox_list(alice, ListQuery::ALL)
        .await
        .unwrap();
    assert_eq!(inbox.len(), 1, "nothing changed");
}

async fn rocket_errors_under_messages_have_the_json_shape(app: &TestApp) {
    let (b, _) = user(app, "alice").await;
    let (status, body) = get_json(&b, "/messages/nowhere").await;
    assert_eq!(status, Status::NotFound);
    assert_error(&body, Status::NotFound);
    // a body larger than Rocket's form limit
    let token = b.csrf_token().await;
    let big = format!("csrf_token={token}&next={}", "x".repeat(64 * 1024));
    let r = b
        .client
        .post("/messages/mark_all_read")
        .header(ContentType::Form)
        .body(big)
        .dispatch()
        .await;
    let status = r.status();
    let body: Value = r.into_json().await.unwrap();
    assert_eq!(status, Status::PayloadTooLarge, "{body}");
    assert_error(&body, Status::PayloadTooLarge);
}

async fn trailing_slash_is_optional(app: &TestApp) {
    let (b, alice) = user(app, "alice").await;
    let id = send(&b, alice, "x").await;
    for path in [
        "/messages/inbox/",
        "/messages/count/",
        "/messages/archive/",
        "/messages/inbox/?limit=5",
    ] {
        let (status, _) = get_json(&b, path).await;
        assert_eq!(status, Status::Ok, "{path}");
    }
    let (status, _) = get_json(&b, &format!("/messages/inbox/{id}/")).await;
    assert_eq!(status, Status::Ok);
    let (status, _) = post_json(&b, "/messages/mark_all_read/").await;
    assert_eq!(status, Status::Ok);
}

async fn plain_forms_redirect_back(app: &TestApp) {
    let (b, alice) = user(app, "alice").await;
    let unread = || async {
        TestApp::store(&b)
            .backend()
            .inbox_count(alice)
            .await
            .unwrap()
    };
    let id = send(&b, alice, "one").await;
    send(&b, alice, "two").await;
    let r = b
        .post_form(
            &format!("/messages/inbox/{id}/read"),
            &[("next", "/?keep=1")],
        )
        .await;
    assert_eq!(r.status(), Status::SeeOther);
    assert_eq!(
        r.headers().get_one("Location"),
        Some("/?keep=1#stored-messages"),
        "back to the notice"
    );
    // The page that comes back says what the button did, once (without a script nothing
    // else would): a one-time notice in the stream, naming the message.
    let (_, html) = b.get_html("/inbox").await;
    assert!(
        html.contains("Marked read: \u{201c}\u{2068}one\u{2069}\u{201d}."),
        "{html}"
    );
    let (_, html) = b.get_html("/inbox").await;
    assert!(!html.contains("Marked read"), "shown once: {html}");
    // the same button again (the message was read meanwhile, in another tab): back to the
    // page as well, which says so; a script asking the same gets the 404, and no notice
    let r = b
        .post_form(&format!("/messages/inbox/{id}/read"), &[("next", "/inbox")])
        .await;
    assert_eq!(r.status(), Status::SeeOther);
    assert_eq!(
        r.headers().get_one("Location"),
        Some("/inbox#stored-messages")
    );
    let (_, html) = b.get_html("/inbox").await;
    assert!(html.contains("This message was no longer unread"), "{html}");
    let (status, _) = post_json(&b, &format!("/messages/inbox/{id}/read")).await;
    assert_eq!(status, Status::NotFound);
    let (status, _) = post_json(&b, "/messages/mark_all_read").await;
    assert_eq!(status, Status::Ok);
    let (_, html) = b.get_html("/inbox").await;
    assert!(
        !html.contains("Marked"),
        "scripts say it themselves: {html}"
    );
    send(&b, alice, "four").await;
    send(&b, alice, "five").await;
    let r = b
        .post_form(
            "/messages/mark_all_read",
            &[("next", "https://evil.example/")],
        )
        .await;
    assert_eq!(
        r.headers().get_one("Location"),
        Some("/#stored-messages"),
        "only site-relative next"
    );
    let (_, html) = b.get_html("/inbox").await;
    assert!(html.contains("All 2 messages marked read."), "{html}");
    assert_eq!(unread().await, 0);
    // the inbox list renders the buttons as forms
    let three = send(&b, alice, "three").await;
    let (_, html) = b.get_html("/inbox").await;
    assert!(html.contains("class=\"sm-mark-read\"") && html.contains("class=\"sm-mark-all-read\""));
    // The button of a page whose token no longer holds (its session ended): the browser
    // shows the site's 403 page, not JSON as text. A script posting a form gets the JSON.
    let stale = |navigates: bool| {
        let request = b
            .client
            .post(format!("/messages/inbox/{three}/read"))
            .header(ContentType::Form)
            .body("csrf_token=stale&next=/inbox");
        if navigates {
            request.header(Header::new("Sec-Fetch-Mode", "navigate"))
        } else {
            request.header(Header::new("Accept", "application/json"))
        }
    };
    let r = stale(true).dispatch().await;
    assert_eq!(r.status(), Status::Forbidden);
    assert_eq!(r.content_type(), Some(ContentType::HTML));
    assert!(r.into_string().await.unwrap().contains("security token"));
    let r = stale(false).dispatch().await;
    assert_eq!(r.status(), Status::Forbidden);
    let body: Value = r.into_json().await.unwrap();
    assert_error(&body, Status::Forbidden);
    // Other failures of a page's form: a short page with a link back to where the form was
    // (its `next`, else its same-site `Referer`), not JSON.
    let token = b.csrf_token().await;
    let failing = |referer: &'static str, next: &str| {
        b.client
            .post("/messages/inbox/not-an-id/read")
            .header(ContentType::Form)
            .header(Header::new("Sec-Fetch-Mode", "navigate"))
            .header(Header::new("Host", "app.example"))
            .header(Header::new("Referer", referer))
            .body(format!("csrf_token={token}{next}"))
    };
    let back = |html: &str| {
        let start = html.find("<a href=\"").expect("a link back") + 9;
        html[start..start + html[start..].find('"').unwrap()].replace("&#x2F;", "/")
    };
    let r = failing("http://app.example/inbox?page=2", "")
        .dispatch()
        .await;
    assert_eq!(r.status(), Status::NotFound);
    assert_eq!(r.content_type(), Some(ContentType::HTML));
    let html = r.into_string().await.unwrap();
    assert!(html.contains("Not done"), "{html}");
    assert!(html.contains("not-an-id"), "says which id: {html}");
    assert_eq!(back(&html), "/inbox?page=2", "the Referer: {html}");
    for (referer, next, expected) in [
        // the form's `next` first, whatever the Referer says
        (
            "http://app.example/",
            "&next=%2Finbox%3Fpage%3D2",
            "/inbox?page=2",
        ),
        (
            "http://elsewhere.example/",
            "&next=/archive+x&x=1",
            "/archive%20x",
        ),
        // not a local path: the Referer, else the home page
        (
            "http://app.example/inbox",
            "&next=//elsewhere.example/",
            "/inbox",
        ),
        (
            "http://elsewhere.example/inbox",
            "&next=https://elsewhere.example/",
            "/",
        ),
        ("http://elsewhere.example/inbox", "", "/"),
    ] {
        let html = failing(referer, next).dispatch().await.into_string().await;
        let html = html.unwrap();
        assert_eq!(back(&html), expected, "{referer} {next}: {html}");
    }
    // and from a catcher: a visitor's button (a valid token, nobody logged in), which fails
    // before its body is read: the link still goes back to its `next`
    let visitor = app.browser_with(app.rocket()).await;
    let token = visitor.csrf_token().await;
    let r = visitor
        .client
        .post("/messages/mark_all_read")
        .header(ContentType::Form)
        .header(Header::new("Sec-Fetch-Mode", "navigate"))
        .body(format!("csrf_token={token}&next=%2Finbox"))
        .dispatch()
        .await;
    assert_eq!(r.status(), Status::Unauthorized);
    let html = r.into_string().await.unwrap();
    assert!(
        html.contains("Authentication required: log in first."),
        "{html}"
    );
    assert_eq!(back(&html), "/inbox", "{html}");
    assert_eq!(unread().await, 1, "nothing changed");
}

/// A host that stores the success level still gets a plain button's notice as a one-time
/// message: stored, it would wait in the inbox to be marked read in turn.
async fn a_plain_buttons_notice_is_never_stored(app: &TestApp) {
    let alice = app.user("alice", false).await.user_id();
    let figment = app
        .figment()
        .merge(("stored_messages.store_levels", [21, 25, 31]));
    let b = app
        .browser_with(stored_messages_app::rocket_from(figment))
        .await;
    b.login_as("alice").await;
    let id = send(&b, alice, "one").await;
    let r = b
        .post_form(&format!("/messages/inbox/{id}/read"), &[("next", "/inbox")])
        .await;
    assert_eq!(r.status(), Status::SeeOther);
    let (_, html) = b.get_html("/inbox").await;
    assert!(
        html.contains("Marked read: \u{201c}\u{2068}one\u{2069}\u{201d}."),
        "{html}"
    );
    let store = TestApp::store(&b);
    assert_eq!(store.backend().inbox_count(alice).await.unwrap(), 0);
    let archive = store
        .backend()
        .archive_list(alice, ListQuery::ALL)
        .await
        .unwrap();
    assert_eq!(archive.len(), 1, "only the message itself");
}

async fn count_says_unread(app: &TestApp) {
    let (b, alice) = user(app, "alice").await;
    let (_, body) = get_json(&b, "/messages/count").await;
    assert_eq!(body, serde_json::json!({ "unread": 0 }));
    send(&b, alice, "x").await;
    let (_, body) = get_json(&b, "/messages/count").await;
    assert_eq!(body["unread"], 1);
}

#[test]
fn openapi_lists_exactly_the_mounted_routes() {
    let doc = stored_messages::api::openapi_document();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let mounted: BTreeSet<(String, String)> = stored_messages::api::routes()
        .iter()
        .map(|r| {
            let path = format!("{}{}", stored_messages::api::BASE, r.uri.path());
            // `/inbox/<id>` is `/inbox/{id}` in OpenAPI.
            let path = path.replace('<', "{").replace('>', "}");
            (r.method.as_str().to_string(), path)
        })
        .collect();
    assert_eq!(documented, mounted);
    assert_eq!(doc["openapi"], "3.0.3");
}
