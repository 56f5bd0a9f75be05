//! Property tests of what an unauthenticated sender controls: the three `webhook-*` header
//! values, the body, and (through the clock) the timestamp. They drive the public API the
//! receiver uses (`Verifier::verify`, then `Envelope::parse`) with arbitrary input, and end
//! with a bounded run of the cargo-fuzz target's function (`fuzz/`), so CI exercises it.
//!
//! Needs no broker; the whole binary runs in a few seconds.

#[path = "support/fuzz_receive.rs"]
mod fuzz_receive;

use std::time::Instant;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use openai_webhook_relay::broker::MAX_SHORT_STRING;
use openai_webhook_relay::envelope::Envelope;
use openai_webhook_relay::verify::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret, SecretError, Verifier, VerifyError};
use openai_webhook_relay::{inbox, publish};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use serde_json::{Map, Value, json};

/// `cases` per property, from a fixed seed so that CI runs the same inputs every time;
/// `PROPTEST_RNG_SEED=<u64>` explores others (and `PROPTEST_CASES=<n>` runs more).
fn config(cases: u32) -> ProptestConfig {
    let from_env = ProptestConfig::default();
    let rng_seed = match from_env.rng_seed {
        RngSeed::Random => RngSeed::Fixed(0x0a1_5eed),
        chosen => chosen,
    };
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { from_env.cases } else { cases };
    // No regression files: a failure prints its minimal input, which goes into a named test.
    ProptestConfig { cases, rng_seed, failure_persistence: None, ..from_env }
}

// ---- generators -------------------------------------------------------------------------

/// A byte a `HeaderValue` may hold: tab, visible ASCII, space, or obs-text (0x80..=0xFF,
/// not UTF-8 on its own). Control bytes and DEL are moved into that range.
fn header_byte(b: u8) -> u8 {
    match b {
        b'\t' | 0x20..=0x7e | 0x80..=0xff => b,
        0x7f => 0xff,
        other => other + 0x20,
    }
}

/// Header values an attacker can get past hyper: empty, short garbage (often not UTF-8),
/// plausible ones, and huge ones.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        2 => Just(Vec::new()),
        6 => vec(any::<u8>(), 0..80).prop_map(|v| v.into_iter().map(header_byte).collect()),
        4 => "[ -~\t]{0,80}".prop_map(String::into_bytes),
        3 => "[0-9]{0,20}".prop_map(String::into_bytes),
        4 => "(v1|v1a|v2)?,?[A-Za-z0-9+/=]{0,64}([ \t]+v1,[A-Za-z0-9+/=]{0,64}){0,4}".prop_map(String::into_bytes),
        1 => (any::<u8>(), 16_384usize..131_072).prop_map(|(b, n)| vec![header_byte(b); n]),
    ]
    .prop_map(|bytes| HeaderValue::from_bytes(&bytes).expect("only bytes a HeaderValue takes"))
}

/// Sets of headers, with the three webhook names (in any case) likely, repeated at times.
fn header_map() -> impl Strategy<Value = HeaderMap> {
    let name = prop_oneof![
        Just("webhook-id"),
        Just("webhook-timestamp"),
        Just("webhook-signature"),
        Just("Webhook-Signature"),
        Just("WEBHOOK-ID"),
        Just("x-other"),
    ];
    vec((name, header_value()), 0..7).prop_map(|pairs| {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value);
        }
        map
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..512),
        2 => "\\PC{0,200}".prop_map(String::into_bytes),
        1 => Just(fuzz_receive::OPENAI_PAYLOAD.as_bytes().to_vec()),
    ]
}

/// A random 32..=64-byte key as `whsec_` + base64, padded or not (both are accepted).
fn secret_text() -> impl Strategy<Value = (Vec<u8>, String)> {
    (vec(any::<u8>(), 32..=64), any::<bool>()).prop_map(|(key, padded)| {
        let encoded = if padded { STANDARD.encode(&key) } else { STANDARD_NO_PAD.encode(&key) };
        (key, format!("whsec_{encoded}"))
    })
}

fn secrets(texts: &[(Vec<u8>, String)]) -> Vec<Secret> {
    texts.iter().map(|(_, text)| Secret::parse(text).expect("generated secrets are valid")).collect()
}

/// A webhook id the relay takes as is: visible ASCII, no white space at the ends.
fn webhook_id() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "wh_[0-9a-f]{32}",
        2 => "[!-~]([ -~\t]{0,60}[!-~])?",
    ]
}

/// A junk entry for a `webhook-signature` list: wrong scheme, undecodable, or a random tag.
fn junk_signature() -> impl Strategy<Value = String> {
    prop_oneof![
        vec(any::<u8>(), 32).prop_map(|tag| format!("v1,{}", STANDARD.encode(tag))),
        vec(any::<u8>(), 32).prop_map(|tag| format!("v1a,{}", STANDARD.encode(tag))),
        vec(any::<u8>(), 32).prop_map(|tag| STANDARD.encode(tag)),
        "v1,[!-~]{0,50}",
        "[!-~]{1,20}",
    ]
}

fn headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(HEADER_ID, HeaderValue::from_str(id).unwrap());
    map.insert(HEADER_TIMESTAMP, HeaderValue::from_str(timestamp).unwrap());
    map.insert(HEADER_SIGNATURE, HeaderValue::from_str(signature).unwrap());
    map
}

/// A valid delivery: configured keys, the index of the one that signs, id, clock, tolerance,
/// timestamp offset within the tolerance, timestamp text (maybe zero-padded), body.
#[derive(Debug, Clone)]
struct Delivery {
    keys: Vec<(Vec<u8>, String)>,
    signer: usize,
    id: String,
    now: i64,
    tolerance: u64,
    sent: i64,
    timestamp: String,
    body: Vec<u8>,
}

impl Delivery {
    fn verifier(&self) -> Verifier {
        Verifier::new(secrets(&self.keys), self.tolerance)
    }
    fn signature(&self) -> String {
        secrets(&self.keys)[self.signer].sign(&self.id, &self.timestamp, &self.body)
    }
}

fn delivery() -> impl Strategy<Value = Delivery> {
    (vec(secret_text(), 1..=3), any::<prop::sample::Index>(), webhook_id(), 0u64..=1_000_000, body(), any::<bool>())
        .prop_flat_map(|(keys, signer, id, tolerance, body, pad)| {
            let tol = tolerance as i64;
            // Keep the sent time a non-negative number of at most 18 digits.
            let now = tol..=100_000_000_000_000_000i64 - tol;
            let offset = prop_oneof![Just(-tol), Just(tol), Just(0), -tol..=tol];
            (Just((keys, signer, id, tolerance, body, pad)), now, offset)
        })
        .prop_map(|((keys, signer, id, tolerance, body, pad), now, offset)| {
            let sent = now + offset;
            let timestamp = if pad { format!("{sent:018}") } else { sent.to_string() };
            let signer = signer.index(keys.len());
            Delivery { keys, signer, id, now, tolerance, sent, timestamp, body }
        })
}

// ---- Verifier::verify -------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary headers (non-UTF-8, empty, repeated, huge), bodies, clocks and tolerances:
    /// `verify` returns (no panic, no overflow) and never accepts, since nothing was signed.
    #[test]
    fn verify_never_panics_and_never_accepts_unsigned_input(
        headers in header_map(),
        body in body(),
        now in prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(0i64), any::<i64>(), 1_700_000_000i64..1_800_000_000],
        tolerance in prop_oneof![Just(u64::MAX), Just(0u64), any::<u64>(), 0u64..1000],
        keys in vec(secret_text(), 1..=3),
    ) {
        let result = Verifier::new(secrets(&keys), tolerance).verify(&headers, Bytes::from(body), now);
        prop_assert!(result.is_err(), "unsigned input verified: {result:?}");
    }

    /// Arbitrary values in exactly one of each header, with a correct-looking timestamp, so
    /// that the signature list parser sees every kind of garbage.
    #[test]
    fn garbage_signature_lists_are_refused(
        id in header_value(),
        signature in header_value(),
        body in body(),
        keys in vec(secret_text(), 1..=3),
    ) {
        let now = fuzz_receive::OPENAI_TIMESTAMP;
        let mut map = HeaderMap::new();
        map.insert(HEADER_ID, id);
        map.insert(HEADER_TIMESTAMP, HeaderValue::from(now));
        map.insert(HEADER_SIGNATURE, signature);
        let result = Verifier::new(secrets(&keys), 300).verify(&map, Bytes::from(body), now);
        prop_assert!(result.is_err(), "{result:?}");
    }

    /// Signed with a key that is not configured: always refused as not authentic (401).
    #[test]
    fn a_foreign_key_never_verifies(d in delivery(), foreign in secret_text()) {
        prop_assume!(d.keys.iter().all(|(key, _)| *key != foreign.0));
        let signature = Secret::parse(&foreign.1).unwrap().sign(&d.id, &d.timestamp, &d.body);
        let result = d.verifier().verify(&headers(&d.id, &d.timestamp, &signature), Bytes::from(d.body.clone()), d.now);
        prop_assert_eq!(result.unwrap_err(), VerifyError::NoMatchingSignature);
    }

    /// A correctly signed delivery within the tolerance always verifies, whatever junk
    /// surrounds the good signature and whichever configured key made it; the verified parts
    /// are the bytes sent. Outside the tolerance the same delivery is refused.
    #[test]
    fn a_correctly_signed_delivery_within_tolerance_verifies(
        d in delivery(),
        before in vec(junk_signature(), 0..4),
        after in vec(junk_signature(), 0..4),
        tabs in any::<bool>(),
    ) {
        let separator = if tabs { "\t" } else { " " };
        let good = d.signature();
        let list: Vec<&str> = before.iter().map(String::as_str).chain([good.as_str()]).chain(after.iter().map(String::as_str)).collect();
        let signature = list.join(separator);
        let map = headers(&d.id, &d.timestamp, &signature);
        let verified = d.verifier().verify(&map, Bytes::from(d.body.clone()), d.now);
        let verified = verified.map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
        prop_assert_eq!(verified.id(), d.id.as_str());
        prop_assert_eq!(verified.timestamp(), d.timestamp.as_str());
        prop_assert_eq!(verified.body().as_ref(), d.body.as_slice());

        // One second beyond the window on either side: refused, signature or not.
        let tol = d.tolerance as i64;
        let late = d.verifier().verify(&map, Bytes::from(d.body.clone()), d.sent + tol + 1);
        prop_assert_eq!(late.unwrap_err(), VerifyError::TooOld);
        let early = d.verifier().verify(&map, Bytes::from(d.body.clone()), d.sent - tol - 1);
        prop_assert_eq!(early.unwrap_err(), VerifyError::TooNew);
    }

    /// A correctly signed delivery verifies exactly when its id fits an AMQP short string (the
    /// inbox message's `message_id`): a longer one is malformed (400), never a panic when the
    /// receiver builds the inbox message.
    #[test]
    fn a_signed_delivery_verifies_only_with_an_id_that_fits_the_inbox(
        d in delivery(),
        id in prop_oneof![
            "[!-~]{1,600}",
            (MAX_SHORT_STRING - 4..MAX_SHORT_STRING + 4).prop_map(|n| "w".repeat(n)),
        ],
    ) {
        let d = Delivery { id, ..d };
        let result = d.verifier().verify(&headers(&d.id, &d.timestamp, &d.signature()), Bytes::from(d.body.clone()), d.now);
        if d.id.len() <= MAX_SHORT_STRING {
            let verified = result.map_err(|e| TestCaseError::fail(format!("refused a {}-byte id: {e}", d.id.len())))?;
            let _ = inbox::properties(&verified, None, None);
        } else {
            prop_assert_eq!(result.unwrap_err(), VerifyError::IdTooLong);
        }
    }

    /// Any single changed byte of body, id, timestamp or signature of a valid delivery
    /// makes it fail (changes a `HeaderValue` cannot carry never reach the verifier).
    #[test]
    fn flipping_any_single_byte_breaks_a_valid_delivery(
        d in delivery(),
        part in 0usize..4,
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let signature = d.signature();
        let original = headers(&d.id, &d.timestamp, &signature);
        prop_assert!(d.verifier().verify(&original, Bytes::from(d.body.clone()), d.now).is_ok());

        let mut parts = [d.id.as_bytes().to_vec(), d.timestamp.as_bytes().to_vec(), signature.clone().into_bytes(), d.body.clone()];
        if parts[part].is_empty() {
            parts[part].push(mask); // an empty body: "changing" it means adding a byte
        } else {
            let i = at.index(parts[part].len());
            parts[part][i] ^= mask;
        }
        let [id, timestamp, signature, body] = parts;
        let mut map = HeaderMap::new();
        for (name, value) in [(HEADER_ID, &id), (HEADER_TIMESTAMP, &timestamp), (HEADER_SIGNATURE, &signature)] {
            match HeaderValue::from_bytes(value) {
                Ok(value) => { map.insert(name, value); }
                Err(_) => return Ok(()), // hyper refuses such a request before any handler runs
            }
        }
        let result = d.verifier().verify(&map, Bytes::from(body), d.now);
        prop_assert!(result.is_err(), "a changed delivery verified (part {part}): {result:?}");
    }
}

// ---- Secret ------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(1024))]

    /// `Secret::parse` and `Secret::parse_list` never panic on arbitrary text.
    #[test]
    fn secret_parsing_never_panics(text in "\\PC{0,100}", suffix in "[A-Za-z0-9+/=_!\\- ,\n]{0,100}") {
        let _ = Secret::parse(&text);
        let _ = Secret::parse_list(&text);
        let prefixed = format!("whsec_{suffix}");
        let _ = Secret::parse(&prefixed);
        let _ = Secret::parse_list(&prefixed);
    }

    /// `whsec_` + base64 of n bytes parses iff n >= 16, padded or not; a list parses iff every
    /// entry does, whatever mix of commas and white space separates them.
    #[test]
    fn secrets_parse_exactly_when_long_enough(
        keys in vec((vec(any::<u8>(), 0..80), any::<bool>()), 1..4),
        separators in vec(prop_oneof![Just(","), Just(" "), Just("\n"), Just(", "), Just("\t,\t")], 3),
    ) {
        let mut texts = Vec::new();
        for (key, padded) in &keys {
            let encoded = if *padded { STANDARD.encode(key) } else { STANDARD_NO_PAD.encode(key) };
            let text = format!("whsec_{encoded}");
            let parsed = Secret::parse(&text);
            if key.len() >= 16 {
                let secret = parsed.map_err(|e| TestCaseError::fail(format!("{e}")))?;
                // The key is the decoded bytes: signing agrees with a secret made from them.
                let same = Secret::parse(&format!("whsec_{}", STANDARD.encode(key))).unwrap();
                prop_assert_eq!(secret.sign("wh_1", "1", b"x"), same.sign("wh_1", "1", b"x"));
            } else {
                prop_assert_eq!(parsed.unwrap_err(), SecretError::TooShort(key.len()));
            }
            texts.push(text);
        }
        let mut list = String::new();
        for (i, text) in texts.iter().enumerate() {
            list.push_str(text);
            list.push_str(separators[i % separators.len()]);
        }
        let all_ok = keys.iter().all(|(key, _)| key.len() >= 16);
        let parsed = Secret::parse_list(&list);
        prop_assert_eq!(parsed.is_ok(), all_ok);
        if all_ok {
            prop_assert_eq!(parsed.unwrap().len(), keys.len());
        }
    }
}

// ---- Envelope::parse ---------------------------------------------------------------------

/// Arbitrary JSON values, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec(("[a-z_]{1,8}", inner), 0..5).prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

/// Strings around the AMQP short-string limit of 255 bytes: short ones (often multi-byte
/// characters), ASCII ones of 240–270 bytes, and long multi-byte ones.
fn short_string_or_longer() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,40}",
        2 => "[a-z._]{240,270}",
        1 => "\\PC{60,200}",
    ]
}

fn reserved(key: &str) -> bool {
    matches!(key, "id" | "type" | "created_at" | "data" | "object")
}

proptest! {
    #![proptest_config(config(1024))]

    /// `Envelope::parse` never panics on arbitrary bytes.
    #[test]
    fn envelope_parse_never_panics(bytes in vec(any::<u8>(), 0..2048)) {
        let _ = Envelope::parse(&bytes);
    }

    /// ... nor on arbitrary JSON, and accepts an object only if it is an event envelope.
    /// (Arrays are left out: `Envelope::parse` takes `["id","type",1]` too, a known issue,
    /// see `a_json_array_is_not_an_envelope`.)
    #[test]
    fn envelope_parse_refuses_what_is_not_an_envelope(value in json_value()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        if value.is_array() {
            let _ = Envelope::parse(&bytes);
        } else if let Ok(envelope) = Envelope::parse(&bytes) {
            prop_assert!(value.is_object());
            prop_assert_eq!(value["id"].as_str(), Some(envelope.id.as_str()));
            prop_assert_eq!(value["type"].as_str(), Some(envelope.kind.as_str()));
            prop_assert_eq!(value["created_at"].as_i64(), Some(envelope.created_at));
        }
    }

    /// Any JSON object with string `id` and `type` of 1 to 255 bytes (they become AMQP short
    /// strings) and a non-negative integer `created_at` is accepted, whatever other fields it
    /// carries, in any formatting and key order, with `object` absent or `"event"`, and `data`
    /// absent or an object whose `id` (if any) is a string; the worker can build its event
    /// message. An empty or longer `id` or `type` is refused.
    #[test]
    fn envelope_parse_accepts_every_event_object(
        id in short_string_or_longer(),
        kind in short_string_or_longer(),
        created_at in prop_oneof![Just(0i64), Just(i64::MAX), 0i64..=i64::MAX, 1_600_000_000i64..2_000_000_000],
        with_object_field in any::<bool>(),
        extra in vec(("\\PC{1,12}", json_value()), 0..6),
        data in prop::option::of(
            (prop::option::of("\\PC{0,20}"), vec(("[a-z]{1,8}", json_value()), 0..4)).prop_map(|(object_id, extra)| {
                let mut data: Map<String, Value> = extra.into_iter().filter(|(k, _)| !matches!(k.as_str(), "id" | "call_id" | "session_id")).collect();
                if let Some(object_id) = object_id {
                    data.insert("id".into(), Value::from(object_id));
                }
                Value::Object(data)
            }),
        ),
        pretty in any::<bool>(),
    ) {
        let mut object: Map<String, Value> = extra.into_iter().filter(|(k, _)| !reserved(k)).collect();
        object.insert("created_at".into(), json!(created_at));
        object.insert("type".into(), json!(kind));
        object.insert("id".into(), json!(id));
        if with_object_field {
            object.insert("object".into(), json!("event"));
        }
        if let Some(data) = &data {
            object.insert("data".into(), data.clone());
        }
        let value = Value::Object(object);
        let bytes = if pretty { serde_json::to_vec_pretty(&value).unwrap() } else { serde_json::to_vec(&value).unwrap() };
        let parsed = Envelope::parse(&bytes);
        let fits = |s: &str| (1..=MAX_SHORT_STRING).contains(&s.len());
        if !fits(&id) || !fits(&kind) {
            prop_assert!(parsed.is_err());
        } else {
            let envelope = parsed.map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&bytes))))?;
            prop_assert_eq!(&envelope.id, &id);
            prop_assert_eq!(&envelope.kind, &kind);
            prop_assert_eq!(envelope.created_at, created_at);
            let subject = data.as_ref().and_then(|d| d.get("id")).and_then(Value::as_str);
            prop_assert_eq!(envelope.subject(), subject);
            let _ = publish::properties(&envelope, publish::Context { webhook_id: Some("wh_1"), ..Default::default() });
        }
    }
}

// ---- the fuzz target's function, bounded ------------------------------------------------

/// Mutates `input` the way a simple fuzzer would.
fn mutate(rng: &mut fastrand::Rng, input: &mut Vec<u8>) {
    for _ in 0..rng.usize(1..=4) {
        match rng.u8(0..7) {
            0 if !input.is_empty() => {
                let i = rng.usize(..input.len());
                input[i] ^= 1 << rng.u8(0..8);
            }
            1 if !input.is_empty() => {
                let i = rng.usize(..input.len());
                input[i] = rng.u8(..);
            }
            2 => {
                let i = rng.usize(..=input.len());
                input.insert(i, *rng.choice(b"\n\r\t ,=v1{}\"0\x00\xff").unwrap());
            }
            3 if !input.is_empty() => {
                let i = rng.usize(..input.len());
                input.remove(i);
            }
            4 if !input.is_empty() => {
                input[0] = rng.u8(..); // flags: leave out or repeat headers
            }
            5 if input.len() > 1 => {
                let i = rng.usize(1..input.len());
                input.truncate(i);
            }
            _ => {} // sometimes nothing: the unchanged seed must still verify
        }
    }
}

/// `prefix` and a number, or one time in eight 240–300 bytes, around the AMQP short-string limit.
fn sometimes_long(rng: &mut fastrand::Rng, prefix: &str) -> String {
    if rng.u8(0..8) == 0 {
        format!("{prefix}{}", "x".repeat(rng.usize(240..300) - prefix.len()))
    } else {
        format!("{prefix}{}", rng.u32(..))
    }
}

/// Runs `fuzz_receive::receive` (what `cargo fuzz run receive` calls) on ~20k inputs:
/// the seed corpus, mutations of it, structured and random inputs. Deterministic; set
/// `FUZZ_SEED` to explore other inputs.
#[test]
fn bounded_fuzz_of_the_receive_path() {
    let seed = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_f0a1);
    let mut rng = fastrand::Rng::with_seed(seed);
    let corpus_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/receive");
    let mut seeds = vec![fuzz_receive::openai_vector()];
    if let Ok(entries) = std::fs::read_dir(corpus_dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("seed-") {
                seeds.push(std::fs::read(entry.path()).unwrap());
            }
        }
    }
    let started = Instant::now();
    let mut runs = 0usize;
    for input in &seeds {
        fuzz_receive::receive(input);
        runs += 1;
    }
    const RUNS: usize = 20_000;
    while runs < RUNS {
        let input = match runs % 4 {
            0 | 1 => {
                let mut input = rng.choice(&seeds).unwrap().clone();
                mutate(&mut rng, &mut input);
                input
            }
            2 => {
                let ts = (fuzz_receive::OPENAI_TIMESTAMP + rng.i64(-400..=400)).to_string();
                let sig = format!("v1,{}", STANDARD.encode((0..32).map(|_| rng.u8(..)).collect::<Vec<_>>()));
                let (id, event_id, kind) = (sometimes_long(&mut rng, "wh_"), sometimes_long(&mut rng, "evt_"), sometimes_long(&mut rng, "response."));
                let body = json!({"id": event_id, "type": kind, "created_at": rng.i64(..), "data": {"id": "resp_1"}});
                fuzz_receive::encode(if rng.bool() { 0 } else { rng.u8(..) }, id.as_bytes(), ts.as_bytes(), sig.as_bytes(), body.to_string().as_bytes())
            }
            _ => (0..rng.usize(0..300)).map(|_| rng.u8(..)).collect(),
        };
        fuzz_receive::receive(&input);
        runs += 1;
    }
    println!("bounded fuzz: {runs} inputs ({} seeds) through the receive path in {:.1?}, seed {seed:#x}", seeds.len(), started.elapsed());
}

/// Regression, found by the fuzz target in strict mode: a JSON envelope with a non-UTF-8 byte
/// inside a field the relay does not read passed `Envelope::parse` but not `envelope::raw`,
/// so the receiver stored what the worker could not embed.
#[test]
fn an_envelope_that_parses_is_always_embeddable() {
    let body = b"{\"id\":\"evt_1\",\"note\":\"caf\xe9\",\"created_at\":1,\"type\":\"response.completed\",\"data\":{\"id\":\"resp_1\"}}";
    let parsed = Envelope::parse(body).is_ok();
    let embeddable = openai_webhook_relay::envelope::raw(body).is_ok();
    assert_eq!(parsed, embeddable, "Envelope::parse accepted={parsed} but envelope::raw accepted={embeddable}");
}

/// Regression, found by `envelope_parse_refuses_what_is_not_an_envelope`: serde's derived
/// `Deserialize` for a struct also takes a JSON array of its fields in order, so
/// `Envelope::parse` used to accept `["evt_1","response.completed",1,null]`.
#[test]
fn a_json_array_is_not_an_envelope() {
    for body in [
        &br#"["evt_1","response.completed",1]"#[..],
        br#"["evt_1","response.completed",1,null]"#,
        br#"["evt_1","response.completed",1,"event"]"#,
        br#"["evt_1","response.completed",1,"event",{"id":"resp_1"}]"#,
        br#"["evt_1","response.completed",1,{"id":"resp_1"}]"#,
    ] {
        assert!(Envelope::parse(body).is_err(), "accepted {}", String::from_utf8_lossy(body));
    }
}

/// The seeds verify as they should (so the fuzzer starts from the `Ok` branch).
#[test]
fn the_seed_vector_verifies() {
    let verifier = Verifier::new(Secret::parse_list(fuzz_receive::OPENAI_SECRET).unwrap(), 300);
    let map = headers(fuzz_receive::OPENAI_ID, &fuzz_receive::OPENAI_TIMESTAMP.to_string(), fuzz_receive::OPENAI_SIGNATURE);
    let body = Bytes::from_static(fuzz_receive::OPENAI_PAYLOAD.as_bytes());
    assert!(verifier.verify(&map, body, fuzz_receive::OPENAI_TIMESTAMP).is_ok());
}
