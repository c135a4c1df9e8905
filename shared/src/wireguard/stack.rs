//! The userspace TCP/IP stack inside one WireGuard tunnel (smoltcp): IP packets in and
//! out through two bounded queues, one TCP socket per flow, and nothing that reads a clock
//! — the caller passes `now`.
//!
//! A flow whose handle is dropped is not cut off: its socket is closed (a FIN, or a RST
//! when unread data is left, as a kernel does) and kept until the close is over, so the
//! far side never holds a connection nobody answers for.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

/// IP packets queued each way at most; past that, inbound packets are dropped (TCP sends
/// them again) and the stack stops emitting until the queue drains.
const QUEUE_PACKETS: usize = 1024;
/// Local ports flows are given, as a kernel's ephemeral range.
const PORTS: std::ops::RangeInclusive<u16> = 49_152..=65_535;
/// A flow with data unacknowledged this long is given up (the far side is gone).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Keepalive probes on idle flows, so a dead far side is noticed.
const KEEPALIVE: Duration = Duration::from_secs(25);

/// Why a flow could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// The tunnel carries its configured maximum of flows.
    #[error("the tunnel carries its maximum of {0} flows")]
    Full(usize),
    /// Every local port is taken.
    #[error("no free local port")]
    NoPort,
    /// smoltcp refused the connect (an address it cannot use).
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, String),
}

/// The two packet queues smoltcp reads from and writes to.
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0; len];
        let r = f(&mut packet);
        self.0.push_back(packet);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        (self.tx.len() < QUEUE_PACKETS).then_some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

/// One tunnel's TCP/IP stack.
pub struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    queues: Queues,
    local: IpAddr,
    /// Ports in use, and where the search for a free one starts.
    ports: HashSet<u16>,
    /// The ephemeral port of each connected flow, kept here because smoltcp forgets a
    /// socket's endpoints once it closes (a reset, a timeout, the end of TIME-WAIT).
    port_of: std::collections::HashMap<SocketHandle, u16>,
    next_port: u16,
    /// Flows whose handle was dropped, still closing, with the ephemeral port to free.
    closing: Vec<(SocketHandle, Option<u16>)>,
    /// The port flows are accepted on, and how many sockets wait in LISTEN for them.
    listen: Option<(u16, usize)>,
    /// Sockets in LISTEN.
    listeners: Vec<SocketHandle>,
    /// Sockets past LISTEN whose handshake is not over yet.
    embryonic: Vec<SocketHandle>,
    /// IP packets from the tunnel waiting for the next poll.
    inbound: std::collections::VecDeque<Vec<u8>>,
    /// Established flows not yet taken by [`Stack::pop_accepted`].
    accepted: std::collections::VecDeque<SocketHandle>,
    /// Open flows (handles held by a stream).
    open: usize,
    buffer_bytes: usize,
    max_flows: usize,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("local", &self.local)
            .field("open", &self.open)
            .field("closing", &self.closing.len())
            .finish()
    }
}

impl Stack {
    /// A stack with the address `local` (this side's address inside the tunnel), packets
    /// of at most `mtu` bytes, `buffer_bytes` of send and of receive buffer per flow (the
    /// largest TCP window a flow can use), and at most `max_flows` flows.
    pub fn new(
        local: IpAddr,
        mtu: usize,
        buffer_bytes: usize,
        max_flows: usize,
        now: Instant,
    ) -> Self {
        let mut queues = Queues {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
        };
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut queues, now);
        iface.update_ip_addrs(|addrs| {
            // One address on a fresh interface always fits.
            let _ = addrs.push(IpCidr::new(IpAddress::from(local), host_prefix(local)));
        });
        // Everything leaves through the tunnel: the peer's allowed IPs decide what may.
        // On an IP medium the gateway is never resolved, only the route looked up.
        match local {
            IpAddr::V4(v4) => {
                let _ = iface.routes_mut().add_default_ipv4_route(v4);
            }
            IpAddr::V6(v6) => {
                let _ = iface.routes_mut().add_default_ipv6_route(v6);
            }
        }
        Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            queues,
            local,
            ports: HashSet::new(),
            port_of: std::collections::HashMap::new(),
            next_port: *PORTS.start(),
            closing: Vec::new(),
            listen: None,
            listeners: Vec::new(),
            embryonic: Vec::new(),
            accepted: std::collections::VecDeque::new(),
            inbound: std::collections::VecDeque::new(),
            open: 0,
            buffer_bytes,
            max_flows,
        }
    }

    /// This side's address inside the tunnel.
    pub fn local(&self) -> IpAddr {
        self.local
    }

    /// Flows open now, and flows still closing.
    pub fn flows(&self) -> (usize, usize) {
        (self.open, self.closing.len())
    }

    /// Queues an IP packet that came out of the tunnel. False when the queue is full and
    /// the packet was dropped.
    pub fn push_inbound(&mut self, packet: &[u8]) -> bool {
        if self.inbound.len() >= QUEUE_PACKETS {
            return false;
        }
        self.inbound.push_back(packet.to_vec());
        true
    }

    /// Accepts flows on `port` from now on, with `backlog` sockets waiting in LISTEN (more
    /// handshakes at once than that are refused, as a full kernel backlog does).
    pub fn listen(&mut self, port: u16, backlog: usize) {
        self.listen = Some((port, backlog.max(1)));
        self.refill_listeners();
    }

    /// The next established flow accepted on the listening port, if any.
    pub fn pop_accepted(&mut self) -> Option<SocketHandle> {
        let h = self.accepted.pop_front()?;
        self.open += 1;
        self.refill_listeners();
        Some(h)
    }

    fn new_socket(&self) -> tcp::Socket<'static> {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.buffer_bytes]),
            tcp::SocketBuffer::new(vec![0; self.buffer_bytes]),
        );
        // Flows carry requests and websocket frames: no Nagle delay, as TCP_NODELAY.
        socket.set_nagle_enabled(false);
        // Without congestion control a flow sends its whole window at once: a burst that
        // overflows the receive buffer of the endpoint's UDP socket (seen with wireguard-go:
        // uploads at 200 KB/s, stalled on retransmission timeouts).
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        socket.set_keep_alive(Some(KEEPALIVE));
        socket.set_timeout(Some(ACK_TIMEOUT));
        socket
    }

    /// Keeps `backlog` sockets in LISTEN while the flow cap leaves room.
    fn refill_listeners(&mut self) {
        let Some((port, backlog)) = self.listen else {
            return;
        };
        while self.listeners.len() < backlog
            && self.open + self.accepted.len() + self.embryonic.len() + self.listeners.len()
                < self.max_flows
        {
            let mut socket = self.new_socket();
            if socket.listen(port).is_err() {
                return;
            }
            self.listeners.push(self.sockets.add(socket));
        }
    }

    /// Moves sockets along LISTEN → handshake → accepted.
    fn advance_listeners(&mut self) {
        if self.listen.is_none() {
            return;
        }
        let mut i = 0;
        while i < self.listeners.len() {
            let h = self.listeners[i];
            if self.sockets.get::<tcp::Socket>(h).state() == tcp::State::Listen {
                i += 1;
            } else {
                self.embryonic.push(self.listeners.swap_remove(i));
            }
        }
        let mut i = 0;
        while i < self.embryonic.len() {
            let h = self.embryonic[i];
            match self.sockets.get::<tcp::Socket>(h).state() {
                tcp::State::Established | tcp::State::CloseWait => {
                    self.accepted.push_back(self.embryonic.swap_remove(i));
                }
                // A reset handshake falls back to LISTEN; a timed-out one closes.
                tcp::State::Listen | tcp::State::Closed => {
                    self.sockets.remove(self.embryonic.swap_remove(i));
                }
                _ => i += 1,
            }
        }
        self.refill_listeners();
    }

    /// Whether an accepted flow waits for [`Stack::pop_accepted`].
    pub fn has_accepted(&self) -> bool {
        !self.accepted.is_empty()
    }

    /// Runs the stack: takes the inbound packets, moves socket data, emits packets, and
    /// frees the sockets of flows whose close is over.
    pub fn poll(&mut self, now: Instant) {
        // Only flows released before this poll: the RST of an abort leaves in it.
        let closing = std::mem::take(&mut self.closing);
        // A listening stack takes inbound packets a few at a time and refills its LISTEN
        // sockets in between: a burst of SYNs larger than the backlog in one go would
        // otherwise find no listener and be reset.
        let chunk = match self.listen {
            Some((_, backlog)) => (backlog / 2).max(1),
            None => QUEUE_PACKETS,
        };
        loop {
            let n = chunk.min(self.inbound.len());
            self.queues.rx.extend(self.inbound.drain(..n));
            self.iface.poll(now, &mut self.queues, &mut self.sockets);
            self.advance_listeners();
            if self.inbound.is_empty() {
                break;
            }
        }
        for (handle, port) in closing {
            // TIME-WAIT is skipped: inside a point-to-point tunnel there is no one else's
            // old segment to guard against, and at a thousand flows a second ten seconds
            // of TIME-WAIT would keep ten thousand sockets (and their buffers) that every
            // poll walks through. Should our last ACK be lost, the peer's repeated FIN gets
            // a RST: its connection ends either way.
            let state = self.sockets.get::<tcp::Socket>(handle).state();
            if matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                self.sockets.remove(handle);
                if let Some(port) = port {
                    self.ports.remove(&port);
                }
            } else {
                self.closing.push((handle, port));
            }
        }
    }

    /// The next packet for the tunnel, if any.
    pub fn pop_outbound(&mut self) -> Option<Vec<u8>> {
        self.queues.tx.pop_front()
    }

    /// How long until [`Stack::poll`] has work again (a retransmit, a keepalive), if ever.
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        self.iface.poll_delay(now, &self.sockets)
    }

    /// Starts a TCP connection to `remote`; the SYN leaves at the next poll.
    pub fn connect(&mut self, remote: SocketAddr) -> Result<SocketHandle, OpenError> {
        if self.open >= self.max_flows {
            return Err(OpenError::Full(self.max_flows));
        }
        let port = self.free_port().ok_or(OpenError::NoPort)?;
        let mut socket = self.new_socket();
        socket
            .connect(self.iface.context(), remote, port)
            .map_err(|e| OpenError::Connect(remote, e.to_string()))?;
        self.ports.insert(port);
        self.open += 1;
        let handle = self.sockets.add(socket);
        self.port_of.insert(handle, port);
        Ok(handle)
    }

    /// The socket of an open flow.
    pub fn socket(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// The flow's handle was dropped: close it (RST when data was left unread) and free it
    /// once closed.
    pub fn release(&mut self, handle: SocketHandle) {
        self.open = self.open.saturating_sub(1);
        let port = self.port_of.remove(&handle);
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        if socket.recv_queue() > 0 {
            socket.abort();
        } else {
            socket.close();
        }
        self.closing.push((handle, port));
        // A peer that never finishes closing (it acknowledges our FIN and keeps the
        // connection alive) must not hold sockets without end: past the flow cap, the
        // oldest closing flows are reset.
        if self.closing.len() > self.max_flows {
            let (oldest, _) = self.closing[0];
            // Freed at the next poll, once its RST is out.
            self.sockets.get_mut::<tcp::Socket>(oldest).abort();
        }
    }

    /// Resets a flow (the peer sees an error, not an end); its handle is released later.
    pub fn abort(&mut self, handle: SocketHandle) {
        self.sockets.get_mut::<tcp::Socket>(handle).abort();
    }

    fn free_port(&mut self) -> Option<u16> {
        let span = usize::from(PORTS.end() - PORTS.start()) + 1;
        for _ in 0..span {
            let p = self.next_port;
            self.next_port = if p == *PORTS.end() {
                *PORTS.start()
            } else {
                p + 1
            };
            if !self.ports.contains(&p) {
                return Some(p);
            }
        }
        None
    }
}

fn host_prefix(a: IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// smoltcp's clock from tokio's, so paused-clock tests drive it too.
pub fn smol_now(origin: tokio::time::Instant) -> Instant {
    Instant::from_micros(i64::try_from(origin.elapsed().as_micros()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Stack, Stack) {
        let now = Instant::from_millis(0);
        (
            Stack::new("10.9.0.1".parse().expect("ip"), 1420, 64 * 1024, 4, now),
            Stack::new("10.9.0.2".parse().expect("ip"), 1420, 64 * 1024, 4, now),
        )
    }

    /// Moves every packet between the two stacks until both are quiet.
    fn settle(a: &mut Stack, b: &mut Stack, now: Instant) {
        for _ in 0..100 {
            a.poll(now);
            b.poll(now);
            let mut moved = false;
            while let Some(p) = a.pop_outbound() {
                b.push_inbound(&p);
                moved = true;
            }
            while let Some(p) = b.pop_outbound() {
                a.push_inbound(&p);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    #[test]
    fn a_flow_connects_carries_data_and_frees_its_socket_when_released() {
        let (mut a, mut b) = pair();
        let now = Instant::from_millis(1);
        // b listens on one socket.
        let mut l = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 4096]),
            tcp::SocketBuffer::new(vec![0; 4096]),
        );
        l.listen(7000).expect("listen");
        let lh = b.sockets.add(l);
        let h = a
            .connect("10.9.0.2:7000".parse().expect("addr"))
            .expect("connect");
        settle(&mut a, &mut b, now);
        assert_eq!(a.socket(h).state(), tcp::State::Established);
        a.socket(h).send_slice(b"hello").expect("send");
        settle(&mut a, &mut b, now);
        let mut got = [0u8; 16];
        let n = b.socket(lh).recv_slice(&mut got).expect("recv");
        assert_eq!(&got[..n], b"hello");
        assert_eq!(a.flows(), (1, 0));
        a.release(h);
        assert_eq!(a.flows(), (0, 1));
        b.socket(lh).close();
        settle(&mut a, &mut b, now);
        // A flow that closed first would sit in TIME-WAIT: it is freed at once.
        settle(&mut a, &mut b, now);
        assert_eq!(a.flows(), (0, 0), "the closed flow's socket is freed");
    }

    #[test]
    fn a_listening_stack_accepts_several_flows_and_keeps_its_backlog() {
        let (mut a, mut b) = pair();
        b.listen(7100, 2);
        let now = Instant::from_millis(1);
        let flows: Vec<_> = (0..3)
            .map(|_| {
                a.connect("10.9.0.2:7100".parse().expect("addr"))
                    .expect("connect")
            })
            .collect();
        settle(&mut a, &mut b, now);
        let mut accepted = Vec::new();
        while let Some(h) = b.pop_accepted() {
            accepted.push(h);
        }
        // Three handshakes in one burst, with a backlog of two: the listeners are refilled
        // between packets, so none is refused.
        assert_eq!(accepted.len(), 3);
        for h in &flows[..2] {
            assert_eq!(a.socket(*h).state(), tcp::State::Established);
        }
        a.socket(flows[0]).send_slice(b"ping").expect("send");
        settle(&mut a, &mut b, now);
        let got: Vec<u8> = accepted
            .iter()
            .filter_map(|h| {
                let mut buf = [0u8; 8];
                let n = b.socket(*h).recv_slice(&mut buf).ok()?;
                (n > 0).then(|| buf[..n].to_vec())
            })
            .flatten()
            .collect();
        assert_eq!(got, b"ping");
        assert_eq!(b.flows().0, accepted.len());
        // Refilled, up to the flow cap of 4: three open leave room for one listener.
        assert_eq!(
            b.listeners.len(),
            1,
            "the backlog is refilled within the cap"
        );
    }

    #[test]
    fn a_reset_flow_gives_its_port_back() {
        let (mut a, mut b) = pair();
        let now = Instant::from_millis(1);
        // Nobody listens on b: every connect is reset, and every port must come back.
        for _ in 0..20 {
            let h = a
                .connect("10.9.0.2:9".parse().expect("addr"))
                .expect("connect");
            settle(&mut a, &mut b, now);
            assert_eq!(a.socket(h).state(), tcp::State::Closed, "refused");
            a.release(h);
            settle(&mut a, &mut b, now);
        }
        assert!(a.ports.is_empty(), "ports leaked: {:?}", a.ports);
        assert_eq!(a.flows(), (0, 0));
    }

    #[test]
    fn the_flow_cap_holds() {
        let (mut a, _) = pair();
        for i in 0..4 {
            a.connect(SocketAddr::new("10.9.0.2".parse().expect("ip"), 7000 + i))
                .expect("connect");
        }
        assert_eq!(
            a.connect("10.9.0.2:7100".parse().expect("addr"))
                .expect_err("full"),
            OpenError::Full(4)
        );
    }

    #[test]
    fn a_full_inbound_queue_drops_instead_of_growing() {
        let (mut a, _) = pair();
        for _ in 0..QUEUE_PACKETS {
            assert!(a.push_inbound(&[0x45; 20]));
        }
        assert!(!a.push_inbound(&[0x45; 20]));
        a.poll(Instant::from_millis(1));
        assert!(a.push_inbound(&[0x45; 20]), "a poll drains the queue");
        assert!(a.inbound.len() <= 1 && a.queues.rx.is_empty());
    }
}
