//! Restart without refusing connections: a new process of the same node takes over the
//! running one's sockets.
//!
//! The running process listens on an abstract Unix socket named after the node
//! ([`point_name`]). A new process started with `--take-over` connects to it and receives,
//! as file descriptors (`SCM_RIGHTS`), the listening TCP sockets and the mesh UDP socket
//! themselves — not copies bound anew: connections waiting in a listener's queue are the new
//! process's to accept, and no SYN meets a closed port. With them comes one end of a
//! datagram socket pair, the *pipe*: the old process's QUIC connections go on through it
//! (the new process owns the UDP socket now and passes their packets along, see
//! [`crate::mesh::handoff`]), so its requests and websockets in flight finish while it
//! drains. When the new process serves, it says so ([`Successor::ready`]) and the old one
//! drains and exits.
//!
//! Everything here is Linux: abstract socket names and `SCM_RIGHTS`.

use std::io::{self, IoSlice, IoSliceMut, Write as _};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram, UnixListener, UnixStream};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// Sockets handed over at most (the mesh socket, HTTPS, HTTP, admin, raw TCP listeners).
pub const MAX_SOCKETS: usize = 32;
/// How long the old process waits for its successor to serve before taking its sockets
/// back.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The byte a successor sends when it serves.
const READY: u8 = b'R';
/// Largest offer message.
const OFFER_MAX: usize = 4096;

/// The abstract socket name of the node whose mesh socket is at `listen`: the node's name
/// alone would collide between meshes on one machine.
pub fn point_name(node: &str, listen: std::net::SocketAddr) -> String {
    format!("skylane-handover/{node}/{listen}")
}

/// What the old process sends with the descriptors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Offer {
    /// The connection-ID generation of the old process's QUIC endpoint, whose packets the
    /// new process passes back through the pipe.
    generation: u8,
    /// What each descriptor is, in order (`mesh`, `https`, `http`, `admin`, `tcp/0`, …);
    /// the pipe comes last, unlabelled.
    labels: Vec<String>,
}

/// Why a hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// No process of this node is listening for a successor.
    #[error("no running process of this node to take over ({0})")]
    NoneRunning(io::Error),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The other side sent something that is not an offer.
    #[error("bad hand-over message: {0}")]
    Bad(String),
}

/// The running process's end: where a successor asks for the sockets.
#[derive(Debug)]
pub struct HandoverPoint {
    listener: tokio::net::UnixListener,
}

impl HandoverPoint {
    /// Listens under `name` (within a tokio runtime). Fails with `AddrInUse` while another
    /// process of the node listens (it has not handed over yet).
    pub fn listen(name: &str) -> io::Result<Self> {
        let addr = UnixAddr::from_abstract_name(name.as_bytes())?;
        let listener = UnixListener::bind_addr(&addr)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener: tokio::net::UnixListener::from_std(listener)?,
        })
    }

    /// Waits for a successor. The stream comes back blocking, for [`offer`].
    pub async fn accept(&self) -> io::Result<UnixStream> {
        let (stream, _) = self.listener.accept().await?;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        Ok(stream)
    }
}

/// Sends the sockets to a successor on `stream`: `sockets` with their labels, then a new
/// pipe; returns this side's end of the pipe. `generation`: this process's QUIC
/// connection-ID generation.
pub fn offer(
    stream: &UnixStream,
    generation: u8,
    sockets: &[(String, BorrowedFd<'_>)],
) -> Result<UnixDatagram, HandoverError> {
    if sockets.len() + 1 > MAX_SOCKETS {
        return Err(HandoverError::Bad(format!("{} sockets", sockets.len())));
    }
    let (ours, theirs) = UnixDatagram::pair()?;
    let offer = Offer {
        generation,
        labels: sockets.iter().map(|(l, _)| l.clone()).collect(),
    };
    let body = postcard::to_stdvec(&offer).map_err(|e| HandoverError::Bad(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| HandoverError::Bad("offer".into()))?;
    let mut message = len.to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    let mut fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, fd)| *fd).collect();
    fds.push(theirs.as_fd());
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(HandoverError::Bad("too many descriptors".into()));
    }
    let sent = rustix::net::sendmsg(
        stream,
        &[IoSlice::new(&message)],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(io::Error::from)?;
    if sent != message.len() {
        return Err(HandoverError::Bad("offer cut short".into()));
    }
    Ok(ours)
}

/// Waits until the successor on `stream` serves (`true`), or gives up (`false`: it went
/// away, or `READY_TIMEOUT` passed).
pub async fn await_ready(stream: UnixStream) -> bool {
    use tokio::io::AsyncReadExt as _;
    let Ok(mut stream) = stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream))
    else {
        return false;
    };
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(READY_TIMEOUT, stream.read(&mut byte)).await,
        Ok(Ok(1)) if byte[0] == READY
    )
}

/// The old process's side, for either binary: hands `sockets` (the mesh socket first, as
/// `mesh`) to each successor that asks at `point`, moves `endpoint`'s connections onto the
/// pipe, and cancels `drain` once the successor serves. A successor that goes away before
/// it serves gives the connections back to the mesh socket, and the next one may ask.
pub async fn serve_successors(
    point: String,
    sockets: Vec<(String, OwnedFd)>,
    socket: std::sync::Arc<crate::mesh::MeshSocket>,
    endpoint: quinn::Endpoint,
    generation: u8,
    drain: tokio_util::sync::CancellationToken,
) {
    let sockets = std::sync::Arc::new(sockets);
    loop {
        let listening = match HandoverPoint::listen(&point) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "no hand-over point: a restart will refuse connections");
                return;
            }
        };
        let stream = tokio::select! {
            _ = drain.cancelled() => return,
            s = listening.accept() => s,
        };
        // The name is free for the successor's own point from here on.
        drop(listening);
        let offered = stream.and_then(|stream| {
            let borrowed: Vec<(String, std::os::fd::BorrowedFd<'_>)> = sockets
                .iter()
                .map(|(l, fd)| (l.clone(), fd.as_fd()))
                .collect();
            let pipe = offer(&stream, generation, &borrowed)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok((stream, pipe))
        });
        let (stream, pipe) = match offered {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "hand-over to a successor failed");
                continue;
            }
        };
        tracing::info!("a successor took the sockets; this process's connections go on through it");
        let me = crate::mesh::virtual_addr(&socket.local_id());
        let rebound = crate::mesh::handoff::PipeSocket::new(pipe, me)
            .and_then(|p| endpoint.rebind_abstract(std::sync::Arc::new(p)));
        match rebound {
            // From here the successor reads every datagram.
            Ok(()) => socket.set_handed_over(true),
            Err(e) => tracing::warn!(error = %e, "could not move the tunnels onto the pipe"),
        }
        let ready = await_ready(stream).await;
        if ready {
            tracing::info!("the successor serves: draining");
            drain.cancel();
            return;
        }
        tracing::warn!("the successor went away before it served; taking the tunnels back");
        socket.set_handed_over(false);
        if let Err(e) = endpoint.rebind_abstract(socket.clone()) {
            tracing::error!(error = %e, "could not take the tunnels back");
            return;
        }
    }
}

/// The new process's side, once it serves: tells the old process (which then drains), and
/// runs `then` (its own [`serve_successors`], so it can be taken over in turn).
pub async fn announce_ready(successor: Successor, then: impl std::future::Future<Output = ()>) {
    match tokio::task::spawn_blocking(move || successor.ready()).await {
        Ok(Ok(())) => tracing::info!("serving: the process taken over drains"),
        _ => tracing::warn!("could not tell the process taken over that this one serves"),
    }
    then.await;
}

/// The connection-ID generation of the endpoint a process is about to start on `socket`:
/// the one after its predecessor's (`successor`: what it took over), whose QUIC packets the
/// socket passes back to it through the pipe from now on; a fresh one otherwise. Call it
/// before the endpoint reads the socket: a packet of the old process's reaching the new
/// endpoint would meet an unknown connection ID, and the stateless reset it would send is
/// one the peer accepts (the reset key is the node's).
pub fn generation_after(
    successor: Option<&mut Successor>,
    socket: &std::sync::Arc<crate::mesh::MeshSocket>,
) -> io::Result<u8> {
    let Some(s) = successor else {
        return Ok(crate::quic::fresh_generation());
    };
    if let Some(pipe) = s.take_pipe() {
        socket.set_predecessor(pipe, s.generation)?;
    }
    Ok(s.generation.wrapping_add(1))
}

/// The new process's end: what it took over.
#[derive(Debug)]
pub struct Successor {
    stream: UnixStream,
    /// The old process's QUIC connection-ID generation.
    pub generation: u8,
    /// The sockets, by label.
    pub sockets: Vec<(String, OwnedFd)>,
    /// The new process's end of the pipe to the old one, until taken.
    pipe: Option<UnixDatagram>,
}

impl Successor {
    /// Takes the socket labelled `label`, if it was handed over.
    pub fn take(&mut self, label: &str) -> Option<OwnedFd> {
        let at = self.sockets.iter().position(|(l, _)| l == label)?;
        Some(self.sockets.swap_remove(at).1)
    }

    /// Takes the new process's end of the pipe.
    pub fn take_pipe(&mut self) -> Option<UnixDatagram> {
        self.pipe.take()
    }

    /// Tells the old process this one serves: it drains and exits.
    pub fn ready(mut self) -> io::Result<()> {
        self.stream.write_all(&[READY])
    }
}

/// Connects to the running process of the node at `name` and takes its sockets.
pub fn take_over(name: &str) -> Result<Successor, HandoverError> {
    let addr = UnixAddr::from_abstract_name(name.as_bytes())?;
    let stream = UnixStream::connect_addr(&addr).map_err(HandoverError::NoneRunning)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = vec![0u8; OFFER_MAX];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let body = buf
        .get(..got.bytes)
        .ok_or_else(|| HandoverError::Bad("length".into()))?;
    let (len, rest) = body
        .split_first_chunk::<4>()
        .ok_or_else(|| HandoverError::Bad("no length".into()))?;
    let offer: Offer = rest
        .get(..u32::from_be_bytes(*len) as usize)
        .ok_or_else(|| HandoverError::Bad("offer cut short".into()))
        .and_then(|b| postcard::from_bytes(b).map_err(|e| HandoverError::Bad(e.to_string())))?;
    if fds.len() != offer.labels.len() + 1 {
        return Err(HandoverError::Bad(format!(
            "{} descriptors for {} sockets and the pipe",
            fds.len(),
            offer.labels.len()
        )));
    }
    let pipe = fds
        .pop()
        .map(UnixDatagram::from)
        .ok_or_else(|| HandoverError::Bad("no pipe".into()))?;
    Ok(Successor {
        stream,
        generation: offer.generation,
        sockets: offer.labels.into_iter().zip(fds).collect(),
        pipe: Some(pipe),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener and a UDP socket go from one side to the other and stay the same sockets:
    /// a connection queued before the hand-over is accepted after it, and the pipe works.
    #[tokio::test]
    async fn sockets_and_a_pipe_change_hands() {
        use std::io::Read as _;
        let name = format!("skylane-handover-test/{}", std::process::id());
        let point = HandoverPoint::listen(&name).expect("listen");
        assert_eq!(
            HandoverPoint::listen(&name).map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::AddrInUse)
        );
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
        let tcp_addr = tcp.local_addr().expect("addr");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let udp_addr = udp.local_addr().expect("addr");
        // A client connects before the hand-over; the old side never accepts it.
        let mut early = std::net::TcpStream::connect(tcp_addr).expect("connect");
        let old = tokio::spawn(async move {
            let stream = point.accept().await.expect("accept");
            let sockets = vec![
                ("https".to_owned(), tcp.as_fd()),
                ("mesh".to_owned(), udp.as_fd()),
            ];
            let pipe = offer(&stream, 7, &sockets).expect("offer");
            let ready = await_ready(stream).await;
            let mut buf = [0u8; 16];
            let n = pipe.recv(&mut buf).expect("pipe");
            (ready, buf[..n].to_vec())
        });
        let taking = name.clone();
        let mut new = tokio::task::spawn_blocking(move || take_over(&taking))
            .await
            .expect("join")
            .expect("take over");
        assert_eq!(new.generation, 7);
        let tcp = std::net::TcpListener::from(new.take("https").expect("https"));
        let udp = std::net::UdpSocket::from(new.take("mesh").expect("mesh"));
        assert_eq!(tcp.local_addr().expect("addr"), tcp_addr);
        assert_eq!(udp.local_addr().expect("addr"), udp_addr);
        assert!(new.take("admin").is_none());
        new.take_pipe()
            .expect("pipe")
            .send(b"through")
            .expect("pipe");
        let (mut accepted, _) = tcp.accept().expect("the queued connection");
        early.write_all(b"hi").expect("write");
        let mut two = [0u8; 2];
        accepted.read_exact(&mut two).expect("read");
        assert_eq!(&two, b"hi");
        new.ready().expect("ready");
        let (ready, piped) = old.await.expect("old side");
        assert!(ready);
        assert_eq!(piped, b"through");
        assert!(matches!(
            take_over(&format!("{name}-nobody")),
            Err(HandoverError::NoneRunning(_))
        ));
    }
}
