//! What only the Redis backend has: its key layout, its use of `SCAN`, reconnection, and
//! broadcasts large enough to matter. Behaviour shared with SQL is in `backend.rs`.

use std::collections::BTreeSet;
use std::time::Instant;

use chrono::{Duration, TimeZone, Utc};
use redis::Commands;
use stored_messages::backend::Settings;
use stored_messages::config::SecretUrl;
use stored_messages::{
    report, Error, Level, ListQuery, Message, MessageBackend, MessageId, NewMessage, RedisBackend,
    UserId,
};

use crate::common::{redis_connection, redis_store, Place, RedisPrefix, TestStore};

const ALICE: UserId = UserId(1);
const BOB: UserId = UserId(2);
const CAROL: UserId = UserId(3);

fn prefix(t: &TestStore) -> &RedisPrefix {
    match &t.place {
        Place::Redis(prefix) => prefix,
        _ => unreachable!("a redis store"),
    }
}

fn stored(text: &str) -> NewMessage {
    NewMessage::new(Level::STORED_INFO, text).unwrap()
}

/// `cmdstat_<command>:calls=N` from `INFO commandstats`, 0 when never called.
fn command_calls(connection: &mut redis::Connection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(connection)
        .unwrap();
    let field = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&field))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_follow_the_documented_layout() {
    let Some(t) = redis_store().await else { return };
    let p = prefix(&t).prefix.clone();
    // act: deliver (one script) and create + archive_store (another script)
    let new = NewMessage::parse(
        Level::STORED_WARNING,
        "hello",
        "a b",
        Some("/x"),
        Some(Utc.timestamp_micros(1_700_000_000_000_042).unwrap()),
    )
    .unwrap();
    let delivered = t
        .store
        .add_message_for(&[ALICE, BOB], new)
        .await
        .unwrap()
        .message;
    let archived = t.backend().create_message(&stored("later")).await.unwrap();
    assert_eq!(
        t.backend()
            .archive_store(&[CAROL], &archived)
            .await
            .unwrap(),
        1
    );
    // assert: exactly these keys exist
    let (d, a) = (delivered.id.0, archived.id.0);
    let expected: BTreeSet<String> = [
        "messages:last_id".to_string(),
        "messages:by_date".to_string(),
        format!("message:{d}"),
        format!("message:{a}"),
        "user:1:notifications".to_string(),
        "user:1:archive".to_string(),
        "user:2:notifications".to_string(),
        "user:2:archive".to_string(),
        "user:3:archive".to_string(),
    ]
    .into_iter()
    .map(|k| format!("{p}{k}"))
    .collect();
    let found: BTreeSet<String> = prefix(&t).keys().into_iter().collect();
    assert_eq!(found, expected);
    // the hash holds the message once; the sets hold its (date, id) member
    let mut c = redis_connection(&prefix(&t).url).unwrap();
    let hash: std::collections::HashMap<String, String> =
        c.hgetall(format!("{p}message:{d}")).unwrap();
    let member = format!("0001700000000000042:{d:019}");
    assert_eq!(hash["level"], "31");
    assert_eq!(hash["message"], "hello");
    assert_eq!(hash["extra_tags"], "a b");
    assert_eq!(hash["url"], "/x");
    assert_eq!(hash["date_us"], "1700000000000042");
    assert_eq!(hash["member"], member);
    assert!(!c
        .hexists::<_, _, bool>(format!("{p}message:{a}"), "url")
        .unwrap());
    let inbox: Vec<(String, f64)> = c
        .zrange_withscores(format!("{p}user:2:notifications"), 0, -1)
        .unwrap();
    assert_eq!(inbox, vec![(member.clone(), 0.0)]);
    let last_id: i64 = c.get(format!("{p}messages:last_id")).unwrap();
    assert_eq!(last_id, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_and_flush_use_scan_never_keys() {
    let Some(t) = redis_store().await else { return };
    let mut c = redis_connection(&prefix(&t).url).unwrap();
    t.store
        .add_message_for(&[ALICE, BOB], stored("x"))
        .await
        .unwrap();
    // NOTE: the counters are server-wide; nothing in this suite sends KEYS, so any change
    // would come from this backend (or from someone typing KEYS at the same server).
    let (keys_before, scans_before) =
        (command_calls(&mut c, "keys"), command_calls(&mut c, "scan"));
    t.store.cleanup().await.unwrap();
    t.backend().flush().await.unwrap();
    assert_eq!(command_calls(&mut c, "keys"), keys_before);
    assert!(command_calls(&mut c, "scan") >= scans_before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_leaves_foreign_keys_and_the_id_counter() {
    let Some(t) = redis_store().await else { return };
    let p = prefix(&t).prefix.clone();
    let mut c = redis_connection(&prefix(&t).url).unwrap();
    let _: () = c.set(format!("{p}session:1"), "keep").unwrap();
    let _: () = c.set(format!("{p}user:1:settings"), "keep").unwrap();
    let first = t
        .store
        .add_message_for(&[ALICE], stored("x"))
        .await
        .unwrap()
        .message
        .id;
    // act
    t.backend().flush().await.unwrap();
    // assert: only the counter and the foreign keys remain, and ids keep growing
    let found: BTreeSet<String> = prefix(&t).keys().into_iter().collect();
    let expected: BTreeSet<String> = ["session:1", "user:1:settings", "messages:last_id"]
        .iter()
        .map(|k| format!("{p}{k}"))
        .collect();
    assert_eq!(found, expected);
    let next = t
        .store
        .add_message_for(&[ALICE], stored("y"))
        .await
        .unwrap()
        .message
        .id;
    assert!(next > first, "{next} after {first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_characters_in_the_prefix_stay_literal() {
    let Some(url) = RedisPrefix::create().map(|p| p.url.clone()) else {
        return;
    };
    let base = format!("sm_test_{}", crate::common::random_id());
    // Two prefixes that the unescaped pattern `<base>[ab]*` would both match.
    let bracketed = RedisPrefix {
        prefix: format!("{base}[ab]:"),
        url: url.clone(),
    };
    let plain = RedisPrefix {
        prefix: format!("{base}a:"),
        url: url.clone(),
    };
    let secret = SecretUrl::new(&url);
    let settings = Settings::default();
    let glob = RedisBackend::connect(&secret, &bracketed.prefix, settings.clone())
        .await
        .unwrap();
    let other = RedisBackend::connect(&secret, &plain.prefix, settings)
        .await
        .unwrap();
    glob.deliver(&[ALICE], &stored("glob")).await.unwrap();
    other.deliver(&[ALICE], &stored("other")).await.unwrap();
    // act
    glob.flush().await.unwrap();
    // assert
    assert_eq!(glob.inbox_count(ALICE).await.unwrap(), 0);
    assert_eq!(other.inbox_count(ALICE).await.unwrap(), 1);
    assert_eq!(
        bracketed.keys(),
        vec![format!("{}messages:last_id", bracketed.prefix)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dates_before_1970_are_archived_in_order() {
    let Some(t) = redis_store().await else { return };
    let dates = [
        Utc.with_ymd_and_hms(1969, 12, 31, 23, 59, 59).unwrap(),
        Utc.with_ymd_and_hms(1901, 1, 1, 0, 0, 0).unwrap(),
        Utc.timestamp_micros(0).unwrap(),
        Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 1).unwrap(),
        Utc.with_ymd_and_hms(1969, 7, 20, 20, 17, 0).unwrap(),
    ];
    for date in dates {
        let m = NewMessage::parse(Level::STORED_INFO, &date.to_rfc3339(), "", None, Some(date))
            .unwrap();
        t.store.add_message_for(&[ALICE], m).await.unwrap();
    }
    let mut expected = dates.to_vec();
    expected.sort_by(|a, b| b.cmp(a));
    // One message per page, so every step goes through a cursor.
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = t
            .backend()
            .archive_list(
                ALICE,
                ListQuery {
                    limit: Some(1),
                    after,
                },
            )
            .await
            .unwrap();
        let Some(m) = page.first() else { break };
        after = Some(stored_messages::Cursor::after(m));
        listed.push(m.date);
    }
    assert_eq!(listed, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storing_a_message_that_is_not_stored_is_refused() {
    let Some(t) = redis_store().await else { return };
    let ghost = Message {
        id: MessageId(987_654_321),
        level: Level::STORED_INFO,
        message: "ghost".into(),
        extra_tags: String::new(),
        url: None,
        date: Utc::now(),
    };
    for result in [
        t.backend().inbox_store(&[ALICE], &ghost).await,
        t.backend().archive_store(&[ALICE], &ghost).await,
    ] {
        assert!(
            matches!(result, Err(Error::MessageDoesNotExist(_))),
            "{result:?}"
        );
    }
    assert!(prefix(&t).keys().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_the_hash_and_index_entry_of_old_messages() {
    let Some(t) = redis_store().await else { return };
    let p = prefix(&t).prefix.clone();
    let old = NewMessage::parse(
        Level::STORED_INFO,
        "old",
        "",
        None,
        Some(Utc::now() - Duration::days(200)),
    )
    .unwrap();
    let id = t
        .store
        .add_message_for(&[ALICE], old)
        .await
        .unwrap()
        .message
        .id;
    let cleanup = t.store.cleanup().await.unwrap();
    assert_eq!((cleanup.messages, cleanup.inbox_entries), (1, 0));
    let found: BTreeSet<String> = prefix(&t).keys().into_iter().collect();
    assert_eq!(
        found,
        [format!("{p}messages:last_id")].into(),
        "message {id}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_to_thousands_is_one_step_and_reaches_everyone() {
    let Some(t) = redis_store().await else { return };
    let users: Vec<UserId> = (1..=5_000).map(UserId).collect();
    let d = t
        .store
        .add_message_for(&users, stored("to all"))
        .await
        .unwrap();
    assert_eq!(d.recipients, 5_000);
    for user in [UserId(1), UserId(2_500), UserId(5_000)] {
        assert_eq!(
            t.backend().inbox_get(user, d.message.id).await.unwrap(),
            d.message
        );
    }
    assert_eq!(prefix(&t).keys().len(), 2 * 5_000 + 3);
}

/// Has the server drop `backend`'s connection (`CLIENT KILL`), as a restart would.
async fn kill_connection_of(backend: &RedisBackend, url: &str) {
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut backend.connection())
        .await
        .unwrap();
    let mut c = redis_connection(url).unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query(&mut c)
        .unwrap();
    assert_eq!(killed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reconnects_after_its_connection_is_killed() {
    let Some(t) = redis_store().await else { return };
    let backend = RedisBackend::connect(
        &SecretUrl::new(&prefix(&t).url),
        &prefix(&t).prefix,
        Settings::default(),
    )
    .await
    .unwrap();
    backend.deliver(&[ALICE], &stored("x")).await.unwrap();
    // act: the server drops the backend's connection, as a restart would
    kill_connection_of(&backend, &prefix(&t).url).await;
    // assert: a read goes again on a new connection, so nothing fails; a write may fail
    // once, as unavailable (503), since it may have been applied; the next one reconnects
    assert_eq!(backend.inbox_count(ALICE).await.unwrap(), 1);
    kill_connection_of(&backend, &prefix(&t).url).await;
    if let Err(e) = backend.deliver(&[ALICE], &stored("y")).await {
        assert!(
            matches!(&e, Error::Backend(b) if b.is_unavailable()),
            "{}",
            report(&e)
        );
    }
    backend.deliver(&[ALICE], &stored("z")).await.unwrap();
    assert!((2..=3).contains(&backend.inbox_count(ALICE).await.unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_fails_with_a_readable_error() {
    let url = SecretUrl::new("redis://user:hunter2@127.0.0.1:1/0");
    let err = RedisBackend::connect(&url, "", Settings::default())
        .await
        .unwrap_err();
    let text = report(&err);
    assert!(
        text.starts_with("cannot connect to redis at redis://user:***@127.0.0.1:1/0: "),
        "{text}"
    );
    assert!(err.is_unavailable(), "{text}");
    let err = RedisBackend::connect(&SecretUrl::new("redis://[::1"), "", Settings::default())
        .await
        .unwrap_err();
    assert!(
        report(&err).starts_with("cannot connect to redis at"),
        "{}",
        report(&err)
    );
}

/// Run with `cargo test --release --test it deliver_to_100k -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: writes 200,000 keys"]
async fn deliver_to_100k_users_takes() {
    let Some(t) = redis_store().await else { return };
    let users: Vec<UserId> = (1..=100_000).map(UserId).collect();
    for round in 1..=3 {
        let start = Instant::now();
        let d = t
            .store
            .add_message_for(&users, stored(&format!("round {round}")))
            .await
            .unwrap();
        let elapsed = start.elapsed();
        assert_eq!(d.recipients, 100_000);
        println!("deliver to 100,000 users, round {round}: {elapsed:?}");
    }
    assert_eq!(t.backend().inbox_count(UserId(77_777)).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_connect_builds_the_redis_backend_from_configuration() {
    let Some(keys) = RedisPrefix::create() else {
        return;
    };
    let figment = rocket::Config::figment()
        .merge(("stored_messages.backend", "redis"))
        .merge(("stored_messages.redis_url", &keys.url))
        .merge(("stored_messages.redis_key_prefix", &keys.prefix));
    let host = crate::common::TestHost::with_users([1, 2]);
    let store = stored_messages::Store::connect(&figment, host)
        .await
        .unwrap();
    assert_eq!(store.backend().name(), "redis");
    let d = store.broadcast_message(stored("hi")).await.unwrap();
    assert_eq!(d.recipients, 2);
    assert!(keys
        .keys()
        .contains(&format!("{}user:2:notifications", keys.prefix)));
}
