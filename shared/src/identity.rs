//! Node identities: every node has an Ed25519 key pair; its public key is its [`NodeId`].
//!
//! The mesh is a list of member public keys. QUIC tunnels authenticate both ends with
//! self-signed certificates made from these keys, and the trust check is "is this key a
//! member", not a CA chain (see [`crate::trust`]).

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};

/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// A node's identity: its Ed25519 public key. Printed as unpadded base64url (43 chars).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NodeId([u8; PUBLIC_KEY_LEN]);

/// The first 8 bytes of a [`NodeId`]: what mesh frames carry to name a node, and what
/// the node's virtual socket address is made of. Collisions among members are rejected
/// when the member list is loaded.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, serde::Serialize, serde::Deserialize,
)]
pub struct ShortId(pub [u8; 8]);

/// Errors reading or parsing identities and key files.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A public key string that is not 43 characters of base64url for 32 bytes.
    #[error("invalid node public key {0:?}: expected 43 characters of unpadded base64url")]
    BadPublicKey(String),
    /// The key file is not a PEM-encoded PKCS#8 Ed25519 private key.
    #[error("invalid private key in {path}: {reason}")]
    BadPrivateKey {
        /// The file that was read.
        path: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file that was read or written.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The system random generator failed.
    #[error("could not generate a key: {0}")]
    Generate(String),
}

impl NodeId {
    /// The raw public key bytes.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }

    /// Builds an id from raw public key bytes.
    pub fn from_bytes(bytes: [u8; PUBLIC_KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The 8-byte short form used in frames and virtual addresses.
    pub fn short(&self) -> ShortId {
        let mut s = [0u8; 8];
        s.copy_from_slice(&self.0[..8]);
        ShortId(s)
    }
}

impl std::str::FromStr for NodeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let bytes = URL_SAFE_NO_PAD
            .decode(trimmed)
            .map_err(|_| IdentityError::BadPublicKey(trimmed.to_owned()))?;
        let arr: [u8; PUBLIC_KEY_LEN] = bytes
            .try_into()
            .map_err(|_| IdentityError::BadPublicKey(trimmed.to_owned()))?;
        Ok(Self(arr))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first 10 characters are plenty to tell nodes apart in logs.
        let full = self.to_string();
        write!(f, "NodeId({})", &full[..10])
    }
}

impl fmt::Display for ShortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A node's private key (PKCS#8 DER). `Debug` never prints the key.
#[derive(Clone)]
pub struct NodeKey {
    pkcs8: Vec<u8>,
    id: NodeId,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("id", &self.id)
            .field("secret", &"MASKED")
            .finish()
    }
}

const PEM_LABEL: &str = "PRIVATE KEY";

impl NodeKey {
    /// Generates a fresh key pair from the system random generator.
    pub fn generate() -> Result<Self, IdentityError> {
        let rng = SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        Self::from_pkcs8(doc.as_ref().to_vec(), "<generated>")
    }

    fn from_pkcs8(pkcs8: Vec<u8>, path: &str) -> Result<Self, IdentityError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).map_err(|e| {
            IdentityError::BadPrivateKey {
                path: path.to_owned(),
                reason: format!("not an Ed25519 PKCS#8 key ({e})"),
            }
        })?;
        let mut id = [0u8; PUBLIC_KEY_LEN];
        id.copy_from_slice(pair.public_key().as_ref());
        Ok(Self {
            pkcs8,
            id: NodeId(id),
        })
    }

    /// Parses a PEM `PRIVATE KEY` block holding an Ed25519 PKCS#8 key.
    pub fn from_pem(pem: &str, path: &str) -> Result<Self, IdentityError> {
        let bad = |reason: &str| IdentityError::BadPrivateKey {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let begin = format!("-----BEGIN {PEM_LABEL}-----");
        let end = format!("-----END {PEM_LABEL}-----");
        let start = pem
            .find(&begin)
            .ok_or_else(|| bad("no '-----BEGIN PRIVATE KEY-----' block"))?;
        let rest = &pem[start + begin.len()..];
        let stop = rest
            .find(&end)
            .ok_or_else(|| bad("unterminated PEM block"))?;
        let b64: String = rest[..stop].split_whitespace().collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad("PEM body is not base64"))?;
        Self::from_pkcs8(der, path)
    }

    /// Reads a key file written by [`NodeKey::save`] (or `openssl genpkey -algorithm ed25519`).
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
            path: display.clone(),
            source,
        })?;
        Self::from_pem(&text, &display)
    }

    /// The PEM text of the private key.
    pub fn to_pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.pkcs8);
        let mut out = format!("-----BEGIN {PEM_LABEL}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str(&format!("-----END {PEM_LABEL}-----\n"));
        out
    }

    /// Writes the private key (mode 0600 on Unix) and `<path>.pub` with the public key.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        write_private(path, self.to_pem().as_bytes()).map_err(io)?;
        let pub_path = public_key_path(path);
        std::fs::write(&pub_path, format!("{}\n", self.id)).map_err(|source| IdentityError::Io {
            path: pub_path.display().to_string(),
            source,
        })
    }

    /// This key's public identity.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The PKCS#8 DER bytes, for building TLS certificates. Handle with care.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// A 32-byte secret derived from the private key for a named purpose (for example the
    /// QUIC stateless-reset key, which must survive restarts so peers learn of a restart
    /// at once). Derivation: SHA-256(purpose || 0x00 || pkcs8).
    pub fn derive_secret(&self, purpose: &str) -> [u8; 32] {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(purpose.as_bytes());
        h.update([0u8]);
        h.update(&self.pkcs8);
        h.finalize().into()
    }
}

/// Where the public key of a key file is written: `<key path>.pub`.
pub fn public_key_path(key_path: &Path) -> std::path::PathBuf {
    let mut s = key_path.as_os_str().to_owned();
    s.push(".pub");
    s.into()
}

#[cfg(unix)]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

#[cfg(not(unix))]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, data)
}

/// Reads a public key file (one base64url key, surrounding whitespace ignored).
pub fn load_public_key(path: &Path) -> Result<NodeId, IdentityError> {
    let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    })?;
    text.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_through_pem_and_files() {
        let key = NodeKey::generate().expect("generate");
        let parsed = NodeKey::from_pem(&key.to_pem(), "mem").expect("parse");
        assert_eq!(parsed.id(), key.id());
        let dir = std::env::temp_dir().join(format!("skylane-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("node.key");
        key.save(&path).expect("save");
        assert_eq!(NodeKey::load(&path).expect("load").id(), key.id());
        assert_eq!(
            load_public_key(&public_key_path(&path)).expect("pub"),
            key.id()
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn node_id_text_form_round_trips_and_rejects_garbage() {
        let id = NodeKey::generate().expect("generate").id();
        assert_eq!(id.to_string().len(), 43);
        assert_eq!(id.to_string().parse::<NodeId>().expect("parse"), id);
        assert!("not-a-key".parse::<NodeId>().is_err());
        assert!("".parse::<NodeId>().is_err());
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let key = NodeKey::generate().expect("generate");
        let dbg = format!("{key:?}");
        assert!(dbg.contains("MASKED"));
        assert!(!dbg.contains(&key.to_pem()[30..60]));
    }

    #[test]
    fn bad_pem_is_an_error_not_a_panic() {
        assert!(NodeKey::from_pem("garbage", "x").is_err());
        assert!(
            NodeKey::from_pem(
                "-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----",
                "x"
            )
            .is_err()
        );
        assert!(
            NodeKey::from_pem(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
                "x"
            )
            .is_err()
        );
    }
}
