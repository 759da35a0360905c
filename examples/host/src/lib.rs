//! A Rocket app embedding stored-messages, written as the README's "Embedding" section tells
//! a host to: its own users (`Host`), the fairing with the JSON API moved to
//! `/api/messages`, the templates with the helpers, the `Messages` guard on its pages, a
//! form with a CSRF token, and a page of its own at `/messages`.

#[macro_use]
extern crate rocket;

use rocket::figment::Figment;
use rocket::form::Form;
use rocket::http::CookieJar;
use rocket::response::Redirect;
use rocket::{Build, Request, Rocket};
use rocket_dyn_templates::context;
use stored_messages::template::Page;
use stored_messages::{BoxError, Host, Messages, StoredMessages, UserId};

/// Who the users are: here, whoever the private `user_id` cookie names (set by `/login`).
/// A real host asks its session and its users table.
struct Users;

#[rocket::async_trait]
impl Host for Users {
    async fn current_user(&self, request: &Request<'_>) -> Option<UserId> {
        let cookie = request.cookies().get_private("user_id")?;
        cookie.value().parse().ok().map(UserId)
    }

    async fn all_users(&self) -> Result<Vec<UserId>, BoxError> {
        Ok(vec![UserId(1), UserId(2)])
    }
}

/// The home page: shows the messages waiting for this browser (and so uses them up).
#[get("/")]
fn index(messages: Messages<'_>) -> Page {
    Page::render("index", context! { messages })
}

#[derive(FromForm)]
struct Note<'r> {
    text: &'r str,
}

/// Leaves a note: stored in the inbox of a logged-in user, a flash message for anyone else.
/// The form carries `{{ csrf_token() }}`; without it the fairing answers 403.
#[post("/note", data = "<note>")]
async fn note(messages: Messages<'_>, note: Form<Note<'_>>) -> Redirect {
    if let Err(e) = messages.stored_info(note.text).await {
        // A note too long or with control characters: said on the next page (as a flash
        // message). An empty one is dropped without a word, as Django drops it.
        let _ = messages.error(&format!("Not saved: {e}")).await;
    }
    Redirect::to(uri!(index))
}

/// Logs in as user `id` (a stand-in for a real login form).
#[post("/login/<id>")]
fn login(id: i64, jar: &CookieJar<'_>) -> Redirect {
    jar.add_private(("user_id", id.to_string()));
    Redirect::to(uri!(index))
}

/// A page of the host's own at `/messages`: the library's JSON API lives at
/// `/api/messages` instead, so the two do not collide.
#[get("/messages")]
fn messages_page() -> Page {
    Page::render("messages", context! {})
}

/// The app over `figment` (Rocket.toml and `ROCKET_*` variables in `main`).
pub fn app(figment: Figment) -> Rocket<Build> {
    rocket::custom(figment)
        .attach(StoredMessages::fairing(Users).api_at("/api/messages"))
        .attach(stored_messages::template::fairing())
        .mount("/", routes![index, note, login, messages_page])
}
