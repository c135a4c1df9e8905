//! Users' TLS: certificates from PEM files and from ACME, chosen by SNI, with ALPN `h2` and
//! `http/1.1` (and `acme-tls/1` for the CA's TLS-ALPN-01 validation when ACME is on).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::acme::{ACME_TLS_ALPN, Acme};
use crate::config::Https;

pub mod handshakes;
pub mod stream;

/// Errors loading certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the key or config.
    #[error("TLS config: {0}")]
    Config(String),
}

/// Picks a certificate by SNI: the CA's TLS-ALPN-01 validation gets its challenge
/// certificate; otherwise an ACME certificate for the exact name, then a configured one
/// for the exact name, then a `*.parent` wildcard, then the default (the first configured).
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    acme: Option<Arc<Acme>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(acme) = &self.acme {
            let validation = hello
                .alpn()
                .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
            if validation {
                return acme.alpn_certificate(&name);
            }
            if let Some(k) = acme.certificate_for(&name) {
                return Some(k);
            }
        }
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(k) = self.wildcard.get(parent)
        {
            return Some(k.clone());
        }
        self.default.clone()
    }
}

fn pem_error(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Loads a certificate chain and key into a signing key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_error(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_error(cert, "no CERTIFICATE block"));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| pem_error(key, e.to_string()))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// The rustls server config for the HTTPS listener; `acme` adds its certificates and
/// answers TLS-ALPN-01 validations.
pub fn server_config(
    https: &Https,
    acme: Option<Arc<Acme>>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut default = None;
    for c in &https.certificates {
        let key = Arc::new(load_certified_key(&c.cert_file, &c.key_file)?);
        default.get_or_insert_with(|| key.clone());
        for name in &c.server_names {
            match name.strip_prefix("*.") {
                Some(parent) => wildcard.insert(parent.to_owned(), key.clone()),
                None => exact.insert(name.clone(), key.clone()),
            };
        }
    }
    if default.is_none() && acme.is_none() {
        return Err(TlsError::Config("no certificates".into()));
    }
    let acme_on = acme.is_some();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(SniResolver {
        exact,
        wildcard,
        default,
        acme,
    }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if acme_on {
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    Ok(config)
}

/// Files written by [`write_dev_pki`].
#[derive(Debug)]
pub struct DevPki {
    /// The CA certificate clients should trust.
    pub ca_cert: std::path::PathBuf,
    /// The edge certificate (signed by the CA).
    pub cert: std::path::PathBuf,
    /// The edge certificate's key.
    pub key: std::path::PathBuf,
}

/// Creates a development CA and an edge certificate for `names` in `dir`. For local use
/// only: the CA key is written next to it, unprotected.
pub fn write_dev_pki(dir: &Path, names: &[String]) -> anyhow::Result<DevPki> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Skylane development CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate()?;
    let mut leaf_params = rcgen::CertificateParams::new(names.to_vec())?;
    leaf_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
    let out = DevPki {
        ca_cert: dir.join("ca.pem"),
        cert: dir.join("edge.pem"),
        key: dir.join("edge.key"),
    };
    std::fs::write(&out.ca_cert, ca_cert.pem())?;
    std::fs::write(&out.cert, leaf.pem())?;
    std::fs::write(&out.key, leaf_key.serialize_pem())?;
    Ok(out)
}
