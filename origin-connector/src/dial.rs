//! How origin servers are reached: the kernel's TCP, or a TCP connection inside a
//! WireGuard tunnel (an edge serving an origin that sits behind a WireGuard endpoint, with
//! no connector beside it, runs this crate's forwarding in-process with that dialer).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use skylane_shared::wireguard::{WgStream, WgTunnel};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Where connections to origin servers are opened.
#[derive(Clone, Debug, Default)]
pub enum Dial {
    /// This machine's network.
    #[default]
    Kernel,
    /// Through a WireGuard tunnel.
    Wireguard(Arc<WgTunnel>),
}

impl Dial {
    /// A TCP connection to `addr`, within `timeout`.
    pub async fn tcp(&self, addr: SocketAddr, timeout: Duration) -> io::Result<OriginStream> {
        match self {
            Self::Kernel => {
                let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
                    .await
                    .map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("connect to {addr} timed out"),
                        )
                    })??;
                let _ = tcp.set_nodelay(true);
                Ok(OriginStream::Tcp(tcp))
            }
            Self::Wireguard(tunnel) => tunnel
                .connect(addr, timeout)
                .await
                .map(OriginStream::Wireguard)
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string())),
        }
    }
}

/// A connection to an origin server.
#[derive(Debug)]
pub enum OriginStream {
    /// Through the kernel.
    Tcp(TcpStream),
    /// Through a WireGuard tunnel.
    Wireguard(WgStream),
}

impl AsyncRead for OriginStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Wireguard(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for OriginStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Wireguard(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Wireguard(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Wireguard(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Wireguard(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Wireguard(s) => s.is_write_vectored(),
        }
    }
}
