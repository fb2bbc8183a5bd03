//! Chat state without I/O: who is in which room, presence from JOIN/LEAVE, and rate limits.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

/// Members of each room on one reactor: room id → connection tokens.
///
/// Owned by one reactor thread, so it needs no lock. A room disappears with its last member,
/// so the map holds at most one entry per open connection.
#[derive(Default)]
pub struct RoomMembers {
    rooms: HashMap<Arc<str>, Vec<usize>>,
}

impl RoomMembers {
    /// Adds connection `token` to `room`; returns the interned room name to keep.
    pub fn join(&mut self, room: &str, token: usize) -> Arc<str> {
        if let Some(name) = self.rooms.get_key_value(room).map(|(k, _)| k.clone()) {
            self.rooms.entry(name.clone()).or_default().push(token);
            return name;
        }
        let name: Arc<str> = Arc::from(room);
        self.rooms.insert(name.clone(), vec![token]);
        name
    }

    /// Removes `token` from `room`, dropping the room when it empties.
    pub fn leave(&mut self, room: &str, token: usize) {
        if let Some(members) = self.rooms.get_mut(room) {
            if let Some(i) = members.iter().position(|&t| t == token) {
                members.swap_remove(i);
            }
            if members.is_empty() {
                self.rooms.remove(room);
            }
        }
    }

    /// The connections in `room` (empty if none).
    pub fn members(&self, room: &str) -> &[usize] {
        self.rooms.get(room).map(Vec::as_slice).unwrap_or(&[])
    }

    /// How many rooms have at least one member here.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }
}

/// Who holds a presence entry: the reactor and connection that sent the JOIN.
pub type Holder = (usize, usize);

/// A user shown as present in a room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresentUser {
    /// The user's id.
    pub user_id: u32,
    /// The name the user joined with.
    pub username: String,
}

#[derive(Default)]
struct PresenceInner {
    /// room → user id → (username, holder).
    rooms: HashMap<Arc<str>, BTreeMap<u32, (String, Holder)>>,
    entries: usize,
}

/// Presence across the node: users who sent JOIN and have not sent LEAVE since.
///
/// A user also leaves when the connection that joined them closes, as a person closing the tab
/// expects. Shared by all reactors behind a mutex held only for a map update, never across I/O;
/// only JOIN, LEAVE and disconnects touch it. Bounded: past `max_entries` users in all rooms, a
/// JOIN is still accepted and broadcast but not recorded (counted by the caller as dropped).
pub struct Presence {
    inner: Mutex<PresenceInner>,
    max_entries: usize,
}

/// What a presence update did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceChange {
    /// The set changed.
    Updated,
    /// Nothing to do (already present, or not present).
    Unchanged,
    /// The JOIN was not recorded because presence is full.
    Full,
}

impl Presence {
    /// Presence that records at most `max_entries` (room, user) pairs.
    pub fn new(max_entries: usize) -> Self {
        Presence {
            inner: Mutex::new(PresenceInner::default()),
            max_entries,
        }
    }

    /// Records that `user_id` joined `room` through connection `holder`. A JOIN from another
    /// connection takes the entry over, so the newest connection's close is the one that counts.
    pub fn join(
        &self,
        room: &Arc<str>,
        user_id: u32,
        username: &str,
        holder: Holder,
    ) -> PresenceChange {
        let mut inner = self.inner.lock();
        let full = inner.entries >= self.max_entries;
        let users = inner.rooms.entry(room.clone()).or_default();
        if let Some(entry) = users.get_mut(&user_id) {
            let changed = entry.0 != username || entry.1 != holder;
            *entry = (username.to_owned(), holder);
            return if changed {
                PresenceChange::Updated
            } else {
                PresenceChange::Unchanged
            };
        }
        if full {
            if users.is_empty() {
                inner.rooms.remove(room);
            }
            return PresenceChange::Full;
        }
        users.insert(user_id, (username.to_owned(), holder));
        inner.entries += 1;
        PresenceChange::Updated
    }

    /// Records that `user_id` left `room`.
    pub fn leave(&self, room: &str, user_id: u32) -> PresenceChange {
        let mut inner = self.inner.lock();
        let Some(users) = inner.rooms.get_mut(room) else {
            return PresenceChange::Unchanged;
        };
        let removed = users.remove(&user_id).is_some();
        if users.is_empty() {
            inner.rooms.remove(room);
        }
        if removed {
            inner.entries -= 1;
            PresenceChange::Updated
        } else {
            PresenceChange::Unchanged
        }
    }

    /// Removes the users that connection `holder` joined in `room` (the connection closed).
    pub fn drop_holder(&self, room: &str, holder: Holder, joined: &[u32]) {
        let mut inner = self.inner.lock();
        let Some(users) = inner.rooms.get_mut(room) else {
            return;
        };
        let mut removed = 0;
        for user_id in joined {
            if users.get(user_id).is_some_and(|(_, h)| *h == holder) {
                users.remove(user_id);
                removed += 1;
            }
        }
        if users.is_empty() {
            inner.rooms.remove(room);
        }
        inner.entries -= removed;
    }

    /// How many users are present in `room`, and the first `max` of them by user id. The lock
    /// is held for at most `max` short copies.
    pub fn users(&self, room: &str, max: usize) -> (usize, Vec<PresentUser>) {
        let inner = self.inner.lock();
        let Some(users) = inner.rooms.get(room) else {
            return (0, Vec::new());
        };
        let list = users
            .iter()
            .take(max)
            .map(|(&user_id, (name, _))| PresentUser {
                user_id,
                username: name.clone(),
            })
            .collect();
        (users.len(), list)
    }

    /// (room, user) pairs recorded in all rooms.
    pub fn entries(&self) -> usize {
        self.inner.lock().entries
    }
}

/// The JOINs a connection made and has not left, so they can be withdrawn when it closes.
///
/// Bounded at `CAP` users per connection (a person's tab joins as one user; a load tester may
/// send many). Beyond it, older joins stay in presence until a LEAVE names them.
#[derive(Default, Debug)]
pub struct ConnJoins {
    users: Vec<u32>,
}

impl ConnJoins {
    /// Most users one connection's close withdraws.
    pub const CAP: usize = 64;

    /// Notes a JOIN.
    pub fn joined(&mut self, user_id: u32) {
        if self.users.contains(&user_id) {
            return;
        }
        if self.users.len() == Self::CAP {
            self.users.remove(0);
        }
        self.users.push(user_id);
    }

    /// Notes a LEAVE.
    pub fn left(&mut self, user_id: u32) {
        self.users.retain(|&u| u != user_id);
    }

    /// The users to withdraw.
    pub fn users(&self) -> &[u32] {
        &self.users
    }
}

/// A token bucket: `rate` messages per second on average, bursts up to `burst`.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            rate: f64::from(rate_per_sec),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rooms_vanish_with_their_last_member() {
        let mut r = RoomMembers::default();
        let a = r.join("1", 10);
        let b = r.join("1", 11);
        assert!(Arc::ptr_eq(&a, &b), "one interned name per room");
        r.join("2", 12);
        assert_eq!(r.members("1"), &[10, 11]);
        r.leave("1", 10);
        assert_eq!(r.members("1"), &[11]);
        r.leave("1", 11);
        assert_eq!(r.members("1"), &[] as &[usize]);
        assert_eq!(r.room_count(), 1);
    }

    #[test]
    fn presence_follows_join_and_leave() {
        let p = Presence::new(100);
        let room: Arc<str> = "7".into();
        assert_eq!(p.join(&room, 1, "alice", (0, 1)), PresenceChange::Updated);
        assert_eq!(p.join(&room, 2, "bob", (0, 2)), PresenceChange::Updated);
        assert_eq!(p.join(&room, 1, "alice", (0, 1)), PresenceChange::Unchanged);
        let names: Vec<_> = p
            .users("7", 100)
            .1
            .into_iter()
            .map(|u| u.username)
            .collect();
        assert_eq!(names, ["alice", "bob"]);
        assert_eq!(p.leave("7", 1), PresenceChange::Updated);
        assert_eq!(p.leave("7", 1), PresenceChange::Unchanged);
        assert_eq!(p.users("7", 100).1.len(), 1);
        assert_eq!(p.entries(), 1);
        assert!(p.users("8", 100).1.is_empty());
        p.join(&room, 3, "carol", (0, 3));
        let (count, first) = p.users("7", 1);
        assert_eq!(
            (count, first.len()),
            (2, 1),
            "the list is capped, the count is not"
        );
    }

    #[test]
    fn a_closed_connection_withdraws_only_its_own_joins() {
        let p = Presence::new(100);
        let room: Arc<str> = "7".into();
        p.join(&room, 1, "alice", (0, 1));
        p.join(&room, 2, "bob", (1, 1));
        // alice joined again from a newer connection: the old one's close must not remove her.
        p.join(&room, 1, "alice", (1, 5));
        p.drop_holder("7", (0, 1), &[1]);
        assert_eq!(p.users("7", 100).1.len(), 2);
        p.drop_holder("7", (1, 1), &[2]);
        assert_eq!(p.users("7", 100).1.len(), 1);
        assert_eq!(p.entries(), 1);
    }

    #[test]
    fn presence_is_bounded() {
        let p = Presence::new(2);
        let room: Arc<str> = "7".into();
        p.join(&room, 1, "aaa", (0, 1));
        p.join(&room, 2, "bbb", (0, 1));
        assert_eq!(p.join(&room, 3, "ccc", (0, 1)), PresenceChange::Full);
        assert_eq!(p.join(&"8".into(), 3, "ccc", (0, 1)), PresenceChange::Full);
        assert_eq!(p.entries(), 2);
        // A user already present can still rename.
        assert_eq!(p.join(&room, 1, "aab", (0, 1)), PresenceChange::Updated);
    }

    #[test]
    fn conn_joins_are_capped() {
        let mut j = ConnJoins::default();
        for u in 0..(ConnJoins::CAP as u32 + 10) {
            j.joined(u);
        }
        assert_eq!(j.users().len(), ConnJoins::CAP);
        assert_eq!(j.users()[0], 10);
        j.left(10);
        assert!(!j.users().contains(&10));
    }

    #[test]
    fn rate_limiter_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10, 3, t0);
        assert!(r.allow(t0) && r.allow(t0) && r.allow(t0));
        assert!(!r.allow(t0));
        assert!(r.allow(t0 + Duration::from_millis(100)));
        assert!(!r.allow(t0 + Duration::from_millis(100)));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert!(r.allow(later) && r.allow(later) && r.allow(later));
        assert!(!r.allow(later));
    }
}
