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
        super::MIN_ADMIN_TOKEN_BYTES
    )]
    ShortToken {
        /// Where the token came from (file or variable).
        what: String,
        /// Its length in bytes.
        len: usize,
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
