//! DNS records on Cloudflare (v4 API): list, idempotent add, update, delete by record id, and
//! `sync`, which makes the records the inventory implies exist after showing the plan.
//!
//! The client is `reqwest` over rustls (no OpenSSL) with typed requests and responses. Its base
//! URL is configurable ([`DEFAULT_API_BASE`] in production) so that tests point it at a
//! loopback fake of the v4 endpoints. The token and zone id come from `CF_Token` and
//! `CF_Zone_ID` (environment first, then `.env`), read through [`EnvSource`].
//!
//! [`plan_sync`] is pure: it compares what exists with what is wanted, only for the
//! (type, name) pairs that are wanted, and never deletes a record of another name.
//!
//! [`query_txt`] is a minimal DNS client (one UDP question, TXT answers) used to wait for
//! DNS-01 records to reach the zone's authoritative servers.
//!
//! What it leaves out: proxied records are never created (TURN cannot go through Cloudflare's
//! proxy), and only `A`, `AAAA`, `CNAME` and `TXT` are planned by `sync`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::inventory::Inventory;
use crate::secrets::{parse_dotenv, EnvSource, SecretError};

/// Cloudflare's v4 API.
pub const DEFAULT_API_BASE: &str = "https://api.cloudflare.com/client/v4";

/// Records asked for per page when listing (Cloudflare allows up to 5,000 for DNS records).
pub const DEFAULT_PER_PAGE: u32 = 100;

/// Why a DNS operation failed. The variants say who is at fault: the network, Cloudflare's
/// answer, our reading of it, or what the caller asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The command line asks for something impossible.
    #[error("{0}")]
    Usage(String),
    /// The request did not get an HTTP answer (connection, TLS, timeout).
    #[error("Cloudflare API {op}: request failed: {source}")]
    Transport {
        /// The operation, e.g. `list records`.
        op: &'static str,
        /// The HTTP client's error.
        source: reqwest::Error,
    },
    /// Cloudflare answered `success: false` (or an HTTP error status).
    #[error("Cloudflare API {op} refused (HTTP {status}): {}", ApiMessages(.errors))]
    Api {
        /// The operation.
        op: &'static str,
        /// HTTP status.
        status: u16,
        /// The `errors` of the envelope.
        errors: Vec<ApiMessage>,
    },
    /// The answer was not the JSON envelope we expect.
    #[error("Cloudflare API {op}: cannot read the answer (HTTP {status}): {source}; body starts `{body_head}`")]
    Decode {
        /// The operation.
        op: &'static str,
        /// HTTP status.
        status: u16,
        /// The JSON error.
        source: serde_json::Error,
        /// The first bytes of the body.
        body_head: String,
    },
    /// The envelope said success but carried no `result`.
    #[error("Cloudflare API {op}: success without a result")]
    NoResult {
        /// The operation.
        op: &'static str,
    },
    /// The same page came back twice or pages never end.
    #[error("Cloudflare API list records: pagination did not end after {pages} pages")]
    Pagination {
        /// Pages read.
        pages: u32,
    },
    /// `CF_Token` or `CF_Zone_ID` is missing.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(reqwest::Error),
    /// A DNS query for propagation failed.
    #[error("DNS query {name} TXT to {server}: {reason}")]
    Query {
        /// The name asked.
        name: String,
        /// The server asked.
        server: SocketAddr,
        /// What went wrong.
        reason: QueryFailure,
    },
    /// Wanted TXT values did not appear everywhere before the deadline.
    #[error(
        "TXT {name}: not visible on {missing} after {waited:?} (authoritative servers: {servers})"
    )]
    PropagationTimeout {
        /// The name.
        name: String,
        /// Servers still missing a value, with what they answered.
        missing: String,
        /// How long we waited.
        waited: Duration,
        /// All servers checked.
        servers: String,
    },
}

/// Why one DNS query failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryFailure {
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Socket error.
    #[error("socket error: {0}")]
    Io(String),
    /// The answer is not a DNS message for our question.
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
    /// The name is not a valid DNS name.
    #[error("invalid name")]
    InvalidName,
}

struct ApiMessages<'a>(&'a [ApiMessage]);

impl fmt::Display for ApiMessages<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no error detail");
        }
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "code {}: {}", e.code, e.message)?;
        }
        Ok(())
    }
}

/// One entry of an envelope's `errors` or `messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiMessage {
    /// Cloudflare's error code.
    pub code: i64,
    /// Its message.
    pub message: String,
}

/// Pagination of a list answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultInfo {
    /// 1-based page number.
    pub page: u32,
    /// Records per page.
    pub per_page: u32,
    /// Records on this page.
    pub count: u32,
    /// Records in all pages.
    pub total_count: u32,
    /// Number of pages.
    #[serde(default)]
    pub total_pages: Option<u32>,
}

/// The v4 answer envelope.
#[derive(Debug, Deserialize)]
struct Envelope<T> {
    success: bool,
    #[serde(default)]
    errors: Vec<ApiMessage>,
    result: Option<T>,
    #[serde(default)]
    result_info: Option<ResultInfo>,
}

/// A DNS record as Cloudflare stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    /// Cloudflare's record id.
    pub id: String,
    /// `A`, `AAAA`, `CNAME`, `TXT`, ...
    #[serde(rename = "type")]
    pub record_type: String,
    /// Fully qualified name, without the trailing dot.
    pub name: String,
    /// The value.
    pub content: String,
    /// TTL in seconds (1 = automatic).
    pub ttl: u32,
    /// Whether Cloudflare proxies it.
    #[serde(default)]
    pub proxied: bool,
    /// MX (and SRV) priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
}

/// A record to create or the new value of one (the body of POST and PUT).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NewRecord {
    /// `A`, `AAAA`, `CNAME`, `TXT`, ...
    #[serde(rename = "type")]
    pub record_type: String,
    /// Fully qualified name.
    pub name: String,
    /// The value.
    pub content: String,
    /// TTL in seconds (1 = automatic).
    pub ttl: u32,
    /// Always false for what we create.
    pub proxied: bool,
    /// MX priority (required by Cloudflare for MX records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
}

/// The fields `dns update` changes (the body of a PATCH): only those given; the others,
/// `proxied` included, stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecordPatch {
    /// New name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// New content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// New TTL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    /// New priority.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
    /// New proxied flag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxied: Option<bool>,
}

impl RecordPatch {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl NewRecord {
    /// A record with automatic TTL, not proxied. The type is upper-cased.
    pub fn new(record_type: &str, name: &str, content: &str) -> Self {
        Self {
            record_type: record_type.to_ascii_uppercase(),
            name: name.trim_end_matches('.').to_ascii_lowercase(),
            content: content.to_owned(),
            ttl: 1,
            proxied: false,
            priority: None,
        }
    }

    /// Same type, name and content (what makes `add` a no-op).
    pub fn same_as(&self, r: &DnsRecord) -> bool {
        self.record_type.eq_ignore_ascii_case(&r.record_type)
            && self.name.eq_ignore_ascii_case(r.name.trim_end_matches('.'))
            && content_eq(&self.record_type, &self.content, &r.content)
    }
}

/// TXT content may come back quoted; compare without the quotes.
fn content_eq(record_type: &str, a: &str, b: &str) -> bool {
    if record_type.eq_ignore_ascii_case("TXT") {
        a.trim_matches('"') == b.trim_matches('"')
    } else {
        a.eq_ignore_ascii_case(b)
    }
}

/// Filters for listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordFilter {
    /// Only this type.
    pub record_type: Option<String>,
    /// Only this exact name.
    pub name: Option<String>,
    /// Only this content.
    pub content: Option<String>,
}

/// What `add` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddOutcome {
    /// A new record.
    Created(DnsRecord),
    /// A record with the same type, name and content already existed: nothing was sent.
    Unchanged(DnsRecord),
}

impl AddOutcome {
    /// The record, new or existing.
    pub fn record(&self) -> &DnsRecord {
        match self {
            AddOutcome::Created(r) | AddOutcome::Unchanged(r) => r,
        }
    }
}

/// Cloudflare v4 DNS client for one zone.
#[derive(Debug, Clone)]
pub struct CloudflareClient {
    http: reqwest::Client,
    base: String,
    token: ApiToken,
    zone_id: String,
    per_page: u32,
}

impl CloudflareClient {
    /// A client for `zone_id` at `base` (e.g. [`DEFAULT_API_BASE`]). Every request has a
    /// 30 s timeout.
    pub fn new(base: &str, token: ApiToken, zone_id: &str) -> Result<Self, DnsError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("turnd-provisioner/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(DnsError::Client)?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token,
            zone_id: zone_id.to_owned(),
            per_page: DEFAULT_PER_PAGE,
        })
    }

    /// A client from `CF_Token` and `CF_Zone_ID`, from `env` first, then the `.env` file at
    /// `dotenv` (which may be absent).
    pub fn from_env(env: &dyn EnvSource, dotenv: &Path, base: &str) -> Result<Self, DnsError> {
        let file = dotenv.display().to_string();
        let from_file = match std::fs::read_to_string(dotenv) {
            Ok(text) => parse_dotenv(&text, &file)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(SecretError::Read {
                    path: dotenv.to_owned(),
                    source,
                }
                .into())
            }
        };
        let get = |name: &'static str| {
            env.var(name)
                .filter(|v| !v.is_empty())
                .or_else(|| from_file.get(name).filter(|v| !v.is_empty()).cloned())
                .ok_or_else(|| SecretError::Missing {
                    name,
                    dotenv: file.clone(),
                    alias: String::new(),
                })
        };
        let token = get("CF_Token")?;
        let zone = get("CF_Zone_ID")?;
        Self::new(base, ApiToken::new(token), &zone)
    }

    /// Records per page when listing (tests use small pages).
    #[must_use]
    pub fn with_per_page(mut self, per_page: u32) -> Self {
        self.per_page = per_page.max(1);
        self
    }

    /// The zone id.
    pub fn zone_id(&self) -> &str {
        &self.zone_id
    }

    fn records_url(&self) -> String {
        format!("{}/zones/{}/dns_records", self.base, self.zone_id)
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<(T, Option<ResultInfo>), DnsError> {
        let rsp = req
            .bearer_auth(self.token.expose())
            .send()
            .await
            .map_err(|source| DnsError::Transport { op, source })?;
        let status = rsp.status().as_u16();
        let body = rsp
            .bytes()
            .await
            .map_err(|source| DnsError::Transport { op, source })?;
        let env: Envelope<T> = match serde_json::from_slice(&body) {
            Ok(env) => env,
            Err(source) => {
                // An error status with a body that is not ours (a proxy's HTML page): say so
                // as a decode error with the status.
                let head: String = String::from_utf8_lossy(&body).chars().take(120).collect();
                return Err(DnsError::Decode {
                    op,
                    status,
                    source,
                    body_head: head,
                });
            }
        };
        if !env.success || !(200..300).contains(&status) {
            return Err(DnsError::Api {
                op,
                status,
                errors: env.errors,
            });
        }
        let result = env.result.ok_or(DnsError::NoResult { op })?;
        Ok((result, env.result_info))
    }

    /// Every record matching `filter`, across all pages.
    pub async fn list(&self, filter: &RecordFilter) -> Result<Vec<DnsRecord>, DnsError> {
        const MAX_PAGES: u32 = 10_000;
        let mut out = Vec::new();
        let mut page = 1u32;
        loop {
            let mut q: Vec<(&str, String)> = vec![
                ("page", page.to_string()),
                ("per_page", self.per_page.to_string()),
            ];
            if let Some(t) = &filter.record_type {
                q.push(("type", t.to_ascii_uppercase()));
            }
            if let Some(n) = &filter.name {
                q.push(("name", n.trim_end_matches('.').to_ascii_lowercase()));
            }
            if let Some(c) = &filter.content {
                q.push(("content", c.clone()));
            }
            let req = self.http.get(self.records_url()).query(&q);
            let (batch, info): (Vec<DnsRecord>, _) = self.send("list records", req).await?;
            let got = batch.len();
            out.extend(batch);
            let more = match info {
                Some(ResultInfo {
                    total_pages: Some(tp),
                    ..
                }) => page < tp,
                Some(ResultInfo {
                    total_count,
                    per_page,
                    page: p,
                    ..
                }) => u64::from(p) * u64::from(per_page.max(1)) < u64::from(total_count),
                None => false,
            };
            if !more || got == 0 {
                return Ok(out);
            }
            page += 1;
            if page > MAX_PAGES {
                return Err(DnsError::Pagination { pages: page - 1 });
            }
        }
    }

    /// Creates the record unless one with the same type, name and content exists.
    pub async fn add(&self, rec: &NewRecord) -> Result<AddOutcome, DnsError> {
        let existing = self
            .list(&RecordFilter {
                record_type: Some(rec.record_type.clone()),
                name: Some(rec.name.clone()),
                content: None,
            })
            .await?;
        if let Some(r) = existing.into_iter().find(|r| rec.same_as(r)) {
            return Ok(AddOutcome::Unchanged(r));
        }
        self.create(rec).await.map(AddOutcome::Created)
    }

    /// Creates the record without looking first.
    pub async fn create(&self, rec: &NewRecord) -> Result<DnsRecord, DnsError> {
        let req = self.http.post(self.records_url()).json(rec);
        Ok(self.send("create record", req).await?.0)
    }

    /// Replaces the record `id` with `rec`.
    pub async fn update(&self, id: &str, rec: &NewRecord) -> Result<DnsRecord, DnsError> {
        let req = self
            .http
            .put(format!("{}/{id}", self.records_url()))
            .json(rec);
        Ok(self.send("update record", req).await?.0)
    }

    /// Changes only the fields `patch` gives of the record `id` (PATCH).
    pub async fn patch(&self, id: &str, patch: &RecordPatch) -> Result<DnsRecord, DnsError> {
        let req = self
            .http
            .patch(format!("{}/{id}", self.records_url()))
            .json(patch);
        Ok(self.send("update record", req).await?.0)
    }

    /// Deletes the record `id`.
    pub async fn delete(&self, id: &str) -> Result<(), DnsError> {
        #[derive(Deserialize)]
        struct Deleted {
            #[allow(dead_code)]
            id: String,
        }
        let req = self.http.delete(format!("{}/{id}", self.records_url()));
        let _: (Deleted, _) = self.send("delete record", req).await?;
        Ok(())
    }

    /// The zone's authoritative name servers, as Cloudflare assigned them.
    pub async fn name_servers(&self) -> Result<Vec<String>, DnsError> {
        #[derive(Deserialize)]
        struct Zone {
            #[serde(default)]
            name_servers: Vec<String>,
        }
        let req = self
            .http
            .get(format!("{}/zones/{}", self.base, self.zone_id));
        let (zone, _): (Zone, _) = self.send("get zone", req).await?;
        Ok(zone.name_servers)
    }

    /// Applies a plan made by [`plan_sync`], in order; stops at the first error.
    pub async fn apply(&self, plan: &DnsPlan) -> Result<usize, DnsError> {
        for c in &plan.changes {
            self.apply_change(c).await?;
        }
        Ok(plan.changes.len())
    }

    /// Applies one change of a [`plan_sync`] plan.
    pub async fn apply_change(&self, change: &DnsChange) -> Result<(), DnsError> {
        match change {
            DnsChange::Create(r) => {
                self.create(r).await?;
            }
            DnsChange::Update { id, to, .. } => {
                self.update(id, to).await?;
            }
            DnsChange::Delete(r) => self.delete(&r.id).await?,
        }
        Ok(())
    }
}

/// One change of `dns sync` with the client that makes it: the payload of
/// [`crate::plan::ActionKind::Dns`]. Two are equal when they make the same change.
#[derive(Debug, Clone)]
pub struct DnsStep {
    /// The zone's client.
    pub client: CloudflareClient,
    /// The change.
    pub change: DnsChange,
}

impl PartialEq for DnsStep {
    fn eq(&self, other: &Self) -> bool {
        self.change == other.change
    }
}

impl Eq for DnsStep {}

impl DnsStep {
    /// The API request it makes, for a verbose plan.
    pub fn request(&self) -> String {
        match &self.change {
            DnsChange::Create(_) => "POST dns_records".to_owned(),
            DnsChange::Update { id, .. } => format!("PUT dns_records/{id}"),
            DnsChange::Delete(r) => format!("DELETE dns_records/{}", r.id),
        }
    }

    /// Makes the change (blocking).
    ///
    /// # Errors
    /// [`DnsError::Runtime`], or what the API answered.
    pub fn run(&self) -> Result<(), DnsError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DnsError::Runtime)?
            .block_on(self.client.apply_change(&self.change))
    }
}

/// `dns sync` as a plan: one action per change, a delete marked disruptive (the record stops
/// resolving), applied by [`crate::plan::apply`] and journaled like every other change.
pub fn sync_plan(client: &CloudflareClient, plan: &DnsPlan) -> crate::plan::Plan {
    use crate::plan::{Action, ActionKind, Plan, Scope, Target};
    let mut out = Plan::new(Scope::Command("dns sync"));
    for change in &plan.changes {
        let action = Action {
            target: Target::DnsApi,
            summary: change.to_string(),
            kind: ActionKind::Dns(Box::new(DnsStep {
                client: client.clone(),
                change: change.clone(),
            })),
        };
        match change {
            DnsChange::Delete(_) => {
                out.push_disruptive(action, "the record stops resolving");
            }
            _ => out.actions.push(action),
        }
    }
    out
}

/// Lists the zone and computes what `dns sync` would change (the inventory's records and
/// `extra`), blocking: the client and the plan for [`sync_plan`].
///
/// # Errors
/// A missing token, or what the API answered.
pub fn plan_sync_blocking(
    extra: &[(String, String, String)],
    inv: &Inventory,
    inventory_path: &Path,
    env_file: Option<&Path>,
) -> Result<(CloudflareClient, DnsPlan), DnsError> {
    let (client, rt) = blocking_client(inventory_path, env_file)?;
    let plan = rt.block_on(sync_changes(&client, inv, extra))?;
    Ok((client, plan))
}

async fn sync_changes(
    client: &CloudflareClient,
    inv: &Inventory,
    extra: &[(String, String, String)],
) -> Result<DnsPlan, DnsError> {
    let zone = &inv.domain.zone;
    let extra: Vec<NewRecord> = extra
        .iter()
        .map(|(t, n, c)| NewRecord::new(t, &fqdn(n, zone), c))
        .collect();
    let desired = desired_records(inv, &extra);
    let current = client.list(&RecordFilter::default()).await?;
    Ok(plan_sync(&current, &desired))
}

/// The API token; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl ApiToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(***)")
    }
}

/// One change of a sync plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsChange {
    /// Create a record.
    Create(NewRecord),
    /// Change a record in place.
    Update {
        /// Its id.
        id: String,
        /// What it is now.
        from: DnsRecord,
        /// What it becomes.
        to: NewRecord,
    },
    /// Delete a record (only of a wanted type and name, with unwanted content).
    Delete(DnsRecord),
}

impl fmt::Display for DnsChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsChange::Create(r) => write!(
                f,
                "+ create {} {} {} (ttl {})",
                r.record_type, r.name, r.content, r.ttl
            ),
            DnsChange::Update { id, from, to } => write!(
                f,
                "~ update {} {} {} -> {} (ttl {} -> {}, id {id})",
                to.record_type, to.name, from.content, to.content, from.ttl, to.ttl
            ),
            DnsChange::Delete(r) => write!(
                f,
                "- delete {} {} {} (id {})",
                r.record_type, r.name, r.content, r.id
            ),
        }
    }
}

/// What `sync` would change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsPlan {
    /// Changes in the order they are applied.
    pub changes: Vec<DnsChange>,
}

impl DnsPlan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// One line per change, or `dns: up to date`.
    pub fn render(&self) -> String {
        if self.changes.is_empty() {
            return "dns: up to date\n".to_owned();
        }
        let mut s = format!("dns: {} change(s)\n", self.changes.len());
        for c in &self.changes {
            let _ = writeln!(s, "  {c}");
        }
        s
    }
}

/// Compares `current` with `desired`. Only (type, name) pairs present in `desired` are
/// touched: a wanted value that exists stays (its TTL is corrected), a missing one reuses an
/// unwanted record of the same type and name (update) or is created, and unwanted records left
/// over for that type and name are deleted.
pub fn plan_sync(current: &[DnsRecord], desired: &[NewRecord]) -> DnsPlan {
    let key = |t: &str, n: &str| {
        (
            t.to_ascii_uppercase(),
            n.trim_end_matches('.').to_ascii_lowercase(),
        )
    };
    let mut wanted: BTreeMap<(String, String), Vec<&NewRecord>> = BTreeMap::new();
    for d in desired {
        let list = wanted.entry(key(&d.record_type, &d.name)).or_default();
        if !list
            .iter()
            .any(|x| content_eq(&d.record_type, &x.content, &d.content))
        {
            list.push(d);
        }
    }
    let mut changes = Vec::new();
    for ((t, n), want) in &wanted {
        let mut have: Vec<&DnsRecord> = current
            .iter()
            .filter(|r| key(&r.record_type, &r.name) == (t.clone(), n.clone()))
            .collect();
        have.sort_by(|a, b| a.id.cmp(&b.id));
        let mut missing = Vec::new();
        for w in want {
            match have.iter().position(|r| w.same_as(r)) {
                Some(i) => {
                    let r = have.remove(i);
                    if r.ttl != w.ttl || r.proxied != w.proxied {
                        changes.push(DnsChange::Update {
                            id: r.id.clone(),
                            from: r.clone(),
                            to: (*w).clone(),
                        });
                    }
                }
                None => missing.push(*w),
            }
        }
        let mut spare = have.into_iter();
        for w in missing {
            match spare.next() {
                Some(r) => changes.push(DnsChange::Update {
                    id: r.id.clone(),
                    from: r.clone(),
                    to: w.clone(),
                }),
                None => changes.push(DnsChange::Create(w.clone())),
            }
        }
        changes.extend(spare.map(|r| DnsChange::Delete(r.clone())));
    }
    DnsPlan { changes }
}

/// The records the inventory implies: an `A` record for the TURN name (`domain.turn`) to each
/// turnd instance's public IP, plus `extra` (the inventory has no list of other names such as
/// the apex, so the caller passes them).
pub fn desired_records(inv: &Inventory, extra: &[NewRecord]) -> Vec<NewRecord> {
    let mut ips = BTreeSet::new();
    let mut out: Vec<NewRecord> = Vec::new();
    for t in &inv.turnd {
        if ips.insert(t.public_ip) {
            out.push(NewRecord::new(
                "A",
                &inv.domain.turn,
                &t.public_ip.to_string(),
            ));
        }
    }
    out.extend(extra.iter().cloned());
    out
}

/// Expands `@` to the zone and a relative name to `name.zone`; a name already inside the zone
/// is kept.
pub fn fqdn(name: &str, zone: &str) -> String {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let zone = zone.trim_end_matches('.').to_ascii_lowercase();
    if name == "@" || name == zone {
        zone
    } else if name.ends_with(&format!(".{zone}")) {
        name
    } else {
        format!("{name}.{zone}")
    }
}

/// Records as an aligned table (id, type, name, content, ttl).
pub fn render_table(records: &[DnsRecord]) -> String {
    let headers = ["ID", "TYPE", "NAME", "CONTENT", "TTL"];
    let rows: Vec<[String; 5]> = records
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                r.record_type.clone(),
                r.name.clone(),
                r.content.clone(),
                if r.ttl == 1 {
                    "auto".to_owned()
                } else {
                    r.ttl.to_string()
                },
            ]
        })
        .collect();
    let mut width = headers.map(str::len);
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 5]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    out
}

/// Records as pretty JSON.
pub fn render_json(records: &[DnsRecord]) -> String {
    serde_json::to_string_pretty(records).unwrap_or_else(|_| "[]".to_owned())
}

/// Asks `server` for the TXT records of `name` over UDP and returns their strings (each
/// record's character-strings joined).
pub async fn query_txt(
    server: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<Vec<String>, DnsError> {
    let fail = |reason| DnsError::Query {
        name: name.to_owned(),
        server,
        reason,
    };
    let id: u16 = {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (nanos ^ (nanos >> 16)) as u16
    };
    let query = wire::txt_query(id, name).ok_or_else(|| fail(QueryFailure::InvalidName))?;
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| fail(QueryFailure::Io(e.to_string())))?;
    sock.connect(server)
        .await
        .map_err(|e| fail(QueryFailure::Io(e.to_string())))?;
    sock.send(&query)
        .await
        .map_err(|e| fail(QueryFailure::Io(e.to_string())))?;
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Err(_) => return Err(fail(QueryFailure::Timeout(timeout))),
            Ok(Err(e)) => return Err(fail(QueryFailure::Io(e.to_string()))),
            Ok(Ok(n)) => n,
        };
        match wire::parse_txt_answer(&buf[..n], id) {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => continue, // another id: keep waiting
            Err(m) => return Err(fail(QueryFailure::Malformed(m))),
        }
    }
}

/// Waits until every server in `servers` answers TXT `name` with every value in `values`,
/// querying every `interval`, for at most `timeout`.
pub async fn wait_for_txt(
    servers: &[SocketAddr],
    name: &str,
    values: &[String],
    timeout: Duration,
    interval: Duration,
) -> Result<Duration, DnsError> {
    let start = Instant::now();
    loop {
        let mut missing = Vec::new();
        for s in servers {
            let per_query = Duration::from_secs(2).min(timeout);
            match query_txt(*s, name, per_query).await {
                Ok(got) => {
                    if !values.iter().all(|v| got.contains(v)) {
                        missing.push(format!("{s} (has {} value(s))", got.len()));
                    }
                }
                Err(e) => missing.push(format!("{s} ({e})")),
            }
        }
        if missing.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() + interval > timeout {
            return Err(DnsError::PropagationTimeout {
                name: name.to_owned(),
                missing: missing.join(", "),
                waited: start.elapsed(),
                servers: servers
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        tokio::time::sleep(interval).await;
    }
}

/// Resolves name servers (host names) to UDP port 53 addresses with the system resolver.
pub async fn resolve_name_servers(names: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for n in names {
        if let Ok(addrs) = tokio::net::lookup_host((n.trim_end_matches('.'), 53)).await {
            out.extend(addrs.filter(SocketAddr::is_ipv4));
        }
    }
    out
}

/// Output format of `dns list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns.
    #[default]
    Table,
    /// JSON array of records.
    Json,
}

/// `provisioner dns ...` (to be nested under the top-level command enum).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DnsCommand {
    /// List the zone's records.
    List {
        /// Only this type (A, TXT, ...).
        #[arg(long = "type")]
        record_type: Option<String>,
        /// Only this name (`@` for the apex, relative names are in the zone).
        #[arg(long)]
        name: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Add a record unless the same type, name and content exists.
    Add {
        /// Type.
        record_type: String,
        /// Name.
        name: String,
        /// Content.
        content: String,
        /// TTL in seconds (1 = automatic).
        #[arg(long, default_value_t = 1)]
        ttl: u32,
        /// Priority (MX records need one).
        #[arg(long)]
        priority: Option<u16>,
    },
    /// Change the record with this id: only the fields given (a proxied record stays proxied
    /// unless --proxied says otherwise).
    Update {
        /// Record id (see `dns list`).
        id: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New content.
        #[arg(long)]
        content: Option<String>,
        /// New TTL in seconds (1 = automatic).
        #[arg(long)]
        ttl: Option<u32>,
        /// New priority (MX).
        #[arg(long)]
        priority: Option<u16>,
        /// Proxied through Cloudflare or not.
        #[arg(long)]
        proxied: Option<bool>,
    },
    /// Delete the record with this id.
    Delete {
        /// Record id (see `dns list`).
        id: String,
    },
    /// Make the records the inventory implies exist: shows the plan, then applies it.
    Sync {
        /// More wanted records, `TYPE NAME CONTENT` (e.g. `A @ 192.0.2.1`); the inventory only
        /// implies the TURN name's A records.
        #[arg(long = "record", value_name = "TYPE NAME CONTENT", value_parser = parse_record_arg)]
        extra: Vec<(String, String, String)>,
    },
}

fn parse_record_arg(s: &str) -> Result<(String, String, String), String> {
    let mut it = s.split_whitespace();
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(t), Some(n), Some(c), None) => Ok((t.to_owned(), n.to_owned(), c.to_owned())),
        _ => Err(format!("expected `TYPE NAME CONTENT`, found `{s}`")),
    }
}

/// Runs one `dns` command and returns what to print. With `dry_run`, `add`/`update`/`delete`
/// say what they would do. `sync` here only shows its changes: the command line applies them
/// as a plan ([`sync_plan`]) through [`crate::plan::apply`].
pub async fn run_command(
    cmd: &DnsCommand,
    client: &CloudflareClient,
    inv: &Inventory,
    dry_run: bool,
) -> Result<String, DnsError> {
    let zone = &inv.domain.zone;
    match cmd {
        DnsCommand::List {
            record_type,
            name,
            output,
        } => {
            let filter = RecordFilter {
                record_type: record_type.clone(),
                name: name.as_deref().map(|n| fqdn(n, zone)),
                content: None,
            };
            let records = client.list(&filter).await?;
            Ok(match output {
                OutputFormat::Table => render_table(&records),
                OutputFormat::Json => render_json(&records) + "\n",
            })
        }
        DnsCommand::Add {
            record_type,
            name,
            content,
            ttl,
            priority,
        } => {
            let rec = NewRecord {
                ttl: *ttl,
                priority: *priority,
                ..NewRecord::new(record_type, &fqdn(name, zone), content)
            };
            if rec.record_type == "MX" && rec.priority.is_none() {
                return Err(DnsError::Usage(
                    "an MX record needs --priority (e.g. --priority 10)".into(),
                ));
            }
            if dry_run {
                return Ok(format!(
                    "would add {} {} {}\n",
                    rec.record_type, rec.name, rec.content
                ));
            }
            Ok(match client.add(&rec).await? {
                AddOutcome::Created(r) => format!(
                    "created {} {} {} (id {})\n",
                    r.record_type, r.name, r.content, r.id
                ),
                AddOutcome::Unchanged(r) => format!(
                    "unchanged: {} {} {} exists (id {})\n",
                    r.record_type, r.name, r.content, r.id
                ),
            })
        }
        DnsCommand::Update {
            id,
            name,
            content,
            ttl,
            priority,
            proxied,
        } => {
            let patch = RecordPatch {
                name: name.as_deref().map(|n| fqdn(n, zone)),
                content: content.clone(),
                ttl: *ttl,
                priority: *priority,
                proxied: *proxied,
            };
            if patch.is_empty() {
                return Err(DnsError::Usage(
                    "nothing to change: give --name, --content, --ttl, --priority or --proxied"
                        .into(),
                ));
            }
            let body = serde_json::to_string(&patch).unwrap_or_default();
            if dry_run {
                return Ok(format!("would update {id}: {body}\n"));
            }
            let r = client.patch(id, &patch).await?;
            Ok(format!(
                "updated {} {} {} (id {}{})\n",
                r.record_type,
                r.name,
                r.content,
                r.id,
                if r.proxied { ", proxied" } else { "" }
            ))
        }
        DnsCommand::Delete { id } => {
            if dry_run {
                return Ok(format!("would delete {id}\n"));
            }
            client.delete(id).await?;
            Ok(format!("deleted {id}\n"))
        }
        // Applying goes through the command line's plan (`sync_plan`); here only the plan.
        DnsCommand::Sync { extra } => Ok(sync_changes(client, inv, extra).await?.render()),
    }
}

/// The `.env` file: `env_file` if given, else `.env` next to the inventory.
pub fn dotenv_path(inventory: &Path, env_file: Option<&Path>) -> std::path::PathBuf {
    env_file.map_or_else(
        || inventory.parent().unwrap_or(Path::new(".")).join(".env"),
        Path::to_owned,
    )
}

/// A client from `CF_Token`/`CF_Zone_ID` (environment, then `.env`); `CF_API_BASE` overrides
/// [`DEFAULT_API_BASE`].
pub fn client_from_env(env: &dyn EnvSource, dotenv: &Path) -> Result<CloudflareClient, DnsError> {
    let base = env
        .var("CF_API_BASE")
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| DEFAULT_API_BASE.to_owned());
    CloudflareClient::from_env(env, dotenv, &base)
}

/// `provisioner dns ...` for the synchronous command line: loads the token, runs the command
/// on a current-thread runtime, returns what to print.
pub fn run_blocking(
    cmd: &DnsCommand,
    inv: &Inventory,
    inventory_path: &Path,
    env_file: Option<&Path>,
    dry_run: bool,
) -> Result<String, DnsError> {
    let (client, rt) = blocking_client(inventory_path, env_file)?;
    rt.block_on(run_command(cmd, &client, inv, dry_run))
}

/// The command line's client (token from the environment or `.env`) and a current-thread
/// runtime to drive it.
fn blocking_client(
    inventory_path: &Path,
    env_file: Option<&Path>,
) -> Result<(CloudflareClient, tokio::runtime::Runtime), DnsError> {
    let client = client_from_env(
        &crate::secrets::ProcessEnv,
        &dotenv_path(inventory_path, env_file),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DnsError::Runtime)?;
    Ok((client, rt))
}

/// DNS wire format, just enough for one TXT question (RFC 1035 section 4).
mod wire {
    const TYPE_TXT: u16 = 16;
    const CLASS_IN: u16 = 1;

    pub(super) fn txt_query(id: u16, name: &str) -> Option<Vec<u8>> {
        let mut m = Vec::with_capacity(64);
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x01, 0x00]); // RD
        m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QD=1
        for label in name.trim_end_matches('.').split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&TYPE_TXT.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        Some(m)
    }

    fn u16_at(b: &[u8], i: usize) -> Result<u16, &'static str> {
        b.get(i..i + 2)
            .map(|s| u16::from_be_bytes([s[0], s[1]]))
            .ok_or("truncated")
    }

    /// Skips a (possibly compressed) name at `i`; returns the index after it.
    fn skip_name(b: &[u8], mut i: usize) -> Result<usize, &'static str> {
        loop {
            let len = *b.get(i).ok_or("truncated name")?;
            if len & 0xC0 == 0xC0 {
                return Ok(i + 2);
            }
            if len == 0 {
                return Ok(i + 1);
            }
            i += 1 + usize::from(len);
        }
    }

    /// `Ok(None)` when the id is not ours.
    pub(super) fn parse_txt_answer(b: &[u8], id: u16) -> Result<Option<Vec<String>>, &'static str> {
        if u16_at(b, 0)? != id {
            return Ok(None);
        }
        let flags = u16_at(b, 2)?;
        if flags & 0x8000 == 0 {
            return Err("not a response");
        }
        let rcode = flags & 0x000F;
        if rcode == 3 {
            return Ok(Some(Vec::new())); // NXDOMAIN: no values
        }
        if rcode != 0 {
            return Err("server error rcode");
        }
        let qd = u16_at(b, 4)?;
        let an = u16_at(b, 6)?;
        let mut i = 12;
        for _ in 0..qd {
            i = skip_name(b, i)? + 4;
        }
        let mut out = Vec::new();
        for _ in 0..an {
            i = skip_name(b, i)?;
            let rtype = u16_at(b, i)?;
            let rdlen = usize::from(u16_at(b, i + 8)?);
            let start = i + 10;
            let rdata = b.get(start..start + rdlen).ok_or("truncated rdata")?;
            i = start + rdlen;
            if rtype != TYPE_TXT {
                continue;
            }
            let mut s = String::new();
            let mut j = 0;
            while j < rdata.len() {
                let l = usize::from(rdata[j]);
                let part = rdata.get(j + 1..j + 1 + l).ok_or("truncated TXT string")?;
                s.push_str(&String::from_utf8_lossy(part));
                j += 1 + l;
            }
            out.push(s);
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, t: &str, n: &str, c: &str) -> DnsRecord {
        DnsRecord {
            id: id.into(),
            record_type: t.into(),
            name: n.into(),
            content: c.into(),
            ttl: 1,
            proxied: false,
            priority: None,
        }
    }

    #[test]
    fn plan_creates_missing_updates_spare_and_deletes_extra_of_wanted_names_only() {
        let current = vec![
            rec("1", "A", "turn.example.net", "192.0.2.1"),
            rec("2", "A", "turn.example.net", "192.0.2.9"),
            rec("3", "A", "turn.example.net", "192.0.2.10"),
            rec("4", "A", "www.example.net", "192.0.2.50"),
        ];
        let desired = vec![
            NewRecord::new("A", "turn.example.net", "192.0.2.1"),
            NewRecord::new("A", "turn.example.net", "192.0.2.2"),
            NewRecord::new("A", "example.net", "192.0.2.3"),
        ];
        let plan = plan_sync(&current, &desired);
        let text = plan.render();
        assert!(text.contains("+ create A example.net 192.0.2.3"), "{text}");
        assert!(
            text.contains("~ update A turn.example.net 192.0.2.9 -> 192.0.2.2"),
            "{text}"
        );
        assert!(
            text.contains("- delete A turn.example.net 192.0.2.10 (id 3)"),
            "{text}"
        );
        assert!(
            !text.contains("www"),
            "other names are never touched: {text}"
        );
        assert_eq!(plan.changes.len(), 3);
    }

    #[test]
    fn sync_is_a_plan_whose_deletes_need_yes() {
        let current = vec![
            rec("2", "A", "turn.example.net", "192.0.2.9"),
            rec("3", "A", "turn.example.net", "192.0.2.10"),
        ];
        let desired = vec![NewRecord::new("A", "turn.example.net", "192.0.2.2")];
        let client = CloudflareClient::new("http://127.0.0.1:9", ApiToken::new("t"), "zone")
            .expect("client");
        let plan = sync_plan(&client, &plan_sync(&current, &desired));
        assert_eq!(
            plan.render(false),
            "dns sync: 2 action(s)\n   \
             1. [dns-api] ~ update A turn.example.net 192.0.2.9 -> 192.0.2.2 (ttl 1 -> 1, id 2)\n   \
             2. [dns-api] - delete A turn.example.net 192.0.2.10 (id 3) (DISRUPTIVE: the record stops resolving)\n"
        );
        let err = crate::plan::confirm(&plan, false, None).expect_err("a delete needs --yes");
        assert!(
            err.to_string()
                .starts_with("dns sync: not applied: 1 disruptive action(s) need --yes"),
            "{err}"
        );
    }

    #[test]
    fn plan_is_empty_when_everything_matches() {
        let current = vec![rec("1", "TXT", "example.net", "\"v=spf1 -all\"")];
        let desired = vec![NewRecord::new("txt", "example.net.", "v=spf1 -all")];
        assert!(plan_sync(&current, &desired).is_empty());
    }

    #[test]
    fn fqdn_expands_apex_and_relative_names() {
        assert_eq!(fqdn("@", "example.net"), "example.net");
        assert_eq!(fqdn("turn", "example.net"), "turn.example.net");
        assert_eq!(fqdn("Turn.Example.net.", "example.net"), "turn.example.net");
    }

    #[test]
    fn txt_answer_with_compression_and_two_strings_parses() {
        let q = wire::txt_query(7, "_acme-challenge.example.net").expect("valid");
        let mut a = q.clone();
        a[2] = 0x81;
        a[3] = 0x80;
        a[7] = 1; // AN=1
        a.extend_from_slice(&[0xC0, 12, 0, 16, 0, 1, 0, 0, 0, 60]);
        a.extend_from_slice(&[0, 8, 3, b'a', b'b', b'c', 3, b'd', b'e', b'f']);
        assert_eq!(
            wire::parse_txt_answer(&a, 7),
            Ok(Some(vec!["abcdef".to_owned()]))
        );
        assert_eq!(wire::parse_txt_answer(&a, 8), Ok(None));
    }

    #[test]
    fn table_aligns_columns() {
        let t = render_table(&[rec("abc", "A", "turn.example.net", "192.0.2.1")]);
        assert_eq!(
            t,
            "ID   TYPE  NAME              CONTENT    TTL\nabc  A     turn.example.net  192.0.2.1  auto\n"
        );
    }

    #[test]
    fn api_error_lists_codes_and_messages() {
        let e = DnsError::Api {
            op: "create record",
            status: 400,
            errors: vec![ApiMessage {
                code: 81057,
                message: "Record already exists.".into(),
            }],
        };
        assert_eq!(
            e.to_string(),
            "Cloudflare API create record refused (HTTP 400): code 81057: Record already exists."
        );
    }
}
