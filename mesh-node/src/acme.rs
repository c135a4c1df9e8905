//! Certificates from an ACME CA (RFC 8555) with `instant-acme`: per name in `[acme]`, an
//! order proven by HTTP-01 (on the plain-HTTP listener) or TLS-ALPN-01 (RFC 8737, on the
//! HTTPS listener); the certificate and its key kept in `state_dir`, loaded at start, and
//! renewed `renew_before_days` ahead of expiry, without a restart.
//!
//! DNS may send the CA's validation request to any edge of the mesh, not the one that
//! placed the order, so the answers travel on the mesh bulletin: the ordering edge posts
//! the key authorization (`acme-http/<token>` or `acme-alpn/<name>`) and every edge answers
//! from it. A key authorization is public by design (the CA fetches it over plain HTTP);
//! the bulletin only takes it from members.
//!
//! Each edge orders its own certificate (its key never leaves it). A CA limits duplicate
//! certificates (Let's Encrypt: 5 per exact set of names per week), which bounds how many
//! edges can share a name this way; see `docs/deploy.md`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use skylane_shared::mesh::control::MeshControl;
use tokio_util::sync::CancellationToken;

use crate::config::acme::{Acme as AcmeConfig, ChallengeKind};

/// Bulletin key prefix of HTTP-01 answers; the key ends with the token.
pub const HTTP_KEY_PREFIX: &str = "acme-http/";
/// Bulletin key prefix of TLS-ALPN-01 answers; the key ends with the name.
pub const ALPN_KEY_PREFIX: &str = "acme-alpn/";
/// The ALPN protocol of TLS-ALPN-01.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// How long a posted answer stays on the bulletin.
const ANSWER_TTL: Duration = Duration::from_secs(600);
/// Time for a posted answer to reach every edge before the CA is told to look.
const SPREAD: Duration = Duration::from_millis(500);
/// First retry after a failed order; doubles up to the check interval.
const RETRY_MIN: Duration = Duration::from_secs(60);

/// What `/status` shows of one name.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NameStatus {
    /// The host name.
    pub name: String,
    /// When its certificate expires (Unix seconds), if it has one.
    pub not_after_unix: Option<i64>,
    /// The last attempt's error, cleared by a success.
    pub last_error: Option<String>,
    /// Certificates obtained since start.
    pub issued: u64,
}

/// The edge's ACME state: its certificates, and the answers to challenges of the mesh.
pub struct Acme {
    config: AcmeConfig,
    control: Arc<MeshControl>,
    certs: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// TLS-ALPN-01 certificates made from the bulletin's answers, by name, with the key
    /// authorization each was made for.
    alpn: Mutex<HashMap<String, (String, Arc<CertifiedKey>)>>,
    status: Mutex<HashMap<String, NameStatus>>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("names", &self.config.names)
            .finish_non_exhaustive()
    }
}

impl Acme {
    /// The state for `config`, with the certificates already in `state_dir` loaded.
    pub fn new(config: AcmeConfig, control: Arc<MeshControl>) -> Arc<Self> {
        let acme = Arc::new(Self {
            control,
            certs: RwLock::new(HashMap::new()),
            alpn: Mutex::new(HashMap::new()),
            status: Mutex::new(
                config
                    .names
                    .iter()
                    .map(|n| {
                        (
                            n.clone(),
                            NameStatus {
                                name: n.clone(),
                                ..NameStatus::default()
                            },
                        )
                    })
                    .collect(),
            ),
            config,
        });
        for name in &acme.config.names {
            match acme.load(name) {
                Ok(Some(not_after)) => {
                    tracing::info!(%name, not_after, "ACME certificate loaded from disk");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%name, error = %e, "stored ACME certificate unusable; ordering a new one")
                }
            }
        }
        acme
    }

    /// The certificate for `name`, if ACME got one.
    pub fn certificate_for(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.certs.read().ok()?.get(name).cloned()
    }

    /// The HTTP-01 answer for `token`, if any edge of the mesh posted one.
    pub fn http01_answer(&self, token: &str) -> Option<String> {
        let key = format!("{HTTP_KEY_PREFIX}{token}");
        self.bulletin_value(&key)
    }

    /// The TLS-ALPN-01 certificate for `name`, made from the answer an edge posted.
    pub fn alpn_certificate(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.to_ascii_lowercase();
        let key_authorization = self.bulletin_value(&format!("{ALPN_KEY_PREFIX}{name}"))?;
        let mut made = self.alpn.lock().ok()?;
        if let Some((for_auth, cert)) = made.get(&name)
            && *for_auth == key_authorization
        {
            return Some(cert.clone());
        }
        match alpn_challenge_certificate(&name, &key_authorization) {
            Ok(cert) => {
                // One entry per configured or asked-for name, replaced as answers change;
                // names nobody posted an answer for never get here.
                made.insert(name, (key_authorization, cert.clone()));
                Some(cert)
            }
            Err(e) => {
                tracing::warn!(%name, error = %e, "cannot make the TLS-ALPN-01 certificate");
                None
            }
        }
    }

    fn bulletin_value(&self, key: &str) -> Option<String> {
        self.control
            .read_bulletin(|b, now| {
                b.entries_with_prefix(key, now)
                    .find(|e| e.key == key)
                    .and_then(|e| String::from_utf8(e.value.clone()).ok())
            })
            .flatten()
    }

    /// Each name's state, for `/status`.
    pub fn status(&self) -> Vec<NameStatus> {
        let mut v: Vec<NameStatus> = self
            .status
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn set_status(&self, name: &str, f: impl FnOnce(&mut NameStatus)) {
        if let Ok(mut s) = self.status.lock()
            && let Some(st) = s.get_mut(name)
        {
            f(st);
        }
    }

    fn paths(&self, name: &str) -> (PathBuf, PathBuf) {
        let dir = &self.config.state_dir;
        (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        )
    }

    /// Loads `name`'s stored certificate into service; its expiry, or `None` if there is
    /// none on disk.
    fn load(&self, name: &str) -> Result<Option<i64>, String> {
        let (cert, key) = self.paths(name);
        if !cert.exists() {
            return Ok(None);
        }
        let certified = crate::tls::load_certified_key(&cert, &key).map_err(|e| e.to_string())?;
        let not_after = not_after(&certified)?;
        self.install(name, certified, not_after);
        Ok(Some(not_after))
    }

    fn install(&self, name: &str, certified: CertifiedKey, not_after: i64) {
        if let Ok(mut certs) = self.certs.write() {
            certs.insert(name.to_owned(), Arc::new(certified));
        }
        self.set_status(name, |s| s.not_after_unix = Some(not_after));
        metrics::gauge!("skylane_acme_certificate_expiry_seconds", "name" => name.to_owned())
            .set(not_after as f64);
    }

    /// Keeps every name's certificate current until `stop`: orders what is missing or
    /// due, then checks again every `check_interval` (sooner after a failure).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut retry = RETRY_MIN;
        loop {
            let mut failed = false;
            for name in self.config.names.clone() {
                if !self.due(&name) {
                    continue;
                }
                let attempt = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = self.obtain(&name) => r,
                };
                match attempt {
                    Ok(not_after) => {
                        tracing::info!(%name, not_after, "ACME certificate obtained");
                        metrics::counter!("skylane_acme_orders_total", "result" => "issued")
                            .increment(1);
                        self.set_status(&name, |s| {
                            s.last_error = None;
                            s.issued += 1;
                        });
                    }
                    Err(e) => {
                        let e = format!("{e:#}");
                        tracing::warn!(%name, error = %e, "ACME order failed; retrying later");
                        metrics::counter!("skylane_acme_orders_total", "result" => "failed")
                            .increment(1);
                        self.set_status(&name, |s| s.last_error = Some(e));
                        failed = true;
                    }
                }
            }
            let wait = if failed {
                let w = retry.min(self.config.check_interval);
                retry = (retry * 2).min(self.config.check_interval);
                w
            } else {
                retry = RETRY_MIN;
                self.config.check_interval
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Whether `name` has no certificate, or one that expires within `renew_before`.
    fn due(&self, name: &str) -> bool {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let not_after = self
            .status
            .lock()
            .ok()
            .and_then(|s| s.get(name).and_then(|s| s.not_after_unix));
        match not_after {
            None => true,
            Some(t) => t - now < self.config.renew_before.as_secs() as i64,
        }
    }

    /// One order for `name`: the answer posted mesh-wide, the CA told to look, the
    /// certificate fetched, stored and put in service. Its expiry.
    async fn obtain(&self, name: &str) -> anyhow::Result<i64> {
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(name.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => anyhow::bail!("authorization is {other:?}"),
            }
            let kind = match self.config.challenge {
                ChallengeKind::Http01 => ChallengeType::Http01,
                ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
            };
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| anyhow::anyhow!("the CA offers no {kind:?} challenge"))?;
            let key_authorization = challenge.key_authorization().as_str().to_owned();
            let key = match self.config.challenge {
                ChallengeKind::Http01 => format!("{HTTP_KEY_PREFIX}{}", challenge.token),
                ChallengeKind::TlsAlpn01 => format!("{ALPN_KEY_PREFIX}{name}"),
            };
            self.control
                .post(&key, key_authorization.into_bytes(), ANSWER_TTL)
                .map_err(|e| anyhow::anyhow!("cannot post the challenge answer: {e}"))?;
            tokio::time::sleep(SPREAD).await;
            challenge.set_ready().await?;
        }
        let retries = RetryPolicy::new().timeout(Duration::from_secs(90));
        let status = order.poll_ready(&retries).await?;
        if status != OrderStatus::Ready {
            anyhow::bail!("the order is {status:?}, not ready (the CA could not validate it)");
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&retries).await?;
        let (cert_path, key_path) = self.paths(name);
        write_private(&key_path, key_pem.as_bytes())?;
        write_private(&cert_path, chain_pem.as_bytes())?;
        let certified = crate::tls::load_certified_key(&cert_path, &key_path)?;
        let not_after = not_after(&certified).map_err(anyhow::Error::msg)?;
        self.install(name, certified, not_after);
        Ok(not_after)
    }

    /// The ACME account, from `state_dir/account.json` or newly created there.
    async fn account(&self) -> anyhow::Result<Account> {
        let builder = || -> anyhow::Result<instant_acme::AccountBuilder> {
            Ok(match &self.config.ca_file {
                Some(ca) => Account::builder_with_root(ca)?,
                None => Account::builder()?,
            })
        };
        let path = self.config.state_dir.join("account.json");
        if let Ok(bytes) = std::fs::read(&path) {
            let credentials: AccountCredentials = serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            return Ok(builder()?.from_credentials(credentials).await?);
        }
        let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory_url.clone(),
                None,
            )
            .await?;
        write_private(&path, &serde_json::to_vec_pretty(&credentials)?)?;
        tracing::info!(id = %account.id(), "ACME account created");
        Ok(account)
    }
}

/// Writes `bytes` to `path` readable by the owner only, through a temporary file and a
/// rename, so a crash never leaves half a key.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let dir = path
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", path.display()))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// The leaf certificate's expiry, Unix seconds.
fn not_after(certified: &CertifiedKey) -> Result<i64, String> {
    let leaf = certified
        .cert
        .first()
        .ok_or_else(|| "no certificate in the chain".to_owned())?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    Ok(parsed.validity().not_after.timestamp())
}

/// The self-signed certificate RFC 8737 asks for: `name` as its only SAN, and the SHA-256
/// of the key authorization in the critical acmeIdentifier extension.
fn alpn_challenge_certificate(
    name: &str,
    key_authorization: &str,
) -> Result<Arc<CertifiedKey>, String> {
    let digest = ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes());
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest.as_ref()));
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let private = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_alpn_certificate_carries_the_name_and_the_digest_rfc_8737_asks_for() {
        let cert = alpn_challenge_certificate("chat.test", "token.thumbprint").expect("made");
        let (_, parsed) =
            x509_parser::parse_x509_certificate(cert.cert[0].as_ref()).expect("parses");
        let san = parsed
            .subject_alternative_name()
            .expect("well formed")
            .expect("has a SAN");
        assert_eq!(san.value.general_names.len(), 1);
        assert!(format!("{:?}", san.value.general_names[0]).contains("chat.test"));
        // id-pe-acmeIdentifier (1.3.6.1.5.5.7.1.31), critical, an OCTET STRING of the
        // SHA-256 of the key authorization.
        let ext = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier present");
        assert!(ext.critical);
        let digest = ring::digest::digest(&ring::digest::SHA256, b"token.thumbprint");
        assert_eq!(&ext.value[2..], digest.as_ref());
        assert_eq!(&ext.value[..2], &[0x04, 32]);
        assert!(not_after(&cert).expect("has a validity") > 0);
    }
}
