//! The admin area: access rules, broadcast (everyone, named users, unknown users, preview,
//! bad input), background jobs with resume, audit, message browser, delete and cleanup.

use std::sync::Arc;

use rocket::http::Status;
use stored_messages::{Level, ListQuery, NewMessage, UserId};
use stored_messages_app::jobs::Jobs;
use stored_messages_app::users::Users;

use crate::common::{assert_redirect, Browser, TestApp};

app_tests!(
    admin_pages_are_for_admins_only,
    broadcast_to_everyone_reaches_all_and_is_audited,
    broadcast_to_two_named_users_reaches_only_them,
    unknown_usernames_are_all_named_and_nothing_is_sent,
    preview_shows_the_message_and_sends_nothing,
    bad_broadcast_input_is_refused_with_field_errors,
    large_broadcast_runs_in_the_background_and_finishes,
    a_broadcast_to_everyone_asks_first_and_stores_nothing_until_confirmed,
    interrupted_job_resumes_without_delivering_twice,
    message_browser_counts_deletes_and_cleans_up,
    message_browser_pages_go_both_ways,
    audit_pages_go_both_ways,
    message_browser_searches_text_and_recipients,
    background_broadcasts_page_both_ways,
    a_failed_job_says_so_in_words_and_offers_resume,
);

/// A job that failed shows words and a reference to the log, never the database's text,
/// on its page and in its status; its page offers "Resume" (hidden while a job runs).
async fn a_failed_job_says_so_in_words_and_offers_resume(app: &TestApp) {
    // arrange, before the app (and its worker) starts: a job that failed, as the worker
    // records a failure, with the driver's own words
    let ops = app.user("ops", false).await;
    let jobs = Jobs::new(app.users.clone());
    let message = NewMessage::new(Level::STORED_INFO, "will fail")
        .unwrap()
        .into_message(stored_messages::MessageId(1));
    let job = jobs.queue(&message, ops.id, Some(&[])).await.unwrap();
    let sql = "update app_broadcast_jobs set status = 'failed', \
               error = 'error returned from database: (code: 1811) disk I/O error' where id = $1";
    match app.users.pool() {
        stored_messages::SqlPool::Sqlite(pool) => {
            sqlx::query(sql).bind(job.id).execute(pool).await.unwrap();
        }
        stored_messages::SqlPool::Postgres(pool) => {
            sqlx::query(sql).bind(job.id).execute(pool).await.unwrap();
        }
    }
    let b = admin(app).await;
    let (status, html) = b.get_html(&format!("/admin/jobs/{}", job.id)).await;
    assert_eq!(status, Status::Ok);
    assert!(
        !html.contains("1811") && !html.contains("disk I/O"),
        "{html}"
    );
    assert!(
        html.contains(&format!("under “broadcast job {}”", job.id)),
        "{html}"
    );
    assert!(html.contains(&format!("Broadcast #{} stopped", job.id)));
    assert!(
        html.contains("data-job-field=\"resume\" >") || html.contains("data-job-field=\"resume\">")
    );
    let r = b
        .client
        .get(format!("/admin/jobs/{}/status", job.id))
        .dispatch()
        .await;
    let body = r.into_string().await.unwrap();
    assert!(
        !body.contains("1811") && body.contains("server log"),
        "{body}"
    );
}

/// Every background broadcast, 25 a page both ways, each with its text and date.
async fn background_broadcasts_page_both_ways(app: &TestApp) {
    let b = admin(app).await;
    let root = app.users.by_name("root").await.unwrap().unwrap();
    let jobs = Jobs::new(app.users.clone());
    let store = TestApp::store(&b);
    let mut ids = Vec::new();
    for i in 0..30 {
        let message = store
            .backend()
            .create_message(
                &NewMessage::new(Level::STORED_INFO, &format!("job text {i:02}")).unwrap(),
            )
            .await
            .unwrap();
        ids.push(jobs.queue(&message, root.id, Some(&[])).await.unwrap().id);
    }
    let (_, first) = b.get_html("/admin/jobs").await;
    assert!(
        first.contains(">job text 29<")
            && first.contains(">job text 05<")
            && !first.contains(">job text 04<")
    );
    assert!(first.contains("<time datetime=\""), "a date");
    let older = first
        .split("rel=\"next\"")
        .next()
        .and_then(|head| head.rsplit("<a href=\"").next())
        .and_then(|a| a.split('"').next())
        .expect("an Older link")
        .replace("&#x2F;", "/")
        .replace("&amp;", "&");
    let (_, second) = b.get_html(&older).await;
    assert!(second.contains(">job text 04<") && second.contains(">job text 00<"));
    assert!(!second.contains("rel=\"next\""));
    assert!(second.contains("rel=\"prev\""));
    let (status, _) = b.get_html("/admin/jobs?from=0").await;
    assert_eq!(status, Status::BadRequest);
    // the overview links to them
    let (_, overview) = b.get_html("/admin").await;
    assert!(overview.contains("href=\"/admin/jobs\">All background broadcasts"));
}

/// Search by text (any case) and by recipient; the search travels with the pages; an
/// unknown recipient is named.
async fn message_browser_searches_text_and_recipients(app: &TestApp) {
    let b = admin(app).await;
    let alice = app.user("alice", false).await.user_id();
    let bob = app.user("bob", false).await.user_id();
    let store = TestApp::store(&b);
    if store.backend().admin().is_none() {
        return;
    }
    for i in 0..30 {
        let to = if i % 3 == 0 {
            vec![alice, bob]
        } else {
            vec![bob]
        };
        let text = if i % 2 == 0 {
            format!("Disk full #{i:02}")
        } else {
            format!("Backup done #{i:02}")
        };
        store
            .add_message_for(&to, NewMessage::new(Level::STORED_INFO, &text).unwrap())
            .await
            .unwrap();
    }
    // text: 15 "disk" messages, all on one page, newest first
    let (status, html) = b.get_html("/admin/messages?q=DISK").await;
    assert_eq!(status, Status::Ok);
    assert_eq!(html.matches(">Disk full #").count(), 15, "{html}");
    assert!(!html.contains(">Backup done #"));
    assert!(html.contains("15 messages match"));
    // recipient: alice has 10 (every third)
    let (_, html) = b.get_html("/admin/messages?recipient=alice").await;
    assert_eq!(
        html.matches("<td data-label=\"Message\" class=\"text\">")
            .count(),
        10
    );
    // both: alice's disk messages (i = 0, 6, 12, 18, 24)
    let (_, html) = b.get_html("/admin/messages?q=disk&recipient=Alice").await;
    assert_eq!(html.matches(">Disk full #").count(), 5, "{html}");
    assert!(html.contains(">Disk full #24<") && html.contains(">Disk full #00<"));
    // bob's 30 go over two pages, and the search stays in the links
    let (_, html) = b.get_html("/admin/messages?recipient=bob").await;
    let older = html
        .split("rel=\"next\"")
        .next()
        .and_then(|head| head.rsplit("<a href=\"").next())
        .and_then(|a| a.split('"').next())
        .expect("an Older link")
        .replace("&#x2F;", "/")
        .replace("&amp;", "&");
    assert!(older.contains("recipient=bob"), "{older}");
    let (_, html) = b.get_html(&older).await;
    assert_eq!(
        html.matches("<td data-label=\"Message\" class=\"text\">")
            .count(),
        5
    );
    assert!(html.contains(">Backup done #01<") || html.contains(">Disk full #00<"));
    // an unknown recipient is named, with the field marked
    let (status, html) = b.get_html("/admin/messages?recipient=ghost").await;
    assert_eq!(status, Status::UnprocessableEntity);
    assert!(html.contains("There is no user named “ghost”."));
    assert!(html.contains("aria-invalid=\"true\" aria-describedby=\"recipient-error\""));
}

/// The audit lists 25 broadcasts a page, both ways (it stopped at 100 before).
async fn audit_pages_go_both_ways(app: &TestApp) {
    let b = admin(app).await;
    let root = app.users.by_name("root").await.unwrap().unwrap();
    let jobs = Jobs::new(app.users.clone());
    let store = TestApp::store(&b);
    for i in 0..30 {
        let message = store
            .backend()
            .create_message(&NewMessage::new(Level::STORED_INFO, &format!("sent {i:02}")).unwrap())
            .await
            .unwrap();
        jobs.audit(stored_messages_app::jobs::Audit {
            actor: &root,
            message: &message,
            audience: "everyone",
            audience_size: 1,
            duration_ms: Some(1),
            job_id: None,
        })
        .await
        .unwrap();
    }
    let (_, first) = b.get_html("/admin/audit").await;
    assert!(
        first.contains(">sent 29<") && first.contains(">sent 05<") && !first.contains(">sent 04<")
    );
    let (_, second) = b
        .get_html(&pager_link(&first, "next").expect("Older"))
        .await;
    assert!(second.contains(">sent 04<") && second.contains(">sent 00<"));
    assert_eq!(pager_link(&second, "next"), None);
    let (_, back) = b
        .get_html(&pager_link(&second, "prev").expect("Newer"))
        .await;
    assert!(back.contains(">sent 29<"));
    let (status, _) = b.get_html("/admin/audit?from=-3").await;
    assert_eq!(status, Status::BadRequest);
}

/// The message browser lists 25 a page: "Older" goes on, "Newer" comes back; a bad link
/// is a clear 400.
async fn message_browser_pages_go_both_ways(app: &TestApp) {
    let b = admin(app).await;
    let alice = app.user("alice", false).await.user_id();
    let store = TestApp::store(&b);
    if store.backend().admin().is_none() {
        return;
    }
    for i in 0..30 {
        store
            .add_message_for(
                &[alice],
                NewMessage::new(Level::STORED_INFO, &format!("row {i:02}")).unwrap(),
            )
            .await
            .unwrap();
    }
    let (_, first) = b.get_html("/admin/messages").await;
    assert!(
        first.contains(">row 29<") && first.contains(">row 05<") && !first.contains(">row 04<")
    );
    assert_eq!(pager_link(&first, "prev"), None);
    let (_, second) = b
        .get_html(&pager_link(&first, "next").expect("Older"))
        .await;
    assert!(
        second.contains(">row 04<") && second.contains(">row 00<") && !second.contains(">row 05<")
    );
    assert_eq!(pager_link(&second, "next"), None);
    let (_, back) = b
        .get_html(&pager_link(&second, "prev").expect("Newer"))
        .await;
    assert!(back.contains(">row 29<"));
    let (status, _) = b.get_html("/admin/messages?from=abc").await;
    assert_eq!(status, Status::BadRequest);
}

async fn admin(app: &TestApp) -> Browser {
    app.user("root", true).await;
    let b = app.browser_with(app.rocket()).await;
    b.login_as("root").await;
    b
}

fn form<'a>(
    recipients: &'a str,
    usernames: &'a str,
    message: &'a str,
    action: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("recipients", recipients),
        ("usernames", usernames),
        ("level", "stored_warning"),
        ("custom_level", ""),
        ("message", message),
        ("extra_tags", "ops"),
        ("url", "/status"),
        ("action", action),
        // The confirmation step of a broadcast to everyone, already answered (`yes`: whatever
        // the count, as a script of one's own would).
        ("confirmed", "yes"),
    ]
}

async fn admin_pages_are_for_admins_only(app: &TestApp) {
    app.user("alice", false).await;
    let anon = app.browser_with(app.rocket()).await;
    for (path, next) in [
        ("/admin", "/admin"),
        ("/admin/broadcast", "/admin/broadcast"),
        ("/admin/messages", "/admin/messages"),
        // a search comes back as it was
        (
            "/admin/messages?q=a&recipient=b",
            "/admin/messages%3Fq%3Da%26recipient%3Db",
        ),
    ] {
        let r = anon.client.get(path).dispatch().await;
        assert_redirect(&r, &format!("/login?next={next}"));
    }
    let r = anon
        .post_form("/admin/broadcast", &form("everyone", "", "x", "send"))
        .await;
    assert_eq!(r.status(), Status::Unauthorized);
    // login comes back to the admin page
    app.user("root", true).await;
    let r = anon
        .post_form(
            "/login",
            &[
                ("username", "root"),
                ("password", "horse-battery-9"),
                ("next", "/admin/broadcast"),
            ],
        )
        .await;
    assert_redirect(&r, "/admin/broadcast");
    let (status, html) = anon.get_html("/admin/broadcast").await;
    assert_eq!(status, Status::Ok);
    assert!(html.contains("Broadcast a message"));
    // a logged-in non-admin gets 403 everywhere, and cannot send
    let alice = app.browser_with(app.rocket()).await;
    alice.login_as("alice").await;
    for path in [
        "/admin",
        "/admin/broadcast",
        "/admin/messages",
        "/admin/audit",
        "/admin/jobs/1",
    ] {
        let (status, _) = alice.get_html(path).await;
        assert_eq!(status, Status::Forbidden, "{path}");
    }
    let r = alice
        .post_form("/admin/broadcast", &form("everyone", "", "x", "send"))
        .await;
    assert_eq!(r.status(), Status::Forbidden);
    let r = alice.post_form("/admin/cleanup", &[]).await;
    assert_eq!(r.status(), Status::Forbidden);
    // Unknown admin paths and malformed ids are 404 for a logged-in admin, not a login loop
    // (`anon` logged in as root above).
    for path in [
        "/admin/nowhere",
        "/admin/jobs/abc",
        "/admin/messages/x/delete",
    ] {
        let (status, _) = anon.get_html(path).await;
        assert_eq!(status, Status::NotFound, "{path}");
    }
    // the same for the forms' POSTs, and a job that does not exist
    for path in [
        "/admin/messages/x/delete",
        "/admin/jobs/abc/resume",
        "/admin/jobs/999999/resume",
        "/admin/nowhere",
    ] {
        let r = anon.post_form(path, &[]).await;
        assert_eq!(r.status(), Status::NotFound, "POST {path}");
    }
    let (status, _) = alice.get_html("/admin/nowhere").await;
    assert_eq!(status, Status::NotFound);
}

async fn broadcast_to_everyone_reaches_all_and_is_audited(app: &TestApp) {
    let b = admin(app).await;
    let ids: Vec<UserId> = [
        app.user("alice", false).await,
        app.user("bob", false).await,
        app.user("carol", false).await,
    ]
    .iter()
    .map(|u| u.user_id())
    .collect();
    let r = b
        .post_form(
            "/admin/broadcast",
            &form("everyone", "", "Maintenance tonight", "send"),
        )
        .await;
    assert_redirect(&r, "/admin/broadcast#stored-messages");
    let (_, html) = b.get_html("/admin/broadcast").await;
    assert!(
        html.contains("Sent to 4 users in "),
        "flash with count and time"
    );
    for id in ids {
        assert_eq!(TestApp::inbox_texts(&b, id).await, ["Maintenance tonight"]);
    }
    let (_, html) = b.get_html("/admin/audit").await;
    assert!(
        html.contains("Maintenance tonight") && html.contains("root") && html.contains("everyone")
    );
    assert!(
        html.contains(r#"<td data-label="Size" class="num">4</td>"#),
        "audience size"
    );
}

async fn broadcast_to_two_named_users_reaches_only_them(app: &TestApp) {
    let b = admin(app).await;
    let alice = app.user("alice", false).await.user_id();
    let bob = app.user("bob", false).await.user_id();
    let carol = app.user("carol", false).await.user_id();
    let r = b
        .post_form(
            "/admin/broadcast",
            // Typed again in other cases: still two recipients.
            &form("list", "alice,\nbob, ALICE Bob", "Just you two", "send"),
        )
        .await;
    assert_redirect(&r, "/admin/broadcast#stored-messages");
    assert_eq!(TestApp::inbox_texts(&b, alice).await, ["Just you two"]);
    assert_eq!(TestApp::inbox_texts(&b, bob).await, ["Just you two"]);
    assert!(TestApp::inbox_texts(&b, carol).await.is_empty());
    let (_, html) = b.get_html("/admin/broadcast").await;
    assert!(html.contains("Sent to 2 users"), "{html}");
    let (_, html) = b.get_html("/admin/audit").await;
    assert!(
        html.contains("<td data-label=\"Audience\" class=\"wrap\">alice, bob</td>"),
        "{html}"
    );
    assert!(
        html.contains(r#"<td data-label="Size" class="num">2</td>"#),
        "audience size"
    );
}

async fn unknown_usernames_are_all_named_and_nothing_is_sent(app: &TestApp) {
    let b = admin(app).await;
    let alice = app.user("alice", false).await.user_id();
    let r = b
        .post_form(
            "/admin/broadcast",
            &form("list", "alice, ghost, nobody", "hello", "send"),
        )
        .await;
    assert_eq!(r.status(), Status::UnprocessableEntity);
    let html = r.into_string().await.unwrap();
    assert!(html.contains("Unknown users: ghost, nobody."), "all named");
    assert!(html.contains("alice, ghost, nobody"), "entered value kept");
    assert!(TestApp::inbox_texts(&b, alice).await.is_empty());
    let r = b
        .post_form("/admin/broadcast", &form("list", " , ", "hello", "send"))
        .await;
    assert_eq!(r.status(), Status::UnprocessableEntity);
}

async fn preview_shows_the_message_and_sends_nothing(app: &TestApp) {
    let b = admin(app).await;
    let alice = app.user("alice", false).await.user_id();
    let r = b
        .post_form(
            "/admin/broadcast",
            &form("everyone", "", "<b>Look</b> at this", "preview"),
        )
        .await;
    assert_eq!(r.status(), Status::Ok);
    let html = r.into_string().await.unwrap();
    let preview = html
        .split("aria-labelledby=\"preview-title\"")
        .nth(1)
        .expect("preview section");
    assert!(
        preview.contains("class=\"message ops stored warning\""),
        "same partial, same classes"
    );
    assert!(
        preview.contains("&lt;b&gt;Look&lt;&#x2F;b&gt; at this"),
        "escaped"
    );
    assert!(preview.contains("href=\"&#x2F;status\""));
    assert!(
        TestApp::inbox_texts(&b, alice).await.is_empty(),
        "nothing sent"
    );
    // only Send sends: no action, or any other, previews as well
    for action in ["", "destroy"] {
        let mut fields = form("list", "alice", "not to be sent", action);
        if action.is_empty() {
            fields.retain(|(name, _)| *name != "action");
        }
        let r = b.post_form("/admin/broadcast", &fields).await;
        assert_eq!(r.status(), Status::Ok, "action {action:?}");
        assert!(r.into_string().await.unwrap().contains("preview-title"));
    }
    assert!(
        TestApp::inbox_texts(&b, alice).await.is_empty(),
        "nothing sent"
    );
}

async fn bad_broadcast_input_is_refused_with_field_errors(app: &TestApp) {
    let b = admin(app).await;
    let alice = app.user("alice", false).await.user_id();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (form("everyone", "", "", "send"), "message text is empty"),
        (
            form("everyone", "", "x", "send")
                .into_iter()
                .map(|(k, v)| {
                    if k == "url" {
                        (k, "javascript:alert(1)")
                    } else {
                        (k, v)
                    }
                })
                .collect(),
            "invalid url",
        ),
        (
            form("everyone", "", "x", "send")
                .into_iter()
                .map(|(k, v)| if k == "level" { (k, "custom") } else { (k, v) })
                .map(|(k, v)| {
                    if k == "custom_level" {
                        (k, "20")
                    } else {
                        (k, v)
                    }
                })
                .collect(),
            "level 20 is not a store level",
        ),
        (
            form("everyone", "", "x", "send")
                .into_iter()
                .map(|(k, v)| if k == "level" { (k, "custom") } else { (k, v) })
                .map(|(k, v)| {
                    if k == "custom_level" {
                        (k, "loud")
                    } else {
                        (k, v)
                    }
                })
                .collect(),
            "unknown level &quot;loud&quot;",
        ),
        (
            form("nobody-knows", "", "x", "send"),
            "choose who receives it",
        ),
    ];
    for (fields, expected) in cases {
        let r = b.post_form("/admin/broadcast", &fields).await;
        assert_eq!(r.status(), Status::UnprocessableEntity, "{expected}");
        let html = r.into_string().await.unwrap().to_lowercase();
        assert!(html.contains(expected), "{expected}");
    }
    // every field's error at once, even with a bad level
    let mut fields = form("everyone", "", "", "send");
    for (k, v) in fields.iter_mut() {
        match *k {
            "level" => *v = "custom",
            "custom_level" => *v = "loud",
            "url" => *v = "javascript:alert(1)",
            _ => {}
        }
    }
    let r = b.post_form("/admin/broadcast", &fields).await;
    let html = r.into_string().await.unwrap();
    assert!(
        html.contains("Unknown level")
            && html.contains("Invalid url")
            && html.contains("Message text is empty")
    );
    // one summary, first in the form, taking focus, each error linked to its field
    let summary = html
        .split("class=\"error-summary\" tabindex=\"-1\" autofocus")
        .nth(1)
        .expect("an error summary that takes focus")
        .split("</div>")
        .next()
        .unwrap();
    for field in ["custom_level", "message", "url"] {
        assert!(
            summary.contains(&format!("<a href=\"#{field}\">")),
            "{field}: {summary}"
        );
    }
    let long = "y".repeat(4001);
    let r = b
        .post_form("/admin/broadcast", &form("everyone", "", &long, "send"))
        .await;
    assert_eq!(r.status(), Status::UnprocessableEntity);
    assert!(TestApp::inbox_texts(&b, alice).await.is_empty());
    let r = b
        .client
        .post("/admin/broadcast")
        .header(rocket::http::ContentType::Form)
        .body("message=x")
        .dispatch()
        .await;
    assert_eq!(r.status(), Status::Forbidden, "no CSRF token");
}

async fn large_broadcast_runs_in_the_background_and_finishes(app: &TestApp) {
    let figment = app.figment().merge(("admin.background_threshold", 2));
    app.user("root", true).await;
    let ids: Vec<UserId> = {
        let mut ids = Vec::new();
        for i in 0..6 {
            ids.push(app.user(&format!("user{i}"), false).await.user_id());
        }
        ids
    };
    let b = app
        .browser_with(stored_messages_app::rocket_from(figment))
        .await;
    b.login_as("root").await;
    let r = b
        .post_form(
            "/admin/broadcast",
            &form("everyone", "", "Big news", "send"),
        )
        .await;
    assert_eq!(r.status(), Status::SeeOther);
    let location = r.headers().get_one("Location").unwrap().to_string();
    assert!(location.starts_with("/admin/jobs/"), "{location}");
    let (status, html) = b.get_html(&location).await;
    assert_eq!(status, Status::Ok);
    assert!(html.contains("<progress"));
    // The worker runs on the server's runtime; wait for it, bounded.
    let mut status = rocket::serde::json::Value::Null;
    for _ in 0..500 {
        let r = b.client.get(format!("{location}/status")).dispatch().await;
        status = r.into_json().await.unwrap();
        if status["status"] != "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status["status"], "done", "{status}");
    assert_eq!(status["delivered"], 7);
    for id in ids {
        assert_eq!(TestApp::inbox_texts(&b, id).await, ["Big news"]);
    }
    let (_, html) = b.get_html("/admin/audit").await;
    assert!(
        html.contains("Big news") && html.contains(" ms</td>"),
        "audit has the duration once done"
    );
}

async fn interrupted_job_resumes_without_delivering_twice(app: &TestApp) {
    let root = app.user("root", true).await;
    let mut ids = vec![root.user_id()];
    for i in 0..12 {
        ids.push(app.user(&format!("u{i}"), false).await.user_id());
    }
    // No app is running, so no worker races this test's own run of the job.
    let users: Arc<Users> = app.users.clone();
    let host = Arc::new(stored_messages_app::users::AppHost::new(users.clone()));
    let store = stored_messages::Store::connect(&app.figment(), host)
        .await
        .unwrap();
    let jobs = Jobs::new(users);
    // A job that crashed after delivering to some users, before recording its progress.
    let message = store
        .backend()
        .create_message(&NewMessage::new(Level::STORED_INFO, "resumed").unwrap())
        .await
        .unwrap();
    let job = jobs.queue(&message, root.id, None).await.unwrap();
    store.deliver_once(&ids[..5], &message).await.unwrap();
    store.mark_read(ids[1], message.id).await.unwrap();
    // restart: the job runs again from its last recorded cursor
    assert!(jobs.run_next(&store).await.unwrap(), "the job is claimed");
    assert!(!jobs.run_next(&store).await.unwrap(), "and only once");
    let done = jobs.get(job.id).await.unwrap().unwrap();
    assert_eq!(done.status, "done");
    assert_eq!(
        done.delivered as usize,
        ids.len(),
        "every user is covered, those reached before the interruption too"
    );
    for (i, id) in ids.iter().enumerate() {
        let archive = store
            .backend()
            .archive_list(*id, ListQuery::ALL)
            .await
            .unwrap();
        assert_eq!(archive.len(), 1, "user {i} has it exactly once");
        let unread = store.backend().inbox_count(*id).await.unwrap();
        assert_eq!(unread, u64::from(i != 1), "user {i}: read stays read");
    }
}

async fn message_browser_counts_deletes_and_cleans_up(app: &TestApp) {
    let b = admin(app).await;
    let alice = app.user("alice", false).await.user_id();
    let bob = app.user("bob", false).await.user_id();
    let store = TestApp::store(&b);
    let old_date = chrono::Utc::now() - chrono::Duration::days(40);
    let old =
        NewMessage::parse(Level::STORED_INFO, "old unread", "", None, Some(old_date)).unwrap();
    store.add_message_for(&[alice, bob], old).await.unwrap();
    let doomed = store
        .add_message_for(
            &[alice, bob],
            NewMessage::new(Level::STORED_INFO, "to delete").unwrap(),
        )
        .await
        .unwrap()
        .message;
    store.mark_read(bob, doomed.id).await.unwrap();
    let (status, html) = b.get_html("/admin/messages").await;
    assert_eq!(status, Status::Ok);
    assert!(
        html.contains("to delete")
            && html.contains(r#"<td data-label="Recipients" class="num">2</td>"#)
            && html.contains(r#"<td data-label="Unread" class="num"><span>1</span></td>"#),
        "recipient and unread counts"
    );
    assert!(
        html.contains("expired</span>"),
        "old unread entries are flagged"
    );
    // and say why in words a screen reader reads, not only in a tooltip
    assert!(
        html.contains("<span class=\"visually-hidden\">: unread entries older than 30 days"),
        "{html}"
    );
    // delete, after a confirmation page
    let (status, html) = b
        .get_html(&format!("/admin/messages/{}/delete", doomed.id))
        .await;
    assert_eq!(status, Status::Ok);
    assert!(html.contains("all 2 recipients"));
    let r = b
        .post_form(&format!("/admin/messages/{}/delete", doomed.id), &[])
        .await;
    assert_redirect(&r, "/admin/messages#stored-messages");
    assert!(store
        .backend()
        .archive_list(bob, ListQuery::ALL)
        .await
        .unwrap()
        .iter()
        .all(|m| m.id != doomed.id));
    let (_, html) = b.get_html("/admin/messages").await;
    assert!(html.contains("deleted from 2 inboxes and archives"));
    let (status, _) = b
        .get_html(&format!("/admin/messages/{}/delete", doomed.id))
        .await;
    assert_eq!(status, Status::NotFound);
    // Sent again (a second click, a page left open): said in words.
    let r = b
        .post_form(&format!("/admin/messages/{}/delete", doomed.id), &[])
        .await;
    assert_redirect(&r, "/admin/messages#stored-messages");
    let (_, html) = b.get_html("/admin/messages").await;
    assert!(
        html.contains(&format!(
            "Message {} no longer exists: it was deleted already.",
            doomed.id
        )),
        "{html}"
    );
    // cleanup reports what it removed
    let r = b.post_form("/admin/cleanup", &[]).await;
    assert_redirect(&r, "/admin/messages#stored-messages");
    let (_, html) = b.get_html("/admin/messages").await;
    assert!(
        html.contains("Cleanup removed 2 expired inbox entries and 0 expired messages."),
        "{html}"
    );
}

/// No recipient is chosen by default; a broadcast to everyone shows the exact count and the
/// preview, stores nothing, and sends only once confirmed.
async fn a_broadcast_to_everyone_asks_first_and_stores_nothing_until_confirmed(app: &TestApp) {
    let b = admin(app).await;
    let alice = app.user("alice", false).await.user_id();
    let (_, page) = b.get_html("/admin/broadcast").await;
    assert!(!page.contains("checked"), "no recipient chosen by default");
    // Without a choice: an error for the field, nothing sent.
    let mut fields = form("everyone", "", "Are you sure", "send");
    fields.retain(|(k, _)| *k != "recipients" && *k != "confirmed");
    let r = b.post_form("/admin/broadcast", &fields).await;
    assert_eq!(r.status(), Status::UnprocessableEntity);
    let html = r.into_string().await.unwrap();
    assert!(html.contains("Choose who receives it"), "{html}");
    // The error is the group's (its radios), not the usernames field's.
    assert!(
        html.contains(r#"<fieldset aria-describedby="recipients-error">"#),
        "{html}"
    );
    assert!(html.contains(r#"id="recipients-error""#), "{html}");
    assert_eq!(html.matches(r#"aria-invalid="true""#).count(), 2, "{html}");
    assert!(!html.contains("usernames-error"), "{html}");
    // Everyone, not confirmed: the question, with the count and the text.
    let mut fields = form("everyone", "", "Are you sure", "send");
    fields.retain(|(k, _)| *k != "confirmed");
    let r = b.post_form("/admin/broadcast", &fields).await;
    assert_eq!(r.status(), Status::Ok);
    let html = r.into_string().await.unwrap();
    assert!(html.contains("Send this to everyone (2 users)?"), "{html}");
    assert!(html.contains("Are you sure"));
    assert!(html.contains("name=\"confirmed\" value=\"2\""), "{html}");
    // Said yes to another count (a user was added or removed since): asked again, with the
    // new count, and nothing sent.
    let mut fields = form("everyone", "", "Are you sure", "send");
    fields.retain(|(k, _)| *k != "confirmed");
    fields.push(("confirmed", "1"));
    let r = b.post_form("/admin/broadcast", &fields).await;
    assert_eq!(r.status(), Status::Ok);
    let html = r.into_string().await.unwrap();
    assert!(
        html.contains("the number of users changed since you were asked (1 then, 2 now)"),
        "{html}"
    );
    assert!(html.contains("Send this to everyone (2 users)?"), "{html}");
    let store = TestApp::store(&b);
    assert!(
        store
            .backend()
            .archive_list(alice, ListQuery::ALL)
            .await
            .unwrap()
            .is_empty(),
        "nothing stored before the confirmation"
    );
    // Confirmed, for the count asked about: sent.
    fields.retain(|(k, _)| *k != "confirmed");
    fields.push(("confirmed", "2"));
    let r = b.post_form("/admin/broadcast", &fields).await;
    assert!(r.status().class().is_redirection());
    assert_eq!(
        store
            .backend()
            .archive_list(alice, ListQuery::ALL)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// The `href` of a page's pager link `rel` ("next": Older, "prev": Newer), unescaped.
fn pager_link(html: &str, rel: &str) -> Option<String> {
    let pager = html.split("<nav class=\"pager\"").nth(1)?;
    pager
        .split("<a href=\"")
        .skip(1)
        .find(|a| {
            a.split('>')
                .next()
                .unwrap_or("")
                .contains(&format!("rel=\"{rel}\""))
        })
        .and_then(|a| a.split('"').next())
        .map(|href| href.replace("&#x2F;", "/").replace("&amp;", "&"))
}
