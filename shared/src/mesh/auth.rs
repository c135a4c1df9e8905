//! Hop-by-hop authentication of the frames a node must trust before QUIC can: routing,
//! membership, and relayed packets (sans-IO).
//!
//! Every pair of members shares a *link key* that each end derives on its own, with no
//! handshake and no extra secret to distribute. A node's Ed25519 identity key also names an
//! X25519 key (the birational map from the Edwards to the Montgomery curve, the conversion
//! libsodium offers as `crypto_sign_ed25519_*_to_curve25519`), so X25519(mine, theirs)
//! gives both ends the same secret; HKDF-SHA256 binds it to both ids and makes an
//! HMAC-SHA256 key of it. A frame's tag covers its header — both ids, the counter — and its
//! body, so a frame can't be forged, altered, or reflected back to its sender.
//!
//! Replays: each sender numbers its frames with one counter that starts at its clock in
//! microseconds (so it keeps growing across restarts), and each receiver keeps a
//! [`ReplayWindow`] per sender.

use std::collections::HashMap;
use std::fmt;

use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::montgomery::MontgomeryPoint;
use ring::{hkdf, hmac};
use sha2::Digest as _;

use crate::identity::{NodeId, NodeKey, ShortId};
use crate::membership::Members;

/// Bytes of the truncated HMAC-SHA256 tag ending every authenticated frame.
pub const TAG_LEN: usize = 16;

/// Why link keys could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The private key's PKCS#8 document holds no Ed25519 seed we can read, or the seed does
    /// not match the public key.
    #[error("cannot derive an X25519 key from this node's Ed25519 key: {0}")]
    UnusableKey(&'static str),
}

/// The link keys between this node and every other member.
pub struct LinkKeys {
    keys: HashMap<ShortId, hmac::Key>,
    /// Members whose public key is not a usable curve point; frames to and from them are
    /// refused. Kept for the error message.
    unusable: Vec<String>,
}

impl fmt::Debug for LinkKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkKeys")
            .field("peers", &self.keys.len())
            .field("keys", &"MASKED")
            .finish()
    }
}

/// The clamped X25519 scalar bytes of an Ed25519 key: the first half of SHA-512(seed).
pub(crate) fn x25519_scalar(key: &NodeKey) -> Result<[u8; 32], AuthError> {
    // Both PKCS#8 v1 (openssl) and v2 (ring) wrap the 32-byte seed as OCTET STRING inside
    // OCTET STRING: 04 22 04 20 <seed>.
    let der = key.pkcs8_der();
    let at = der
        .windows(4)
        .position(|w| w == [0x04, 0x22, 0x04, 0x20])
        .ok_or(AuthError::UnusableKey(
            "no Ed25519 seed in the PKCS#8 document",
        ))?;
    let seed = der
        .get(at + 4..at + 36)
        .ok_or(AuthError::UnusableKey("truncated Ed25519 seed"))?;
    let hash = sha2::Sha512::digest(seed);
    let mut scalar = [0u8; 32];
    scalar.copy_from_slice(&hash[..32]);
    // The seed must be the one behind our public key, or every link key would be wrong.
    let public = EdwardsPoint::mul_base_clamped(scalar).compress();
    if public.0 != *key.id().as_bytes() {
        return Err(AuthError::UnusableKey(
            "the seed does not match the public key",
        ));
    }
    Ok(scalar)
}

/// A member's public key on the Montgomery curve, if it is a valid point.
pub(crate) fn x25519_public(id: &NodeId) -> Option<MontgomeryPoint> {
    let point = CompressedEdwardsY(*id.as_bytes()).decompress()?;
    if point.is_small_order() {
        return None;
    }
    Some(point.to_montgomery())
}

struct KeyLen;

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        32
    }
}

impl LinkKeys {
    /// Derives the link key with every member but this node.
    pub fn new(key: &NodeKey, members: &Members) -> Result<Self, AuthError> {
        let scalar = x25519_scalar(key)?;
        let me = key.id();
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"skylane link key v1");
        let mut keys = HashMap::new();
        let mut unusable = Vec::new();
        for member in members.iter().filter(|m| m.id != me) {
            let Some(public) = x25519_public(&member.id) else {
                unusable.push(member.name.clone());
                continue;
            };
            let shared = public.mul_clamped(scalar);
            // Both ends list the two ids in the same order.
            let (lo, hi) = if me < member.id {
                (me, member.id)
            } else {
                (member.id, me)
            };
            let info = [lo.as_bytes().as_slice(), hi.as_bytes().as_slice()];
            let prk = salt.extract(shared.as_bytes());
            let mut bytes = [0u8; 32];
            let okm = prk
                .expand(&info, KeyLen)
                .map_err(|_| AuthError::UnusableKey("HKDF expansion failed"))?;
            okm.fill(&mut bytes)
                .map_err(|_| AuthError::UnusableKey("HKDF expansion failed"))?;
            keys.insert(member.id.short(), hmac::Key::new(hmac::HMAC_SHA256, &bytes));
        }
        Ok(Self { keys, unusable })
    }

    /// Members whose key can't be used for link keys (not valid curve points).
    pub fn unusable(&self) -> &[String] {
        &self.unusable
    }

    /// The tag of `data` on the link to `peer`, or `None` if we share no key with it.
    pub fn tag(&self, peer: &ShortId, data: &[u8]) -> Option<[u8; TAG_LEN]> {
        let key = self.keys.get(peer)?;
        let full = hmac::sign(key, data);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full.as_ref()[..TAG_LEN]);
        Some(tag)
    }

    /// Whether `tag` is `data`'s tag on the link to `peer` (compared in constant time).
    pub fn verify(&self, peer: &ShortId, data: &[u8], tag: &[u8]) -> bool {
        let Some(expected) = self.tag(peer, data) else {
            return false;
        };
        tag.len() == TAG_LEN
            && expected
                .iter()
                .zip(tag)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// Number of counters behind the highest one seen that are still accepted once.
pub const REPLAY_WINDOW: u64 = 1024;

/// Remembers which counters one sender has used recently: each is accepted once, and
/// anything older than the window is refused (the scheme of RFC 6479 / WireGuard).
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    /// Highest counter accepted so far (0: none yet).
    top: u64,
    bits: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl ReplayWindow {
    /// Accepts `counter` if it is new, and records it. Call only after the tag verified.
    pub fn accept(&mut self, counter: u64) -> bool {
        if counter == 0 {
            return false;
        }
        if counter > self.top {
            let shift = counter - self.top;
            if shift >= REPLAY_WINDOW {
                self.bits = Default::default();
            } else {
                for c in self.top + 1..=counter {
                    self.clear(c);
                }
            }
            self.top = counter;
            self.set(counter);
            return true;
        }
        if self.top - counter >= REPLAY_WINDOW {
            return false;
        }
        if self.is_set(counter) {
            return false;
        }
        self.set(counter);
        true
    }

    fn index(counter: u64) -> (usize, u64) {
        let slot = counter % REPLAY_WINDOW;
        ((slot / 64) as usize, 1u64 << (slot % 64))
    }

    fn set(&mut self, counter: u64) {
        let (word, bit) = Self::index(counter);
        self.bits[word] |= bit;
    }

    fn clear(&mut self, counter: u64) {
        let (word, bit) = Self::index(counter);
        self.bits[word] &= !bit;
    }

    fn is_set(&self, counter: u64) -> bool {
        let (word, bit) = Self::index(counter);
        self.bits[word] & bit != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(keys: &[&NodeKey]) -> Members {
        crate::membership::test_members(keys.iter().copied())
    }

    #[test]
    fn both_ends_derive_the_same_link_key() {
        let (a, b, c) = (
            NodeKey::generate().expect("key"),
            NodeKey::generate().expect("key"),
            NodeKey::generate().expect("key"),
        );
        let all = members(&[&a, &b, &c]);
        let ka = LinkKeys::new(&a, &all).expect("keys");
        let kb = LinkKeys::new(&b, &all).expect("keys");
        let kc = LinkKeys::new(&c, &all).expect("keys");
        let tag = ka.tag(&b.id().short(), b"hello").expect("tag");
        assert!(kb.verify(&a.id().short(), b"hello", &tag));
        assert!(!kb.verify(&a.id().short(), b"hellp", &tag));
        // A third member holds a different key for each of its links.
        assert!(!kc.verify(&a.id().short(), b"hello", &tag));
        assert!(!kb.verify(&c.id().short(), b"hello", &tag));
    }

    #[test]
    fn a_stranger_shares_no_key() {
        let (a, b) = (
            NodeKey::generate().expect("key"),
            NodeKey::generate().expect("key"),
        );
        let stranger = NodeKey::generate().expect("key");
        let ka = LinkKeys::new(&a, &members(&[&a, &b])).expect("keys");
        assert!(ka.tag(&stranger.id().short(), b"x").is_none());
        assert!(!ka.verify(&stranger.id().short(), b"x", &[0u8; TAG_LEN]));
    }

    #[test]
    fn keys_written_by_openssl_work_too() {
        // PKCS#8 v1, as `openssl genpkey -algorithm ed25519` writes it (RFC 8410 test key).
        let pem = "-----BEGIN PRIVATE KEY-----\n\
                   MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
                   -----END PRIVATE KEY-----\n";
        let key = NodeKey::from_pem(pem, "test").expect("openssl key");
        assert!(x25519_scalar(&key).is_ok());
    }

    #[test]
    fn replay_window_accepts_each_counter_once() {
        let mut w = ReplayWindow::default();
        assert!(!w.accept(0));
        assert!(w.accept(10));
        assert!(!w.accept(10));
        assert!(w.accept(8), "late but inside the window");
        assert!(!w.accept(8));
        assert!(w.accept(11));
        assert!(w.accept(5000));
        assert!(!w.accept(11), "fell out of the window");
        assert!(w.accept(5000 - REPLAY_WINDOW + 1));
        assert!(!w.accept(5000 - REPLAY_WINDOW));
        // A jump wipes stale bits: counter 5000 + 1024 reuses 5000's slot.
        assert!(w.accept(5000 + REPLAY_WINDOW));
        assert!(!w.accept(5000 + REPLAY_WINDOW));
    }
}
