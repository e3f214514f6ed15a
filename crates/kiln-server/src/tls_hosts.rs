//! Sandbox hosts over TLS: `{port}-{id}.{domain}` served on a listener of its own
//! (`--sandbox-tls-listen`), so the URLs the SDKs build when `E2B_SANDBOX_URL` is not
//! set (`https://49983-{id}.{domain}` for envd, `get_host(port)`, signed file URLs,
//! the desktop stream) reach Kiln. Requests are routed exactly as on the API listener
//! (the same router: the Host picks the sandbox and port).
//!
//! The certificate is the operator's (`--tls-cert`/`--tls-key`, PEM, covering
//! `*.{domain}`), or one Kiln issues at every start from a local CA it makes once in
//! `<data-dir>/tls/` (`ca.pem`, and `ca.key` 0600): trust `ca.pem` once, and every
//! `{port}-{id}.{domain}` is trusted. The local CA may sign only this server's host
//! names (its key never leaves the data directory).
//!
//! Handshakes run in tasks of their own (10 s each, 256 at a time), so a client that
//! never finishes one does not hold up the others.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::egress::ca::SandboxCa;
use sha2::Digest;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
const HANDSHAKES_AT_ONCE: usize = 256;
/// How long the local CA is valid, and the bound on its leaves (each a week, re-issued
/// daily: `SandboxCa::leaf`).
const CA_LIFETIME: time::Duration = time::Duration::days(3650);
const LEAF_LIFETIME: time::Duration = time::Duration::days(3650);
const BACKDATE: time::Duration = time::Duration::hours(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsHostsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is open to group or others (mode {mode:03o}): it holds the local CA's key; chmod 600 it")]
    Permissive { path: PathBuf, mode: u32 },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("making the {what} certificate failed")]
    Cert {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("rustls refused the certificate and key")]
    Rustls(#[source] rustls::Error),
}

/// What the TLS listener serves with.
pub struct TlsHosts {
    pub domain: String,
    pub acceptor: TlsAcceptor,
    /// The local CA's certificate clients must trust (`None`: the operator's
    /// certificate is used).
    pub local_ca: Option<PathBuf>,
}

/// The operator's certificate and key, or a certificate for `*.{domain}` and
/// `{domain}` from the local CA in `<data_dir>/tls/` (made on first use).
pub fn load(
    data_dir: &Path,
    domain: &str,
    cert_key: Option<(&Path, &Path)>,
) -> Result<TlsHosts, TlsHostsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsHostsError::Rustls)?
        .with_no_client_auth();
    let (mut config, local_ca) = match cert_key {
        Some((cert, key)) => {
            let pem = |path: &Path, reason: String| TlsHostsError::Pem {
                path: path.to_path_buf(),
                reason,
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| pem(cert, e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem(cert, e.to_string()))?;
            if chain.is_empty() {
                return Err(pem(cert, "no certificate in it".into()));
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e.to_string()))?;
            let config = builder
                .with_single_cert(chain, key)
                .map_err(TlsHostsError::Rustls)?;
            (config, None)
        }
        None => {
            let (ca, path) = local_ca(&data_dir.join("tls"))?;
            let certs = HostCerts {
                ca,
                domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            };
            (builder.with_cert_resolver(Arc::new(certs)), Some(path))
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsHosts {
        domain: domain.to_string(),
        acceptor: TlsAcceptor::from(Arc::new(config)),
        local_ca,
    })
}

/// The local CA's subject: the same for a key every time (so a leaf issued after a
/// restart names the CA clients trust), distinct between installations.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let digest = sha2::Sha256::digest(key.public_key_pem().as_bytes());
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Kiln sandbox hosts CA {}", hex::encode(&digest[..6])),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// The local CA in `dir` (made on first use) and its certificate's path.
fn local_ca(dir: &Path) -> Result<(SandboxCa, PathBuf), TlsHostsError> {
    let (ca_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let read_err = |source| TlsHostsError::Read {
        path: key_path.clone(),
        source,
    };
    let ca_key = match crate::private_file::open(&key_path).map_err(read_err)? {
        Some(crate::private_file::KeyFile {
            mut file, verdict, ..
        }) => {
            match verdict {
                Ok(()) => {}
                Err(crate::private_file::Refused::Permissive { mode }) => {
                    return Err(TlsHostsError::Permissive {
                        path: key_path,
                        mode,
                    })
                }
                Err(crate::private_file::Refused::NotAFile) => {
                    return Err(TlsHostsError::Pem {
                        path: key_path,
                        reason: "not a regular file".into(),
                    })
                }
            }
            let mut pem = String::new();
            std::io::Read::read_to_string(&mut file, &mut pem).map_err(read_err)?;
            KeyPair::from_pem(&pem).map_err(|e| TlsHostsError::Pem {
                path: key_path.clone(),
                reason: e.to_string(),
            })?
        }
        None => make_ca(dir, &ca_path, &key_path)?,
    };
    let ca_pem = std::fs::read_to_string(&ca_path).map_err(|source| TlsHostsError::Read {
        path: ca_path.clone(),
        source,
    })?;
    let ca_der =
        CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| TlsHostsError::Pem {
            path: ca_path.clone(),
            reason: e.to_string(),
        })?;
    // Leaves are short-lived and re-issued; the CA's own end is years away.
    let not_after = time::OffsetDateTime::now_utc() + LEAF_LIFETIME;
    let issuer = Issuer::new(ca_params(&ca_key), ca_key);
    let ca = SandboxCa::from_parts("sandbox hosts", issuer, ca_der, ca_pem, not_after);
    Ok((ca, ca_path))
}

/// Certificates for the names under the domain, issued from the local CA as clients
/// ask for them (by SNI): `*.localhost` is a wildcard no verifier accepts, and one
/// certificate per name works for every domain.
struct HostCerts {
    ca: SandboxCa,
    domain: String,
}

impl std::fmt::Debug for HostCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCerts")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl HostCerts {
    fn covers(&self, name: &str) -> bool {
        name == self.domain
            || name
                .strip_suffix(self.domain.as_str())
                .is_some_and(|label| {
                    label.len() > 1
                        && label.ends_with('.')
                        && !label[..label.len() - 1].contains('.')
                })
    }
}

impl rustls::server::ResolvesServerCert for HostCerts {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = hello
            .server_name()?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if !self.covers(&name) {
            return None;
        }
        match self.ca.leaf(&name) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(name, error = %crate::report::chain(&e), "no certificate for a sandbox host");
                None
            }
        }
    }
}

/// A new CA in `dir`: its key (0600, never replaced) and its certificate.
fn make_ca(dir: &Path, ca_path: &Path, key_path: &Path) -> Result<KeyPair, TlsHostsError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsHostsError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let key = KeyPair::generate().map_err(|source| TlsHostsError::Cert { what: "CA", source })?;
    let mut params = ca_params(&key);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_LIFETIME;
    let cert = params
        .self_signed(&key)
        .map_err(|source| TlsHostsError::Cert { what: "CA", source })?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_path)
        .map_err(write_err(key_path))?;
    f.write_all(key.serialize_pem().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(write_err(key_path))?;
    let tmp = ca_path.with_extension("pem.tmp");
    std::fs::write(&tmp, cert.pem())
        .and_then(|()| std::fs::rename(&tmp, ca_path))
        .map_err(write_err(ca_path))?;
    tracing::info!(ca = %ca_path.display(), "made a local CA for sandbox hosts: trust this file to reach https://{{port}}-{{id}}.{{domain}}");
    Ok(key)
}

/// A TCP listener whose connections come out TLS-accepted, for `axum::serve`.
pub struct TlsListener {
    accepted: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub async fn bind(addr: SocketAddr, acceptor: TlsAcceptor) -> std::io::Result<TlsListener> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let (tx, accepted) = tokio::sync::mpsc::channel(64);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_AT_ONCE));
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "sandbox TLS listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "sandbox TLS listener: too many handshakes at once");
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, sender) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = sender.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "sandbox TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "sandbox TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { accepted, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(c) => c,
            // The accept loop never ends while we hold the receiver.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_local_ca_is_made_once_and_signs_each_sandbox_host() {
        let dir = tempfile::tempdir().unwrap();
        let first = load(dir.path(), "localhost", None).unwrap();
        let ca = first.local_ca.clone().unwrap();
        let key = dir.path().join("tls/ca.key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let ca_pem = std::fs::read(&ca).unwrap();
        // A restart keeps the CA (clients trust it once), and a leaf issued after it
        // chains to the same certificate.
        load(dir.path(), "localhost", None).unwrap();
        assert_eq!(std::fs::read(&ca).unwrap(), ca_pem);
        let (again, _) = local_ca(&dir.path().join("tls")).unwrap();
        let leaf = again.leaf("49983-abc123.localhost").unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(&ca_pem).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let sn = rustls::pki_types::ServerName::try_from("49983-abc123.localhost").unwrap();
        verifier
            .verify_server_cert(
                &leaf.cert[0],
                &leaf.cert[1..],
                &sn,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
    }

    #[test]
    fn only_names_one_label_under_the_domain_get_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = local_ca(dir.path()).unwrap();
        let certs = HostCerts {
            ca,
            domain: "kiln.test".into(),
        };
        assert!(certs.covers("49983-abc.kiln.test"));
        assert!(certs.covers("kiln.test"));
        for name in [
            "a.b.kiln.test",
            "evilkiln.test",
            "kiln.test.evil",
            ".kiln.test",
            "example.org",
        ] {
            assert!(!certs.covers(name), "{name}");
        }
    }

    #[test]
    fn a_ca_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load(dir.path(), "kiln.test", None).unwrap();
        let key = dir.path().join("tls/ca.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load(dir.path(), "kiln.test", None).map(|_| ()),
            Err(TlsHostsError::Permissive { mode: 0o644, .. })
        ));
    }
}
