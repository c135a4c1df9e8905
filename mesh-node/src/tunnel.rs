//! Persistent tunnels from this edge to the connectors.
//!
//! One task per connector keeps a QUIC connection up: resolve the connector's address
//! (again when the DNS answer expires or a connection fails), connect, wait until the
//! connection dies, back off with jitter, repeat. Flows take the live tunnel with the
//! lowest round-trip time.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use skylane_shared::identity::NodeKey;
use skylane_shared::lifecycle::Backoff;
use skylane_shared::membership::Member;
use skylane_shared::mesh::control::MeshControl;
use skylane_shared::mesh::{MeshSocket, virtual_addr};
use skylane_shared::quic::{self, PathStats};
use skylane_shared::resolve::Resolver;
use skylane_shared::trust::MESH_SERVER_NAME;
use tokio_util::sync::CancellationToken;

use crate::config::Tunnel;

/// One connector and its tunnel, if up.
#[derive(Debug)]
pub struct ConnectorLink {
    /// The connector.
    pub member: Member,
    state: RwLock<LinkState>,
}

#[derive(Debug, Default)]
struct LinkState {
    conn: Option<quinn::Connection>,
    since: Option<Instant>,
    last_error: Option<String>,
    reconnects: u64,
}

/// A snapshot of one tunnel for the status page.
#[derive(Debug, serde::Serialize)]
pub struct LinkStatus {
    /// Connector name.
    pub connector: String,
    /// Whether the tunnel is up.
    pub up: bool,
    /// Where its datagrams go.
    pub address: Option<String>,
    /// Smoothed RTT of the tunnel.
    pub rtt_ms: Option<f64>,
    /// QUIC path statistics of the live tunnel (congestion window, losses, packet size):
    /// what to look at when a tunnel is slower than its RTT explains.
    pub quic: Option<PathStats>,
    /// Seconds since it came up.
    pub up_for_s: Option<u64>,
    /// Times it has been re-established.
    pub reconnects: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// The tunnels of this edge.
#[derive(Debug)]
pub struct TunnelPool {
    links: Vec<Arc<ConnectorLink>>,
    socket: Arc<MeshSocket>,
}

impl TunnelPool {
    /// Starts one reconnecting task per connector.
    pub fn start(
        endpoint: quinn::Endpoint,
        socket: Arc<MeshSocket>,
        control: Arc<MeshControl>,
        key: NodeKey,
        connectors: Vec<Member>,
        timing: Tunnel,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let links: Vec<_> = connectors
            .into_iter()
            .map(|member| {
                Arc::new(ConnectorLink {
                    member,
                    state: RwLock::new(LinkState::default()),
                })
            })
            .collect();
        let dialer = Arc::new(Dialer {
            endpoint,
            socket: socket.clone(),
            control,
            key,
            timing,
            resolver: Resolver::from_system(),
        });
        for link in &links {
            tokio::spawn(keep_up(link.clone(), dialer.clone(), stop.clone()));
        }
        Arc::new(Self { links, socket })
    }

    /// Live tunnels, lowest RTT first.
    fn live(&self) -> Vec<(String, quinn::Connection)> {
        let mut v: Vec<_> = self
            .links
            .iter()
            .filter_map(|l| {
                let s = l.state.read().ok()?;
                let c = s.conn.as_ref().filter(|c| c.close_reason().is_none())?;
                Some((l.member.name.clone(), c.clone()))
            })
            .collect();
        v.sort_by_key(|(_, c)| c.rtt());
        v
    }

    /// Opens a stream on the best tunnel, falling back to the others in RTT order when a
    /// connection turns out to be gone. Returns the connector's name with the stream.
    pub async fn open_stream(&self) -> Option<(String, quinn::SendStream, quinn::RecvStream)> {
        for (name, conn) in self.live() {
            match conn.open_bi().await {
                Ok((send, recv)) => return Some((name, send, recv)),
                Err(e) => {
                    tracing::debug!(connector = %name, error = %e, "stream open failed; trying another tunnel")
                }
            }
        }
        None
    }

    /// Whether any tunnel is up.
    pub fn any_up(&self) -> bool {
        !self.live().is_empty()
    }

    /// Status of every tunnel.
    pub fn status(&self) -> Vec<LinkStatus> {
        self.links
            .iter()
            .map(|l| {
                let s = l.state.read();
                let (up, rtt, quic, since, reconnects, last_error) = match &s {
                    Ok(s) => {
                        let live = s.conn.as_ref().filter(|c| c.close_reason().is_none());
                        (
                            live.is_some(),
                            live.map(|c| c.rtt().as_secs_f64() * 1000.0),
                            live.map(PathStats::of),
                            s.since
                                .filter(|_| live.is_some())
                                .map(|t| t.elapsed().as_secs()),
                            s.reconnects,
                            s.last_error.clone(),
                        )
                    }
                    Err(_) => (false, None, None, None, 0, None),
                };
                LinkStatus {
                    connector: l.member.name.clone(),
                    up,
                    address: self.socket.peer_addr(&l.member.id).map(|a| a.to_string()),
                    rtt_ms: rtt,
                    quic,
                    up_for_s: since,
                    reconnects,
                    last_error,
                }
            })
            .collect()
    }
}

/// What every connector's dial loop shares.
struct Dialer {
    endpoint: quinn::Endpoint,
    socket: Arc<MeshSocket>,
    control: Arc<MeshControl>,
    key: NodeKey,
    timing: Tunnel,
    resolver: Resolver,
}

async fn keep_up(link: Arc<ConnectorLink>, dialer: Arc<Dialer>, stop: CancellationToken) {
    let Dialer {
        endpoint,
        socket,
        control,
        key,
        timing,
        resolver,
    } = &*dialer;
    let name = link.member.name.clone();
    let mut backoff = Backoff::new(timing.reconnect_min, timing.reconnect_max);
    let mut dns_valid_until: Option<Option<Instant>> = None;
    let mut first = true;
    loop {
        if !first {
            let delay = backoff.next_delay();
            tracing::debug!(connector = %name, delay_ms = delay.as_millis() as u64, "reconnecting after a pause");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        first = false;
        // Resolve the connector's address when we have none or it expired.
        let expired = match dns_valid_until {
            None => true,
            Some(None) => false,
            Some(Some(t)) => Instant::now() >= t,
        };
        if expired {
            let target = link.member.address.clone().unwrap_or_default();
            match resolver.resolve(&target).await {
                Ok(r) => {
                    socket.set_peer_addr(&link.member.id, r.addrs[0]);
                    dns_valid_until = Some(r.valid_until);
                }
                Err(e) => {
                    set_error(&link, e.to_string());
                    tracing::warn!(connector = %name, error = %e, "cannot resolve connector");
                    continue;
                }
            }
        }
        let config = match quic::client_config(key, link.member.id) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(connector = %name, error = %e, "bad tunnel TLS config");
                return;
            }
        };
        let connecting =
            match endpoint.connect_with(config, virtual_addr(&link.member.id), MESH_SERVER_NAME) {
                Ok(c) => c,
                Err(e) => {
                    set_error(&link, e.to_string());
                    continue;
                }
            };
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(timing.connect_timeout, connecting) => match r {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    set_error(&link, e.to_string());
                    tracing::warn!(connector = %name, error = %e, "tunnel handshake failed");
                    dns_valid_until = None;
                    continue;
                }
                Err(_) => {
                    set_error(&link, "handshake timed out".into());
                    tracing::warn!(connector = %name, "tunnel handshake timed out");
                    dns_valid_until = None;
                    continue;
                }
            },
        };
        backoff.reset();
        control.watch_connection(conn.clone());
        tracing::info!(connector = %name, rtt_ms = conn.rtt().as_millis() as u64, "tunnel up");
        metrics::gauge!("skylane_tunnel_up", "connector" => name.clone()).set(1.0);
        if let Ok(mut s) = link.state.write() {
            if s.since.is_some() {
                s.reconnects += 1;
            }
            s.conn = Some(conn.clone());
            s.since = Some(Instant::now());
        }
        let reason = tokio::select! {
            _ = stop.cancelled() => {
                conn.close(0u32.into(), b"edge shutting down");
                return;
            }
            r = conn.closed() => r,
        };
        metrics::gauge!("skylane_tunnel_up", "connector" => name.clone()).set(0.0);
        metrics::counter!("skylane_tunnel_drops_total", "connector" => name.clone()).increment(1);
        tracing::warn!(connector = %name, reason = %reason, "tunnel down");
        set_error(&link, reason.to_string());
        if let Ok(mut s) = link.state.write() {
            s.conn = None;
        }
        // A failed tunnel may mean the connector moved: ask DNS again.
        dns_valid_until = None;
        // Reconnect at once the first time; back off if it keeps failing.
        first = true;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn set_error(link: &ConnectorLink, e: String) {
    if let Ok(mut s) = link.state.write() {
        s.last_error = Some(e);
    }
}
