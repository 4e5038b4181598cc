//! What went wrong talking to an HTTP peer, in words a person can act on: the peer and the
//! cause (connection refused, DNS, TLS, timeout, or the status and the first line of the
//! body), not reqwest's "error sending request for url (…)" that hides the cause in its
//! source chain.

use std::error::Error as StdError;

/// The cause of a request that got no answer, read off the error's source chain.
pub fn cause(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out waiting for an answer".into();
    }
    let chain = chain(e);
    if let Some(cause) = io_cause(e) {
        return cause;
    }
    let lower = chain.to_lowercase();
    if lower.contains("dns error") || lower.contains("failed to lookup address") {
        return format!("DNS lookup failed: {}", innermost(e));
    }
    if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("ssl")
        || lower.contains("invalidcontenttype")
        || lower.contains("corrupt message")
    {
        return format!("TLS handshake failed: {}", innermost(e));
    }
    if e.is_connect() {
        return format!("could not connect: {}", innermost(e));
    }
    if e.is_decode() || e.is_body() {
        return format!("the answer broke off or is malformed: {}", innermost(e));
    }
    innermost(e)
}

/// `METHOD url: cause` for a request that got no answer.
pub fn unanswered(method: &str, url: &str, e: &reqwest::Error) -> String {
    format!("{method} {url}: {}", cause(e))
}

/// `METHOD url: answered 503 Service Unavailable: <first line of the body>`.
pub fn answered(method: &str, url: &str, status: reqwest::StatusCode, body: &str) -> String {
    let first = first_line(body);
    if first.is_empty() {
        format!("{method} {url}: answered {status}")
    } else {
        format!("{method} {url}: answered {status}: {first}")
    }
}

/// The first non-empty line of a body, at most 200 characters (an HTML error page's first
/// line is its doctype: its `<title>` says more).
pub fn first_line(body: &str) -> String {
    let text = match (body.find("<title>"), body.find("</title>")) {
        (Some(start), Some(end)) if start + 7 <= end => &body[start + 7..end],
        _ => body,
    };
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    match line.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_string(),
    }
}

fn chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn innermost(e: &reqwest::Error) -> String {
    let mut last: &dyn StdError = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string()
}

/// The socket-level cause in an error's chain, in the words `cause` uses, for any peer (an
/// HTTP API, a database driver's connect error): connection refused or reset, a connect
/// timeout, an unreachable host. `None` when the chain holds none of those.
pub fn io_cause(e: &(dyn StdError + 'static)) -> Option<String> {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            let kind = io.kind();
            return match kind {
                ConnectionRefused => Some("connection refused (nothing listens there)".into()),
                ConnectionReset => Some("connection reset by the peer".into()),
                TimedOut => Some("timed out connecting".into()),
                HostUnreachable | NetworkUnreachable => Some(format!("unreachable ({kind})")),
                _ => None,
            };
        }
        source = s.source();
    }
    None
}

/// A loopback port nothing listens on (bound, then let go), for tests of a peer that is not there.
#[cfg(test)]
pub(crate) fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn get(url: &str) -> reqwest::Error {
        reqwest::Client::builder()
            .timeout(Duration::from_millis(500))
            .build()
            .unwrap()
            .get(url)
            .send()
            .await
            .expect_err("the request must fail")
    }

    #[tokio::test]
    async fn a_closed_port_says_connection_refused() {
        let url = format!("http://127.0.0.1:{}/api/", closed_port());
        let e = get(&url).await;
        assert_eq!(
            unanswered("GET", &url, &e),
            format!("GET {url}: connection refused (nothing listens there)")
        );
    }

    #[tokio::test]
    async fn an_unknown_host_says_dns() {
        // `.invalid` never resolves (RFC 2606).
        let e = get("http://django.invalid/api/").await;
        let text = cause(&e);
        assert!(text.starts_with("DNS lookup failed: "), "{text}");
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let hold = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(socket);
        });
        let e = get(&url).await;
        assert_eq!(cause(&e), "timed out waiting for an answer");
        hold.abort();
    }

    #[tokio::test]
    async fn https_to_a_plain_server_says_tls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/", listener.local_addr().unwrap());
        let serve = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut socket, _) = listener.accept().await.unwrap();
            let _ = socket
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let e = get(&url).await;
        let text = cause(&e);
        assert!(text.starts_with("TLS handshake failed: "), "{text}");
        serve.abort();
    }

    #[test]
    fn an_answer_names_its_status_and_first_line() {
        let status = reqwest::StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(
            answered("PATCH", "http://d/x", status, "\n  upstream down\nmore"),
            "PATCH http://d/x: answered 503 Service Unavailable: upstream down"
        );
        assert_eq!(
            answered("GET", "http://d/x", status, ""),
            "GET http://d/x: answered 503 Service Unavailable"
        );
        assert_eq!(
            first_line("<!DOCTYPE html>\n<html><head><title>Not Found</title>"),
            "Not Found"
        );
        assert_eq!(first_line(&"é".repeat(300)).chars().count(), 201);
    }
}
