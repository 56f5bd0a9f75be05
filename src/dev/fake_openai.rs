//! A fake OpenAI API on a local port, for `dev` (no account, no network) and for the tests:
//! serves the objects of `fixtures/openai/` (built in) at `GET /v1/<path>/<id>`, 404 with
//! OpenAI's error body for anything else, and plays scripted answers (status, headers,
//! delay, body) queued per id before falling back.
//!
//! It also runs background responses like OpenAI: `POST /v1/responses` answers `queued`,
//! the response completes after a delay (echoing its input), and a signed
//! `response.completed` webhook goes to the relay set with [`FakeOpenAi::send_webhooks_to`];
//! `GET /v1/responses/{id}` shows its state, `POST /v1/responses/{id}/cancel` cancels it.
//! Faults by model name: `unknown-model` (400), `slow` (never completes on its own, to be
//! cancelled), `no-webhook` (completes, but no webhook is sent: the safety net's case);
//! and [`FakeOpenAi::rate_limit_next_create`] (429 with `retry-after-ms`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Response, StatusCode};
use axum::routing::{get, post};
use crate::verify::Secret;
use serde_json::{Value, json};

/// The key the fake accepts; any key starting with it too (tests give each project its own,
/// `sk-test-relay-alpha`, ...).
pub const API_KEY: &str = "sk-test-relay";

/// `fixtures/openai/`, built in so that `dev` serves them from any directory.
const FIXTURES: [(&str, &str); 7] = [
    ("responses/resp_completed01", include_str!("../../fixtures/openai/responses/resp_completed01.json")),
    ("responses/resp_failed01", include_str!("../../fixtures/openai/responses/resp_failed01.json")),
    ("responses/resp_cancelled01", include_str!("../../fixtures/openai/responses/resp_cancelled01.json")),
    ("responses/resp_incomplete01", include_str!("../../fixtures/openai/responses/resp_incomplete01.json")),
    ("responses/resp_refusal01", include_str!("../../fixtures/openai/responses/resp_refusal01.json")),
    ("batches/batch_completed01", include_str!("../../fixtures/openai/batches/batch_completed01.json")),
    ("fine_tuning/jobs/ftjob_succeeded01", include_str!("../../fixtures/openai/fine_tuning/jobs/ftjob_succeeded01.json")),
];

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
    /// A completed response `id` with no output, as the API answers a fetch.
    pub fn completed(id: &str) -> Self {
        Self::status(200).body(&format!(r#"{{"id":"{id}","object":"response","status":"completed","output":[]}}"#))
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
    /// Background responses created through `POST /v1/responses`, by id.
    responses: HashMap<String, Value>,
    /// Every body `POST /v1/responses` received, in order.
    creates: Vec<Value>,
    /// Answers for the next creates, before any is made.
    create_faults: VecDeque<Scripted>,
    /// Where and with which secret webhooks go.
    webhook: Option<(String, Secret)>,
    webhooks_sent: usize,
    complete_after: Duration,
    /// The bearer key of each create, in order.
    create_keys: Vec<String>,
    /// Sends the webhooks; one client, so that its connections are reused.
    http: reqwest::Client,
}

#[derive(Clone)]
pub struct FakeOpenAi {
    inner: Arc<Mutex<Inner>>,
    pub base_url: String,
}

impl FakeOpenAi {
    /// Serves on `127.0.0.1` at a free port.
    pub async fn start() -> std::io::Result<Self> {
        let inner = Arc::new(Mutex::new(Inner { complete_after: Duration::from_millis(300), ..Inner::default() }));
        let app = Router::new()
            .route("/v1/responses", post(create))
            .route("/v1/responses/{id}/cancel", post(cancel))
            .route("/v1/{*rest}", get(serve))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}/v1", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { inner, base_url })
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

    /// Sends each response's terminal webhook to the relay at `base` (`http://host:port`),
    /// signed with `secret` like OpenAI does.
    pub fn send_webhooks_to(&self, base: &str, secret: Secret) {
        self.inner.lock().unwrap().webhook = Some((format!("{base}/webhooks/openai"), secret));
    }

    /// How long a created response takes to complete (300 ms unless set).
    pub fn complete_after(&self, delay: Duration) {
        self.inner.lock().unwrap().complete_after = delay;
    }

    /// The next create is answered 429 with `retry-after-ms`, and creates nothing.
    pub fn rate_limit_next_create(&self, retry_after_ms: u64) {
        let answer = Scripted::status(429).header("retry-after-ms", &retry_after_ms.to_string());
        self.inner.lock().unwrap().create_faults.push_back(answer);
    }

    /// The bodies `POST /v1/responses` received, in order (refused ones included).
    pub fn creates(&self) -> Vec<Value> {
        self.inner.lock().unwrap().creates.clone()
    }

    /// The responses created with `relay_request_id` = `request_id` in their metadata.
    pub fn created_for(&self, request_id: &str) -> Vec<Value> {
        let inner = self.inner.lock().unwrap();
        inner.responses.values().filter(|r| r["metadata"]["relay_request_id"] == request_id).cloned().collect()
    }

    /// A created response as `GET` shows it now.
    pub fn response(&self, id: &str) -> Option<Value> {
        self.inner.lock().unwrap().responses.get(id).cloned()
    }

    /// The bearer key of each create, in order.
    pub fn create_keys(&self) -> Vec<String> {
        self.inner.lock().unwrap().create_keys.clone()
    }

    pub fn webhooks_sent(&self) -> usize {
        self.inner.lock().unwrap().webhooks_sent
    }
}

fn hex_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

fn now() -> i64 {
    crate::inbox::unix_now()
}

fn error(status: StatusCode, message: &str, param: Option<&str>, code: Option<&str>) -> Response<Body> {
    json(status, json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}).to_string())
}

async fn create(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: axum::body::Bytes) -> Response<Body> {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let key = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default().to_owned();
    let fault = {
        let mut inner = inner.lock().unwrap();
        inner.creates.push(request.clone());
        inner.create_keys.push(key);
        inner.create_faults.pop_front()
    };
    if let Some(answer) = fault {
        return scripted(answer).await;
    }
    let (response, complete_after) = {
        let mut inner = inner.lock().unwrap();
        let model = request["model"].as_str().unwrap_or_default().to_owned();
        if model == "unknown-model" {
            let message = format!("The model `{model}` does not exist or you do not have access to it.");
            return error(StatusCode::BAD_REQUEST, &message, Some("model"), Some("model_not_found"));
        }
        if request["background"] != true || request["store"] != true {
            return error(StatusCode::BAD_REQUEST, "the fake expects background and store", None, None);
        }
        let id = hex_id("resp");
        let response = json!({
            "id": id, "object": "response", "created_at": now(), "status": "queued", "background": true,
            "model": model, "output": [], "error": null, "incomplete_details": null, "store": true,
            "input_echo": request["input"], "metadata": request["metadata"],
        });
        inner.responses.insert(id, response.clone());
        (response, inner.complete_after)
    };
    let model = response["model"].as_str().unwrap_or_default().to_owned();
    if model != "slow" {
        let (inner, id) = (inner.clone(), response["id"].as_str().unwrap().to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(complete_after).await;
            finish(&inner, &id, "completed", model != "no-webhook").await;
        });
    }
    json(StatusCode::OK, response.to_string())
}

/// Ends a response that has not ended yet and, if `webhook`, delivers its terminal webhook
/// (retried like OpenAI until the relay answers 2xx, here for a few seconds).
async fn finish(inner: &Arc<Mutex<Inner>>, id: &str, status: &str, webhook: bool) -> Option<Value> {
    let (response, target) = {
        let mut inner = inner.lock().unwrap();
        let response = inner.responses.get_mut(id)?;
        if !matches!(response["status"].as_str(), Some("queued" | "in_progress")) {
            return None;
        }
        response["status"] = json!(status);
        if status == "completed" {
            let text = format!("echo: {}", response["input_echo"].as_str().unwrap_or_default());
            response["output"] = json!([{"type": "message", "id": hex_id("msg"), "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}]);
            response["completed_at"] = json!(now());
        }
        (response.clone(), inner.webhook.clone().map(|target| (target, inner.http.clone())))
    };
    if let (true, Some(((url, secret), http))) = (webhook, target) {
        let event = json!({"id": hex_id("evt"), "object": "event", "type": format!("response.{status}"), "created_at": now(), "data": {"id": id}}).to_string();
        let webhook_id = hex_id("wh");
        for _ in 0..50 {
            let ts = now().to_string();
            let sent = http
                .post(&url)
                .header("content-type", "application/json")
                .header("webhook-id", &webhook_id)
                .header("webhook-timestamp", &ts)
                .header("webhook-signature", secret.sign(&webhook_id, &ts, event.as_bytes()))
                .body(event.clone())
                .send()
                .await;
            if sent.is_ok_and(|r| r.status().is_success()) {
                inner.lock().unwrap().webhooks_sent += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Some(response)
}

async fn cancel(State(inner): State<Arc<Mutex<Inner>>>, Path(id): Path<String>) -> Response<Body> {
    let current = inner.lock().unwrap().responses.get(&id).cloned();
    let Some(current) = current else {
        return error(StatusCode::NOT_FOUND, &format!("Response with id '{id}' not found."), None, None);
    };
    match finish(&inner, &id, "cancelled", true).await {
        Some(response) => json(StatusCode::OK, response.to_string()),
        None => {
            let message = format!("Cannot cancel a {} response.", current["status"].as_str().unwrap_or_default());
            error(StatusCode::BAD_REQUEST, &message, None, None)
        }
    }
}

async fn scripted(answer: Scripted) -> Response<Body> {
    tokio::time::sleep(answer.delay).await;
    let mut response = Response::builder().status(answer.status).header("content-type", "application/json");
    for (name, value) in answer.headers {
        response = response.header(name, value);
    }
    if answer.reset {
        let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(answer.body), Err(std::io::ErrorKind::ConnectionReset.into())];
        return response.body(Body::from_stream(futures::stream::iter(chunks))).unwrap();
    }
    response.body(Body::from(answer.body)).unwrap()
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
        return self::scripted(answer).await;
    }
    if !authorized {
        return json(StatusCode::UNAUTHORIZED, r#"{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#.into());
    }
    let created = rest.strip_prefix("responses/").and_then(|id| inner.lock().unwrap().responses.get(id).cloned());
    if let Some(response) = created {
        return json(StatusCode::OK, response.to_string());
    }
    match FIXTURES.iter().find(|(path, _)| *path == rest) {
        Some((_, body)) => json(StatusCode::OK, (*body).to_owned()),
        None => json(
            StatusCode::NOT_FOUND,
            format!(r#"{{"error":{{"message":"Response with id '{id}' not found.","type":"invalid_request_error","param":null,"code":null}}}}"#),
        ),
    }
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    Response::builder().status(status).header("content-type", "application/json").body(Body::from(body)).unwrap()
}

#[cfg(test)]
mod tests {
    /// A fixture added to the directory but not to `FIXTURES` would be a silent 404.
    #[test]
    fn every_fixture_file_is_built_in() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/openai");
        let mut on_disk = Vec::new();
        let mut pending = vec![root.clone()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else if let Some(stem) = path.strip_prefix(&root).unwrap().to_str().and_then(|p| p.strip_suffix(".json")) {
                    on_disk.push(stem.to_owned());
                }
            }
        }
        let mut built_in: Vec<String> = super::FIXTURES.iter().map(|(path, _)| (*path).to_owned()).collect();
        on_disk.sort();
        built_in.sort();
        assert_eq!(on_disk, built_in);
    }
}
