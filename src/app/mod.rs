//! The reference application: users, login, demo pages around the library.
//!
//! Nothing in the library imports from here; this module is one host among many, built the
//! way a host app would be: it implements [`crate::Host`], attaches
//! [`crate::StoredMessages::fairing`], registers the template helpers and mounts its pages.

use std::sync::Arc;

use rocket::fairing::AdHoc;
use rocket::figment::Figment;
use rocket::fs::{relative, FileServer};
use rocket::{Build, Rocket};

use crate::app::jobs::Jobs;
use crate::app::users::{AppHost, Users};
use crate::backend::SqlPool;
use crate::config::database_config;
use crate::error::report;
use crate::StoredMessages;

pub mod admin;
pub mod auth;
pub mod jobs;
pub mod pages;
pub mod users;

/// The reference app with Rocket's usual configuration (Rocket.toml, `ROCKET_*`).
pub fn rocket() -> Rocket<Build> {
    rocket_from(rocket::Config::figment())
}

/// The reference app over a given figment (tests build theirs in code).
pub fn rocket_from(figment: Figment) -> Rocket<Build> {
    rocket::custom(figment)
        .attach(AdHoc::try_on_ignite(
            "reference app users",
            |rocket| async {
                match connect_users(rocket.figment()).await {
                    Ok(users) => {
                        let users = Arc::new(users);
                        let host = AppHost::new(users.clone());
                        let threshold = rocket
                            .figment()
                            .extract_inner::<usize>("admin.background_threshold")
                            .unwrap_or(admin::DEFAULT_BACKGROUND_THRESHOLD);
                        Ok(rocket
                            .manage(Jobs::new(users.clone()))
                            .manage(admin::BackgroundThreshold(threshold))
                            .manage(users)
                            .attach(StoredMessages::fairing(host)))
                    }
                    Err(e) => {
                        log::error!("reference app: cannot open the users database: {e}");
                        Err(rocket)
                    }
                }
            },
        ))
        .attach(AdHoc::on_liftoff("first admin, broadcast jobs", |rocket| {
            Box::pin(async move {
                if let Some(users) = rocket.state::<Arc<Users>>() {
                    first_admin(users).await;
                }
                // Resumes the broadcasts a restart interrupted, then runs new ones.
                if let (Some(jobs), Some(store)) =
                    (rocket.state::<Jobs>(), rocket.state::<crate::Store>())
                {
                    rocket::tokio::spawn(jobs.clone().worker(store.clone(), rocket.shutdown()));
                }
            })
        }))
        .attach(crate::template::fairing())
        .mount("/", pages::routes())
        .mount("/", auth::routes())
        .mount("/", admin::routes())
        .mount("/static", FileServer::from(relative!("static")))
        .register("/", pages::catchers())
}

/// Connects the users database (the same url as the SQL backend) and applies the app's
/// migrations.
pub async fn connect_users(figment: &Figment) -> Result<Users, String> {
    let config = database_config(figment).map_err(|e| e.to_string())?;
    let url = crate::config::SecretUrl::new(&config.url);
    let pool = SqlPool::connect_with(&config)
        .await
        .map_err(|e| format!("{url}: {}", report(&e)))?;
    let users = Users::new(pool);
    users.migrate().await.map_err(|e| report(&e))?;
    Ok(users)
}

/// On the first start (no users at all) creates `admin` with a random password and prints
/// how to log in, once.
async fn first_admin(users: &Users) {
    match users.count().await {
        Ok(0) => {}
        Ok(_) => return,
        Err(e) => {
            log::error!("reference app: counting users failed: {}", report(&e));
            return;
        }
    }
    let password = crate::flash::overflow::new_key();
    match users.create("admin", &password, true).await {
        Ok(_) => eprintln!(
            "\n  stored-messages: first start, no users yet.\n  \
             Log in at /login as  admin  with password  {password}\n  \
             (shown only now; create more users with `stored-messages createuser NAME [--admin]`)\n"
        ),
        Err(e) => log::error!(
            "reference app: creating the first admin failed: {}",
            report(&e)
        ),
    }
}
