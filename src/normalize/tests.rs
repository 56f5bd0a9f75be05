use serde_json::{Value, json};

use super::*;
use crate::envelope::{Envelope, raw};

const SOURCE: &str = "openai";

mod webhook {
    pub const RESPONSE_COMPLETED: &str = include_str!("../../fixtures/webhooks/response.completed.json");
    pub const RESPONSE_FAILED: &str = include_str!("../../fixtures/webhooks/response.failed.json");
    pub const RESPONSE_CANCELLED: &str = include_str!("../../fixtures/webhooks/response.cancelled.json");
    pub const RESPONSE_INCOMPLETE: &str = include_str!("../../fixtures/webhooks/response.incomplete.json");
    pub const BATCH_COMPLETED: &str = include_str!("../../fixtures/webhooks/batch.completed.json");
    pub const FT_SUCCEEDED: &str = include_str!("../../fixtures/webhooks/fine_tuning.job.succeeded.json");
    pub const EVAL_RUN_SUCCEEDED: &str = include_str!("../../fixtures/webhooks/eval.run.succeeded.json");
    pub const REALTIME_CALL_INCOMING: &str = include_str!("../../fixtures/webhooks/realtime.call.incoming.json");
    pub const SOMETHING_NEW: &str = include_str!("../../fixtures/webhooks/something.new.json");
}

mod object {
    pub const RESP_COMPLETED: &str = include_str!("../../fixtures/openai/responses/resp_completed01.json");
    pub const RESP_FAILED: &str = include_str!("../../fixtures/openai/responses/resp_failed01.json");
    pub const RESP_CANCELLED: &str = include_str!("../../fixtures/openai/responses/resp_cancelled01.json");
    pub const RESP_INCOMPLETE: &str = include_str!("../../fixtures/openai/responses/resp_incomplete01.json");
    pub const RESP_REFUSAL: &str = include_str!("../../fixtures/openai/responses/resp_refusal01.json");
    pub const BATCH_COMPLETED: &str = include_str!("../../fixtures/openai/batches/batch_completed01.json");
    pub const FT_SUCCEEDED: &str = include_str!("../../fixtures/openai/fine_tuning/jobs/ftjob_succeeded01.json");
}

/// Normalizes `event` (the webhook body as received) with `enrichment`, returning the output bytes.
fn normalize_with(event: &str, enrichment: Enrichment<'_>) -> Vec<u8> {
    let envelope = Envelope::parse(event.as_bytes()).expect("fixture is an envelope");
    let raw_event = raw(event.as_bytes()).expect("fixture is JSON");
    normalize(&envelope, raw_event, SOURCE, enrichment, None).expect("normalizes")
}

fn fetched(kind: ObjectKind, text: &str) -> Object<'_> {
    Object::read(kind, serde_json::from_str::<&RawValue>(text).expect("fixture object is JSON"))
}

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("output is JSON")
}

fn fixture(text: &str) -> Value {
    serde_json::from_str(text).expect("fixture is JSON")
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("output is UTF-8")
}

/// The keys of `data`, sorted.
fn data_keys(out: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = out["data"].as_object().expect("data is an object").keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

/// The attributes every CloudEvent carries, checked against the envelope it came from.
fn assert_envelope_attributes(out: &Value, event: &str, subject: &str, time: &str) {
    let envelope = fixture(event);
    assert_eq!(out["specversion"], "1.0");
    assert_eq!(out["id"], envelope["id"]);
    assert_eq!(out["source"], SOURCE);
    assert_eq!(out["type"], format!("com.openai.{}", envelope["type"].as_str().unwrap()));
    assert_eq!(out["subject"], subject);
    assert_eq!(out["time"], time);
    assert_eq!(out["datacontenttype"], "application/json");
    assert_eq!(out["data"]["event"], envelope, "data.event is the envelope");
    let attributes: Vec<&str> = out.as_object().unwrap().keys().map(String::as_str).collect();
    let mut sorted = attributes.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["data", "datacontenttype", "id", "source", "specversion", "subject", "time", "type"]);
}

#[test]
fn a_completed_response_becomes_a_cloudevent_with_the_response_and_its_output_text() {
    let bytes = normalize_with(webhook::RESPONSE_COMPLETED, Enrichment::Object(&fetched(ObjectKind::Response, object::RESP_COMPLETED)));
    let out = parse(&bytes);

    assert_envelope_attributes(&out, webhook::RESPONSE_COMPLETED, "resp_completed01", "2025-08-27T14:55:31Z");
    assert_eq!(out["type"], "com.openai.response.completed");
    assert_eq!(out["data"]["response"], fixture(object::RESP_COMPLETED));
    assert_eq!(
        out["data"]["output_text"],
        "Saturday in Lisbon looks dry: sunny, 28 °C, with a 5% chance of rain. You can leave the umbrella at home, but pack sunscreen."
    );
    assert_eq!(data_keys(&out), ["event", "output_text", "response"]);
}

#[test]
fn output_text_is_only_the_message_text_not_reasoning_summaries_or_tool_arguments() {
    let out = parse(&normalize_with(webhook::RESPONSE_COMPLETED, Enrichment::Object(&fetched(ObjectKind::Response, object::RESP_COMPLETED))));
    let output_text = out["data"]["output_text"].as_str().unwrap();
    assert!(!output_text.contains("Planning the answer"), "reasoning summary leaked: {output_text}");
    assert!(!output_text.contains("\"city\""), "function arguments leaked: {output_text}");
}

#[test]
fn a_failed_response_carries_its_error_and_a_null_output_text() {
    let out = parse(&normalize_with(webhook::RESPONSE_FAILED, Enrichment::Object(&fetched(ObjectKind::Response, object::RESP_FAILED))));

    assert_envelope_attributes(&out, webhook::RESPONSE_FAILED, "resp_failed01", "2025-08-27T14:56:38Z");
    assert_eq!(out["type"], "com.openai.response.failed");
    assert_eq!(out["data"]["response"], fixture(object::RESP_FAILED));
    assert_eq!(out["data"]["response"]["error"]["code"], "server_error");
    assert_eq!(out["data"]["output_text"], Value::Null);
    assert_eq!(data_keys(&out), ["event", "output_text", "response"], "output_text is present, as null");
}

#[test]
fn a_cancelled_response_has_a_null_output_text() {
    let out = parse(&normalize_with(webhook::RESPONSE_CANCELLED, Enrichment::Object(&fetched(ObjectKind::Response, object::RESP_CANCELLED))));

    assert_envelope_attributes(&out, webhook::RESPONSE_CANCELLED, "resp_cancelled01", "2025-08-27T14:56:51Z");
    assert_eq!(out["type"], "com.openai.response.cancelled");
    assert_eq!(out["data"]["response"], fixture(object::RESP_CANCELLED));
    assert_eq!(out["data"]["response"]["status"], "cancelled");
    assert_eq!(out["data"]["output_text"], Value::Null);
    assert_eq!(data_keys(&out), ["event", "output_text", "response"]);
}

#[test]
fn an_incomplete_response_has_the_partial_text_as_output_text() {
    let out = parse(&normalize_with(webhook::RESPONSE_INCOMPLETE, Enrichment::Object(&fetched(ObjectKind::Response, object::RESP_INCOMPLETE))));

    assert_envelope_attributes(&out, webhook::RESPONSE_INCOMPLETE, "resp_incomplete01", "2025-08-27T14:57:52Z");
    assert_eq!(out["type"], "com.openai.response.incomplete");
    assert_eq!(out["data"]["response"], fixture(object::RESP_INCOMPLETE));
    assert_eq!(out["data"]["response"]["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(
        out["data"]["output_text"],
        "Here is a three-day itinerary for Porto. Day 1: start at the Ribeira waterfront, cross the Dom Luís I bridge to"
    );
}

#[test]
fn a_response_whose_only_message_is_a_refusal_has_a_null_output_text() {
    // No fixture event for this one: it arrives as an ordinary response.completed.
    let event = r#"{"id":"evt_68af1d10a1b2819090c1d2e3f4a5b6c7","object":"event","created_at":1756306704,"type":"response.completed","data":{"id":"resp_refusal01"}}"#;
    let out = parse(&normalize_with(event, Enrichment::Object(&fetched(ObjectKind::Response, object::RESP_REFUSAL))));

    assert_envelope_attributes(&out, event, "resp_refusal01", "2025-08-27T14:58:24Z");
    assert_eq!(out["data"]["response"], fixture(object::RESP_REFUSAL));
    assert_eq!(out["data"]["response"]["output"][0]["content"][0]["type"], "refusal");
    assert_eq!(out["data"]["output_text"], Value::Null);
}

#[test]
fn a_completed_batch_sits_under_batch_without_output_text() {
    let out = parse(&normalize_with(webhook::BATCH_COMPLETED, Enrichment::Object(&fetched(ObjectKind::Batch, object::BATCH_COMPLETED))));

    assert_envelope_attributes(&out, webhook::BATCH_COMPLETED, "batch_completed01", "2025-08-26T18:15:05Z");
    assert_eq!(out["type"], "com.openai.batch.completed");
    assert_eq!(out["data"]["batch"], fixture(object::BATCH_COMPLETED));
    assert_eq!(out["data"]["batch"]["request_counts"], json!({"total": 1000, "completed": 1000, "failed": 0}));
    assert_eq!(data_keys(&out), ["batch", "event"]);
}

#[test]
fn a_succeeded_fine_tuning_job_sits_under_fine_tuning_job_without_output_text() {
    let out = parse(&normalize_with(webhook::FT_SUCCEEDED, Enrichment::Object(&fetched(ObjectKind::FineTuningJob, object::FT_SUCCEEDED))));

    assert_envelope_attributes(&out, webhook::FT_SUCCEEDED, "ftjob_succeeded01", "2025-08-26T16:05:18Z");
    assert_eq!(out["type"], "com.openai.fine_tuning.job.succeeded");
    assert_eq!(out["data"]["fine_tuning_job"], fixture(object::FT_SUCCEEDED));
    assert_eq!(out["data"]["fine_tuning_job"]["fine_tuned_model"], "ft:gpt-4.1-mini-2025-04-14:acme:support-tone:C9xYz12a");
    assert_eq!(data_keys(&out), ["event", "fine_tuning_job"]);
}

#[test]
fn every_object_fixture_is_embedded_byte_for_byte_in_its_pretty_printed_form() {
    let cases = [
        (webhook::RESPONSE_COMPLETED, ObjectKind::Response, object::RESP_COMPLETED),
        (webhook::RESPONSE_FAILED, ObjectKind::Response, object::RESP_FAILED),
        (webhook::RESPONSE_CANCELLED, ObjectKind::Response, object::RESP_CANCELLED),
        (webhook::RESPONSE_INCOMPLETE, ObjectKind::Response, object::RESP_INCOMPLETE),
        (webhook::BATCH_COMPLETED, ObjectKind::Batch, object::BATCH_COMPLETED),
        (webhook::FT_SUCCEEDED, ObjectKind::FineTuningJob, object::FT_SUCCEEDED),
    ];
    for (event, kind, body) in cases {
        let bytes = normalize_with(event, Enrichment::Object(&fetched(kind, body)));
        let out = text(&bytes);
        assert!(out.contains(&format!(r#""event":{}"#, event.trim())), "envelope not verbatim for {kind:?}");
        assert!(out.contains(&format!(r#""{}":{}"#, kind.field(), body.trim())), "object not verbatim for {kind:?}");
    }
}

#[test]
fn the_envelope_and_object_are_embedded_as_received_not_re_serialized() {
    let event = r#"{ "type" : "response.completed","id":"evt_odd",   "created_at":1756306531 , "data":{"id":  "resp_x"}, "extra": 1.50 }"#;
    let body = r#"{"id":  "resp_x" ,"output":[] , "temperature": 1.0, "metadata" : {"b":"é\u00e9","a":null}}"#;
    let bytes = normalize_with(event, Enrichment::Object(&fetched(ObjectKind::Response, body)));
    let out = text(&bytes);

    assert!(out.contains(&format!(r#""event":{event}"#)), "envelope re-serialized: {out}");
    assert!(out.contains(&format!(r#""response":{body}"#)), "object re-serialized: {out}");
    assert_eq!(parse(&bytes)["subject"], "resp_x");
}

#[test]
fn an_object_that_is_gone_becomes_a_fetch_error_with_no_object_key() {
    let message = "Response with id 'resp_completed01' not found.";
    let out = parse(&normalize_with(webhook::RESPONSE_COMPLETED, Enrichment::Gone { status: 404, message }));

    assert_envelope_attributes(&out, webhook::RESPONSE_COMPLETED, "resp_completed01", "2025-08-27T14:55:31Z");
    assert_eq!(out["data"]["fetch_error"], json!({"status": 404, "message": message}));
    assert_eq!(data_keys(&out), ["event", "fetch_error"], "no response and no output_text");
}

#[test]
fn a_gone_batch_also_has_only_the_event_and_the_fetch_error() {
    let message = "No batch found with id 'batch_completed01'.";
    let out = parse(&normalize_with(webhook::BATCH_COMPLETED, Enrichment::Gone { status: 404, message }));
    assert_eq!(out["data"]["fetch_error"], json!({"status": 404, "message": message}));
    assert_eq!(data_keys(&out), ["event", "fetch_error"]);
}

#[test]
fn an_eval_run_event_is_published_with_the_event_alone() {
    let out = parse(&normalize_with(webhook::EVAL_RUN_SUCCEEDED, Enrichment::None));

    assert_envelope_attributes(&out, webhook::EVAL_RUN_SUCCEEDED, "evalrun_68ae0b2c5d1c8190b3e5f7a9c1d3e5f7", "2025-08-26T17:20:00Z");
    assert_eq!(out["type"], "com.openai.eval.run.succeeded");
    assert_eq!(data_keys(&out), ["event"]);
}

#[test]
fn a_realtime_call_is_published_with_the_event_alone_and_the_call_id_as_subject() {
    let out = parse(&normalize_with(webhook::REALTIME_CALL_INCOMING, Enrichment::None));

    assert_envelope_attributes(&out, webhook::REALTIME_CALL_INCOMING, "rtc_68af26cf3ae88190a1c3e5f7b9d1f3a5", "2025-08-27T15:40:00Z");
    assert_eq!(out["type"], "com.openai.realtime.call.incoming");
    assert_eq!(out["data"]["event"]["data"]["sip_headers"][0]["name"], "From");
    assert_eq!(data_keys(&out), ["event"]);
}

#[test]
fn an_unknown_event_type_flows_through_with_the_event_alone() {
    let out = parse(&normalize_with(webhook::SOMETHING_NEW, Enrichment::None));

    assert_envelope_attributes(&out, webhook::SOMETHING_NEW, "x_1", "2025-08-27T15:53:20Z");
    assert_eq!(out["type"], "com.openai.something.new");
    assert_eq!(data_keys(&out), ["event"]);
}

#[test]
fn an_event_without_data_has_no_subject() {
    let event = r#"{"id":"evt_nodata","object":"event","created_at":1756310000,"type":"something.newer"}"#;
    let out = parse(&normalize_with(event, Enrichment::None));
    assert!(out.get("subject").is_none(), "{out}");
    assert_eq!(out["data"]["event"], fixture(event));
}

#[test]
fn the_time_is_rfc3339_utc_of_created_at() {
    for (created_at, time) in [(0, "1970-01-01T00:00:00Z"), (1719168000, "2024-06-23T18:40:00Z"), (1756306531, "2025-08-27T14:55:31Z")] {
        let event = format!(r#"{{"id":"evt_t","type":"something.new","created_at":{created_at},"data":{{"id":"x_1"}}}}"#);
        let out = parse(&normalize_with(&event, Enrichment::None));
        assert_eq!(out["time"], time, "created_at {created_at}");
    }
}

#[test]
fn an_unrepresentable_created_at_is_an_error_not_a_panic() {
    let event = format!(r#"{{"id":"evt_t","type":"something.new","created_at":{},"data":{{"id":"x_1"}}}}"#, i64::MAX);
    let envelope = Envelope::parse(event.as_bytes()).unwrap();
    let raw_event = raw(event.as_bytes()).unwrap();
    let err = normalize(&envelope, raw_event, SOURCE, Enrichment::None, None).unwrap_err();
    assert!(matches!(err, NormalizeError::Time(t) if t == i64::MAX), "{err}");
}

#[test]
fn the_configured_source_is_used_as_is() {
    let envelope = Envelope::parse(webhook::BATCH_COMPLETED.as_bytes()).unwrap();
    let raw_event = raw(webhook::BATCH_COMPLETED.as_bytes()).unwrap();
    let bytes = normalize(&envelope, raw_event, "https://api.openai.com/proj_Abc123", Enrichment::None, None).unwrap();
    assert_eq!(parse(&bytes)["source"], "https://api.openai.com/proj_Abc123");
}

#[test]
fn a_five_megabyte_response_passes_through_with_its_full_output_text() {
    // Non-ASCII and characters that JSON escapes, so the length check covers unescaping.
    let chunk = "Ünïcödé \"quoted\" line\twith tab\n";
    let first: String = chunk.repeat(5 * 1024 * 1024 / chunk.len() / 2);
    let second: String = "plain ascii tail. ".repeat(5 * 1024 * 1024 / 18 / 2);
    let body = format!(
        r#"{{"id":"resp_large01","object":"response","created_at":1756306478,"status":"completed","background":true,"model":"gpt-4.1-2025-04-14","output":[{{"id":"msg_large01","type":"message","status":"completed","role":"assistant","content":[{{"type":"output_text","annotations":[],"text":{}}},{{"type":"output_text","annotations":[],"text":{}}}]}}],"usage":{{"input_tokens":12,"output_tokens":1400000,"total_tokens":1400012}}}}"#,
        serde_json::to_string(&first).unwrap(),
        serde_json::to_string(&second).unwrap(),
    );
    assert!(body.len() > 5 * 1024 * 1024, "body is {} bytes", body.len());
    let event = r#"{"id":"evt_large01","object":"event","created_at":1756306531,"type":"response.completed","data":{"id":"resp_large01"}}"#;

    let bytes = normalize_with(event, Enrichment::Object(&fetched(ObjectKind::Response, &body)));
    assert!(text(&bytes).contains(&format!(r#""response":{body}"#)), "large object not verbatim");

    let out = parse(&bytes);
    let output_text = out["data"]["output_text"].as_str().expect("output_text is a string");
    assert_eq!(output_text.len(), first.len() + second.len());
    assert_eq!(output_text, format!("{first}{second}"));
}

#[test]
fn output_text_skips_non_message_items_whatever_their_content_looks_like() {
    let body = r#"{"output":[
        {"type":"reasoning","id":"rs_1","summary":[],"content":[{"type":"reasoning_text","text":"thinking"}]},
        {"type":"some_future_item","content":"a string, not parts"},
        {"type":"message","id":"msg_1","role":"assistant","status":"completed","content":[{"type":"output_text","text":"A","annotations":[]}]},
        {"type":"function_call","call_id":"call_1","name":"f","arguments":"{}"},
        {"type":"message","id":"msg_2","role":"assistant","status":"completed","content":[{"type":"refusal","refusal":"no"},{"type":"output_text","text":"B","annotations":[]}]}
    ]}"#;
    assert_eq!(fetched(ObjectKind::Response, body).output_text.as_deref(), Some("AB"));
}

#[test]
fn output_text_is_none_for_tool_calls_only_or_no_output() {
    for body in [
        r#"{"output":[{"type":"function_call","call_id":"call_1","name":"f","arguments":"{}"}]}"#,
        r#"{"output":[]}"#,
        r#"{"id":"resp_1"}"#,
    ] {
        assert_eq!(fetched(ObjectKind::Response, body).output_text, None, "{body}");
    }
}

#[test]
fn the_documented_example_event_is_exactly_what_normalize_produces() {
    // fixtures/events/response.completed.json is the full example README.md points to.
    const EXAMPLE: &str = include_str!("../../fixtures/events/response.completed.json");
    let out = normalize_with(webhook::RESPONSE_COMPLETED, Enrichment::Object(&fetched(ObjectKind::Response, object::RESP_COMPLETED)));
    if std::env::var_os("RELAY_WRITE_EXAMPLE").is_some() {
        let pretty = serde_json::to_string_pretty(&parse(&out)).unwrap();
        std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/events/response.completed.json"), pretty + "\n").unwrap();
    }
    assert_eq!(parse(&out), fixture(EXAMPLE));
}

#[test]
fn metadata_keeps_the_string_pairs_within_openais_limits() {
    let metadata = |text: &str| metadata_headers(&fetched(ObjectKind::Response, text).metadata).cloned().collect::<Vec<_>>();
    let completed = metadata(object::RESP_COMPLETED);
    assert_eq!(completed, [("job".to_owned(), "umbrella-check".to_owned()), ("tenant".to_owned(), "acme".to_owned())]);

    let long_key = "k".repeat(65);
    let long_value = "v".repeat(513);
    let body = json!({"metadata": {"n": 1, "null": null, "nested": {"a": "b"}, long_key: "x", "long": long_value, "é": "ü", "ok": ""}});
    assert_eq!(metadata(&body.to_string()), [("ok".to_owned(), String::new()), ("é".to_owned(), "ü".to_owned())]);

    let many: serde_json::Map<String, Value> = (0..20).map(|i| (format!("k{i:02}"), json!("v"))).collect();
    assert_eq!(metadata(&json!({"metadata": many}).to_string()).len(), 16);
    // 60 characters, 240 bytes: within OpenAI's limit, but no AMQP header name after the prefix.
    let wide_key = "😀".repeat(60);
    assert_eq!(metadata(&json!({"metadata": {wide_key: "x", "k": "v"}}).to_string()), [("k".to_owned(), "v".to_owned())]);
    // 512 four-byte characters a value: three such pairs fill the headers' byte budget.
    let wide: serde_json::Map<String, Value> = (0..16).map(|i| (format!("k{i:02}"), json!("😀".repeat(512)))).collect();
    let kept = metadata(&json!({"metadata": wide}).to_string());
    assert_eq!(kept.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["k00", "k01", "k02"]);
    for absent in [r#"{"id":"x"}"#, r#"{"metadata":null}"#, r#"{"metadata":[1]}"#, "[]"] {
        assert!(metadata(absent).is_empty(), "{absent}");
    }
}

#[test]
fn one_field_of_an_unexpected_shape_does_not_hide_the_other() {
    let text = r#"{"output":[{"type":"message","content":[{"type":"output_text","text":"A"}]}],"metadata":[1]}"#;
    let odd_metadata = fetched(ObjectKind::Response, text);
    assert_eq!((odd_metadata.output_text.as_deref(), odd_metadata.metadata.len()), (Some("A"), 0));
    let odd_output = fetched(ObjectKind::Response, r#"{"output":"text","metadata":{"k":"v","n":1}}"#);
    assert_eq!(odd_output.output_text, None);
    assert_eq!(odd_output.metadata, [("k".to_owned(), "v".to_owned())]);
    // Only a response has `output_text`, whatever another kind's object holds.
    assert_eq!(fetched(ObjectKind::Batch, text).output_text, None);
}
