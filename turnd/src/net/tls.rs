//! TLS for TURN over TLS (RFC 8656 §3.1): certificate loading and hot reload.
//!
//! The certificate lives behind a resolver that every new handshake asks, so replacing it
//! affects only handshakes that start afterwards; established sessions keep their keys and
//! their allocations. turnd reloads when the files' directory changes (a Kubernetes Secret
//! volume swaps a `..data` symlink, so the files themselves are never written in place) and
//! on SIGHUP (through the process reload). A new certificate that fails to load is refused and logged; the old one stays.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tracing::{error, info};

/// The ALPN protocol id of STUN/TURN over TLS (RFC 7443).
pub const ALPN_STUN_TURN: &[u8] = b"stun.turn";

/// Why a certificate or key could not be used. Names the file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read or holds no PEM item of the expected kind.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The key does not match the certificate, or is of an unsupported type.
    #[error("{key}: private key unusable with {cert}: {reason}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A loaded certificate with the facts worth reporting.
struct Loaded {
    key: Arc<CertifiedKey>,
    not_after: i64,
    subject: String,
}

fn file_err(path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn load(cert: &Path, key: &Path) -> Result<Loaded, TlsError> {
    let bytes = std::fs::read(cert).map_err(|e| file_err(cert, e))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, format!("not a PEM certificate chain: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(file_err(cert, "no CERTIFICATE in the file"));
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| file_err(cert, format!("leaf certificate does not parse: {e}")))?;
    let not_after = parsed.validity().not_after.timestamp();
    let subject = parsed.subject().to_string();
    let key_bytes = std::fs::read(key).map_err(|e| file_err(key, e))?;
    let der = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|e| file_err(key, format!("no usable PEM private key: {e}")))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| {
        TlsError::KeyMismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: e.to_string(),
        }
    })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::KeyMismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after,
        subject,
    })
}

#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self.current.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        })
    }
}

/// A directory could not be watched for certificate changes.
#[derive(Debug, thiserror::Error)]
#[error("watching {} for certificate changes: {source}", dir.display())]
pub struct WatchError {
    /// The directory.
    pub dir: PathBuf,
    /// Why.
    pub source: notify::Error,
}

/// The TLS side of turnd: the acceptor new connections use and the certificate behind it.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    resolver: Arc<Resolver>,
    acceptor: tokio_rustls::TlsAcceptor,
    config: Arc<rustls::ServerConfig>,
    not_after: AtomicI64,
    fingerprint: std::sync::atomic::AtomicU64,
}

/// A cheap fingerprint of the files' bytes, to skip reloading what is already in service.
fn files_fingerprint(cert: &Path, key: &Path) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(cert).ok().hash(&mut h);
    std::fs::read(key).ok().hash(&mut h);
    h.finish()
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("not_after", &self.not_after())
            .finish()
    }
}

impl Tls {
    /// Loads the certificate chain and key (RSA, ECDSA or Ed25519 PEM).
    ///
    /// # Errors
    /// Either file is unreadable or unusable; the error names it.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let loaded = load(cert, key)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(loaded.key),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| file_err(cert, e))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![ALPN_STUN_TURN.to_vec()];
        info!(cert = %cert.display(), subject = %loaded.subject, not_after = loaded.not_after, "TLS certificate loaded");
        let config = Arc::new(config);
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            resolver,
            acceptor: tokio_rustls::TlsAcceptor::from(config.clone()),
            config,
            not_after: AtomicI64::new(loaded.not_after),
            fingerprint: std::sync::atomic::AtomicU64::new(files_fingerprint(cert, key)),
        })
    }

    /// The acceptor for new connections.
    #[must_use]
    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// The rustls configuration new connections use (its resolver follows reloads).
    #[must_use]
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }

    /// The not-after time (UNIX seconds) of the certificate in service.
    #[must_use]
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    /// Reloads the files. On failure the certificate in service stays and the error is
    /// returned (and logged).
    ///
    /// # Errors
    /// The new files are unusable.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fingerprint = files_fingerprint(&self.cert, &self.key);
        match load(&self.cert, &self.key) {
            Ok(loaded) => {
                let changed = loaded.not_after != self.not_after();
                match self.resolver.current.write() {
                    Ok(mut k) => *k = loaded.key,
                    Err(p) => *p.into_inner() = loaded.key,
                }
                self.not_after.store(loaded.not_after, Ordering::Relaxed);
                self.fingerprint.store(fingerprint, Ordering::Relaxed);
                info!(cert = %self.cert.display(), subject = %loaded.subject, not_after = loaded.not_after, changed, "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "TLS certificate reload refused; the previous certificate stays in service");
                Err(e)
            }
        }
    }

    /// Whether the files differ from what was last loaded (or last failed to load).
    fn files_changed(&self) -> bool {
        let now = files_fingerprint(&self.cert, &self.key);
        self.fingerprint.swap(now, Ordering::Relaxed) != now
    }
}

/// Watches the directories of `files`; sends on `tx` when one of the files changes. Only
/// those files count, or the `..data` / `..<timestamp>` entries of a Kubernetes Secret or
/// ConfigMap volume (the kubelet swaps a symlink, never writing the files in place): other
/// files in the directories (logs, say) do not. The one file watcher of turnd: certificates
/// here, the configuration and secret files in `run`.
///
/// # Errors
/// A directory could not be watched.
pub fn watch_files(
    files: &[PathBuf],
    tx: tokio::sync::mpsc::Sender<()>,
) -> Result<notify::RecommendedWatcher, WatchError> {
    use notify::Watcher as _;
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|p| p.file_name().map(ToOwned::to_owned))
        .collect();
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let relevant = res.is_ok_and(|ev| {
            ev.paths.iter().any(|p| {
                p.file_name().is_some_and(|n| {
                    names.iter().any(|m| m == n) || n.to_string_lossy().starts_with("..")
                })
            })
        });
        if relevant {
            let _ = tx.try_send(());
        }
    })
    .map_err(|source| WatchError {
        dir: PathBuf::from("."),
        source,
    })?;
    for dir in dirs {
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .map_err(|source| WatchError { dir, source })?;
    }
    Ok(watcher)
}

/// Reloads `tls` whenever its files' directories change, until the returned watcher is
/// dropped (SIGHUP reloads it through the process's reload, `run::serve`). Runs on the
/// caller's tokio runtime.
///
/// # Errors
/// The directory watch could not be set up.
pub fn spawn_reloader(tls: Arc<Tls>) -> Result<notify::RecommendedWatcher, WatchError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
    let watcher = watch_files(&[tls.cert.clone(), tls.key.clone()], tx)?;
    tokio::spawn(async move {
        loop {
            if rx.recv().await.is_none() {
                return;
            }
            // A Secret update is a burst of events: let it settle, then load once.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            if tls.files_changed() {
                let _ = tls.reload();
            }
        }
    });
    Ok(watcher)
}
