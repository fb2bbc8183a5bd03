//! Fan-out: a message reaches every other member of its room, on every reactor, in order.

mod util;

use std::collections::HashMap;

use util::{Client, TestServer, msg};

#[test]
fn a_broadcast_reaches_the_other_members_only() {
    let s = TestServer::start(|_| {});
    let mut sender = s.ws("1");
    let mut peer = s.ws("1");
    let mut elsewhere = s.ws("2");
    let mut m = msg(7, "1", "hello all");
    m["clientMessageId"] = "b-1".into();
    sender.send(&m);
    let ack = sender.recv();
    let got = peer.recv();
    assert_eq!(got["type"], "message");
    assert!(got.get("status").is_none());
    for key in [
        "messageId",
        "clientMessageId",
        "roomId",
        "userId",
        "username",
        "message",
        "messageType",
        "timestamp",
        "serverTimestamp",
    ] {
        assert_eq!(got[key], ack[key], "{key}");
    }
    assert!(
        sender.silent_for(std::time::Duration::from_millis(200)),
        "no echo to the sender"
    );
    assert!(
        elsewhere.silent_for(std::time::Duration::from_millis(50)),
        "other rooms hear nothing"
    );
    assert_eq!(s.metric("chatflow_fanout_deliveries_total"), 1);
}

#[test]
fn members_on_different_reactors_all_receive() {
    let s = TestServer::start(|c| c.reactors = 2);
    // SO_REUSEPORT spreads connections by their port hash; with 24 both reactors get some.
    let mut members: Vec<Client> = (0..24).map(|_| s.ws("r")).collect();
    assert!(s.metric("chatflow_reactor_connections{reactor=\"0\"}") > 0);
    assert!(s.metric("chatflow_reactor_connections{reactor=\"1\"}") > 0);
    for round in 0..3 {
        let sender = round * 5;
        members[sender].send(&msg(1, "r", &format!("round {round}")));
        assert_eq!(members[sender].recv()["type"], "ack");
        for (i, m) in members.iter_mut().enumerate() {
            if i != sender {
                assert_eq!(m.recv()["message"], format!("round {round}"), "member {i}");
            }
        }
    }
    assert_eq!(s.metric("chatflow_fanout_deliveries_total"), 3 * 23);
}

#[test]
fn every_member_sees_each_senders_1000_messages_in_order() {
    let s = TestServer::start(|c| c.reactors = 2);
    let senders = 3;
    let per_sender = 1000;
    let mut clients: Vec<Client> = (0..senders + 4).map(|_| s.ws("order")).collect();
    let mut send_threads = Vec::new();
    for (sid, mut c) in clients.drain(..senders).enumerate() {
        send_threads.push(std::thread::spawn(move || {
            for n in 0..per_sender {
                let mut m = msg(sid as u32 + 1, "order", &format!("{n}"));
                m["clientMessageId"] = format!("s{sid}-{n}").into();
                c.queue(&m);
                if n % 50 == 0 {
                    c.flush();
                }
            }
            c.flush();
            // Acks arrive in send order too.
            for n in 0..per_sender {
                let ack = c.recv_type("ack");
                assert_eq!(ack["clientMessageId"], format!("s{sid}-{n}"));
            }
            c
        }));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut next: HashMap<u64, u64> = HashMap::new();
        for _ in 0..senders * per_sender {
            let m = c.recv_type("message");
            let user = m["userId"].as_u64().expect("userId");
            let n: u64 = m["message"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .expect("seq");
            let expected = next.entry(user).or_insert(0);
            assert_eq!(n, *expected, "receiver {i}, sender {user}");
            *expected += 1;
        }
        assert!(next.values().all(|&n| n == per_sender as u64));
    }
    for t in send_threads {
        t.join().expect("sender");
    }
}

#[test]
fn presence_follows_join_leave_and_disconnect() {
    let s = TestServer::start(|_| {});
    let mut alice = s.ws("p");
    let mut bob = s.ws("p");
    let join = |c: &mut Client, user: u32, kind: &str| {
        let mut m = msg(user, "p", "presence");
        m["messageType"] = kind.into();
        c.send(&m);
        c.recv_type("ack");
    };
    join(&mut alice, 1, "JOIN");
    join(&mut bob, 2, "join");
    let p = s.get("/api/rooms/p/presence").json();
    assert_eq!(p["roomId"], "p");
    assert_eq!(p["count"], 2);
    assert_eq!(p["users"][0]["userId"], 1);
    assert_eq!(p["users"][0]["username"], "user1");
    assert_eq!(p["users"][1]["userId"], 2);

    join(&mut alice, 1, "LEAVE");
    let p = s.get("/api/rooms/p/presence").json();
    assert_eq!(p["count"], 1);
    assert_eq!(p["users"][0]["userId"], 2);
    assert_eq!(s.get("/api/rooms/none/presence").json()["count"], 0);

    // Closing the tab leaves the room too.
    drop(bob);
    let start = std::time::Instant::now();
    while s.get("/api/rooms/p/presence").json()["count"] != 0 {
        assert!(start.elapsed() < util::WAIT, "bob never left");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // JOIN and LEAVE are broadcast like TEXT.
    let mut carol = s.ws("p");
    join(&mut alice, 1, "JOIN");
    let got = carol.recv();
    assert_eq!(got["messageType"], "JOIN", "{got}");
}
