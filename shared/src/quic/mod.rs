//! QUIC endpoints over the mesh socket, with the transport settings tunnels need.

mod batching;

use batching::BatchingRuntime;

use std::sync::Arc;
use std::time::Duration;

use crate::identity::{NodeId, NodeKey};
use crate::mesh::{MeshSocket, frame};
use crate::trust::{self, TrustError};

/// How often an idle tunnel sends a keep-alive. Short, so a restarted peer (which answers
/// with a stateless reset) or a dead path is noticed quickly even when no user is active.
pub const KEEP_ALIVE: Duration = Duration::from_millis(500);
/// How long a tunnel may hear nothing before it is closed. Longer than a path failover
/// takes, so a path change never kills the connection above it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent streams a peer may open: one per user request, websocket or TCP connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 10_000;

/// The largest QUIC packet path MTU discovery tries: an Ethernet MTU minus IPv6 and UDP
/// headers minus the largest mesh frame overhead (1500 − 40 − 8 − 76 = 1376).
pub const MTU_UPPER_BOUND: u16 = (1500 - 40 - 8 - frame::MAX_OVERHEAD) as u16;

/// Transport settings of a tunnel end. `accepts_streams`: whether the peer may open
/// streams to this end (the connector's side: edges open one per flow). The dialling side
/// (an edge) accepts none: quinn keeps state for every stream a peer may open, about 70
/// bytes each, so allowing [`MAX_CONCURRENT_STREAMS`] that never come would cost each
/// pooled connection 700 KB for nothing.
pub fn transport_config(accepts_streams: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT)
            .unwrap_or(quinn::VarInt::from_u32(10_000).into()),
    ));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(if accepts_streams {
        MAX_CONCURRENT_STREAMS
    } else {
        0
    }));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    // Windows sized for a long fat path (250 ms × ~400 Mbit/s), so one far-away tunnel
    // is not capped by flow control.
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    // Start at QUIC's smallest packet size: the mesh frame header (9 bytes direct, up to
    // 76 on a relayed path) rides in front, so a relayed datagram needs a path MTU of about
    // 1330. Then probe upwards (PLPMTUD; the mesh socket sets don't-fragment, so a probe
    // too big is lost, not fragmented) to at most what leaves room for the largest mesh
    // header on a 1500-byte path, so a route change to a relay never outgrows a path that
    // carried the direct packets. A smaller hop on the new path is a black hole quinn
    // detects, falling back to 1200.
    t.initial_mtu(1200);
    t.min_mtu(1200);
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtud));
    // Datagrams are only used as nudges after a path change (see `nudge`); nobody reads
    // them, so keep the buffer that holds them small.
    t.datagram_receive_buffer_size(Some(NUDGE_BUFFER));
    t
}

/// Receive buffer for QUIC datagrams, which carry only nudges.
const NUDGE_BUFFER: usize = 4096;

/// Makes `conn` send an ack-eliciting packet now. After the mesh moved the connection to a
/// new path, its answer resets QUIC's backed-off probe timer and lets loss detection resend
/// what the dead path swallowed at once, instead of after the next (possibly seconds-long)
/// probe timeout.
pub fn nudge(conn: &quinn::Connection) {
    if conn.max_datagram_size().is_some() {
        let _ = conn.send_datagram(bytes::Bytes::from_static(b"\0"));
    }
}

/// A live connection's QUIC path, from quinn's statistics, for status pages: what to look
/// at when a tunnel is slower than its RTT explains.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PathStats {
    /// Congestion window.
    pub cwnd_bytes: u64,
    /// Times the congestion controller reduced the window.
    pub congestion_events: u64,
    /// Packets sent on the path.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Current packet size (grows from 1200 as path MTU discovery succeeds).
    pub mtu_bytes: u16,
}

impl PathStats {
    /// The path statistics of `conn` now.
    pub fn of(conn: &quinn::Connection) -> Self {
        let path = conn.stats().path;
        Self {
            cwnd_bytes: path.cwnd,
            congestion_events: path.congestion_events,
            sent_packets: path.sent_packets,
            lost_packets: path.lost_packets,
            mtu_bytes: path.current_mtu,
        }
    }
}

/// Length of every connection ID the mesh's endpoints issue: the generation byte and
/// quinn's keyed 8-byte ID.
pub const CID_LEN: usize = 9;

/// Connection IDs that start with a process generation byte, then quinn's keyed ID (which
/// lets a restarted node recognise its old IDs and answer them with a stateless reset).
struct GenerationCids {
    generation: u8,
    inner: quinn_proto::HashedConnectionIdGenerator,
}

impl quinn_proto::ConnectionIdGenerator for GenerationCids {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        let inner = self.inner.generate_cid();
        let mut bytes = [0u8; CID_LEN];
        bytes[0] = self.generation;
        bytes[1..].copy_from_slice(&inner[..CID_LEN - 1]);
        quinn_proto::ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() != CID_LEN {
            return Err(quinn_proto::InvalidCid);
        }
        self.inner
            .validate(&quinn_proto::ConnectionId::new(&cid[1..]))
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        self.inner.cid_lifetime()
    }
}

/// A generation byte for a process that takes over no other: random, so two runs of a node
/// are unlikely to share one.
pub fn fresh_generation() -> u8 {
    rand::random()
}

/// Errors creating an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// TLS material could not be built.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// quinn refused the socket or config.
    #[error("could not start the QUIC endpoint: {0}")]
    Quic(String),
}

/// A QUIC endpoint over `socket`. With `accept_from`, it also accepts tunnels from those
/// members. The stateless-reset key is derived from the node key, so after a restart this
/// node tells peers at once that their old connection is gone.
///
/// `generation` is the first byte of every connection ID the endpoint issues: a process
/// that takes over a running one's socket ([`crate::handover`]) uses another, so the
/// packets of the old process's connections can be told apart and passed back to it.
pub fn endpoint(
    socket: Arc<MeshSocket>,
    key: &NodeKey,
    accept_members: bool,
    generation: u8,
) -> Result<quinn::Endpoint, EndpointError> {
    let reset_key = key.derive_secret("skylane quic stateless reset");
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_key);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(hmac));
    // Connection IDs are validated with a keyed hash; a key that survives restarts lets a
    // restarted node recognise its old IDs and answer them with a stateless reset (a random
    // key would make it drop them silently and leave peers waiting for the idle timeout).
    let cid = key.derive_secret("skylane quic connection id");
    let cid_key = u64::from_be_bytes([
        cid[0], cid[1], cid[2], cid[3], cid[4], cid[5], cid[6], cid[7],
    ]);
    endpoint_config.cid_generator(move || {
        Box::new(GenerationCids {
            generation,
            inner: quinn_proto::HashedConnectionIdGenerator::from_key(cid_key),
        }) as Box<dyn quinn_proto::ConnectionIdGenerator>
    });
    let server_config = match accept_members {
        true => {
            // Whoever the socket's member list names now: a reload may change it.
            let members = socket.clone();
            let tls = trust::tunnel_server_tls(
                key,
                Arc::new(move |id| members.members().get(id).is_some()),
            )?;
            let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
                .map_err(|e| EndpointError::Quic(e.to_string()))?;
            let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
            sc.transport_config(Arc::new(transport_config(true)));
            Some(sc)
        }
        false => None,
    };
    quinn::Endpoint::new_with_abstract_socket(
        endpoint_config,
        server_config,
        socket,
        Arc::new(BatchingRuntime),
    )
    .map_err(|e| EndpointError::Quic(e.to_string()))
}

/// Client settings for dialling `peer`, which must present exactly that key.
pub fn client_config(key: &NodeKey, peer: NodeId) -> Result<quinn::ClientConfig, EndpointError> {
    let tls = trust::tunnel_client_tls(key, peer)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    cc.transport_config(Arc::new(transport_config(false)));
    Ok(cc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Member, Role};
    use crate::mesh::virtual_addr;

    fn member(key: &NodeKey, name: &str, role: Role) -> Member {
        Member {
            transport: crate::membership::Transport::Quic,
            id: key.id(),
            name: name.into(),
            role,
            address: None,
            region: None,
        }
    }

    /// Two real quinn endpoints over mesh sockets on loopback: a member connects and
    /// exchanges data; a stranger is refused.
    #[tokio::test]
    async fn members_connect_and_strangers_are_refused() {
        let server_key = NodeKey::generate().expect("key");
        let client_key = NodeKey::generate().expect("key");
        let stranger_key = NodeKey::generate().expect("key");
        let members = crate::membership::Members::new(vec![
            member(&server_key, "conn", Role::Connector),
            member(&client_key, "edge", Role::Edge),
        ])
        .expect("members");
        let local = "127.0.0.1:0".parse().expect("addr");
        let server_sock = MeshSocket::bind(local, &server_key, members.clone())
            .await
            .expect("bind");
        let server = endpoint(server_sock.clone(), &server_key, true, 1).expect("server");
        let server_udp = server_sock.udp_addr().expect("addr");

        let client_sock = MeshSocket::bind(local, &client_key, members.clone())
            .await
            .expect("bind");
        client_sock.set_peer_addr(&server_key.id(), server_udp);
        // A node learns a member's address only from authenticated frames (SWIM and
        // routing, which this test does not run), so the server is told it.
        server_sock.set_peer_addr(&client_key.id(), client_sock.udp_addr().expect("addr"));
        let client = endpoint(client_sock, &client_key, false, 2).expect("client");

        let accept = tokio::spawn(async move {
            let conn = server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("conn");
            let peer = trust::peer_node_id(&conn);
            let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
            let data = recv.read_to_end(1 << 20).await.expect("read");
            send.write_all(&data).await.expect("write");
            send.finish().expect("finish");
            let _ = conn.closed().await;
            peer
        });
        let conn = client
            .connect_with(
                client_config(&client_key, server_key.id()).expect("cfg"),
                virtual_addr(&server_key.id()),
                trust::MESH_SERVER_NAME,
            )
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.write_all(&vec![9u8; 100_000]).await.expect("write");
        send.finish().expect("finish");
        let back = recv.read_to_end(1 << 20).await.expect("read");
        assert_eq!(back.len(), 100_000);
        conn.close(0u32.into(), b"done");
        assert_eq!(accept.await.expect("join"), Some(client_key.id()));

        // A stranger: its frames are dropped before QUIC even sees them.
        let stranger_sock = MeshSocket::bind(local, &stranger_key, members)
            .await
            .expect("bind");
        stranger_sock.set_peer_addr(&server_key.id(), server_udp);
        let stranger = endpoint(stranger_sock, &stranger_key, false, 3).expect("stranger");
        let attempt = stranger
            .connect_with(
                client_config(&stranger_key, server_key.id()).expect("cfg"),
                virtual_addr(&server_key.id()),
                trust::MESH_SERVER_NAME,
            )
            .expect("connect");
        let result = tokio::time::timeout(Duration::from_secs(2), attempt).await;
        assert!(!matches!(result, Ok(Ok(_))), "a stranger must not connect");
        assert!(
            server_sock
                .counters()
                .non_member
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
    }
}
