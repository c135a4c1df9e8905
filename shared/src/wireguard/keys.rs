//! WireGuard keys: the base64 form `wg genkey` / `wg pubkey` use, and a node's static key
//! derived from its identity, so no second key has to be made, kept or distributed.
//!
//! The derivation is the one the mesh's link keys use ([`crate::mesh::auth`]): an Ed25519
//! key names an X25519 key by the birational map from the Edwards to the Montgomery curve
//! (libsodium's `crypto_sign_ed25519_*_to_curve25519`). So the WireGuard public key of any
//! member follows from its node id alone ([`public_key_of`]). The two protocols never
//! share a derived secret: the link keys come out of HKDF under their own label, and
//! WireGuard's handshake mixes the static DH with fresh ephemeral ones.

use base64::Engine as _;
use boringtun::x25519;

use crate::identity::{NodeId, NodeKey};
use crate::mesh::auth;

/// Why a key could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not base64.
    #[error("not base64: {0}")]
    Base64(String),
    /// Base64 of something other than 32 bytes.
    #[error("a WireGuard key is 32 bytes; this one is {0}")]
    Length(usize),
}

/// Reads a base64 key as `wg` writes it (surrounding whitespace allowed).
pub fn parse_key(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| KeyError::Base64(e.to_string()))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// A key in the form `wg` writes.
pub fn format_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// A WireGuard private key (or preshared key): never printed.
#[derive(Clone)]
pub struct SecretKey(pub(crate) [u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(MASKED)")
    }
}

impl SecretKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// This node's WireGuard static key: its identity key on the Montgomery curve. Fails
    /// only for a key whose PKCS#8 document holds no usable Ed25519 seed (the mesh's link
    /// keys refuse such a key too).
    pub fn derived_from(node: &NodeKey) -> Result<Self, auth::AuthError> {
        auth::x25519_scalar(node).map(Self)
    }

    /// Whether two keys are the same key (compared for a config reload).
    pub fn same_as(&self, other: &SecretKey) -> bool {
        self.0 == other.0
    }

    /// The public key that goes into the peer's config.
    pub fn public_key(&self) -> [u8; 32] {
        x25519::PublicKey::from(&x25519::StaticSecret::from(self.0)).to_bytes()
    }

    pub(crate) fn static_secret(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }
}

/// The WireGuard public key of the member with node id `id` (what [`SecretKey::derived_from`]
/// gives that member), if its id is a usable curve point.
pub fn public_key_of(id: &NodeId) -> Option<[u8; 32]> {
    auth::x25519_public(id).map(|p| p.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_in_wg_form() {
        // A key pair from `wg genkey | tee k | wg pubkey`.
        let private = parse_key("UOlrBEYUnSKJ0OWl7rE+AZhEIvBTnipObAegAzcHFXU=").expect("key");
        let public = SecretKey::from_bytes(private).public_key();
        assert_eq!(
            format_key(&public),
            "mbrzdPOI8B5f/n67FjTiOJsrCqVRvwu2NGk4u1tMCUM="
        );
        assert_eq!(parse_key(" \n").expect_err("empty"), KeyError::Length(0));
        assert!(matches!(parse_key("not base64!"), Err(KeyError::Base64(_))));
        assert_eq!(parse_key("AAAA").expect_err("short"), KeyError::Length(3));
    }

    #[test]
    fn the_derived_key_is_stable_masked_and_known_from_the_node_id() {
        let node = NodeKey::generate().expect("node key");
        let a = SecretKey::derived_from(&node).expect("derived");
        let b = SecretKey::derived_from(&node).expect("derived");
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(format!("{a:?}"), "SecretKey(MASKED)");
        // Any member computes it from the id alone, as X25519 would from the private half.
        assert_eq!(public_key_of(&node.id()), Some(a.public_key()));
        let other =
            SecretKey::derived_from(&NodeKey::generate().expect("node key")).expect("derived");
        assert_ne!(a.public_key(), other.public_key());
    }
}
