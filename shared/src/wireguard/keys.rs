//! WireGuard keys: the base64 form `wg genkey` / `wg pubkey` use, and this node's static
//! key derived from its identity, so no second key has to be made or kept.

use base64::Engine as _;
use boringtun::x25519;

use crate::identity::NodeKey;

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

    /// This node's WireGuard static key, derived from its identity key for this purpose
    /// only (the identity key itself never leaves its own uses).
    pub fn derived_from(node: &NodeKey) -> Self {
        Self(node.derive_secret("skylane wireguard static key v1"))
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
    fn the_derived_key_is_stable_and_masked() {
        let node = NodeKey::generate().expect("node key");
        let a = SecretKey::derived_from(&node);
        let b = SecretKey::derived_from(&node);
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(format!("{a:?}"), "SecretKey(MASKED)");
        let other = SecretKey::derived_from(&NodeKey::generate().expect("node key"));
        assert_ne!(a.public_key(), other.public_key());
    }
}
