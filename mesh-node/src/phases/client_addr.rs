//! Who the client is, and what the origin is told about it.
//!
//! The TCP peer is the client, unless the peer is a configured trusted proxy (a load
//! balancer in front of the edge). Then the client is what that proxy says: the source in
//! its PROXY protocol header (read before TLS, see [`read_proxy_header`]), or the
//! right-most address in `X-Forwarded-For` that is not itself a trusted proxy.
//!
//! Towards the origin, the edge writes `X-Forwarded-For`, `X-Real-IP` and `Forwarded`
//! itself. A client's own values are dropped, so nobody can tell the origin they are
//! someone else; only a trusted proxy's chain is kept, with the proxy appended.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::ClientAddress;
use crate::config::policy::canonical;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Where a connection comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The TCP peer.
    pub tcp: SocketAddr,
    /// The client a trusted proxy's PROXY header named, if any.
    pub proxied: Option<SocketAddr>,
}

impl Peer {
    /// A connection straight from `tcp`.
    pub fn direct(tcp: SocketAddr) -> Self {
        Self { tcp, proxied: None }
    }
}

impl ClientAddress {
    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(&ip))
    }

    /// The client of a request on a connection from `peer`.
    pub fn client(&self, peer: &Peer, headers: &HeaderMap) -> IpAddr {
        if let Some(p) = peer.proxied {
            return canonical(p.ip());
        }
        let tcp = canonical(peer.tcp.ip());
        if !self.is_trusted(tcp) {
            return tcp;
        }
        // Walk the chain from the right: the first hop that is not ours is the client.
        let chain = forwarded_for(headers);
        chain
            .iter()
            .rev()
            .copied()
            .find(|ip| !self.is_trusted(*ip))
            .or_else(|| chain.first().copied())
            .unwrap_or(tcp)
    }

    /// Rewrites the forwarding headers for the origin: `client` is what
    /// [`ClientAddress::client`] said; `scheme` and `authority` describe the request.
    pub fn set_forwarding_headers(
        &self,
        headers: &mut HeaderMap,
        peer: &Peer,
        client: IpAddr,
        scheme: &str,
        authority: &str,
    ) {
        let tcp = canonical(peer.tcp.ip());
        let from_trusted = self.is_trusted(tcp);
        if !from_trusted && peer.proxied.is_none() {
            headers.remove(http::header::FORWARDED);
            // A direct client, as almost every request comes: one rendering of its address
            // serves both headers that carry it alone (`insert` drops the client's own).
            let ip = ip_value(client);
            headers.insert(X_FORWARDED_FOR.clone(), ip.clone());
            headers.insert(X_REAL_IP.clone(), ip);
            if let Ok(v) = HeaderValue::from_str(&forwarded_element(client, scheme, authority)) {
                headers.insert(http::header::FORWARDED, v);
            }
            return;
        }
        let (xff, forwarded) = if let Some(proxied) = peer.proxied {
            let client = canonical(proxied.ip());
            (
                format!("{client}, {tcp}"),
                format!(
                    "{}, {}",
                    forwarded_element(client, scheme, authority),
                    forwarded_element(tcp, scheme, authority)
                ),
            )
        } else {
            // Keep the proxy's chain, and add the proxy itself, as every proxy does.
            let chain = joined(headers, &X_FORWARDED_FOR);
            let fwd = joined(headers, &http::header::FORWARDED);
            (
                append(chain, &tcp.to_string()),
                append(fwd, &forwarded_element(tcp, scheme, authority)),
            )
        };
        headers.remove(&X_FORWARDED_FOR);
        headers.remove(http::header::FORWARDED);
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        headers.insert(X_REAL_IP.clone(), ip_value(client));
        if let Ok(v) = HeaderValue::from_str(&forwarded) {
            headers.insert(http::header::FORWARDED, v);
        }
    }
}

/// An address as a header value, rendered on the stack (an address is at most 45 bytes).
fn ip_value(ip: IpAddr) -> HeaderValue {
    use std::io::Write as _;
    let mut buf = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // Neither can fail: the buffer holds the longest address, and its text is ASCII.
    let _ = write!(cursor, "{ip}");
    let len = cursor.position() as usize;
    HeaderValue::from_bytes(&buf[..len]).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let parts: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn append(chain: Option<String>, value: &str) -> String {
    match chain {
        Some(c) if !c.trim().is_empty() => format!("{c}, {value}"),
        _ => value.to_owned(),
    }
}

/// One `Forwarded` element (RFC 7239): IPv6 addresses are quoted and bracketed.
fn forwarded_element(ip: IpAddr, scheme: &str, authority: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(32 + scheme.len() + authority.len());
    // Writing to a String cannot fail.
    let _ = match ip {
        IpAddr::V6(v6) => write!(out, "for=\"[{v6}]\""),
        IpAddr::V4(v4) => write!(out, "for={v4}"),
    };
    out.push_str(";proto=");
    out.push_str(scheme);
    out.push_str(";host=\"");
    out.extend(
        authority
            .chars()
            .filter(|c| !matches!(c, '"' | '\\') && !c.is_control()),
    );
    out.push('"');
    out
}

/// The addresses in `X-Forwarded-For`, left to right; entries that are not addresses
/// (`unknown`, obfuscated names, garbage) are skipped.
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| {
            let s = s.trim().trim_start_matches('[');
            let s = s.split(']').next().unwrap_or(s);
            s.parse::<IpAddr>()
                .ok()
                .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        })
        .map(canonical)
        .take(64)
        .collect()
}

/// Why a PROXY protocol header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The connection failed or closed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    /// Not a PROXY header, or a malformed one.
    #[error("not a valid PROXY protocol header")]
    Invalid,
    /// It did not arrive in time.
    #[error("no PROXY header in time")]
    Timeout,
}

/// The longest PROXY header we accept (v2 with TLVs; v1 is at most 107 bytes).
const MAX_PROXY_HEADER: usize = 536;

/// Reads a PROXY protocol v1 or v2 header from `tcp` (a trusted proxy's connection),
/// leaving the bytes after it unread. Returns the client it names (`None` for `LOCAL`
/// or `UNKNOWN`: health checks of the proxy itself).
pub async fn read_proxy_header(
    tcp: &tokio::net::TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::PartialResult as _;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; MAX_PROXY_HEADER];
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .map_err(|_| ProxyHeaderError::Timeout)??;
        if n == 0 {
            return Err(ProxyHeaderError::Invalid);
        }
        let parsed = ppp::HeaderResult::parse(&buf[..n]);
        if parsed.is_incomplete() {
            if n == buf.len() {
                return Err(ProxyHeaderError::Invalid);
            }
            // The rest is on its way (proxies send the header in one segment, so this
            // is rare): look again shortly.
            tokio::time::sleep(Duration::from_millis(5)).await;
            if tokio::time::Instant::now() >= deadline {
                return Err(ProxyHeaderError::Timeout);
            }
            continue;
        }
        let (len, client) = match parsed {
            ppp::HeaderResult::V1(Ok(h)) => (
                h.header.len(),
                match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                    }
                    ppp::v1::Addresses::Unknown => None,
                },
            ),
            ppp::HeaderResult::V2(Ok(h)) => (
                h.len(),
                match (h.command, h.addresses) {
                    (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                        Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                    }
                    (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                        Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                    }
                    _ => None,
                },
            ),
            _ => return Err(ProxyHeaderError::Invalid),
        };
        if len == 0 || len > n {
            return Err(ProxyHeaderError::Invalid);
        }
        // Consume exactly the header; TLS (or HTTP) starts right after it.
        let mut consumed = 0;
        while consumed < len {
            tcp.readable().await?;
            match tcp.try_read(&mut buf[..len - consumed]) {
                Ok(0) => return Err(ProxyHeaderError::Invalid),
                Ok(k) => consumed += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::policy::Cidr;

    fn policy(trusted: &[&str]) -> ClientAddress {
        ClientAddress {
            trusted_proxies: trusted
                .iter()
                .map(|t| Cidr(t.parse().expect("cidr")))
                .collect(),
            proxy_protocol: false,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn a_client_cannot_claim_another_address() {
        let p = policy(&[]);
        let peer = Peer::direct("203.0.113.9:5000".parse().expect("addr"));
        let mut h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        let client = p.client(&peer, &h);
        assert_eq!(client.to_string(), "203.0.113.9");
        p.set_forwarding_headers(&mut h, &peer, client, "https", "example.com");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert_eq!(h["x-real-ip"], "203.0.113.9");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9;proto=https;host=\"example.com\""
        );
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn a_trusted_proxys_chain_is_kept_and_extended() {
        let p = policy(&["10.0.0.0/8"]);
        let peer = Peer::direct("10.1.1.1:5000".parse().expect("addr"));
        let mut h = headers(&[
            ("x-forwarded-for", "198.51.100.7, 10.2.2.2"),
            ("forwarded", "for=198.51.100.7"),
        ]);
        let client = p.client(&peer, &h);
        assert_eq!(client.to_string(), "198.51.100.7");
        p.set_forwarding_headers(&mut h, &peer, client, "https", "a.example");
        assert_eq!(h["x-forwarded-for"], "198.51.100.7, 10.2.2.2, 10.1.1.1");
        assert_eq!(h["x-real-ip"], "198.51.100.7");
        assert_eq!(
            h["forwarded"],
            "for=198.51.100.7, for=10.1.1.1;proto=https;host=\"a.example\""
        );
        // A forged left-most entry is not believed over the proxy's own addition.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7")]);
        assert_eq!(p.client(&peer, &h).to_string(), "198.51.100.7");
    }

    #[test]
    fn the_longest_address_and_a_hostile_host_are_written_whole_and_quoted() {
        let p = policy(&[]);
        let peer = Peer::direct(
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:5000"
                .parse()
                .expect("addr"),
        );
        let mut h = HeaderMap::new();
        let client = p.client(&peer, &h);
        p.set_forwarding_headers(&mut h, &peer, client, "https", "a\"b\\c.example");
        assert_eq!(h["x-real-ip"], "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe");
        assert_eq!(h["x-forwarded-for"], h["x-real-ip"]);
        assert_eq!(
            h["forwarded"],
            "for=\"[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]\";proto=https;host=\"abc.example\""
        );
    }

    #[test]
    fn a_proxy_header_names_the_client() {
        let p = policy(&["10.0.0.0/8"]);
        let peer = Peer {
            tcp: "10.1.1.1:5000".parse().expect("addr"),
            proxied: Some("[2001:db8::5]:443".parse().expect("addr")),
        };
        let mut h = headers(&[("x-forwarded-for", "6.6.6.6")]);
        let client = p.client(&peer, &h);
        assert_eq!(client.to_string(), "2001:db8::5");
        p.set_forwarding_headers(&mut h, &peer, client, "https", "a.example");
        assert_eq!(h["x-forwarded-for"], "2001:db8::5, 10.1.1.1");
        assert!(
            h["forwarded"]
                .to_str()
                .expect("text")
                .starts_with("for=\"[2001:db8::5]\"")
        );
    }

    #[tokio::test]
    async fn proxy_headers_v1_and_v2_are_read_and_consumed() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let v2 = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "192.0.2.10:40000".parse::<SocketAddr>().expect("addr"),
                "192.0.2.1:443".parse::<SocketAddr>().expect("addr"),
            ),
        )
        .build()
        .expect("v2 header");
        let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
            (
                b"PROXY TCP4 198.51.100.22 203.0.113.1 35646 443\r\n".to_vec(),
                Some("198.51.100.22:35646"),
            ),
            (b"PROXY UNKNOWN\r\n".to_vec(), None),
            (v2, Some("192.0.2.10:40000")),
        ];
        for (header, want) in cases {
            let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (server, _) = listener.accept().await.expect("accept");
            let mut sent = header.clone();
            sent.extend_from_slice(b"hello");
            client.write_all(&sent).await.expect("write");
            let got = read_proxy_header(&server, Duration::from_secs(2))
                .await
                .expect("header");
            assert_eq!(got.map(|a| a.to_string()).as_deref(), want);
            let mut rest = [0u8; 5];
            let mut server = server;
            server.read_exact(&mut rest).await.expect("rest");
            assert_eq!(&rest, b"hello");
        }
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        assert!(matches!(
            read_proxy_header(&server, Duration::from_secs(2)).await,
            Err(ProxyHeaderError::Invalid)
        ));
    }
}
