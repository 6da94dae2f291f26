//! Configuration errors: every one says where (file, line, key) and why.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Where a configuration error was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file name, or a label such as `<embedded default>` or `<string>`.
    pub file: String,
    /// 1-based line, when the error can be tied to a place in the file.
    pub line: Option<usize>,
    /// 1-based column (in characters), together with `line`.
    pub column: Option<usize>,
    /// The dotted key, e.g. `relay.max_port` or `peers.deny[2]`; for an
    /// environment variable its name, e.g. `TURND_AUTH_SECRET_FILE`.
    pub key: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        Ok(())
    }
}

/// A configuration error: the place and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {reason}")]
pub struct ConfigError {
    /// Where the error is (boxed: errors are rare, `Result`s are everywhere).
    pub location: Box<Location>,
    /// What is wrong. (Part of the message, so not also reported as the `source()`.)
    pub reason: Box<Reason>,
}

impl ConfigError {
    /// An error at `location` for `reason`.
    #[must_use]
    pub fn new(location: Location, reason: Reason) -> Self {
        Self {
            location: Box::new(location),
            reason: Box::new(reason),
        }
    }

    /// The reason, for matching in callers and tests.
    #[must_use]
    pub fn reason(&self) -> &Reason {
        &self.reason
    }
}

/// Every error found in one configuration, in file order (errors about the environment
/// last). Never empty.
#[derive(Debug)]
pub struct ConfigErrors {
    first: ConfigError,
    rest: Vec<ConfigError>,
}

impl ConfigErrors {
    /// Sorts `errors` by line; `None` when there are none.
    pub(crate) fn from_vec(mut errors: Vec<ConfigError>) -> Option<Self> {
        errors.sort_by_key(|e| {
            (
                e.location.line.is_none(),
                e.location.line,
                e.location.column,
            )
        });
        let mut it = errors.into_iter();
        let first = it.next()?;
        Some(Self {
            first,
            rest: it.collect(),
        })
    }

    /// The first error (in file order).
    #[must_use]
    pub fn first(&self) -> &ConfigError {
        &self.first
    }

    /// The first error, for callers that report one.
    #[must_use]
    pub fn into_first(self) -> ConfigError {
        self.first
    }

    /// All the errors, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        std::iter::once(&self.first).chain(&self.rest)
    }

    /// How many errors there are (at least one).
    #[must_use]
    pub fn len(&self) -> usize {
        1 + self.rest.len()
    }

    /// Always false: there is at least one error.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(first: ConfigError) -> Self {
        Self {
            first,
            rest: Vec::new(),
        }
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::iter::Chain<std::iter::Once<ConfigError>, std::vec::IntoIter<ConfigError>>;
    fn into_iter(self) -> Self::IntoIter {
        std::iter::once(self.first).chain(self.rest)
    }
}

/// One error per line.
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Reason {
    /// The configuration file could not be read.
    #[error("cannot read the file: {0}")]
    Read(#[source] io::Error),
    /// The TOML does not parse, or a value has the wrong type (the parser's message).
    #[error("{message}")]
    Syntax {
        /// The TOML parser's description.
        message: String,
    },
    /// A key turnd does not know (typo, or an option from another server).
    #[error("unknown key `{key}`; expected one of: {expected}")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The keys accepted at that place.
        expected: String,
    },
    /// An address did not parse.
    #[error("`{value}` is not a valid {what}")]
    BadAddress {
        /// The text as written.
        value: String,
        /// What was expected, e.g. "IP address" or "socket address (IP:port)".
        what: &'static str,
    },
    /// A CIDR (or single IP) in a peer list did not parse.
    #[error("`{value}` is not a valid CIDR or IP address: {detail}")]
    BadCidr {
        /// The text as written.
        value: String,
        /// The parser's explanation.
        detail: String,
    },
    /// `relay.min_port` is greater than `relay.max_port`.
    #[error("inverted relay port range: min_port {min} is greater than max_port {max}")]
    InvertedPortRange {
        /// `relay.min_port`.
        min: u16,
        /// `relay.max_port`.
        max: u16,
    },
    /// A duration did not parse or is out of range.
    #[error("`{value}` is not a valid duration: {detail}")]
    BadDuration {
        /// The text as written.
        value: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A secret file (from the config or `TURND_AUTH_SECRET_FILE`) could not be read.
    #[error("cannot read secret file {}: {source}", path.display())]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A secret (or secret file) is empty.
    #[error("{0} is empty")]
    EmptySecret(String),
    /// The admin token is too short to resist guessing.
    #[error(
        "{what} holds a token of {len} bytes; the admin token needs at least {}",
        super::validate::MIN_ADMIN_TOKEN_BYTES
    )]
    ShortToken {
        /// Where the token came from (file or variable).
        what: String,
        /// Its length in bytes.
        len: usize,
    },
    /// No listener at all: the server would serve nothing.
    #[error("no listener: listen.udp, listen.tcp and listen.tls are all empty, so turnd would serve nothing")]
    NoListener,
    /// The TLS certificate or key does not load (the loader's message names the file).
    #[error("{detail}")]
    Tls {
        /// What the TLS loader reported.
        detail: String,
    },
    /// A static user's key is not `0x` followed by 32 hex digits.
    #[error("`{0}` is not a 16-byte key: expected 0x followed by 32 hex digits, as `turnadmin -k` prints")]
    BadKey(String),
    /// A static user has both or neither of `password` and `key`.
    #[error("user `{0}` needs exactly one of `password` and `key`")]
    UserCredential(String),
    /// A name occurs twice where it must be unique.
    #[error("`{0}` is listed twice")]
    Duplicate(String),
    /// No way to authenticate clients was configured.
    #[error(
        "no credentials: set auth.secrets, auth.secret_files or auth.users, \
         or the environment variable TURND_AUTH_SECRET or TURND_AUTH_SECRET_FILE"
    )]
    NoCredentials,
    /// A value is outside what turnd accepts.
    #[error("{value} is out of range: {detail}")]
    OutOfRange {
        /// The value as written.
        value: String,
        /// The accepted range and why.
        detail: &'static str,
    },
    /// A value is well-formed but not usable here.
    #[error("`{value}`: {detail}")]
    Unusable {
        /// The value as written.
        value: String,
        /// Why it cannot be used.
        detail: &'static str,
    },
    /// Two settings contradict each other.
    #[error("{0}")]
    Conflict(&'static str),
    /// The log filter does not parse.
    #[error("`{value}` is not a valid log level or filter: {detail}")]
    BadLogLevel {
        /// The text as written.
        value: String,
        /// The filter parser's explanation.
        detail: String,
    },
}
