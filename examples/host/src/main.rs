//! Serves the example host: `cargo run -p stored-messages-example-host` (from this folder,
//! so that its Rocket.toml is read), then open http://127.0.0.1:8000.

#[rocket::launch]
fn launch() -> _ {
    stored_messages_example_host::app(rocket::Config::figment())
}
