//! The library in a host of its own (not the reference app): what a developer embedding it
//! gets, with plain `Template::render` pages and with `Page`.

use rocket::http::{ContentType, Cookie, Status};
use rocket::local::asynchronous::Client;
use rocket::{get, post, routes, Request};
use rocket_dyn_templates::{context, Template};
use stored_messages::template::Page;
use stored_messages::{BoxError, Host, Level, Messages, StoredMessages, UserId};

/// Logged in as the user in the private `uid` cookie.
struct CookieHost;

#[rocket::async_trait]
impl Host for CookieHost {
    async fn current_user(&self, request: &Request<'_>) -> Option<UserId> {
        request
            .cookies()
            .get_private("uid")?
            .value()
            .parse()
            .ok()
            .map(UserId)
    }

    async fn all_users(&self) -> Result<Vec<UserId>, BoxError> {
        Ok(vec![UserId(1)])
    }
}

#[get("/plain")]
fn plain() -> Template {
    Template::render("form", context! {})
}

#[get("/page")]
fn page(messages: Messages<'_>) -> Page {
    Page::render("counted", context! { messages })
}

#[post("/send")]
fn send() -> &'static str {
    "sent"
}

#[get("/login")]
fn login(jar: &rocket::http::CookieJar<'_>) -> &'static str {
    jar.add_private(Cookie::new("uid", "1"));
    "in"
}

/// A host with its own templates: `plain` registers the helpers itself on
/// `Template::custom`, as hosts did before `template::fairing()` existed.
async fn host(plain_templates: bool) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("form.html.tera"),
        r#"<form method="post" action="/send"><input type="hidden" name="csrf_token" value="{{ csrf_token() }}"></form>"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("counted.html.tera"),
        "{% if stored_messages_count() > 1 %}many{% else %}few{% endif %} {{ stored_messages_count() + 0 }} \
         {% for m in messages %}[{{ m.message }}]{% endfor %} {{ stored_messages_list() }} \
         {% set messages = [] %}{% set kind = 'inbox' %}{% set csrf = '' %}{% set next = '/' %}\
         {% include \"stored_messages/list.html\" %}",
    )
    .unwrap();
    let database = crate::common::sqlite_url(&dir);
    let figment = crate::common::test_figment(&database)
        .merge(("template_dir", dir.path().display().to_string()));
    let rocket = rocket::custom(figment)
        .attach(StoredMessages::fairing(CookieHost))
        .mount("/", routes![plain, page, send, login]);
    let rocket = if plain_templates {
        rocket.attach(Template::custom(|engines| {
            stored_messages::template::register(&mut engines.tera)
        }))
    } else {
        rocket.attach(stored_messages::template::fairing())
    };
    (Client::tracked(rocket).await.unwrap(), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_visit_to_a_plain_template_page_gets_a_usable_csrf_token() {
    for plain_templates in [true, false] {
        let (client, _dir) = host(plain_templates).await;
        // a browser that never visited: no cookie yet
        let response = client.get("/plain").dispatch().await;
        assert_eq!(response.status(), Status::Ok);
        let html = response.into_string().await.unwrap();
        let token = html
            .split("value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap()
            .to_string();
        assert_eq!(token.len(), 43, "a token in the page: {html}");
        let response = client
            .post("/send")
            .header(ContentType::Form)
            .body(format!("csrf_token={token}"))
            .dispatch()
            .await;
        assert_eq!(
            response.status(),
            Status::Ok,
            "the token printed on the first visit is accepted (templates registered by {})",
            if plain_templates {
                "the host"
            } else {
                "template::fairing"
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_page_the_count_is_a_number_and_agrees_with_the_list() {
    let (client, _dir) = host(false).await;
    client.get("/login").dispatch().await;
    let store = client.rocket().state::<stored_messages::Store>().unwrap();
    for text in ["one", "two", "three"] {
        let message = stored_messages::NewMessage::new(Level::STORED_INFO, text).unwrap();
        store.add_message_for(&[UserId(1)], message).await.unwrap();
    }
    // The page shows the stream, which marks it read: the helpers show the inbox as the
    // page leaves it, so the count is 0 and the list is empty, on this same page.
    let html = client
        .get("/page")
        .dispatch()
        .await
        .into_string()
        .await
        .unwrap();
    assert!(html.starts_with("few 0 [one][two][three]"), "{html}");
    assert!(html.contains("No unread messages."), "{html}");
    // The included partial is the crate's own and escapes like the page.
    assert_eq!(html.matches("No unread messages.").count(), 2, "{html}");
    assert_eq!(
        store.backend().inbox_count(UserId(1)).await.unwrap(),
        0,
        "what the page showed was marked read"
    );
}
