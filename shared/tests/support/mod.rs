//! What the mesh tests share: nodes with real mesh sockets and quinn endpoints on
//! loopback, connected to each other.

// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use skylane_shared::identity::{NodeKey, ShortId};
use skylane_shared::membership::{Member, Members, Role};
use skylane_shared::mesh::{MeshSocket, virtual_addr};
use skylane_shared::{quic, trust};

/// A mesh member with its socket and QUIC endpoint.
pub struct Node {
    pub key: NodeKey,
    pub socket: Arc<MeshSocket>,
    pub endpoint: quinn::Endpoint,
}

impl Node {
    /// The node's short id, as routes name it.
    pub fn id(&self) -> ShortId {
        self.key.id().short()
    }

    /// Its UDP address.
    pub fn udp(&self) -> SocketAddr {
        self.socket.udp_addr().expect("udp addr")
    }

    /// Dials `to` (which must accept tunnels) and completes the handshake.
    pub async fn connect(&self, to: &Node) -> anyhow::Result<quinn::Connection> {
        let connecting = self.endpoint.connect_with(
            quic::client_config(&self.key, to.key.id())?,
            virtual_addr(&to.key.id()),
            trust::MESH_SERVER_NAME,
        )?;
        Ok(connecting.await?)
    }

    /// Sends this node's datagrams for `to` through `relay`.
    pub fn relay_via(&self, relay: &Node, to: &Node) {
        self.socket
            .set_route(to.id(), Some(&[self.id(), relay.id(), to.id()]));
    }
}

/// One node per name on 127.0.0.1, all knowing each other's addresses. The last is a
/// connector (its endpoint accepts tunnels from members); the others are edges.
pub async fn mesh(names: &[&str]) -> anyhow::Result<Vec<Node>> {
    let keys: Vec<NodeKey> = names
        .iter()
        .map(|_| NodeKey::generate())
        .collect::<Result<_, _>>()?;
    let role = |i: usize| {
        if i + 1 == names.len() {
            Role::Connector
        } else {
            Role::Edge
        }
    };
    let members = Members::new(
        keys.iter()
            .zip(names)
            .enumerate()
            .map(|(i, (k, name))| Member {
                transport: skylane_shared::membership::Transport::Quic,
                id: k.id(),
                name: (*name).into(),
                role: role(i),
                address: None,
                region: None,
            })
            .collect(),
    )?;
    let mut nodes = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        let socket = MeshSocket::bind("127.0.0.1:0".parse()?, &key, members.clone()).await?;
        let accept = role(i) == Role::Connector;
        let endpoint = quic::endpoint(socket.clone(), &key, accept, quic::fresh_generation())?;
        nodes.push(Node {
            key,
            socket,
            endpoint,
        });
    }
    for i in 0..nodes.len() {
        for j in 0..nodes.len() {
            if i != j {
                let addr = nodes[j].socket.udp_addr()?;
                nodes[i].socket.set_peer_addr(&nodes[j].key.id(), addr);
            }
        }
    }
    Ok(nodes)
}

/// Accepts one connection on `endpoint` and echoes its first stream, `buf_len` bytes at a
/// time, until the peer finishes it.
pub fn spawn_echo(endpoint: quinn::Endpoint, buf_len: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let echo = async {
            let conn = endpoint.accept().await.context("no incoming")?.await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let mut buf = vec![0u8; buf_len];
            while let Some(n) = recv.read(&mut buf).await? {
                send.write_all(&buf[..n]).await?;
            }
            send.finish()?;
            let _ = conn.closed().await;
            anyhow::Ok(())
        };
        echo.await.expect("echo server");
    })
}

/// Sends one round's message of `len` bytes (its content depends on `round`) on an echo
/// stream and waits for it to come back; appends both to the transcripts.
pub async fn echo_round(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    round: u32,
    len: u32,
    sent: &mut Vec<u8>,
    echoed: &mut Vec<u8>,
) {
    let msg: Vec<u8> = (0..len).map(|i| ((i * 7 + round) % 251) as u8).collect();
    send.write_all(&msg).await.expect("write");
    sent.extend_from_slice(&msg);
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(std::time::Duration::from_secs(5), recv.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("echo stalled at round {round}"))
        .expect("read");
    echoed.extend_from_slice(&got);
}

/// A counter's value.
pub fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}
