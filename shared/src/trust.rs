//! Mutual authentication of mesh tunnels.
//!
//! Each node presents a self-signed certificate made from its Ed25519 node key. A peer is
//! trusted when the certificate's public key is a mesh member (for the connector) or is the
//! exact node it dialled (for the edge); certificate chains, names and dates play no part,
//! which is what a pinned-key mesh wants. The TLS handshake signature is still verified,
//! so a peer must hold the private key of the identity it claims.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

use crate::identity::{NodeId, NodeKey, PUBLIC_KEY_LEN};

/// ALPN protocol of Skylane tunnels; a version bump here makes old and new nodes refuse
/// each other cleanly instead of misparsing frames.
pub const MESH_ALPN: &[u8] = b"skylane/1";

/// The server name every node certificate carries. Identity comes from the key, not this.
pub const MESH_SERVER_NAME: &str = "skylane-node";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE, algorithm
/// 1.3.101.112, BIT STRING of 33 bytes with no unused bits.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Errors building TLS material or configs.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// rcgen could not make the node certificate.
    #[error("could not create the node certificate: {0}")]
    Certificate(String),
    /// rustls or quinn refused the config.
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The self-signed certificate and private key a node presents on its tunnels.
pub fn node_certificate(
    key: &NodeKey,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TrustError> {
    let der = PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec());
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
        .map_err(|e| TrustError::Certificate(e.to_string()))?;
    let params = rcgen::CertificateParams::new(vec![MESH_SERVER_NAME.to_owned()])
        .map_err(|e| TrustError::Certificate(e.to_string()))?;
    let cert = params
        .self_signed(&pair)
        .map_err(|e| TrustError::Certificate(e.to_string()))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
}

/// The node identity in a peer's certificate, if it is an Ed25519 certificate.
pub fn node_id_from_certificate(cert: &CertificateDer<'_>) -> Option<NodeId> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = ee.subject_public_key_info();
    let bytes: &[u8] = spki.as_ref();
    let key = bytes.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    let arr: [u8; PUBLIC_KEY_LEN] = key.try_into().ok()?;
    Some(NodeId::from_bytes(arr))
}

/// The authenticated identity of the peer of a QUIC connection.
pub fn peer_node_id(conn: &quinn::Connection) -> Option<NodeId> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    node_id_from_certificate(certs.first()?)
}

fn bad_cert(reason: &str) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(std::io::Error::other(reason.to_owned())),
    )))
}

/// Tunnels are TLS 1.3 only (QUIC requires it), so a TLS 1.2 signature is never valid.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// Whether a node is a mesh member now (the list can change with a reload).
pub type IsMember = Arc<dyn Fn(&NodeId) -> bool + Send + Sync>;

/// Accepts client certificates whose key is a mesh member.
struct MemberClientVerifier {
    is_member: IsMember,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for MemberClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberClientVerifier")
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for MemberClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let Some(id) = node_id_from_certificate(end_entity) else {
            metrics::counter!("skylane_mesh_auth_refused_total", "reason" => "bad_certificate")
                .increment(1);
            tracing::warn!("refused a tunnel: certificate is not an Ed25519 node certificate");
            return Err(bad_cert("not an Ed25519 node certificate"));
        };
        if !(self.is_member)(&id) {
            metrics::counter!("skylane_mesh_auth_refused_total", "reason" => "unknown_node")
                .increment(1);
            tracing::warn!(node = %id, "refused a tunnel from a node that is not a mesh member");
            return Err(bad_cert("node is not a mesh member"));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts exactly one server key: the node the client meant to dial.
#[derive(Debug)]
struct PinnedServerVerifier {
    expected: NodeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match node_id_from_certificate(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(id) => {
                metrics::counter!("skylane_mesh_auth_refused_total", "reason" => "wrong_peer")
                    .increment(1);
                tracing::warn!(expected = %self.expected, got = %id, "peer presented the wrong node key");
                Err(bad_cert("peer is not the node that was dialled"))
            }
            None => Err(bad_cert("not an Ed25519 node certificate")),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// TLS config for accepting tunnels from members: `is_member` is asked at each handshake.
pub fn tunnel_server_tls(
    key: &NodeKey,
    is_member: IsMember,
) -> Result<rustls::ServerConfig, TrustError> {
    let provider = provider();
    let (cert, private) = node_certificate(key)?;
    let verifier = Arc::new(MemberClientVerifier {
        is_member,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TrustError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], private)
        .map_err(|e| TrustError::Config(e.to_string()))?;
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    Ok(config)
}

/// TLS config for dialling one specific node.
pub fn tunnel_client_tls(
    key: &NodeKey,
    expected_peer: NodeId,
) -> Result<rustls::ClientConfig, TrustError> {
    let provider = provider();
    let (cert, private) = node_certificate(key)?;
    let verifier = Arc::new(PinnedServerVerifier {
        expected: expected_peer,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TrustError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], private)
        .map_err(|e| TrustError::Config(e.to_string()))?;
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_node_id() {
        let key = NodeKey::generate().expect("key");
        let (cert, _) = node_certificate(&key).expect("cert");
        assert_eq!(node_id_from_certificate(&cert), Some(key.id()));
    }

    #[test]
    fn garbage_certificate_has_no_id() {
        assert_eq!(
            node_id_from_certificate(&CertificateDer::from(vec![1, 2, 3])),
            None
        );
    }
}
