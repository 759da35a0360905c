//! The conformance suite: each behaviour once, run against every backend.
//!
//! Each behaviour is an async function taking a fresh [`TestStore`]; the `conformance!`
//! macro stamps out one test per behaviour and backend.

use chrono::{Duration, Utc};
use stored_messages::{
    Config, Cursor, Error, Event, Level, ListQuery, Message, MessageId, NewMessage, UserId,
};

use crate::common::TestStore;

const ALICE: UserId = UserId(1);
const BOB: UserId = UserId(2);
const CAROL: UserId = UserId(3);

fn stored(text: &str) -> NewMessage {
    NewMessage::new(Level::STORED_INFO, text).unwrap()
}

/// How many messages the user's archive holds.
async fn archive_len(t: &TestStore, user: UserId) -> usize {
    t.backend()
        .archive_list(user, ListQuery::ALL)
        .await
        .unwrap()
        .len()
}

fn texts(messages: &[Message]) -> Vec<&str> {
    messages.iter().map(|m| m.message.as_str()).collect()
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(t) = crate::common::sqlite_store().await {
                        super::$name(&t).await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(t) = crate::common::postgres_store().await {
                        super::$name(&t).await;
                    }
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(t) = crate::common::redis_store().await {
                        super::$name(&t).await;
                    }
                }
            )*
        }
        /// SQLite with deliveries stored as runs of consecutive users.
        mod sqlite_runs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let config = crate::common::runs_config();
                    if let Some(t) = crate::common::sqlite_store_with(config).await {
                        super::$name(&t).await;
                    }
                }
            )*
        }
        /// PostgreSQL with deliveries stored as runs of consecutive users.
        mod postgres_runs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let config = crate::common::runs_config();
                    if let Some(t) = crate::common::postgres_store_with(config).await {
                        super::$name(&t).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    a_lease_has_one_holder_until_its_time_runs_out,
    stored_message_is_in_inbox_and_archive,
    inbox_get_returns_the_message_and_refuses_unknown_ids,
    inbox_delete_keeps_the_archive_and_refuses_a_second_time,
    inbox_purge_empties_the_inbox_only,
    inbox_is_oldest_first_and_archive_newest_first,
    mark_read_twice_is_true_then_false,
    add_message_for_several_users_keeps_tags_date_and_url,
    broadcast_reaches_every_user_of_the_host,
    mark_all_read_of_twenty_counts_twenty,
    unicode_text_round_trips,
    another_users_message_is_not_found,
    message_arriving_during_mark_all_read_is_never_lost,
    expired_inbox_entries_are_hidden_and_cleaned_up,
    cleanup_removes_old_messages_everywhere,
    non_store_level_is_refused_and_nothing_changes,
    duplicate_recipients_count_once,
    inbox_store_skips_users_who_have_it_and_redelivers_read_ones,
    archive_store_alone_does_not_touch_the_inbox,
    pages_follow_the_cursor_without_gaps_or_duplicates,
    pages_stay_correct_while_messages_arrive_and_are_read,
    inbox_delete_many_returns_only_unread_ids,
    same_instant_messages_get_distinct_ids_and_stable_order,
    writes_publish_events,
    flush_removes_everything,
    can_handle_follows_store_levels,
    deliver_once_skips_everyone_who_has_it_read_or_unread,
    deliver_once_in_overlapping_chunks_reaches_each_user_once,
    inbox_list_many_answers_what_inbox_list_answers,
    message_stats_count_recipients_and_unread,
    message_delete_removes_it_everywhere,
    inbox_cache_answers_exactly_like_the_backend,
    inbox_cache_sees_writes_of_another_process,
    a_busy_inbox_cache_sees_writes_of_another_process,
    change_feed_reports_writes_of_every_process,
    writes_that_change_inboxes_wait_where_reads_trust_recent_syncs,
    a_write_to_hundreds_of_users_is_announced_by_naming_them,
    a_broadcast_to_many_consecutive_users_behaves_per_user,
    expired_broadcasts_leave_every_inbox_once,
);

async fn stored_message_is_in_inbox_and_archive(t: &TestStore) {
    // act
    let m = t.backend().create_message(&stored("hello")).await.unwrap();
    assert_eq!(t.backend().archive_store(&[ALICE], &m).await.unwrap(), 1);
    assert_eq!(t.backend().inbox_store(&[ALICE], &m).await.unwrap(), 1);
    // assert
    let inbox = t.backend().inbox_list(ALICE, ListQuery::ALL).await.unwrap();
    assert_eq!(inbox, vec![m.clone()]);
    let archive = t
        .backend()
        .archive_list(ALICE, ListQuery::ALL)
        .await
        .unwrap();
    assert_eq!(archive, vec![m.clone()]);
    assert_eq!(t.backend().inbox_count(ALICE).await.unwrap(), 1);
    assert_eq!(t.backend().inbox_count(BOB).await.unwrap(), 0);
    assert!(t
        .backend()
        .inbox_list(BOB, ListQuery::ALL)
        .await
        .unwrap()
        .is_empty());
}

async fn inbox_get_returns_the_message_and_refuses_unknown_ids(t: &TestStore) {
    let d = t
        .store
        .add_message_for(&[ALICE], stored("x"))
        .await
        .unwrap();
    let got = t.backend().inbox_get(ALICE, d.message.id).await.unwrap();
    assert_eq!(got, d.message);
    let unknown = MessageId(d.message.id.0 + 1000);
    let err = t.backend().inbox_get(ALICE, unknown).await.unwrap_err();
    assert!(
        matches!(err, Error::MessageDoesNotExist(id) if id == unknown),
        "{err}"
    );
}

async fn inbox_delete_keeps_the_archive_and_refuses_a_second_time(t: &TestStore) {
    let d = t
        .store
        .add_message_for(&[ALICE], stored("x"))
        .await
        .unwrap();
    t.backend().inbox_delete(ALICE, d.message.id).await.unwrap();
    assert!(t
        .backend()
        .inbox_list(ALICE, ListQuery::ALL)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        t.backend()
            .archive_list(ALICE, ListQuery::ALL)
            .await
            .unwrap(),
        vec![d.message.clone()]
    );
    let err = t
        .backend()
        .inbox_delete(ALICE, d.message.id)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MessageDoesNotExist(_)), "{err}");
    let err = t
        .backend()
        .inbox_get(ALICE, d.message.id)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MessageDoesNotExist(_)), "{err}");
}

async fn inbox_purge_empties_the_inbox_only(t: &TestStore) {
    for i in 0..3 {
        t.store
            .add_message_for(&[ALICE, BOB], stored(&format!("m{i}")))
            .await
            .unwrap();
    }
    assert_eq!(t.backend().inbox_purge(ALICE).await.unwrap(), 3);
    assert_eq!(t.backend().inbox_count(ALICE).await.unwrap(), 0);
    assert_eq!(archive_len(t, ALICE).await, 3);
    assert_eq!(
        t.backend().inbox_count(BOB).await.unwrap(),
        3,
        "bob's inbox is untouched"
    );
    assert_eq!(t.backend().inbox_purge(ALICE).await.unwrap(), 0);
}

async fn inbox_is_oldest_first_and_archive_newest_first(t: &TestStore) {
    let now = Utc::now();
    // Added out of date order on purpose.
    for (text, minutes) in [("middle", 2), ("newest", 1), ("oldest", 3)] {
        let m = NewMessage::parse(
            Level::STORED_INFO,
            text,
            "",
            None,
            Some(now - Duration::minutes(minutes)),
        )
        .unwrap();
        t.store.add_message_for(&[ALICE], m).await.unwrap();
    }
    let inbox = t.backend().inbox_list(ALICE, ListQuery::ALL).await.unwrap();
    assert_eq!(texts(&inbox), ["oldest", "middle", "newest"]);
    let archive = t
        .backend()
        .archive_list(ALICE, ListQuery::ALL)
        .await
        .unwrap();
    assert_eq!(texts(&archive), ["newest", "middle", "oldest"]);
    let first = t
        .backend()
        .inbox_list(ALICE, ListQuery::first(2))
        .await
        .unwrap();
    assert_eq!(texts(&first), ["oldest", "middle"]);
}

async fn mark_read_twice_is_true_then_false(t: &TestStore) {
    let d = t
        .store
        .add_message_for(&[ALICE], stored("x"))
        .await
        .unwrap();
    assert!(t.store.mark_read(ALICE, d.message.id).await.unwrap());
    assert!(!t.store.mark_read(ALICE, d.message.id).await.unwrap());
    assert!(!t.store.mark_read(ALICE, MessageId(999_999)).await.unwrap());
    assert_eq!(archive_len(t, ALICE).await, 1);
}

async fn add_message_for_several_users_keeps_tags_date_and_url(t: &TestStore) {
    let date = "2026-11-20T10:11:12.345678Z".parse().unwrap();
    let new = NewMessage::parse(
        Level::STORED_WARNING,
        "check this",
        "tag1  tag2",
        Some("/some/url"),
        Some(date),
    )
    .unwrap();
    let d = t
        .store
        .add_message_for(&[ALICE, BOB, CAROL], new)
        .await
        .unwrap();
    assert_eq!(d.recipients, 3);
    for user in [ALICE, BOB, CAROL] {
        let inbox = t.backend().inbox_list(user, ListQuery::ALL).await;
        // The date is in the past but well within 30 days only if the clock agrees; check the
        // archive, which never expires on read.
        let _ = inbox;
        let archive = t
            .backend()
            .archive_list(user, ListQuery::ALL)
            .await
            .unwrap();
        assert_eq!(archive.len(), 1);
        let m = &archive[0];
        assert_eq!(m.id, d.message.id);
        assert_eq!(m.level, Level::STORED_WARNING);
        assert_eq!(m.extra_tags, "tag1 tag2");
        assert_eq!(m.url.as_deref(), Some("/some/url"));
        assert_eq!(m.date, date);
        assert_eq!(m.tags(t.store.level_tags()), "tag1 tag2 stored warning");
    }
    let absolute = NewMessage::parse(
        Level::STORED_INFO,
        "x",
        "",
        Some("https://example.com/a?b=1"),
        None,
    )
    .unwrap();
    let d = t.store.add_message_for(&[ALICE], absolute).await.unwrap();
    let got = t.backend().inbox_get(ALICE, d.message.id).await.unwrap();
    assert_eq!(got.url.as_deref(), Some("https://example.com/a?b=1"));
}

async fn broadcast_reaches_every_user_of_the_host(t: &TestStore) {
    *t.host.users.lock().unwrap() = vec![ALICE, BOB, CAROL];
    let d = t
        .store
        .broadcast_message(stored("to everyone"))
        .await
        .unwrap();
    assert_eq!(d.recipients, 3);
    for user in [ALICE, BOB, CAROL] {
        let inbox = t.backend().inbox_list(user, ListQuery::ALL).await.unwrap();
        assert_eq!(texts(&inbox), ["to everyone"]);
    }
    // A user created after the broadcast does not get it.
    t.host.users.lock().unwrap().push(UserId(4));
    assert_eq!(t.backend().inbox_count(UserId(4)).await.unwrap(), 0);
}

async fn mark_all_read_of_twenty_counts_twenty(t: &TestStore) {
    for i in 0..20 {
        t.store
            .add_message_for(&[ALICE], stored(&format!("m{i}")))
            .await
            .unwrap();
    }
    assert_eq!(t.store.mark_all_read(ALICE).await.unwrap(), 20);
    assert_eq!(t.backend().inbox_count(ALICE).await.unwrap(), 0);
    assert_eq!(archive_len(t, ALICE).await, 20);
    assert_eq!(t.store.mark_all_read(ALICE).await.unwrap(), 0);
}

async fn unicode_text_round_trips(t: &TestStore) {
    for text in [
        "an SOS to the world ☢",
        "❤",
        "日本語 \u{1F600} ç'est «ça»",
        "<script>alert(1)</script>",
    ] {
        let d = t
            .store
            .add_message_for(&[ALICE], stored(text))
            .await
            .unwrap();
        assert_eq!(
            t.backend()
                .inbox_get(ALICE, d.message.id)
                .await
                .unwrap()
                .message,
            text
        );
    }
}

async fn another_users_message_is_not_found(t: &TestStore) {
    let d = t
        .store
        .add_message_for(&[ALICE], stored("alice only"))
        .await
        .unwrap();
    let id = d.message.id;
    assert!(matches!(
        t.backend().inbox_get(BOB, id).await,
        Err(Error::MessageDoesNotExist(_))
    ));
    assert!(matches!(
        t.backend().inbox_delete(BOB, id).await,
        Err(Error::MessageDoesNotExist(_))
    ));
    assert!(!t.store.mark_read(BOB, id).await.unwrap());
    assert!(t
        .backend()
        .inbox_delete_many(BOB, &[id])
        .await
        .unwrap()
        .is_empty());
    // nothing changed for alice
    assert_eq!(t.backend().inbox_get(ALICE, id).await.unwrap().id, id);
}

async fn message_arriving_during_mark_all_read_is_never_lost(t: &TestStore) {
    for i in 0..50 {
        t.store
            .add_message_for(&[ALICE], stored(&format!("before {i}")))
            .await
            .unwrap();
    }
    // Race writers against mark_all_read; every message must end up either counted by a
    // mark_all_read or still unread.
    let writer = {
        let store = t.store.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                store
                    .add_message_for(&[ALICE], stored(&format!("during {i}")))
                    .await
                    .unwrap();
            }
        })
    };
    let reader = {
        let store = t.store.clone();
        tokio::spawn(async move {
            let mut marked = 0;
            for _ in 0..10 {
                marked += store.mark_all_read(ALICE).await.unwrap();
                tokio::task::yield_now().await;
            }
            marked
        })
    };
    writer.await.unwrap();
    let marked = reader.await.unwrap();
    let unread = t.backend().inbox_count(ALICE).await.unwrap();
    assert_eq!(marked + unread, 100, "marked {marked} + unread {unread}");
    assert_eq!(archive_len(t, ALICE).await, 100);
}

async fn expired_inbox_entries_are_hidden_and_cleaned_up(t: &TestStore) {
    let now = Utc::now();
    let old = NewMessage::parse(
        Level::STORED_INFO,
        "old",
        "",
        None,
        Some(now - Duration::days(31)),
    )
    .unwrap();
    let fresh = NewMessage::parse(
        Level::STORED_INFO,
        "fresh",
        "",
        None,
        Some(now - Duration::days(29)),
    )
    .unwrap();
    let old = t
        .store
        .add_message_for(&[ALICE], old)
        .await
        .unwrap()
        .message;
    t.store.add_message_for(&[ALICE], fresh).await.unwrap();
    // on read
    assert_eq!(
        texts(&t.backend().inbox_list(ALICE, ListQuery::ALL).await.unwrap()),
        ["fresh"]
    );
    assert_eq!(t.backend().inbox_count(ALICE).await.unwrap(), 1);
    assert!(matches!(
        t.backend().inbox_get(ALICE, old.id).await,
        Err(Error::MessageDoesNotExist(_))
    ));
    assert!(!t.store.mark_read(ALICE, old.id).await.unwrap());
    // in cleanup: the inbox entry goes, the archive keeps the message
    let cleanup = t.store.cleanup().await.unwrap();
    assert_eq!(cleanup.inbox_entries, 1);
    assert_eq!(cleanup.messages, 0);
    assert_eq!(archive_len(t, ALICE).await, 2);
    // a longer inbox expiry does not bring it back: cleanup removed it
    let config = Config {
        inbox_expire_days: 60,
        ..Config::default()
    };
    let longer = t.reconfigured(config).await;
    assert_eq!(
        texts(
            &longer
                .backend()
                .inbox_list(ALICE, ListQuery::ALL)
                .await
                .unwrap()
        ),
        ["fresh"]
    );
}

async fn cleanup_removes_old_messages_everywhere(t: &TestStore) {
    let now = Utc::now();
    let ancient = NewMessage::parse(
        Level::STORED_INFO,
        "ancient",
        "",
        None,
        Some(now - Duration::days(121)),
    )
    .unwrap();
    let old = NewMessage::parse(
        Level::STORED_INFO,
        "old",
        "",
        None,
        Some(now - Duration::days(100)),
    )
    .unwrap();
    t.store
        .add_message_for(&[ALICE, BOB], ancient)
        .await
        .unwrap();
    t.store.add_message_for(&[ALICE], old).await.unwrap();
    t.store
        .add_message_for(&[ALICE], stored("new"))
        .await
        .unwrap();
    let cleanup = t.store.cleanup().await.unwrap();
    assert_eq!(cleanup.messages, 1);
    assert_eq!(
        cleanup.inbox_entries, 1,
        "only 'old' was still in an inbox and not removed"
    );
    assert_eq!(
        texts(
            &t.backend()
                .archive_list(ALICE, ListQuery::ALL)
                .await
                .unwrap()
        ),
        ["new", "old"]
    );
    assert!(t
        .backend()
        .archive_list(BOB, ListQuery::ALL)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        t.store.cleanup().await.unwrap(),
        Default::default(),
        "cleanup is idempotent"
    );
}

async fn non_store_level_is_refused_and_nothing_changes(t: &TestStore) {
    let plain = NewMessage::new(Level::INFO, "not stored").unwrap();
    let err = t
        .store
        .add_message_for(&[ALICE], plain.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::MessageTypeNotSupported(Level::INFO)),
        "{err}"
    );
    let err = t.backend().create_message(&plain).await.unwrap_err();
    assert!(matches!(err, Error::MessageTypeNotSupported(_)), "{err}");
    assert_eq!(
        t.backend()
            .archive_list(ALICE, ListQuery::ALL)
            .await
            .unwrap(),
        vec![]
    );
    // Validation happens before any backend sees the message.
    assert!(matches!(
        NewMessage::new(Level::STORED_INFO, ""),
        Err(stored_messages::InvalidMessage::Empty)
    ));
    assert!(NewMessage::parse(
        Level::STORED_INFO,
        "x",
        "",
        Some("javascript:alert(1)"),
        None
    )
    .is_err());
}

async fn duplicate_recipients_count_once(t: &TestStore) {
    let d = t
        .store
        .add_message_for(&[ALICE, BOB, ALICE, ALICE], stored("x"))
        .await
        .unwrap();
    assert_eq!(d.recipients, 2);
    assert_eq!(t.backend().inbox_count(ALICE).await.unwrap(), 1);
    assert_eq!(archive_len(t, ALICE).await, 1);
}

async fn inbox_store_skips_users_who_have_it_and_redelivers_read_ones(t: &TestStore) {
    let d = t
        .store
        .add_message_for(&[ALICE], stored("x"))
        .await
        .unwrap();
    let m = d.message;
    // alice has it unread: skipped; bob is new: stored. One duplicate does not stop the rest.
    assert_eq!(t.backend().inbox_store(&[ALICE, BOB], &m).await.unwrap(), 1);
    assert_eq!(t.backend().inbox_count(BOB).await.unwrap(), 1);
    assert_eq!(archive_len(t, BOB).await, 1, "inbox implies archive");
    // read, then delivered again: unread again, still once in the archive
    assert!(t.store.mark_read(ALICE, m.id).await.unwrap());
    assert_eq!(t.backend().inbox_store(&[ALICE], &m).await.unwrap(), 1);
    assert_eq!(t.backend().inbox_get(ALICE, m.id).await.unwrap().id, m.id);
    assert_eq!(archive_len(t, ALICE).await, 1);
}

async fn archive_store_alone_does_not_touch_the_inbox(t: &TestStore) {
    let m = t.backend().create_message(&stored("x")).await.unwrap();
    assert_eq!(
        t.backend().archive_store(&[ALICE, BOB], &m).await.unwrap(),
        2
    );
    assert_eq!(
        t.backend().archive_store(&[ALICE], &m).await.unwrap(),
        0,
        "already archived"
    );
    assert_eq!(t.backend().inbox_count(ALICE).await.unwrap(), 0);
    assert_eq!(
        t.backend().archive_list(BOB, ListQuery::ALL).await.unwrap(),
        vec![m]
    );
}

async fn pages_follow_the_cursor_without_gaps_or_duplicates(t: &TestStore) {
    for i in 0..25 {
        t.store
            .add_message_for(&[ALICE], stored(&format!("m{i:02}")))
            .await
            .unwrap();
    }
    for archive in [false, true] {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let query = ListQuery {
                limit: Some(10),
                after,
            };
            let page = if archive {
                t.backend().archive_list(ALICE, query).await.unwrap()
            } else {
                t.backend().inbox_list(ALICE, query).await.unwrap()
            };
            if page.is_empty() {
                break;
            }
            after = page.last().map(Cursor::after);
            seen.extend(page.into_iter().map(|m| m.message));
        }
        let mut expected: Vec<String> = (0..25).map(|i| format!("m{i:02}")).collect();
        if archive {
            expected.reverse();
        }
        assert_eq!(seen, expected, "archive: {archive}");
    }
}

async fn pages_stay_correct_while_messages_arrive_and_are_read(t: &TestStore) {
    let mut first = Vec::new();
    for i in 0..10 {
        first.push(
            t.store
                .add_message_for(&[ALICE], stored(&format!("a{i}")))
                .await
                .unwrap()
                .message,
        );
    }
    let page1 = t
        .backend()
        .inbox_list(ALICE, ListQuery::first(4))
        .await
        .unwrap();
    assert_eq!(texts(&page1), ["a0", "a1", "a2", "a3"]);
    // Meanwhile: the first page is read and new messages arrive.
    for m in &page1 {
        t.store.mark_read(ALICE, m.id).await.unwrap();
    }
    t.store
        .add_message_for(&[ALICE], stored("b0"))
        .await
        .unwrap();
    let after = Some(Cursor::after(page1.last().unwrap()));
    let rest = t
        .backend()
        .inbox_list(ALICE, ListQuery { limit: None, after })
        .await
        .unwrap();
    assert_eq!(texts(&rest), ["a4", "a5", "a6", "a7", "a8", "a9", "b0"]);
}

async fn inbox_delete_many_returns_only_unread_ids(t: &TestStore) {
    let a = t
        .store
        .add_message_for(&[ALICE], stored("a"))
        .await
        .unwrap()
        .message
        .id;
    let b = t
        .store
        .add_message_for(&[ALICE], stored("b"))
        .await
        .unwrap()
        .message
        .id;
    let bobs = t
        .store
        .add_message_for(&[BOB], stored("bob's"))
        .await
        .unwrap()
        .message
        .id;
    t.store.mark_read(ALICE, a).await.unwrap();
    let mut read = t
        .backend()
        .inbox_delete_many(ALICE, &[a, b, bobs, MessageId(424242)])
        .await
        .unwrap();
    read.sort();
    assert_eq!(read, vec![b]);
    assert_eq!(t.backend().inbox_count(BOB).await.unwrap(), 1);
}

async fn same_instant_messages_get_distinct_ids_and_stable_order(t: &TestStore) {
    let date = Utc::now();
    let mut ids = Vec::new();
    for _ in 0..5 {
        let m = NewMessage::parse(Level::STORED_INFO, "same text", "", None, Some(date)).unwrap();
        ids.push(
            t.store
                .add_message_for(&[ALICE], m)
                .await
                .unwrap()
                .message
                .id,
        );
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5);
    let listed: Vec<MessageId> = t
        .backend()
        .inbox_list(ALICE, ListQuery::ALL)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(listed, unique, "ties on date are ordered by id");
}

async fn writes_publish_events(t: &TestStore) {
    let mut events = t.store.events().subscribe();
    let d = t
        .store
        .add_message_for(&[BOB, ALICE], stored("x"))
        .await
        .unwrap();
    t.store.mark_read(ALICE, d.message.id).await.unwrap();
    t.store.mark_all_read(BOB).await.unwrap();
    let mut got = Vec::new();
    while let Ok(event) = events.try_recv() {
        got.push(event);
    }
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(matches!(&got[0], Event::ArchiveStored { users, .. } if users[..] == [ALICE, BOB]));
    assert!(
        matches!(&got[1], Event::InboxStored { users, message } if users[..] == [ALICE, BOB] && message.id == d.message.id)
    );
    assert!(
        matches!(&got[2], Event::InboxDeleted { user, message_ids } if *user == ALICE && message_ids[..] == [d.message.id])
    );
    assert!(matches!(&got[3], Event::InboxPurged { user, count: 1 } if *user == BOB));
    assert!(got[1].concerns(ALICE) && !got[1].concerns(CAROL));
}

async fn flush_removes_everything(t: &TestStore) {
    t.store
        .add_message_for(&[ALICE, BOB], stored("x"))
        .await
        .unwrap();
    t.backend().flush().await.unwrap();
    for user in [ALICE, BOB] {
        assert_eq!(t.backend().inbox_count(user).await.unwrap(), 0);
        assert!(t
            .backend()
            .archive_list(user, ListQuery::ALL)
            .await
            .unwrap()
            .is_empty());
    }
}

async fn can_handle_follows_store_levels(t: &TestStore) {
    for level in Level::STORED {
        assert!(t.backend().can_handle(level), "{level}");
    }
    for level in [
        Level::DEBUG,
        Level::INFO,
        Level::SUCCESS,
        Level::WARNING,
        Level::ERROR,
        Level(99),
    ] {
        assert!(!t.backend().can_handle(level), "{level}");
    }
    let custom = t
        .reconfigured(Config {
            store_levels: vec![Level(99)],
            ..Config::default()
        })
        .await;
    assert!(custom.backend().can_handle(Level(99)));
    let d = custom
        .add_message_for(&[ALICE], NewMessage::new(Level(99), "custom").unwrap())
        .await
        .unwrap();
    assert_eq!(d.message.level, Level(99));
}

async fn deliver_once_skips_everyone_who_has_it_read_or_unread(t: &TestStore) {
    let m = t
        .store
        .add_message_for(&[ALICE, BOB], stored("once"))
        .await
        .unwrap()
        .message;
    assert!(t.store.mark_read(ALICE, m.id).await.unwrap());
    // alice read it, bob has it unread, carol is new: only carol gains it.
    assert_eq!(
        t.store
            .deliver_once(&[ALICE, BOB, CAROL, CAROL], &m)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        t.store
            .deliver_once(&[ALICE, BOB, CAROL], &m)
            .await
            .unwrap(),
        0,
        "repeating is harmless"
    );
    assert_eq!(
        t.backend().inbox_count(ALICE).await.unwrap(),
        0,
        "not delivered twice"
    );
    assert_eq!(t.backend().inbox_count(CAROL).await.unwrap(), 1);
    assert_eq!(archive_len(t, CAROL).await, 1);
}

async fn deliver_once_in_overlapping_chunks_reaches_each_user_once(t: &TestStore) {
    // What a background broadcast does, interrupted and resumed: chunks of consecutive
    // users (the SQL backend stores them as runs), repeated and overlapping, around a
    // user who already had the message and read it, and a missing user (700).
    let users = |range: std::ops::RangeInclusive<i64>| -> Vec<UserId> {
        range.filter(|u| *u != 700).map(UserId).collect()
    };
    let m = t
        .store
        .add_message_for(&[UserId(5)], stored("chunked"))
        .await
        .unwrap()
        .message;
    assert!(t.store.mark_read(UserId(5), m.id).await.unwrap());
    assert_eq!(
        t.store.deliver_once(&users(1..=500), &m).await.unwrap(),
        499
    );
    assert_eq!(
        t.store.deliver_once(&users(1..=500), &m).await.unwrap(),
        0,
        "a repeated chunk adds nobody"
    );
    assert_eq!(
        t.store.deliver_once(&users(400..=900), &m).await.unwrap(),
        399,
        "an overlapping chunk adds only the new users"
    );
    assert!(t.store.mark_read(UserId(800), m.id).await.unwrap());
    assert_eq!(
        t.store.deliver_once(&users(600..=1200), &m).await.unwrap(),
        300
    );
    assert_eq!(
        t.store.deliver_once(&[UserId(700)], &m).await.unwrap(),
        1,
        "the user between the runs"
    );
    // each user has it once; those who read it stay read
    for user in [1, 499, 500, 501, 700, 900, 901, 1200] {
        assert_eq!(
            t.backend().inbox_count(UserId(user)).await.unwrap(),
            1,
            "user {user}"
        );
        assert_eq!(archive_len(t, UserId(user)).await, 1, "user {user}");
    }
    for user in [5, 800] {
        assert_eq!(t.backend().inbox_count(UserId(user)).await.unwrap(), 0);
        assert_eq!(archive_len(t, UserId(user)).await, 1);
    }
    assert_eq!(t.backend().inbox_count(UserId(1201)).await.unwrap(), 0);
    let stats = t
        .backend()
        .admin()
        .unwrap()
        .message_stats(1, None)
        .await
        .unwrap();
    assert_eq!((stats[0].recipients, stats[0].unread), (1200, 1198));
    // marking all read and delivering again changes nothing
    assert_eq!(t.store.mark_all_read(UserId(1)).await.unwrap(), 1);
    assert_eq!(t.store.deliver_once(&users(1..=1200), &m).await.unwrap(), 0);
    assert_eq!(t.backend().inbox_count(UserId(1)).await.unwrap(), 0);
}

async fn inbox_list_many_answers_what_inbox_list_answers(t: &TestStore) {
    // Rows, runs (600 consecutive users), a read marker, a user with nothing, duplicates.
    let everyone: Vec<UserId> = (1..=600).map(UserId).collect();
    t.store
        .add_message_for(&everyone, stored("to everyone"))
        .await
        .unwrap();
    for i in 0..3 {
        t.store
            .add_message_for(&[ALICE, UserId(300)], stored(&format!("own {i}")))
            .await
            .unwrap();
    }
    let read = t
        .store
        .add_message_for(&[BOB], stored("read"))
        .await
        .unwrap()
        .message;
    assert!(t.store.mark_read(BOB, read.id).await.unwrap());
    assert_eq!(t.store.mark_all_read(CAROL).await.unwrap(), 1);
    let users = [ALICE, BOB, CAROL, UserId(300), UserId(700), ALICE];
    for limit in [1, 2, 10] {
        let many = t.backend().inbox_list_many(&users, limit).await.unwrap();
        assert_eq!(many.len(), users.len());
        for (user, list) in users.iter().zip(&many) {
            let one = t
                .backend()
                .inbox_list(*user, ListQuery::first(limit))
                .await
                .unwrap();
            assert_eq!(list, &one, "user {user}, limit {limit}");
        }
    }
    assert!(t
        .backend()
        .inbox_list_many(&[], 10)
        .await
        .unwrap()
        .is_empty());
}

async fn message_stats_count_recipients_and_unread(t: &TestStore) {
    let a = t
        .store
        .add_message_for(&[ALICE, BOB, CAROL], stored("a"))
        .await
        .unwrap()
        .message;
    let b = t
        .store
        .add_message_for(&[ALICE], stored("b"))
        .await
        .unwrap()
        .message;
    t.store.mark_read(BOB, a.id).await.unwrap();
    let stats = t
        .backend()
        .admin()
        .unwrap()
        .message_stats(10, None)
        .await
        .unwrap();
    assert_eq!(stats.len(), 2);
    assert_eq!(
        (stats[0].message.id, stats[0].recipients, stats[0].unread),
        (b.id, 1, 1)
    );
    assert_eq!(
        (stats[1].message.id, stats[1].recipients, stats[1].unread),
        (a.id, 3, 2)
    );
    let older = t
        .backend()
        .admin()
        .unwrap()
        .message_stats(10, Some(b.id))
        .await
        .unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].message.id, a.id);
    // Counts follow every way of reading: mark all read, and a late second delivery.
    t.store.mark_all_read(ALICE).await.unwrap();
    t.store.deliver_once(&[ALICE, UserId(9)], &a).await.unwrap();
    let stats = t
        .backend()
        .admin()
        .unwrap()
        .message_stats(10, None)
        .await
        .unwrap();
    assert_eq!(
        (stats[0].recipients, stats[0].unread),
        (1, 0),
        "b after mark all read"
    );
    assert_eq!(
        (stats[1].recipients, stats[1].unread),
        (4, 2),
        "a: carol and user 9 unread"
    );
    assert!(t
        .backend()
        .admin()
        .unwrap()
        .message_stats(10, Some(a.id))
        .await
        .unwrap()
        .is_empty());
}

async fn message_delete_removes_it_everywhere(t: &TestStore) {
    let a = t
        .store
        .add_message_for(&[ALICE, BOB], stored("a"))
        .await
        .unwrap()
        .message;
    let keep = t
        .store
        .add_message_for(&[ALICE], stored("keep"))
        .await
        .unwrap()
        .message;
    t.store.mark_read(BOB, a.id).await.unwrap();
    assert_eq!(
        t.backend()
            .admin()
            .unwrap()
            .message_delete(a.id)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        texts(&t.backend().inbox_list(ALICE, ListQuery::ALL).await.unwrap()),
        ["keep"]
    );
    assert!(t
        .backend()
        .archive_list(BOB, ListQuery::ALL)
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        t.backend().admin().unwrap().message_delete(a.id).await,
        Err(Error::MessageDoesNotExist(_))
    ));
    assert!(matches!(
        t.backend().inbox_get(ALICE, a.id).await,
        Err(Error::MessageDoesNotExist(_))
    ));
    assert_eq!(
        t.backend().inbox_get(ALICE, keep.id).await.unwrap().id,
        keep.id
    );
}

/// The first pages and counts a store answers (through its inbox cache) and what the
/// backend behind the cache answers, for one user.
async fn cached_and_direct(t: &TestStore, user: UserId) -> [(Vec<MessageId>, u64); 2] {
    let cache = t
        .store
        .inbox_cache()
        .expect("the inbox cache is on by default");
    let mut answers = Vec::new();
    for backend in [t.backend(), &**cache.inner()] {
        let first = backend.inbox_list(user, ListQuery::first(5)).await.unwrap();
        let count = backend.inbox_count(user).await.unwrap();
        answers.push((first.iter().map(|m| m.id).collect(), count));
    }
    [answers[0].clone(), answers[1].clone()]
}

/// Waits (for an event, not a fixed time) until the store's change feed is live.
async fn cache_live(store: &stored_messages::Store) {
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        store.changes().wait_live(),
    )
    .await
    .expect("the change feed starts listening");
}

async fn inbox_cache_answers_exactly_like_the_backend(t: &TestStore) {
    cache_live(&t.store).await;
    let [cached, direct] = cached_and_direct(t, ALICE).await;
    assert_eq!(cached, direct);
    // more than the cache's window (100): counts beyond it come from the backend
    let mut ids = Vec::new();
    for i in 0..105 {
        let d = t
            .store
            .add_message_for(&[ALICE, BOB], stored(&format!("m{i}")))
            .await
            .unwrap();
        ids.push(d.message.id);
        if i % 50 == 0 {
            let [cached, direct] = cached_and_direct(t, ALICE).await;
            assert_eq!(cached, direct, "after {} messages", i + 1);
        }
    }
    let [cached, direct] = cached_and_direct(t, ALICE).await;
    assert_eq!(cached, direct);
    assert_eq!(cached.1, 105);
    // each kind of write drops what it changed
    assert!(t.store.mark_read(ALICE, ids[0]).await.unwrap());
    let [cached, direct] = cached_and_direct(t, ALICE).await;
    assert_eq!(cached, direct);
    assert_eq!(cached.0[0], ids[1]);
    t.store.mark_many_read(ALICE, &ids[1..10]).await.unwrap();
    assert_eq!(cached_and_direct(t, ALICE).await[0].1, 95);
    assert_eq!(t.store.mark_all_read(ALICE).await.unwrap(), 95);
    let [cached, direct] = cached_and_direct(t, ALICE).await;
    assert_eq!((cached.clone(), direct), ((vec![], 0), (vec![], 0)));
    // a read message stored again comes back
    let again = t.backend().inbox_get(BOB, ids[3]).await.unwrap();
    t.backend().inbox_store(&[ALICE], &again).await.unwrap();
    assert_eq!(cached_and_direct(t, ALICE).await[0], (vec![ids[3]], 1));
    t.backend().inbox_purge(ALICE).await.unwrap();
    assert_eq!(cached_and_direct(t, ALICE).await[0], (vec![], 0));
    // BOB's entry was untouched by ALICE's reads and still agrees
    let [cached, direct] = cached_and_direct(t, BOB).await;
    assert_eq!(cached, direct);
    assert_eq!(cached.1, 105);
    t.backend().flush().await.unwrap();
    assert_eq!(cached_and_direct(t, BOB).await[0], (vec![], 0));
}

async fn inbox_cache_sees_writes_of_another_process(t: &TestStore) {
    // Another store over the same data, with connections of its own, stands in for
    // another process (the CLI, a second app server). Its writes must be seen by the very
    // next read, with the answer cached beforehand: no waiting.
    let other = t.reconfigured(Config::default()).await;
    cache_live(&t.store).await;
    let first = || async {
        let messages = t
            .backend()
            .inbox_list(ALICE, ListQuery::first(10))
            .await
            .unwrap();
        messages
            .into_iter()
            .map(|m| m.message)
            .collect::<Vec<String>>()
    };
    assert!(first().await.is_empty());
    for round in 0..20 {
        // the entry is cached now
        assert!(first().await.is_empty(), "round {round}");
        let d = other
            .add_message_for(&[ALICE], stored("from elsewhere"))
            .await
            .unwrap();
        assert_eq!(first().await, ["from elsewhere"], "round {round}");
        assert_eq!(t.backend().inbox_count(ALICE).await.unwrap(), 1);
        assert!(other.mark_read(ALICE, d.message.id).await.unwrap());
        assert!(first().await.is_empty(), "round {round}");
        assert_eq!(t.backend().inbox_count(ALICE).await.unwrap(), 0);
        other
            .add_message_for(&[ALICE, BOB], stored("again"))
            .await
            .unwrap();
        assert_eq!(t.backend().inbox_count(ALICE).await.unwrap(), 1);
        assert_eq!(other.mark_all_read(ALICE).await.unwrap(), 1);
        assert_eq!(t.backend().inbox_count(ALICE).await.unwrap(), 0);
    }
}

/// On PostgreSQL and Redis, a read trusts a sync that began less than `RECENT_SYNC` ago, so
/// every write that changes inboxes must take at least `COMMIT_WAIT` (see
/// `stored_messages::changes`). SQLite's reads need no round trip, and its writes no wait.
async fn writes_that_change_inboxes_wait_where_reads_trust_recent_syncs(t: &TestStore) {
    use std::time::Instant;
    use stored_messages::changes::{COMMIT_WAIT, RECENT_SYNC};
    assert!(RECENT_SYNC < COMMIT_WAIT);
    if t.backend().name() == "sqlite" {
        return;
    }
    let backend = t.backend();
    let mut waited = Vec::new();
    let mut time = |what: &'static str, started: Instant| waited.push((what, started.elapsed()));

    let started = Instant::now();
    let a = t
        .store
        .add_message_for(&[ALICE, BOB], stored("a"))
        .await
        .unwrap()
        .message;
    time("deliver", started);
    let started = Instant::now();
    assert!(t.store.mark_read(ALICE, a.id).await.unwrap());
    time("inbox_delete_many", started);
    let started = Instant::now();
    assert_eq!(backend.inbox_store(&[ALICE], &a).await.unwrap(), 1);
    time("inbox_store", started);
    let started = Instant::now();
    assert_eq!(backend.deliver_once(&[CAROL], &a).await.unwrap(), 1);
    time("deliver_once", started);
    let started = Instant::now();
    assert_eq!(t.store.mark_all_read(ALICE).await.unwrap(), 1);
    time("inbox_purge", started);
    let started = Instant::now();
    t.store
        .changes()
        .announce(&stored_messages::Change::users(&[ALICE]))
        .await
        .unwrap();
    time("announce", started);
    let started = Instant::now();
    backend.admin().unwrap().message_delete(a.id).await.unwrap();
    time("message_delete", started);
    let started = Instant::now();
    backend.expired_messages_cleanup(Utc::now()).await.unwrap();
    time("expired_messages_cleanup", started);
    let started = Instant::now();
    backend.flush().await.unwrap();
    time("flush", started);
    for (what, took) in waited {
        assert!(took >= COMMIT_WAIT, "{what} returned after {took:?}");
    }
}

/// As above, while other reads keep the cache busy: on PostgreSQL and Redis its syncs are
/// then always recent, and each read trusts one instead of making its own (see
/// `stored_messages::changes`). Without the writers' wait, a write returning just before a
/// read would not be heard yet.
async fn a_busy_inbox_cache_sees_writes_of_another_process(t: &TestStore) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let other = t.reconfigured(Config::default()).await;
    cache_live(&t.store).await;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let (store, stop, reads) = (t.store.clone(), Arc::clone(&stop), Arc::clone(&reads));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    store
                        .backend()
                        .inbox_list(BOB, ListQuery::first(10))
                        .await
                        .unwrap();
                    reads.fetch_add(1, Ordering::Relaxed);
                    // A read the cache answers may never wait: let the test's own task run.
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let first = || async {
        let messages = t
            .backend()
            .inbox_list(ALICE, ListQuery::first(10))
            .await
            .unwrap();
        texts(&messages).join(",")
    };
    for round in 0..200 {
        // the entry is cached now
        assert_eq!(first().await, "", "round {round}");
        other
            .add_message_for(&[ALICE], stored("from elsewhere"))
            .await
            .unwrap();
        assert_eq!(first().await, "from elsewhere", "round {round}: stale read");
        assert_eq!(other.mark_all_read(ALICE).await.unwrap(), 1);
        let count = t.backend().inbox_count(ALICE).await.unwrap();
        assert_eq!(count, 0, "round {round}: stale count");
    }
    stop.store(true, Ordering::Relaxed);
    for task in busy {
        task.await.unwrap();
    }
    let reads = reads.load(Ordering::Relaxed);
    assert!(reads > 400, "only {reads} reads kept the cache busy");
}

async fn change_feed_reports_writes_of_every_process(t: &TestStore) {
    let other = t.reconfigured(Config::default()).await;
    // A feed that loses its connection meanwhile (the process tests kill every Redis
    // subscriber) reports `All` and may fail a sync: then the round is tried again.
    for attempt in 0.. {
        assert!(attempt < 10, "the feed kept losing its connection");
        cache_live(&t.store).await;
        let mut changes = t.store.changes().subscribe();
        // a write of another process, then one of this process: both reach the feed
        other
            .add_message_for(&[BOB], stored("from elsewhere"))
            .await
            .unwrap();
        t.store
            .add_message_for(&[ALICE], stored("from here"))
            .await
            .unwrap();
        if !t.store.changes().sync().await {
            continue;
        }
        let mut seen = Vec::new();
        let mut interrupted = false;
        while seen.len() < 2 {
            let change = tokio::time::timeout(std::time::Duration::from_secs(10), changes.recv())
                .await
                .expect("changes arrive")
                .expect("the feed is open");
            match change {
                stored_messages::Change::Users(users) => seen.extend(users.iter().copied()),
                stored_messages::Change::All => {
                    interrupted = true;
                    break;
                }
            }
        }
        if interrupted {
            continue;
        }
        seen.sort();
        assert_eq!(seen, [ALICE, BOB]);
        return;
    }
}

async fn next_change(changes: &mut stored_messages::ChangeReceiver) -> stored_messages::Change {
    tokio::time::timeout(std::time::Duration::from_secs(10), changes.recv())
        .await
        .expect("changes arrive")
        .expect("the feed is open")
}

/// A write to hundreds of named users (an admin's list, a background job's chunk) is
/// announced by naming them, in several announcements of the same transaction or script: only
/// their cache entries and live streams react. Beyond `LISTED_USERS`, one "everything".
async fn a_write_to_hundreds_of_users_is_announced_by_naming_them(t: &TestStore) {
    use stored_messages::changes::{LISTED_USERS, MANY_USERS};
    use stored_messages::Change;
    let other = t.reconfigured(Config::default()).await;
    let hundreds: Vec<UserId> = (1001..=1600).map(UserId).collect();
    let very_many: Vec<UserId> = (1..=LISTED_USERS as i64 + 1).map(UserId).collect();
    // A feed that loses its connection meanwhile (the process tests kill every Redis
    // subscriber) reports `All`: then the round is tried again.
    'attempt: for attempt in 0.. {
        assert!(attempt < 10, "the feed kept losing its connection");
        cache_live(&t.store).await;
        let mut changes = t.store.changes().subscribe();
        let d = other
            .add_message_for(&hundreds[..300], stored("to hundreds"))
            .await
            .unwrap();
        // and the rest by `deliver_once`, as a background broadcast's chunks are
        assert_eq!(
            other.deliver_once(&hundreds, &d.message).await.unwrap(),
            300
        );
        if !t.store.changes().sync().await {
            continue;
        }
        let mut named = std::collections::BTreeSet::new();
        while named.len() < hundreds.len() {
            match next_change(&mut changes).await {
                Change::Users(users) => {
                    assert!(users.len() <= MANY_USERS, "{} in one", users.len());
                    for user in users.iter() {
                        assert!(hundreds.contains(user), "{user:?} was not written to");
                        named.insert(*user);
                    }
                }
                Change::All => continue 'attempt,
            }
        }
        other
            .add_message_for(&very_many, stored("to very many"))
            .await
            .unwrap();
        match next_change(&mut changes).await {
            Change::All => return,
            Change::Users(users) => panic!("{} users named, not everything", users.len()),
        }
    }
}

async fn a_broadcast_to_many_consecutive_users_behaves_per_user(t: &TestStore) {
    // 600 consecutive users: the SQL backend keeps them as runs (and as rows for the users
    // that act on the message), Redis as 600 entries; the answers are the same.
    let everyone: Vec<UserId> = (1..=600).map(UserId).collect();
    let stats = || async {
        let stats = t
            .backend()
            .admin()
            .unwrap()
            .message_stats(1, None)
            .await
            .unwrap();
        (stats[0].recipients, stats[0].unread)
    };
    let d = t
        .store
        .add_message_for(&everyone, stored("to everyone"))
        .await
        .unwrap();
    let id = d.message.id;
    assert_eq!(d.recipients, 600);
    assert_eq!(stats().await, (600, 600));
    for user in [UserId(1), UserId(300), UserId(600)] {
        assert_eq!(t.backend().inbox_count(user).await.unwrap(), 1);
        assert_eq!(t.backend().inbox_get(user, id).await.unwrap().id, id);
        assert_eq!(archive_len(t, user).await, 1);
    }
    assert_eq!(t.backend().inbox_count(UserId(601)).await.unwrap(), 0);
    assert!(t.backend().inbox_get(UserId(601), id).await.is_err());
    // reading is per user
    assert!(t.store.mark_read(UserId(300), id).await.unwrap());
    assert!(!t.store.mark_read(UserId(300), id).await.unwrap());
    assert_eq!(t.backend().inbox_count(UserId(300)).await.unwrap(), 0);
    assert_eq!(archive_len(t, UserId(300)).await, 1);
    assert_eq!(t.backend().inbox_count(UserId(301)).await.unwrap(), 1);
    assert_eq!(t.store.mark_all_read(UserId(5)).await.unwrap(), 1);
    assert_eq!(stats().await, (600, 598));
    // storing again: covered users who have it unread are skipped, a reader gets it back
    assert_eq!(
        t.backend()
            .inbox_store(&[UserId(300), UserId(301), UserId(700)], &d.message)
            .await
            .unwrap(),
        2
    );
    assert_eq!(t.backend().inbox_count(UserId(300)).await.unwrap(), 1);
    assert_eq!(t.backend().inbox_count(UserId(301)).await.unwrap(), 1);
    assert_eq!(stats().await, (601, 600));
    assert_eq!(
        t.backend()
            .deliver_once(&[UserId(5), UserId(10), UserId(800)], &d.message)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        t.backend()
            .archive_store(&[UserId(6), UserId(900)], &d.message)
            .await
            .unwrap(),
        1
    );
    assert_eq!(stats().await, (603, 601));
    // a page of the inbox and of the archive shows it once
    let first = t
        .backend()
        .inbox_list(UserId(300), ListQuery::first(10))
        .await
        .unwrap();
    assert_eq!(texts(&first), ["to everyone"]);
    let archive = t
        .backend()
        .archive_list(UserId(5), ListQuery::first(10))
        .await
        .unwrap();
    assert_eq!(texts(&archive), ["to everyone"]);
    // deleting the message removes every delivery
    assert_eq!(
        t.backend()
            .admin()
            .unwrap()
            .message_delete(id)
            .await
            .unwrap(),
        603
    );
    assert_eq!(t.backend().inbox_count(UserId(1)).await.unwrap(), 0);
    assert_eq!(archive_len(t, UserId(1)).await, 0);
}

async fn expired_broadcasts_leave_every_inbox_once(t: &TestStore) {
    let everyone: Vec<UserId> = (1..=300).map(UserId).collect();
    let old = NewMessage::parse(
        Level::STORED_INFO,
        "old",
        "",
        None,
        Some(Utc::now() - Duration::days(31)),
    )
    .unwrap();
    let d = t.store.add_message_for(&everyone, old).await.unwrap();
    assert_eq!(t.backend().inbox_count(UserId(7)).await.unwrap(), 0);
    // a user who has it already is skipped by archive_store, whatever stores it
    assert_eq!(
        t.backend()
            .archive_store(&[UserId(7)], &d.message)
            .await
            .unwrap(),
        0
    );
    let cleanup = t.store.cleanup().await.unwrap();
    assert_eq!(cleanup.inbox_entries, 300);
    assert_eq!(t.store.cleanup().await.unwrap().inbox_entries, 0);
    assert_eq!(archive_len(t, UserId(7)).await, 1);
    assert_eq!(archive_len(t, UserId(8)).await, 1);
    let stats = t
        .backend()
        .admin()
        .unwrap()
        .message_stats(1, None)
        .await
        .unwrap();
    assert_eq!((stats[0].recipients, stats[0].unread), (300, 0));
}

/// PostgreSQL's change feed listens on a connection of its own: with a pool of one
/// connection, requests still get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_change_feed_leaves_the_pool_to_requests() {
    use std::sync::Arc;
    use stored_messages::backend::{Settings, SqlBackend, SqlPool};
    let Some(schema) = crate::common::PgSchema::create().await else {
        return;
    };
    let config = rocket_db_pools::Config {
        url: schema.url.clone(),
        min_connections: None,
        max_connections: 1,
        connect_timeout: 5,
        idle_timeout: None,
        extensions: None,
    };
    let pool = SqlPool::connect_with(&config).await.unwrap();
    pool.migrate().await.unwrap();
    let backend = Arc::new(SqlBackend::new(pool, Settings::default()));
    let host = crate::common::TestHost::with_users([]);
    let store = stored_messages::Store::new(backend, host, Config::default()).unwrap();
    cache_live(&store).await;
    store
        .add_message_for(&[ALICE], stored("through the only connection"))
        .await
        .unwrap();
    assert_eq!(store.backend().inbox_count(ALICE).await.unwrap(), 1);
    assert_eq!(store.mark_all_read(ALICE).await.unwrap(), 1);
}

/// `try_lease`: one taker while the lease lasts (whoever asks again, this process or
/// another), a new one once it ran out; leases of other names are independent.
async fn a_lease_has_one_holder_until_its_time_runs_out(t: &TestStore) {
    use std::time::Duration;
    let backend = t.backend();
    let ttl = Duration::from_millis(400);
    assert!(backend.try_lease("cleanup", ttl).await.unwrap());
    assert!(!backend.try_lease("cleanup", ttl).await.unwrap());
    assert!(backend.try_lease("other", ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(backend.try_lease("cleanup", ttl).await.unwrap());
    assert!(!backend.try_lease("cleanup", ttl).await.unwrap());
}

/// A background broadcast in chunks stores what `broadcast_message` stores: a run per
/// stretch of consecutive users, not a row per user.
async fn sql_deliver_once_in_chunks_stores_runs(t: &TestStore) {
    use stored_messages::backend::SqlPool;
    let m = t
        .backend()
        .create_message(&stored("to everyone"))
        .await
        .unwrap();
    let everyone: Vec<UserId> = (1..=20_000).filter(|u| *u != 7_000).map(UserId).collect();
    let mut added = 0;
    for chunk in everyone.chunks(5_000) {
        added += t.store.deliver_once(chunk, &m).await.unwrap();
    }
    assert_eq!(added, 19_999);
    let config = rocket_db_pools::Config {
        url: t.url.clone(),
        min_connections: None,
        max_connections: 1,
        connect_timeout: 5,
        idle_timeout: None,
        extensions: None,
    };
    let pool = SqlPool::connect_with(&config).await.unwrap();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            match pool {
                SqlPool::Sqlite(pool) => sqlx::query_scalar::<_, i64>(sql)
                    .bind(m.id.0)
                    .fetch_one(&pool)
                    .await
                    .unwrap(),
                SqlPool::Postgres(pool) => sqlx::query_scalar::<_, i64>(sql)
                    .bind(m.id.0)
                    .fetch_one(&pool)
                    .await
                    .unwrap(),
            }
        }
    };
    assert_eq!(
        count("select count(*) from sm_audiences where message_id = $1").await,
        2,
        "one run on each side of the missing user"
    );
    assert_eq!(
        count("select count(*) from sm_deliveries where message_id = $1").await,
        0
    );
    for (user, unread) in [(1, 1), (6_999, 1), (7_000, 0), (7_001, 1), (20_000, 1)] {
        assert_eq!(t.backend().inbox_count(UserId(user)).await.unwrap(), unread);
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_deliver_once_in_chunks_stores_runs() {
    if let Some(t) = crate::common::sqlite_store().await {
        sql_deliver_once_in_chunks_stores_runs(&t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_deliver_once_in_chunks_stores_runs() {
    if let Some(t) = crate::common::postgres_store().await {
        sql_deliver_once_in_chunks_stores_runs(&t).await;
    }
}
