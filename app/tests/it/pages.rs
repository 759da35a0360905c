//! The merged stream, flash cookies and the template helpers, through the real reference app
//! with Rocket's local client (tracked cookies, like a browser). Ported from the original's
//! storage and template-tag tests, plus the cases it could not handle.

use rocket::http::{Cookie, Status};
use rocket::response::{Flash, Redirect};
use rocket::{get, routes, State};
use stored_messages::{Level, ListQuery, Messages, NewMessage, Store, UserId};

use crate::common::{assert_redirect, Browser, TestApp};

app_tests!(
    stored_and_plain_messages_added_then_both_shown,
    stored_message_lands_in_the_inbox,
    consumed_stream_empties_the_inbox_and_archive_keeps_it,
    keep_leaves_everything_unread,
    each_message_shows_once_and_the_badge_agrees,
    inbox_and_archive_pages_consume_nothing,
    inbox_page_marks_read_without_javascript,
    demo_form_reports_every_error_at_once,
    archive_pages_go_both_ways,
    inbox_page_says_when_more_are_waiting,
    demo_levels_say_what_happens_to_the_message,
    head_and_prefetch_consume_nothing,
    the_longest_message_fits_the_form,
    odd_next_values_redirect_instead_of_failing,
    repeated_wrong_passwords_lock_the_login_out,
    the_csrf_token_changes_at_login_and_logout,
    a_token_is_refused_in_any_other_session,
    static_files_and_health_checks_resolve_no_token,
    changing_the_password_ends_the_other_sessions,
    an_admin_ends_a_users_sessions,
    live_streams_check_their_sessions_many_at_once,
    private_pages_are_not_cached_and_carry_security_headers,
    anonymous_stored_level_falls_back_to_flash,
    empty_message_is_dropped,
    stored_and_flash_consumed_together,
    helpers_show_twenty_messages_for_a_user,
    helpers_are_empty_for_an_anonymous_visitor,
    message_arriving_after_render_stays_unread,
    message_added_and_not_shown_waits_for_the_next_request,
    tampered_or_garbage_cookies_are_ignored,
    fifty_long_flash_messages_all_come_back_in_order,
    script_text_is_escaped,
    javascript_url_is_refused_and_nothing_changes,
    missing_or_wrong_csrf_token_is_refused_and_nothing_changes,
    rocket_flash_joins_the_stream,
    error_response_keeps_flash_and_leaves_stored_unread,
    two_users_rendering_at_once_see_their_own_messages,
    login_refuses_wrong_passwords_and_honours_next,
    logout_ends_the_session,
    ending_all_sessions_logs_a_user_out_everywhere,
    archive_needs_login,
    error_pages_know_who_is_logged_in,
    first_start_creates_an_admin,
);

/// Test routes mounted next to the app's own.
#[get("/t/add?<level>&<text>&<show>")]
async fn add_route(messages: Messages<'_>, level: i32, text: &str, show: Option<bool>) -> String {
    messages.add(Level(level), text).await.unwrap();
    if show.unwrap_or(false) {
        return messages
            .iter()
            .map(|m| m.message)
            .collect::<Vec<_>>()
            .join("|");
    }
    String::new()
}

#[get("/t/add_many?<n>&<len>")]
async fn add_many(messages: Messages<'_>, n: usize, len: usize) -> &'static str {
    for i in 0..n {
        let text = format!("{i:02}:{}", "x".repeat(len));
        messages.add(Level::WARNING, &text).await.unwrap();
    }
    "ok"
}

/// Shows the stream, then a message arrives for the user before the response is finished.
#[get("/t/show_then_arrive")]
async fn show_then_arrive(messages: Messages<'_>, store: &State<Store>) -> String {
    let shown: Vec<String> = messages.iter().map(|m| m.message).collect();
    let user = messages.user().unwrap();
    store
        .add_message_for(
            &[user],
            NewMessage::new(Level::STORED_INFO, "late").unwrap(),
        )
        .await
        .unwrap();
    shown.join("|")
}

/// Shows the stream and then fails, so a catcher answers.
#[get("/t/show_then_fail")]
fn show_then_fail(messages: Messages<'_>) -> Result<String, Status> {
    let _ = messages.iter().count();
    Err(Status::InternalServerError)
}

#[get("/t/flash")]
fn rocket_flash() -> Flash<Redirect> {
    Flash::success(Redirect::to("/"), "Saved with Rocket's Flash")
}

async fn browser(app: &TestApp) -> Browser {
    app.browser_with(app.rocket().mount(
        "/",
        routes![
            add_route,
            add_many,
            show_then_arrive,
            show_then_fail,
            rocket_flash
        ],
    ))
    .await
}

async fn logged_in(app: &TestApp, name: &str) -> (Browser, UserId) {
    let user = app.user(name, false).await;
    let b = browser(app).await;
    b.login_as(name).await;
    (b, user.user_id())
}

/// Texts of the merged stream on a page, in order.
fn stream_texts(html: &str) -> Vec<String> {
    let Some(section) = html.split("<div class=\"messages\"").nth(1) else {
        return vec![];
    };
    let section = section.split("</div>").next().unwrap_or("");
    section
        .split("<span class=\"text\">")
        .skip(1)
        .filter_map(|s| s.split("</span>").next())
        .map(str::to_string)
        .collect()
}

async fn add(b: &Browser, level: &str, text: &str) -> Status {
    b.post_form(
        "/demo/message",
        &[
            ("level", level),
            ("message", text),
            ("extra_tags", ""),
            ("url", ""),
        ],
    )
    .await
    .status()
}

async fn stored_and_plain_messages_added_then_both_shown(app: &TestApp) {
    let (b, _) = logged_in(app, "alice").await;
    assert_eq!(add(&b, "stored_info", "stored one").await, Status::SeeOther);
    assert_eq!(add(&b, "info", "plain one").await, Status::SeeOther);
    let (status, html) = b.get_html("/").await;
    assert_eq!(status, Status::Ok);
    assert_eq!(stream_texts(&html), ["stored one", "plain one"]);
    let (_, html) = b.get_html("/").await;
    assert!(stream_texts(&html).is_empty(), "shown once");
}

async fn stored_message_lands_in_the_inbox(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    add(&b, "stored_warning", "to the inbox").await;
    add(&b, "warning", "not stored").await;
    assert_eq!(TestApp::inbox_texts(&b, alice).await, ["to the inbox"]);
}

async fn consumed_stream_empties_the_inbox_and_archive_keeps_it(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    add(&b, "stored_info", "read me").await;
    b.get_html("/").await;
    assert!(TestApp::inbox_texts(&b, alice).await.is_empty());
    let archive = TestApp::store(&b)
        .backend()
        .archive_list(alice, ListQuery::ALL)
        .await
        .unwrap();
    assert_eq!(archive.len(), 1);
    let (_, html) = b.get_html("/archive").await;
    assert!(html.contains("read me"), "archive page lists it");
}

async fn keep_leaves_everything_unread(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    add(&b, "stored_info", "kept stored").await;
    add(&b, "info", "kept flash").await;
    let (_, html) = b.get_html("/?keep=1").await;
    assert_eq!(stream_texts(&html), ["kept stored", "kept flash"]);
    assert!(
        html.contains("still in your <a href=\"/inbox\">inbox</a>"),
        "the page says they stay unread"
    );
    assert_eq!(TestApp::inbox_texts(&b, alice).await, ["kept stored"]);
    let (_, html) = b.get_html("/").await;
    assert_eq!(
        stream_texts(&html),
        ["kept stored", "kept flash"],
        "still there after keep"
    );
    assert!(TestApp::inbox_texts(&b, alice).await.is_empty());
}

/// How many times `text` appears as a message (its escaped text in a message's element).
fn times_shown(html: &str, text: &str) -> usize {
    html.matches(&format!(">{text}</")).count()
}

/// The number in the header's unread badge.
fn badge(html: &str) -> String {
    html.split("data-unread-count>")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .expect("the header's badge")
        .to_string()
}

async fn each_message_shows_once_and_the_badge_agrees(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    add(&b, "stored_info", "first note").await;
    add(&b, "stored_warning", "second note").await;

    // `?keep=1`: each once, still unread, and the badge counts them
    let (_, html) = b.get_html("/?keep=1").await;
    assert_eq!(times_shown(&html, "first note"), 1, "{html}");
    assert_eq!(times_shown(&html, "second note"), 1);
    assert_eq!(badge(&html), "2");
    assert!(html.contains("These messages stay unread"));

    // `/`: each once, the page says they are read now, and the badge says 0
    let (_, html) = b.get_html("/").await;
    assert_eq!(times_shown(&html, "first note"), 1);
    assert_eq!(times_shown(&html, "second note"), 1);
    assert_eq!(badge(&html), "0");
    assert!(html.contains("Shown here means read"), "{html}");
    assert!(TestApp::inbox_texts(&b, alice).await.is_empty());

    // words people read: the level in a word, no tags or query strings
    assert!(html.contains("<span class=\"level\">Warning</span>"));
    for internal in ["stored warning</span>", "?keep=1", "flash"] {
        assert!(!html.contains(internal), "{internal:?} on the page");
    }
}

async fn inbox_and_archive_pages_consume_nothing(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    add(&b, "stored_info", "look but keep").await;
    add(&b, "info", "a one-time notice").await;

    // the inbox lists it once, with its buttons; the flash shows there, once
    let (status, html) = b.get_html("/inbox").await;
    assert_eq!(status, Status::Ok);
    assert_eq!(times_shown(&html, "look but keep"), 1, "{html}");
    assert_eq!(times_shown(&html, "a one-time notice"), 1);
    assert_eq!(badge(&html), "1");
    assert!(
        html.contains("aria-label=\"Mark read: look but keep, 20"),
        "named with the date"
    );
    assert!(html.contains("aria-current=\"page\"><span class=\"nav-label\">Inbox"));

    // the archive lists it once too, and neither page used it up
    let (_, html) = b.get_html("/archive").await;
    assert_eq!(times_shown(&html, "look but keep"), 1);
    assert_eq!(badge(&html), "1");
    assert_eq!(TestApp::inbox_texts(&b, alice).await, ["look but keep"]);
    // the flash was shown once, on the inbox page
    assert_eq!(times_shown(&html, "a one-time notice"), 0);
    let (_, html) = b.get_html("/account").await;
    assert_eq!(badge(&html), "1", "the account page uses nothing up");
    assert_eq!(TestApp::inbox_texts(&b, alice).await, ["look but keep"]);

    // a long message: its start, the rest behind "Show more", without JavaScript
    let long = "many words ".repeat(40);
    add(&b, "stored_info", long.trim()).await;
    let (_, html) = b.get_html("/inbox").await;
    assert!(html.contains("<details class=\"long\"><summary><span class=\"head\">many words"));
    assert!(html.contains("<span class=\"more\">Show more</span>"));
    assert_eq!(times_shown(&html, long.trim()), 1, "the whole text once");

    // anonymous: the inbox asks to log in first
    let anonymous = browser(app).await;
    let r = anonymous.client.get("/inbox").dispatch().await;
    assert_redirect(&r, "/login?next=/inbox");
}

async fn inbox_page_marks_read_without_javascript(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    add(&b, "stored_info", "one").await;
    add(&b, "stored_info", "two").await;
    let (_, html) = b.get_html("/inbox").await;
    let action = html
        .split("<form method=\"post\" action=\"")
        .filter_map(|rest| rest.split('"').next())
        .find(|action| action.ends_with("/read"))
        .expect("a Mark read form")
        .replace("&#x2F;", "/");
    let r = b.post_form(&action, &[("next", "/inbox")]).await;
    assert_redirect(&r, "/inbox#stored-messages");
    assert_eq!(TestApp::inbox_texts(&b, alice).await, ["two"]);
    let (_, html) = b.get_html("/inbox").await;
    assert_eq!(badge(&html), "1");
    let r = b
        .post_form("/messages/mark_all_read", &[("next", "/inbox")])
        .await;
    assert_redirect(&r, "/inbox#stored-messages");
    let (_, html) = b.get_html("/inbox").await;
    assert_eq!(badge(&html), "0");
    assert!(html.contains("No unread messages."));
}

async fn demo_form_reports_every_error_at_once(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    let long_tags = "t".repeat(2000);
    let r = b
        .post_form(
            "/demo/message",
            &[
                ("level", "urgent"),
                ("message", ""),
                ("extra_tags", &long_tags),
                ("url", "javascript:alert(1)"),
            ],
        )
        .await;
    assert_eq!(r.status(), Status::UnprocessableEntity);
    let html = r.into_string().await.unwrap();
    // one summary, first in the form, taking focus, linking to each field
    assert!(html.contains("class=\"error-summary\" tabindex=\"-1\" autofocus"));
    for field in ["level", "message", "extra_tags", "url"] {
        assert!(
            html.contains(&format!("<a href=\"#{field}\">")),
            "summary links {field}"
        );
        assert!(
            html.contains(&format!("id=\"{field}-error\"")),
            "{field} has its message"
        );
    }
    assert_eq!(html.matches("aria-invalid=\"true\"").count(), 4);
    assert!(html.contains("aria-describedby=\"message-hint message-error\""));
    assert!(TestApp::inbox_texts(&b, alice).await.is_empty());
}

/// The href of the pager's link `rel` ("prev" or "next"), unescaped.
fn pager_link(html: &str, rel: &str) -> Option<String> {
    let pager = html
        .split("<nav class=\"pager\"")
        .nth(1)?
        .split("</nav>")
        .next()?;
    pager
        .split("<a href=\"")
        .skip(1)
        .find(|a| a.contains(&format!("rel=\"{rel}\"")))
        .and_then(|a| a.split('"').next())
        .map(|href| href.replace("&#x2F;", "/").replace("&amp;", "&"))
}

async fn archive_pages_go_both_ways(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    let store = TestApp::store(&b);
    for i in 0..60 {
        store
            .add_message_for(
                &[alice],
                NewMessage::new(Level::STORED_INFO, &format!("note {i:02}")).unwrap(),
            )
            .await
            .unwrap();
    }
    // the first page: the 25 newest, older only
    let (_, first) = b.get_html("/archive").await;
    assert_eq!(times_shown(&first, "note 59"), 1);
    assert_eq!(times_shown(&first, "note 35"), 1);
    assert_eq!(times_shown(&first, "note 34"), 0);
    assert_eq!(pager_link(&first, "prev"), None);
    assert!(first.contains("<title>Archive · stored-messages</title>"));
    let older = pager_link(&first, "next").expect("an Older link");
    // the second: the next 25, both ways
    let (_, second) = b.get_html(&older).await;
    assert_eq!(times_shown(&second, "note 34"), 1);
    assert_eq!(times_shown(&second, "note 10"), 1);
    assert_eq!(times_shown(&second, "note 35"), 0);
    assert!(
        second.contains("<title>Archive · older messages · stored-messages</title>"),
        "a later page's title says so"
    );
    let newer = pager_link(&second, "prev").expect("a Newer link");
    let (_, again) = b.get_html(&newer).await;
    assert_eq!(
        times_shown(&again, "note 59"),
        1,
        "Newer leads back to the first page"
    );
    // the third, the last: the 10 oldest, newer only, and back to the second
    let (_, third) = b.get_html(&pager_link(&second, "next").unwrap()).await;
    assert_eq!(times_shown(&third, "note 09"), 1);
    assert_eq!(times_shown(&third, "note 00"), 1);
    assert_eq!(pager_link(&third, "next"), None);
    let (_, back) = b.get_html(&pager_link(&third, "prev").unwrap()).await;
    assert_eq!(times_shown(&back, "note 34"), 1);
    // nothing was read by looking, and a bad link is a clear error
    assert_eq!(TestApp::inbox_texts(&b, alice).await.len(), 60);
    for bad in [
        "/archive?from=x",
        "/archive?from=1_1&back=%3Cb%3E",
        "/archive?from=99999999999999999999_1",
    ] {
        let (status, html) = b.get_html(bad).await;
        assert_eq!(status, Status::BadRequest, "{bad}");
        assert!(html.contains("This page link is not valid"), "{bad}");
    }
}

/// Whether the inbox page's "not listed yet" note shows, and the number it gives.
fn waiting_note(html: &str) -> Option<String> {
    let note = html.split("data-sm-more=").nth(1)?;
    let (tag, rest) = note.split_once('>')?;
    if tag.contains("hidden") {
        return None;
    }
    let number = rest.split("data-sm-waiting>").nth(1)?;
    Some(number.split('<').next()?.to_string())
}

/// The page lists the oldest 100 unread messages and says exactly how many more wait (a
/// count the page computes with `stored_messages_count()` in an expression, which must stay
/// a number past the guard's window); exactly 100 are not "more".
async fn inbox_page_says_when_more_are_waiting(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    let store = TestApp::store(&b);
    let (_, html) = b.get_html("/inbox").await;
    assert_eq!(waiting_note(&html), None);
    let users = vec![alice];
    let add = |i: usize| {
        let store = store.clone();
        let users = users.clone();
        async move {
            store
                .add_message_for(
                    &users,
                    NewMessage::new(Level::STORED_INFO, &format!("waiting {i:03}")).unwrap(),
                )
                .await
                .unwrap();
        }
    };
    for i in 0..100 {
        add(i).await;
    }
    let (status, html) = b.get_html("/inbox").await;
    assert_eq!(status, Status::Ok);
    assert_eq!(waiting_note(&html), None, "exactly a page: nothing waits");
    assert_eq!(badge(&html), "100");
    for i in 100..103 {
        add(i).await;
    }
    let (status, html) = b.get_html("/inbox").await;
    assert_eq!(status, Status::Ok);
    assert_eq!(waiting_note(&html).as_deref(), Some("3"));
    assert_eq!(times_shown(&html, "waiting 099"), 1);
    assert_eq!(times_shown(&html, "waiting 100"), 0);
    assert_eq!(badge(&html), "103");

    // the home page shows (and marks read) the first 100, and says how many are left
    let (status, html) = b.get_html("/").await;
    assert_eq!(status, Status::Ok);
    assert!(html.contains("Still unread there: 3."), "{html}");
    assert_eq!(badge(&html), "3");
}

async fn demo_levels_say_what_happens_to_the_message(app: &TestApp) {
    let anonymous = browser(app).await;
    let (_, html) = anonymous.get_html("/").await;
    assert!(
        html.contains(">Info: shown once, not saved</option>"),
        "{html}"
    );
    assert!(html.contains(">Debug: below the minimum level, dropped</option>"));
    assert!(
        !html.contains("saved to your inbox"),
        "anonymous: nothing is saved"
    );
    assert!(
        html.contains(">Stored info: shown once (saved only for a logged-in user)</option>"),
        "{html}"
    );
    assert!(html.contains(">Stored debug: below the minimum level, dropped</option>"));
    let (b, _) = logged_in(app, "alice").await;
    let (_, html) = b.get_html("/").await;
    assert!(
        html.contains("value=\"stored_info\" selected>Stored info: saved to your inbox</option>")
    );
    assert!(html.contains(">Info: shown once, not saved</option>"));
    // No two options read the same, logged in or not.
    for page in [&html, &anonymous.get_html("/").await.1] {
        let options: Vec<&str> = page
            .split("<option ")
            .skip(1)
            .filter_map(|o| {
                o.split_once('>')
                    .and_then(|(_, rest)| rest.split_once("</option>"))
            })
            .map(|(text, _)| text)
            .collect();
        let distinct: std::collections::HashSet<&str> = options.iter().copied().collect();
        assert_eq!(distinct.len(), options.len(), "{options:?}");
    }
}

async fn the_longest_message_fits_the_form(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    let longest = "❤".repeat(stored_messages::MAX_TEXT_CHARS);
    assert_eq!(add(&b, "stored_info", &longest).await, Status::SeeOther);
    assert_eq!(TestApp::inbox_texts(&b, alice).await, [longest]);
}

async fn head_and_prefetch_consume_nothing(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    add(&b, "stored_info", "still unread").await;
    add(&b, "info", "still flashed").await;
    let head = b.client.head("/").dispatch().await;
    assert_eq!(head.status(), Status::Ok);
    // Header names are case-insensitive, and so are the values looked for.
    for (name, value) in [("Sec-Purpose", "prefetch"), ("purpose", "Prefetch")] {
        let prefetch = b
            .client
            .get("/")
            .header(rocket::http::Header::new(name, value))
            .dispatch()
            .await;
        let html = prefetch.into_string().await.unwrap();
        assert_eq!(stream_texts(&html), ["still unread", "still flashed"]);
        assert_eq!(TestApp::inbox_texts(&b, alice).await, ["still unread"]);
    }
    // The user's own visit consumes them, once.
    let (_, html) = b.get_html("/").await;
    assert_eq!(stream_texts(&html), ["still unread", "still flashed"]);
    let (_, html) = b.get_html("/").await;
    assert!(stream_texts(&html).is_empty());
}

async fn odd_next_values_redirect_instead_of_failing(app: &TestApp) {
    app.user("alice", false).await;
    let b = browser(app).await;
    let r = b
        .post_form(
            "/login",
            &[
                ("username", "alice"),
                ("password", "horse-battery-9"),
                ("next", "/x y"),
            ],
        )
        .await;
    assert_redirect(&r, "/x%20y");
    let r = b.client.get("/login?next=/%E2%9D%A4").dispatch().await;
    assert_redirect(&r, "/%E2%9D%A4");
    for next in ["/a\tb", "/a\u{1b}b", "//evil.example", "/\\evil"] {
        let r = b
            .post_form("/messages/mark_all_read", &[("next", next)])
            .await;
        assert_redirect(&r, "/#stored-messages");
    }
    // Generated values, on every route that takes `next`: a redirect, never a 5xx.
    use rand::{Rng, SeedableRng};
    let pieces = [
        "/",
        "//",
        "\\",
        "%",
        "%zz",
        "#",
        "?",
        "&",
        " ",
        "\t",
        "\u{1b}",
        "❤",
        "\"",
        "<",
        "`",
        "{",
        "|",
        "^",
        "[",
        ":",
        "..",
        "a",
        "~",
        "javascript:",
        "http://x",
        "\u{202e}",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let (logged_in, anonymous) = (&b, browser(app).await);
    for round in 0..300 {
        let len = rng.gen_range(0..8);
        let next: String = (0..len)
            .map(|_| pieces[rng.gen_range(0..pieces.len())])
            .collect();
        let r = logged_in
            .post_form("/messages/mark_all_read", &[("next", &next)])
            .await;
        assert!(
            r.status().class().is_redirection(),
            "{round} {next:?}: {}",
            r.status()
        );
        let r = logged_in
            .client
            .get(format!("/login?next={}", crate::common::urlencode(&next)))
            .dispatch()
            .await;
        assert!(
            r.status().class().is_redirection(),
            "{round} {next:?}: {}",
            r.status()
        );
        let r = anonymous
            .client
            .get(format!("/login?next={}", crate::common::urlencode(&next)))
            .dispatch()
            .await;
        assert_eq!(r.status(), Status::Ok, "{round} {next:?}");
    }
}

async fn repeated_wrong_passwords_lock_the_login_out(app: &TestApp) {
    app.user("alice", false).await;
    app.user("bob", false).await;
    let b = browser(app).await;
    let attempt = |password: &'static str| {
        let b = &b;
        async move {
            b.post_form("/login", &[("username", "alice"), ("password", password)])
                .await
        }
    };
    for _ in 1..stored_messages_app::throttle::FREE_FAILURES {
        assert_eq!(
            attempt("wrong-password").await.status(),
            Status::Unauthorized
        );
    }
    let locked = attempt("wrong-password").await;
    assert_eq!(locked.status(), Status::TooManyRequests);
    assert_eq!(locked.headers().get_one("Retry-After"), Some("1"));
    let html = locked.into_string().await.unwrap();
    assert!(html.contains("Too many failed attempts"), "{html}");
    // Even the right password waits; another user does not.
    assert_eq!(
        attempt("horse-battery-9").await.status(),
        Status::TooManyRequests
    );
    let r = b
        .post_form(
            "/login",
            &[("username", "bob"), ("password", "horse-battery-9")],
        )
        .await;
    assert_eq!(r.status(), Status::SeeOther);
}

async fn the_csrf_token_changes_at_login_and_logout(app: &TestApp) {
    app.user("alice", false).await;
    let b = browser(app).await;
    let anonymous = b.csrf_token().await;
    b.login_as("alice").await;
    let logged_in = b.csrf_token().await;
    assert_ne!(anonymous, logged_in, "a new token after login");
    // The old token no longer passes.
    let stale = b
        .client
        .post("/messages/mark_all_read")
        .header(rocket::http::Header::new("X-CSRF-Token", anonymous.clone()))
        .dispatch()
        .await;
    assert_eq!(stale.status(), Status::Forbidden);
    let r = b.post_form("/logout", &[]).await;
    assert!(r.status().class().is_redirection());
    let after = b.csrf_token().await;
    assert_ne!(after, logged_in, "a new token after logout");
}

/// Someone who can plant cookies in the victim's browser (a sibling subdomain) plants their
/// own CSRF cookie and sends its token: refused, because the token belongs to another session.
async fn a_token_is_refused_in_any_other_session(app: &TestApp) {
    use stored_messages::csrf::CSRF_COOKIE;
    use stored_messages_app::users::SESSION_COOKIE;
    app.user("alice", false).await;
    app.user("mallory", false).await;
    let victim = browser(app).await;
    victim.login_as("alice").await;
    let attacker = browser(app).await;
    attacker.login_as("mallory").await;
    let attacker_token = attacker.csrf_token().await;
    let value = |b: &Browser, name: &str| {
        b.client
            .cookies()
            .get_private(name)
            .unwrap()
            .value()
            .to_string()
    };
    let fresh = rocket::local::asynchronous::Client::untracked(app.rocket())
        .await
        .unwrap();
    let post = |session: String, csrf: String, token: String| {
        fresh
            .post("/messages/mark_all_read")
            .private_cookie(rocket::http::Cookie::new(SESSION_COOKIE, session))
            .private_cookie(rocket::http::Cookie::new(CSRF_COOKIE, csrf))
            .header(rocket::http::Header::new("X-CSRF-Token", token))
            .dispatch()
    };
    // The pair works in its own session (so the cookies reach the app as planted)...
    let own = post(
        value(&attacker, SESSION_COOKIE),
        value(&attacker, CSRF_COOKIE),
        attacker_token.clone(),
    )
    .await;
    assert_eq!(own.status(), Status::Ok);
    // ...and nowhere else, nor does a token issued before login.
    let planted = post(
        value(&victim, SESSION_COOKIE),
        value(&attacker, CSRF_COOKIE),
        attacker_token,
    )
    .await;
    assert_eq!(planted.status(), Status::Forbidden);
    let anonymous = browser(app).await;
    let anonymous_token = anonymous.csrf_token().await;
    let before_login = post(
        value(&victim, SESSION_COOKIE),
        value(&anonymous, CSRF_COOKIE),
        anonymous_token,
    )
    .await;
    assert_eq!(before_login.status(), Status::Forbidden);
}

/// Static files and health checks have no forms: no CSRF token is resolved for them (it
/// would ask for the session on every file), so none is set.
async fn static_files_and_health_checks_resolve_no_token(app: &TestApp) {
    let b = browser(app).await;
    for path in ["/static/style.css", "/health", "/health/ready"] {
        let r = b.client.get(path).dispatch().await;
        assert_eq!(r.status(), Status::Ok, "{path}");
        assert!(
            r.headers()
                .get("Set-Cookie")
                .all(|c| !c.starts_with("sm_csrf=")),
            "{path}"
        );
    }
    let r = b.client.get("/login").dispatch().await;
    assert!(r
        .headers()
        .get("Set-Cookie")
        .any(|c| c.starts_with("sm_csrf=")));
}

async fn private_pages_are_not_cached_and_carry_security_headers(app: &TestApp) {
    let (b, _alice) = logged_in(app, "alice").await;
    let page = b.client.get("/").dispatch().await;
    assert_eq!(
        page.headers().get_one("Cache-Control"),
        Some("private, no-store")
    );
    let csp = page
        .headers()
        .get_one("Content-Security-Policy")
        .unwrap_or("");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(
        page.headers().get_one("Referrer-Policy"),
        Some("same-origin")
    );
    for path in ["/inbox", "/archive", "/account"] {
        let page = b.client.get(path).dispatch().await;
        assert_eq!(
            page.headers().get_one("Cache-Control"),
            Some("private, no-store"),
            "{path}"
        );
        assert!(page
            .headers()
            .get_one("Content-Security-Policy")
            .is_some_and(|csp| csp.contains("script-src 'self'")));
    }
    let api = b.client.get("/messages/count").dispatch().await;
    assert_eq!(
        api.headers().get_one("Cache-Control"),
        Some("private, no-store")
    );
    // Static files stay cacheable.
    let css = b.client.get("/static/style.css").dispatch().await;
    assert_eq!(css.headers().get_one("Cache-Control"), None);
    // Every answer, each header once: no framing (as `frame-ancestors 'none'` says), no
    // sniffing, and no policy for a feature browsers have dropped (FLoC).
    let health = b.client.get("/health").dispatch().await;
    for (what, headers) in [
        ("page", page.headers()),
        ("API", api.headers()),
        ("static file", css.headers()),
        ("health", health.headers()),
    ] {
        let all = |name| headers.get(name).collect::<Vec<_>>();
        assert_eq!(all("X-Frame-Options"), ["DENY"], "{what}");
        assert_eq!(all("X-Content-Type-Options"), ["nosniff"], "{what}");
        assert_eq!(all("Referrer-Policy"), ["same-origin"], "{what}");
        assert_eq!(all("Content-Security-Policy").len(), 1, "{what}");
        assert!(all("Permissions-Policy").is_empty(), "{what}");
    }
}

async fn anonymous_stored_level_falls_back_to_flash(app: &TestApp) {
    let b = browser(app).await;
    assert_eq!(
        add(&b, "stored_error", "anonymous stored").await,
        Status::SeeOther
    );
    let (_, html) = b.get_html("/").await;
    assert_eq!(stream_texts(&html), ["anonymous stored"]);
    assert!(
        html.contains("class=\"message stored error\""),
        "keeps its level tag"
    );
}

async fn empty_message_is_dropped(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    let r = b
        .client
        .get("/t/add?level=21&text=%20%20&show=true")
        .dispatch()
        .await;
    assert_eq!(r.into_string().await.unwrap(), "");
    // below min_level is dropped too
    b.client.get("/t/add?level=10&text=debug").dispatch().await;
    b.client
        .get("/t/add?level=11&text=stored%20debug")
        .dispatch()
        .await;
    assert!(TestApp::inbox_texts(&b, alice).await.is_empty());
    let (_, html) = b.get_html("/").await;
    assert!(stream_texts(&html).is_empty());
    // and the form says why instead of adding nothing silently
    assert_eq!(add(&b, "info", "").await, Status::UnprocessableEntity);
}

async fn stored_and_flash_consumed_together(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    let r = b.client.get("/t/add?level=21&text=s1").dispatch().await;
    assert_eq!(r.status(), Status::Ok);
    b.client.get("/t/add?level=20&text=f1").dispatch().await;
    let r = b
        .client
        .get("/t/add?level=26&text=s2&show=true")
        .dispatch()
        .await;
    assert_eq!(r.into_string().await.unwrap(), "s1|f1|s2");
    assert!(TestApp::inbox_texts(&b, alice).await.is_empty());
    let (_, html) = b.get_html("/").await;
    assert!(stream_texts(&html).is_empty());
}

async fn helpers_show_twenty_messages_for_a_user(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    let store = TestApp::store(&b);
    for i in 0..20 {
        store
            .add_message_for(
                &[alice],
                NewMessage::new(Level::STORED_INFO, &format!("msg {i:02}")).unwrap(),
            )
            .await
            .unwrap();
    }
    let (_, html) = b.get_html("/inbox").await;
    assert!(html.contains("data-unread-count>20</span>"), "count helper");
    let inbox = html
        .split("stored-messages-inbox")
        .nth(1)
        .expect("list helper");
    assert_eq!(
        inbox.matches("<li class=\"message stored info\"").count(),
        20,
        "the inbox page lists them all"
    );
    assert!(inbox.contains("msg 00") && inbox.contains("msg 19"));
    assert_eq!(
        TestApp::inbox_texts(&b, alice).await.len(),
        20,
        "the inbox page marks nothing read"
    );
    let (_, html) = b.get_html("/archive").await;
    let archive = html
        .split("stored-messages-archive")
        .nth(1)
        .expect("archive helper");
    assert_eq!(
        archive.matches("<li class=\"message stored info\"").count(),
        20
    );
}

async fn helpers_are_empty_for_an_anonymous_visitor(app: &TestApp) {
    let alice = app.user("alice", false).await.user_id();
    let b = browser(app).await;
    TestApp::store(&b)
        .add_message_for(
            &[alice],
            NewMessage::new(Level::STORED_INFO, "private").unwrap(),
        )
        .await
        .unwrap();
    let (status, html) = b.get_html("/").await;
    assert_eq!(status, Status::Ok);
    assert!(!html.contains("private"));
    assert!(
        !html.contains("<!--stored-messages:"),
        "no marker left unfilled"
    );
}

async fn message_arriving_after_render_stays_unread(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    add(&b, "stored_info", "early").await;
    let r = b.client.get("/t/show_then_arrive").dispatch().await;
    assert_eq!(r.into_string().await.unwrap(), "early");
    assert_eq!(
        TestApp::inbox_texts(&b, alice).await,
        ["late"],
        "only what was shown was marked read"
    );
}

async fn message_added_and_not_shown_waits_for_the_next_request(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    b.client
        .get("/t/add?level=21&text=stored%20later")
        .dispatch()
        .await;
    b.client
        .get("/t/add?level=25&text=flash%20later")
        .dispatch()
        .await;
    assert_eq!(TestApp::inbox_texts(&b, alice).await, ["stored later"]);
    let (_, html) = b.get_html("/").await;
    assert_eq!(stream_texts(&html), ["stored later", "flash later"]);
}

async fn tampered_or_garbage_cookies_are_ignored(app: &TestApp) {
    let b = browser(app).await;
    // A valid sealed flash cookie first, then a browser that sends it tampered, with garbage
    // in every other cookie we read.
    b.client.get("/t/add?level=20&text=real").dispatch().await;
    let mut sealed = b
        .client
        .cookies()
        .get("sm_flash")
        .unwrap()
        .value()
        .to_string();
    let flipped = if &sealed[10..11] == "A" { "B" } else { "A" };
    sealed.replace_range(10..11, flipped);
    let rocket = app.rocket().mount("/", routes![add_route]);
    let untracked = rocket::local::asynchronous::Client::untracked(rocket)
        .await
        .unwrap();
    let cookies = [
        ("sm_flash", sealed.as_str()),
        ("sm_flash_spill", "not-a-key"),
        ("sm_session", "garbage"),
        ("sm_csrf", "%%%"),
        ("_flash", "1:\u{e9}x"),
    ];
    let request = untracked.get("/").cookies(
        cookies
            .iter()
            .map(|(n, v)| Cookie::new(n.to_string(), v.to_string()))
            .collect::<Vec<_>>(),
    );
    let response = request.dispatch().await;
    assert_eq!(response.status(), Status::Ok);
    let html = response.into_string().await.unwrap();
    assert!(stream_texts(&html).is_empty(), "{:?}", stream_texts(&html));
    assert!(html.contains("Log in"), "tampered session is anonymous");
    // and the untampered cookie still works in the original browser
    let (_, html) = b.get_html("/").await;
    assert_eq!(stream_texts(&html), ["real"]);
}

async fn fifty_long_flash_messages_all_come_back_in_order(app: &TestApp) {
    let b = browser(app).await;
    let r = b.client.get("/t/add_many?n=50&len=300").dispatch().await;
    assert_eq!(r.status(), Status::Ok);
    for cookie in b.client.cookies().iter() {
        assert!(
            cookie.value().len() < 4000,
            "cookie {} is {} bytes",
            cookie.name(),
            cookie.value().len()
        );
    }
    let (_, html) = b.get_html("/").await;
    let texts = stream_texts(&html);
    let expected: Vec<String> = (0..50)
        .map(|i| format!("{i:02}:{}", "x".repeat(300)))
        .collect();
    assert_eq!(texts, expected);
    let (_, html) = b.get_html("/").await;
    assert!(stream_texts(&html).is_empty());
}

async fn script_text_is_escaped(app: &TestApp) {
    let (b, _) = logged_in(app, "alice").await;
    add(&b, "stored_info", "<script>alert(1)</script>").await;
    add(&b, "info", "<img src=x onerror=alert(2)>").await;
    let (_, html) = b.get_html("/?keep=1").await;
    assert!(!html.contains("<script>alert(1)"));
    assert!(!html.contains("<img src=x"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;&#x2F;script&gt;"));
}

async fn javascript_url_is_refused_and_nothing_changes(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    let html = refused_demo(
        &b,
        &[
            ("level", "stored_info"),
            ("message", "click"),
            ("url", "javascript:alert(1)"),
        ],
    )
    .await;
    assert!(html.contains("Invalid url"), "field error shown");
    assert!(
        html.contains("value=\"javascript:alert(1)\""),
        "entered value kept"
    );
    // The error quotes a control character as an escape, not as the character.
    let html = refused_demo(
        &b,
        &[
            ("level", "stored_info"),
            ("message", "click"),
            ("url", "/a\u{1b}b"),
        ],
    )
    .await;
    assert!(
        html.contains("Invalid url &quot;&#x2F;a\\u{1b}b&quot;"),
        "{html}"
    );
    assert!(TestApp::inbox_texts(&b, alice).await.is_empty());
    for (level, status) in [
        ("urgent", Status::UnprocessableEntity),
        ("2.5", Status::UnprocessableEntity),
    ] {
        assert_eq!(add(&b, level, "x").await, status, "level {level}");
    }
    let too_long = "x".repeat(4001);
    assert_eq!(
        add(&b, "stored_info", &too_long).await,
        Status::UnprocessableEntity
    );
    assert!(TestApp::inbox_texts(&b, alice).await.is_empty());
    // every field's error at once
    let html = refused_demo(
        &b,
        &[
            ("level", "info"),
            ("message", ""),
            ("url", "data:text/html,x"),
        ],
    )
    .await;
    assert!(
        html.contains("Enter a message.") && html.contains("Invalid url"),
        "both errors"
    );
    // a level the form does not offer: its error, and the select back on the usual level
    // (not on its first option, which drops messages)
    let html = refused_demo(&b, &[("level", "bogus"), ("message", "hello")]).await;
    assert!(html.contains("level-error"), "{html}");
    assert!(html.contains("value=\"stored_info\" selected>"), "{html}");
    assert_eq!(html.matches(" selected>").count(), 1, "{html}");
    // none at all: said in words, not as an unknown level ""
    let html = refused_demo(&b, &[("level", ""), ("message", "hello")]).await;
    assert!(html.contains("Choose a level."), "{html}");
}

/// The demo form's page after `fields` were refused (422).
async fn refused_demo(b: &Browser, fields: &[(&str, &str)]) -> String {
    let r = b.post_form("/demo/message", fields).await;
    assert_eq!(r.status(), Status::UnprocessableEntity, "{fields:?}");
    r.into_string().await.unwrap()
}

async fn missing_or_wrong_csrf_token_is_refused_and_nothing_changes(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    let r = b
        .client
        .post("/demo/message")
        .header(rocket::http::ContentType::Form)
        .body("level=stored_info&message=forged")
        .dispatch()
        .await;
    assert_eq!(r.status(), Status::Forbidden);
    assert!(r.into_string().await.unwrap().contains("security token"));
    let r = b
        .client
        .post("/demo/message")
        .header(rocket::http::ContentType::Form)
        .body("csrf_token=wrongwrongwrongwrongwrongwrongwrongwrongwro&level=stored_info&message=forged")
        .dispatch()
        .await;
    assert_eq!(r.status(), Status::Forbidden);
    let r = b.client.post("/logout").dispatch().await;
    assert_eq!(r.status(), Status::Forbidden);
    assert!(TestApp::inbox_texts(&b, alice).await.is_empty());
    let (_, html) = b.get_html("/").await;
    assert!(html.contains("Log out alice"), "still logged in");
    // the header form works too
    let token = b.csrf_token().await;
    let r = b
        .client
        .post("/logout")
        .header(rocket::http::Header::new("X-CSRF-Token", token))
        .dispatch()
        .await;
    assert_eq!(r.status(), Status::SeeOther);
}

async fn rocket_flash_joins_the_stream(app: &TestApp) {
    let b = browser(app).await;
    let r = b.client.get("/t/flash").dispatch().await;
    assert_redirect(&r, "/");
    let (_, html) = b.get_html("/").await;
    assert_eq!(stream_texts(&html), ["Saved with Rocket&#x27;s Flash"]);
    assert!(html.contains("class=\"message success\""));
    let (_, html) = b.get_html("/").await;
    assert!(stream_texts(&html).is_empty());
}

async fn error_response_keeps_flash_and_leaves_stored_unread(app: &TestApp) {
    let (b, alice) = logged_in(app, "alice").await;
    add(&b, "stored_info", "stored survives").await;
    add(&b, "info", "flash survives").await;
    let r = b.client.get("/t/show_then_fail").dispatch().await;
    assert_eq!(r.status(), Status::InternalServerError);
    assert_eq!(TestApp::inbox_texts(&b, alice).await, ["stored survives"]);
    let (_, html) = b.get_html("/").await;
    assert_eq!(stream_texts(&html), ["stored survives", "flash survives"]);
}

async fn two_users_rendering_at_once_see_their_own_messages(app: &TestApp) {
    let (a, alice) = logged_in(app, "alice").await;
    let (b, bob) = logged_in(app, "bob").await;
    let store = TestApp::store(&a);
    for i in 0..3 {
        store
            .add_message_for(
                &[alice],
                NewMessage::new(Level::STORED_INFO, &format!("for alice {i}")).unwrap(),
            )
            .await
            .unwrap();
    }
    store
        .add_message_for(
            &[bob],
            NewMessage::new(Level::STORED_INFO, "for bob").unwrap(),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        let ((_, ha), (_, hb)) = tokio::join!(a.get_html("/?keep=1"), b.get_html("/?keep=1"));
        assert!(ha.contains(">3</span>") && ha.contains("for alice 2") && !ha.contains("for bob"));
        assert!(hb.contains(">1</span>") && hb.contains("for bob") && !hb.contains("for alice"));
    }
}

async fn login_refuses_wrong_passwords_and_honours_next(app: &TestApp) {
    app.user("alice", false).await;
    let b = browser(app).await;
    let r = b
        .post_form(
            "/login",
            &[("username", "alice"), ("password", "wrong-password")],
        )
        .await;
    assert_eq!(r.status(), Status::Unauthorized);
    let html = r.into_string().await.unwrap();
    assert!(
        html.contains("Unknown username or wrong password") && html.contains("value=\"alice\"")
    );
    let r = b
        .post_form(
            "/login",
            &[("username", "nobody"), ("password", "horse-battery-9")],
        )
        .await;
    assert_eq!(r.status(), Status::Unauthorized);
    // Longer than any username or password can be: no account has them (not "enter a
    // username and a password", which were both entered).
    let long_name = "a".repeat(65);
    let long_password = "p".repeat(4097);
    for (username, password) in [
        (long_name.as_str(), "horse-battery-9"),
        ("alice", long_password.as_str()),
    ] {
        let r = b
            .post_form("/login", &[("username", username), ("password", password)])
            .await;
        assert_eq!(r.status(), Status::Unauthorized);
        let html = r.into_string().await.unwrap();
        assert!(
            html.contains("Unknown username or wrong password"),
            "{html}"
        );
    }
    let r = b
        .post_form("/login", &[("username", ""), ("password", "")])
        .await;
    assert_eq!(r.status(), Status::UnprocessableEntity);
    let html = r.into_string().await.unwrap();
    assert!(html.contains("Enter a username and a password"), "{html}");
    let r = b
        .post_form(
            "/login",
            &[
                ("username", "alice"),
                ("password", "horse-battery-9"),
                ("next", "https://evil.example"),
            ],
        )
        .await;
    assert_redirect(&r, "/");
    let b = browser(app).await;
    let r = b
        .post_form(
            "/login",
            &[
                ("username", "alice"),
                ("password", "horse-battery-9"),
                ("next", "/archive"),
            ],
        )
        .await;
    assert_redirect(&r, "/archive");
}

async fn logout_ends_the_session(app: &TestApp) {
    let (b, _) = logged_in(app, "alice").await;
    // A copy of the session cookie taken before logout (as a thief would keep it).
    let stolen = b
        .client
        .cookies()
        .get_private(stored_messages_app::users::SESSION_COOKIE)
        .expect("a session cookie");
    let thief = browser(app).await;
    let before = thief
        .client
        .get("/messages/count")
        .private_cookie(stolen.clone())
        .dispatch()
        .await;
    assert_eq!(
        before.status(),
        Status::Ok,
        "the copy works while the session lasts"
    );
    let r = b.post_form("/logout", &[]).await;
    assert_redirect(&r, "/login");
    let (_, html) = b.get_html("/login").await;
    assert!(html.contains("You are logged out."));
    let r = b.client.get("/archive").dispatch().await;
    assert_redirect(&r, "/login?next=/archive");
    // Ended for good: the copy is worth nothing now.
    let after = thief
        .client
        .get("/messages/count")
        .private_cookie(stolen)
        .dispatch()
        .await;
    assert_eq!(after.status(), Status::Unauthorized);
}

async fn ending_all_sessions_logs_a_user_out_everywhere(app: &TestApp) {
    let (first, _) = logged_in(app, "alice").await;
    let second = browser(app).await;
    second.login_as("alice").await;
    for b in [&first, &second] {
        assert_eq!(
            b.client.get("/messages/count").dispatch().await.status(),
            Status::Ok
        );
    }
    let alice = app.users.by_name("alice").await.unwrap().unwrap();
    // A password change ends every session of the user.
    assert_eq!(
        app.users
            .set_password(&alice, "another-secret-7")
            .await
            .unwrap(),
        2
    );
    for b in [&first, &second] {
        let r = b.client.get("/messages/count").dispatch().await;
        assert_eq!(r.status(), Status::Unauthorized);
    }
}

/// The account page changes the password (checked as a login is, the new one as for a new
/// user) and logs the user out everywhere else; this browser stays logged in.
async fn changing_the_password_ends_the_other_sessions(app: &TestApp) {
    let (here, _) = logged_in(app, "alice").await;
    let elsewhere = browser(app).await;
    elsewhere.login_as("alice").await;
    let (status, html) = here.get_html("/account").await;
    assert_eq!(status, Status::Ok);
    assert!(html.contains("Change your password"), "{html}");
    // Bad input: each error names its field, nothing changes.
    for (fields, status, error) in [
        (
            [
                ("current", "wrong-password-1"),
                ("new", "another-secret-7"),
                ("confirm", "another-secret-7"),
            ],
            Status::UnprocessableEntity,
            "The current password is wrong.",
        ),
        (
            [
                ("current", "horse-battery-9"),
                ("new", "password"),
                ("confirm", "password"),
            ],
            Status::UnprocessableEntity,
            "too easy to guess",
        ),
        (
            [
                ("current", "horse-battery-9"),
                ("new", "another-secret-7"),
                ("confirm", "another-secret-8"),
            ],
            Status::UnprocessableEntity,
            "The two new passwords differ.",
        ),
    ] {
        let r = here.post_form("/account/password", &fields).await;
        assert_eq!(r.status(), status, "{fields:?}");
        let html = r.into_string().await.unwrap();
        assert!(html.contains(error), "{error}: {html}");
        assert!(
            html.contains("aria-invalid=\"true\""),
            "the field is marked"
        );
    }
    // Every error at once: the wrong current password, the short new one, and the two new
    // ones that differ, each on its field.
    let r = here
        .post_form(
            "/account/password",
            &[
                ("current", "wrong-password-1"),
                ("new", "short"),
                ("confirm", "different"),
            ],
        )
        .await;
    assert_eq!(r.status(), Status::UnprocessableEntity);
    let html = r.into_string().await.unwrap();
    for error in [
        "The current password is wrong.",
        "too short",
        "The two new passwords differ.",
    ] {
        assert!(html.contains(error), "{error}: {html}");
    }
    assert_eq!(html.matches("aria-invalid=\"true\"").count(), 3, "{html}");
    assert_eq!(
        elsewhere
            .client
            .get("/messages/count")
            .dispatch()
            .await
            .status(),
        Status::Ok,
        "nothing changed yet"
    );
    let r = here
        .post_form(
            "/account/password",
            &[
                ("current", "horse-battery-9"),
                ("new", "another-secret-7"),
                ("confirm", "another-secret-7"),
            ],
        )
        .await;
    assert_redirect(&r, "/account");
    let (_, html) = here.get_html("/account").await;
    assert!(
        html.contains("your 1 other session was logged out"),
        "{html}"
    );
    assert_eq!(
        here.client.get("/messages/count").dispatch().await.status(),
        Status::Ok,
        "this session stays"
    );
    assert_eq!(
        elsewhere
            .client
            .get("/messages/count")
            .dispatch()
            .await
            .status(),
        Status::Unauthorized,
        "the other one ended"
    );
    // Its login page says why, once.
    let (_, html) = elsewhere.get_html("/login").await;
    assert!(html.contains("Your session has ended"), "{html}");
    let (_, html) = elsewhere.get_html("/login").await;
    assert!(!html.contains("Your session has ended"), "said once");
    // The new password logs in, the old one does not.
    let again = browser(app).await;
    let old = again
        .post_form(
            "/login",
            &[("username", "alice"), ("password", "horse-battery-9")],
        )
        .await;
    assert_eq!(old.status(), Status::Unauthorized);
    let new = again
        .post_form(
            "/login",
            &[("username", "alice"), ("password", "another-secret-7")],
        )
        .await;
    assert_eq!(new.status(), Status::SeeOther);
    // Anonymous visitors are sent to log in first.
    let anonymous = browser(app).await;
    let r = anonymous.client.get("/account").dispatch().await;
    assert_redirect(&r, "/login?next=/account");
}

/// An admin can log a user out everywhere from `/admin`.
async fn an_admin_ends_a_users_sessions(app: &TestApp) {
    let (alice, _) = logged_in(app, "alice").await;
    app.user("boss", true).await;
    let admin = browser(app).await;
    admin.login_as("boss").await;
    let r = admin
        .post_form("/admin/sessions/end", &[("username", "nobody")])
        .await;
    assert_eq!(r.status(), Status::UnprocessableEntity);
    assert!(r
        .into_string()
        .await
        .unwrap()
        .contains("There is no user named “nobody”."));
    // Not for non-admins.
    let r = alice
        .post_form("/admin/sessions/end", &[("username", "alice")])
        .await;
    assert_eq!(r.status(), Status::Forbidden);
    let r = admin
        .post_form("/admin/sessions/end", &[("username", "Alice")])
        .await;
    assert_redirect(&r, "/admin#stored-messages");
    let (_, html) = admin.get_html("/admin").await;
    assert!(html.contains("Ended 1 session of alice."), "{html}");
    assert_eq!(
        alice
            .client
            .get("/messages/count")
            .dispatch()
            .await
            .status(),
        Status::Unauthorized
    );
}

/// A broadcast makes every live stream check its session at once: the batch answers each
/// session as a check of its own would (live and of that user: yes; another user's, ended,
/// expired or unknown: no), from the database, then from the session cache, and in more
/// than one query for more than 500 sessions.
async fn live_streams_check_their_sessions_many_at_once(app: &TestApp) {
    use std::time::Duration;
    use stored_messages::Host;
    let alice = app.user("alice", false).await;
    let bob = app.user("bob", false).await;
    let day = Duration::from_secs(86_400);
    let users = &app.users;
    let a1 = users.start_session(alice.id, day).await.unwrap();
    let a2 = users.start_session(alice.id, day).await.unwrap();
    let b1 = users.start_session(bob.id, day).await.unwrap();
    let ended = users.start_session(bob.id, day).await.unwrap();
    users.end_session(&ended, bob.id).await.unwrap();
    let expired = users.start_session(alice.id, Duration::ZERO).await.unwrap();
    let host = stored_messages_app::users::AppHost::new(users.clone());
    let (a, b) = (alice.user_id(), bob.user_id());
    let asks = [
        (a, a1.as_str()),
        (b, a2.as_str()),
        (b, b1.as_str()),
        (b, ended.as_str()),
        (a, expired.as_str()),
        (a, "no-such-session"),
        (a, a1.as_str()),
        (a, a2.as_str()),
    ];
    let expected = vec![true, false, true, false, false, false, true, true];
    // The first round fills the cache, the second answers from it.
    for _ in 0..2 {
        assert_eq!(host.sessions_active(&asks).await, expected);
        for ((user, session), want) in asks.iter().zip(&expected) {
            assert_eq!(
                host.session_active(*user, session).await,
                *want,
                "{session}"
            );
        }
    }
    assert_eq!(host.sessions_active(&[]).await, Vec::<bool>::new());
    // 600 sessions: two queries.
    let mut many = Vec::new();
    for i in 0..600 {
        let user = if i % 3 == 0 { &bob } else { &alice };
        many.push((
            user.user_id(),
            users.start_session(user.id, day).await.unwrap(),
        ));
    }
    let asks: Vec<(UserId, &str)> = many.iter().map(|(u, s)| (*u, s.as_str())).collect();
    assert_eq!(host.sessions_active(&asks).await, vec![true; 600]);
    // Alice logs out everywhere: hers are refused at once, bob's go on.
    users.end_sessions(alice.id).await.unwrap();
    let after: Vec<bool> = asks.iter().map(|(u, _)| *u == b).collect();
    assert_eq!(host.sessions_active(&asks).await, after);
}

async fn error_pages_know_who_is_logged_in(app: &TestApp) {
    let (b, _) = logged_in(app, "alice").await;
    let (status, html) = b.get_html("/nowhere").await;
    assert_eq!(status, Status::NotFound);
    assert!(html.contains("Log out alice"), "header of the error page");
}

async fn archive_needs_login(app: &TestApp) {
    let b = browser(app).await;
    let r = b.client.get("/archive").dispatch().await;
    assert_redirect(&r, "/login?next=/archive");
}

async fn first_start_creates_an_admin(app: &TestApp) {
    let _b = browser(app).await;
    let admin = app
        .users
        .by_name("admin")
        .await
        .unwrap()
        .expect("admin created at liftoff");
    assert!(admin.is_admin);
    // A second start does not create another one or change it.
    let _again = browser(app).await;
    assert_eq!(app.users.count().await.unwrap(), 1);
}

/// `/health/ready` answers 200 while the store answers, and 503 once it does not (the
/// schema of this test's PostgreSQL database dropped under the running app).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_store() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let b = browser(&app).await;
    let r = b.client.get("/health/ready").dispatch().await;
    assert_eq!(r.status(), Status::Ok);
    assert_eq!(r.into_string().await.as_deref(), Some("ready"));
    let schema = app.url.split("search_path%3D").nth(1).map(str::to_string);
    let schema = schema.expect("the test's schema in its url");
    {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&crate::common::postgres_url())
            .await
            .unwrap();
        sqlx::query(&format!("drop schema {schema} cascade"))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let r = b.client.get("/health/ready").dispatch().await;
    assert_eq!(r.status(), Status::ServiceUnavailable);
    // `/health` stays the trivial route.
    let r = b.client.get("/health").dispatch().await;
    assert_eq!(r.status(), Status::Ok);
}
