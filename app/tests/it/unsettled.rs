//! A page that showed stored messages as read, whose reads the store then refuses: it
//! answers 503, marks nothing, and keeps the browser's flash cookies, so that a reload shows
//! everything again once the store answers. (Sent as it was, the page would say messages
//! left the inbox that are still there.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rocket::http::{Cookie, Status};
use rocket::local::asynchronous::Client;
use rocket::{get, routes, Request};
use rocket_dyn_templates::context;
use stored_messages::backend::sql::SqlBackend;
use stored_messages::backend::{
    BackendError, Cleanup, FlashSpill, MessageAdmin, MessageBackend, Settings, WatchChanges,
};
use stored_messages::config::SecretUrl;
use stored_messages::template::Page;
use stored_messages::{
    BoxError, Config, Error, Host, Level, ListQuery, Message, MessageId, Messages, NewMessage,
    Result, Store, StoredMessages, UserId,
};

/// A SQLite backend whose `inbox_delete_many` (marking read) fails while `failing` is set,
/// as it would with the database gone between loading a page's stream and settling it.
struct MarkingFails {
    inner: Arc<dyn MessageBackend>,
    failing: AtomicBool,
}

#[rocket::async_trait]
impl MessageBackend for MarkingFails {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn can_handle(&self, level: Level) -> bool {
        self.inner.can_handle(level)
    }
    async fn create_message(&self, message: &NewMessage) -> Result<Message> {
        self.inner.create_message(message).await
    }
    async fn archive_store(&self, users: &[UserId], message: &Message) -> Result<u64> {
        self.inner.archive_store(users, message).await
    }
    async fn inbox_store(&self, users: &[UserId], message: &Message) -> Result<u64> {
        self.inner.inbox_store(users, message).await
    }
    async fn deliver(&self, users: &[UserId], message: &NewMessage) -> Result<Message> {
        self.inner.deliver(users, message).await
    }
    async fn inbox_list(&self, user: UserId, query: ListQuery) -> Result<Vec<Message>> {
        self.inner.inbox_list(user, query).await
    }
    async fn inbox_count(&self, user: UserId) -> Result<u64> {
        self.inner.inbox_count(user).await
    }
    async fn inbox_get(&self, user: UserId, id: MessageId) -> Result<Message> {
        self.inner.inbox_get(user, id).await
    }
    async fn inbox_delete_many(&self, user: UserId, ids: &[MessageId]) -> Result<Vec<MessageId>> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::Backend(BackendError::Sql(sqlx::Error::PoolTimedOut)));
        }
        self.inner.inbox_delete_many(user, ids).await
    }
    async fn inbox_purge(&self, user: UserId) -> Result<u64> {
        self.inner.inbox_purge(user).await
    }
    async fn archive_list(&self, user: UserId, query: ListQuery) -> Result<Vec<Message>> {
        self.inner.archive_list(user, query).await
    }
    async fn expired_messages_cleanup(&self, now: DateTime<Utc>) -> Result<Cleanup> {
        self.inner.expired_messages_cleanup(now).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn deliver_once(&self, users: &[UserId], message: &Message) -> Result<u64> {
        self.inner.deliver_once(users, message).await
    }
    fn flash_spill(&self) -> Option<&dyn FlashSpill> {
        self.inner.flash_spill()
    }
    fn change_feed(&self) -> Option<&dyn WatchChanges> {
        self.inner.change_feed()
    }
    fn admin(&self) -> Option<&dyn MessageAdmin> {
        self.inner.admin()
    }
}

/// Logged in as user 1 once the private `uid` cookie is set.
struct One;

#[rocket::async_trait]
impl Host for One {
    async fn current_user(&self, request: &Request<'_>) -> Option<UserId> {
        request.cookies().get_private("uid").map(|_| UserId(1))
    }
    async fn all_users(&self) -> Result<Vec<UserId>, BoxError> {
        Ok(vec![UserId(1)])
    }
}

#[get("/login")]
fn login(jar: &rocket::http::CookieJar<'_>) -> &'static str {
    jar.add_private(Cookie::new("uid", "1"));
    "in"
}

#[get("/flash")]
async fn flash(messages: Messages<'_>) -> &'static str {
    messages.info("a flash message").await.unwrap();
    "queued"
}

#[get("/page")]
fn page(messages: Messages<'_>) -> Page {
    Page::render("shown", context! { messages })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_whose_reads_cannot_be_saved_answers_503_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("shown.html.tera"),
        "{% for m in messages %}[{{ m.message }}]{% endfor %} unread={{ stored_messages_count() }}",
    )
    .unwrap();
    let url = crate::common::sqlite_url(&dir);
    let sql = SqlBackend::connect(&SecretUrl::new(&url), Settings::default())
        .await
        .unwrap();
    let backend = Arc::new(MarkingFails {
        inner: Arc::new(sql),
        failing: AtomicBool::new(false),
    });
    let store = Store::new(backend.clone(), Arc::new(One), Config::default()).unwrap();
    let figment =
        crate::common::test_figment(&url).merge(("template_dir", dir.path().display().to_string()));
    let rocket = rocket::custom(figment)
        .attach(StoredMessages::with_store(store.clone()))
        .attach(stored_messages::template::fairing())
        .mount("/", routes![login, flash, page]);
    let client = Client::tracked(rocket).await.unwrap();
    assert_eq!(client.get("/login").dispatch().await.status(), Status::Ok);
    store
        .add_message_for(
            &[UserId(1)],
            NewMessage::new(Level::STORED_INFO, "a stored message").unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(client.get("/flash").dispatch().await.status(), Status::Ok);

    // act: the page shows both, and the store refuses to mark the stored one read
    backend.failing.store(true, Ordering::SeqCst);
    let response = client.get("/page").dispatch().await;

    // assert: 503 that says so, nothing marked, the flash cookie not cleared
    assert_eq!(response.status(), Status::ServiceUnavailable);
    assert_eq!(
        response.content_type(),
        Some(rocket::http::ContentType::HTML)
    );
    assert!(response
        .headers()
        .get("Set-Cookie")
        .all(|c| !c.contains("flash")));
    let body = response.into_string().await.unwrap();
    assert!(body.contains("Nothing was lost"), "{body}");
    assert!(!body.contains("a stored message"), "{body}");
    assert_eq!(backend.inbox_count(UserId(1)).await.unwrap(), 1);

    // once the store answers, the next page shows both and marks the stored one read
    backend.failing.store(false, Ordering::SeqCst);
    let response = client.get("/page").dispatch().await;
    assert_eq!(response.status(), Status::Ok);
    let body = response.into_string().await.unwrap();
    assert!(body.contains("[a flash message]"), "{body}");
    assert!(body.contains("[a stored message]"), "{body}");
    assert!(body.contains("unread=0"), "{body}");
    assert_eq!(backend.inbox_count(UserId(1)).await.unwrap(), 0);
    let body = client
        .get("/page")
        .dispatch()
        .await
        .into_string()
        .await
        .unwrap();
    assert_eq!(body, " unread=0");
}
