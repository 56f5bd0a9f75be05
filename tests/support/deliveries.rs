//! OpenAI-shaped deliveries for tests and the benchmark (shared through `#[path]`).

// Each user takes a part of it.
#![allow(dead_code)]

use openai_webhook_relay::inbox::unix_now;

/// An event envelope as OpenAI sends it (about 140 bytes), with a fresh event id.
pub fn event(event_type: &str, object_id: &str) -> String {
    format!(
        r#"{{"id":"evt_{:032x}","object":"event","created_at":{},"type":"{event_type}","data":{{"id":"{object_id}"}}}}"#,
        fastrand::u128(..),
        unix_now()
    )
}

/// A fresh `webhook-id`.
pub fn webhook_id() -> String {
    format!("wh_{:032x}", fastrand::u128(..))
}
