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

    /// `uid=down` stands for a session store that does not answer.
    async fn try_current_user(&self, request: &Request<'_>) -> Result<Option<UserId>, BoxError> {
        match request.cookies().get_private("uid") {
            Some(c) if c.value() == "down" => Err("the session store does not answer".into()),
            _ => Ok(self.current_user(request).await),
        }
    }

    async fn all_users(&self) -> Result<Vec<UserId>, BoxError> {
        Ok(vec![UserId(1)])
    }
}

#[get("/plain")]
fn plain() -> Template {
    Template::render("form", context! {})
}

/// A plain page with the helpers, and no `Messages` guard.
#[get("/helpers")]
fn helpers() -> Template {
    Template::render("helpers", context! {})
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

#[get("/down")]
fn down(jar: &rocket::http::CookieJar<'_>) -> &'static str {
    jar.add_private(Cookie::new("uid", "down"));
    "down"
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
    std::fs::write(
        dir.path().join("helpers.html.tera"),
        "count={{ stored_messages_count() }} {{ stored_messages_list() }}",
    )
    .unwrap();
    let database = crate::common::sqlite_url(&dir);
    let figment = crate::common::test_figment(&database)
        .merge(("template_dir", dir.path().display().to_string()));
    let rocket = rocket::custom(figment)
        .attach(StoredMessages::fairing(CookieHost))
        .mount("/", routes![plain, helpers, page, send, login, down]);
    let rocket = if plain_templates {
        rocket.attach(Template::custom(|engines| {
            stored_messages::template::register(&mut engines.tera)
        }))
    } else {
        rocket.attach(stored_messages::template::fairing())
    };
    (Client::tracked(rocket).await.unwrap(), dir)
}

/// The token in the `form` template's hidden field.
fn form_token(html: &str) -> String {
    html.split("value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_visit_to_a_plain_template_page_gets_a_usable_csrf_token() {
    for plain_templates in [true, false] {
        let (client, _dir) = host(plain_templates).await;
        // a browser that never visited: no cookie yet
        let response = client.get("/plain").dispatch().await;
        assert_eq!(response.status(), Status::Ok);
        let html = response.into_string().await.unwrap();
        let token = form_token(&html);
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

/// A host that cannot tell who the user is (`Host::try_current_user` fails: its session
/// store does not answer) gets 503 from the API and the `Messages` guard, not an anonymous
/// answer; and a page that renders anyway keeps the browser's CSRF token rather than
/// replacing it with an anonymous one (which would break the session's open pages). The
/// token's cookie lasts 400 days, longer than any session. A plain page's helpers say that
/// messages are unavailable, as when the store fails, rather than show a visitor's count of 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_the_host_cannot_identify_gets_503_and_keeps_the_csrf_token() {
    let (client, _dir) = host(false).await;
    client.get("/login").dispatch().await;
    let page = client.get("/plain").dispatch().await;
    let token = form_token(&page.into_string().await.unwrap());
    // The token outlives any session it is bound to (not Rocket's week for private cookies).
    let expires = client
        .cookies()
        .get_private(stored_messages::csrf::CSRF_COOKIE)
        .and_then(|c| c.expires_datetime())
        .expect("the CSRF cookie expires at a date");
    let days = (expires - rocket::time::OffsetDateTime::now_utc()).whole_days();
    assert!((399..=400).contains(&days), "{days} days");
    let helpers = client.get("/helpers").dispatch().await;
    let html = helpers.into_string().await.unwrap();
    assert!(html.starts_with("count=0 "), "{html}");
    assert!(html.contains("No unread messages."), "{html}");
    client.get("/down").dispatch().await;

    assert_eq!(
        client.get("/messages/count").dispatch().await.status(),
        Status::ServiceUnavailable
    );
    assert_eq!(
        client.get("/page").dispatch().await.status(),
        Status::ServiceUnavailable
    );
    let page = client.get("/plain").dispatch().await;
    assert_eq!(page.status(), Status::Ok);
    assert_eq!(form_token(&page.into_string().await.unwrap()), token);
    let helpers = client.get("/helpers").dispatch().await;
    assert_eq!(helpers.status(), Status::Ok);
    let html = helpers.into_string().await.unwrap();
    assert!(html.starts_with("count=? "), "{html}");
    assert!(
        html.contains("Messages are unavailable right now."),
        "{html}"
    );
    assert!(!html.contains("No unread messages."), "{html}");
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

mod mounting_and_csrf {
    //! Where the API goes, and the CSRF check as a host with forms of every kind meets it.

    use rocket::fs::TempFile;
    use rocket::http::{ContentType, Header, Status};
    use rocket::local::asynchronous::Client;
    use rocket::{get, post, routes, FromForm};
    use stored_messages::csrf::CsrfForm;
    use stored_messages::template::Page;
    use stored_messages::StoredMessages;

    use super::CookieHost;

    #[derive(FromForm)]
    struct Upload<'r> {
        title: &'r str,
        file: TempFile<'r>,
    }

    /// Checked by the fairing (the token must come early).
    #[post("/upload", data = "<upload>")]
    fn upload(upload: rocket::form::Form<Upload<'_>>) -> String {
        format!("{} {}", upload.title, upload.file.len())
    }

    /// Exempt from the fairing, checked by the guard wherever the token is.
    #[post("/big/upload", data = "<upload>")]
    fn big_upload(upload: CsrfForm<Upload<'_>>) -> String {
        format!("{} {}", upload.title, upload.file.len())
    }

    /// Exempt and unchecked: a webhook.
    #[post("/hooks/ping")]
    fn hook() -> &'static str {
        "pong"
    }

    /// Not exempt: only its name starts like the exempt path.
    #[post("/hooksmith")]
    fn hooksmith() -> &'static str {
        "made"
    }

    #[get("/messages")]
    fn own_messages() -> &'static str {
        "the host's own page"
    }

    /// The unread list (no stream on this page, so nothing is shown and marked read).
    #[get("/list")]
    fn list() -> Page {
        Page::render("list", rocket_dyn_templates::context! {})
    }

    #[get("/blank")]
    fn blank() -> &'static str {
        "nothing"
    }

    async fn client(fairing: StoredMessages) -> (Client, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("list.html.tera"),
            "{{ stored_messages_list() }}",
        )
        .unwrap();
        let figment = crate::common::test_figment(&crate::common::sqlite_url(&dir))
            .merge(("template_dir", dir.path().display().to_string()));
        let rocket = rocket::custom(figment)
            .attach(fairing)
            .attach(stored_messages::template::fairing())
            .mount(
                "/",
                routes![
                    upload,
                    big_upload,
                    hook,
                    hooksmith,
                    own_messages,
                    list,
                    blank,
                    super::login
                ],
            );
        (Client::tracked(rocket).await.expect("launches"), dir)
    }

    async fn token(client: &Client) -> String {
        // Any page outside the API sets the token cookie.
        client.get("/blank").dispatch().await;
        crate::common::token_of(
            client
                .cookies()
                .get_private(stored_messages::csrf::CSRF_COOKIE)
                .expect("a token cookie")
                .value(),
        )
    }

    async fn login(client: &Client) {
        assert_eq!(client.get("/login").dispatch().await.status(), Status::Ok);
    }

    /// A multipart body: the token part first, or after a file of `size` bytes.
    fn multipart(token: &str, token_first: bool, size: usize) -> String {
        let token_part = format!(
            "--B0und\r\nContent-Disposition: form-data; name=\"csrf_token\"\r\n\r\n{token}\r\n"
        );
        let file = format!(
            "--B0und\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\
             Content-Type: text/plain\r\n\r\n{}\r\n",
            "x".repeat(size)
        );
        let title = "--B0und\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nreport\r\n";
        if token_first {
            format!("{token_part}{title}{file}--B0und--\r\n")
        } else {
            format!("{title}{file}{token_part}--B0und--\r\n")
        }
    }

    async fn post_multipart(client: &Client, path: &str, body: String) -> (Status, String) {
        let content_type =
            ContentType::new("multipart", "form-data").with_params(("boundary", "B0und"));
        let response = client
            .post(path)
            .header(content_type)
            .body(body)
            .dispatch()
            .await;
        let status = response.status();
        (status, response.into_string().await.unwrap_or_default())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn multipart_forms_pass_with_the_token_first_and_exempt_routes_check_it_anywhere() {
        let fairing = StoredMessages::fairing(CookieHost)
            .csrf_exempt("/big")
            .csrf_exempt("/hooks");
        let (client, _dir) = client(fairing).await;
        let token = token(&client).await;

        // The fairing reads the token in the first part of a multipart body.
        let (status, body) =
            post_multipart(&client, "/upload", multipart(&token, true, 5000)).await;
        assert_eq!((status, body.as_str()), (Status::Ok, "report 5000"));
        // After a large file it cannot see it: refused, the handler never runs.
        let (status, _) = post_multipart(&client, "/upload", multipart(&token, false, 5000)).await;
        assert_eq!(status, Status::Forbidden);
        let (status, _) = post_multipart(
            &client,
            "/upload",
            multipart("x".repeat(43).as_str(), true, 10),
        )
        .await;
        assert_eq!(status, Status::Forbidden, "a wrong token is refused");

        // On an exempt path, CsrfForm finds the token after the file, and refuses a wrong one.
        let (status, body) =
            post_multipart(&client, "/big/upload", multipart(&token, false, 5000)).await;
        assert_eq!((status, body.as_str()), (Status::Ok, "report 5000"));
        let forged = multipart(&"y".repeat(43), false, 5000);
        let (status, _) = post_multipart(&client, "/big/upload", forged).await;
        assert_eq!(status, Status::Forbidden);
        let without = String::from(
            "--B0und\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nr\r\n\
             --B0und\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nx\r\n--B0und--\r\n")
        ;
        let (status, _) = post_multipart(&client, "/big/upload", without).await;
        assert_eq!(status, Status::Forbidden, "no token at all");

        // An exempt webhook needs no token; a path that only starts alike does.
        assert_eq!(
            client.post("/hooks/ping").dispatch().await.status(),
            Status::Ok
        );
        assert_eq!(
            client.post("/hooksmith").dispatch().await.status(),
            Status::Forbidden
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_api_follows_its_base_and_can_be_left_out() {
        // Moved: the host's /messages is its own, the API answers at the new base.
        let (moved, _dir) =
            client(StoredMessages::fairing(CookieHost).api_at("/api/v1/messages/")).await;
        let client = moved;
        login(&client).await;
        let own = client.get("/messages").dispatch().await;
        assert_eq!(
            own.into_string().await.as_deref(),
            Some("the host's own page")
        );
        let count = client.get("/api/v1/messages/count").dispatch().await;
        assert_eq!(
            count.into_string().await.as_deref(),
            Some(r#"{"unread":0}"#)
        );
        let trailing = client.get("/api/v1/messages/count/").dispatch().await;
        assert_eq!(
            trailing.status(),
            Status::Ok,
            "the trailing slash stays optional"
        );
        let refused = client
            .post("/api/v1/messages/mark_all_read")
            .dispatch()
            .await;
        assert_eq!(refused.status(), Status::Forbidden);
        let body = refused.into_string().await.unwrap();
        assert!(body.contains("CSRF"), "the API's JSON error: {body}");
        let openapi = client.get("/api/v1/messages/openapi.json").dispatch().await;
        let openapi = openapi.into_string().await.unwrap();
        assert!(openapi.contains("\"/api/v1/messages/inbox\""), "{openapi}");
        let store = client.rocket().state::<stored_messages::Store>().unwrap();
        store
            .add_message_for(
                &[stored_messages::UserId(1)],
                stored_messages::NewMessage::new(stored_messages::Level::STORED_INFO, "hi")
                    .unwrap(),
            )
            .await
            .unwrap();
        let token = token(&client).await;
        let list = client
            .get("/list")
            .dispatch()
            .await
            .into_string()
            .await
            .unwrap();
        assert!(
            list.contains("action=\"/api/v1/messages/mark_all_read\""),
            "{list}"
        );
        let marked = client
            .post("/api/v1/messages/mark_all_read")
            .header(Header::new("X-CSRF-Token", token))
            .dispatch()
            .await;
        assert_eq!(marked.status(), Status::Ok);

        // Left out: no API routes, a list without buttons, everything else as before.
        let (client, _dir2) = self::client(StoredMessages::fairing(CookieHost).without_api()).await;
        login(&client).await;
        let store = client.rocket().state::<stored_messages::Store>().unwrap();
        store
            .add_message_for(
                &[stored_messages::UserId(1)],
                stored_messages::NewMessage::new(stored_messages::Level::STORED_INFO, "hi")
                    .unwrap(),
            )
            .await
            .unwrap();
        let list = client
            .get("/list")
            .dispatch()
            .await
            .into_string()
            .await
            .unwrap();
        assert!(list.contains("hi") && !list.contains("<form"), "{list}");
        assert_eq!(
            client.get("/messages/count").dispatch().await.status(),
            Status::NotFound
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_api_base_or_exempt_path_stops_the_launch() {
        for fairing in [
            StoredMessages::fairing(CookieHost).api_at("messages"),
            StoredMessages::fairing(CookieHost).api_at("/"),
            StoredMessages::fairing(CookieHost).api_at("/a/../b"),
            StoredMessages::fairing(CookieHost).api_at("/a\"b"),
            StoredMessages::fairing(CookieHost).csrf_exempt("hooks"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let figment = crate::common::test_figment(&crate::common::sqlite_url(&dir));
            let rocket = rocket::custom(figment).attach(fairing);
            let Err(error) = Client::tracked(rocket).await else {
                panic!("the launch fails");
            };
            assert!(matches!(
                error.kind(),
                rocket::error::ErrorKind::FailedFairings(_)
            ));
        }
    }

    /// The stream listener binds at ignition: a port in use stops the launch, instead of a
    /// server whose streams redirect to nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_address_in_use_stops_the_launch() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let figment = crate::common::test_figment(&crate::common::sqlite_url(&dir)).merge((
            "stored_messages.stream_address",
            taken.local_addr().unwrap().to_string(),
        ));
        let rocket = rocket::custom(figment).attach(StoredMessages::fairing(CookieHost));
        let Err(error) = Client::tracked(rocket).await else {
            panic!("the launch fails");
        };
        assert!(matches!(
            error.kind(),
            rocket::error::ErrorKind::FailedFairings(_)
        ));
    }
}

mod untouched {
    //! Responses the fairing must leave alone: a page without helpers is passed on as it
    //! is, and a streamed HTML body is never read into memory.

    use rocket::http::{ContentType, Status};
    use rocket::local::asynchronous::Client;
    use rocket::response::stream::TextStream;
    use rocket::{get, routes};
    use stored_messages::StoredMessages;

    use super::CookieHost;

    #[get("/streamed")]
    fn streamed() -> (ContentType, TextStream![&'static str]) {
        (
            ContentType::HTML,
            TextStream! {
                for _ in 0..1000 {
                    yield "<p>a line of a long streamed page</p>\n";
                }
            },
        )
    }

    #[get("/static")]
    fn fixed() -> rocket::response::content::RawHtml<&'static str> {
        rocket::response::content::RawHtml("<p>no helpers <!-- a comment --></p>")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streamed_and_helperless_pages_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let figment = crate::common::test_figment(&crate::common::sqlite_url(&dir));
        let rocket = rocket::custom(figment)
            .attach(StoredMessages::fairing(CookieHost))
            .attach(stored_messages::template::fairing())
            .mount("/", routes![streamed, fixed]);
        let client = Client::tracked(rocket).await.unwrap();

        let response = client.get("/streamed").dispatch().await;
        assert_eq!(response.status(), Status::Ok);
        assert_eq!(
            response.body().preset_size(),
            None,
            "still streamed, not buffered into a sized body"
        );
        let body = response.into_string().await.unwrap();
        assert_eq!(body.lines().count(), 1000);

        let response = client.get("/static").dispatch().await;
        assert_eq!(
            response.into_string().await.as_deref(),
            Some("<p>no helpers <!-- a comment --></p>")
        );
    }
}

mod origin {
    //! A valid token is not enough from another site: `Origin` must be this site's.

    use rocket::http::{Header, Status};
    use rocket::local::asynchronous::Client;
    use rocket::{get, post, routes};
    use stored_messages::StoredMessages;

    use super::CookieHost;

    #[get("/blank")]
    fn blank() -> &'static str {
        "nothing"
    }

    #[post("/act")]
    fn act() -> &'static str {
        "done"
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cross_site_origins_are_refused_even_with_a_valid_token() {
        let dir = tempfile::tempdir().unwrap();
        let figment = crate::common::test_figment(&crate::common::sqlite_url(&dir));
        let rocket = rocket::custom(figment)
            .attach(StoredMessages::fairing(CookieHost))
            .mount("/", routes![blank, act]);
        let client = Client::tracked(rocket).await.unwrap();
        client.get("/blank").dispatch().await;
        let token = crate::common::token_of(
            client
                .cookies()
                .get_private(stored_messages::csrf::CSRF_COOKIE)
                .unwrap()
                .value(),
        );
        let post = |origin: Option<&'static str>, host: &'static str| {
            let mut request = client
                .post("/act")
                .header(Header::new("X-CSRF-Token", token.clone()))
                .header(Header::new("Host", host));
            if let Some(origin) = origin {
                request = request.header(Header::new("Origin", origin));
            }
            request.dispatch()
        };
        // Browsers also say where a request comes from in `Sec-Fetch-Site`.
        for (site, expected) in [
            ("cross-site", Status::Forbidden),
            ("same-origin", Status::Ok),
            ("none", Status::Ok),
        ] {
            let response = client
                .post("/act")
                .header(Header::new("X-CSRF-Token", token.clone()))
                .header(Header::new("Sec-Fetch-Site", site))
                .dispatch()
                .await;
            assert_eq!(response.status(), expected, "Sec-Fetch-Site: {site}");
        }
        for (origin, host, expected) in [
            (None, "app.example", Status::Ok),
            (Some("https://app.example"), "app.example", Status::Ok),
            (Some("https://app.example"), "app.example:443", Status::Ok),
            (Some("http://127.0.0.1:8000"), "127.0.0.1:8000", Status::Ok),
            (
                Some("https://evil.example"),
                "app.example",
                Status::Forbidden,
            ),
            (
                Some("https://app.example.evil"),
                "app.example",
                Status::Forbidden,
            ),
            (
                Some("http://app.example:8080"),
                "app.example",
                Status::Forbidden,
            ),
            (Some("null"), "app.example", Status::Forbidden),
        ] {
            assert_eq!(
                post(origin, host).await.status(),
                expected,
                "{origin:?} to {host}"
            );
        }
    }
}

mod secure_cookies {
    //! `secure_cookies = true` marks the library's cookies `Secure`; by default Rocket decides.

    use rocket::local::asynchronous::Client;
    use rocket::{get, routes};
    use stored_messages::{Messages, StoredMessages};

    use super::CookieHost;

    #[get("/flash")]
    async fn flash(messages: Messages<'_>) -> &'static str {
        messages.info("hello").await.unwrap();
        "ok"
    }

    async fn set_cookies(secure: Option<bool>) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let mut figment = crate::common::test_figment(&crate::common::sqlite_url(&dir));
        if let Some(secure) = secure {
            figment = figment.merge(("stored_messages.secure_cookies", secure));
        }
        let rocket = rocket::custom(figment)
            .attach(StoredMessages::fairing(CookieHost))
            .mount("/", routes![flash]);
        let client = Client::untracked(rocket).await.unwrap();
        let response = client.get("/flash").dispatch().await;
        response
            .headers()
            .get("Set-Cookie")
            .map(str::to_string)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_library_cookies_are_secure_when_configured() {
        let secure = set_cookies(Some(true)).await;
        assert!(secure.len() >= 2, "flash and CSRF cookies: {secure:?}");
        assert!(secure.iter().all(|c| c.contains("Secure")), "{secure:?}");
        let plain = set_cookies(None).await;
        assert!(plain.iter().all(|c| !c.contains("Secure")), "{plain:?}");
    }
}

mod spill_bounds {
    //! A client that never returns its cookies cannot make the server keep spill after
    //! spill; a browser that does return them keeps one, however often it posts.

    use rocket::local::asynchronous::Client;
    use rocket::{get, post, routes};
    use stored_messages::flash::overflow::SPILLS_PER_CLIENT;
    use stored_messages::{Messages, StoredMessages};

    use super::CookieHost;

    /// Queues flash messages well over the cookie's budget.
    #[post("/big")]
    async fn big(messages: Messages<'_>) -> &'static str {
        for _ in 0..6 {
            messages.info(&"x".repeat(1500)).await.unwrap();
        }
        "queued"
    }

    async fn spill_rows(url: &str) -> i64 {
        use sqlx::Connection;
        let mut connection = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar("select count(*) from sm_flash_spill")
            .fetch_one(&mut connection)
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn anonymous_spills_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let url = crate::common::sqlite_url(&dir);
        let rocket = || {
            rocket::custom(crate::common::test_figment(&url))
                .attach(StoredMessages::fairing(CookieHost).without_csrf())
                .mount("/", routes![big])
        };
        // Never returns cookies: every post would be a new spill.
        let forgetful = Client::untracked(rocket()).await.unwrap();
        for _ in 0..60 {
            forgetful.post("/big").dispatch().await;
        }
        assert_eq!(spill_rows(&url).await, i64::from(SPILLS_PER_CLIENT));
        drop(forgetful);
        // A browser brings its spill back: it holds one at a time and is never cut off.
        let dir2 = tempfile::tempdir().unwrap();
        let url2 = crate::common::sqlite_url(&dir2);
        let rocket2 = rocket::custom(crate::common::test_figment(&url2))
            .attach(StoredMessages::fairing(CookieHost).without_csrf())
            .mount("/", routes![big]);
        let browser = Client::tracked(rocket2).await.unwrap();
        for _ in 0..60 {
            browser.post("/big").dispatch().await;
        }
        assert_eq!(spill_rows(&url2).await, 1);

        // A client replaying one captured spill cookie: once its spill is gone, each replay
        // is a new spill and counts against the quota.
        let dir3 = tempfile::tempdir().unwrap();
        let url3 = crate::common::sqlite_url(&dir3);
        let rocket3 = rocket::custom(crate::common::test_figment(&url3))
            .attach(StoredMessages::fairing(CookieHost).without_csrf())
            .mount("/", routes![big]);
        let replayer = Client::untracked(rocket3).await.unwrap();
        let first = replayer.post("/big").dispatch().await;
        let spill_cookie = first
            .headers()
            .get("Set-Cookie")
            .find(|c| c.starts_with("sm_flash_spill="))
            .map(|c| c.split(';').next().unwrap().to_string())
            .expect("a spill cookie");
        for _ in 0..60 {
            replayer
                .post("/big")
                .header(rocket::http::Header::new("Cookie", spill_cookie.clone()))
                .dispatch()
                .await;
        }
        assert!(
            spill_rows(&url3).await <= i64::from(SPILLS_PER_CLIENT) + 1,
            "{} rows",
            spill_rows(&url3).await
        );
    }

    /// A logged-in user counts as themselves, whatever address their requests claim (with
    /// Rocket's default `ip_header`, as here, from `X-Real-IP`): picking a new one per
    /// request still makes at most `SPILLS_PER_CLIENT` spills per user, and another user
    /// behind the same address has their own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logged_in_spills_count_per_user_whatever_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let url = crate::common::sqlite_url(&dir);
        let figment = crate::common::test_figment(&url).merge(("ip_header", "X-Real-IP"));
        let rocket = rocket::custom(figment)
            .attach(StoredMessages::fairing(CookieHost).without_csrf())
            .mount("/", routes![big]);
        // Never returns cookies: every post would be a new spill.
        let client = Client::untracked(rocket).await.unwrap();
        for user in ["1", "2"] {
            for i in 0..60 {
                let address = format!("10.0.{}.{}", i / 200, i % 200 + 1);
                client
                    .post("/big")
                    .private_cookie(rocket::http::Cookie::new("uid", user))
                    .header(rocket::http::Header::new("X-Real-IP", address))
                    .dispatch()
                    .await;
            }
        }
        assert_eq!(spill_rows(&url).await, 2 * i64::from(SPILLS_PER_CLIENT));
    }

    #[get("/show")]
    fn show(messages: Messages<'_>) -> String {
        messages
            .iter()
            .map(|m| m.message)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Bytes the flash spills take in the app's store.
    async fn spill_bytes(app: &crate::common::TestApp) -> usize {
        if let Some((url, prefix)) = &app.redis {
            let mut connection = crate::common::redis_connection(url).unwrap();
            let keys: Vec<String> = ::redis::Commands::scan_match::<_, String>(
                &mut connection,
                format!("{prefix}flash:*"),
            )
            .unwrap()
            .collect::<::redis::RedisResult<_>>()
            .unwrap();
            let mut total = 0;
            for key in keys {
                let len: usize = ::redis::Commands::strlen(&mut connection, &key).unwrap();
                total += len;
            }
            return total;
        }
        let sql = "select cast(coalesce(sum(length(payload)), 0) as bigint) from sm_flash_spill";
        let total: i64 = if app.url.starts_with("postgres") {
            use sqlx::Connection;
            let mut connection = sqlx::PgConnection::connect(&app.url).await.unwrap();
            sqlx::query_scalar(sql)
                .fetch_one(&mut connection)
                .await
                .unwrap()
        } else {
            use sqlx::Connection;
            let mut connection = sqlx::SqliteConnection::connect(&app.url).await.unwrap();
            sqlx::query_scalar(sql)
                .fetch_one(&mut connection)
                .await
                .unwrap()
        };
        usize::try_from(total).unwrap()
    }

    /// 5,000 oversize posts from anonymous clients that never return their cookies (the
    /// per-address rate set high, as if they came from many addresses): the spills stay
    /// within `anonymous_spill_bytes`, and a visitor refused a spill is told.
    async fn the_anonymous_budget_holds(app: &crate::common::TestApp) {
        const BUDGET: usize = 100_000;
        let figment = app
            .figment()
            .merge(("stored_messages.anonymous_spill_bytes", BUDGET))
            .merge(("stored_messages.spills_per_client", 1_000_000));
        let rocket = rocket::custom(figment)
            .attach(StoredMessages::fairing(CookieHost).without_csrf())
            .mount("/", routes![big, show]);
        let client = Client::untracked(rocket).await.unwrap();
        let mut last = None;
        for _ in 0..5_000 {
            let response = client.post("/big").dispatch().await;
            assert_eq!(response.status(), rocket::http::Status::Ok);
            last = Some(
                response
                    .headers()
                    .get("Set-Cookie")
                    .map(|c| c.split(';').next().unwrap().to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        let stored = spill_bytes(app).await;
        assert!(stored > 0, "some spills were kept");
        assert!(stored <= BUDGET, "{stored} bytes of spill");
        // The last visitor got what fit the cookie and the notice, no spill.
        let cookies = last.unwrap();
        assert!(!cookies.contains("sm_flash_spill="), "{cookies}");
        let jar: Vec<rocket::http::Cookie<'static>> = cookies
            .split("; ")
            .filter_map(|c| rocket::http::Cookie::parse_encoded(c.to_string()).ok())
            .collect();
        let shown = client
            .get("/show")
            .cookies(jar)
            .dispatch()
            .await
            .into_string()
            .await
            .unwrap();
        assert!(shown.contains(stored_messages::OVERFLOW_NOTICE), "{shown}");
        assert!(
            shown.contains("xxxx"),
            "the messages that fit arrive: {shown}"
        );
    }

    app_tests!(the_anonymous_budget_holds);
}

mod deferred_stream {
    //! A page whose templates only count the stream and include its partial is written
    //! straight from the messages; one that looks inside gets the stream's JSON. Both must
    //! show exactly the same thing.

    use rocket::http::Cookie;
    use rocket::local::asynchronous::Client;
    use rocket::{get, routes};
    use rocket_dyn_templates::context;
    use stored_messages::template::Page;
    use stored_messages::{Level, Messages, NewMessage, StoredMessages, UserId};

    use super::CookieHost;

    /// The stream of `template`: the stored messages of user 1 (kept unread) and three flash
    /// messages added here (the client is untracked: no flash is left over from before).
    #[get("/show/<template>")]
    async fn show(template: &str, messages: Messages<'_>) -> Page {
        messages
            .add_with(
                Level::INFO,
                "<script>alert('x')</script> & \"q\"",
                "urgent <b>",
                None,
            )
            .await
            .unwrap();
        messages
            .add_with(Level::WARNING, "a flash link", "", Some("/archive?a=1&b=2"))
            .await
            .unwrap();
        messages
            .add(Level::ERROR, &"a long flash text & more ".repeat(20))
            .await
            .unwrap();
        let page = if template == "nested" {
            Page::render(
                "nested",
                context! { page: context! { messages: &messages } },
            )
        } else if template == "twice" {
            Page::render("twice", context! { first: &messages, second: &messages })
        } else {
            Page::render(template.to_string(), context! { messages: &messages, n: 1 })
        };
        messages.set_used(false);
        page
    }

    #[get("/login")]
    fn login(jar: &rocket::http::CookieJar<'_>) -> &'static str {
        jar.add_private(rocket::http::Cookie::new("uid", "1"));
        "in"
    }

    const COUNTED: &str = "{{ messages | length }} {% if messages and n %}some{% endif %}{% if not messages %}none{% endif %}|";

    async fn client(dir: &tempfile::TempDir, level_tags: bool) -> Client {
        let templates = [
            // Counts only: the stand-in is kept.
            ("counts", format!("{COUNTED}{{% include \"stored_messages/messages\" %}}")),
            (
                "child",
                format!("{{% extends \"base\" %}}{{% block body %}}{COUNTED}{{% endblock %}}"),
            ),
            ("base", "{% block body %}{% endblock %}{% include \"stored_messages/messages\" %}".into()),
            // Looks inside: the JSON.
            (
                "looks",
                format!("{COUNTED}{{% include \"stored_messages/messages\" %}}{{% if false %}}{{{{ messages.0.id }}}}{{% endif %}}"),
            ),
            (
                "fields",
                "{% for m in messages %}[{{ m.message }}|{{ m.tags }}|{{ m.stored }}|{{ m.date_text | length }}]{% endfor %}".into(),
            ),
            (
                "nested",
                "{{ page.messages | length }} {% if page.messages and 1 %}some{% endif %}|{% set messages = page.messages %}{% include \"stored_messages/messages\" %}".into(),
            ),
            (
                "twice",
                "{{ first | length }} {{ second | length }}|{% set messages = first %}{% include \"stored_messages/messages\" %}{% set messages = second %}{% include \"stored_messages/messages\" %}".into(),
            ),
        ];
        for (name, source) in templates {
            std::fs::write(dir.path().join(format!("{name}.html.tera")), source).unwrap();
        }
        let database = crate::common::sqlite_url(dir);
        let mut figment = crate::common::test_figment(&database)
            .merge(("template_dir", dir.path().display().to_string()));
        if level_tags {
            figment = figment.merge((
                "stored_messages.level_tags",
                std::collections::BTreeMap::from([("30", "warn&\"x\""), ("40", "")]),
            ));
        }
        let rocket = rocket::custom(figment)
            .attach(StoredMessages::fairing(CookieHost))
            .attach(stored_messages::template::fairing())
            .mount("/", routes![show, login]);
        Client::untracked(rocket).await.unwrap()
    }

    async fn get(client: &Client, path: &str, login: &[Cookie<'static>]) -> String {
        let response = client.get(path).cookies(login.to_vec()).dispatch().await;
        assert_eq!(response.status(), rocket::http::Status::Ok, "{path}");
        response.into_string().await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counting_pages_show_what_pages_that_look_inside_show() {
        for level_tags in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let client = client(&dir, level_tags).await;
            let anonymous = get(&client, "/show/counts", &[]).await;
            assert_eq!(anonymous, get(&client, "/show/looks", &[]).await);
            assert!(anonymous.starts_with("3 some|"), "{anonymous}");

            let login: Vec<Cookie<'static>> = client
                .get("/login")
                .dispatch()
                .await
                .cookies()
                .iter()
                .map(|c| c.clone().into_owned())
                .collect();
            let store = client.rocket().state::<stored_messages::Store>().unwrap();
            let stored = [
                NewMessage::parse(
                    Level::STORED_INFO,
                    "stored <i>one</i>",
                    "a b",
                    Some("https://example.com/\"x\"&y"),
                    None,
                ),
                NewMessage::parse(
                    Level::STORED_WARNING,
                    &"a long stored text ".repeat(30),
                    "",
                    None,
                    None,
                ),
                NewMessage::parse(
                    Level::STORED_ERROR,
                    "stored three",
                    "",
                    Some("/inbox"),
                    None,
                ),
            ];
            for message in stored {
                store
                    .add_message_for(&[UserId(1)], message.unwrap())
                    .await
                    .unwrap();
            }
            let counts = get(&client, "/show/counts", &login).await;
            assert!(counts.starts_with("6 some|"), "{counts}");
            assert_eq!(counts.matches("<li class=\"message").count(), 6, "{counts}");
            assert_eq!(counts.matches("data-id=\"").count(), 3, "{counts}");
            assert!(counts.contains("&lt;script&gt;"), "{counts}");
            assert!(!counts.contains("<script>"), "{counts}");
            assert!(counts.contains("Show more"), "{counts}");
            if level_tags {
                assert!(counts.contains("warn&amp;&quot;x&quot;"), "{counts}");
            }
            assert_eq!(counts, get(&client, "/show/looks", &login).await);
            assert_eq!(counts, get(&client, "/show/child", &login).await);
            let nested = get(&client, "/show/nested", &login).await;
            assert_eq!(
                nested.split_once('|').unwrap().1,
                counts.split_once('|').unwrap().1
            );
            let stream = counts.split_once('|').unwrap().1;
            assert_eq!(
                get(&client, "/show/twice", &login).await,
                format!("6 6|{stream}{stream}")
            );
            // A template that reads the fields gets them all.
            let fields = get(&client, "/show/fields", &login).await;
            assert!(
                fields.contains("[stored &lt;i&gt;one&lt;&#x2F;i&gt;|a b stored info|true|20]"),
                "{fields}"
            );
            assert_eq!(fields.matches("|false|").count(), 3, "{fields}");
            assert_eq!(
                store.backend().inbox_count(UserId(1)).await.unwrap(),
                3,
                "the pages kept the stream unread"
            );
        }
    }
}
