//! The receive path under fuzzing, shared by the cargo-fuzz target `fuzz/fuzz_targets/receive.rs`
//! and the bounded run in `tests/properties.rs` (so `cargo test` exercises it too).
//!
//! This file is a module, not a test binary: files directly in `tests/` become test binaries,
//! files in `tests/support/` do not. Both users include it with `#[path = ...] mod fuzz_receive;`.
//!
//! Input layout (any byte string is a valid input):
//!
//! ```text
//! [flags] webhook-id \n webhook-timestamp \n webhook-signature \n body...
//! ```
//!
//! `flags` bits 0..=2 leave out the id / timestamp / signature header, bits 3..=5 send it
//! twice. A part that is not a valid `HeaderValue` (control bytes) is left out as hyper would
//! never hand it over. The verifier holds the OpenAI SDK test secret (plus a second one, as
//! during rotation) and its clock is frozen at the SDK vector's timestamp, so the seed corpus
//! (the SDK vector) reaches the `Ok` branch and mutations around it.

#![allow(dead_code)]

use std::sync::OnceLock;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use openai_webhook_relay::broker::MAX_SHORT_STRING;
use openai_webhook_relay::envelope::{self, Envelope};
use openai_webhook_relay::verify::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret, Verified, Verifier, VerifyError};
use openai_webhook_relay::{inbox, publish};

/// openai-python tests/lib/test_webhooks.py (same values in openai-node).
pub const OPENAI_SECRET: &str = "whsec_RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c=";
pub const OPENAI_ID: &str = "wh_685c059ae39c8190af8c71ed1022a24d";
pub const OPENAI_TIMESTAMP: i64 = 1_750_861_210;
pub const OPENAI_SIGNATURE: &str = "v1,gUAg4R2hWouRZqRQG4uJypNS8YK885G838+EHb4nKBY=";
pub const OPENAI_PAYLOAD: &str = r#"{"id": "evt_685c059ae3a481909bdc86819b066fb6", "object": "event", "created_at": 1750861210, "type": "response.completed", "data": {"id": "resp_123"}}"#;
/// A second configured secret (32 bytes of 0x07), as during a rotation.
pub const OTHER_SECRET: &str = "whsec_BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

const NOW: i64 = OPENAI_TIMESTAMP;
const TOLERANCE_SECS: u64 = 300;

struct Fixture {
    /// What the handler uses: every configured secret.
    verifier: Verifier,
    /// Knows only `OTHER_SECRET`: must refuse anything signed with the OpenAI secret.
    other_only: Verifier,
    signer: Secret,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| Fixture {
        verifier: Verifier::new(Secret::parse_list(&format!("{OPENAI_SECRET},{OTHER_SECRET}")).unwrap(), TOLERANCE_SECS),
        other_only: Verifier::new(vec![Secret::parse(OTHER_SECRET).unwrap()], TOLERANCE_SECS),
        signer: Secret::parse(OPENAI_SECRET).unwrap(),
    })
}

/// Encodes an input in the layout above (for seeds and generated inputs).
pub fn encode(flags: u8, id: &[u8], timestamp: &[u8], signature: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + id.len() + timestamp.len() + signature.len() + body.len());
    out.push(flags);
    for part in [id, timestamp, signature] {
        out.extend_from_slice(part);
        out.push(b'\n');
    }
    out.extend_from_slice(body);
    out
}

/// The SDK vector as an input: it verifies.
pub fn openai_vector() -> Vec<u8> {
    encode(0, OPENAI_ID.as_bytes(), OPENAI_TIMESTAMP.to_string().as_bytes(), OPENAI_SIGNATURE.as_bytes(), OPENAI_PAYLOAD.as_bytes())
}

/// Runs one input through the handler's code path: `Verifier::verify`, then on `Ok`
/// `Envelope::parse` (and what the worker does with the stored body), up to the properties of
/// the AMQP messages both would publish. Then signs the fuzzed body with the fixed key and
/// checks that it verifies (unless the id is too long for the inbox), and that a tampered or
/// foreign-key variant does not. Panics (an assertion, or lapin's on an oversized AMQP short
/// string) on any violated property.
pub fn receive(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mut parts = rest.splitn(4, |&b| b == b'\n');
    let id = parts.next().unwrap_or_default();
    let timestamp = parts.next().unwrap_or_default();
    let signature = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let fixture = fixture();

    // 1. The fuzzed request, as the handler sees it.
    let mut headers = HeaderMap::new();
    for (bit, name, value) in [(0, HEADER_ID, id), (1, HEADER_TIMESTAMP, timestamp), (2, HEADER_SIGNATURE, signature)] {
        if flags & (1 << bit) != 0 {
            continue;
        }
        let Ok(value) = HeaderValue::from_bytes(value) else { continue };
        let name = HeaderName::from_static(name);
        if flags & (1 << (bit + 3)) != 0 {
            headers.append(name.clone(), value.clone());
        }
        headers.append(name, value);
    }
    match fixture.verifier.verify(&headers, Bytes::copy_from_slice(body), NOW) {
        Ok(verified) => {
            // Only possible when the signature was made with a configured key over exactly
            // these bytes: check the verified parts are what was sent.
            assert_eq!(verified.body().as_ref(), body, "verified body differs from the raw body");
            assert_eq!(verified.id().as_bytes(), trim(id), "verified id differs from the header");
            assert_eq!(verified.timestamp().as_bytes(), trim(timestamp));
            assert!(flags & 0b111_111 == 0, "a missing or repeated header verified");
            let expected: Vec<String> = [&fixture.signer, &Secret::parse(OTHER_SECRET).unwrap()]
                .iter()
                .map(|s| s.sign(verified.id(), verified.timestamp(), body))
                .collect();
            assert!(
                verified.signature().split_ascii_whitespace().any(|entry| expected.iter().any(|e| e == entry)),
                "verified without a signature made with a configured key"
            );
            after_verify(&verified);
        }
        Err(error) => {
            // Exercise the mapping to an HTTP answer.
            let _ = (error.is_unauthorized(), error.reason(), error.to_string());
        }
    }

    // 2. The same body, signed as OpenAI would with the fixed key, always verifies, unless
    //    its id does not fit the inbox message's `message_id`.
    let sign_id = std::str::from_utf8(id).ok().filter(|s| usable_id(s)).unwrap_or("wh_fuzz");
    let ts = NOW.to_string();
    let good = fixture.signer.sign(sign_id, &ts, body);
    let headers = signed_headers(sign_id, &ts, &good);
    match fixture.verifier.verify(&headers, Bytes::copy_from_slice(body), NOW) {
        Ok(verified) => {
            assert_eq!(verified.body().as_ref(), body);
            assert_eq!(verified.id(), sign_id);
            after_verify(&verified);
        }
        Err(VerifyError::IdTooLong) => assert!(sign_id.len() > MAX_SHORT_STRING, "an id of {} bytes refused as too long", sign_id.len()),
        Err(e) => panic!("a correctly signed delivery was refused: {e}"),
    }

    // ... but not under a verifier that lacks the key, nor with the body changed.
    assert!(fixture.other_only.verify(&headers, Bytes::copy_from_slice(body), NOW).is_err(), "verified with a key that is not configured");
    let mut tampered = body.to_vec();
    match tampered.last_mut() {
        Some(last) => *last ^= 0x01,
        None => tampered.push(b' '),
    }
    assert!(fixture.verifier.verify(&headers, Bytes::from(tampered), NOW).is_err(), "a changed body verified");
}

/// What the receiver (and later the worker) does with a verified delivery: the inbox message,
/// and for an event, the event message (lapin panics on an id or type that does not fit).
fn after_verify(verified: &Verified) {
    let _ = inbox::properties(verified, None, None);
    let body = verified.body().as_ref();
    if let Ok(envelope) = Envelope::parse(body) {
        assert!(!envelope.id.is_empty() && !envelope.kind.is_empty());
        let _ = (envelope.subject(), envelope.target().map(|t| (t.kind.field(), t.kind.path(), t.id)));
        // An event is a JSON object, and whatever the receiver accepts the worker can embed.
        assert_eq!(body.trim_ascii_start().first(), Some(&b'{'), "a non-object body parsed as an envelope: {:?}", String::from_utf8_lossy(body));
        if let Err(e) = envelope::raw(body) {
            panic!("an accepted envelope is not embeddable JSON ({e}): {:?}", String::from_utf8_lossy(body));
        }
        let _ = publish::properties(&envelope, publish::Context { webhook_id: Some(verified.id()), ..Default::default() });
    }
}

fn signed_headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_ID, HeaderValue::from_str(id).unwrap());
    headers.insert(HEADER_TIMESTAMP, HeaderValue::from_str(timestamp).unwrap());
    headers.insert(HEADER_SIGNATURE, HeaderValue::from_str(signature).unwrap());
    headers
}

/// An id the relay can take as is: visible ASCII (space and tab allowed inside), non-empty,
/// no white space at either end (the relay trims it).
fn usable_id(s: &str) -> bool {
    !s.is_empty() && s.trim() == s && s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

fn trim(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}
