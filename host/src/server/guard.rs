//! Guards every request passes before its handler: the `Host` check (no DNS rebinding on a
//! loopback server), the `--api-key` check on `/v1`, and the count of every answer by route.

use super::openai::ApiError;
use super::state::Server;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;

/// `Host` names a loopback-bound server answers (DNS rebinding: a web page's JavaScript reaching
/// 127.0.0.1 through a hostile name would carry that name). None: any.
pub(super) fn allowed_hosts(local: &SocketAddr, extra: &[String]) -> Option<Vec<String>> {
    if local.ip().is_loopback() {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        hosts.extend(extra.iter().cloned());
        Some(hosts)
    } else if !extra.is_empty() {
        Some(extra.to_vec())
    } else {
        None
    }
}

/// The host part of a `Host` header (`name`, `name:port`, `[v6]:port`).
pub(super) fn host_name(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match h.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => h,
    }
}

pub(super) async fn check_host(State(s): State<Arc<Server>>, req: Request, next: Next) -> Response {
    if let Some(allowed) = &s.allowed_hosts {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(host_name)
            .unwrap_or("");
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(host)) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!("Host '{host}' is not served here (DNS rebinding protection); allow it with --allowed-host"),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Counts every answer (`apb_requests_total`), refusals by the host and key checks and unknown
/// routes included, by the route it was for.
pub(super) async fn count(State(s): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let endpoint = match path {
        "/v1/chat/completions" => "chat",
        "/v1/completions" => "completions",
        "/health" => "health",
        "/metrics" => "metrics",
        p if p == "/v1/models" || p.starts_with("/v1/models/") => "models",
        _ => "other",
    };
    let r = next.run(req).await;
    s.metrics
        .requests
        .with_label_values(&[endpoint, s.cfg.settings.method.name(), r.status().as_str()])
        .inc();
    r
}

pub(super) async fn check_key(State(s): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let guarded = req.uri().path().starts_with("/v1");
    if let (true, Some(key)) = (guarded, &s.cfg.api_key) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key);
        if !given.is_some_and(|g| constant_time_eq(g.trim().as_bytes(), key.as_bytes())) {
            let mut r = ApiError::unauthorized(
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_without_ports() {
        assert_eq!(host_name("localhost:8000"), "localhost");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_name("[::1]:8000"), "::1");
        assert_eq!(host_name("[::1]"), "::1");
        // Not a port: the name stays whole.
        assert_eq!(host_name("evil.example:x"), "evil.example:x");
    }

    /// Loopback answers loopback names (and those added); elsewhere any name unless some are
    /// given.
    #[test]
    fn allowed_hosts_by_binding() {
        let lo: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8000".parse().unwrap();
        let hosts = allowed_hosts(&lo, &["box.lan".into()]).unwrap();
        for h in ["localhost", "127.0.0.1", "::1", "box.lan"] {
            assert!(hosts.iter().any(|a| a == h), "{h} in {hosts:?}");
        }
        assert!(!hosts.iter().any(|a| a == "rebind.example"));
        assert_eq!(allowed_hosts(&any, &[]), None);
        assert_eq!(
            allowed_hosts(&any, &["api.example".into()]),
            Some(vec!["api.example".to_string()])
        );
    }

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
