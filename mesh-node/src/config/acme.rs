//! The `[acme]` section: certificates from an ACME CA (RFC 8555, e.g. Let's Encrypt) for
//! the names it lists, kept on disk and renewed ahead of expiry.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use skylane_shared::config::{ConfigError, Validator};

/// `[acme]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSection {
    /// The CA's directory URL, e.g. Let's Encrypt's
    /// `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory_url: String,
    /// The host names to get certificates for, one certificate each (no wildcards: the
    /// HTTP-01 and TLS-ALPN-01 challenges cannot prove them).
    pub names: Vec<String>,
    /// Where the account key and the certificates are kept (relative to the config file).
    pub state_dir: PathBuf,
    /// Account contacts, `mailto:` URLs.
    #[serde(default)]
    pub contact: Vec<String>,
    /// You agree to the CA's terms of service (the CA refuses an account without it).
    pub terms_of_service_agreed: bool,
    /// `http-01` (default; the CA fetches a token from the plain-HTTP listener, port 80)
    /// or `tls-alpn-01` (the CA opens TLS with ALPN `acme-tls/1` on the HTTPS listener,
    /// port 443).
    #[serde(default = "default_challenge")]
    pub challenge: String,
    /// Renew a certificate this many days before it expires. Default 30.
    #[serde(default = "default_renew_before")]
    pub renew_before_days: u64,
    /// How often the certificates are checked. Default 12 hours.
    #[serde(default = "default_check_interval")]
    pub check_interval_s: u64,
    /// A PEM file with the CA root that signs the ACME server's own HTTPS certificate, for a
    /// test CA such as Pebble; default: the system's roots.
    pub ca_file: Option<PathBuf>,
}

fn default_challenge() -> String {
    "http-01".into()
}
fn default_renew_before() -> u64 {
    30
}
fn default_check_interval() -> u64 {
    12 * 3600
}

/// How the CA is shown that this edge answers for a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChallengeKind {
    /// A token under `/.well-known/acme-challenge/` on port 80.
    Http01,
    /// A self-signed certificate for ALPN `acme-tls/1` on port 443.
    TlsAlpn01,
}

/// The validated `[acme]` section.
#[derive(Clone, Debug)]
pub struct Acme {
    /// Directory URL.
    pub directory_url: String,
    /// Names, lowercased.
    pub names: Vec<String>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Contacts.
    pub contact: Vec<String>,
    /// The challenge to use.
    pub challenge: ChallengeKind,
    /// Renew when less than this is left.
    pub renew_before: Duration,
    /// Time between checks.
    pub check_interval: Duration,
    /// Root for the ACME server's HTTPS, if not the system's.
    pub ca_file: Option<PathBuf>,
}

/// Checks `[acme]` against the listeners it needs.
pub fn validate(
    v: &Validator,
    section: Option<&AcmeSection>,
    has_http: bool,
    has_https: bool,
) -> Result<Option<Acme>, ConfigError> {
    let Some(s) = section else {
        return Ok(None);
    };
    if !s.directory_url.starts_with("https://") {
        return Err(v.invalid(
            "acme.directory_url",
            "must be an https:// URL (ACME runs over HTTPS)",
        ));
    }
    if !s.terms_of_service_agreed {
        return Err(v.invalid(
            "acme.terms_of_service_agreed",
            "set it to true once you have read and accept the CA's terms of service",
        ));
    }
    if s.names.is_empty() {
        return Err(v.invalid("acme.names", "name at least one host"));
    }
    let mut names = Vec::new();
    for (i, n) in s.names.iter().enumerate() {
        let n = n.trim_end_matches('.').to_ascii_lowercase();
        let valid = !n.is_empty()
            && n.len() <= 253
            && n.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !valid {
            return Err(v.invalid(
                format!("acme.names[{i}]"),
                format!("{n:?} is not a host name (wildcards cannot be proven by HTTP-01 or TLS-ALPN-01)"),
            ));
        }
        names.push(n);
    }
    for (i, c) in s.contact.iter().enumerate() {
        if !c.starts_with("mailto:") {
            return Err(v.invalid(format!("acme.contact[{i}]"), "a contact is a mailto: URL"));
        }
    }
    let challenge = match s.challenge.as_str() {
        "http-01" if !has_http => {
            return Err(v.invalid(
                "acme.challenge",
                "http-01 is answered on the plain-HTTP listener: configure [http] (port 80)",
            ));
        }
        "http-01" => ChallengeKind::Http01,
        "tls-alpn-01" if !has_https => {
            return Err(v.invalid(
                "acme.challenge",
                "tls-alpn-01 is answered on the HTTPS listener: configure [https] (port 443)",
            ));
        }
        "tls-alpn-01" => ChallengeKind::TlsAlpn01,
        other => {
            return Err(v.invalid(
                "acme.challenge",
                format!("{other:?}: use \"http-01\" or \"tls-alpn-01\""),
            ));
        }
    };
    Ok(Some(Acme {
        directory_url: s.directory_url.clone(),
        names,
        state_dir: v.relative(&s.state_dir),
        contact: s.contact.clone(),
        challenge,
        renew_before: Duration::from_secs(
            86_400 * v.in_range("acme.renew_before_days", s.renew_before_days, 1..=3650)?,
        ),
        check_interval: Duration::from_secs(v.in_range(
            "acme.check_interval_s",
            s.check_interval_s,
            1..=7 * 86_400,
        )?),
        ca_file: s.ca_file.as_ref().map(|f| v.relative(f)),
    }))
}
