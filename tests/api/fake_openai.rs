//! A fake OpenAI API on a local port: serves `fixtures/openai/<path>/<id>.json` at
//! `GET /v1/<path>/<id>`, 404 with OpenAI's error body for anything else, and plays
//! scripted answers (status, headers, delay, body) queued per id before falling back.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Response, StatusCode};
use axum::routing::get;

pub const API_KEY: &str = "sk-test-relay";

#[derive(Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    pub delay: Duration,
    /// Send the head and part of the body, then drop the connection.
    pub reset: bool,
}

impl Scripted {
    pub fn status(status: u16) -> Self {
        let body = format!(r#"{{"error":{{"message":"scripted {status}","type":"server_error","param":null,"code":null}}}}"#);
        Self { status, headers: Vec::new(), body, delay: Duration::ZERO, reset: false }
    }
    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }
    pub fn body(mut self, body: &str) -> Self {
        self.body = body.to_owned();
        self
    }
    /// A 200 whose body breaks off mid-way with the connection dropped.
    pub fn reset() -> Self {
        Self { reset: true, ..Self::status(200).body(r#"{"id": "resp_reset", "object": "response", "output": [{"#) }
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

#[derive(Default)]
struct Inner {
    scripts: HashMap<String, VecDeque<Scripted>>,
    /// Every fallback answer for an id (after scripts run out).
    always: HashMap<String, Scripted>,
    requests: HashMap<String, usize>,
    /// The bearer keys each id was fetched with.
    keys: HashMap<String, Vec<String>>,
    bad_auth: usize,
}

#[derive(Clone)]
pub struct FakeOpenAi {
    inner: Arc<Mutex<Inner>>,
    pub base_url: String,
}

impl FakeOpenAi {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new().route("/v1/{*rest}", get(serve)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { inner, base_url }
    }

    /// Queue answers for `id`, played in order before the fixture is served.
    pub fn script(&self, id: &str, answers: impl IntoIterator<Item = Scripted>) {
        self.inner.lock().unwrap().scripts.entry(id.to_owned()).or_default().extend(answers);
    }

    /// Answer every request for `id` this way.
    pub fn always(&self, id: &str, answer: Scripted) {
        self.inner.lock().unwrap().always.insert(id.to_owned(), answer);
    }

    /// Forget scripted answers for `id`: the fixture is served again.
    pub fn clear(&self, id: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.scripts.remove(id);
        inner.always.remove(id);
    }

    pub fn requests(&self, id: &str) -> usize {
        self.inner.lock().unwrap().requests.get(id).copied().unwrap_or(0)
    }

    /// The bearer keys `id` was fetched with, in order.
    pub fn keys(&self, id: &str) -> Vec<String> {
        self.inner.lock().unwrap().keys.get(id).cloned().unwrap_or_default()
    }

    pub fn bad_auth(&self) -> usize {
        self.inner.lock().unwrap().bad_auth
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/openai")
}

async fn serve(State(inner): State<Arc<Mutex<Inner>>>, Path(rest): Path<String>, headers: HeaderMap) -> Response<Body> {
    let id = rest.rsplit('/').next().unwrap_or_default().to_owned();
    let key = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default().to_owned();
    // Project keys in tests start with the default key (`sk-test-relay-alpha`, ...).
    let authorized = key.starts_with(API_KEY);
    let scripted = {
        let mut inner = inner.lock().unwrap();
        *inner.requests.entry(id.clone()).or_default() += 1;
        inner.keys.entry(id.clone()).or_default().push(key);
        if !authorized {
            inner.bad_auth += 1;
        }
        let queued = inner.scripts.get_mut(&id).and_then(VecDeque::pop_front);
        queued.or_else(|| inner.always.get(&id).cloned())
    };
    if let Some(answer) = scripted {
        tokio::time::sleep(answer.delay).await;
        let mut response = Response::builder().status(answer.status).header("content-type", "application/json");
        for (name, value) in answer.headers {
            response = response.header(name, value);
        }
        if answer.reset {
            let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(answer.body), Err(std::io::ErrorKind::ConnectionReset.into())];
            return response.body(Body::from_stream(futures::stream::iter(chunks))).unwrap();
        }
        return response.body(Body::from(answer.body)).unwrap();
    }
    if !authorized {
        return json(StatusCode::UNAUTHORIZED, r#"{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#.into());
    }
    match std::fs::read_to_string(fixtures().join(format!("{rest}.json"))) {
        Ok(body) if !rest.contains("..") => json(StatusCode::OK, body),
        _ => json(
            StatusCode::NOT_FOUND,
            format!(r#"{{"error":{{"message":"Response with id '{id}' not found.","type":"invalid_request_error","param":null,"code":null}}}}"#),
        ),
    }
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    Response::builder().status(status).header("content-type", "application/json").body(Body::from(body)).unwrap()
}
