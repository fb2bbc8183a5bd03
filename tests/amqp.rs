//! The RabbitMQ bus, with in-process nodes on the machine's broker: fan-out across nodes in
//! order and exactly once, storage exactly once through the shared persist queue, bindings that
//! follow the rooms a node serves, the dead-letter queue, `/ready` and the metrics.
//!
//! Each test has its own `amqp_namespace` (so tests run in parallel on one broker) and deletes
//! its exchanges and queues at the end. Each holds the shared broker lock of
//! `tests/util/broker.rs`, so the outage test of `tests/cluster.rs` never stops the broker under
//! them. Outages, killed nodes and load balancers are tested in `tests/cluster.rs`.

mod util;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use util::broker::{Namespace, amqp_url};
use util::pg::TestDb;
use util::{Client, TestServer, msg};

/// Waits until `node`'s queue is bound to `rooms` rooms (a member's first message from
/// another node can only arrive once the binding exists).
fn wait_bound(node: &TestServer, rooms: u64) {
    let got = node.wait_metric("chatflow_amqp_bound_rooms", |v| v == rooms);
    assert_eq!(got, rooms, "bound rooms");
}

fn poll_until(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < Duration::from_secs(30), "never: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `chatflow_amqp_queue_ready_messages{queue="..."}` of `node`, or `None` while the node's
/// queue sampler has no figure for it.
fn queue_ready(node: &TestServer, queue: &str) -> Option<u64> {
    node.try_metric(&format!(
        "chatflow_amqp_queue_ready_messages{{queue=\"{queue}\"}}"
    ))
}

fn sum_metric(nodes: &[&TestServer], sample: &str) -> u64 {
    nodes.iter().map(|n| n.metric(sample)).sum()
}

/// The sequence number a test message carries in its text.
fn seq_of(m: &Value) -> u64 {
    m["message"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no sequence number in {m}"))
}

/// Reads broadcasts until `want` from each of `users`; checks each user's come once and in
/// order, and returns how many came from each.
fn read_broadcasts(c: &mut Client, who: &str, users: &[u64], want: u64) -> HashMap<u64, u64> {
    let mut next: HashMap<u64, u64> = users.iter().map(|u| (*u, 0)).collect();
    let mut ids = HashSet::new();
    while next.values().any(|&n| n < want) {
        let m = c.recv_type("message");
        let user = m["userId"].as_u64().expect("userId");
        let expected = next
            .get_mut(&user)
            .unwrap_or_else(|| panic!("{who}: a message from unexpected user {user}: {m}"));
        assert_eq!(
            seq_of(&m),
            *expected,
            "{who}: user {user}'s messages in order"
        );
        assert!(
            ids.insert(m["messageId"].as_str().unwrap_or("").to_string()),
            "{who}: {m} twice"
        );
        *expected += 1;
    }
    next
}

#[test]
fn every_member_on_three_nodes_gets_every_message_once_in_order() {
    let ns = Namespace::locked("fanout");
    let nodes: Vec<TestServer> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| ns.node(id, "memory"))
        .collect();
    let room = "all";
    let per_sender = 150u64;
    // On each node one sender (user i+1) and two listeners.
    let mut senders = Vec::new();
    let mut listeners = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        senders.push((i as u64 + 1, n.ws(room)));
        listeners.push((format!("listener {}a on n{}", i, i + 1), n.ws(room)));
        listeners.push((format!("listener {}b on n{}", i, i + 1), n.ws(room)));
    }
    for n in &nodes {
        wait_bound(n, 1);
    }
    let users: Vec<u64> = senders.iter().map(|(u, _)| *u).collect();

    let threads: Vec<_> = senders
        .into_iter()
        .map(|(user, mut c)| {
            let others: Vec<u64> = users.iter().copied().filter(|u| *u != user).collect();
            std::thread::spawn(move || {
                for n in 0..per_sender {
                    let mut m = msg(user as u32, room, &n.to_string());
                    m["clientMessageId"] = format!("u{user}-{n}").into();
                    c.queue(&m);
                    if n % 25 == 24 {
                        c.flush();
                    }
                }
                c.flush();
                // Acks in send order, each after the broker's confirm; the other senders'
                // messages in between, each once and in order.
                let mut acks = 0;
                let mut next: HashMap<u64, u64> = others.iter().map(|u| (*u, 0)).collect();
                while acks < per_sender || next.values().any(|&n| n < per_sender) {
                    let m = c.recv();
                    match m["type"].as_str() {
                        Some("ack") => {
                            assert_eq!(m["clientMessageId"], format!("u{user}-{acks}"));
                            acks += 1;
                        }
                        Some("message") => {
                            let from = m["userId"].as_u64().expect("userId");
                            let expected = next.get_mut(&from).unwrap_or_else(|| {
                                panic!("sender {user} got its own or a stranger's message {m}")
                            });
                            assert_eq!(seq_of(&m), *expected, "sender {user}: from {from}");
                            *expected += 1;
                        }
                        _ => panic!("sender {user}: unexpected frame {m}"),
                    }
                }
                c
            })
        })
        .collect();
    for (who, c) in &mut listeners {
        let got = read_broadcasts(c, who, &users, per_sender);
        assert!(got.values().all(|&n| n == per_sender), "{who}: {got:?}");
    }
    let mut senders: Vec<Client> = threads
        .into_iter()
        .map(|t| t.join().expect("sender thread"))
        .collect();
    // Nothing more: no member got a message twice, however late.
    for c in senders
        .iter_mut()
        .chain(listeners.iter_mut().map(|(_, c)| c))
    {
        assert!(c.silent_for(Duration::from_millis(300)), "a repeat arrived");
    }
    let refs: Vec<&TestServer> = nodes.iter().collect();
    for n in &nodes {
        // Each node got the other two nodes' messages from the broker, and not its own.
        assert_eq!(n.metric("chatflow_amqp_delivered_total"), 2 * per_sender);
        assert_eq!(n.metric("chatflow_amqp_published_total"), per_sender);
        assert_eq!(n.metric("chatflow_amqp_breaker_state"), 0);
    }
    // Stored once, by whichever node's persist consumer took each delivery.
    poll_until("every message stored", || {
        sum_metric(&refs, "chatflow_store_rows_total") >= 3 * per_sender
    });
    assert_eq!(
        sum_metric(&refs, "chatflow_store_rows_total"),
        3 * per_sender
    );
    assert_eq!(sum_metric(&refs, "chatflow_store_duplicates_total"), 0);
    assert_eq!(
        sum_metric(&refs, "chatflow_amqp_persist_deliveries_total"),
        sum_metric(&refs, "chatflow_amqp_envelopes_published_total"),
        "each envelope was taken from the persist queue once"
    );
}

#[test]
fn messages_sent_through_two_nodes_are_stored_once_in_postgres() {
    let ns = Namespace::locked("stored");
    let db = TestDb::new("amqp_once");
    let nodes = [ns.node("n1", &db.url), ns.node("n2", &db.url)];
    let per_sender = 200u64;
    // Two senders per node, each alone in a room of its own (no broadcasts to read).
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let mut c = nodes[i % 2].ws(&format!("pg{i}"));
            std::thread::spawn(move || {
                let room = format!("pg{i}");
                for n in 0..per_sender {
                    let mut m = msg(i as u32 + 1, &room, &n.to_string());
                    m["clientMessageId"] = format!("pg{i}-{n}").into();
                    c.queue(&m);
                    if n % 20 == 19 {
                        c.flush();
                    }
                }
                c.flush();
                (0..per_sender)
                    .map(|_| {
                        let ack = c.recv_type("ack");
                        ack["messageId"].as_str().expect("messageId").to_string()
                    })
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let acked: HashSet<String> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("sender"))
        .collect();
    let total = 4 * per_sender;
    assert_eq!(acked.len() as u64, total);

    let count = |sql: &str| -> i64 { db.client().query_one(sql, &[]).expect("query").get(0) };
    poll_until("every acked message stored", || {
        count("SELECT count(*) FROM messages") >= total as i64
    });
    assert_eq!(count("SELECT count(*) FROM messages"), total as i64);
    assert_eq!(
        count("SELECT count(DISTINCT message_id) FROM messages"),
        total as i64
    );
    let mut client = db.client();
    let stored: HashSet<String> = client
        .query("SELECT message_id::text FROM messages", &[])
        .expect("ids")
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    assert_eq!(stored, acked, "the stored messages are the acked ones");
    // The node that accepted a message is recorded, whichever node stored it.
    for row in client
        .query(
            "SELECT node_id, count(*) FROM messages GROUP BY node_id ORDER BY node_id",
            &[],
        )
        .expect("by node")
    {
        let node: String = row.get(0);
        assert!(node == "n1" || node == "n2", "{node}");
        assert_eq!(row.get::<_, i64>(1), 2 * per_sender as i64, "{node}");
    }
    // Each delivery was taken by one node's consumer: no row was written twice.
    let refs: Vec<&TestServer> = nodes.iter().collect();
    poll_until("the writers' counters settle", || {
        sum_metric(&refs, "chatflow_store_rows_total") == total
    });
    assert_eq!(sum_metric(&refs, "chatflow_store_duplicates_total"), 0);
    assert_eq!(sum_metric(&refs, "chatflow_amqp_redeliveries_total"), 0);
    // And every delivery was acknowledged once stored: the persist queue drains.
    poll_until("the persist queue is empty", || {
        ns.depth("chat.persist") == 0
    });
}

#[test]
fn a_node_is_bound_only_to_the_rooms_it_has_members_in() {
    let ns = Namespace::locked("bindings");
    let n1 = ns.node("n1", "memory");
    let n2 = ns.node("n2", "memory");
    let q1 = ns.name("chat.node.n1");
    let q2 = ns.name("chat.node.n2");
    let bound = |q: &str, room: &str| {
        ns.exchange_bindings()
            .contains(&(q.to_string(), format!("room.{room}")))
    };

    let mut a = n1.ws("bx");
    let mut b = n2.ws("by");
    wait_bound(&n1, 1);
    wait_bound(&n2, 1);
    assert!(
        bound(&q1, "bx") && !bound(&q1, "by"),
        "{:?}",
        ns.exchange_bindings()
    );
    assert!(
        bound(&q2, "by") && !bound(&q2, "bx"),
        "{:?}",
        ns.exchange_bindings()
    );
    assert!(
        bound(&ns.name("chat.persist"), "#"),
        "the persist queue takes every room: {:?}",
        ns.exchange_bindings()
    );

    // A member of bx on n2: n2 binds bx too, and n1's member hears it.
    let mut c = n2.ws("bx");
    wait_bound(&n2, 2);
    c.send(&msg(5, "bx", "0"));
    assert_eq!(c.recv_type("ack")["message"], "0");
    assert_eq!(a.recv_type("message")["message"], "0");
    assert!(b.silent_for(Duration::from_millis(100)), "by hears nothing");

    // n1's last member of bx leaves: n1 is unbound, and hears nothing more of bx.
    drop(a);
    wait_bound(&n1, 0);
    assert!(!bound(&q1, "bx"), "{:?}", ns.exchange_bindings());
    let before = n1.metric("chatflow_amqp_delivered_total");
    c.send(&msg(5, "bx", "1"));
    c.recv_type("ack");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(n1.metric("chatflow_amqp_delivered_total"), before);

    // A node that stops deletes its queue rather than leaving it to expire.
    assert!(ns.has_queue("chat.node.n1"));
    let reconnects = n1.metric("chatflow_amqp_reconnects_total");
    n1.stop();
    assert!(
        !ns.has_queue("chat.node.n1"),
        "n1's queue outlived it ({reconnects} reconnects)"
    );
    assert!(ns.has_queue("chat.node.n2"));
}

#[test]
fn malformed_envelopes_go_to_the_dead_letter_queue_and_consumers_keep_going() {
    let ns = Namespace::locked("dlq");
    let n1 = ns.node("n1", "memory");
    let n2 = ns.node("n2", "memory");
    let mut a = n1.ws("m");
    let mut b = n2.ws("m");
    wait_bound(&n1, 1);
    wait_bound(&n2, 1);

    let bad: [&[u8]; 4] = [
        b"not json at all",
        br#"{"v":2,"node":"n9","room":"m","messages":[]}"#,
        br#"{"v":1,"node":"n9","room":"m","messages":[{"type":"ack","status":"OK"}]}"#,
        br#"{"v":1,"node":"n9","room":"m","messages":[]}"#,
    ];
    {
        let mut conn = ns.connect();
        let ch = conn.open_channel(None).expect("channel");
        for body in bad {
            ch.basic_publish(
                ns.name("chat.exchange"),
                amiquip::Publish::new(body, "room.m"),
            )
            .expect("publish");
        }
        let _ = conn.close();
    }
    poll_until("the malformed envelopes reach the DLQ", || {
        ns.depth("chat.dlq") == bad.len() as u32
    });
    let nodes = [&n1, &n2];
    poll_until("the consumers count them", || {
        sum_metric(&nodes, "chatflow_amqp_dead_lettered_total") == bad.len() as u64
            && n1.metric("chatflow_amqp_fanout_rejected_total") == bad.len() as u64
            && n2.metric("chatflow_amqp_fanout_rejected_total") == bad.len() as u64
    });
    // Each node's queue sampler reads the broker's queues for /metrics (every 5 s).
    let sampled = |dlq: u64| {
        nodes.iter().all(|n| {
            queue_ready(n, "dlq") == Some(dlq)
                && queue_ready(n, "persist") == Some(0)
                && queue_ready(n, "node") == Some(0)
        })
    };
    poll_until("the nodes report the dead letters in /metrics", || {
        sampled(bad.len() as u64)
    });
    // The DLQ keeps the bodies as published, for an operator to look at. (Two nodes'
    // consumers rejected them, so in no particular order.)
    {
        let mut conn = ns.connect();
        let ch = conn.open_channel(None).expect("channel");
        let got: HashSet<Vec<u8>> = (0..bad.len())
            .map(|_| {
                ch.basic_get(ns.name("chat.dlq"), true)
                    .expect("get")
                    .expect("a dead letter")
                    .delivery
                    .body
            })
            .collect();
        let want: HashSet<Vec<u8>> = bad.iter().map(|b| b.to_vec()).collect();
        assert_eq!(got, want);
        let _ = conn.close();
    }
    poll_until("the nodes report the emptied DLQ", || sampled(0));

    // Nothing reached a member, and the next real message goes through as usual.
    assert!(b.silent_for(Duration::from_millis(200)));
    a.send(&msg(3, "m", "after"));
    assert_eq!(a.recv_type("ack")["message"], "after");
    assert_eq!(b.recv_type("message")["message"], "after");
    poll_until("the real message is stored", || {
        sum_metric(&nodes, "chatflow_store_rows_total") == 1
    });
    assert_eq!(
        ns.depth("chat.dlq"),
        0,
        "the real message is not dead-lettered"
    );
    poll_until("the persist queue is empty", || {
        ns.depth("chat.persist") == 0
    });
}

#[test]
fn a_node_whose_queue_is_deleted_declares_and_binds_it_again() {
    let ns = Namespace::locked("redeclare");
    let n1 = ns.node("n1", "memory");
    let n2 = ns.node("n2", "memory");
    let mut a = n1.ws("q");
    let mut b = n2.ws("q");
    wait_bound(&n1, 1);
    wait_bound(&n2, 1);
    {
        let mut conn = ns.connect();
        let ch = conn.open_channel(None).expect("channel");
        ch.queue_delete(
            ns.name("chat.node.n1"),
            amiquip::QueueDeleteOptions::default(),
        )
        .expect("the test deletes n1's queue");
        let _ = conn.close();
    }
    // The broker cancels n1's consumer; n1 reconnects, declares its queue and binds it to the
    // rooms it serves again, by itself.
    assert_eq!(
        n1.wait_metric("chatflow_amqp_reconnects_total", |v| v >= 1),
        1
    );
    poll_until("n1 is ready again", || n1.get("/ready").status == 200);
    assert!(ns.has_queue("chat.node.n1"));
    b.send(&msg(4, "q", "still here"));
    b.recv_type("ack");
    assert_eq!(a.recv_type("message")["message"], "still here");
    assert_eq!(n2.metric("chatflow_amqp_reconnects_total"), 0);
}

#[test]
fn ready_reports_the_bus_and_the_ack_waits_for_the_confirm() {
    let ns = Namespace::locked("ready");
    let n1 = ns.node("n1", "memory");
    let ready = n1.get("/ready");
    assert_eq!(ready.status, 200, "{}", ready.body);
    let v = ready.json();
    assert_eq!(v["bus"]["kind"], "amqp");
    assert_eq!(v["bus"]["up"], true, "{v}");
    assert_eq!(v["bus"]["error"], Value::Null, "{v}");

    let mut c = n1.ws("r");
    let mut m = msg(9, "r", "confirmed");
    m["clientMessageId"] = "c-1".into();
    c.send(&m);
    let ack = c.recv_type("ack");
    assert_eq!(ack["clientMessageId"], "c-1");
    // With ack_after = published the ack is written after the broker's confirm.
    assert!(n1.metric("chatflow_amqp_confirm_seconds_count") >= 1);
    assert_eq!(n1.metric("chatflow_amqp_published_total"), 1);
    assert_eq!(n1.metric("chatflow_amqp_envelopes_published_total"), 1);
    assert_eq!(
        n1.metric("chatflow_amqp_envelope_messages_bucket{le=\"1\"}"),
        1
    );
    assert_eq!(
        n1.wait_metric("chatflow_amqp_outstanding_confirms", |v| v == 0),
        0
    );
    assert_eq!(n1.metric("chatflow_amqp_breaker_state"), 0);
    assert_eq!(n1.metric("chatflow_amqp_publish_queue_depth"), 0);
    // The node's own message comes back on its queue and is skipped, not delivered twice.
    assert_eq!(n1.metric("chatflow_amqp_delivered_total"), 0);
    assert!(c.silent_for(Duration::from_millis(200)));
    assert_eq!(
        n1.wait_metric("chatflow_amqp_persist_deliveries_total", |v| v == 1),
        1
    );
    assert_eq!(n1.wait_metric("chatflow_store_rows_total", |v| v == 1), 1);
    for family in [
        "chatflow_amqp_nacks_total",
        "chatflow_amqp_confirm_timeouts_total",
        "chatflow_amqp_redeliveries_total",
        "chatflow_amqp_dead_lettered_total",
        "chatflow_amqp_fanout_rejected_total",
        "chatflow_amqp_reconnects_total",
    ] {
        assert_eq!(n1.metric(family), 0, "{family}");
    }
    // The stored message is the one acked.
    let stored = n1.get("/api/rooms/r/messages");
    assert_eq!(stored.status, 200, "{}", stored.body);
    let body = stored.json();
    let list = body.as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 1, "{body}");
    assert_eq!(list[0]["messageId"], ack["messageId"], "{body}");
    assert_eq!(list[0]["message"], json!("confirmed"), "{body}");
}

/// Chat messages per second through the publishers (accepted, published, confirmed and
/// settled), with `batch_max` messages per envelope at most; the persist consumer stores them
/// into the memory store meanwhile.
fn publish_rate(batch_max: usize, messages: u64) -> (f64, u64) {
    use chatflow::amqp::AmqpBus;
    use chatflow::bus::{Bus, Fanout, Inbox, Outgoing, PublishError};
    use chatflow::config::Config;
    use chatflow::mailbox::{Mailbox, Origin, Reply};
    use chatflow::store::writer::WriterPool;
    use std::sync::Arc;

    let ns = Namespace::locked("rate");
    let poll = mio::Poll::new().expect("poll");
    let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
    let (inbox, _inbox_rx) = Inbox::new(1024, waker.clone());
    let (mailbox, replies) = Mailbox::new(4096, waker);
    let inboxes: Arc<[Inbox]> = vec![inbox].into();
    let mailboxes: Arc<[Mailbox]> = vec![mailbox].into();
    let mut config = Config {
        bus: amqp_url(),
        amqp_namespace: ns.prefix.clone(),
        node_id: "bench".into(),
        store: "memory".into(),
        amqp_batch_max: batch_max,
        ..Config::default()
    };
    config.amqp_confirm_timeout_ms = 60_000;
    let store = chatflow::store::open("memory", &config.store_options()).expect("store");
    let (deliveries_tx, deliveries_rx) = crossbeam_channel::bounded(4000);
    let writers = WriterPool::start(
        &store,
        &config.writer_options(),
        mailboxes.clone(),
        Some(deliveries_tx),
    )
    .expect("writers");
    let bus = AmqpBus::start(
        config.amqp_settings(),
        inboxes,
        mailboxes,
        writers.queue(),
        deliveries_rx,
    )
    .expect("bus starts");
    let settled = std::thread::spawn(move || {
        let mut n = 0u64;
        let mut failed = 0u64;
        while n < messages {
            match replies.recv_timeout(Duration::from_secs(60)) {
                Ok(Reply::Settled(c)) => {
                    n += c.len() as u64;
                    failed += c.iter().filter(|c| c.result.is_err()).count() as u64;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        (Instant::now(), n, failed)
    });
    let mut publisher = bus.publisher(0);
    let started = Instant::now();
    for i in 0..messages {
        let room = format!("{}", i % 20 + 1);
        let body = format!(
            r#"{{"type":"message","messageId":"{}","roomId":"{room}","userId":{},"username":"user{}","message":"the quick brown fox jumps over the lazy dog {i}","messageType":"TEXT","timestamp":"2026-11-21T22:41:01.123Z","serverTimestamp":"2026-11-21T22:41:01.125431Z"}}"#,
            uuid::Uuid::now_v7(),
            i % 100_000 + 1,
            i % 100_000 + 1
        );
        let fanout = Fanout {
            room: room.into(),
            frame: Arc::from(body.as_bytes()),
        };
        let out = Outgoing {
            fanout: &fanout,
            payload: body.as_bytes(),
            persisted: false,
            origin: Some(Origin {
                reactor: 0,
                token: 0,
                conn: 0,
                seq: i,
            }),
        };
        loop {
            match publisher.publish(&out) {
                Ok(_) => break,
                Err(PublishError::Overloaded) => std::thread::yield_now(),
                Err(PublishError::Unavailable) => panic!("the bus is unavailable"),
            }
        }
    }
    let (done, n, failed) = settled.join().expect("settled");
    assert_eq!((n, failed), (messages, 0));
    let envelopes = bus.stats().envelopes.load(Ordering::Relaxed);
    bus.shutdown(Duration::from_secs(30));
    writers.close(Duration::from_secs(30));
    (
        messages as f64 / done.duration_since(started).as_secs_f64(),
        envelopes,
    )
}

#[test]
#[ignore = "a measurement: cargo test --release --test amqp -- --ignored --nocapture"]
fn measure_published_messages_per_second_batch_64_vs_1() {
    // Alternated, so a neighbour's load hits both alike.
    for round in 0..2 {
        for (batch, n) in [(64, 200_000), (1, 20_000)] {
            let (rate, envelopes) = publish_rate(batch, n);
            println!(
                "round {round}: batch_max {batch:>2}: {rate:>9.0} chat messages/s confirmed ({n} messages in {envelopes} envelopes)"
            );
        }
    }
}

/// PROTOCOL.md §1: a member hears the room from the moment its upgrade completes. A room new
/// to a node needs a binding first, so that upgrade is answered only once the broker has made
/// it; a room the node already serves is answered at once.
#[test]
fn an_upgrade_waits_for_its_room_binding_only_when_the_room_is_new_to_the_node() {
    let ns = Namespace::locked("joinwait");
    let n1 = ns.node("n1", "memory");
    let q1 = ns.name("chat.node.n1");
    let bound = || {
        ns.exchange_bindings()
            .contains(&(q1.clone(), "room.wx".to_string()))
    };
    let waited = || n1.metric("chatflow_upgrades_waited_total");
    assert_eq!(waited(), 0);

    // The 101 came after the binding: it is there the moment the client is connected.
    let a = n1.ws("wx");
    assert!(
        bound(),
        "upgraded before the binding: {:?}",
        ns.exchange_bindings()
    );
    assert_eq!(waited(), 1);

    // A second member of a room the node serves does not wait.
    let b = n1.ws("wx");
    assert_eq!(waited(), 1);

    // Once the last member leaves the node is unbound; the next member waits again.
    drop(a);
    drop(b);
    wait_bound(&n1, 0);
    assert!(!bound());
    let _c = n1.ws("wx");
    assert!(
        bound(),
        "upgraded before the binding: {:?}",
        ns.exchange_bindings()
    );
    assert_eq!(waited(), 2);
}

/// A node on the RabbitMQ bus in `ns` with `ack_after = persisted`, one chat message per
/// envelope so that deliveries alternate between the nodes' persist consumers.
fn persisted_node(ns: &Namespace, id: &str, store: &str) -> TestServer {
    ns.node_with(id, store, |c| {
        c.ack_after = chatflow::config::AckAfter::Persisted;
        c.amqp_batch_max = 1;
    })
}

/// With `ack_after = persisted` on the RabbitMQ bus, an ack means the row is committed, even
/// when another node's persist consumer stored it (it sends a commit notice back); a
/// message PostgreSQL refuses is answered UNAVAILABLE, not acked, and its neighbours are
/// stored.
#[test]
fn with_persisted_an_ack_means_committed_whichever_node_stored_the_message() {
    let ns = Namespace::locked("persisted");
    let db = TestDb::new("amqp_persisted");
    let nodes = [
        persisted_node(&ns, "n1", &db.url),
        persisted_node(&ns, "n2", &db.url),
    ];
    let mut pg = db.client();
    let per_node = 100u32;
    for (i, node) in nodes.iter().enumerate() {
        let room = format!("pp{i}");
        let mut c = node.ws(&room);
        for n in 0..per_node {
            let mut m = msg(i as u32 + 1, &room, &format!("m{n}"));
            m["clientMessageId"] = format!("pp{i}-{n}").into();
            c.queue(&m);
        }
        c.flush();
        for n in 0..per_node {
            let ack = c.recv_type("ack");
            assert_eq!(
                ack["clientMessageId"],
                format!("pp{i}-{n}"),
                "arrival order"
            );
            let id = ack["messageId"].as_str().expect("messageId").to_string();
            // The ack was written after the commit: the row is there now, not eventually.
            let rows: i64 = pg
                .query_one(
                    "SELECT count(*) FROM messages WHERE message_id = $1::text::uuid",
                    &[&id],
                )
                .expect("query")
                .get(0);
            assert_eq!(rows, 1, "acked {id} ({i}/{n}) is not committed");
        }
    }
    let refs: Vec<&TestServer> = nodes.iter().collect();
    let total = u64::from(2 * per_node);
    assert_eq!(
        sum_metric(&refs, "chatflow_amqp_commit_notices_sent_total"),
        total
    );
    assert!(
        sum_metric(&refs, "chatflow_amqp_commit_notices_received_total") > 0,
        "with one message per envelope, some were stored by the other node"
    );

    // PostgreSQL refuses a NUL in text: the sender is told, and the next message is acked.
    let mut c = nodes[0].ws("poison");
    let mut bad = msg(9, "poison", "before \u{0} after");
    bad["clientMessageId"] = "bad".into();
    c.send(&bad);
    let reply = c.recv();
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "UNAVAILABLE", "{reply}");
    assert_eq!(reply["clientMessageId"], "bad", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("refused")),
        "{reply}"
    );
    let mut good = msg(9, "poison", "after");
    good["clientMessageId"] = "good".into();
    c.send(&good);
    assert_eq!(c.recv_type("ack")["clientMessageId"], "good");
    let stored: i64 = pg
        .query_one(
            "SELECT count(*) FROM messages WHERE room_id = 'poison'",
            &[],
        )
        .expect("query")
        .get(0);
    assert_eq!(stored, 1);

    // A notice meant for an earlier process under n1's id (another epoch) settles nobody.
    assert_eq!(
        nodes[0].metric("chatflow_amqp_commit_notices_dropped_total"),
        0
    );
    {
        let mut conn = ns.connect();
        let ch = conn.open_channel(None).expect("channel");
        let forged = br#"{"v":1,"epoch":1,"stored":[[0,0,1,1]]}"#;
        let properties = amiquip::AmqpProperties::default().with_type_("chatflow.stored.v1".into());
        ch.basic_publish(
            "",
            amiquip::Publish::with_properties(forged, ns.name("chat.node.n1"), properties),
        )
        .expect("publish");
        let _ = conn.close();
    }
    let dropped = nodes[0].wait_metric("chatflow_amqp_commit_notices_dropped_total", |v| v == 1);
    assert_eq!(dropped, 1);
}
