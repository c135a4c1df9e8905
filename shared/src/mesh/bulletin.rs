//! The mesh bulletin: a small key → value map that every member holds a copy of, for
//! switches that must hold mesh-wide ("under attack" on a host, a cache purge).
//!
//! Writes are last-writer-wins per key, ordered by a [`Stamp`] (wall-clock milliseconds,
//! then the writer's id). A node that learns something new passes the changed entries on
//! to every peer at once (flooding: with the few dozen members of a mesh, one change costs
//! a few dozen datagrams and arrives in one path delay), and every
//! [`DIGEST_INTERVAL_MS`] sends a digest of what it holds to one random peer, which
//! answers with its entries when the digests differ (anti-entropy: a node that was down or
//! cut off catches up). Every entry expires; expired entries are dropped everywhere.
//!
//! Sans-IO, like the routing core: the caller passes the time in, sends what
//! [`Bulletin::poll_transmit`] returns over authenticated mesh frames, and feeds received
//! bodies to [`Bulletin::handle`]. Everything that arrives is bounded: entry count, key
//! and value sizes, expiry, and the stamps a peer may claim. What it does not do: decide
//! what a value means (the edge does), or authenticate (the mesh socket does).

use std::collections::{BTreeMap, VecDeque};

use rand::Rng as _;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::identity::ShortId;

/// How often a digest goes to one random peer.
pub const DIGEST_INTERVAL_MS: u64 = 2_000;
/// Most entries held; a post beyond it is refused and received entries are dropped.
pub const MAX_ENTRIES: usize = 1024;
/// Longest key, bytes.
pub const MAX_KEY_BYTES: usize = 300;
/// Largest value, bytes (an entry must fit one datagram with room to spare).
pub const MAX_VALUE_BYTES: usize = 600;
/// Longest life of an entry: longer ones are cut to this.
pub const MAX_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// How far in the future a peer's stamp may be, against our clock: a peer with a clock
/// far ahead (or a forged stamp) must not win every later write.
pub const MAX_CLOCK_AHEAD_MS: u64 = 5 * 60 * 1000;
/// Body bytes per datagram; entries are packed up to this.
const DATAGRAM_BYTES: usize = 1000;

/// The order of writes: wall-clock milliseconds, then the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Milliseconds since the Unix epoch at the writer.
    pub unix_ms: u64,
    /// The writer.
    pub origin: ShortId,
}

/// One entry as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key, e.g. `attack/example.com`.
    pub key: String,
    /// When and by whom it was written.
    pub stamp: Stamp,
    /// When it is dropped (Unix ms).
    pub expires_unix_ms: u64,
    /// The value, opaque here.
    pub value: Vec<u8>,
}

/// A bulletin datagram.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Message {
    /// Entries the sender holds (new ones, or all of them in answer to a digest).
    Entries(Vec<Entry>),
    /// A summary of everything the sender holds.
    Digest {
        /// Order-independent hash of every (key, stamp).
        hash: u64,
        /// Number of entries.
        count: u32,
        /// True when it answers a digest: then it is answered with entries only.
        reply: bool,
    },
}

/// Where a datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every peer.
    All,
    /// One peer.
    One(ShortId),
}

/// Why a post or a datagram was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BulletinError {
    /// The datagram is not a bulletin message.
    #[error("malformed bulletin datagram: {0}")]
    Malformed(String),
    /// A key or value is too long.
    #[error(
        "key of {key} bytes or value of {value} bytes is over the limit ({MAX_KEY_BYTES}, {MAX_VALUE_BYTES})"
    )]
    TooLarge {
        /// Key length.
        key: usize,
        /// Value length.
        value: usize,
    },
    /// The bulletin holds [`MAX_ENTRIES`] already.
    #[error("the bulletin is full ({MAX_ENTRIES} entries)")]
    Full,
}

/// One node's copy of the bulletin.
#[derive(Debug)]
pub struct Bulletin {
    me: ShortId,
    entries: BTreeMap<String, Entry>,
    outbox: VecDeque<(Target, Vec<u8>)>,
    next_digest_ms: u64,
    /// Bumped whenever the content changes, so readers can tell cheaply.
    generation: u64,
    /// Entries refused or dropped as out of bounds (counted for metrics).
    rejected: u64,
}

/// FNV-1a over bytes: stable across builds and platforms, unlike std's hasher, so two
/// nodes agree on a digest.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn entry_hash(e: &Entry) -> u64 {
    let h = fnv1a(0xcbf2_9ce4_8422_2325, e.key.as_bytes());
    let h = fnv1a(h, &e.stamp.unix_ms.to_be_bytes());
    fnv1a(h, &e.stamp.origin.0)
}

impl Bulletin {
    /// An empty bulletin for node `me`; the first digest goes out after a random part of
    /// the interval, so nodes started together do not send in step.
    pub fn new(me: ShortId, now_unix_ms: u64, rng: &mut StdRng) -> Self {
        Self {
            me,
            entries: BTreeMap::new(),
            outbox: VecDeque::new(),
            next_digest_ms: now_unix_ms + rng.random_range(0..DIGEST_INTERVAL_MS),
            generation: 0,
            rejected: 0,
        }
    }

    /// Changes whenever the content changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Entries refused as out of bounds so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// The live entries whose key starts with `prefix`.
    pub fn entries_with_prefix<'a>(
        &'a self,
        prefix: &'a str,
        now_unix_ms: u64,
    ) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .range(prefix.to_owned()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e)
            .filter(move |e| e.expires_unix_ms > now_unix_ms)
    }

    /// Writes `key` = `value` for `ttl_ms` and floods it to every peer. The stamp is
    /// above any the key had, so a write always wins over what this node has seen, even
    /// when the clock of the node that wrote before was ahead.
    pub fn post(
        &mut self,
        now_unix_ms: u64,
        key: &str,
        value: Vec<u8>,
        ttl_ms: u64,
    ) -> Result<Stamp, BulletinError> {
        if key.len() > MAX_KEY_BYTES || value.len() > MAX_VALUE_BYTES {
            return Err(BulletinError::TooLarge {
                key: key.len(),
                value: value.len(),
            });
        }
        if !self.entries.contains_key(key) && self.entries.len() >= MAX_ENTRIES {
            self.expire(now_unix_ms);
            if self.entries.len() >= MAX_ENTRIES {
                return Err(BulletinError::Full);
            }
        }
        let floor = self.entries.get(key).map_or(0, |e| e.stamp.unix_ms + 1);
        let stamp = Stamp {
            unix_ms: now_unix_ms.max(floor),
            origin: self.me,
        };
        let entry = Entry {
            key: key.to_owned(),
            stamp,
            expires_unix_ms: now_unix_ms.saturating_add(ttl_ms.min(MAX_TTL_MS)),
            value,
        };
        self.entries.insert(key.to_owned(), entry.clone());
        self.generation += 1;
        self.send_entries(Target::All, vec![entry]);
        Ok(stamp)
    }

    /// Handles a bulletin datagram from peer `from`. New entries are taken and passed on
    /// to every peer; a digest that differs from ours is answered.
    pub fn handle(
        &mut self,
        now_unix_ms: u64,
        from: ShortId,
        body: &[u8],
    ) -> Result<(), BulletinError> {
        let message: Message =
            postcard::from_bytes(body).map_err(|e| BulletinError::Malformed(e.to_string()))?;
        match message {
            Message::Entries(entries) => {
                let mut fresh = Vec::new();
                for entry in entries {
                    if self.take(now_unix_ms, &entry) {
                        fresh.push(entry);
                    }
                }
                if !fresh.is_empty() {
                    self.generation += 1;
                    self.send_entries(Target::All, fresh);
                }
            }
            Message::Digest { hash, count, reply } => {
                self.expire(now_unix_ms);
                if (hash, count) != self.digest() {
                    let all: Vec<Entry> = self.entries.values().cloned().collect();
                    self.send_entries(Target::One(from), all);
                    if !reply {
                        self.send_digest(Target::One(from), true);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `entry` is in bounds and newer than what we hold; takes it if so.
    fn take(&mut self, now_unix_ms: u64, entry: &Entry) -> bool {
        let in_bounds = entry.key.len() <= MAX_KEY_BYTES
            && entry.value.len() <= MAX_VALUE_BYTES
            && entry.stamp.unix_ms <= now_unix_ms.saturating_add(MAX_CLOCK_AHEAD_MS)
            && entry.expires_unix_ms <= now_unix_ms.saturating_add(MAX_TTL_MS);
        if !in_bounds {
            self.rejected += 1;
            return false;
        }
        if entry.expires_unix_ms <= now_unix_ms {
            return false;
        }
        match self.entries.get(&entry.key) {
            Some(held) if held.stamp >= entry.stamp => false,
            Some(_) => {
                self.entries.insert(entry.key.clone(), entry.clone());
                true
            }
            None if self.entries.len() >= MAX_ENTRIES => {
                self.rejected += 1;
                false
            }
            None => {
                self.entries.insert(entry.key.clone(), entry.clone());
                true
            }
        }
    }

    /// Drops expired entries; sends a digest to one of `peers` when one is due.
    pub fn handle_timeout(&mut self, now_unix_ms: u64, peers: &[ShortId], rng: &mut StdRng) {
        self.expire(now_unix_ms);
        if now_unix_ms < self.next_digest_ms {
            return;
        }
        self.next_digest_ms = now_unix_ms + DIGEST_INTERVAL_MS;
        if peers.is_empty() {
            return;
        }
        let peer = peers[rng.random_range(0..peers.len())];
        self.send_digest(Target::One(peer), false);
    }

    /// When [`Bulletin::handle_timeout`] should run next (Unix ms).
    pub fn poll_timeout(&self) -> u64 {
        let next_expiry = self
            .entries
            .values()
            .map(|e| e.expires_unix_ms)
            .min()
            .unwrap_or(u64::MAX);
        self.next_digest_ms.min(next_expiry)
    }

    /// The next datagram body to send, and where.
    pub fn poll_transmit(&mut self) -> Option<(Target, Vec<u8>)> {
        self.outbox.pop_front()
    }

    fn expire(&mut self, now_unix_ms: u64) {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.expires_unix_ms > now_unix_ms);
        if self.entries.len() != before {
            self.generation += 1;
        }
    }

    fn digest(&self) -> (u64, u32) {
        let hash = self.entries.values().fold(0u64, |h, e| h ^ entry_hash(e));
        (hash, self.entries.len() as u32)
    }

    fn send_digest(&mut self, to: Target, reply: bool) {
        let (hash, count) = self.digest();
        if let Ok(bytes) = postcard::to_stdvec(&Message::Digest { hash, count, reply }) {
            self.outbox.push_back((to, bytes));
        }
    }

    /// Queues `entries` in datagrams of at most [`DATAGRAM_BYTES`] each.
    fn send_entries(&mut self, to: Target, entries: Vec<Entry>) {
        let mut batch: Vec<Entry> = Vec::new();
        let mut size = 0;
        for entry in entries {
            let len = entry.key.len() + entry.value.len() + 40;
            if !batch.is_empty() && size + len > DATAGRAM_BYTES {
                self.queue(to, std::mem::take(&mut batch));
                size = 0;
            }
            size += len;
            batch.push(entry);
        }
        if !batch.is_empty() {
            self.queue(to, batch);
        }
    }

    fn queue(&mut self, to: Target, batch: Vec<Entry>) {
        if let Ok(bytes) = postcard::to_stdvec(&Message::Entries(batch)) {
            self.outbox.push_back((to, bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    fn id(n: u8) -> ShortId {
        ShortId([n; 8])
    }

    /// Delivers every queued datagram between `nodes` (index = id) until none is left,
    /// except to nodes in `down`. Returns how many were delivered.
    fn exchange(nodes: &mut [Bulletin], now: u64, down: &[usize]) -> usize {
        let mut delivered = 0;
        loop {
            let mut moved = false;
            for i in 0..nodes.len() {
                while let Some((to, body)) = nodes[i].poll_transmit() {
                    moved = true;
                    let targets: Vec<usize> = match to {
                        Target::All => (0..nodes.len()).filter(|&j| j != i).collect(),
                        Target::One(s) => vec![usize::from(s.0[0])],
                    };
                    for j in targets {
                        if down.contains(&j) || down.contains(&i) {
                            continue;
                        }
                        delivered += 1;
                        nodes[j].handle(now, id(i as u8), &body).expect("valid");
                    }
                }
            }
            if !moved {
                return delivered;
            }
        }
    }

    fn mesh(n: usize) -> (Vec<Bulletin>, StdRng) {
        let mut rng = StdRng::seed_from_u64(1);
        let nodes = (0..n)
            .map(|i| Bulletin::new(id(i as u8), 0, &mut rng))
            .collect();
        (nodes, rng)
    }

    fn value(b: &Bulletin, key: &str, now: u64) -> Option<Vec<u8>> {
        b.entries_with_prefix(key, now)
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
    }

    #[test]
    fn a_post_reaches_every_node_at_once_and_the_later_write_wins() {
        let (mut nodes, _) = mesh(5);
        nodes[0]
            .post(1_000, "attack/a.com", b"on".to_vec(), 60_000)
            .expect("post");
        exchange(&mut nodes, 1_000, &[]);
        for n in &nodes {
            assert_eq!(value(n, "attack/a.com", 1_001), Some(b"on".to_vec()));
        }
        // Node 3's clock is behind node 0's, yet its later write (it has seen node 0's)
        // still wins everywhere.
        nodes[3]
            .post(900, "attack/a.com", b"off".to_vec(), 60_000)
            .expect("post");
        exchange(&mut nodes, 1_100, &[]);
        for n in &nodes {
            assert_eq!(value(n, "attack/a.com", 1_101), Some(b"off".to_vec()));
        }
    }

    #[test]
    fn a_node_that_missed_the_flood_catches_up_by_digest() {
        let (mut nodes, mut rng) = mesh(4);
        nodes[1]
            .post(1_000, "purge/1", b"x".to_vec(), 600_000)
            .expect("post");
        exchange(&mut nodes, 1_000, &[2]);
        assert_eq!(value(&nodes[2], "purge/1", 1_000), None);
        // Digests to random peers: within a few rounds node 2 hears of it.
        let peers: Vec<ShortId> = (0..4).map(id).collect();
        let mut now = 1_000;
        for _ in 0..20 {
            now += DIGEST_INTERVAL_MS;
            for node in nodes.iter_mut() {
                let others: Vec<ShortId> =
                    peers.iter().copied().filter(|p| *p != node.me).collect();
                node.handle_timeout(now, &others, &mut rng);
            }
            exchange(&mut nodes, now, &[]);
            if value(&nodes[2], "purge/1", now).is_some() {
                return;
            }
        }
        panic!("node 2 never caught up");
    }

    #[test]
    fn hostile_entries_are_bounded() {
        let (mut nodes, _) = mesh(2);
        let now = 10_000_000;
        let entry = |key: &str, stamp_ms: u64, expires: u64, len: usize| Entry {
            key: key.into(),
            stamp: Stamp {
                unix_ms: stamp_ms,
                origin: id(1),
            },
            expires_unix_ms: expires,
            value: vec![0; len],
        };
        let body = postcard::to_stdvec(&Message::Entries(vec![
            entry("far-future", now + MAX_CLOCK_AHEAD_MS + 1, now + 1000, 1),
            entry("forever", now, u64::MAX, 1),
            entry("huge", now, now + 1000, MAX_VALUE_BYTES + 1),
            entry("ok", now, now + 1000, 1),
        ]))
        .expect("encode");
        nodes[0].handle(now, id(1), &body).expect("handled");
        let keys: Vec<String> = nodes[0]
            .entries_with_prefix("", now)
            .map(|e| e.key.clone())
            .collect();
        assert_eq!(keys, vec!["ok".to_string()]);
        assert_eq!(nodes[0].rejected(), 3);
        assert!(nodes[0].handle(now, id(1), &[0xff, 0xff, 0xff]).is_err());
        // The map is capped.
        for i in 0..MAX_ENTRIES + 10 {
            let body = postcard::to_stdvec(&Message::Entries(vec![entry(
                &format!("k{i}"),
                now,
                now + 1000,
                1,
            )]))
            .expect("encode");
            nodes[0].handle(now, id(1), &body).expect("handled");
        }
        assert_eq!(nodes[0].entries_with_prefix("", now).count(), MAX_ENTRIES);
        assert_eq!(
            nodes[0].post(now, "new", Vec::new(), 1000),
            Err(BulletinError::Full)
        );
    }

    #[test]
    fn entries_expire_everywhere() {
        let (mut nodes, mut rng) = mesh(2);
        nodes[0]
            .post(0, "attack/x", b"on".to_vec(), 5_000)
            .expect("post");
        exchange(&mut nodes, 0, &[]);
        assert!(value(&nodes[1], "attack/x", 4_999).is_some());
        assert!(value(&nodes[1], "attack/x", 5_000).is_none());
        let before = nodes[1].generation();
        nodes[1].handle_timeout(5_000, &[], &mut rng);
        assert!(nodes[1].generation() > before);
        assert_eq!(nodes[1].poll_timeout(), nodes[1].next_digest_ms);
    }
}
