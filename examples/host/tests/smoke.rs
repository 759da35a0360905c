//! The example host, driven as a browser would: CSRF on its form, flash messages while
//! anonymous, stored messages once logged in, its own `/messages` page beside the API at
//! `/api/messages`.

use rocket::http::{ContentType, Header, Status};
use rocket::local::asynchronous::Client;

async fn client(dir: &tempfile::TempDir) -> Client {
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("host.sqlite").display()
    );
    let figment = rocket::Config::figment()
        .merge((
            "template_dir",
            concat!(env!("CARGO_MANIFEST_DIR"), "/templates"),
        ))
        .merge(("databases.stored_messages.url", url));
    Client::tracked(stored_messages_example_host::app(figment))
        .await
        .expect("the example host launches")
}

/// The CSRF token a page printed in its form.
fn token(html: &str) -> String {
    let start = html
        .find("name=\"csrf_token\" value=\"")
        .expect("a form with a token")
        + 25;
    html[start..start + 43].to_string()
}

async fn page(client: &Client, path: &str) -> String {
    let response = client.get(path).dispatch().await;
    assert_eq!(response.status(), Status::Ok, "GET {path}");
    response.into_string().await.unwrap()
}

async fn post(client: &Client, path: &str, body: String) -> Status {
    let response = client
        .post(path)
        .header(ContentType::Form)
        .body(body)
        .dispatch()
        .await;
    response.status()
}

#[rocket::async_test]
async fn the_example_host_works_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let client = client(&dir).await;

    // Anonymous: the count is a number, the form carries a token.
    let home = page(&client, "/").await;
    assert!(home.contains("<span data-unread-count>0</span>"), "{home}");
    let csrf = token(&home);

    // Without the token nothing happens; with it, a flash message for the next page.
    assert_eq!(
        post(&client, "/note", "text=sneaky".into()).await,
        Status::Forbidden
    );
    let body = format!("csrf_token={csrf}&text=%3Cb%3Eflash%3C%2Fb%3E");
    assert_eq!(post(&client, "/note", body).await, Status::SeeOther);
    let home = page(&client, "/").await;
    assert!(
        home.contains("&lt;b&gt;flash&lt;&#x2F;b&gt;"),
        "shown escaped: {home}"
    );
    assert!(!home.contains("sneaky"));
    assert!(!page(&client, "/").await.contains("flash"), "shown once");

    // Logged in: notes go to the inbox, which the host's own /messages page lists, with
    // buttons posting to the API where the host mounted it.
    let login = format!("csrf_token={csrf}");
    assert_eq!(post(&client, "/login/1", login).await, Status::SeeOther);
    // The token is bound to the session: the login made the old one worthless, and the next
    // page carries the new one.
    let body = format!("csrf_token={csrf}&text=stale+token");
    assert_eq!(post(&client, "/note", body).await, Status::Forbidden);
    let csrf = token(&page(&client, "/").await);
    let body = format!("csrf_token={csrf}&text=stored+note");
    assert_eq!(post(&client, "/note", body).await, Status::SeeOther);
    let inbox = page(&client, "/messages").await;
    assert!(inbox.contains("<h1>Unread (1)</h1>"), "{inbox}");
    assert!(inbox.contains("stored note"), "{inbox}");
    assert!(
        inbox.contains("action=\"/api/messages/mark_all_read\""),
        "{inbox}"
    );

    // The JSON API answers at /api/messages, and its writes need the token too.
    assert_eq!(
        page(&client, "/api/messages/count").await,
        r#"{"unread":1}"#
    );
    let refused = client.post("/api/messages/mark_all_read").dispatch().await;
    assert_eq!(refused.status(), Status::Forbidden);
    let marked = client
        .post("/api/messages/mark_all_read")
        .header(Header::new("X-CSRF-Token", csrf.clone()))
        .dispatch()
        .await;
    assert_eq!(marked.status(), Status::Ok);
    assert_eq!(
        page(&client, "/api/messages/count").await,
        r#"{"unread":0}"#
    );
    // /messages is the host's page, not the API.
    let not_api = client.get("/messages/count").dispatch().await;
    assert_eq!(not_api.status(), Status::NotFound);
}
