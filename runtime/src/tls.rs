//! TLS material from PEM files, with errors that name the flag and the file.
//!
//! One crypto provider (ring) for every hop. ALPN always ends in `h2` because grpc-go peers
//! reject a TLS connection that negotiated no protocol.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A file named by a command-line flag; errors quote both.
#[derive(Clone, Debug)]
pub struct PemFile {
    pub flag: &'static str,
    pub path: PathBuf,
}

impl PemFile {
    pub fn new(flag: &'static str, path: impl AsRef<Path>) -> Self {
        PemFile {
            flag,
            path: path.as_ref().to_path_buf(),
        }
    }

    /// The file's bytes as they are now.
    pub fn contents(&self) -> Result<Vec<u8>, TlsError> {
        read(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--{flag}: cannot read {path}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--{flag}: {path} is not valid PEM")]
    Pem {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("--{flag}: {path} contains no certificate")]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("--{flag}: {path} contains no private key")]
    NoKey { flag: &'static str, path: PathBuf },
    #[error("--{flag}: {path} contains no usable CA certificate")]
    BadCa { flag: &'static str, path: PathBuf },
    #[error("--{key_flag} {key} does not belong to the certificate in --{cert_flag} {cert}")]
    KeyMismatch {
        cert_flag: &'static str,
        cert: PathBuf,
        key_flag: &'static str,
        key: PathBuf,
    },
    #[error("certificate in --{flag} {path} was rejected")]
    Rejected {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The suites a server picks from, in its own order (it ignores the client's): those built on
/// SHA-256 first. Current x86 and ARM CPUs have instructions for SHA-256 and none for SHA-384,
/// which ring computes in software: in a reconnect storm the SHA-384 key schedule was 7% of
/// the server's CPU. The SHA-256 suites are TLS 1.3's mandatory AES-128-GCM and
/// ChaCha20-Poly1305, and their TLS 1.2 counterparts.
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        use rustls::CipherSuite::*;
        matches!(
            suite.suite(),
            TLS13_AES_256_GCM_SHA384
                | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        )
    });
    Arc::new(provider)
}

pub fn certificates(file: &PemFile) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(file)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            flag: file.flag,
            path: file.path.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            flag: file.flag,
            path: file.path.clone(),
        });
    }
    Ok(certs)
}

pub fn private_key(file: &PemFile) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(file)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|err| match err {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            flag: file.flag,
            path: file.path.clone(),
        },
        source => TlsError::Pem {
            flag: file.flag,
            path: file.path.clone(),
            source,
        },
    })
}

pub fn root_store(file: &PemFile) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certificates(file)?);
    if added == 0 {
        return Err(TlsError::BadCa {
            flag: file.flag,
            path: file.path.clone(),
        });
    }
    Ok(Arc::new(roots))
}

/// A certificate chain and its key, checked to belong together.
pub struct Identity {
    cert: PemFile,
    key: PemFile,
    chain: Vec<CertificateDer<'static>>,
    private_key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Whether `other` holds the same certificates and key (read from the same files or not).
    pub fn same_as(&self, other: &Identity) -> bool {
        self.chain == other.chain && self.private_key.secret_der() == other.private_key.secret_der()
    }

    pub fn load(cert: PemFile, key: PemFile) -> Result<Self, TlsError> {
        let chain = certificates(&cert)?;
        let private_key = private_key(&key)?;
        let identity = Identity {
            cert,
            key,
            chain,
            private_key,
        };
        identity.certified_key()?;
        Ok(identity)
    }

    fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
        let mismatch = || TlsError::KeyMismatch {
            cert_flag: self.cert.flag,
            cert: self.cert.path.clone(),
            key_flag: self.key.flag,
            key: self.key.path.clone(),
        };
        let key = rustls::sign::CertifiedKey::from_der(
            self.chain.clone(),
            self.private_key.clone_key(),
            &provider(),
        )
        .map_err(|_| mismatch())?;
        key.keys_match().map_err(|_| mismatch())?;
        Ok(Arc::new(key))
    }
}

/// How often a listener looks whether its certificate or key file changed.
const RELOAD_CHECK: Duration = Duration::from_secs(5);

/// A listener's identity, read again from its files when they change (at most every
/// [`RELOAD_CHECK`], on the next handshake), so a renewed certificate (kubeadm renews its
/// certificates every year) is served without a restart. A changed pair that does not load
/// (half written, key and certificate apart) is logged, and the one served until then stays.
#[derive(Debug)]
struct Reloading {
    cert: PemFile,
    key: PemFile,
    served: Mutex<Served>,
}

#[derive(Debug)]
struct Served {
    key: Arc<rustls::sign::CertifiedKey>,
    /// The files' modification times when `key` was read.
    stamp: Option<(SystemTime, SystemTime)>,
    checked: Instant,
}

impl Reloading {
    fn new(identity: &Identity) -> Result<Self, TlsError> {
        let cert = identity.cert.clone();
        let key = identity.key.clone();
        let stamp = stamp(&cert, &key);
        Ok(Reloading {
            served: Mutex::new(Served {
                key: identity.certified_key()?,
                stamp,
                checked: Instant::now(),
            }),
            cert,
            key,
        })
    }

    fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        if served.checked.elapsed() >= RELOAD_CHECK {
            served.checked = Instant::now();
            let now = stamp(&self.cert, &self.key);
            if now.is_some() && now != served.stamp {
                match Identity::load(self.cert.clone(), self.key.clone())
                    .and_then(|identity| identity.certified_key())
                {
                    Ok(key) => {
                        served.key = key;
                        served.stamp = now;
                        tracing::info!(
                            cert = %self.cert.path.display(),
                            "serving the certificate renewed in --{}",
                            self.cert.flag
                        );
                    }
                    Err(err) => tracing::warn!(
                        error = %crate::error_chain(&err),
                        "the certificate or key changed but does not load; still serving the previous one"
                    ),
                }
            }
        }
        served.key.clone()
    }
}

fn stamp(cert: &PemFile, key: &PemFile) -> Option<(SystemTime, SystemTime)> {
    let modified = |file: &PemFile| {
        std::fs::metadata(&file.path)
            .and_then(|m| m.modified())
            .ok()
    };
    Some((modified(cert)?, modified(key)?))
}

impl rustls::server::ResolvesServerCert for Reloading {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

/// Server side: our identity (read again when its files change), optionally requiring client
/// certificates signed by `client_ca`; TLS 1.2 and 1.3 unless `tls13_only`.
pub fn server_config(
    identity: &Identity,
    client_ca: Option<&PemFile>,
    alpn: &[&[u8]],
    tls13_only: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let builder = ServerConfig::builder_with_provider(server_provider())
        .with_protocol_versions(versions)
        .map_err(|source| rejected(&identity.cert, source))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(root_store(ca)?, provider())
                .build()
                .map_err(|_| TlsError::BadCa {
                    flag: ca.flag,
                    path: ca.path.clone(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Reloading::new(identity)?));
    config.ignore_client_order = true;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Client side: verify the server against `ca`, optionally presenting our identity.
/// `alpn` is offered in order, with `h2` appended when absent.
pub fn client_config(
    ca: &PemFile,
    identity: Option<&Identity>,
    alpn: &[String],
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| rejected(ca, source))?
        .with_root_certificates(root_store(ca)?);
    let mut config = match identity {
        Some(identity) => builder
            .with_client_auth_cert(identity.chain.clone(), identity.private_key.clone_key())
            .map_err(|source| rejected(&identity.cert, source))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    if !alpn.iter().any(|p| p == "h2") {
        config.alpn_protocols.push(b"h2".to_vec());
    }
    Ok(Arc::new(config))
}

fn rejected(file: &PemFile, source: rustls::Error) -> TlsError {
    TlsError::Rejected {
        flag: file.flag,
        path: file.path.clone(),
        source,
    }
}

fn read(file: &PemFile) -> Result<Vec<u8>, TlsError> {
    std::fs::read(&file.path).map_err(|source| TlsError::Read {
        flag: file.flag,
        path: file.path.clone(),
        source,
    })
}
