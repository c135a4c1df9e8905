//! Users' TLS connections on rustls's unbuffered API, so that an idle connection holds no
//! buffer at all.
//!
//! rustls's buffered `ServerConnection` (what tokio-rustls drives) keeps a receive buffer
//! of at least 4 KiB per connection for as long as it lives: at 19,000 idle websockets
//! that buffer alone is 76 MiB of the edge. Here the caller owns the buffers. Ciphertext
//! is read into a per-thread scratch buffer and decrypted there, and records are encrypted
//! into another; a connection keeps bytes of its own only while they are in flight: the
//! start of a record whose rest is still on the way, plaintext the reader had no room for
//! yet, and ciphertext the socket has not taken yet. Each is freed when it empties.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest TLS record on the wire: 16 KiB of plaintext, plus what TLS 1.2 allows for
/// padding and tag, plus the header (RFC 8446 §5.2, RFC 5246 §6.2.3).
const MAX_RECORD: usize = 16 * 1024 + 2048 + 5;

/// The most received ciphertext a connection may hold unprocessed. rustls joins a
/// handshake message sent in fragments inside the caller's buffer, records and all, until
/// the message is whole; a message is at most 64 KiB (rustls's own limit), so a peer that
/// needs more is refused, as rustls's buffered API refuses it ("message buffer full").
const MAX_HELD: usize = 0xffff + MAX_RECORD;

/// Plaintext taken per write: large enough for full records, small enough that the
/// ciphertext waiting for the socket stays bounded.
const WRITE_CHUNK: usize = 64 * 1024;

/// Ciphertext waiting for the socket beyond which writes wait for it to drain.
const MAX_UNSENT: usize = 2 * WRITE_CHUNK;

/// Per-record overhead of the ciphers rustls offers (header, explicit nonce, tag, type).
const RECORD_OVERHEAD: usize = 5 + 8 + 16 + 1;

/// Room for the ciphertext of one write.
const SEAL_ROOM: usize = WRITE_CHUNK + WRITE_CHUNK.div_ceil(16 * 1024) * RECORD_OVERHEAD;

thread_local! {
    /// Where received ciphertext is processed: a connection's held bytes, then what the
    /// socket gave behind them. One per thread, used only inside a poll.
    static OPEN: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_HELD + 2 * MAX_RECORD]);
    /// Where a write is encrypted when nothing is waiting for the socket before it.
    static SEAL: RefCell<Vec<u8>> = RefCell::new(vec![0; SEAL_ROOM]);
}

/// Runs `f` on this thread's buffer in `cell`, or on a fresh one of `len` bytes if a poll
/// on this thread already holds it (a TLS stream polled from inside another's poll).
fn with_scratch<R>(
    cell: &'static std::thread::LocalKey<RefCell<Vec<u8>>>,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> R,
) -> R {
    cell.with(|c| match c.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf[..]),
        Err(_) => f(&mut vec![0; len]),
    })
}

/// A server-side TLS connection over `io`, after its handshake.
pub struct TlsStream<IO> {
    io: IO,
    session: Session,
}

/// A connection's TLS state apart from its socket.
struct Session {
    conn: UnbufferedServerConnection,
    /// Ciphertext received and not yet processed: the start of a record whose rest is
    /// still on the way (or of a handshake message in fragments).
    held: Vec<u8>,
    /// Decrypted data the reader had no room for.
    plaintext: Vec<u8>,
    /// How much of `plaintext` has been read.
    plaintext_read: usize,
    /// Ciphertext for the peer that the socket has not taken yet.
    outgoing: Vec<u8>,
    /// How much of `outgoing` has been written.
    outgoing_sent: usize,
    /// The peer closed (close_notify, or the socket's end): reads return 0.
    read_closed: bool,
    /// A close_notify has been queued: writes are refused.
    write_closed: bool,
}

/// Runs the server side of a handshake over `io` with `config`.
pub async fn accept<IO>(config: Arc<ServerConfig>, io: IO) -> io::Result<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut stream = TlsStream {
        io,
        session: Session {
            conn,
            held: Vec::new(),
            plaintext: Vec::new(),
            plaintext_read: 0,
            outgoing: Vec::new(),
            outgoing_sent: 0,
            read_closed: false,
            write_closed: false,
        },
    };
    poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What processing the received ciphertext came to.
#[derive(Debug, PartialEq, Eq)]
enum Processed {
    /// Everything complete has been processed: more must be read.
    NeedsData,
    /// The peer closed its side cleanly.
    PeerClosed,
}

/// What runs where rustls lets data be encrypted: the state and `outgoing`.
type Encrypt<'a> =
    dyn FnMut(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> io::Result<()> + 'a;

/// Where one call into rustls left the connection.
#[derive(Debug)]
enum Step {
    /// Something was done (plaintext delivered, records encoded): call again.
    Again,
    /// Everything complete has been processed and data may be sent: more must be read.
    NeedsData,
    /// The handshake needs more from the peer.
    Blocked,
    /// The data asked for was encrypted.
    Wrote,
    /// The peer closed its side cleanly.
    PeerClosed,
    /// Both sides closed.
    Closed,
}

impl<IO> TlsStream<IO> {
    /// The rustls connection: ALPN, SNI, the negotiated version.
    pub fn connection(&self) -> &UnbufferedServerConnection {
        &self.session.conn
    }

    /// The same connection over `f(io)`: the socket handed from one runtime to another.
    pub fn map_io<T>(self, f: impl FnOnce(IO) -> io::Result<T>) -> io::Result<TlsStream<T>> {
        Ok(TlsStream {
            io: f(self.io)?,
            session: self.session,
        })
    }
}

impl Session {
    /// Processes `buf[*start..]`, moving `*start` past what rustls is done with:
    /// plaintext goes to `out` and past its room to `plaintext`, records rustls sends
    /// (handshake, key update, alerts) to `outgoing`.
    fn process(
        &mut self,
        buf: &mut [u8],
        start: &mut usize,
        out: &mut ReadBuf<'_>,
    ) -> io::Result<Processed> {
        loop {
            match self.step(buf, start, out, None)? {
                Step::Again => {}
                // (No write was asked for: `Wrote` does not come.)
                Step::NeedsData | Step::Blocked | Step::Wrote => {
                    return Ok(Processed::NeedsData);
                }
                Step::PeerClosed | Step::Closed => return Ok(Processed::PeerClosed),
            }
        }
    }

    /// One call into rustls over `buf[*start..]`, moving `*start` past what rustls is
    /// done with: plaintext goes to `out` and past its room to `plaintext`, records rustls
    /// sends to `outgoing`, and where data may be encrypted, `write` (if any) runs. On a
    /// TLS error, rustls's alert for the peer goes to `outgoing` too.
    fn step(
        &mut self,
        buf: &mut [u8],
        start: &mut usize,
        out: &mut ReadBuf<'_>,
        write: Option<&mut Encrypt<'_>>,
    ) -> io::Result<Step> {
        let status = self.conn.process_tls_records(&mut buf[*start..]);
        let mut discard = status.discard;
        let state = match status.state {
            Ok(state) => state,
            Err(e) => {
                *start += discard;
                self.queue_alert(&mut buf[*start..]);
                return Err(tls_error(e));
            }
        };
        let step = match state {
            ConnectionState::ReadTraffic(mut records) => {
                while let Some(record) = records.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    deliver(record.payload, out, &mut self.plaintext);
                }
                Step::Again
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                encode_into(&mut self.outgoing, 4096, |room| encode.encode(room))?;
                Step::Again
            }
            // The records just encoded go out with the next flush, in order.
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                Step::Again
            }
            ConnectionState::WriteTraffic(mut traffic) => match write {
                Some(write) => {
                    write(&mut traffic, &mut self.outgoing)?;
                    Step::Wrote
                }
                None => Step::NeedsData,
            },
            ConnectionState::BlockedHandshake => Step::Blocked,
            ConnectionState::PeerClosed => Step::PeerClosed,
            ConnectionState::Closed => Step::Closed,
            // Early data is off (`max_early_data_size` is 0), and rustls may add states.
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected TLS state {other:?}"),
                ));
            }
        };
        *start += discard;
        Ok(step)
    }

    /// Moves waiting plaintext into `out`; true if there was any.
    fn take_plaintext(&mut self, out: &mut ReadBuf<'_>) -> bool {
        let waiting = &self.plaintext[self.plaintext_read..];
        if waiting.is_empty() {
            return false;
        }
        let n = waiting.len().min(out.remaining());
        out.put_slice(&waiting[..n]);
        self.plaintext_read += n;
        if self.plaintext_read == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plaintext_read = 0;
        }
        true
    }

    /// After an error, rustls has an alert for the peer (what went wrong, for its logs):
    /// it goes to `outgoing`, for one last try at sending.
    fn queue_alert(&mut self, buf: &mut [u8]) {
        let status = self.conn.process_tls_records(buf);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state {
            let _ = encode_into(&mut self.outgoing, 64, |room| encode.encode(room));
        }
    }

    /// Runs the connection up to the state where data may be encrypted, keeping what it
    /// produces on the way (handshake records, plaintext), and hands that state to `f`
    /// with `outgoing`.
    fn with_write_traffic<R>(
        &mut self,
        f: impl FnOnce(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> io::Result<R>,
    ) -> io::Result<R> {
        let mut held = std::mem::take(&mut self.held);
        let mut f = Some(f);
        let mut result = None;
        let mut write = |traffic: &mut WriteTraffic<'_, ServerConnectionData>,
                         outgoing: &mut Vec<u8>| {
            let f = f
                .take()
                .ok_or_else(|| io::Error::other("TLS write state reached twice"))?;
            result = Some(f(traffic, outgoing)?);
            Ok(())
        };
        // Plaintext completed by bytes already held is kept for the next read.
        let mut none = [0u8; 0];
        let mut keep = ReadBuf::new(&mut none);
        let mut start = 0;
        let outcome = loop {
            match self.step(&mut held, &mut start, &mut keep, Some(&mut write)) {
                Ok(Step::Again) => {}
                // Seen here first, the peer's close_notify still ends the reading.
                Ok(Step::PeerClosed) => self.read_closed = true,
                Ok(Step::Wrote) => break Ok(()),
                Ok(other) => {
                    break Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        format!("cannot write in TLS state {other:?}"),
                    ));
                }
                Err(e) => break Err(e),
            }
        };
        held.drain(..start.min(held.len()));
        self.held = if held.is_empty() { Vec::new() } else { held };
        outcome?;
        result.ok_or_else(|| io::Error::other("TLS write state never reached"))
    }
}

/// Copies a record's plaintext into the reader's buffer, and what does not fit behind
/// what is already waiting.
fn deliver(payload: &[u8], out: &mut ReadBuf<'_>, plaintext: &mut Vec<u8>) {
    let direct = if plaintext.is_empty() {
        payload.len().min(out.remaining())
    } else {
        0
    };
    out.put_slice(&payload[..direct]);
    plaintext.extend_from_slice(&payload[direct..]);
}

/// Appends to `outgoing` what `write` puts into `room` bytes, or into the room it asks
/// for if that was too little.
fn encode_into<E>(
    outgoing: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> io::Result<()>
where
    E: Into<Encoding>,
{
    loop {
        let len = outgoing.len();
        outgoing.resize(len + room, 0);
        let result = write(&mut outgoing[len..]).map_err(Into::into);
        outgoing.truncate(len + *result.as_ref().unwrap_or(&0));
        match result {
            Ok(_) => return Ok(()),
            Err(Encoding::TooSmall(InsufficientSizeError { required_size }))
                if required_size > room =>
            {
                room = required_size;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The errors of encoding a handshake record and of encrypting data, as one.
#[derive(Debug)]
enum Encoding {
    TooSmall(InsufficientSizeError),
    Failed(String),
}

impl From<EncodeError> for Encoding {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::InsufficientSize(s) => Self::TooSmall(s),
            other => Self::Failed(other.to_string()),
        }
    }
}

impl From<EncryptError> for Encoding {
    fn from(e: EncryptError) -> Self {
        match e {
            EncryptError::InsufficientSize(s) => Self::TooSmall(s),
            other => Self::Failed(other.to_string()),
        }
    }
}

impl From<Encoding> for io::Error {
    fn from(e: Encoding) -> Self {
        match e {
            Encoding::TooSmall(InsufficientSizeError { required_size }) => io::Error::other(
                format!("encoding a TLS record: rustls wants {required_size} bytes of room"),
            ),
            Encoding::Failed(why) => io::Error::other(format!("encoding a TLS record: {why}")),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Application data the client sent right behind its Finished is kept for the
        // first read.
        let mut none = [0u8; 0];
        let mut sink = ReadBuf::new(&mut none);
        loop {
            ready!(self.poll_send(cx))?;
            if !self.session.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            let (n, processed) = ready!(self.poll_fill(cx, &mut sink))?;
            if n == 0 || processed == Processed::PeerClosed {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Writes `outgoing` to the socket until it is empty.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.session.outgoing_sent < self.session.outgoing.len() {
            let n = ready!(
                Pin::new(&mut self.io)
                    .poll_write(cx, &self.session.outgoing[self.session.outgoing_sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.session.outgoing_sent += n;
        }
        self.session.outgoing = Vec::new();
        self.session.outgoing_sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads from the socket and processes what came behind the bytes held, in the
    /// thread's scratch buffer; keeps what is left (a partial record). Returns how much
    /// arrived. On a TLS error, the alert rustls has for the peer gets one try.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<(usize, Processed)>> {
        let result = with_scratch(&OPEN, MAX_HELD + 2 * MAX_RECORD, |scratch| {
            let held = self.session.held.len();
            scratch[..held].copy_from_slice(&self.session.held);
            let mut buf = ReadBuf::new(&mut scratch[held..]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            let n = buf.filled().len();
            let mut start = 0;
            let processed = self
                .session
                .process(&mut scratch[..held + n], &mut start, out);
            self.session.held.clear();
            self.session
                .held
                .extend_from_slice(&scratch[start..held + n]);
            if self.session.held.is_empty() {
                self.session.held = Vec::new();
            } else if self.session.held.len() > MAX_HELD {
                self.session.held = Vec::new();
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the peer sent more than a TLS handshake message may hold",
                )));
            }
            Poll::Ready(processed.map(|p| (n, p)))
        });
        if let Poll::Ready(Err(_)) = &result {
            let _ = self.poll_send(cx);
        }
        result
    }

    /// Encrypts `data` and gives the socket what it takes now; the rest waits in
    /// `outgoing` for the next write or flush. With nothing waiting before it, the data is
    /// encrypted in the thread's scratch buffer and only what the socket leaves is kept.
    fn seal_and_send(&mut self, cx: &mut Context<'_>, data: &[u8]) -> io::Result<()> {
        let records = data.len().div_ceil(16 * 1024).max(1);
        let room = data.len() + records * RECORD_OVERHEAD;
        if !self.session.outgoing.is_empty() || room > SEAL_ROOM {
            self.session.with_write_traffic(|write, outgoing| {
                encode_into(outgoing, room, |room| write.encrypt(data, room))
            })?;
            return match self.poll_send(cx) {
                Poll::Ready(Err(e)) => Err(e),
                _ => Ok(()),
            };
        }
        with_scratch(&SEAL, SEAL_ROOM, |scratch| {
            // Handshake records rustls has to send first (a key update) land in
            // `outgoing`, and the data goes behind them there.
            let sealed = self.session.with_write_traffic(|write, outgoing| {
                if outgoing.is_empty() {
                    match write.encrypt(data, scratch) {
                        Ok(len) => return Ok(Some(len)),
                        // More room than reckoned: `outgoing` grows to what rustls asks.
                        Err(EncryptError::InsufficientSize(_)) => {}
                        Err(e) => return Err(Encoding::from(e).into()),
                    }
                }
                encode_into(outgoing, room, |room| write.encrypt(data, room)).map(|()| None)
            })?;
            let mut sent = 0;
            if let Some(len) = sealed {
                while sent < len {
                    match Pin::new(&mut self.io).poll_write(cx, &scratch[sent..len]) {
                        Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                        Poll::Ready(Ok(n)) => sent += n,
                        Poll::Ready(Err(e)) => return Err(e),
                        Poll::Pending => break,
                    }
                }
                self.session.outgoing.extend_from_slice(&scratch[sent..len]);
                return Ok(());
            }
            match self.poll_send(cx) {
                Poll::Ready(Err(e)) => Err(e),
                _ => Ok(()),
            }
        })
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 || this.session.take_plaintext(out) {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.session.read_closed {
                return Poll::Ready(Ok(()));
            }
            // Records rustls answers (a key update) go out as they come; a socket that
            // does not take them yet gets them with the next write or flush.
            if this.session.outgoing_sent < this.session.outgoing.len() {
                let _ = this.poll_send(cx)?;
            }
            let before = out.filled().len();
            let (n, processed) = ready!(this.poll_fill(cx, out))?;
            if processed == Processed::PeerClosed {
                this.session.read_closed = true;
            } else if n == 0 {
                // The socket ended without close_notify. Between records that is an end
                // like any other (browsers close this way); inside one, it is a cut.
                this.session.read_closed = true;
                if !this.session.held.is_empty() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed in the middle of a TLS record",
                    )));
                }
            }
            if out.filled().len() > before || this.session.take_plaintext(out) {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.session.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // Ciphertext waiting beyond the bound is written out before more is taken.
        if this.session.outgoing.len() - this.session.outgoing_sent >= MAX_UNSENT {
            ready!(this.poll_send(cx))?;
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(WRITE_CHUNK)];
        this.seal_and_send(cx, data)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.session.write_closed {
            this.session.write_closed = true;
            this.session.with_write_traffic(|write, outgoing| {
                encode_into(outgoing, 64, |room| write.queue_close_notify(room))
            })?;
        }
        ready!(this.poll_send(cx))?;
        // A peer already gone has nothing left to be told.
        match ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    /// A server config with a fresh self-signed certificate for `localhost`, and a
    /// client config trusting it.
    pub(crate) fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        configs_for(rustls::DEFAULT_VERSIONS)
    }

    fn configs_for(
        client_versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let der = cert.cert.der().clone();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(client_versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    type Pair = (
        TlsStream<DuplexStream>,
        tokio_rustls::client::TlsStream<DuplexStream>,
    );

    async fn pair(window: usize) -> Pair {
        pair_with(window, configs()).await
    }

    async fn pair_with(
        window: usize,
        (server_config, client_config): (Arc<ServerConfig>, Arc<rustls::ClientConfig>),
    ) -> Pair {
        let (a, b) = tokio::io::duplex(window);
        let connector = tokio_rustls::TlsConnector::from(client_config);
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let (server, client) = tokio::join!(accept(server_config, a), connector.connect(name, b));
        (
            server.expect("server handshake"),
            client.expect("client handshake"),
        )
    }

    fn idle_holds_nothing<IO>(s: &TlsStream<IO>) {
        assert_eq!(s.session.held.capacity(), 0, "receive buffer kept");
        assert_eq!(s.session.plaintext.capacity(), 0, "plaintext buffer kept");
        assert_eq!(s.session.outgoing.capacity(), 0, "send buffer kept");
    }

    /// A pattern that shows any byte out of place.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn echoes_a_megabyte_through_small_reads_and_holds_no_buffer_when_idle() {
        let (mut server, client) = pair(8 * 1024).await;
        idle_holds_nothing(&server);
        let data = pattern(1 << 20);
        let echo = tokio::spawn(async move {
            // Reads of odd small sizes: records arrive split across reads, and plaintext
            // waits for the reader.
            let mut buf = vec![0u8; 1000];
            let mut total = 0;
            while total < 1 << 20 {
                let want = 1 + total % 997;
                let n = server.read(&mut buf[..want]).await.expect("server read");
                assert!(n > 0, "early end");
                server.write_all(&buf[..n]).await.expect("server write");
                total += n;
            }
            server.flush().await.expect("flush");
            server
        });
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let writer = async {
            for chunk in data.chunks(70_001) {
                to_server.write_all(chunk).await.expect("client write");
            }
            to_server.flush().await.expect("client flush");
        };
        let mut back = vec![0u8; 1 << 20];
        let (_, read) = tokio::join!(writer, from_server.read_exact(&mut back));
        read.expect("client read");
        assert!(back == data, "the echo differs");
        let server = echo.await.expect("echo task");
        idle_holds_nothing(&server);
    }

    #[tokio::test]
    async fn speaks_tls_1_2_to_a_client_that_offers_only_that() {
        let configs = configs_for(&[&rustls::version::TLS12]);
        let (mut server, mut client) = pair_with(1 << 20, configs).await;
        assert_eq!(
            server.connection().protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        let data = pattern(100_000);
        client.write_all(&data).await.expect("write");
        client.flush().await.expect("flush");
        let mut got = vec![0u8; data.len()];
        server.read_exact(&mut got).await.expect("read");
        assert!(got == data);
        server.write_all(&data).await.expect("write back");
        server.flush().await.expect("flush");
        client.read_exact(&mut got).await.expect("read back");
        assert!(got == data);
    }

    #[tokio::test]
    async fn close_notify_ends_both_directions() {
        let (mut server, mut client) = pair(64 * 1024).await;
        client.write_all(b"last words").await.expect("write");
        client.shutdown().await.expect("client shutdown");
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("server reads to the end");
        assert_eq!(got, b"last words");
        server
            .write_all(b"reply")
            .await
            .expect("server writes after the peer closed");
        server.shutdown().await.expect("server shutdown");
        let mut reply = Vec::new();
        client
            .read_to_end(&mut reply)
            .await
            .expect("client reads to a clean end");
        assert_eq!(reply, b"reply");
        assert!(
            server.write_all(b"more").await.is_err(),
            "write after shutdown"
        );
    }

    #[tokio::test]
    async fn a_cut_inside_a_record_is_an_error_and_between_records_an_end() {
        // Between records: the socket just ends (what browsers do).
        let (mut server, client) = pair(64 * 1024).await;
        drop(client);
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).await.expect("an end"), 0);

        // Inside one: a record header promising more than comes.
        let (mut server, client) = pair(64 * 1024).await;
        let (mut raw, _) = client.into_inner();
        raw.write_all(&[0x17, 0x03, 0x03, 0x01, 0x00, 1, 2, 3])
            .await
            .expect("raw write");
        drop(raw);
        let err = server.read(&mut buf).await.expect_err("a cut record");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn garbage_fails_the_handshake_and_a_tampered_record_the_read() {
        let (server_config, _) = configs();
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let err = accept(server_config, a)
            .await
            .err()
            .expect("a refused handshake");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");

        let (mut server, client) = pair(64 * 1024).await;
        let (mut raw, _) = client.into_inner();
        // A well-formed application-data record whose tag cannot verify.
        let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x20];
        record.extend_from_slice(&[0xAA; 0x20]);
        raw.write_all(&record).await.expect("raw write");
        let mut buf = [0u8; 16];
        let err = server
            .read(&mut buf)
            .await
            .expect_err("a record that does not decrypt");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[tokio::test]
    async fn a_handshake_message_in_tiny_fragments_is_refused_past_the_bound() {
        // A ClientHello announcing 64 KiB, then sent a byte per record: rustls joins the
        // fragments inside our buffer, record headers and all, so what it would hold is
        // six times the message.
        let (server_config, _) = configs();
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(accept(server_config, a));
        let mut flight = vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0xff, 0xff];
        for _ in 0..20_000 {
            flight.extend_from_slice(&[0x16, 0x03, 0x03, 0x00, 0x01, 0x03]);
        }
        // The server may stop reading once it refuses: the write need not finish.
        let _ = tokio::time::timeout(Duration::from_secs(5), b.write_all(&flight)).await;
        let refused = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server kept holding fragments")
            .expect("task");
        let err = refused.err().expect("a refused handshake");
        assert!(
            err.to_string()
                .contains("more than a TLS handshake message may hold"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn data_keeps_flowing_across_a_key_update() {
        let (mut server, mut client) = pair(64 * 1024).await;
        client.write_all(b"before").await.expect("write");
        client
            .get_mut()
            .1
            .refresh_traffic_keys()
            .expect("key update");
        client.write_all(b" after").await.expect("write");
        client.flush().await.expect("flush");
        let mut got = [0u8; 12];
        server
            .read_exact(&mut got)
            .await
            .expect("read across the update");
        assert_eq!(&got, b"before after");
        server.write_all(b"still here").await.expect("write");
        server.flush().await.expect("flush");
        let mut reply = [0u8; 10];
        client.read_exact(&mut reply).await.expect("client read");
        assert_eq!(&reply, b"still here");
    }
}
