//! Fetching the full object an event points at from the OpenAI API (worker stage 1).
//!
//! One attempt per call: the worker decides about retries, because a retry must survive a
//! crash and so is parked in RabbitMQ rather than slept on here.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde_json::value::RawValue;
use tracing::Instrument;

use crate::envelope::Target;
use crate::metrics::Metrics;
use crate::telemetry;

/// What a completed fetch gives.
#[derive(Debug)]
pub enum Fetched {
    /// The object, exactly as the API sent it.
    Object(Box<RawValue>),
    /// 404: the object is gone (an unstored background response lives ~10 minutes, while
    /// OpenAI retries a delivery for up to 72 hours). Final, not retried.
    Gone { message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("timed out")]
    Timeout,
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
        /// The API's `error` object, when the body had one.
        api_error: Option<Box<RawValue>>,
    },
    #[error("object exceeds the {0}-byte limit (RELAY_MAX_OBJECT_BYTES)")]
    TooLarge(usize),
    #[error("body is not JSON: {0}")]
    Decode(String),
}

impl FetchError {
    /// Worth another attempt later. 401/403 count: they mean the relay's key is wrong or
    /// revoked, which an operator fixes without losing the events meanwhile.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout | Self::Connect(_) | Self::Decode(_) => true,
            Self::Status { status, .. } => matches!(status, 401 | 403 | 408 | 409 | 429 | 500..),
            Self::TooLarge(_) => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The delay the API asked for (`retry-after-ms` or `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Short label for metrics and dead-letter headers.
    pub fn reason(&self) -> String {
        match self {
            Self::Timeout => "timeout".into(),
            Self::Connect(_) => "connect".into(),
            Self::Status { status, .. } => status.to_string(),
            Self::TooLarge(_) => "too_large".into(),
            Self::Decode(_) => "decode".into(),
        }
    }
}

/// How one request ended, before a caller decides what a 404 means.
enum Answer {
    NotFound(String),
    Failed(FetchError),
}

/// The OpenAI API, as far as the relay needs it.
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

impl ApiClient {
    pub fn new(base: Url, timeout: Duration, max_bytes: usize, metrics: Arc<Metrics>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("openai-webhook-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("reqwest client with static settings");
        Self { http, base, max_bytes, metrics }
    }

    fn url(&self, target: Target<'_>) -> Url {
        let mut url = self.base.clone();
        {
            // `push` percent-encodes, so an odd id cannot climb out of its path segment.
            let mut segments = url.path_segments_mut().expect("http(s) base URL");
            segments.pop_if_empty().extend(target.kind.path().split('/')).push(target.id);
        }
        url
    }

    /// One attempt with the project's API `key`, in the trace's HTTP client span.
    pub async fn fetch(&self, target: Target<'_>, key: &SecretString) -> Result<Fetched, FetchError> {
        let span = telemetry::client(target.id);
        let started = Instant::now();
        let result = self.attempt(target, key).instrument(span.clone()).await;
        let kind = target.kind.field();
        let status = match &result {
            Ok(Fetched::Object(_)) => "200".to_owned(),
            Ok(Fetched::Gone { .. }) => "404".to_owned(),
            Err(e) => e.reason(),
        };
        if !span.is_disabled() {
            span.record("status", status.as_str());
            let code = match &result {
                Ok(Fetched::Object(_)) => Some(200),
                Ok(Fetched::Gone { .. }) => Some(404),
                Err(e) => e.status(),
            };
            telemetry::responded(&span, "GET", Some(&self.url(target)), code);
        }
        self.metrics.fetches.get_or_create(&vec![("kind", kind.to_owned()), ("status", status)]).inc();
        self.metrics
            .fetch_seconds
            .get_or_create(&vec![("kind", kind.to_owned())])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn attempt(&self, target: Target<'_>, key: &SecretString) -> Result<Fetched, FetchError> {
        match self.send(self.http.get(self.url(target)), key).await {
            Ok(object) => Ok(Fetched::Object(object)),
            Err(Answer::NotFound(message)) => Ok(Fetched::Gone { message }),
            Err(Answer::Failed(e)) => Err(e),
        }
    }

    /// `POST <base>/<segments...>` with a JSON `body` (the gateway's create and cancel):
    /// one attempt, the answer as sent. A 404 is an error here (`Status`), not `Gone`.
    pub async fn post(&self, segments: &[&str], body: Vec<u8>, key: &SecretString) -> Result<Box<RawValue>, FetchError> {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("http(s) base URL").pop_if_empty().extend(segments);
        let request = self.http.post(url).header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        self.send(request, key).await.map_err(|answer| match answer {
            Answer::NotFound(message) => FetchError::Status { status: 404, message, retry_after: None, api_error: None },
            Answer::Failed(e) => e,
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder, key: &SecretString) -> Result<Box<RawValue>, Answer> {
        let response = request.bearer_auth(key.expose_secret()).send().await.map_err(|e| Answer::Failed(transport(e)))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        if response.content_length().is_some_and(|n| n > self.max_bytes as u64) {
            return Err(Answer::Failed(FetchError::TooLarge(self.max_bytes)));
        }
        let body = self.read_capped(response).await.map_err(Answer::Failed)?;
        if status == StatusCode::NOT_FOUND {
            return Err(Answer::NotFound(error_message(&body)));
        }
        if !status.is_success() {
            let api_error = api_error(&body);
            return Err(Answer::Failed(FetchError::Status { status: status.as_u16(), message: error_message(&body), retry_after, api_error }));
        }
        serde_json::from_slice::<Box<RawValue>>(&body).map_err(|e| Answer::Failed(FetchError::Decode(e.to_string())))
    }

    /// Reads the body without ever holding more than the limit (chunked bodies carry no length).
    async fn read_capped(&self, mut response: reqwest::Response) -> Result<Vec<u8>, FetchError> {
        let mut body = Vec::with_capacity(response.content_length().unwrap_or(0) as usize);
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(FetchError::TooLarge(self.max_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

fn transport(error: reqwest::Error) -> FetchError {
    if error.is_timeout() {
        FetchError::Timeout
    } else {
        // Walk the sources: reqwest's own message is only "error sending request".
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(inner) = source {
            message = format!("{message}: {inner}");
            source = inner.source();
        }
        FetchError::Connect(message)
    }
}

/// `{"error": {"message": ...}}` as the API sends it, else the start of the body.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        message: String,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(parsed) => parsed.error.message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

/// The `error` object of an API error body (`{"error": {...}}`), as sent.
fn api_error(body: &[u8]) -> Option<Box<RawValue>> {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Box<RawValue>,
    }
    serde_json::from_slice::<Body>(body).ok().map(|b| b.error).filter(|e| e.get().starts_with('{'))
}

/// The longest delay taken from the API's headers. Whatever a server (or a gateway in front
/// of it) sends, `1e300` or `inf` included, the delay fits a `Duration`; the retry policy
/// then caps it at `RELAY_RETRY_MAX_DELAY_MS`.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// `retry-after-ms` (OpenAI's, milliseconds) wins over `Retry-After` (seconds or HTTP date).
/// Negative and NaN values are no delay at all; larger ones than [`MAX_RETRY_AFTER`] are
/// clamped to it, before the conversion (`Duration::from_secs_f64` panics on overflow).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let secs = match text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        Some(ms) => ms / 1000.0,
        None => {
            let value = text("retry-after")?;
            match value.parse::<u64>() {
                Ok(secs) => secs as f64,
                Err(_) => {
                    let at = httpdate::parse_http_date(value).ok()?;
                    at.duration_since(SystemTime::now()).unwrap_or_default().as_secs_f64()
                }
            }
        }
    };
    (secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    proptest::proptest! {
        /// Whatever an API or a gateway in front of it sends, reading the delay never panics
        /// and never asks for more than a day.
        #[test]
        fn no_retry_after_value_panics_or_exceeds_a_day(
            text in proptest::string::string_regex("[ -~]{0,40}").unwrap(),
            float in proptest::num::f64::ANY,
            secs in proptest::num::u64::ANY,
        ) {
            for (name, value) in [("retry-after-ms", text.clone()), ("retry-after", text), ("retry-after-ms", float.to_string()), ("retry-after", secs.to_string())] {
                let Ok(value) = HeaderValue::from_str(&value) else { continue };
                let mut map = HeaderMap::new();
                map.insert(name, value);
                if let Some(delay) = retry_after(&map) {
                    proptest::prop_assert!(delay <= Duration::from_secs(86_400), "{delay:?}");
                }
            }
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn retry_after_ms_wins_over_retry_after() {
        let h = headers(&[("retry-after-ms", "1500"), ("retry-after", "9")]);
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        assert_eq!(retry_after(&headers(&[("retry-after", "9")])), Some(Duration::from_secs(9)));
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&headers(&[])), None);
    }

    #[test]
    fn retry_after_accepts_an_http_date() {
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let got = retry_after(&headers(&[("retry-after", &later)])).unwrap();
        assert!(got > Duration::from_secs(27) && got <= Duration::from_secs(30), "{got:?}");
    }

    #[test]
    fn huge_or_odd_retry_after_values_are_clamped_or_ignored_never_a_panic() {
        let day = Some(MAX_RETRY_AFTER);
        let far_future = "Fri, 31 Dec 9999 23:59:59 GMT";
        let u64_max = u64::MAX.to_string();
        let cases: [(&'static str, &str, Option<Duration>); 9] = [
            ("retry-after-ms", "1e300", day),
            ("retry-after-ms", "inf", day),
            ("retry-after-ms", "1.7976931348623157e308", day),
            ("retry-after-ms", "NaN", None),
            ("retry-after-ms", "-1", None),
            ("retry-after-ms", "-inf", None),
            ("retry-after", &u64_max, day),
            ("retry-after", far_future, day),
            ("retry-after-ms", "86400001", day),
        ];
        for (name, value, expected) in cases {
            assert_eq!(retry_after(&headers(&[(name, value)])), expected, "{name}: {value}");
        }
        assert_eq!(retry_after(&headers(&[("retry-after-ms", "86399000")])), Some(Duration::from_secs(86_399)), "under the bound");
    }

    #[test]
    fn transient_and_misconfiguration_statuses_are_retryable() {
        let status = |s| FetchError::Status { status: s, message: String::new(), retry_after: None, api_error: None };
        for s in [401, 403, 408, 409, 429, 500, 502, 503] {
            assert!(status(s).is_retryable(), "{s}");
        }
        for s in [400, 410, 422] {
            assert!(!status(s).is_retryable(), "{s}");
        }
        assert!(!FetchError::TooLarge(1).is_retryable());
    }

    #[test]
    fn error_messages_come_from_the_api_error_body() {
        assert_eq!(error_message(br#"{"error":{"message":"Response with id 'resp_1' not found.","type":"invalid_request_error"}}"#), "Response with id 'resp_1' not found.");
        assert_eq!(error_message(b"<html>bad gateway</html>"), "<html>bad gateway</html>");
    }
}
