//! Certificates by ACME DNS-01 on Cloudflare: `cert issue`, `cert renew`, `cert status`, and the
//! systemd timer that runs `renew` daily.
//!
//! - The account is created once; its credentials are stored as `account.json` (mode 0600) in
//!   the store directory and reused.
//! - One order covers the apex and the wildcard (`example.net`, `*.example.net`). Both put a
//!   value on the same `_acme-challenge` name: each TXT record is created separately through
//!   [`crate::dns`] and deleted afterwards by its record id, so neither clobbers the other.
//! - Before telling the CA to look, the TXT values are awaited on the zone's authoritative
//!   servers (Cloudflare's name servers for the zone, or servers given explicitly).
//! - The key is ECDSA P-256 made with rcgen; the chain goes to `tls.crt`, the key to `tls.key`
//!   (0600), replaced by rename only after the new certificate is complete: a failure leaves the
//!   old pair in place.
//! - `renew` acts only inside a window before expiry (30 days by default), retries with
//!   exponential backoff, and reports every attempt when it gives up.
//!
//! What it leaves out: revocation, ARI (renewal information), EAB, and HTTP-01.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};

use crate::dns::{self, CloudflareClient, DnsError, NewRecord};

/// Let's Encrypt production.
pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt staging.
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// Default renewal window: renew when fewer than 30 days remain.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Which ACME directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directory {
    /// Let's Encrypt production.
    Production,
    /// Let's Encrypt staging (untrusted certificates, generous limits).
    Staging,
    /// Any other directory URL (e.g. pebble in tests).
    Url(String),
}

impl Directory {
    /// The directory URL.
    pub fn url(&self) -> &str {
        match self {
            Directory::Production => LETS_ENCRYPT_PRODUCTION,
            Directory::Staging => LETS_ENCRYPT_STAGING,
            Directory::Url(u) => u,
        }
    }
}

/// Where the TXT values are awaited before the CA is asked to validate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Propagation {
    /// The zone's name servers as Cloudflare reports them, resolved with the system resolver.
    ZoneNameServers,
    /// These servers (tests: pebble-challtestsrv's DNS).
    Servers(Vec<SocketAddr>),
    /// Do not wait (the CA may then find nothing).
    Skip,
}

/// Everything `issue` and `renew` need.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The ACME directory.
    pub directory: Directory,
    /// Account contact e-mail (without `mailto:`), if any.
    pub email: Option<String>,
    /// The apex, e.g. `example.net`; the order is for it and `*.` it.
    pub zone: String,
    /// Where the account, certificate and key live.
    pub store: CertStore,
    /// A PEM root to trust for the ACME server itself (tests: pebble's HTTPS certificate).
    pub acme_root: Option<PathBuf>,
    /// Where to wait for the TXT values.
    pub propagation: Propagation,
    /// How long to wait for them.
    pub propagation_timeout: Duration,
    /// How long to wait for the CA to validate and to issue.
    pub order_timeout: Duration,
    /// Renew when less than this remains.
    pub renew_before: Duration,
    /// Tries per `renew`/`issue` (at least 1).
    pub attempts: u32,
    /// Wait before the second try; doubled after each.
    pub backoff: Duration,
}

impl AcmeSettings {
    /// Defaults: zone name servers, 2 min propagation, 2 min order, 30 days, 3 tries from 30 s.
    pub fn new(directory: Directory, zone: &str, store_dir: &Path) -> Self {
        Self {
            directory,
            email: None,
            zone: zone.trim_end_matches('.').to_ascii_lowercase(),
            store: CertStore::new(store_dir),
            acme_root: None,
            propagation: Propagation::ZoneNameServers,
            propagation_timeout: Duration::from_secs(120),
            order_timeout: Duration::from_secs(120),
            renew_before: DEFAULT_RENEW_BEFORE,
            attempts: 3,
            backoff: Duration::from_secs(30),
        }
    }

    /// The names on the certificate: the apex and the wildcard.
    pub fn names(&self) -> [String; 2] {
        [self.zone.clone(), format!("*.{}", self.zone)]
    }
}

/// Why a certificate operation failed. Variants say who is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcmeError {
    /// Reading or writing the store failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A stored file is not what it should be.
    #[error("{path}: {reason}")]
    BadStoredFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The DNS provider refused or failed.
    #[error("DNS: {0}")]
    Dns(#[from] DnsError),
    /// The ACME server refused or the exchange failed (rate limits and bad nonces land here).
    #[error("ACME server, while {step}: {source}")]
    Acme {
        /// What we were doing.
        step: &'static str,
        /// instant-acme's error (an RFC 7807 problem when the server sent one).
        source: instant_acme::Error,
    },
    /// The CA validated and found the challenge wrong or missing.
    #[error("challenge invalid for {name}: {detail}")]
    ChallengeInvalid {
        /// The identifier.
        name: String,
        /// The CA's explanation.
        detail: String,
    },
    /// The order ended in a state other than ready.
    #[error("order is {status:?}, not ready: {detail}")]
    OrderNotReady {
        /// The order status.
        status: OrderStatus,
        /// Details.
        detail: String,
    },
    /// The authorization offered no DNS-01 challenge.
    #[error("no DNS-01 challenge offered for {0}")]
    NoDns01(String),
    /// Making the key or the CSR failed.
    #[error("key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    /// The issued chain is not usable.
    #[error("issued certificate unusable: {0}")]
    BadIssued(String),
    /// The Kubernetes API refused or could not be reached.
    #[error("Kubernetes, while {step} Secret {namespace}/{name}: {source}")]
    Kubernetes {
        /// What we were doing.
        step: &'static str,
        /// Namespace.
        namespace: &'static str,
        /// Secret name.
        name: &'static str,
        /// kube-rs's error.
        source: Box<kube::Error>,
    },
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// A setting from the environment is malformed.
    #[error("{name}: {reason}")]
    BadSetting {
        /// The variable.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// The kubeconfig could not be used.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// `deploy` needs the Kubernetes API and none was given.
    #[error("no Kubernetes API for `cert deploy`: pass --kubeconfig, set KUBECONFIG, or let the provisioner reach the master through the host (the cluster must exist)")]
    NoKubernetes,
    /// No stored certificate to deploy.
    #[error("nothing to deploy: {0} does not exist (run `provisioner cert issue`)")]
    NothingToDeploy(PathBuf),
    /// Every attempt failed; the old certificate (if any) is untouched.
    #[error("{}", render_failure(.attempts, .kept.as_deref()))]
    GaveUp {
        /// Each attempt's error, in order.
        attempts: Vec<String>,
        /// The certificate left in place.
        kept: Option<Box<CertInfo>>,
    },
}

fn render_failure(attempts: &[String], kept: Option<&CertInfo>) -> String {
    let mut s = format!(
        "certificate renewal failed after {} attempt(s)",
        attempts.len()
    );
    for (i, a) in attempts.iter().enumerate() {
        let _ = write!(s, "\n  attempt {}: {a}", i + 1);
    }
    match kept {
        Some(c) if c.is_expired(SystemTime::now()) => {
            let _ = write!(
                s,
                "\n  the stored certificate was left in place; it EXPIRED at {}",
                c.not_after_text
            );
        }
        Some(c) => {
            let _ = write!(
                s,
                "\n  the stored certificate was left in place (valid until {})",
                c.not_after_text
            );
        }
        None => s.push_str("\n  no certificate is stored"),
    }
    s
}

fn acme(step: &'static str) -> impl FnOnce(instant_acme::Error) -> AcmeError {
    move |source| AcmeError::Acme { step, source }
}

/// What we know of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// `not_after` as text (UTC).
    pub not_after_text: String,
    /// DNS names in the subject alternative name.
    pub names: Vec<String>,
    /// Serial number in hex.
    pub serial: String,
}

impl CertInfo {
    /// Reads the first certificate of a PEM chain.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| e.to_string())?;
        Self::from_der(&p.contents)
    }

    /// Reads one DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let v = cert.validity();
        let to_time = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                    names.push((*d).to_owned());
                }
            }
        }
        Ok(Self {
            not_before: to_time(v.not_before.timestamp()),
            not_after: to_time(v.not_after.timestamp()),
            not_after_text: v.not_after.to_string(),
            names,
            serial: cert.raw_serial_as_string(),
        })
    }

    /// Past its end.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// When renewal becomes due.
    pub fn renew_at(&self, renew_before: Duration) -> SystemTime {
        self.not_after
            .checked_sub(renew_before)
            .unwrap_or(UNIX_EPOCH)
    }
}

/// The files of one certificate: `account.json`, `tls.crt` (chain), `tls.key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertStore {
    dir: PathBuf,
}

impl CertStore {
    /// A store in `dir` (created on first write, mode 0700).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The account credentials file.
    pub fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    /// The certificate chain, leaf first.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    /// The private key.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("tls.key")
    }

    /// The stored certificate, if there is one.
    pub fn load(&self) -> Result<Option<CertInfo>, AcmeError> {
        let path = self.cert_path();
        match std::fs::read(&path) {
            Ok(pem) => CertInfo::from_pem(&pem)
                .map(Some)
                .map_err(|reason| AcmeError::BadStoredFile { path, reason }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AcmeError::Io { path, source }),
        }
    }

    fn ensure_dir(&self) -> Result<(), AcmeError> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| AcmeError::Io {
                path: self.dir.clone(),
                source,
            })
    }

    /// Writes `data` to `path` through a 0600 temporary file and a rename.
    fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AcmeError> {
        let io = |source| AcmeError::Io {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(data).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Replaces the pair: key first, then the chain (turnd reloads on the chain's change).
    fn save(&self, chain_pem: &str, key_pem: &str) -> Result<(), AcmeError> {
        self.ensure_dir()?;
        Self::write_atomic(&self.key_path(), key_pem.as_bytes())?;
        Self::write_atomic(&self.cert_path(), chain_pem.as_bytes())
    }
}

/// Restores the stored account or creates one (storing its credentials, 0600).
/// Returns the account and whether it was created now.
pub async fn account(settings: &AcmeSettings) -> Result<(Account, bool), AcmeError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = || match &settings.acme_root {
        Some(root) => {
            Account::builder_with_root(root).map_err(acme("loading the ACME server's root"))
        }
        None => Account::builder().map_err(acme("building the HTTP client")),
    };
    let path = settings.store.account_path();
    let url = settings.directory.url();
    match std::fs::read(&path) {
        Ok(bytes) => {
            let stored: StoredAccount =
                serde_json::from_slice(&bytes).map_err(|e| AcmeError::BadStoredFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if stored.directory == url {
                let account = builder()?
                    .from_credentials(stored.credentials)
                    .await
                    .map_err(acme("restoring the account"))?;
                return Ok((account, false));
            }
            tracing::warn!(
                "{}: account is for {}, not {url}: creating one for {url}",
                path.display(),
                stored.directory
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(AcmeError::Io { path, source }),
    }
    let contact: Vec<String> = settings
        .email
        .iter()
        .map(|e| format!("mailto:{e}"))
        .collect();
    let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder()?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            url.to_owned(),
            None,
        )
        .await
        .map_err(acme("creating the account"))?;
    settings.store.ensure_dir()?;
    let json = serde_json::to_vec_pretty(&StoredAccount {
        directory: url.to_owned(),
        credentials,
    })
    .map_err(|e| AcmeError::BadStoredFile {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    CertStore::write_atomic(&path, &json)?;
    Ok((account, true))
}

/// `account.json`: the credentials and the directory they belong to (switching between
/// staging and production makes a new account instead of reusing the other CA's).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// A TXT record we created for a challenge.
#[derive(Debug, Clone)]
struct ChallengeRecord {
    id: String,
    name: String,
    value: String,
}

/// One successful issuance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The new certificate.
    pub cert: CertInfo,
    /// Whether the account was created by this run.
    pub account_created: bool,
    /// TXT records created and deleted again.
    pub challenge_records: usize,
    /// Authorizations the CA already held as valid (no challenge needed).
    pub reused_authorizations: usize,
}

/// Issues a certificate for the apex and the wildcard once (no retries) and stores it.
/// Challenge records are deleted by id whether or not issuance succeeds.
pub async fn issue_once(
    settings: &AcmeSettings,
    dns: &CloudflareClient,
) -> Result<Issued, AcmeError> {
    let (account, account_created) = account(settings).await?;
    let identifiers: Vec<Identifier> = vec![
        Identifier::Dns(settings.zone.clone()),
        Identifier::Dns(format!("*.{}", settings.zone)),
    ];
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(acme("creating the order"))?;

    // Pass 1: what each pending authorization wants.
    let mut wanted: Vec<(String, String)> = Vec::new(); // (TXT name, value)
    let mut reused = 0;
    {
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a.map_err(acme("fetching authorizations"))?;
            match a.status {
                AuthorizationStatus::Valid => {
                    reused += 1;
                    continue;
                }
                AuthorizationStatus::Pending => {}
                other => {
                    return Err(AcmeError::ChallengeInvalid {
                        name: a.identifier().to_string(),
                        detail: format!("authorization is {other:?} before we started"),
                    })
                }
            }
            let ident = a.identifier().identifier.clone();
            let shown = a.identifier().to_string();
            let ch = a
                .challenge(ChallengeType::Dns01)
                .ok_or_else(|| AcmeError::NoDns01(shown))?;
            let Identifier::Dns(base) = ident else {
                return Err(AcmeError::NoDns01(ch.identifier().to_string()));
            };
            let name = format!("_acme-challenge.{}", base.trim_start_matches("*."));
            wanted.push((name, ch.key_authorization().dns_value()));
        }
    }

    let mut created: Vec<ChallengeRecord> = Vec::new();
    let result = async {
        for (name, value) in &wanted {
            // `add`: a value left by an interrupted run is reused (and deleted below).
            let rec = dns
                .add(&NewRecord {
                    ttl: 60,
                    ..NewRecord::new("TXT", name, value)
                })
                .await?
                .record()
                .clone();
            created.push(ChallengeRecord {
                id: rec.id,
                name: name.clone(),
                value: value.clone(),
            });
        }
        wait_propagation(settings, dns, &created).await?;

        // Pass 2: tell the CA to look.
        {
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a.map_err(acme("fetching authorizations"))?;
                if a.status != AuthorizationStatus::Pending {
                    continue;
                }
                let shown = a.identifier().to_string();
                let mut ch = a
                    .challenge(ChallengeType::Dns01)
                    .ok_or(AcmeError::NoDns01(shown))?;
                ch.set_ready()
                    .await
                    .map_err(acme("answering the challenge"))?;
            }
        }
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(settings.order_timeout);
        let status = order
            .poll_ready(&retry)
            .await
            .map_err(acme("waiting for validation"));
        let status = match status {
            Ok(s) => s,
            Err(e) => return Err(explain_invalid(&mut order, e).await),
        };
        if status != OrderStatus::Ready {
            return Err(explain_invalid(
                &mut order,
                AcmeError::OrderNotReady {
                    status,
                    detail: String::new(),
                },
            )
            .await);
        }

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(settings.names().to_vec())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key)?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(acme("finalizing"))?;
        let chain = order
            .poll_certificate(&retry)
            .await
            .map_err(acme("downloading the certificate"))?;
        let cert = CertInfo::from_pem(chain.as_bytes()).map_err(AcmeError::BadIssued)?;
        for n in settings.names() {
            if !cert.names.contains(&n) {
                return Err(AcmeError::BadIssued(format!(
                    "{n} missing from the certificate's names {:?}",
                    cert.names
                )));
            }
        }
        settings.store.save(&chain, &key.serialize_pem())?;
        Ok(cert)
    }
    .await;

    // Always clean up, by id: the other value on the same name stays until its own delete.
    let mut cleanup_errors = Vec::new();
    for r in &created {
        if let Err(e) = dns.delete(&r.id).await {
            cleanup_errors.push(format!("TXT {} (id {}): {e}", r.name, r.id));
        }
    }
    if !cleanup_errors.is_empty() {
        tracing::warn!(
            "could not delete challenge records: {}",
            cleanup_errors.join("; ")
        );
    }
    let cert = result?;
    Ok(Issued {
        cert,
        account_created,
        challenge_records: created.len(),
        reused_authorizations: reused,
    })
}

/// Turns an order failure into "challenge invalid" with the CA's detail when an
/// authorization is invalid.
async fn explain_invalid(order: &mut instant_acme::Order, fallback: AcmeError) -> AcmeError {
    if order.refresh().await.is_err() {
        return fallback;
    }
    let mut authzs = order.authorizations();
    while let Some(Ok(mut a)) = authzs.next().await {
        if a.status == AuthorizationStatus::Invalid {
            let name = a.identifier().to_string();
            let detail = a
                .challenge(ChallengeType::Dns01)
                .and_then(|c| c.error.as_ref().map(ToString::to_string))
                .unwrap_or_else(|| "authorization invalid".to_owned());
            return AcmeError::ChallengeInvalid { name, detail };
        }
    }
    fallback
}

async fn wait_propagation(
    settings: &AcmeSettings,
    dns_client: &CloudflareClient,
    created: &[ChallengeRecord],
) -> Result<(), AcmeError> {
    let servers = match &settings.propagation {
        Propagation::Skip => return Ok(()),
        Propagation::Servers(s) => s.clone(),
        Propagation::ZoneNameServers => {
            let names = dns_client.name_servers().await?;
            dns::resolve_name_servers(&names).await
        }
    };
    let mut by_name: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for r in created {
        by_name.entry(&r.name).or_default().push(r.value.clone());
    }
    for (name, values) in by_name {
        dns::wait_for_txt(
            &servers,
            name,
            &values,
            settings.propagation_timeout,
            Duration::from_millis(500),
        )
        .await?;
    }
    Ok(())
}

/// Issues with retries and backoff; on failure the stored pair is untouched and the error
/// lists every attempt.
pub async fn issue(settings: &AcmeSettings, dns: &CloudflareClient) -> Result<Issued, AcmeError> {
    let kept = settings.store.load().ok().flatten().map(Box::new);
    let mut errors = Vec::new();
    let mut delay = settings.backoff;
    for attempt in 1..=settings.attempts.max(1) {
        match issue_once(settings, dns).await {
            Ok(i) => return Ok(i),
            Err(e) => {
                tracing::warn!("certificate attempt {attempt} failed: {e}");
                errors.push(e.to_string());
                if attempt < settings.attempts {
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                }
            }
        }
    }
    Err(AcmeError::GaveUp {
        attempts: errors,
        kept,
    })
}

/// What `renew` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewOutcome {
    /// Outside the window: nothing was asked of the CA.
    NotDue {
        /// The stored certificate.
        current: CertInfo,
        /// When it becomes due.
        renew_at: SystemTime,
    },
    /// A new certificate replaced the old one (or the first one was issued).
    Renewed {
        /// The one replaced.
        previous: Option<CertInfo>,
        /// The new one.
        issued: Issued,
    },
}

impl fmt::Display for RenewOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RenewOutcome::NotDue { current, renew_at } => {
                let days = renew_at
                    .duration_since(SystemTime::now())
                    .map(|d| d.as_secs() / 86_400)
                    .unwrap_or(0);
                write!(
                    f,
                    "not due: the certificate is valid until {}; renewal starts in {days} day(s)",
                    current.not_after_text
                )
            }
            RenewOutcome::Renewed { previous, issued } => {
                write!(
                    f,
                    "renewed: new certificate for {} valid until {}",
                    issued.cert.names.join(", "),
                    issued.cert.not_after_text
                )?;
                match previous {
                    Some(p) if p.is_expired(SystemTime::now()) => {
                        write!(f, " (the previous one had EXPIRED at {})", p.not_after_text)
                    }
                    Some(p) => write!(f, " (previous valid until {})", p.not_after_text),
                    None => f.write_str(" (no previous certificate)"),
                }
            }
        }
    }
}

/// The stored certificate, and [`RenewOutcome::NotDue`] unless it is missing, unreadable,
/// expired or inside the window (or `force`): the one place that decides whether to renew.
pub fn renewal_due(
    settings: &AcmeSettings,
    now: SystemTime,
    force: bool,
) -> (Option<CertInfo>, Option<RenewOutcome>) {
    let current = match settings.store.load() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("stored certificate unreadable, renewing: {e}");
            None
        }
    };
    let not_due = match (&current, force) {
        (Some(c), false) => {
            let renew_at = c.renew_at(settings.renew_before);
            (now < renew_at).then(|| RenewOutcome::NotDue {
                current: c.clone(),
                renew_at,
            })
        }
        _ => None,
    };
    (current, not_due)
}

/// The stored certificate when it can be deployed as it is: it names every name the order
/// would (the apex and the wildcard) and is not due for renewal ([`renewal_due`]).
pub fn reusable(settings: &AcmeSettings, now: SystemTime) -> Option<CertInfo> {
    let (current, not_due) = renewal_due(settings, now, false);
    not_due?;
    let current = current?;
    let covers = settings.names().iter().all(|want| {
        current
            .names
            .iter()
            .any(|have| have.eq_ignore_ascii_case(want))
    });
    covers.then_some(current)
}

/// What issuing needs: the ACME settings and the DNS provider's client (for the DNS-01
/// records). The payload of [`crate::plan::ActionKind::IssueCert`]; two are equal when they
/// order the same names from the same directory into the same store.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// Directory, names, store, waits and retries.
    pub settings: AcmeSettings,
    /// Where the challenge records go.
    pub dns: CloudflareClient,
}

impl PartialEq for Issuer {
    fn eq(&self, other: &Self) -> bool {
        self.settings.directory == other.settings.directory
            && self.settings.names() == other.settings.names()
            && self.settings.store == other.settings.store
    }
}

impl Eq for Issuer {}

impl Issuer {
    /// One line for a plan: what is ordered, how and where from.
    pub fn summary(&self) -> String {
        format!(
            "issue certificate for {} via ACME DNS-01 ({})",
            self.settings.names().join(", "),
            self.settings.directory.url()
        )
    }

    /// Issues (with retries, [`issue`]) and stores the certificate (blocking).
    ///
    /// # Errors
    /// [`AcmeError::Runtime`], or what [`issue`] reports.
    pub fn run(&self) -> Result<Issued, AcmeError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(AcmeError::Runtime)?
            .block_on(issue(&self.settings, &self.dns))
    }
}

/// What `cert issue` or a due `cert renew` would order, for `--dry-run` (nothing is asked of
/// the CA or the DNS provider).
fn would_order(settings: &AcmeSettings) -> String {
    format!(
        "dry run: would order a certificate for {} from {} by DNS-01; no ACME account, order or DNS record was created\n",
        settings.names().join(", "),
        settings.directory.url()
    )
}

/// Renews when the stored certificate is missing, unreadable, expired or inside the window
/// (or when `force`); otherwise does nothing.
pub async fn renew(
    settings: &AcmeSettings,
    dns: &CloudflareClient,
    now: SystemTime,
    force: bool,
) -> Result<RenewOutcome, AcmeError> {
    let (current, not_due) = renewal_due(settings, now, force);
    if let Some(not_due) = not_due {
        return Ok(not_due);
    }
    let issued = issue(settings, dns).await?;
    Ok(RenewOutcome::Renewed {
        previous: current,
        issued,
    })
}

/// The systemd units that run `renew` daily.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewUnits {
    /// `turnd-cert-renew.service`.
    pub service: String,
    /// `turnd-cert-renew.timer`.
    pub timer: String,
}

/// Unit names.
pub const RENEW_SERVICE: &str = "turnd-cert-renew.service";
/// Unit names.
pub const RENEW_TIMER: &str = "turnd-cert-renew.timer";

/// Where `cert renew`/`cert deploy` write when run with `inventory`: the `.provisioner/`
/// directory next to it (certificate store, ACME account, journal, run lock). The renewal
/// unit may write there and nowhere else.
pub fn renew_state_dir(inventory: &Path) -> PathBuf {
    inventory
        .parent()
        .unwrap_or(Path::new("."))
        .join(".provisioner")
}

/// Renders the oneshot service (`provisioner cert renew`, then `cert deploy`) and its daily
/// timer. `workdir` holds the inventory and `.env` (mode 0600).
pub fn render_renew_units(provisioner: &Path, workdir: &Path, inventory: &Path) -> RenewUnits {
    let exe = provisioner.display();
    let wd = workdir.display();
    let inv = inventory.display();
    let state = renew_state_dir(inventory);
    let state = state.display();
    let service = format!(
        "\
# Generated by the provisioner: renews the turnd certificate (ACME DNS-01) and deploys it.
[Unit]
Description=Renew the turnd TLS certificate (ACME DNS-01 on Cloudflare)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
WorkingDirectory={wd}
# CF_Token, CF_Zone_ID and KUBECONFIG (for `cert deploy`).
EnvironmentFile=-{wd}/.env
ExecStart={exe} --inventory {inv} cert renew
ExecStartPost={exe} --inventory {inv} cert deploy
UMask=0077
NoNewPrivileges=yes
PrivateTmp=yes
# Everything read-only but the provisioner's state next to the inventory: the certificate
# store and ACME account, the journal and the run lock (the host phase creates it).
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={state}
TimeoutStartSec=30min
"
    );
    let timer = "\
# Generated by the provisioner: checks the turnd certificate daily; renews inside the window.
[Unit]
Description=Daily renewal check for the turnd TLS certificate

[Timer]
OnCalendar=*-*-* 22:55:00
RandomizedDelaySec=1h
Persistent=true
Unit=turnd-cert-renew.service

[Install]
WantedBy=timers.target
"
    .to_owned();
    RenewUnits { service, timer }
}

/// What one endpoint presented in a TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedCert {
    /// `host:port` asked.
    pub endpoint: String,
    /// The leaf it presented, or why the handshake failed.
    pub cert: Result<CertInfo, String>,
}

/// `cert status`: the stored certificate and what each endpoint serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// The stored certificate.
    pub stored: Option<CertInfo>,
    /// The TLS Secret's certificate: `None` when not asked, `Ok(None)` when there is no
    /// Secret.
    pub secret: Option<Result<Option<CertInfo>, String>>,
    /// Per endpoint.
    pub served: Vec<ServedCert>,
}

impl StatusReport {
    /// Endpoints that serve something other than the stored certificate (or fail).
    pub fn differing(&self) -> Vec<&ServedCert> {
        self.served
            .iter()
            .filter(|s| match (&s.cert, &self.stored) {
                (Ok(c), Some(st)) => c.serial != st.serial,
                _ => true,
            })
            .collect()
    }

    /// The Secret was read and holds something other than the stored certificate.
    pub fn secret_differs(&self) -> bool {
        match (&self.secret, &self.stored) {
            (None, _) => false,
            (Some(Ok(Some(c))), Some(st)) => c.serial != st.serial,
            _ => true,
        }
    }

    /// Human-readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        match &self.stored {
            Some(c) => {
                let _ = writeln!(
                    s,
                    "stored: not after {} (serial {}, {})",
                    c.not_after_text,
                    c.serial,
                    c.names.join(", ")
                );
            }
            None => s.push_str("stored: none\n"),
        }
        let secret = format!("{}/{}", crate::k8s::NAMESPACE, crate::k8s::TLS_SECRET_NAME);
        match &self.secret {
            None => {}
            Some(Ok(Some(c))) => {
                let _ = writeln!(
                    s,
                    "secret {secret}: not after {} (serial {}){}",
                    c.not_after_text,
                    c.serial,
                    if self.secret_differs() {
                        "  DIFFERS from stored"
                    } else {
                        ""
                    }
                );
            }
            Some(Ok(None)) => {
                let _ = writeln!(s, "secret {secret}: absent");
            }
            Some(Err(e)) => {
                let _ = writeln!(s, "secret {secret}: cannot read: {e}");
            }
        }
        for e in &self.served {
            match &e.cert {
                Ok(c) => {
                    let same = self.stored.as_ref().is_some_and(|st| st.serial == c.serial);
                    let _ = writeln!(
                        s,
                        "{}: not after {} (serial {}){}",
                        e.endpoint,
                        c.not_after_text,
                        c.serial,
                        if same { "" } else { "  DIFFERS from stored" }
                    );
                }
                Err(why) => {
                    let _ = writeln!(s, "{}: handshake failed: {why}", e.endpoint);
                }
            }
        }
        let n = self.differing().len();
        if n == 0 {
            s.push_str("all endpoints serve the stored certificate\n");
        } else {
            let _ = writeln!(s, "{n} endpoint(s) differ from the stored certificate");
        }
        s
    }
}

/// Reads the stored certificate and handshakes with each `host:port` (SNI `server_name`),
/// accepting any certificate but recording the leaf. Each handshake is bounded by `timeout`.
pub async fn status(
    store: &CertStore,
    server_name: &str,
    endpoints: &[String],
    timeout: Duration,
) -> Result<StatusReport, AcmeError> {
    let stored = store.load()?;
    let mut served = Vec::new();
    for ep in endpoints {
        let cert = tokio::time::timeout(timeout, served_cert(ep, server_name))
            .await
            .unwrap_or_else(|_| Err(format!("no handshake within {timeout:?}")));
        served.push(ServedCert {
            endpoint: ep.clone(),
            cert,
        });
    }
    Ok(StatusReport {
        stored,
        secret: None,
        served,
    })
}

async fn served_cert(endpoint: &str, server_name: &str) -> Result<CertInfo, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(Recorder {
        leaf: Mutex::new(None),
        algs: provider.signature_verification_algorithms,
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| format!("bad server name {server_name}: {e}"))?;
    let tcp = tokio::net::TcpStream::connect(endpoint)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let _tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let leaf = recorder
        .leaf
        .lock()
        .map_err(|_| "poisoned".to_owned())?
        .take()
        .ok_or_else(|| "no certificate presented".to_owned())?;
    CertInfo::from_der(&leaf)
}

/// Accepts any server certificate and keeps the leaf: `status` only looks.
#[derive(Debug)]
struct Recorder {
    leaf: Mutex<Option<Vec<u8>>>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Ok(mut l) = self.leaf.lock() {
            *l = Some(end_entity.to_vec());
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// What `deploy` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    /// `namespace/name` of the Secret.
    pub secret: String,
    /// The certificate now in it.
    pub cert: CertInfo,
    /// The Secret's resourceVersion as the server answered.
    pub resource_version: Option<String>,
    /// Only a server-side dry run.
    pub dry_run: bool,
}

impl fmt::Display for Deployed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} Secret {}: certificate valid until {} (serial {}); turnd reloads it from the \
             mounted Secret without a restart",
            if self.dry_run {
                "would apply"
            } else {
                "applied"
            },
            self.secret,
            self.cert.not_after_text,
            self.cert.serial
        )
    }
}

/// The TLS Secret ([`crate::k8s::TLS_SECRET_NAME`], type `kubernetes.io/tls`) with the stored
/// chain and key.
pub fn tls_secret(
    store: &CertStore,
) -> Result<(k8s_openapi::api::core::v1::Secret, CertInfo), AcmeError> {
    use k8s_openapi::ByteString;
    let read = |path: PathBuf| match std::fs::read(&path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(AcmeError::NothingToDeploy(path)),
        Err(source) => Err(AcmeError::Io { path, source }),
    };
    let chain = read(store.cert_path())?;
    let key = read(store.key_path())?;
    let cert = CertInfo::from_pem(&chain).map_err(|reason| AcmeError::BadStoredFile {
        path: store.cert_path(),
        reason,
    })?;
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(crate::k8s::TLS_SECRET_NAME.to_owned()),
            namespace: Some(crate::k8s::NAMESPACE.to_owned()),
            labels: Some(
                [("app.kubernetes.io/name".to_owned(), "turnd".to_owned())]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(
            [
                ("tls.crt".to_owned(), ByteString(chain)),
                ("tls.key".to_owned(), ByteString(key)),
            ]
            .into_iter()
            .collect(),
        ),
        ..Default::default()
    };
    Ok((secret, cert))
}

/// Puts the stored certificate into the TLS Secret by server-side apply (field manager
/// [`crate::k8s::FIELD_MANAGER`]). Pods mount the Secret as a directory and turnd hot-reloads
/// the files when the kubelet updates them: nothing is restarted or rolled out.
pub async fn deploy(
    client: &kube::Client,
    store: &CertStore,
    dry_run: bool,
) -> Result<Deployed, AcmeError> {
    use crate::k8s::{FIELD_MANAGER, NAMESPACE, TLS_SECRET_NAME};
    let (secret, cert) = tls_secret(store)?;
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), NAMESPACE);
    let mut params = kube::api::PatchParams::apply(FIELD_MANAGER).force();
    if dry_run {
        params = params.dry_run();
    }
    let answer = api
        .patch(TLS_SECRET_NAME, &params, &kube::api::Patch::Apply(&secret))
        .await
        .map_err(|e| AcmeError::Kubernetes {
            step: "applying",
            namespace: NAMESPACE,
            name: TLS_SECRET_NAME,
            source: Box::new(e),
        })?;
    Ok(Deployed {
        secret: format!("{NAMESPACE}/{TLS_SECRET_NAME}"),
        cert,
        resource_version: answer.metadata.resource_version,
        dry_run,
    })
}

/// The certificate in the TLS Secret, if the Secret exists.
pub async fn secret_cert(client: &kube::Client) -> Result<Option<CertInfo>, AcmeError> {
    use crate::k8s::{NAMESPACE, TLS_SECRET_NAME};
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), NAMESPACE);
    let secret = api
        .get_opt(TLS_SECRET_NAME)
        .await
        .map_err(|e| AcmeError::Kubernetes {
            step: "reading",
            namespace: NAMESPACE,
            name: TLS_SECRET_NAME,
            source: Box::new(e),
        })?;
    let Some(pem) = secret
        .and_then(|s| s.data)
        .and_then(|mut d| d.remove("tls.crt"))
    else {
        return Ok(None);
    };
    CertInfo::from_pem(&pem.0)
        .map(Some)
        .map_err(|reason| AcmeError::BadStoredFile {
            path: PathBuf::from(format!("secret {NAMESPACE}/{TLS_SECRET_NAME} tls.crt")),
            reason,
        })
}

/// `provisioner cert ...` (to be nested under the top-level command enum).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CertCommand {
    /// Issue a certificate for the apex and the wildcard now.
    Issue,
    /// Renew when inside the window before expiry (or when forced).
    Renew {
        /// Renew even when not due.
        #[arg(long)]
        force: bool,
    },
    /// Put the stored certificate into the Kubernetes TLS Secret (server-side apply).
    Deploy {
        /// kubeconfig of the cluster (default: `$KUBECONFIG`).
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
    },
    /// The stored certificate's dates, the Secret's, and what each endpoint serves.
    Status {
        /// kubeconfig of the cluster, to read the Secret (default: `$KUBECONFIG`; the Secret
        /// is skipped without one).
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
        /// `host:port` endpoints to handshake with (default: each turnd public IP on 5349
        /// and 443).
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
    },
}

/// Settings from the inventory: its zone, ACME directory and e-mail; the store in
/// `store_dir`. A directory naming Let's Encrypt's staging host is [`Directory::Staging`].
pub fn settings_from_inventory(
    inv: &crate::inventory::Inventory,
    store_dir: &Path,
) -> AcmeSettings {
    let directory = match inv.acme.directory.as_str() {
        LETS_ENCRYPT_PRODUCTION => Directory::Production,
        LETS_ENCRYPT_STAGING => Directory::Staging,
        other => Directory::Url(other.to_owned()),
    };
    let mut s = AcmeSettings::new(directory, &inv.domain.zone, store_dir);
    s.email = Some(inv.acme.email.clone()).filter(|e| !e.is_empty());
    s
}

/// The endpoints `cert status` checks by default: each turnd public IP on 5349 and 443.
pub fn default_endpoints(inv: &crate::inventory::Inventory) -> Vec<String> {
    let mut out = Vec::new();
    for t in &inv.turnd {
        for port in [5349, 443] {
            out.push(format!("{}:{port}", t.public_ip));
        }
    }
    out
}

/// Runs one `cert` command and returns what to print.
pub async fn run_command(
    cmd: &CertCommand,
    settings: &AcmeSettings,
    dns: &CloudflareClient,
    kube: Option<&kube::Client>,
    turn_name: &str,
    default_endpoints: &[String],
    dry_run: bool,
) -> Result<String, AcmeError> {
    match cmd {
        CertCommand::Issue if dry_run => Ok(would_order(settings)),
        CertCommand::Renew { force } if dry_run => {
            match renewal_due(settings, SystemTime::now(), *force) {
                (_, Some(not_due)) => Ok(format!("{not_due}\n")),
                (_, None) => Ok(would_order(settings)),
            }
        }
        CertCommand::Issue => {
            let i = issue(settings, dns).await?;
            Ok(format!(
                "issued: certificate for {} valid until {} stored in {}\n",
                i.cert.names.join(", "),
                i.cert.not_after_text,
                settings.store.cert_path().display()
            ))
        }
        CertCommand::Renew { force } => {
            let out = renew(settings, dns, SystemTime::now(), *force).await?;
            Ok(format!("{out}\n"))
        }
        CertCommand::Status { endpoints, .. } => {
            let eps = if endpoints.is_empty() {
                default_endpoints
            } else {
                endpoints.as_slice()
            };
            let mut r = status(&settings.store, turn_name, eps, Duration::from_secs(10)).await?;
            if let Some(k) = kube {
                r.secret = Some(secret_cert(k).await.map_err(|e| e.to_string()));
            }
            Ok(r.render())
        }
        CertCommand::Deploy { .. } => {
            let k = kube.ok_or(AcmeError::NoKubernetes)?;
            Ok(format!("{}\n", deploy(k, &settings.store, dry_run).await?))
        }
    }
}

/// The certificate store used by the command line: `.provisioner/certs` next to the
/// inventory (beside the journal).
pub fn default_store_dir(inventory: &Path) -> PathBuf {
    renew_state_dir(inventory).join("certs")
}

/// Overrides from the environment, for a private CA (tests, staging setups):
/// `TURND_ACME_CA_ROOT` (PEM file trusted for the ACME server's HTTPS),
/// `TURND_ACME_RESOLVERS` (comma-separated `ip:port` where TXT propagation is checked instead
/// of the zone's name servers), `TURND_CERT_DIR` (the store).
pub fn apply_env_overrides(
    settings: &mut AcmeSettings,
    env: &dyn crate::secrets::EnvSource,
) -> Result<(), AcmeError> {
    if let Some(root) = env.var("TURND_ACME_CA_ROOT").filter(|v| !v.is_empty()) {
        settings.acme_root = Some(PathBuf::from(root));
    }
    if let Some(dir) = env.var("TURND_CERT_DIR").filter(|v| !v.is_empty()) {
        settings.store = CertStore::new(Path::new(&dir));
    }
    if let Some(list) = env.var("TURND_ACME_RESOLVERS").filter(|v| !v.is_empty()) {
        let mut servers = Vec::new();
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            servers.push(item.parse().map_err(|_| AcmeError::BadSetting {
                name: "TURND_ACME_RESOLVERS",
                reason: format!("`{item}` is not an ip:port"),
            })?);
        }
        settings.propagation = Propagation::Servers(servers);
    }
    Ok(())
}

/// `cert deploy` as a plan: one action that puts the stored certificate into the TLS Secret
/// through `api`, applied by [`crate::plan::apply`] and journaled like every other change.
///
/// # Errors
/// [`AcmeError::NothingToDeploy`] or an unreadable stored certificate.
pub fn deploy_plan(
    api: crate::k8s::applier::KubeApi,
    store: &Path,
) -> Result<crate::plan::Plan, AcmeError> {
    use crate::plan::{Action, ActionKind, Plan, Scope, Target};
    let (_, cert) = tls_secret(&CertStore::new(store))?;
    let mut plan = Plan::new(Scope::Command("cert deploy"));
    plan.actions.push(Action {
        target: Target::KubeApi,
        summary: format!(
            "deploy TLS Secret {}/{} (certificate for {}, expires {})",
            crate::k8s::NAMESPACE,
            crate::k8s::TLS_SECRET_NAME,
            cert.names.join(", "),
            cert.not_after_text
        ),
        kind: ActionKind::DeployTls(Box::new(crate::k8s::applier::TlsDeploy {
            api,
            store: store.to_owned(),
        })),
    });
    Ok(plan)
}

/// `provisioner cert ...` for the synchronous command line: settings from the inventory, the
/// Cloudflare token from the environment or `.env`, the Kubernetes API the command line found
/// (`kube`) when the command needs it. Returns what to print.
pub fn run_blocking(
    cmd: &CertCommand,
    inv: &crate::inventory::Inventory,
    inventory_path: &Path,
    env_file: Option<&Path>,
    kube: Option<&crate::k8s::applier::KubeApi>,
    dry_run: bool,
) -> Result<String, AcmeError> {
    let mut settings = settings_from_inventory(inv, &default_store_dir(inventory_path));
    apply_env_overrides(&mut settings, &crate::secrets::ProcessEnv)?;
    let dns = dns::client_from_env(
        &crate::secrets::ProcessEnv,
        &dns::dotenv_path(inventory_path, env_file),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AcmeError::Runtime)?;
    rt.block_on(async {
        let kube = match kube {
            Some(api) => Some(
                api.client()
                    .await
                    .map_err(|e| AcmeError::Kubeconfig(e.to_string()))?,
            ),
            None => None,
        };
        run_command(
            cmd,
            &settings,
            &dns,
            kube.as_ref(),
            &inv.domain.turn,
            &default_endpoints(inv),
            dry_run,
        )
        .await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_urls() {
        assert_eq!(Directory::Staging.url(), LETS_ENCRYPT_STAGING);
        assert_eq!(Directory::Production.url(), LETS_ENCRYPT_PRODUCTION);
        assert_eq!(
            Directory::Url("https://x/dir".into()).url(),
            "https://x/dir"
        );
    }

    #[test]
    fn failure_report_lists_attempts_and_says_what_was_kept() {
        let kept = CertInfo {
            not_before: UNIX_EPOCH,
            not_after: UNIX_EPOCH + Duration::from_secs(1),
            not_after_text: "Jan  1 00:00:01 1970 +00:00".into(),
            names: vec![],
            serial: "01".into(),
        };
        let s = render_failure(&["a".into(), "b".into()], Some(&kept));
        assert!(s.contains("failed after 2 attempt(s)"), "{s}");
        assert!(s.contains("attempt 2: b"), "{s}");
        assert!(
            s.contains("left in place; it EXPIRED at Jan  1 00:00:01 1970"),
            "{s}"
        );
    }
}
