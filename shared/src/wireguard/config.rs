//! A WireGuard peer as an operator writes it: the fields of a `[Peer]` section of a
//! `wg-quick` file (public key, endpoint, allowed IPs, preshared key, keepalive), plus this
//! side's address inside the tunnel (`[Interface] Address`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::keys::{self, SecretKey};

/// Default per-flow TCP buffer each way, KiB: the largest window one flow gets. 128 KiB
/// moves about 5 MB/s per flow across a 25 ms path and 0.5 MB/s across 250 ms; a bigger
/// buffer is faster on long paths and costs that much memory per open flow.
pub const DEFAULT_FLOW_BUFFER_KIB: usize = 128;
/// Default flows one tunnel carries at most.
pub const DEFAULT_MAX_FLOWS: usize = 4096;
/// WireGuard's usual MTU (1500 minus its IPv6 + UDP + WireGuard overhead).
pub const DEFAULT_MTU: usize = 1420;

/// One `[[wireguard.peers]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    /// How this peer is named in logs, metrics and other config entries.
    pub name: String,
    /// The peer's public key, base64 as `wg pubkey` prints it.
    pub public_key: String,
    /// Where the peer listens: `host:port` (a name is resolved again while the tunnel is
    /// down, as `wg`'s re-resolve script does).
    pub endpoint: String,
    /// This side's address inside the tunnel (`[Interface] Address` of a wg-quick file),
    /// without a prefix length or with `/32` (`/128`).
    pub address: String,
    /// Addresses that may be reached through the peer, and that packets from it may come
    /// from (WireGuard's cryptokey routing), as CIDRs.
    pub allowed_ips: Vec<String>,
    /// A file holding the base64 preshared key, if the peer uses one.
    #[serde(default)]
    pub preshared_key_file: Option<PathBuf>,
    /// Seconds between keepalives when nothing else is sent (0: none). Default 25, which
    /// keeps NAT and firewall state open.
    #[serde(default = "default_keepalive")]
    pub persistent_keepalive_s: u16,
    /// Local UDP port to send from (default: any free port).
    #[serde(default)]
    pub listen_port: Option<u16>,
    /// Per-flow TCP buffer each way, KiB (see [`DEFAULT_FLOW_BUFFER_KIB`]).
    #[serde(default = "default_buffer")]
    pub flow_buffer_kib: usize,
    /// Flows this tunnel carries at most.
    #[serde(default = "default_max_flows")]
    pub max_flows: usize,
    /// MTU of the tunnel, bytes.
    #[serde(default = "default_mtu")]
    pub mtu: usize,
    /// Edges (member names) that may carry this tunnel when this edge's own way to the
    /// endpoint stops answering, tried in this order. Each must name the same endpoint in
    /// its own config: an edge relays only to endpoints it knows. Default: none.
    #[serde(default)]
    pub relays: Vec<String>,
    /// Whether this edge may send to the endpoint itself. `false` (with `relays`) always goes
    /// through a relay: for an endpoint that accepts only the relays' addresses.
    #[serde(default = "default_true")]
    pub direct: bool,
}

fn default_true() -> bool {
    true
}

fn default_keepalive() -> u16 {
    25
}
fn default_buffer() -> usize {
    DEFAULT_FLOW_BUFFER_KIB
}
fn default_max_flows() -> usize {
    DEFAULT_MAX_FLOWS
}
fn default_mtu() -> usize {
    DEFAULT_MTU
}

/// A validated peer.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its name.
    pub name: String,
    /// Its public key.
    pub public_key: [u8; 32],
    /// Its endpoint, `host:port`.
    pub endpoint: String,
    /// This side's address inside the tunnel.
    pub address: IpAddr,
    /// What may be reached through it and may come from it.
    pub allowed_ips: Vec<IpNet>,
    /// The preshared key, if any.
    pub preshared_key: Option<SecretKey>,
    /// Keepalive interval, if any.
    pub keepalive: Option<Duration>,
    /// Local UDP port, if fixed.
    pub listen_port: Option<u16>,
    /// Per-flow TCP buffer each way, bytes.
    pub flow_buffer_bytes: usize,
    /// Flows at most.
    pub max_flows: usize,
    /// MTU, bytes.
    pub mtu: usize,
    /// Edges that may carry the tunnel, in order (member names, checked by the caller).
    pub relays: Vec<String>,
    /// Whether this edge may send to the endpoint itself.
    pub direct: bool,
}

impl Peer {
    /// Whether `ip` may be reached through this peer (and may send from it).
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allowed_ips.iter().any(|n| n.contains(&ip))
    }
}

/// A peer entry that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct PeerError {
    /// The config key at fault, e.g. `wireguard.peers[0].public_key`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl PeerFile {
    /// Checks every field; `base` resolves relative file paths; `at` is this entry's key
    /// (`wireguard.peers[0]`) for messages.
    pub fn validate(&self, base: &Path, at: &str) -> Result<Peer, PeerError> {
        let err = |field: &str, message: String| PeerError {
            key: format!("{at}.{field}"),
            message,
        };
        if self.name.is_empty() {
            return Err(err("name", "must not be empty".into()));
        }
        let public_key =
            keys::parse_key(&self.public_key).map_err(|e| err("public_key", e.to_string()))?;
        crate::resolve::split_host_port(&self.endpoint)
            .map_err(|e| err("endpoint", e.to_string()))?;
        let address = self
            .address
            .strip_suffix("/32")
            .or_else(|| self.address.strip_suffix("/128"))
            .unwrap_or(&self.address)
            .parse::<IpAddr>()
            .map_err(|e| {
                err(
                    "address",
                    format!("{:?}: {e} (one address, as 10.0.0.2)", self.address),
                )
            })?;
        if self.allowed_ips.is_empty() {
            return Err(err("allowed_ips", "name at least one network".into()));
        }
        let mut allowed_ips = Vec::new();
        for (i, a) in self.allowed_ips.iter().enumerate() {
            let net = a
                .parse::<IpNet>()
                .or_else(|_| a.parse::<IpAddr>().map(IpNet::from))
                .map_err(|e| err(&format!("allowed_ips[{i}]"), format!("{a:?}: {e}")))?;
            allowed_ips.push(net);
        }
        let preshared_key = match &self.preshared_key_file {
            None => None,
            Some(p) => {
                let path = base.join(p);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| err("preshared_key_file", format!("{}: {e}", path.display())))?;
                Some(SecretKey::from_bytes(
                    keys::parse_key(&text).map_err(|e| err("preshared_key_file", e.to_string()))?,
                ))
            }
        };
        if !(4..=1024 * 1024).contains(&self.flow_buffer_kib) {
            return Err(err(
                "flow_buffer_kib",
                "must be between 4 and 1048576".into(),
            ));
        }
        if self.max_flows == 0 || self.max_flows > 16_384 {
            return Err(err(
                "max_flows",
                "must be between 1 and 16384 (the local port range)".into(),
            ));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(err("mtu", "must be between 576 and 9000".into()));
        }
        if !self.direct && self.relays.is_empty() {
            return Err(err(
                "direct",
                "false needs `relays`: with neither, the endpoint cannot be reached".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.relays.iter().enumerate() {
            if !seen.insert(r) {
                return Err(err(
                    &format!("relays[{i}]"),
                    format!("{r:?} is listed twice"),
                ));
            }
        }
        Ok(Peer {
            name: self.name.clone(),
            public_key,
            endpoint: self.endpoint.clone(),
            address,
            allowed_ips,
            preshared_key,
            keepalive: (self.persistent_keepalive_s > 0)
                .then(|| Duration::from_secs(u64::from(self.persistent_keepalive_s))),
            listen_port: self.listen_port,
            flow_buffer_bytes: self.flow_buffer_kib * 1024,
            max_flows: self.max_flows,
            mtu: self.mtu,
            relays: self.relays.clone(),
            direct: self.direct,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> PeerFile {
        toml::from_str(
            r#"
            name = "origin-vpn"
            public_key = "mbrzdPOI8B5f/n67FjTiOJsrCqVRvwu2NGk4u1tMCUM="
            endpoint = "vpn.example.net:51820"
            address = "10.77.0.2/32"
            allowed_ips = ["10.77.0.0/24", "192.168.5.7"]
            "#,
        )
        .expect("toml")
    }

    #[test]
    fn a_peer_validates_with_defaults() {
        let p = file()
            .validate(Path::new("."), "wireguard.peers[0]")
            .expect("valid");
        assert_eq!(p.address, "10.77.0.2".parse::<IpAddr>().expect("ip"));
        assert!(p.allows("10.77.0.1".parse().expect("ip")));
        assert!(p.allows("192.168.5.7".parse().expect("ip")));
        assert!(!p.allows("192.168.5.8".parse().expect("ip")));
        assert_eq!(p.keepalive, Some(Duration::from_secs(25)));
        assert_eq!(p.flow_buffer_bytes, 128 * 1024);
    }

    #[test]
    fn bad_fields_name_their_key() {
        type Edit = fn(&mut PeerFile);
        let cases: [(&str, Edit); 6] = [
            ("public_key", |f| f.public_key = "short".into()),
            ("endpoint", |f| f.endpoint = "no-port".into()),
            ("address", |f| f.address = "10.77.0.0/24".into()),
            ("allowed_ips[1]", |f| {
                f.allowed_ips[1] = "10.0.0.0/33".into()
            }),
            ("preshared_key_file", |f| {
                f.preshared_key_file = Some("/nonexistent/psk".into())
            }),
            ("max_flows", |f| f.max_flows = 0),
        ];
        for (key, edit) in cases {
            let mut f = file();
            edit(&mut f);
            let e = f
                .validate(Path::new("."), "wireguard.peers[0]")
                .expect_err(key);
            assert_eq!(e.key, format!("wireguard.peers[0].{key}"), "{e}");
        }
        let unknown = toml::from_str::<PeerFile>("name = \"x\"\nendpointt = \"a:1\"");
        assert!(unknown.is_err(), "unknown keys are refused");
    }
}
