//! Resolving `host:port` strings from config, honouring DNS TTLs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;

/// A resolved address and how long it may be used.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The addresses, in the resolver's order.
    pub addrs: Vec<SocketAddr>,
    /// When to resolve again (`None` for literal IP addresses, which never expire).
    pub valid_until: Option<Instant>,
}

/// Errors resolving an address.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Not `host:port`.
    #[error("{0:?} is not host:port")]
    Syntax(String),
    /// The lookup failed or found nothing.
    #[error("could not resolve {host:?}: {message}")]
    Lookup {
        /// The host name.
        host: String,
        /// The resolver's message.
        message: String,
    },
}

/// Shortest time we cache an answer, so a TTL of 0 doesn't turn into a query storm.
const MIN_TTL: Duration = Duration::from_secs(1);

/// Splits `host:port`, accepting `[v6]:port`.
pub fn split_host_port(s: &str) -> Result<(String, u16), ResolveError> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| ResolveError::Syntax(s.to_owned()))?;
    let port: u16 = port
        .parse()
        .map_err(|_| ResolveError::Syntax(s.to_owned()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(ResolveError::Syntax(s.to_owned()));
    }
    Ok((host.to_owned(), port))
}

/// A shared DNS resolver (system config, hosts file honoured).
#[derive(Clone)]
pub struct Resolver {
    inner: Option<TokioResolver>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    /// Builds a resolver from the system config; without one (no /etc/resolv.conf), only
    /// literal addresses and `localhost` resolve.
    pub fn from_system() -> Self {
        let inner = TokioResolver::builder_tokio()
            .ok()
            .and_then(|b| b.build().ok());
        Self { inner }
    }

    /// Resolves `host:port`.
    pub async fn resolve(&self, target: &str) -> Result<Resolved, ResolveError> {
        if let Ok(addr) = target.parse::<SocketAddr>() {
            return Ok(Resolved {
                addrs: vec![addr],
                valid_until: None,
            });
        }
        let (host, port) = split_host_port(target)?;
        if host.eq_ignore_ascii_case("localhost") {
            return Ok(Resolved {
                addrs: vec![SocketAddr::from(([127, 0, 0, 1], port))],
                valid_until: None,
            });
        }
        let Some(resolver) = &self.inner else {
            return Err(ResolveError::Lookup {
                host,
                message: "no DNS resolver configured on this system".into(),
            });
        };
        let lookup = resolver
            .lookup_ip(host.as_str())
            .await
            .map_err(|e| ResolveError::Lookup {
                host: host.clone(),
                message: e.to_string(),
            })?;
        let valid_until = lookup.valid_until().max(Instant::now() + MIN_TTL);
        let addrs: Vec<SocketAddr> = lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect();
        if addrs.is_empty() {
            return Err(ResolveError::Lookup {
                host,
                message: "no addresses".into(),
            });
        }
        Ok(Resolved {
            addrs,
            valid_until: Some(valid_until),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parsing() {
        assert_eq!(
            split_host_port("example.com:443").expect("ok"),
            ("example.com".into(), 443)
        );
        assert_eq!(split_host_port("[::1]:80").expect("ok"), ("::1".into(), 80));
        assert!(split_host_port("nope").is_err());
        assert!(split_host_port(":80").is_err());
        assert!(split_host_port("a:99999").is_err());
    }

    #[tokio::test]
    async fn literals_and_localhost_resolve_without_dns() {
        let r = Resolver::from_system();
        let a = r.resolve("127.0.0.1:7").await.expect("literal");
        assert_eq!(a.addrs, vec!["127.0.0.1:7".parse().expect("addr")]);
        assert!(a.valid_until.is_none());
        let l = r.resolve("localhost:8").await.expect("localhost");
        assert_eq!(l.addrs[0].port(), 8);
    }
}
