//! Liveness, readiness and metrics endpoints for load balancers and Prometheus.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use std::sync::Arc;

use super::AppState;

/// 200 while the process can answer at all.
pub async fn healthz() -> &'static str {
    "ok"
}

/// 200 only while the broker link is up, the broker takes publishes (no resource alarm) and
/// the relay is not shutting down, so a load balancer stops sending before deliveries would
/// be refused.
pub async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if !state.broker.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "broker not connected")
    } else if state.broker.blocked().is_some() {
        (StatusCode::SERVICE_UNAVAILABLE, "broker blocks publishing (resource alarm)")
    } else {
        (StatusCode::OK, "ready")
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.render(),
    )
}
