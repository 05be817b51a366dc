//! TLS towards the upstream (`rediss://`), with rustls: a CA file or the
//! webpki roots, an optional client certificate, and the server name to verify.
//! [`root_store`] also serves the TDengine relay's TLS (`tdengine.tls.ca_file`).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use super::BoxStream;
use crate::config::TlsConfig;
use crate::error::Error;

#[derive(Clone)]
pub struct TlsConnector {
    inner: tokio_rustls::TlsConnector,
    /// `upstream.tls.server_name`: the name verified on every connection.
    /// Without it, each connection verifies the host it dials (a Sentinel,
    /// or the master a Sentinel named).
    server_name: Option<ServerName<'static>>,
}

fn cfg_err(key: &str, problem: impl std::fmt::Display) -> Error {
    Error::Config(crate::config::ConfigError::new(key, problem.to_string()))
}

/// Trust anchors: the PEM certificates in `ca_file`, or the webpki roots.
/// Errors name `key` (the config key that gave the file).
pub fn root_store(ca_file: Option<&Path>, key: &str) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| cfg_err(key, format!("{}: {e}", path.display())))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| cfg_err(key, format!("{}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(cfg_err(key, format!("{}: no certificates", path.display())));
            }
            for c in certs {
                roots.add(c).map_err(|e| cfg_err(key, e))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

impl TlsConnector {
    pub fn new(cfg: &TlsConfig, host: &str) -> Result<TlsConnector, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = root_store(cfg.ca_file.as_deref(), "upstream.tls.ca_file")?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| cfg_err("upstream.tls", e))?
            .with_root_certificates(roots);
        let config = match (&cfg.cert_file, &cfg.key_file) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| {
                        cfg_err("upstream.tls.cert_file", format!("{}: {e}", cert.display()))
                    })?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        cfg_err("upstream.tls.cert_file", format!("{}: {e}", cert.display()))
                    })?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    cfg_err("upstream.tls.key_file", format!("{}: {e}", key.display()))
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| cfg_err("upstream.tls.cert_file", e))?
            }
            _ => builder.with_no_client_auth(),
        };
        // The host is checked now so that a bad one fails at start, not at connect.
        let name = cfg.server_name.clone().unwrap_or_else(|| host.to_string());
        let checked = ServerName::try_from(name.clone())
            .map_err(|e| cfg_err("upstream.tls.server_name", format!("{name:?}: {e}")))?;
        let server_name = cfg.server_name.is_some().then_some(checked);
        Ok(TlsConnector {
            inner: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The TLS handshake on `tcp`, dialled to `host`.
    pub async fn connect(&self, tcp: TcpStream, host: &str) -> Result<BoxStream, Error> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => ServerName::try_from(host.to_string())
                .map_err(|e| Error::Upstream(format!("TLS: {host:?} is no server name: {e}")))?,
        };
        let stream = self
            .inner
            .connect(name, tcp)
            .await
            .map_err(|e| Error::Upstream(format!("TLS handshake: {e}")))?;
        Ok(Box::new(stream))
    }
}
