//! The floor under the live-streams benchmark's memory figure (`bench/streams.sh`): a bare
//! Rocket 0.5 application with one route, `GET /messages/stream`, that sends one event and
//! then holds the stream open, as an idle stream of the real server does. No session, no
//! store, nothing of this crate: what it costs per stream is what Rocket and hyper cost per
//! open response. Same allocator as the release binary (`bench/streams.sh` starts it with
//! mimalloc's eager commit off, as `app/src/main.rs` does).
//!
//! ```text
//! ROCKET_PORT=8000 cargo run --release --example bench-sse-floor
//! ```

use std::time::Duration;

use rocket::response::stream::{Event, EventStream};
use rocket::{get, routes, Shutdown};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[get("/messages/stream")]
fn stream(mut shutdown: Shutdown) -> EventStream![] {
    EventStream! {
        yield Event::json(&serde_json::json!({ "unread": 0 })).event("count");
        (&mut shutdown).await;
    }
    .heartbeat(Duration::from_secs(15))
}

#[get("/health")]
fn health() -> &'static str {
    "ok"
}

#[rocket::launch]
fn rocket() -> _ {
    rocket::build().mount("/", routes![stream, health])
}
