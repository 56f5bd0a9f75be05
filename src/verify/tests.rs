//! Official vectors from OpenAI's SDK tests and the Standard Webhooks reference libraries,
//! plus one test per way verification can fail.

use super::*;
use axum::http::{HeaderName, HeaderValue};

// openai-python tests/lib/test_webhooks.py (same values in openai-node).
const OPENAI_SECRET: &str = "whsec_RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c=";
const OPENAI_PAYLOAD: &str = r#"{"id": "evt_685c059ae3a481909bdc86819b066fb6", "object": "event", "created_at": 1750861210, "type": "response.completed", "data": {"id": "resp_123"}}"#;
const OPENAI_TIMESTAMP: i64 = 1_750_861_210;
const OPENAI_ID: &str = "wh_685c059ae39c8190af8c71ed1022a24d";
const OPENAI_SIGNATURE: &str = "v1,gUAg4R2hWouRZqRQG4uJypNS8YK885G838+EHb4nKBY=";

fn headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in [(HEADER_ID, id), (HEADER_TIMESTAMP, timestamp), (HEADER_SIGNATURE, signature)] {
        map.insert(HeaderName::from_static(name), HeaderValue::from_str(value).unwrap());
    }
    map
}

fn verifier(secrets: &str) -> Verifier {
    Verifier::new(Secret::parse_list(secrets).unwrap(), 300)
}

fn check(v: &Verifier, id: &str, ts: i64, sig: &str, body: &str, now: i64) -> Result<Verified, VerifyError> {
    v.verify(&headers(id, &ts.to_string(), sig), Bytes::from(body.to_owned()), now)
}

fn openai(sig: &str, body: &str, ts: i64) -> Result<Verified, VerifyError> {
    check(&verifier(OPENAI_SECRET), OPENAI_ID, ts, sig, body, OPENAI_TIMESTAMP)
}

#[test]
fn openai_sdk_vector_verifies_and_keeps_the_raw_body() {
    let verified = openai(OPENAI_SIGNATURE, OPENAI_PAYLOAD, OPENAI_TIMESTAMP).unwrap();
    assert_eq!(verified.id(), OPENAI_ID);
    assert_eq!(verified.timestamp(), "1750861210");
    assert_eq!(verified.body().as_ref(), OPENAI_PAYLOAD.as_bytes());
}

#[test]
fn signing_reproduces_the_openai_sdk_vector() {
    let secret = Secret::parse(OPENAI_SECRET).unwrap();
    assert_eq!(secret.sign(OPENAI_ID, "1750861210", OPENAI_PAYLOAD.as_bytes()), OPENAI_SIGNATURE);
}

#[test]
fn wrong_secret_is_rejected() {
    let other = format!("whsec_{}", STANDARD.encode([7u8; 32]));
    let result = check(&verifier(&other), OPENAI_ID, OPENAI_TIMESTAMP, OPENAI_SIGNATURE, OPENAI_PAYLOAD, OPENAI_TIMESTAMP);
    assert_eq!(result.unwrap_err(), VerifyError::NoMatchingSignature);
}

#[test]
fn re_serialized_body_is_rejected() {
    // The minified form of the same JSON; its own signature differs (computed locally in the facts file).
    let minified = r#"{"id":"evt_685c059ae3a481909bdc86819b066fb6","object":"event","created_at":1750861210,"type":"response.completed","data":{"id":"resp_123"}}"#;
    assert_eq!(openai(OPENAI_SIGNATURE, minified, OPENAI_TIMESTAMP).unwrap_err(), VerifyError::NoMatchingSignature);
    assert!(openai("v1,1lGiyiHmXWAo63BDw+vMuqkNzKAgA+OOQ/AxS2e6SiI=", minified, OPENAI_TIMESTAMP).is_ok());
}

#[test]
fn tampered_body_is_rejected() {
    let tampered = OPENAI_PAYLOAD.replace("resp_123", "resp_124");
    assert_eq!(openai(OPENAI_SIGNATURE, &tampered, OPENAI_TIMESTAMP).unwrap_err(), VerifyError::NoMatchingSignature);
}

#[test]
fn signature_made_with_the_undecoded_secret_is_rejected() {
    // A common sender bug: using "whsec_..." itself as the key.
    let sig = "v1,+4ZePMowmy2nbxmfG2/VzffJjNDRa6G96U7XZMM+FWQ=";
    assert_eq!(openai(sig, OPENAI_PAYLOAD, OPENAI_TIMESTAMP).unwrap_err(), VerifyError::NoMatchingSignature);
}

#[test]
fn each_missing_header_is_named() {
    for name in [HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE] {
        let mut map = headers(OPENAI_ID, "1750861210", OPENAI_SIGNATURE);
        map.remove(name);
        let result = verifier(OPENAI_SECRET).verify(&map, Bytes::from_static(OPENAI_PAYLOAD.as_bytes()), OPENAI_TIMESTAMP);
        assert_eq!(result.unwrap_err(), VerifyError::MissingHeader(name));
    }
}

#[test]
fn repeated_or_empty_header_is_malformed() {
    let mut map = headers(OPENAI_ID, "1750861210", OPENAI_SIGNATURE);
    map.append(HEADER_ID, HeaderValue::from_static("wh_other"));
    let body = Bytes::from_static(OPENAI_PAYLOAD.as_bytes());
    assert_eq!(verifier(OPENAI_SECRET).verify(&map, body.clone(), OPENAI_TIMESTAMP).unwrap_err(), VerifyError::MalformedHeader(HEADER_ID));
    let map = headers(OPENAI_ID, "1750861210", " ");
    assert_eq!(verifier(OPENAI_SECRET).verify(&map, body, OPENAI_TIMESTAMP).unwrap_err(), VerifyError::MalformedHeader(HEADER_SIGNATURE));
}

#[test]
fn an_id_too_long_for_the_inbox_is_malformed_even_when_signed() {
    let secret = Secret::parse(OPENAI_SECRET).unwrap();
    for (len, expected) in [(MAX_SHORT_STRING, Ok(())), (MAX_SHORT_STRING + 1, Err(VerifyError::IdTooLong))] {
        let id = "w".repeat(len);
        let sig = secret.sign(&id, "1750861210", OPENAI_PAYLOAD.as_bytes());
        let result = check(&verifier(OPENAI_SECRET), &id, OPENAI_TIMESTAMP, &sig, OPENAI_PAYLOAD, OPENAI_TIMESTAMP);
        assert_eq!(result.map(|_| ()), expected, "{len} bytes");
    }
    assert!(!VerifyError::IdTooLong.is_unauthorized(), "a 400, not a 401");
}

#[test]
fn non_numeric_timestamps_are_malformed() {
    for ts in ["not-a-number", "1.5", "+1750861210", "-5", "1750861210suffix", "99999999999999999999"] {
        let map = headers(OPENAI_ID, ts, OPENAI_SIGNATURE);
        let result = verifier(OPENAI_SECRET).verify(&map, Bytes::from_static(b"{}"), OPENAI_TIMESTAMP);
        assert_eq!(result.unwrap_err(), VerifyError::MalformedTimestamp, "{ts}");
    }
}

#[test]
fn timestamp_window_is_inclusive_at_the_tolerance() {
    let secret = Secret::parse(OPENAI_SECRET).unwrap();
    let v = verifier(OPENAI_SECRET);
    for (offset, expected) in [(0, None), (-300, None), (300, None), (-301, Some(VerifyError::TooOld)), (301, Some(VerifyError::TooNew))] {
        let ts = OPENAI_TIMESTAMP + offset;
        let sig = secret.sign(OPENAI_ID, &ts.to_string(), OPENAI_PAYLOAD.as_bytes());
        let result = check(&v, OPENAI_ID, ts, &sig, OPENAI_PAYLOAD, OPENAI_TIMESTAMP);
        assert_eq!(result.err(), expected, "offset {offset}");
    }
}

#[test]
fn stale_and_future_timestamps_are_rejected_before_the_signature_is_checked() {
    // openai-python: timestamps ±400 s with a dummy signature.
    assert_eq!(openai("v1,dummy_signature", OPENAI_PAYLOAD, OPENAI_TIMESTAMP - 400).unwrap_err(), VerifyError::TooOld);
    assert_eq!(openai("v1,dummy_signature", OPENAI_PAYLOAD, OPENAI_TIMESTAMP + 400).unwrap_err(), VerifyError::TooNew);
}

#[test]
fn a_wider_tolerance_lets_the_signature_decide() {
    let v = Verifier::new(Secret::parse_list(OPENAI_SECRET).unwrap(), 600);
    let result = check(&v, OPENAI_ID, OPENAI_TIMESTAMP - 400, "v1,dummy_signature", OPENAI_PAYLOAD, OPENAI_TIMESTAMP);
    assert_eq!(result.unwrap_err(), VerifyError::NoMatchingSignature);
}

#[test]
fn zero_tolerance_accepts_only_the_same_second() {
    let v = Verifier::new(Secret::parse_list(OPENAI_SECRET).unwrap(), 0);
    assert!(check(&v, OPENAI_ID, OPENAI_TIMESTAMP, OPENAI_SIGNATURE, OPENAI_PAYLOAD, OPENAI_TIMESTAMP).is_ok());
    assert_eq!(check(&v, OPENAI_ID, OPENAI_TIMESTAMP, OPENAI_SIGNATURE, OPENAI_PAYLOAD, OPENAI_TIMESTAMP + 1).unwrap_err(), VerifyError::TooOld);
    assert_eq!(check(&v, OPENAI_ID, OPENAI_TIMESTAMP, OPENAI_SIGNATURE, OPENAI_PAYLOAD, OPENAI_TIMESTAMP - 1).unwrap_err(), VerifyError::TooNew);
}

#[test]
fn one_valid_signature_among_several_is_enough() {
    let list = format!("v1,invalid_signature {OPENAI_SIGNATURE}");
    assert!(openai(&list, OPENAI_PAYLOAD, OPENAI_TIMESTAMP).is_ok());
    // Tabs separate entries too (openai-python splits on any white space).
    let tabbed = format!("v1,not-base64-$$$\t{OPENAI_SIGNATURE} v1,also-invalid");
    assert!(openai(&tabbed, OPENAI_PAYLOAD, OPENAI_TIMESTAMP).is_ok());
    let none = "v1,invalid_signature1 v1,invalid_signature2";
    assert_eq!(openai(none, OPENAI_PAYLOAD, OPENAI_TIMESTAMP).unwrap_err(), VerifyError::NoMatchingSignature);
}

#[test]
fn signatures_without_the_v1_scheme_are_ignored() {
    let bare = OPENAI_SIGNATURE.trim_start_matches("v1,");
    assert_eq!(openai(bare, OPENAI_PAYLOAD, OPENAI_TIMESTAMP).unwrap_err(), VerifyError::NoMatchingSignature);
    let v2 = format!("v2,{bare}");
    assert_eq!(openai(&v2, OPENAI_PAYLOAD, OPENAI_TIMESTAMP).unwrap_err(), VerifyError::NoMatchingSignature);
}

#[test]
fn any_configured_secret_verifies_during_rotation() {
    let old = format!("whsec_{}", STANDARD.encode([9u8; 32]));
    for list in [format!("{old},{OPENAI_SECRET}"), format!("{OPENAI_SECRET}\n {old}")] {
        let v = verifier(&list);
        assert!(check(&v, OPENAI_ID, OPENAI_TIMESTAMP, OPENAI_SIGNATURE, OPENAI_PAYLOAD, OPENAI_TIMESTAMP).is_ok());
    }
}

// standard-webhooks libraries/rust/src/lib.rs, test_sign and neighbours.
const SW_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const SW_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
const SW_TS: i64 = 1_649_367_553;
const SW_PAYLOAD: &str = r#"{"email":"test@example.com","username":"test_user"}"#;
const SW_SIGNATURE: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

fn standard(sig: &str) -> Result<Verified, VerifyError> {
    check(&verifier(SW_SECRET), SW_ID, SW_TS, sig, SW_PAYLOAD, SW_TS)
}

#[test]
fn standard_webhooks_rust_vector_signs_and_verifies() {
    let secret = Secret::parse(SW_SECRET).unwrap();
    assert_eq!(secret.sign(SW_ID, &SW_TS.to_string(), SW_PAYLOAD.as_bytes()), SW_SIGNATURE);
    assert!(standard(SW_SIGNATURE).is_ok());
    assert!(standard("v1,R3PTzyfHASBKHH98a7yexTwaJ4yNIcGhFQc1yuN+BPU=").is_err());
}

#[test]
fn partial_signatures_are_rejected() {
    assert_eq!(standard("v1,").unwrap_err(), VerifyError::NoMatchingSignature);
    assert_eq!(standard(&SW_SIGNATURE[..8]).unwrap_err(), VerifyError::NoMatchingSignature);
}

#[test]
fn standard_webhooks_multi_signature_list() {
    let others = [
        "v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ=",
        "v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q=",
        "v1,9DfC1c3eeOrXB6w/5dIDydLNQaEyww5KalE5jLBZucE=",
    ];
    let with_valid = format!("{} {} {SW_SIGNATURE} {}", others[0], others[1], others[2]);
    assert!(standard(&with_valid).is_ok());
    assert!(standard(&others.join(" ")).is_err());
}

#[test]
fn standard_webhooks_python_vector() {
    let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let (id, ts, payload) = ("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", r#"{"test": 2432232314}"#);
    assert_eq!(secret.sign(id, ts, payload.as_bytes()), "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    let v = verifier("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let one_char_off = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=";
    assert!(check(&v, id, 1_614_265_330, one_char_off, payload, 1_614_265_330).is_err());
    let list = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    assert!(check(&v, id, 1_614_265_330, list, payload, 1_614_265_330).is_ok());
}

#[test]
fn openai_python_edge_case_vector_with_non_ascii_body() {
    let v = verifier("whsec_c3ludGhldGljLXdlYmhvb2stc2VjcmV0");
    let sig = "v1,qzuLCtHIXTcfJr8yxIcKC07cOqyNSgdmZRut6AFa+RA=";
    let body = r#"{"synthetic": "café"}"#;
    assert!(check(&v, "evt_synthetic", 1_750_000_000, sig, body, 1_750_000_000).is_ok());
    let list = format!("v1,invalid\t{sig} v1,also-invalid");
    assert!(check(&v, "evt_synthetic", 1_750_000_000, &list, body, 1_750_000_000).is_ok());
}

#[test]
fn unusable_secrets_are_refused() {
    assert_eq!(Secret::parse("RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c=").unwrap_err(), SecretError::MissingPrefix);
    assert_eq!(Secret::parse("whsec_").unwrap_err(), SecretError::TooShort(0));
    assert_eq!(Secret::parse("whsec_a").unwrap_err(), SecretError::NotBase64);
    assert_eq!(Secret::parse("whsec_xyz!").unwrap_err(), SecretError::NotBase64);
    assert_eq!(Secret::parse("whsec_eA==").unwrap_err(), SecretError::TooShort(1));
    assert_eq!(Secret::parse_list(" , \n").unwrap_err(), SecretError::Empty);
}

#[test]
fn secrets_decode_with_or_without_padding() {
    let unpadded = OPENAI_SECRET.trim_end_matches('=');
    let a = Secret::parse(OPENAI_SECRET).unwrap();
    let b = Secret::parse(unpadded).unwrap();
    assert_eq!(a.sign("wh_1", "1700000000", b"{}"), b.sign("wh_1", "1700000000", b"{}"));
    assert_ne!(a.sign("wh_1", "1700000000", b"{}"), Secret::parse(&format!("whsec_{}", "A".repeat(43))).unwrap().sign("wh_1", "1700000000", b"{}"));
}

#[test]
fn debug_output_never_shows_key_bytes() {
    let v = verifier(OPENAI_SECRET);
    let shown = format!("{v:?}");
    assert!(shown.contains("[redacted]"));
    assert!(!shown.contains("69") && !shown.contains("Rdva"), "{shown}");
}

#[test]
fn only_the_first_signatures_are_tried() {
    let filler = vec!["v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="; MAX_SIGNATURES].join(" ");
    let late = format!("{filler} {OPENAI_SIGNATURE}");
    assert_eq!(openai(&late, OPENAI_PAYLOAD, OPENAI_TIMESTAMP).unwrap_err(), VerifyError::NoMatchingSignature);
    let filler = vec!["v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="; MAX_SIGNATURES - 1].join(" ");
    assert!(openai(&format!("{filler} {OPENAI_SIGNATURE}"), OPENAI_PAYLOAD, OPENAI_TIMESTAMP).is_ok());
}
