//! Redaction of what the transports log with `-v`: commands and their output pass through
//! [`redact`] before they are logged, so a kubeconfig read from the master, a join token, a
//! private key or a secret this process loaded never reaches the terminal or a CI log.
//!
//! What is masked: the values of kubeconfig and YAML keys that carry credentials
//! (`client-key-data`, `client-certificate-data`, `token`, `password`, …), `NAME=value` lines
//! whose name says secret, token, password or key, PEM private key blocks, kubeadm bootstrap
//! tokens (`abcdef.0123456789abcdef`) wherever they appear, and every value passed to
//! [`remember`] (the secrets loaded from the environment or `.env`).

use std::sync::Mutex;

/// What replaces a masked value.
pub const MASK: &str = "<redacted>";

static REMEMBERED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Masks `value` in every later log line (values shorter than 4 characters are ignored: they
/// would mask ordinary words).
pub fn remember(value: &str) {
    if value.len() < 4 {
        return;
    }
    let mut r = REMEMBERED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !r.iter().any(|v| v == value) {
        r.push(value.to_owned());
        // Longest first, so a secret that contains another is masked whole.
        r.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }
}

/// YAML/kubeconfig keys whose values are credentials.
const SECRET_KEYS: [&str; 8] = [
    "client-key-data",
    "client-certificate-data",
    "token",
    "password",
    "secret",
    "auth-secret",
    "id-token",
    "refresh-token",
];

fn secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["secret", "token", "password", "passwd", "api_key", "apikey"]
        .iter()
        .any(|w| n.contains(w))
}

/// Whether `w` looks like a kubeadm bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`).
fn bootstrap_token(w: &str) -> bool {
    let b = w.as_bytes();
    b.len() == 23
        && b[6] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 6 || c.is_ascii_lowercase() || c.is_ascii_digit())
}

fn mask_tokens(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if bootstrap_token(word) {
            out.push_str(MASK);
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in line.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn mask_line(line: &str) -> String {
    let trimmed = line.trim_start().trim_start_matches("- ");
    // `key: value` (YAML, kubeconfig).
    if let Some((key, value)) = trimmed.split_once(':') {
        if SECRET_KEYS.contains(&key.trim()) && !value.trim().is_empty() {
            let indent = &line[..line.len() - trimmed.len()];
            return format!("{indent}{key}: {MASK}");
        }
    }
    // `NAME=value` (.env, environment dumps).
    if let Some((name, value)) = trimmed.split_once('=') {
        let name_ok = !name.is_empty()
            && name
                .trim_start_matches("export ")
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if name_ok && secret_name(name) && !value.is_empty() {
            let indent = &line[..line.len() - trimmed.len()];
            return format!("{indent}{name}={MASK}");
        }
    }
    mask_tokens(line)
}

/// `text` with every credential masked (see the module docs).
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_key = false;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let nl = &line[body.len()..];
        if in_key {
            if body.contains("-----END") {
                in_key = false;
                out.push_str(body);
                out.push_str(nl);
            }
            continue;
        }
        if body.contains("-----BEGIN") && body.contains("PRIVATE KEY-----") {
            in_key = true;
            out.push_str(body);
            out.push('\n');
            out.push_str(MASK);
            out.push('\n');
            continue;
        }
        out.push_str(&mask_line(body));
        out.push_str(nl);
    }
    let remembered = REMEMBERED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for secret in remembered.iter() {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), MASK);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_credentials_keys_tokens_and_remembered_values_are_masked() {
        let admin_conf = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: LS0tQ0E=\n    server: https://10.10.10.10:6443\nusers:\n- name: kubernetes-admin\n  user:\n    client-certificate-data: LS0tQ0VSVA==\n    client-key-data: LS0tS0VZ\n";
        let r = redact(admin_conf);
        assert!(
            !r.contains("LS0tS0VZ") && !r.contains("LS0tQ0VSVA=="),
            "{r}"
        );
        assert!(r.contains("    client-key-data: <redacted>\n"), "{r}");
        assert!(r.contains("server: https://10.10.10.10:6443"), "{r}");

        let join = "kubeadm join 10.10.10.10:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:00\n";
        assert_eq!(
            redact(join),
            "kubeadm join 10.10.10.10:6443 --token <redacted> --discovery-token-ca-cert-hash sha256:00\n"
        );

        let key = "x\n-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----\ny";
        assert_eq!(
            redact(key),
            "x\n-----BEGIN PRIVATE KEY-----\n<redacted>\n-----END PRIVATE KEY-----\ny"
        );

        assert_eq!(
            redact("CF_Token=abc123\nCF_Zone_ID=z\nexport TURND_AUTH_SECRET='x y'\n"),
            "CF_Token=<redacted>\nCF_Zone_ID=z\nexport TURND_AUTH_SECRET=<redacted>\n"
        );

        remember("s3cret-value-from-dotenv");
        assert_eq!(
            redact("secrets = [\"s3cret-value-from-dotenv\"]"),
            "secrets = [\"<redacted>\"]"
        );
        assert_eq!(
            redact("nothing to hide: 1.2.3.4"),
            "nothing to hide: 1.2.3.4"
        );
    }
}
