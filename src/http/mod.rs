//! The HTTP face of the relay: the webhook route (receiver role) and the operational routes.

mod error;
mod health;
mod receive;
mod serve;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;

pub use error::ApiError;
pub use serve::{ConnectionLimits, serve};

use crate::broker::Broker;
use crate::inbox::Inbox;
use crate::metrics::Metrics;
use crate::publish::EventPublisher;
use crate::verify::Verifier;

/// Cheap handles shared by all handlers.
#[derive(Clone)]
pub struct AppState {
    pub broker: Broker,
    pub metrics: Arc<Metrics>,
    /// Cancelled when a stop signal arrived: readiness turns 503.
    pub draining: CancellationToken,
    /// Projects by name (`None`: the default project).
    pub projects: Arc<HashMap<Option<String>, ReceiverProject>>,
    pub inbox: Inbox,
    /// For incoming calls, published without going through the inbox.
    pub publisher: EventPublisher,
    pub body_limit: usize,
    /// Time a client has to send a webhook body once its head arrived.
    pub body_timeout: Duration,
    pub in_flight: Arc<Semaphore>,
}

/// What the receiver needs of one OpenAI project.
pub struct ReceiverProject {
    pub verifier: Verifier,
    /// The CloudEvent `source` of the events it publishes itself (incoming calls).
    pub source: String,
}

/// Routes. The webhook route exists only when this process runs the receiver role.
pub fn router(state: AppState, receiver: bool, request_timeout: Duration) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics));
    if receiver {
        // No `DefaultBodyLimit`: the handler reads the body itself, under its in-flight permit.
        router = router
            .route("/webhooks/openai", post(receive::receive))
            .route("/webhooks/openai/{project}", post(receive::receive_project));
    }
    router
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, request_timeout))
        // One Arc, so that a request clones a pointer rather than every handle in the state.
        .with_state(Arc::new(state))
}
