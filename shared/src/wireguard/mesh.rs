//! WireGuard between Skylane nodes, over the mesh socket: an edge tunnels to a connector
//! whose member entry says `transport = "wireguard"`.
//!
//! The tunnel's datagrams take the paths routing chooses for that connector, direct or
//! through up to two relays, and move when routing moves them (relays forward them
//! unopened), so a flow inside survives a relay's death as a QUIC stream does. Keys need
//! no configuration: each side's static key is its node key on the Montgomery curve, and
//! it computes the other's from the member list ([`super::keys::public_key_of`]).
//!
//! Inside every tunnel the two ends have fixed addresses ([`EDGE_IP`], [`CONNECTOR_IP`]):
//! each tunnel is a network of its own. The edge opens each flow as a TCP connection to
//! [`FLOW_PORT`] on the connector, with the stream header a QUIC stream carries.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::{DEFAULT_FLOW_BUFFER_KIB, DEFAULT_MAX_FLOWS, Peer};
use super::keys::{SecretKey, public_key_of};
use super::tunnel::WgTunnel;
use crate::identity::ShortId;
use crate::membership::Member;
use crate::mesh::MeshSocket;

/// The edge's address inside a mesh tunnel.
pub const EDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The connector's address inside a mesh tunnel.
pub const CONNECTOR_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// Where the connector accepts flows inside a mesh tunnel.
pub const FLOW_PORT: u16 = 7100;
/// The tunnel MTU: what is left of a 1,500-byte path after IPv6 and UDP headers, the
/// longest relay frame and WireGuard's own overhead (1,280, IPv6's minimum, with room).
pub const MESH_MTU: usize = 1280;
/// Datagrams queued for one tunnel's driver; beyond this they are dropped (TCP inside
/// sends them again).
const TUNNEL_QUEUE: usize = 2048;

/// Why a mesh tunnel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MeshTunnelError {
    /// The member's public key is not a usable curve point.
    #[error("member {0:?} has no usable WireGuard key")]
    BadKey(String),
    /// Another tunnel to the member exists.
    #[error("a tunnel to {0:?} exists already")]
    Duplicate(String),
}

/// The node's WireGuard tunnels over the mesh socket, and the task handing each the
/// datagrams its member sent.
#[derive(Debug)]
pub struct MeshWireguard {
    socket: Arc<MeshSocket>,
    key: SecretKey,
    queues: Mutex<HashMap<ShortId, mpsc::Sender<Vec<u8>>>>,
    stop: CancellationToken,
}

impl MeshWireguard {
    /// Takes the socket's WireGuard queue and starts handing its datagrams out; `None` if
    /// something took the queue already.
    pub fn start(
        socket: Arc<MeshSocket>,
        key: SecretKey,
        stop: CancellationToken,
    ) -> Option<Arc<Self>> {
        let mut inbound = socket.take_wireguard()?;
        let this = Arc::new(Self {
            socket,
            key,
            queues: Mutex::new(HashMap::new()),
            stop: stop.clone(),
        });
        let router = this.clone();
        tokio::spawn(async move {
            loop {
                let datagram = tokio::select! {
                    _ = stop.cancelled() => return,
                    d = inbound.recv() => match d {
                        Some(d) => d,
                        None => return,
                    },
                };
                let queue = router
                    .queues
                    .lock()
                    .ok()
                    .and_then(|q| q.get(&datagram.from).cloned());
                let delivered = queue.is_some_and(|q| q.try_send(datagram.data).is_ok());
                if !delivered {
                    metrics::counter!("skylane_wireguard_dropped_total", "reason" => "no_tunnel_or_full")
                        .increment(1);
                }
            }
        });
        Some(this)
    }

    /// The edge's tunnel to `connector`: it starts the handshake, and opens flows.
    pub fn to_connector(&self, connector: &Member) -> Result<Arc<WgTunnel>, MeshTunnelError> {
        self.tunnel(connector, EDGE_IP, CONNECTOR_IP, None)
    }

    /// The connector's tunnel from `edge`: it answers the handshake, and accepts flows on
    /// [`FLOW_PORT`].
    pub fn from_edge(&self, edge: &Member) -> Result<Arc<WgTunnel>, MeshTunnelError> {
        self.tunnel(edge, CONNECTOR_IP, EDGE_IP, Some(FLOW_PORT))
    }

    fn tunnel(
        &self,
        member: &Member,
        local: Ipv4Addr,
        remote: Ipv4Addr,
        listen: Option<u16>,
    ) -> Result<Arc<WgTunnel>, MeshTunnelError> {
        let public_key = public_key_of(&member.id)
            .ok_or_else(|| MeshTunnelError::BadKey(member.name.clone()))?;
        let peer = Peer {
            name: member.name.clone(),
            public_key,
            endpoint: format!("mesh:{}", member.name),
            address: IpAddr::V4(local),
            allowed_ips: vec![ipnet::IpNet::from(IpAddr::V4(remote))],
            preshared_key: None,
            keepalive: Some(Duration::from_secs(25)),
            listen_port: None,
            flow_buffer_bytes: DEFAULT_FLOW_BUFFER_KIB * 1024,
            max_flows: DEFAULT_MAX_FLOWS,
            mtu: MESH_MTU,
            relays: Vec::new(),
            direct: true,
        };
        let (tx, rx) = mpsc::channel(TUNNEL_QUEUE);
        {
            let Ok(mut queues) = self.queues.lock() else {
                return Err(MeshTunnelError::Duplicate(member.name.clone()));
            };
            if queues.contains_key(&member.id.short()) {
                return Err(MeshTunnelError::Duplicate(member.name.clone()));
            }
            queues.insert(member.id.short(), tx);
        }
        Ok(WgTunnel::start_mesh(
            peer,
            &self.key,
            self.socket.clone(),
            member.id.short(),
            rx,
            listen,
            self.stop.clone(),
        ))
    }
}

/// Where an edge opens flows inside a mesh tunnel.
pub fn connector_flow_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(CONNECTOR_IP), FLOW_PORT)
}
