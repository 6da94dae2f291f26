//! Secrets: read from the process environment or a `.env` file, never from the inventory.
//!
//! The environment is read through [`EnvSource`] so that tests pass a map instead of calling
//! `set_var`. A variable set in the environment wins over the same one in `.env`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Why secrets could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A required secret is in neither the environment nor the `.env` file.
    #[error("missing secret {name}: set it in the environment or in {dotenv}{alias}")]
    Missing {
        /// The variable.
        name: &'static str,
        /// The `.env` file that was searched.
        dotenv: String,
        /// Mention of an accepted old name, if any.
        alias: String,
    },
    /// A `.env` line is not `NAME=value`.
    #[error("{file}:{line}: expected NAME=value, found `{text}`")]
    DotenvSyntax {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// The `.env` file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Where environment variables come from.
pub trait EnvSource {
    /// The value of `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// A secret value whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The secrets the later phases need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secrets {
    /// Cloudflare API token for DNS-01.
    pub cf_token: Secret,
    /// Cloudflare zone id.
    pub cf_zone_id: Secret,
    /// turnd's REST-API shared secret.
    pub turnd_auth_secret: Secret,
}

/// Parses a `.env` file: `NAME=value` lines, `#` comments, blank lines, optional `export `
/// prefix, values optionally in single or double quotes.
pub fn parse_dotenv(text: &str, file: &str) -> Result<BTreeMap<String, String>, SecretError> {
    let mut out = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let bad = || SecretError::DotenvSyntax {
            file: file.to_owned(),
            line: i + 1,
            text: raw.to_owned(),
        };
        let (name, value) = line.split_once('=').ok_or_else(bad)?;
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad());
        }
        let value = value.trim();
        let value = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        out.insert(name.to_owned(), value.to_owned());
    }
    Ok(out)
}

/// The variables of the `.env` file at `dotenv`; none when the file does not exist.
///
/// # Errors
/// [`SecretError::Read`] when it exists but cannot be read, [`SecretError::DotenvSyntax`].
pub fn read_dotenv(dotenv: &Path) -> Result<BTreeMap<String, String>, SecretError> {
    match std::fs::read_to_string(dotenv) {
        Ok(text) => parse_dotenv(&text, &dotenv.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(source) => Err(SecretError::Read {
            path: dotenv.to_owned(),
            source,
        }),
    }
}

impl Secrets {
    /// Loads the secrets from `env`, falling back to the `.env` file at `dotenv` (which may be
    /// absent). `TURND_AUTH_SECRET` also accepts the old name `COTURN_AUTH_SECRET`.
    pub fn load(env: &dyn EnvSource, dotenv: &Path) -> Result<Self, SecretError> {
        let file = dotenv.display().to_string();
        let from_file = read_dotenv(dotenv)?;
        let get = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| env.var(n).filter(|v| !v.is_empty()))
                .or_else(|| {
                    names
                        .iter()
                        .find_map(|n| from_file.get(*n).filter(|v| !v.is_empty()).cloned())
                })
                .map(Secret)
        };
        let need = |name: &'static str, alias: Option<&'static str>| {
            let mut names = vec![name];
            names.extend(alias);
            get(&names).ok_or_else(|| SecretError::Missing {
                name,
                dotenv: file.clone(),
                alias: alias
                    .map(|a| format!(" (the old name {a} is accepted too)"))
                    .unwrap_or_default(),
            })
        };
        let secrets = Self {
            cf_token: need("CF_Token", None)?,
            cf_zone_id: need("CF_Zone_ID", None)?,
            turnd_auth_secret: need("TURND_AUTH_SECRET", Some("COTURN_AUTH_SECRET"))?,
        };
        // Masked in every `-v` log line from now on.
        crate::exec::redact::remember(secrets.cf_token.expose());
        crate::exec::redact::remember(secrets.turnd_auth_secret.expose());
        Ok(secrets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn environment_wins_over_dotenv_and_old_name_is_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dotenv = dir.path().join(".env");
        std::fs::write(
            &dotenv,
            "# comment\nexport CF_Token=\"file-token\"\nCF_Zone_ID='zone'\nCOTURN_AUTH_SECRET=old\n",
        )
        .expect("write");
        let s = Secrets::load(&env(&[("CF_Token", "env-token")]), &dotenv).expect("loads");
        assert_eq!(s.cf_token.expose(), "env-token");
        assert_eq!(s.cf_zone_id.expose(), "zone");
        assert_eq!(s.turnd_auth_secret.expose(), "old");
        assert!(!format!("{s:?}").contains("env-token"));
    }

    #[test]
    fn missing_secret_names_the_variable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Secrets::load(
            &env(&[("CF_Token", "t"), ("CF_Zone_ID", "z")]),
            &dir.path().join(".env"),
        )
        .expect_err("missing");
        let msg = err.to_string();
        assert!(msg.starts_with("missing secret TURND_AUTH_SECRET"), "{msg}");
        assert!(msg.contains("COTURN_AUTH_SECRET"), "{msg}");
    }

    #[test]
    fn bad_dotenv_line_names_file_and_line() {
        let err = parse_dotenv("A=1\nnot a pair\n", ".env").expect_err("bad");
        assert_eq!(
            err.to_string(),
            ".env:2: expected NAME=value, found `not a pair`"
        );
    }
}
