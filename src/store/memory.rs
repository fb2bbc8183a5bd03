//! The memory store: the newest messages in RAM, for benchmarks of the server without a disk.
//!
//! It answers every query like the SQL backends (same windows, same order, same minute
//! rounding, exact active users) by walking ordered maps under one lock. Nothing survives the
//! process, so it never serves `ack_after = persisted` honestly: use it to measure the rest.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use time::OffsetDateTime;
use uuid::Uuid;

use super::sqlite::{micros_ceil, micros_floor, minute_range};
use super::{
    Analytics, DeadLetter, Record, Store, StoreError, StoreReader, StoreWriter, Take, UserRoom,
    Window, type_code,
};

/// Most dead letters kept; past it the oldest is dropped. Dead letters are for an operator to
/// read, and a benchmark that makes many has already failed.
const DEAD_LETTERS_KEPT: usize = 10_000;

/// Microseconds in a minute.
const MICROS_PER_MINUTE: i64 = 60_000_000;

/// A message's place in time order: (`server_ts` in microseconds, id), the order every list is
/// returned in.
type Key = (i64, Uuid);

/// Keeps the newest messages in memory.
///
/// At most `max_rows` messages are kept. When a write would go past that, the oldest messages
/// (by `server_ts`, then id) are dropped, counted in [`MemoryStore::dropped`], and their ids
/// forgotten: a retry of a dropped message is stored again as new. Duplicates are recognised
/// only among the messages kept. Times are kept to the microsecond, as the SQL backends store
/// them. Dead letters are kept too, at most 10,000 (oldest dropped first).
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Messages dropped to stay within `max_rows`; outside the lock so that metrics can read
    /// it without waiting for a writer.
    dropped: AtomicU64,
}

struct State {
    max_rows: usize,
    /// Every kept message in time order; the first entry is the next to drop.
    rows: BTreeMap<Key, Record>,
    ids: HashSet<Uuid>,
    by_room: HashMap<Arc<str>, BTreeSet<Key>>,
    by_user: HashMap<i32, BTreeSet<Key>>,
    dead_letters: VecDeque<DeadLetter>,
}

impl MemoryStore {
    /// A store that keeps at most `max_rows` messages (0 keeps none).
    pub fn new(max_rows: usize) -> Self {
        MemoryStore {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    max_rows,
                    rows: BTreeMap::new(),
                    ids: HashSet::new(),
                    by_room: HashMap::new(),
                    by_user: HashMap::new(),
                    dead_letters: VecDeque::new(),
                }),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// How many messages have been dropped to stay within `max_rows`.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// How many messages are kept now.
    pub fn len(&self) -> usize {
        self.shared.state.lock().rows.len()
    }

    /// Whether no message is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn migrate(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn writer(&self) -> Result<Box<dyn StoreWriter>, StoreError> {
        Ok(Box::new(Handle(self.shared.clone())))
    }

    fn reader(&self) -> Result<Box<dyn StoreReader>, StoreError> {
        Ok(Box::new(Handle(self.shared.clone())))
    }
}

/// A writer's or reader's view of the shared state.
struct Handle(Arc<Shared>);

/// `t` rounded down to the microsecond, as the SQL backends store it.
fn to_micros(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(t.nanosecond() / 1000 * 1000)
        .unwrap_or(t)
}

impl State {
    fn insert(&mut self, record: &Record) -> bool {
        if self.ids.contains(&record.message_id) {
            return false;
        }
        let mut record = record.clone();
        record.client_ts = to_micros(record.client_ts);
        record.server_ts = to_micros(record.server_ts);
        let key = (micros_floor(record.server_ts), record.message_id);
        self.ids.insert(record.message_id);
        self.by_room
            .entry(record.room_id.clone())
            .or_default()
            .insert(key);
        self.by_user.entry(record.user_id).or_default().insert(key);
        self.rows.insert(key, record);
        true
    }

    /// Drops the oldest messages past `max_rows`; returns how many.
    fn evict(&mut self) -> u64 {
        let mut dropped = 0;
        while self.rows.len() > self.max_rows {
            let Some((key, record)) = self.rows.pop_first() else {
                break;
            };
            self.ids.remove(&record.message_id);
            if let Some(keys) = self.by_room.get_mut(&record.room_id) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.by_room.remove(&record.room_id);
                }
            }
            if let Some(keys) = self.by_user.get_mut(&record.user_id) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.by_user.remove(&record.user_id);
                }
            }
            dropped += 1;
        }
        dropped
    }

    /// The oldest or newest `limit` of `keys` in `window`, oldest first.
    fn window_list(
        &self,
        keys: Option<&BTreeSet<Key>>,
        window: Window,
        limit: usize,
        take: Take,
    ) -> Vec<Record> {
        let (Some(keys), Some(range)) = (keys, key_range(window)) else {
            return Vec::new();
        };
        let in_window = keys.range(range);
        let pick = |k: &Key| self.rows.get(k).cloned();
        match take {
            Take::First => in_window.filter_map(pick).take(limit).collect(),
            Take::Last => {
                let mut out: Vec<Record> = in_window.rev().filter_map(pick).take(limit).collect();
                out.reverse();
                out
            }
        }
    }

    fn in_range(&self, range: Option<std::ops::Range<Key>>) -> impl Iterator<Item = &Record> {
        range
            .into_iter()
            .flat_map(|range| self.rows.range(range).map(|(_, r)| r))
    }
}

/// The keys of `window` (edges rounded up to the microsecond, as stored times are whole
/// microseconds); `None` when it is empty, since `BTreeMap::range` panics on an inverted range.
fn key_range(window: Window) -> Option<std::ops::Range<Key>> {
    micros_range(micros_ceil(window.start), micros_ceil(window.end))
}

/// The keys with `server_ts` in [`start`, `end`) microseconds.
fn micros_range(start: i64, end: i64) -> Option<std::ops::Range<Key>> {
    (start < end).then(|| (start, Uuid::nil())..(end, Uuid::nil()))
}

/// Counts sorted most first, ties by id.
fn top<K: Ord>(counts: HashMap<K, i64>, n: usize) -> Vec<(K, i64)> {
    let mut v: Vec<(K, i64)> = counts.into_iter().collect();
    v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

impl StoreWriter for Handle {
    fn write(&mut self, batch: &[Record]) -> Result<usize, StoreError> {
        let mut state = self.0.state.lock();
        let new = batch.iter().filter(|r| state.insert(r)).count();
        let dropped = state.evict();
        drop(state);
        if dropped > 0 {
            self.0.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        Ok(new)
    }

    fn dead_letter(&mut self, rows: &[DeadLetter]) -> Result<(), StoreError> {
        let mut state = self.0.state.lock();
        for d in rows {
            if state.dead_letters.len() == DEAD_LETTERS_KEPT {
                state.dead_letters.pop_front();
            }
            state.dead_letters.push_back(d.clone());
        }
        Ok(())
    }
}

impl StoreReader for Handle {
    fn room_messages(
        &mut self,
        room: &str,
        window: Window,
        limit: usize,
        take: Take,
    ) -> Result<Vec<Record>, StoreError> {
        let state = self.0.state.lock();
        Ok(state.window_list(state.by_room.get(room), window, limit, take))
    }

    fn user_messages(
        &mut self,
        user: i32,
        window: Window,
        limit: usize,
        take: Take,
    ) -> Result<Vec<Record>, StoreError> {
        let state = self.0.state.lock();
        Ok(state.window_list(state.by_user.get(&user), window, limit, take))
    }

    fn user_rooms(&mut self, user: i32) -> Result<Vec<UserRoom>, StoreError> {
        let state = self.0.state.lock();
        let Some(keys) = state.by_user.get(&user) else {
            return Ok(Vec::new());
        };
        // Keys are in time order, so a room's first row seen is its first activity.
        let mut rooms: HashMap<&str, UserRoom> = HashMap::new();
        for r in keys.iter().filter_map(|k| state.rows.get(k)) {
            let room = rooms.entry(&r.room_id).or_insert_with(|| UserRoom {
                room_id: r.room_id.to_string(),
                first_activity: r.server_ts,
                last_activity: r.server_ts,
                message_count: 0,
            });
            room.last_activity = r.server_ts;
            room.message_count += 1;
        }
        let mut out: Vec<UserRoom> = rooms.into_values().collect();
        out.sort_unstable_by(|a, b| {
            b.last_activity
                .cmp(&a.last_activity)
                .then_with(|| a.room_id.cmp(&b.room_id))
        });
        Ok(out)
    }

    fn active_users(&mut self, window: Window) -> Result<i64, StoreError> {
        let state = self.0.state.lock();
        let users: HashSet<i32> = state
            .in_range(key_range(window))
            .map(|r| r.user_id)
            .collect();
        Ok(users.len() as i64)
    }

    fn analytics(&mut self, window: Window, top_n: usize) -> Result<Analytics, StoreError> {
        // The same rounding as the rollups: whole minutes from start's down to end's up.
        let Some((lo, hi)) = minute_range(window) else {
            return Ok(Analytics::default());
        };
        let state = self.0.state.lock();
        let mut out = Analytics::default();
        let mut per_minute: BTreeMap<i64, i64> = BTreeMap::new();
        let mut users: HashMap<i32, i64> = HashMap::new();
        let mut rooms: HashMap<&str, i64> = HashMap::new();
        for r in state.in_range(micros_range(
            lo.saturating_mul(1_000_000),
            hi.saturating_mul(1_000_000),
        )) {
            let minute = micros_floor(r.server_ts).div_euclid(MICROS_PER_MINUTE) * 60;
            out.total += 1;
            *per_minute.entry(minute).or_default() += 1;
            *users.entry(r.user_id).or_default() += 1;
            *rooms.entry(&r.room_id).or_default() += 1;
            out.by_type[type_code(r.message_type) as usize] += 1;
        }
        out.per_minute = per_minute
            .into_iter()
            .filter_map(|(m, n)| Some((OffsetDateTime::from_unix_timestamp(m).ok()?, n)))
            .collect();
        out.top_users = top(users, top_n);
        out.top_rooms = top(rooms, top_n)
            .into_iter()
            .map(|(room, n)| (room.to_owned(), n))
            .collect();
        Ok(out)
    }

    fn span(&mut self) -> Result<Option<(OffsetDateTime, OffsetDateTime)>, StoreError> {
        let state = self.0.state.lock();
        let oldest = state.rows.first_key_value().map(|(_, r)| r.server_ts);
        let newest = state.rows.last_key_value().map(|(_, r)| r.server_ts);
        Ok(oldest.zip(newest))
    }

    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let state = self.0.state.lock();
        Ok(state.dead_letters.iter().take(limit).cloned().collect())
    }

    fn ping(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageType;

    fn record(i: u128, room: &str, user: i32, secs: i64) -> Record {
        let ts = OffsetDateTime::from_unix_timestamp(secs).unwrap();
        Record {
            message_id: Uuid::from_u128(i),
            room_id: Arc::from(room),
            user_id: user,
            username: format!("user{user}"),
            message: format!("hello {i}"),
            message_type: MessageType::Text,
            client_ts: ts,
            server_ts: ts,
            node_id: Arc::from("node-a"),
        }
    }

    fn all() -> Window {
        Window {
            start: OffsetDateTime::UNIX_EPOCH,
            end: OffsetDateTime::from_unix_timestamp(1_000_000).unwrap(),
        }
    }

    #[test]
    fn keeps_at_most_max_rows_dropping_the_oldest() {
        let store = MemoryStore::new(3);
        let mut w = store.writer().unwrap();
        let batch: Vec<Record> = (1..=5).map(|i| record(i, "r", 1, i as i64 * 10)).collect();
        assert_eq!(w.write(&batch).unwrap(), 5);
        assert_eq!(store.len(), 3);
        assert_eq!(store.dropped(), 2);
        let mut r = store.reader().unwrap();
        let kept: Vec<u128> = r
            .room_messages("r", all(), 10, Take::First)
            .unwrap()
            .iter()
            .map(|r| r.message_id.as_u128())
            .collect();
        assert_eq!(kept, vec![3, 4, 5]);
        // Everything derived from the rows follows the eviction.
        assert_eq!(r.analytics(all(), 10).unwrap().total, 3);
        assert_eq!(r.user_rooms(1).unwrap()[0].message_count, 3);
        let span = r.span().unwrap().unwrap();
        assert_eq!(span.0.unix_timestamp(), 30);
        // A dropped id is forgotten: writing it again stores it as new (and drops the
        // oldest again, which is itself, being older than everything kept).
        assert_eq!(w.write(&batch[..1]).unwrap(), 1);
        assert_eq!(store.dropped(), 3);
        // A kept id is still a duplicate.
        assert_eq!(w.write(&batch[4..]).unwrap(), 0);
    }

    #[test]
    fn handles_share_one_state() {
        let store = MemoryStore::new(10);
        store
            .writer()
            .unwrap()
            .write(&[record(1, "r", 1, 60)])
            .unwrap();
        assert_eq!(store.reader().unwrap().active_users(all()).unwrap(), 1);
    }

    #[test]
    fn stored_times_are_whole_microseconds() {
        let store = MemoryStore::new(10);
        let mut rec = record(1, "r", 1, 60);
        rec.server_ts += time::Duration::nanoseconds(1_999);
        store.writer().unwrap().write(&[rec]).unwrap();
        let got = store
            .reader()
            .unwrap()
            .room_messages("r", all(), 1, Take::First)
            .unwrap();
        assert_eq!(got[0].server_ts.nanosecond(), 1_000);
    }

    #[test]
    fn dead_letters_are_bounded() {
        let store = MemoryStore::new(10);
        let mut w = store.writer().unwrap();
        let rows: Vec<DeadLetter> = (0..DEAD_LETTERS_KEPT as u128 + 5)
            .map(|i| DeadLetter {
                record: record(i, "r", 1, 60),
                reason: "refused".into(),
            })
            .collect();
        w.dead_letter(&rows).unwrap();
        let got = store.reader().unwrap().dead_letters(usize::MAX).unwrap();
        assert_eq!(got.len(), DEAD_LETTERS_KEPT);
        assert_eq!(got[0].record.message_id.as_u128(), 5);
    }
}
