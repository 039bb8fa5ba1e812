//! TLS on the gRPC listener: the server's certificate and key, and — with a client CA — client
//! certificates asked for and verified when presented. A client without one is still served
//! (Envoy's ext_proc client often has none); one whose certificate the CA did not sign fails its
//! handshake. Requests on a connection whose client certificate was verified carry
//! [`ClientCert`], which [`ClientCertCheck`] requires of a service that wants it.

use std::sync::Arc;

use anyhow::Context;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, crypto};

/// A request extension: the connection's client presented a certificate the listener's client
/// CA verified.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientCert;

/// A listener's TLS: its acceptor (ALPN `h2`).
#[derive(Clone)]
pub(crate) struct Tls {
    pub(super) acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// TLS with this certificate chain and key (PEM) and, if given, a CA bundle (PEM) that
    /// verifies client certificates. The message says which part is wrong.
    pub(crate) fn from_pem(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> anyhow::Result<Self> {
        let provider = Arc::new(crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert).collect::<Result<_, _>>().context("reading the certificate chain")?;
        anyhow::ensure!(!chain.is_empty(), "the certificate file holds no PEM certificate");
        let key = PrivateKeyDer::from_pem_slice(key).context("reading the private key")?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca) {
                    roots.add(c.context("reading the client CA bundle")?).context("a client CA certificate")?;
                }
                anyhow::ensure!(!roots.is_empty(), "the client CA bundle holds no PEM certificate");
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .allow_unauthenticated()
                    .build()
                    .context("the client certificate verifier")?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).context("the certificate and its key")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { acceptor: TlsAcceptor::from(Arc::new(config)) })
    }
}

/// Whether the client of a TLS connection presented a certificate (which the handshake
/// verified: a certificate that fails verification fails the handshake).
pub(super) fn verified_client<IO>(tls: &tokio_rustls::server::TlsStream<IO>) -> bool {
    tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty())
}

/// A gRPC interceptor refusing calls (UNAUTHENTICATED) without a verified client certificate
/// when `required`; a no-op otherwise.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientCertCheck {
    pub(crate) required: bool,
}

impl tonic::service::Interceptor for ClientCertCheck {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.required && req.extensions().get::<ClientCert>().is_none() {
            return Err(tonic::Status::unauthenticated(
                "this API requires a TLS client certificate signed by the configured client CA",
            ));
        }
        Ok(req)
    }
}
