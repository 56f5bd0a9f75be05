//! The background-mode gateway: requests to OpenAI come in through RabbitMQ, and their
//! results go back through RabbitMQ, so a backend needs neither an HTTP client nor polling.
//!
//! In the order a request moves:
//! - [`request`]: consumes `<requests>` (`RELAY_REQUEST_QUEUE`): validates a message,
//!   forces `background` and `store`, adds the `relay_*` metadata and `POST`s
//!   `/v1/responses` (or cancels), once per `message_id`; refusals go to `<requests>.dead`.
//! - [`reply`]: the CloudEvents the relay makes itself (`response.queued`, `request.failed`,
//!   a reconciled terminal event) and the copies of events sent to a request's `reply_to`.
//!   The webhook path (`worker`) routes a terminal event of a gateway response to the
//!   `relay_reply_to` of its metadata through this module too.
//! - [`reconcile`]: the safety net: a parked watch per created response; when it comes due
//!   without a handled terminal webhook, the relay fetches the response itself.
//!
//! The relay keeps no state of its own for a request: what it needs to reply is in the
//! response's metadata at OpenAI, the retries and watches are messages in quorum queues, and
//! idempotency goes through the dedup store (Redis across replicas).

pub mod reconcile;
pub mod reply;
pub mod request;

use std::time::Duration;

/// What the worker needs to run the gateway.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `RELAY_RECONCILE_AFTER_SECS`: when a created response's first watch comes due;
    /// `None` parks no watches.
    pub reconcile_after: Option<Duration>,
}

/// Header of a request message: `create` (default) or `cancel`.
pub const HEADER_ACTION: &str = "openai-action";

/// The metadata keys the relay adds to every response it creates.
pub const META_REQUEST_ID: &str = "relay_request_id";
pub const META_REPLY_TO: &str = "relay_reply_to";
pub const META_CORRELATION_ID: &str = "relay_correlation_id";
