//! A sandbox's own certificate authority. To apply `network.rules` to HTTPS the egress
//! proxy terminates TLS toward the sandbox, with a certificate for the name the sandbox
//! asked for; the sandbox trusts this CA (the server installs [`SandboxCa::cert_pem`] in
//! it) and nothing else does. One CA per sandbox, so a certificate issued for one
//! sandbox is worth nothing in another.
//!
//! The CA's private key exists only in this process's memory: it is generated here,
//! never serialized, never written anywhere and never printed (`Debug` shows the
//! sandbox only).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// How long before "now" certificates start to be valid: room for a guest clock behind
/// the host's.
const BACKDATE: time::Duration = time::Duration::hours(1);
/// How long a CA is valid.
const CA_LIFETIME: time::Duration = time::Duration::days(30);
/// How long a leaf is valid.
const LEAF_LIFETIME: time::Duration = time::Duration::days(7);
/// Leaves kept per sandbox; the oldest goes when a new name needs room.
const LEAF_CACHE: usize = 32;
/// A cached leaf is issued anew after this long, well before it expires.
const LEAF_REISSUE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("generating a key pair failed")]
    Key(#[source] rcgen::Error),
    #[error("{name:?} is not a name a certificate can hold")]
    Name {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("signing the certificate of {subject} failed")]
    Sign {
        subject: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("rustls refused the key of the certificate for {name}")]
    Load {
        name: String,
        #[source]
        source: rustls::Error,
    },
}

/// One sandbox's CA and the server certificates it issued.
pub struct SandboxCa {
    sandbox_id: String,
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    cert_pem: String,
    /// The CA's end of validity: no leaf outlives it.
    not_after: OffsetDateTime,
    leaves: Mutex<HashMap<String, Leaf>>,
}

struct Leaf {
    key: Arc<CertifiedKey>,
    issued: Instant,
}

impl fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxCa")
            .field("sandbox_id", &self.sandbox_id)
            .finish_non_exhaustive()
    }
}

impl SandboxCa {
    /// A new CA for `sandbox_id`: a fresh key pair (ECDSA P-256) and a self-signed
    /// certificate valid from an hour ago for 30 days, that may sign server
    /// certificates only (path length 0).
    pub fn new(sandbox_id: &str) -> Result<SandboxCa, CaError> {
        let key = KeyPair::generate().map_err(CaError::Key)?;
        let now = OffsetDateTime::now_utc();
        let subject = format!("Kiln egress CA for sandbox {sandbox_id}");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, subject.as_str());
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        let not_after = params.not_after;
        let cert = params
            .self_signed(&key)
            .map_err(|source| CaError::Sign { subject, source })?;
        Ok(SandboxCa {
            sandbox_id: sandbox_id.to_string(),
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
            not_after,
            leaves: Mutex::default(),
        })
    }

    /// A CA whose key and certificate are kept elsewhere (the sandbox hosts' local CA,
    /// `crate::tls_hosts`): leaves are issued as for a sandbox's CA.
    pub fn from_parts(
        label: &str,
        issuer: Issuer<'static, KeyPair>,
        cert: CertificateDer<'static>,
        cert_pem: String,
        not_after: OffsetDateTime,
    ) -> SandboxCa {
        SandboxCa {
            sandbox_id: label.to_string(),
            issuer,
            cert,
            cert_pem,
            not_after,
            leaves: Mutex::default(),
        }
    }

    /// The CA certificate, PEM: what the sandbox must trust.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// A certificate for `name` (with the CA after it) and its key, for a TLS server
    /// toward the sandbox. Cached per name.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let mut leaves = self.leaves.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(leaf) = leaves.get(&name) {
            if leaf.issued.elapsed() < LEAF_REISSUE {
                return Ok(leaf.key.clone());
            }
        }
        let key = Arc::new(self.issue(&name)?);
        if leaves.len() >= LEAF_CACHE && !leaves.contains_key(&name) {
            let oldest = leaves
                .iter()
                .min_by_key(|(_, l)| l.issued)
                .map(|(n, _)| n.clone());
            if let Some(oldest) = oldest {
                leaves.remove(&oldest);
            }
        }
        leaves.insert(
            name,
            Leaf {
                key: key.clone(),
                issued: Instant::now(),
            },
        );
        Ok(key)
    }

    /// Signs a new server certificate for `name` (SAN and CN), on a new key.
    fn issue(&self, name: &str) -> Result<CertifiedKey, CaError> {
        let san = name.try_into().map_err(|source| CaError::Name {
            name: name.to_string(),
            source,
        })?;
        let key = KeyPair::generate().map_err(CaError::Key)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![SanType::DnsName(san)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = (now + LEAF_LIFETIME).min(self.not_after);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CaError::Sign {
                subject: name.to_string(),
                source,
            })?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        CertifiedKey::from_der(vec![cert.der().clone(), self.cert.clone()], der, &provider).map_err(
            |source| CaError::Load {
                name: name.to_string(),
                source,
            },
        )
    }
}

/// Unit tests: no root, no network; certificates are checked with rustls's own
/// verifier (webpki), as the sandbox's TLS clients would.
#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::{CertificateError, Error};

    fn verifier(root: &CertificateDer<'static>) -> Arc<WebPkiServerVerifier> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap()
    }

    fn verify(
        v: &WebPkiServerVerifier,
        chain: &[CertificateDer<'static>],
        name: &str,
        at: Duration,
    ) -> Result<(), Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let name = ServerName::try_from(name.to_string()).unwrap();
        v.verify_server_cert(
            &chain[0],
            &chain[1..],
            &name,
            &[],
            UnixTime::since_unix_epoch(now + at),
        )
        .map(|_| ())
    }

    #[test]
    fn a_leaf_chains_to_its_sandbox_ca_for_its_name_only() {
        let ca = SandboxCa::new("sbx1").unwrap();
        let leaf = ca.leaf("API.Example.com.").unwrap();
        assert_eq!(leaf.cert.len(), 2, "leaf, then the CA");
        assert_eq!(leaf.cert[1], ca.cert);
        leaf.keys_match().unwrap();
        let v = verifier(&ca.cert);
        verify(&v, &leaf.cert, "api.example.com", Duration::ZERO).unwrap();
        assert!(matches!(
            verify(&v, &leaf.cert, "other.example.com", Duration::ZERO),
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ))
        ));
        // Valid from an hour ago (a guest clock behind) for 7 days.
        let hours = |h: u64| Duration::from_secs(h * 3600);
        verify(&v, &leaf.cert, "api.example.com", hours(6 * 24)).unwrap();
        assert!(verify(&v, &leaf.cert, "api.example.com", hours(7 * 24 + 1)).is_err());

        // Another sandbox's CA does not vouch for it.
        let other = SandboxCa::new("sbx2").unwrap();
        assert!(matches!(
            verify(
                &verifier(&other.cert),
                &leaf.cert,
                "api.example.com",
                Duration::ZERO
            ),
            Err(Error::InvalidCertificate(CertificateError::UnknownIssuer))
        ));
    }

    #[test]
    fn leaves_are_cached_per_name_and_the_cache_is_bounded() {
        let ca = SandboxCa::new("sbx1").unwrap();
        let a = ca.leaf("a.test").unwrap();
        assert!(Arc::ptr_eq(&a, &ca.leaf("A.test.").unwrap()));
        assert!(!Arc::ptr_eq(&a, &ca.leaf("b.test").unwrap()));
        for i in 0..2 * LEAF_CACHE {
            ca.leaf(&format!("n{i}.test")).unwrap();
        }
        assert_eq!(ca.leaves.lock().unwrap().len(), LEAF_CACHE);
        // Only ASCII fits in a certificate's DNS name (the proxy passes checked names).
        assert!(matches!(ca.leaf("bücher.test"), Err(CaError::Name { .. })));
    }

    #[test]
    fn the_ca_is_a_ca_that_signs_leaves_only() {
        let ca = SandboxCa::new("sbx1").unwrap();
        let v = verifier(&ca.cert);
        // webpki refuses a CA certificate as a server's: so it is one.
        let as_server = verify(&v, std::slice::from_ref(&ca.cert), "x.test", Duration::ZERO);
        assert!(
            matches!(
                as_server,
                Err(Error::InvalidCertificate(CertificateError::Other(ref e)))
                    if format!("{e:?}").contains("CaUsedAsEndEntity")
            ),
            "{as_server:?}"
        );
        // Its extensions, as DER: basicConstraints critical {cA TRUE, pathLen 0} (webpki
        // does not enforce an anchor's path length; OpenSSL and others do) and
        // keyUsage critical {keyCertSign}.
        let has = |der: &[u8], bytes: &[u8]| der.windows(bytes.len()).any(|w| w == bytes);
        let basic_constraints = [
            0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x08, 0x30, 0x06, 0x01, 0x01,
            0xff, 0x02, 0x01, 0x00,
        ];
        let key_usage = [
            0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x02, 0x04,
        ];
        assert!(has(&ca.cert, &basic_constraints));
        assert!(has(&ca.cert, &key_usage));
        // A leaf is no CA.
        let leaf = ca.leaf("x.test").unwrap();
        assert!(!has(&leaf.cert[0], &[0x06, 0x03, 0x55, 0x1d, 0x13]));
    }

    #[test]
    fn the_pem_is_the_ca_certificate_and_debug_shows_no_key() {
        let ca = SandboxCa::new("sbx1").unwrap();
        let pem = ca.cert_pem();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"), "{pem}");
        let parsed = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(parsed, ca.cert);
        let subject = b"Kiln egress CA for sandbox sbx1";
        assert!(parsed.windows(subject.len()).any(|w| w == subject));
        assert_eq!(format!("{ca:?}"), "SandboxCa { sandbox_id: \"sbx1\", .. }");
        // Two sandboxes, two keys.
        assert_ne!(SandboxCa::new("sbx1").unwrap().cert, ca.cert);
    }
}
