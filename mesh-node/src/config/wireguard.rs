//! The `[wireguard]` section: stock WireGuard endpoints this edge tunnels through, and the
//! Skylane connectors behind them.
//!
//! ```toml
//! [[wireguard.peers]]                # as a wg-quick [Peer], plus this side's Address
//! name = "origin-vpn"
//! public_key = "…"                   # `wg pubkey` of the endpoint
//! endpoint = "vpn.example.net:51820"
//! address = "10.77.0.2"              # this edge inside the tunnel
//! allowed_ips = ["10.77.0.0/24"]
//!
//! [[wireguard.connectors]]           # a connector listening on its WireGuard address
//! name = "fra-wg"
//! peer = "origin-vpn"
//! address = "10.77.0.1:7100"         # its `[wireguard] listen`
//!
//! [wireguard.services.web]           # or no connector: the origin itself, behind the
//! peer = "origin-vpn"                # endpoint; the keys of a connector's [services.web]
//! servers = ["10.77.0.1:8080"]
//! ```
//!
//! A service under `[wireguard.services]` is served by this edge itself: it forwards to
//! the servers through the tunnel as a connector would (pooled keep-alive connections,
//! health checks, failover across servers), and routes naming it never use a connector.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use skylane_shared::config::{ConfigError, Validator};
use skylane_shared::identity::NodeKey;
use skylane_shared::wireguard::{Peer, PeerFile, SecretKey, keys};

/// `[wireguard]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireguardSection {
    /// A file with this edge's WireGuard private key, base64 (`wg genkey`). Default: a key
    /// derived from the node key (`mesh-node wireguard-key` prints its public half).
    pub private_key_file: Option<PathBuf>,
    /// The WireGuard endpoints.
    #[serde(default)]
    pub peers: Vec<PeerFile>,
    /// Connectors reached through them.
    #[serde(default)]
    pub connectors: Vec<ConnectorSection>,
    /// Origin services reached through them directly: each a connector's service section
    /// plus `peer`.
    #[serde(default)]
    pub services: std::collections::BTreeMap<String, toml::Table>,
}

/// `[[wireguard.connectors]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorSection {
    /// Its name in logs, metrics and the status page.
    pub name: String,
    /// The `[[wireguard.peers]]` entry it is behind.
    pub peer: String,
    /// Its `[wireguard] listen` address, inside the tunnel.
    pub address: SocketAddr,
}

/// A validated `[wireguard]` section.
#[derive(Debug, Clone)]
pub struct Wireguard {
    /// This edge's static key.
    pub key: SecretKey,
    /// The endpoints.
    pub peers: Vec<Peer>,
    /// The connectors behind them.
    pub connectors: Vec<WgConnector>,
    /// Origin services behind them, served by this edge.
    pub services: Vec<WgService>,
}

/// An origin service behind a WireGuard endpoint.
#[derive(Debug, Clone)]
pub struct WgService {
    /// The peer its servers are behind.
    pub peer: String,
    /// The service, validated as a connector's.
    pub service: origin_connector::config::Service,
}

/// A connector behind a WireGuard endpoint.
#[derive(Debug, Clone)]
pub struct WgConnector {
    /// Its name.
    pub name: String,
    /// The peer it is behind.
    pub peer: String,
    /// Its address inside the tunnel.
    pub address: SocketAddr,
}

/// Checks the section; `node` gives the derived key when no key file is named,
/// `mesh_connectors` are names already taken by mesh connectors, and `other_edges` the
/// edges that may relay a peer's tunnel.
pub fn validate(
    v: &Validator,
    section: Option<&WireguardSection>,
    node: &NodeKey,
    mesh_connectors: &[String],
    other_edges: &[String],
) -> Result<Option<Wireguard>, ConfigError> {
    let Some(s) = section else {
        return Ok(None);
    };
    let key = match &s.private_key_file {
        None => SecretKey::derived_from(node)
            .map_err(|e| v.invalid("wireguard.private_key_file", format!("none set, and {e}")))?,
        Some(p) => {
            let path = v.relative(p);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                v.invalid(
                    "wireguard.private_key_file",
                    format!("{}: {e}", path.display()),
                )
            })?;
            SecretKey::from_bytes(
                keys::parse_key(&text)
                    .map_err(|e| v.invalid("wireguard.private_key_file", e.to_string()))?,
            )
        }
    };
    let mut peers = Vec::new();
    let mut names = HashSet::new();
    for (i, p) in s.peers.iter().enumerate() {
        let at = format!("wireguard.peers[{i}]");
        let peer = p
            .validate(&v.relative(std::path::Path::new(".")), &at)
            .map_err(|e| v.invalid(e.key, e.message))?;
        if !names.insert(peer.name.clone()) {
            return Err(v.invalid(
                format!("{at}.name"),
                format!("{:?} is used twice", peer.name),
            ));
        }
        for (j, relay) in peer.relays.iter().enumerate() {
            if !other_edges.contains(relay) {
                return Err(v.invalid(
                    format!("{at}.relays[{j}]"),
                    format!("{relay:?} is not another edge of the mesh"),
                ));
            }
        }
        peers.push(peer);
    }
    let mut connectors = Vec::new();
    let mut taken: HashSet<String> = mesh_connectors.iter().cloned().collect();
    for (i, c) in s.connectors.iter().enumerate() {
        let at = |k: &str| format!("wireguard.connectors[{i}].{k}");
        let Some(peer) = peers.iter().find(|p| p.name == c.peer) else {
            return Err(v.invalid(
                at("peer"),
                format!("no [[wireguard.peers]] is named {:?}", c.peer),
            ));
        };
        if !peer.allows(c.address.ip()) {
            return Err(v.invalid(
                at("address"),
                format!(
                    "{} is not in the allowed_ips of peer {:?}",
                    c.address.ip(),
                    peer.name
                ),
            ));
        }
        if c.name.is_empty() || !taken.insert(c.name.clone()) {
            return Err(v.invalid(
                at("name"),
                format!("{:?} is empty or already a connector's name", c.name),
            ));
        }
        connectors.push(WgConnector {
            name: c.name.clone(),
            peer: c.peer.clone(),
            address: c.address,
        });
    }
    let mut services = Vec::new();
    for (name, table) in &s.services {
        let at = format!("wireguard.services.{name}");
        let mut table = table.clone();
        let peer = match table.remove("peer") {
            Some(toml::Value::String(p)) => p,
            Some(_) => return Err(v.invalid(format!("{at}.peer"), "must be a string")),
            None => {
                return Err(v.invalid(
                    format!("{at}.peer"),
                    "name the [[wireguard.peers]] entry the servers are behind",
                ));
            }
        };
        let Some(p) = peers.iter().find(|p| p.name == peer) else {
            return Err(v.invalid(
                format!("{at}.peer"),
                format!("no [[wireguard.peers]] is named {peer:?}"),
            ));
        };
        let section: origin_connector::config::ServiceSection = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| v.invalid(at.clone(), e.message().to_owned()))?;
        let service = origin_connector::config::validate_service(v, &at, name, section)?;
        for (i, server) in service.servers.iter().enumerate() {
            let inside = server.parse::<SocketAddr>().is_ok_and(|a| p.allows(a.ip()));
            if !inside {
                return Err(v.invalid(
                    format!("{at}.servers[{i}]"),
                    format!("{server:?}: must be an address (ip:port) in the allowed_ips of peer {peer:?}"),
                ));
            }
        }
        services.push(WgService { peer, service });
    }
    Ok(Some(Wireguard {
        key,
        peers,
        connectors,
        services,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = r#"
        [[peers]]
        name = "origin-vpn"
        public_key = "mbrzdPOI8B5f/n67FjTiOJsrCqVRvwu2NGk4u1tMCUM="
        endpoint = "vpn.example.net:51820"
        address = "10.77.0.2"
        allowed_ips = ["10.77.0.0/24"]
    "#;

    fn check(extra: &str) -> Result<Option<Wireguard>, ConfigError> {
        let section: WireguardSection = toml::from_str(&format!("{PEER}\n{extra}")).expect("toml");
        let node = NodeKey::generate().expect("key");
        validate(
            &Validator::new(std::path::Path::new("edge.toml")),
            Some(&section),
            &node,
            &["fra-connector".into()],
            &["edge-b".into()],
        )
    }

    fn key_of(r: Result<Option<Wireguard>, ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn both_modes_validate() {
        let wg = check(
            r#"
            [[connectors]]
            name = "fra-wg"
            peer = "origin-vpn"
            address = "10.77.0.1:7100"

            [services.web]
            peer = "origin-vpn"
            servers = ["10.77.0.1:8080"]
            [services.web.health_check]
            path = "/health"
            "#,
        )
        .expect("valid")
        .expect("section");
        assert_eq!(wg.connectors[0].address.port(), 7100);
        assert_eq!(wg.services[0].peer, "origin-vpn");
        assert_eq!(wg.services[0].service.name, "web");
        assert!(wg.services[0].service.health.is_some());
        assert!(wg.peers[0].direct && wg.peers[0].relays.is_empty());
        // Right after the peer's keys, `relays` and `direct` belong to it.
        let relayed = check("relays = [\"edge-b\"]\ndirect = false")
            .expect("valid")
            .expect("section");
        assert_eq!(relayed.peers[0].relays, vec!["edge-b".to_owned()]);
        assert!(!relayed.peers[0].direct);
    }

    #[test]
    fn mistakes_name_their_key() {
        let cases = [
            ("relays = [\"nobody\"]", "wireguard.peers[0].relays[0]"),
            (
                "relays = [\"edge-b\", \"edge-b\"]",
                "wireguard.peers[0].relays[1]",
            ),
            ("direct = false", "wireguard.peers[0].direct"),
            (
                "[[connectors]]\nname = \"x\"\npeer = \"nobody\"\naddress = \"10.77.0.1:1\"",
                "wireguard.connectors[0].peer",
            ),
            (
                "[[connectors]]\nname = \"x\"\npeer = \"origin-vpn\"\naddress = \"10.78.0.1:1\"",
                "wireguard.connectors[0].address",
            ),
            (
                "[[connectors]]\nname = \"fra-connector\"\npeer = \"origin-vpn\"\naddress = \"10.77.0.1:1\"",
                "wireguard.connectors[0].name",
            ),
            (
                "[services.web]\nservers = [\"10.77.0.1:80\"]",
                "wireguard.services.web.peer",
            ),
            (
                "[services.web]\npeer = \"origin-vpn\"\nservers = [\"192.168.1.1:80\"]",
                "wireguard.services.web.servers[0]",
            ),
            (
                "[services.web]\npeer = \"origin-vpn\"\nservers = [\"10.77.0.1:80\"]\nconnect_timeout_ms = 0",
                "wireguard.services.web.connect_timeout_ms",
            ),
            (
                "[services.web]\npeer = \"origin-vpn\"\nservers = [\"10.77.0.1:80\"]\nserverz = 1",
                "wireguard.services.web",
            ),
        ];
        for (extra, key) in cases {
            assert_eq!(key_of(check(extra)), key, "{extra}");
        }
    }

    #[test]
    fn the_key_is_derived_unless_a_file_names_one() {
        let dir = std::env::temp_dir().join(format!("skylane-wgkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("wg.key"),
            "UOlrBEYUnSKJ0OWl7rE+AZhEIvBTnipObAegAzcHFXU=\n",
        )
        .expect("write");
        let section: WireguardSection =
            toml::from_str(&format!("private_key_file = \"wg.key\"\n{PEER}")).expect("toml");
        let node = NodeKey::generate().expect("key");
        let v = Validator::new(&dir.join("edge.toml"));
        let wg = validate(&v, Some(&section), &node, &[], &[])
            .expect("valid")
            .expect("section");
        assert_eq!(
            keys::format_key(&wg.key.public_key()),
            "mbrzdPOI8B5f/n67FjTiOJsrCqVRvwu2NGk4u1tMCUM="
        );
        let derived = check("").expect("valid").expect("section");
        assert_ne!(derived.key.public_key(), wg.key.public_key());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
