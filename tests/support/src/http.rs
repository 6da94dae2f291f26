//! A raw HTTP/1.1 client for turnd's admin listener and Prometheus's API: one request per
//! connection (`Connection: close`), chunked bodies decoded, every wait bounded.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::IO_TIMEOUT;

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The header lines, as sent.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked), as text.
    pub body: String,
}

impl Reply {
    /// The first header named `name` (case-insensitive).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, which `Content-Type` must announce.
    ///
    /// # Panics
    /// The content type is not `application/json` or the body is not JSON.
    #[must_use]
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{}",
            self.body
        );
        serde_json::from_str(&self.body).expect("a JSON body")
    }

    /// The `error` of a JSON error body (turnd's admin API).
    ///
    /// # Panics
    /// The body is not JSON or has no `error` string.
    #[must_use]
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .expect("an error reason")
            .to_owned()
    }
}

/// Sends `method target` to `addr` (with `Authorization: Bearer token` when given) and reads
/// the whole response.
///
/// # Errors
/// The connection failed, timed out, or the response is not HTTP.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    token: Option<&str>,
) -> anyhow::Result<Reply> {
    let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        raw.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if matches!(method, "POST" | "PUT") {
        raw.push_str("Content-Length: 0\r\n");
    }
    raw.push_str("\r\n");
    exchange(addr, raw.as_bytes()).with_context(|| format!("{method} {target} on {addr}"))
}

/// Sends the raw bytes `raw` (a whole request, as a test wants it on the wire) to `addr` and
/// reads the response until the server closes.
///
/// # Errors
/// The connection failed, timed out, or the response is not HTTP.
pub fn exchange(addr: SocketAddr, raw: &[u8]) -> anyhow::Result<Reply> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    exchange_on(s, raw)
}

/// As [`exchange`], on a connection the caller opened.
///
/// # Errors
/// As [`exchange`].
pub fn exchange_on(mut s: TcpStream, raw: &[u8]) -> anyhow::Result<Reply> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(raw)?;
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes).context("reading the answer")?;
    parse(&String::from_utf8_lossy(&bytes))
}

/// `GET target`, without a token.
///
/// # Errors
/// As [`request`].
pub fn get(addr: SocketAddr, target: &str) -> anyhow::Result<Reply> {
    request(addr, "GET", target, None)
}

fn parse(text: &str) -> anyhow::Result<Reply> {
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no end of headers in {text:?}");
    };
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(body).context("bad chunked body")?
    } else {
        body.to_owned()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(after.get(..n)?);
        rest = after.get(n + 2..)?;
    }
}

/// Percent-encodes a query value.
#[must_use]
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_plain_bodies_parse() {
        let r = parse(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hello!"));
        let r = parse("HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_str()), (401, "{}"));
        assert_eq!(r.header("Content-Length"), Some("2"));
    }
}
