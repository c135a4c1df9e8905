//! Tunnels to stock WireGuard endpoints carried through other edges.
//!
//! An edge whose own way to a stock endpoint fails (or is not allowed: an endpoint that
//! accepts only some addresses) sends the tunnel's datagrams to another edge over the mesh
//! (`TO_ENDPOINT` frames, authenticated hop by hop). That edge sends each one to the
//! endpoint from a UDP socket it keeps for that member and endpoint, and brings back what
//! the endpoint answers there (`FROM_ENDPOINT`). The endpoint sees a peer that roamed, as
//! after a NAT rebinding, and answers at the new address: nothing changes on its side.
//!
//! [`EndpointRelay`] is both halves on one node: it carries other members' tunnels, and it
//! hands this node's tunnels what their relays brought back.
//!
//! What a relay sends, and to whom, is bounded: only to endpoints its own config names
//! (so no member can make it send UDP anywhere else), only datagrams shaped like
//! WireGuard's, at most [`MAX_CARRIED`] member–endpoint sockets at once, each closed after
//! [`CARRIED_IDLE`] without traffic. Answers are taken only from the endpoint's address.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::path::unspecified_like;
use crate::identity::ShortId;
use crate::mesh::{BodyType, EndpointDatagram, MeshSocket};

/// Member–endpoint sockets a relay keeps at once.
pub const MAX_CARRIED: usize = 64;
/// A carried tunnel's socket is closed after this long without a datagram either way
/// (WireGuard's session lifetime: a live tunnel rekeys well before).
pub const CARRIED_IDLE: Duration = Duration::from_secs(180);
/// Datagrams queued for one of this node's tunnels.
const TUNNEL_QUEUE: usize = 2048;
/// Largest datagram relayed.
const DATAGRAM: usize = 65_536;

/// Whether `datagram` has the shape of a WireGuard message: type 1 to 4, three zero bytes,
/// and at least the length of the smallest (a 32-byte keepalive).
pub fn looks_like_wireguard(datagram: &[u8]) -> bool {
    datagram.len() >= 32 && (1..=4).contains(&datagram[0]) && datagram[1..4] == [0, 0, 0]
}

/// A datagram a relay brought back for one of this node's tunnels.
#[derive(Debug)]
pub struct Relayed {
    /// The relay it came through.
    pub via: ShortId,
    /// The WireGuard datagram.
    pub data: Vec<u8>,
}

/// A socket this node keeps to carry one member's tunnel to one endpoint.
struct Carried {
    /// For sending: a plain non-blocking socket sends at once, where a tokio socket would
    /// report `WouldBlock` until the reactor first saw it writable.
    udp: Arc<std::net::UdpSocket>,
    /// Datagrams sent out on it, so its reader can tell it idles.
    sent: Arc<AtomicU64>,
    /// Stops its reader.
    stop: CancellationToken,
}

/// Counts of what the relay did, for `/status` and tests.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct RelayCounters {
    /// Datagrams sent to endpoints for other members.
    pub carried_out: u64,
    /// Datagrams brought back from endpoints to other members.
    pub carried_in: u64,
    /// Datagrams refused: an endpoint this node's config does not name, a datagram not
    /// shaped like WireGuard, too many carried tunnels, or a reply from another address.
    pub refused: u64,
    /// Datagrams relays brought back for this node's tunnels.
    pub received: u64,
}

/// See the module docs.
pub struct EndpointRelay {
    socket: Arc<MeshSocket>,
    /// The endpoints this node carries tunnels to: those of its own peers.
    allowed: Mutex<HashSet<SocketAddr>>,
    /// This node's tunnels that may go through relays, by their endpoint.
    tunnels: Mutex<HashMap<SocketAddr, mpsc::Sender<Relayed>>>,
    carried: Mutex<HashMap<(ShortId, SocketAddr), Carried>>,
    counters: Mutex<RelayCounters>,
    stop: CancellationToken,
}

impl std::fmt::Debug for EndpointRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointRelay").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EndpointRelay {
    /// Takes the socket's endpoint datagrams and starts serving them; `None` if something
    /// took them already.
    pub fn start(socket: Arc<MeshSocket>, stop: CancellationToken) -> Option<Arc<Self>> {
        let mut inbound = socket.take_endpoint_datagrams()?;
        let relay = Arc::new(Self {
            socket,
            allowed: Mutex::new(HashSet::new()),
            tunnels: Mutex::new(HashMap::new()),
            carried: Mutex::new(HashMap::new()),
            counters: Mutex::new(RelayCounters::default()),
            stop: stop.clone(),
        });
        let this = relay.clone();
        tokio::spawn(async move {
            loop {
                let datagram = tokio::select! {
                    _ = stop.cancelled() => return,
                    d = inbound.recv() => match d {
                        Some(d) => d,
                        None => return,
                    },
                };
                match datagram {
                    EndpointDatagram::Out {
                        from,
                        endpoint,
                        data,
                    } => this.carry_out(from, endpoint, &data),
                    EndpointDatagram::In {
                        via,
                        endpoint,
                        data,
                    } => this.bring_in(via, endpoint, data),
                }
            }
        });
        Some(relay)
    }

    /// Lets this node carry tunnels to `endpoint` for other members (an endpoint of one of
    /// its own peers; called again when a name resolves to a new address).
    pub fn allow(&self, endpoint: SocketAddr) {
        lock(&self.allowed).insert(endpoint);
    }

    /// Registers one of this node's tunnels: what relays bring back from `endpoint` goes to
    /// the returned queue. A later registration of the same endpoint replaces it.
    pub fn register(&self, endpoint: SocketAddr) -> mpsc::Receiver<Relayed> {
        let (tx, rx) = mpsc::channel(TUNNEL_QUEUE);
        lock(&self.tunnels).insert(endpoint, tx);
        rx
    }

    /// Sends a datagram of this node's tunnel to `endpoint` through the member `via`.
    pub async fn send_via(
        &self,
        via: &ShortId,
        endpoint: SocketAddr,
        datagram: &[u8],
    ) -> std::io::Result<()> {
        self.socket
            .send_endpoint(via, BodyType::ToEndpoint, endpoint, datagram)
            .await
    }

    /// What the relay did so far.
    pub fn counters(&self) -> RelayCounters {
        *lock(&self.counters)
    }

    /// Member–endpoint sockets open now.
    pub fn carried(&self) -> usize {
        lock(&self.carried).len()
    }

    fn refuse(&self, why: &'static str, member: &ShortId, endpoint: SocketAddr) {
        lock(&self.counters).refused += 1;
        metrics::counter!("skylane_wireguard_relay_refused_total", "reason" => why).increment(1);
        tracing::debug!(%member, %endpoint, reason = why, "relayed WireGuard datagram refused");
    }

    fn carry_out(self: &Arc<Self>, from: ShortId, endpoint: SocketAddr, data: &[u8]) {
        if !lock(&self.allowed).contains(&endpoint) {
            return self.refuse("endpoint_not_configured", &from, endpoint);
        }
        if !looks_like_wireguard(data) {
            return self.refuse("not_wireguard", &from, endpoint);
        }
        let udp = {
            let mut carried = lock(&self.carried);
            match carried.get(&(from, endpoint)) {
                Some(c) => {
                    c.sent.fetch_add(1, Ordering::Relaxed);
                    c.udp.clone()
                }
                None => {
                    if carried.len() >= MAX_CARRIED {
                        drop(carried);
                        return self.refuse("too_many", &from, endpoint);
                    }
                    let bind = SocketAddr::new(unspecified_like(endpoint.ip()), 0);
                    let sockets = std::net::UdpSocket::bind(bind)
                        .and_then(|s| s.set_nonblocking(true).map(|()| s))
                        .and_then(|s| Ok((s.try_clone()?, s)))
                        .and_then(|(send, recv)| Ok((send, UdpSocket::from_std(recv)?)));
                    let (udp, receiving) = match sockets {
                        Ok((send, recv)) => (Arc::new(send), recv),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot open a socket to relay WireGuard");
                            drop(carried);
                            return self.refuse("no_socket", &from, endpoint);
                        }
                    };
                    let stop = self.stop.child_token();
                    let sent = Arc::new(AtomicU64::new(1));
                    carried.insert(
                        (from, endpoint),
                        Carried {
                            udp: udp.clone(),
                            sent: sent.clone(),
                            stop: stop.clone(),
                        },
                    );
                    tracing::info!(member = %from, %endpoint, local = ?udp.local_addr().ok(), "carrying a WireGuard tunnel for another edge");
                    tokio::spawn(self.clone().carry_in(from, endpoint, receiving, sent, stop));
                    udp
                }
            }
        };
        match udp.send_to(data, endpoint) {
            Ok(_) => lock(&self.counters).carried_out += 1,
            Err(e) => tracing::debug!(%endpoint, error = %e, "relayed WireGuard datagram not sent"),
        }
    }

    /// Brings what `endpoint` sends to `udp` back to `member`, until the socket idles or
    /// the relay stops; then closes it.
    async fn carry_in(
        self: Arc<Self>,
        member: ShortId,
        endpoint: SocketAddr,
        udp: UdpSocket,
        sent: Arc<AtomicU64>,
        stop: CancellationToken,
    ) {
        let mut buf = vec![0u8; DATAGRAM];
        let mut last_out = sent.load(Ordering::Relaxed);
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => break,
                r = tokio::time::timeout(CARRIED_IDLE, udp.recv_from(&mut buf)) => r,
            };
            let (n, src) = match received {
                Ok(Ok(got)) => got,
                Ok(Err(e)) => {
                    tracing::debug!(%endpoint, error = %e, "relay socket receive error");
                    continue;
                }
                Err(_idle) => {
                    // Nothing came back for a while; if nothing went out either, close.
                    let out = sent.load(Ordering::Relaxed);
                    if out == last_out {
                        break;
                    }
                    last_out = out;
                    continue;
                }
            };
            if src != endpoint {
                self.refuse("reply_from_elsewhere", &member, src);
                continue;
            }
            let sent = self
                .socket
                .send_endpoint(&member, BodyType::FromEndpoint, endpoint, &buf[..n])
                .await;
            match sent {
                Ok(()) => lock(&self.counters).carried_in += 1,
                Err(e) => tracing::debug!(%member, error = %e, "relayed WireGuard answer not sent"),
            }
        }
        lock(&self.carried).remove(&(member, endpoint));
        tracing::info!(%member, %endpoint, "stopped carrying a WireGuard tunnel for another edge");
    }

    fn bring_in(&self, via: ShortId, endpoint: SocketAddr, data: Vec<u8>) {
        let tunnel = lock(&self.tunnels).get(&endpoint).cloned();
        let delivered = tunnel.is_some_and(|t| t.try_send(Relayed { via, data }).is_ok());
        if delivered {
            lock(&self.counters).received += 1;
        } else {
            metrics::counter!("skylane_wireguard_dropped_total", "reason" => "no_tunnel_or_full")
                .increment(1);
        }
    }
}

impl Drop for EndpointRelay {
    fn drop(&mut self) {
        for c in lock(&self.carried).values() {
            c.stop.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wireguard_shaped_datagrams_are_carried() {
        let mut init = vec![0u8; 148];
        init[0] = 1;
        assert!(looks_like_wireguard(&init));
        let mut keepalive = vec![0u8; 32];
        keepalive[0] = 4;
        assert!(looks_like_wireguard(&keepalive));
        assert!(!looks_like_wireguard(&keepalive[..31]));
        let mut other = init.clone();
        other[0] = 5;
        assert!(!looks_like_wireguard(&other));
        other[0] = 1;
        other[2] = 1;
        assert!(!looks_like_wireguard(&other));
        assert!(!looks_like_wireguard(
            b"GET / HTTP/1.1\r\n\r\n0123456789abcdef"
        ));
    }
}
