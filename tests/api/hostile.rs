//! Hostile senders: header injection and smuggling attempts sent as raw bytes, repeated,
//! non-UTF-8 and huge headers, long signature lists, and 10 000 idle connections against the
//! real binary. Each test also checks that nothing unverified reached the inbox.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue};
use lapin::options::BasicPublishOptions;
use openai_webhook_relay::inbox::{self, header, unix_now};
use openai_webhook_relay::verify::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret, Verifier};
use openai_webhook_relay::worker::retry::HEADER_ERROR_REASON;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{Options, Relay, event, secret_text, spawn_relay, webhook_id};

fn receiver() -> Options {
    Options::default().role("receiver")
}

fn addr(relay: &Relay) -> String {
    relay.url.trim_start_matches("http://").to_owned()
}

/// The relay's signature over arbitrary body bytes (`Relay::sign` takes text).
fn sign_bytes(id: &str, timestamp: &str, body: &[u8]) -> String {
    Secret::parse(&secret_text()).unwrap().sign(id, timestamp, body)
}

/// Sends `head` (request line and header lines, without the blank line) and `body` as raw
/// bytes, with `Content-Length` and `Connection: close` added, and returns the status code
/// of the answer (0 when the server closed without one).
async fn raw_request(addr: &str, head: &[u8], body: &[u8]) -> u16 {
    let mut request = head.to_vec();
    request.extend_from_slice(format!("content-length: {}\r\nconnection: close\r\n\r\n", body.len()).as_bytes());
    request.extend_from_slice(body);
    exchange(addr, &request).await
}

/// Sends `request` as raw bytes on a new connection and returns the status code of the
/// answer (0 when the server closed without one), waiting 5 s at most.
async fn exchange(addr: &str, request: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before reading everything, e.g. 431: ignore write errors.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok() || !answer.is_empty(), "no answer within 5 s");
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ").and_then(|rest| rest.get(..3)).and_then(|code| code.parse().ok()).unwrap_or(0)
}

/// A request head with the three webhook headers given as raw lines.
fn head(lines: &[&[u8]]) -> Vec<u8> {
    let mut head = b"POST /webhooks/openai HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\n".to_vec();
    for line in lines {
        head.extend_from_slice(line);
        head.extend_from_slice(b"\r\n");
    }
    head
}

/// Asserts the inbox holds exactly `expected` messages, then that the relay still serves.
async fn assert_inbox(relay: &Relay, expected: u32) {
    assert_eq!(relay.amqp.count(&relay.topology.inbox).await, expected, "messages in the inbox");
    assert_eq!(relay.get("/healthz").await.status(), 200, "relay still up");
}

/// Asserts that exactly the deliveries `ids` were stored since the last look (a relay
/// without a worker), then that the relay still serves.
async fn assert_stored(relay: &Relay, ids: &[&str]) {
    assert_eq!(relay.take_stored_ids().await, ids, "webhook-ids stored in the inbox");
    assert_eq!(relay.get("/healthz").await.status(), 200, "relay still up");
}

/// A signed delivery: (id, timestamp, signature, body).
fn signed(relay: &Relay) -> (String, String, String, String) {
    let body = event("response.completed", "resp_1");
    let id = webhook_id();
    let ts = unix_now();
    let sig = relay.sign(&id, ts, &body);
    (id, ts.to_string(), sig, body)
}

#[tokio::test]
async fn header_injection_and_smuggling_attempts_get_400_and_store_nothing() {
    let relay = spawn_relay(receiver()).await;
    let (id, ts, sig, body) = signed(&relay);
    let id_line = format!("webhook-id: {id}");
    let ts_line = format!("webhook-timestamp: {ts}");
    let sig_line = format!("webhook-signature: {sig}");
    let (id_line, ts_line, sig_line) = (id_line.as_bytes(), ts_line.as_bytes(), sig_line.as_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // What `webhook-id: wh_x\r\nwebhook-id: wh_evil` in a value becomes on the wire.
        ("CRLF-split line adds a second webhook-id", head(&[format!("webhook-id: {id}\r\nwebhook-id: wh_evil").as_bytes(), ts_line, sig_line])),
        ("CRLF-split line adds a second webhook-signature", head(&[id_line, ts_line, format!("{}\r\nwebhook-signature: v1,AAAA", String::from_utf8_lossy(sig_line)).as_bytes()])),
        ("CRLF-split line adds a second webhook-timestamp", head(&[id_line, format!("webhook-timestamp: {ts}\r\nwebhook-timestamp: 1").as_bytes(), sig_line])),
        ("bare CR inside a value", head(&[format!("webhook-id: {id}\rX-Injected: 1").as_bytes(), ts_line, sig_line])),
        ("bare LF splits a value into a second webhook-id", head(&[format!("webhook-id: {id}\nwebhook-id: wh_evil").as_bytes(), ts_line, sig_line])),
        ("obs-fold continuation line", head(&[id_line, b" X-Injected: 1", ts_line, sig_line])),
        ("obs-fold continuation with a tab", head(&[id_line, ts_line, sig_line, b"\tv1,AAAA"])),
        ("NUL byte inside a value", head(&[format!("webhook-id: {id}\0X-Injected: 1").as_bytes(), ts_line, sig_line])),
        ("white space before the colon", head(&[format!("webhook-id : {id}").as_bytes(), ts_line, sig_line])),
        ("header without a colon", head(&[id_line, ts_line, sig_line, b"X-Injected 1"])),
    ];
    for (case, head) in &cases {
        let status = raw_request(&addr(&relay), head, body.as_bytes()).await;
        assert_eq!(status, 400, "{case}");
    }
    assert_inbox(&relay, 0).await;

    // Control: the same delivery, sent cleanly over the same raw path, is stored.
    let status = raw_request(&addr(&relay), &head(&[id_line, ts_line, sig_line]), body.as_bytes()).await;
    assert_eq!(status, 200, "the clean request is accepted");
    assert_stored(&relay, &[id.as_str()]).await;
}

#[tokio::test]
async fn repeated_webhook_headers_get_400_and_store_nothing() {
    let relay = spawn_relay(receiver()).await;
    let (id, ts, sig, body) = signed(&relay);
    let (id, ts, sig) = (id.as_str(), ts.as_str(), sig.as_str());
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("webhook-id twice, the signed one first", vec![("webhook-id", id), ("webhook-id", "wh_other"), ("webhook-timestamp", ts), ("webhook-signature", sig)]),
        ("webhook-id twice, the signed one last", vec![("webhook-id", "wh_other"), ("webhook-id", id), ("webhook-timestamp", ts), ("webhook-signature", sig)]),
        ("webhook-id twice, same value", vec![("webhook-id", id), ("webhook-id", id), ("webhook-timestamp", ts), ("webhook-signature", sig)]),
        ("webhook-signature twice", vec![("webhook-id", id), ("webhook-timestamp", ts), ("webhook-signature", "v1,AAAA"), ("webhook-signature", sig)]),
        ("webhook-timestamp twice", vec![("webhook-id", id), ("webhook-timestamp", ts), ("webhook-timestamp", ts), ("webhook-signature", sig)]),
        ("differently cased names", vec![("webhook-id", id), ("Webhook-Id", "wh_other"), ("webhook-timestamp", ts), ("webhook-signature", sig)]),
    ];
    for (case, headers) in &cases {
        // reqwest's `header` appends, so both values go out as separate header lines.
        let response = relay.post(headers, body.as_bytes().to_vec()).await;
        assert_eq!(response.status(), 400, "{case}");
        let answer: serde_json::Value = response.json().await.unwrap();
        assert!(answer["error"].as_str().unwrap().contains("repeated"), "{case}: {answer}");
    }
    assert_inbox(&relay, 0).await;
}

#[tokio::test]
async fn non_utf8_headers_and_a_signed_non_utf8_body_get_400_and_store_nothing() {
    let relay = spawn_relay(receiver()).await;
    let (id, ts, sig, body) = signed(&relay);
    let id_line = format!("webhook-id: {id}").into_bytes();
    let ts_line = format!("webhook-timestamp: {ts}").into_bytes();
    let sig_line = format!("webhook-signature: {sig}").into_bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("webhook-id with 0xFF", head(&[b"webhook-id: wh_\xff\xfe", &ts_line, &sig_line])),
        ("webhook-id with UTF-8 é", head(&[b"webhook-id: wh_caf\xc3\xa9", &ts_line, &sig_line])),
        ("webhook-timestamp with 0x80", head(&[&id_line, b"webhook-timestamp: 17\x80", &sig_line])),
        ("webhook-signature with 0xFF", head(&[&id_line, &ts_line, b"webhook-signature: v1,\xff\xff"])),
        ("webhook-signature with a non-UTF-8 entry before the good one", head(&[&id_line, &ts_line, &[b"webhook-signature: v1,\xff ".as_slice(), sig.as_bytes()].concat()])),
    ];
    for (case, head) in &cases {
        assert_eq!(raw_request(&addr(&relay), head, body.as_bytes()).await, 400, "{case}");
    }

    // A correctly signed body that is not UTF-8 at all, nor JSON: verified, then refused as not an event.
    for garbage in [&b"\xff\xfe\x00\x01not json"[..], b"\xc3\x28", b"{\"id\":\"evt_\xff\"}", b"{\"id\":\"evt_1\",\"type\":\"\xe2\x82\",\"created_at\":1}"] {
        let id = webhook_id();
        let ts = unix_now().to_string();
        let sig = sign_bytes(&id, &ts, garbage);
        let response = relay.post(&[("webhook-id", &id), ("webhook-timestamp", &ts), ("webhook-signature", &sig)], garbage.to_vec()).await;
        assert_eq!(response.status(), 400, "{:?}", String::from_utf8_lossy(garbage));
        let answer: serde_json::Value = response.json().await.unwrap();
        assert!(answer["error"].as_str().unwrap().contains("not an OpenAI event envelope"), "{answer}");
    }
    assert_inbox(&relay, 0).await;
}

/// Regression (found by the fuzz run): a signed envelope whose non-UTF-8 byte sits in a
/// field the relay does not read (here `note`, "café" in Latin-1) used to pass the envelope
/// check, get a 200 and then panic the worker. It is refused like any non-UTF-8 body.
#[tokio::test]
async fn a_signed_envelope_with_non_utf8_inside_an_unread_field_is_refused() {
    let relay = spawn_relay(receiver()).await;
    let body = b"{\"id\":\"evt_1\",\"note\":\"caf\xe9\",\"created_at\":1,\"type\":\"response.completed\",\"data\":{\"id\":\"resp_1\"}}";
    let id = webhook_id();
    let ts = unix_now().to_string();
    let sig = sign_bytes(&id, &ts, body);
    let response = relay.post(&[("webhook-id", &id), ("webhook-timestamp", &ts), ("webhook-signature", &sig)], body.to_vec()).await;
    assert_eq!(response.status(), 400, "stored a body the worker cannot process");
    assert_inbox(&relay, 0).await;
}

/// Regression: a signed JSON array of the envelope's fields in order used to be taken for an
/// event (serde's derived struct visitor accepts sequences).
#[tokio::test]
async fn a_signed_array_of_fields_is_not_an_event() {
    let relay = spawn_relay(receiver()).await;
    for body in [&br#"["evt_1","response.completed",1]"#[..], br#"["evt_1","response.completed",1,null]"#] {
        let id = webhook_id();
        let ts = unix_now().to_string();
        let sig = sign_bytes(&id, &ts, body);
        let response = relay.post(&[("webhook-id", &id), ("webhook-timestamp", &ts), ("webhook-signature", &sig)], body.to_vec()).await;
        assert_eq!(response.status(), 400, "{}", String::from_utf8_lossy(body));
    }
    assert_inbox(&relay, 0).await;
}

/// Regression: an inbox message the worker cannot turn into an event message used to panic
/// its task after the receiver's 200: a body that is not UTF-8 (the test above), an event
/// `type` or `id` longer than an AMQP short string (255 bytes). The delivery stayed unacked
/// and, after a reconnect, was acked as a duplicate: lost. The receiver refuses all three
/// now, so they are put into the inbox by hand, in the receiver's format: the worker
/// dead-letters each with its reason and the inbox keeps nothing, ready or unacked.
#[tokio::test]
async fn inbox_messages_the_worker_cannot_publish_are_dead_lettered_not_lost() {
    let relay = spawn_relay(Options::default()).await;
    let bodies: Vec<Vec<u8>> = vec![
        format!(r#"{{"id":"evt_1","created_at":1,"type":"something.{}","data":{{"id":"x_1"}}}}"#, "t".repeat(290)).into_bytes(),
        format!(r#"{{"id":"evt_{}","created_at":1,"type":"something.new","data":{{"id":"x_1"}}}}"#, "e".repeat(296)).into_bytes(),
        b"{\"id\":\"evt_1\",\"note\":\"caf\xe9\",\"created_at\":1,\"type\":\"something.new\",\"data\":{\"id\":\"x_1\"}}".to_vec(),
    ];
    let verifier = Verifier::new(Secret::parse_list(&secret_text()).unwrap(), 300);
    for body in &bodies {
        let (id, ts) = (webhook_id(), unix_now().to_string());
        let mut headers = HeaderMap::new();
        for (name, value) in [(HEADER_ID, id.clone()), (HEADER_TIMESTAMP, ts.clone()), (HEADER_SIGNATURE, sign_bytes(&id, &ts, body))] {
            headers.insert(name, HeaderValue::from_str(&value).unwrap());
        }
        let stored = verifier.verify(&headers, Bytes::from(body.clone()), unix_now()).expect("signed");
        let confirm = relay
            .amqp
            .channel
            .basic_publish("".into(), relay.topology.inbox.as_str().into(), BasicPublishOptions::default(), body, inbox::properties(&stored, None, None))
            .await
            .unwrap();
        confirm.await.unwrap();
    }

    let dead = relay.topology.dead();
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay.amqp.count(&dead).await < bodies.len() as u32 {
        assert!(Instant::now() < deadline, "not all dead-lettered: {} of {}", relay.amqp.count(&dead).await, bodies.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut dead_bodies = Vec::new();
    while let Some(letter) = relay.amqp.next(&dead, Duration::ZERO).await {
        assert_eq!(header(&letter.properties, HEADER_ERROR_REASON), Some("invalid_envelope"));
        dead_bodies.push(letter.data);
    }
    dead_bodies.sort();
    let mut sent = bodies.clone();
    sent.sort();
    assert_eq!(dead_bodies, sent, "each message dead-lettered once, as it was");

    // An unacked inbox message returns to ready when the worker's channel closes.
    relay.signal_stop();
    assert_eq!(relay.amqp.settled_count(&relay.topology.inbox).await, 0, "messages left in the inbox");
}

/// Slow uploads are read only under an in-flight permit, each for `RELAY_HEADER_TIMEOUT_SECS`
/// at most: with 2 permits, of 20 connections that each declare a 1 MiB body and send 64 KiB
/// of it, 18 are answered 503 at once with their bodies unread, 2 are read and cut off with 408
/// after the timeout. A signed delivery meanwhile gets 503 (OpenAI retries), then 200.
#[tokio::test]
async fn slow_uploads_hold_at_most_the_in_flight_permits_and_are_cut_off() {
    const UPLOADS: usize = 20;
    const PERMITS: usize = 2;
    let timeout = Duration::from_secs(3);
    let relay = spawn_relay(receiver().arg("--max-in-flight", PERMITS).arg("--header-timeout-secs", timeout.as_secs())).await;
    let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let upload = format!("POST /webhooks/openai HTTP/1.1\r\nhost: relay\r\ncontent-length: {}\r\n\r\n{}", 1024 * 1024, " ".repeat(64 * 1024));
    for _ in 0..UPLOADS {
        let (address, upload, answered) = (addr(&relay), upload.clone(), answered.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let status = exchange(&address, upload.as_bytes()).await;
            answered.send((status, started.elapsed())).unwrap();
        });
    }
    drop(answered); // an upload that panics (no answer within 5 s) ends the loops below

    let mut refused_in = Duration::ZERO;
    for _ in 0..UPLOADS - PERMITS {
        let (status, took) = answers.recv().await.expect("every upload is answered");
        assert_eq!(status, 503, "an upload over the in-flight limit");
        refused_in = refused_in.max(took);
    }
    assert!(refused_in < Duration::from_secs(1), "refusals took up to {refused_in:?}");
    let metrics = relay.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(&format!("relay_requests_in_flight {PERMITS}\n")), "{metrics}");
    // Sent on new connections: by the end, the client's pooled one has been idle for about
    // the header timeout, and the relay may be closing it just as it is reused.
    let (id, ts, sig, body) = signed(&relay);
    let lines = [format!("webhook-id: {id}"), format!("webhook-timestamp: {ts}"), format!("webhook-signature: {sig}")];
    let delivery = head(&lines.each_ref().map(|line| line.as_bytes()));
    let status = raw_request(&addr(&relay), &delivery, body.as_bytes()).await;
    assert_eq!(status, 503, "a signed delivery while slow uploads hold the permits");

    for _ in 0..PERMITS {
        let (status, took) = answers.recv().await.expect("every upload is answered");
        assert_eq!(status, 408, "a body not sent within the timeout");
        assert!(took >= timeout && took < timeout + Duration::from_secs(2), "cut off after {took:?}");
    }
    println!("slow uploads: {} refused with 503 within {refused_in:.1?}, {PERMITS} cut off with 408 after {timeout:?}", UPLOADS - PERMITS);
    assert_eq!(relay.amqp.count(&relay.topology.inbox).await, 0);
    let status = raw_request(&addr(&relay), &delivery, body.as_bytes()).await;
    assert_eq!(status, 200, "the same delivery, retried once the slow uploads are gone");
    assert_eq!(relay.amqp.count(&relay.topology.inbox).await, 1);
}

/// A body without a declared length (chunked) is cut off as soon as it passes the limit.
#[tokio::test]
async fn a_chunked_body_over_the_limit_gets_413() {
    let relay = spawn_relay(receiver().arg("--body-limit-bytes", 4096)).await;
    let chunk = "x".repeat(3000);
    let request = format!("POST /webhooks/openai HTTP/1.1\r\nhost: relay\r\ntransfer-encoding: chunked\r\n\r\nbb8\r\n{chunk}\r\nbb8\r\n{chunk}\r\n0\r\n\r\n");
    assert_eq!(exchange(&addr(&relay), request.as_bytes()).await, 413);
    assert_inbox(&relay, 0).await;
}

/// A captured delivery replayed byte for byte: inside the tolerance it verifies again and is
/// stored again (the receiver keeps no memory), and the worker's dedup publishes it once;
/// once the timestamp is older than the tolerance the same bytes get 401 and are not stored.
#[tokio::test]
async fn a_replayed_delivery_is_published_once_and_refused_after_the_window() {
    let relay = spawn_relay(Options { tolerance_secs: 1, ..Default::default() }).await;
    let queue = relay.bind("#").await;
    let (id, ts, sig, body) = signed(&relay);
    let (id, ts, sig) = (id.as_str(), ts.as_str(), sig.as_str());
    let headers = [("webhook-id", id), ("webhook-timestamp", ts), ("webhook-signature", sig)];
    assert_eq!(relay.post(&headers, body.as_bytes().to_vec()).await.status(), 200);
    assert_eq!(relay.post(&headers, body.as_bytes().to_vec()).await.status(), 200, "a replay inside the window is stored again");
    assert!(relay.amqp.next(&queue, Duration::from_secs(5)).await.is_some());
    assert!(relay.amqp.next(&queue, Duration::from_millis(1000)).await.is_none(), "the replay is not published again");
    let metrics = relay.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("relay_duplicates_total 1"), "{metrics}");

    // 1 s tolerance: wait until the timestamp is more than 1 s old.
    while unix_now() - ts.parse::<i64>().unwrap() <= 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let response = relay.post(&headers, body.as_bytes().to_vec()).await;
    assert_eq!(response.status(), 401, "a replay after the window");
    assert!(relay.amqp.next(&queue, Duration::from_millis(500)).await.is_none());
    assert_inbox(&relay, 0).await;
}

#[tokio::test]
async fn huge_headers_get_a_4xx_and_the_relay_stays_up() {
    let relay = spawn_relay(receiver()).await;
    let (id, ts, sig, body) = signed(&relay);
    let address = addr(&relay);
    let id_line = format!("webhook-id: {id}").into_bytes();
    let ts_line = format!("webhook-timestamp: {ts}").into_bytes();
    let sig_line = format!("webhook-signature: {sig}").into_bytes();

    // 100 KB of signature: under hyper's head limit (~400 KB), so it reaches the verifier.
    let big_sig = format!("webhook-signature: v1,{}", "A".repeat(100 * 1024)).into_bytes();
    let status = raw_request(&address, &head(&[&id_line, &ts_line, &big_sig]), body.as_bytes()).await;
    assert_eq!(status, 401, "100 KB signature");
    // 100 KB id: longer than the inbox's `message_id` can hold, refused as malformed.
    let big_id = format!("webhook-id: wh_{}", "x".repeat(100 * 1024)).into_bytes();
    let status = raw_request(&address, &head(&[&big_id, &ts_line, &sig_line]), body.as_bytes()).await;
    assert_eq!(status, 400, "100 KB id");
    // 1 MB in one header, or a head past the limit in many: hyper refuses it before any handler.
    let huge_sig = format!("webhook-signature: v1,{}", "A".repeat(1024 * 1024)).into_bytes();
    let status = raw_request(&address, &head(&[&id_line, &ts_line, &huge_sig]), body.as_bytes()).await;
    assert_eq!(status, 431, "1 MB signature");
    let filler: Vec<Vec<u8>> = (0..90).map(|i| format!("x-filler-{i}: {}", "f".repeat(8 * 1024)).into_bytes()).collect();
    let mut lines: Vec<&[u8]> = filler.iter().map(Vec::as_slice).collect();
    lines.extend([id_line.as_slice(), ts_line.as_slice(), sig_line.as_slice()]);
    assert_eq!(raw_request(&address, &head(&lines), body.as_bytes()).await, 431, "720 KB of headers");
    // More header lines than hyper's default maximum (100).
    let many: Vec<Vec<u8>> = (0..200).map(|i| format!("x-h{i}: 1").into_bytes()).collect();
    let mut lines: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
    lines.extend([id_line.as_slice(), ts_line.as_slice(), sig_line.as_slice()]);
    let status = raw_request(&address, &head(&lines), body.as_bytes()).await;
    assert!((400..500).contains(&status), "200 header lines: {status}");
    println!("huge headers: 100 KB signature → 401, 100 KB id → 400, 1 MB signature → 431, 720 KB in 90 headers → 431, 200 header lines → {status}");

    assert_inbox(&relay, 0).await;
    let real = webhook_id();
    assert_eq!(relay.deliver_as(&real, &body).await.status(), 200, "still accepts a real delivery");
    assert_stored(&relay, &[real.as_str()]).await;
}

#[tokio::test]
async fn a_thousand_signatures_are_checked_quickly() {
    let relay = spawn_relay(receiver()).await;
    let (id, ts, sig, body) = signed(&relay);
    let junk: Vec<String> = (0..1000).map(|_| format!("v1,{}", base64_of_random(32))).collect();
    let list = junk.join(" ");

    let started = Instant::now();
    let response = relay.post(&[("webhook-id", &id), ("webhook-timestamp", &ts), ("webhook-signature", &list)], body.as_bytes().to_vec()).await;
    let refused_in = started.elapsed();
    assert_eq!(response.status(), 401);
    assert_inbox(&relay, 0).await;

    // Only the first MAX_SIGNATURES entries are tried: the good one last is not reached...
    let with_good = format!("{list} {sig}");
    let response = relay.post(&[("webhook-id", &id), ("webhook-timestamp", &ts), ("webhook-signature", &with_good)], body.as_bytes().to_vec()).await;
    assert_eq!(response.status(), 401);
    // ... among the first ones it is.
    let max = openai_webhook_relay::verify::MAX_SIGNATURES;
    let early = format!("{} {sig} {}", junk[..max - 1].join(" "), junk[max..].join(" "));
    let started = Instant::now();
    let response = relay.post(&[("webhook-id", &id), ("webhook-timestamp", &ts), ("webhook-signature", &early)], body.as_bytes().to_vec()).await;
    let accepted_in = started.elapsed();
    assert_eq!(response.status(), 200);
    assert_stored(&relay, &[id.as_str()]).await;

    // The most entries a head can carry (~8 400 decodable ones in ~400 KB).
    let most: Vec<String> = (0..8_400).map(|_| format!("v1,{}", base64_of_random(32))).collect();
    let most = most.join(" ");
    let started = Instant::now();
    let response = relay.post(&[("webhook-id", &id), ("webhook-timestamp", &ts), ("webhook-signature", &most)], body.as_bytes().to_vec()).await;
    let most_in = started.elapsed();
    assert_eq!(response.status(), 401);
    println!(
        "signature lists: 1000 wrong → 401 in {refused_in:.1?}; 1000 entries with a good one among the first {max} → 200 in {accepted_in:.1?}; {} wrong ({} KB) → 401 in {most_in:.1?}",
        8_400,
        most.len() / 1024
    );
    assert!(refused_in < Duration::from_secs(1), "1000 signatures took {refused_in:?}");
    assert!(most_in < Duration::from_secs(2), "8400 signatures took {most_in:?}");
    assert_stored(&relay, &[]).await;
}

fn base64_of_random(n: usize) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode((0..n).map(|_| fastrand::u8(..)).collect::<Vec<u8>>())
}

/// The soft limit on open files of this process (Linux), if readable.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// How many TCP connections to its `port` the process `pid` holds: established ones in
/// /proc/net/tcp whose socket is among the process's descriptors.
fn connections_held(pid: u32, port: u16) -> usize {
    let sockets: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| Some(link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned()))
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.len() > 9 && fields[3] == "01" && sockets.contains(fields[9]))
        .filter(|fields| fields[1].rsplit(':').next().and_then(|hex| u16::from_str_radix(hex, 16).ok()) == Some(port))
        .count()
}

/// Kills the child relay when the test ends, passed or not.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_do_not_keep_a_signed_delivery_out() {
    use crate::fake_openai::FakeOpenAi;
    use crate::helpers::{Amqp, Cleanup, eventually, terminate, unique_topology};
    use crate::operations::{free_port, spawn_binary};

    const WANTED: usize = 10_000;
    // This process holds the client ends, the relay (inheriting the limit) the server ends.
    let limit = open_files_limit().unwrap_or(1024);
    let idle = WANTED.min(limit.saturating_sub(1_500));
    if idle < WANTED {
        println!("open-files limit {limit}: holding {idle} idle connections instead of {WANTED} (raise `ulimit -n` for the full test)");
    }

    let openai = FakeOpenAi::start().await.unwrap();
    let topology = unique_topology();
    let _cleanup = Cleanup::topology(&topology);
    let port = free_port();
    let mut child = Child(spawn_binary(&openai, &topology, port, &[]));
    let base = format!("http://127.0.0.1:{port}");
    // No pooled keep-alive connection, so the relay's descriptor count is only the idle ones.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16()).ok() != Some(200) {
        assert!(Instant::now() < deadline, "binary never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let amqp = Amqp::connect().await;
    let queue = amqp.bind(&topology.exchange, "#").await;
    let pid = child.0.id();
    let relay_fds = move || std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    // The readiness checks' connections are closed on this side; once the relay has closed
    // its ends too, its descriptors are the baseline.
    eventually(Duration::from_secs(5), "the relay closes the readiness checks' connections", async || (connections_held(pid, port) == 0).then_some(())).await;
    let baseline = relay_fds();

    // Open the idle connections, send nothing. In bursts of 100, each time letting the relay
    // accept them: its listen backlog is 128 (mio's default), and a fuller accept queue drops
    // SYNs, which clients resend only after 1 s.
    let opening = Instant::now();
    let address = format!("127.0.0.1:{port}");
    let mut streams = Vec::with_capacity(idle);
    while streams.len() < idle {
        let batch = (idle - streams.len()).min(100);
        let connects = (0..batch).map(|_| TcpStream::connect(&address));
        for stream in futures::future::join_all(connects).await {
            streams.push(stream.expect("connect"));
        }
        let accepted_by = Instant::now() + Duration::from_secs(2);
        while relay_fds() < baseline + streams.len() && Instant::now() < accepted_by {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let opened_in = opening.elapsed();
    let held = relay_fds().saturating_sub(baseline);

    // A signed delivery on a fresh connection, and /healthz, while they are held.
    let body = event("something.new", "x_1");
    let id = webhook_id();
    let ts = unix_now().to_string();
    let sig = sign_bytes(&id, &ts, body.as_bytes());
    let fresh = crate::helpers::http_client();
    let started = Instant::now();
    let response = fresh
        .post(format!("{base}/webhooks/openai"))
        .header("webhook-id", &id)
        .header("webhook-timestamp", &ts)
        .header("webhook-signature", &sig)
        .body(body)
        .send()
        .await
        .unwrap();
    let latency = started.elapsed();
    assert_eq!(response.status(), 200);
    assert_eq!(fresh.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);

    // The idle connections were held open all along, not shed.
    let mut buf = [0u8; 1];
    let still_open = streams.iter().filter(|s| matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)).count();
    println!(
        "idle connections: {idle} opened in {opened_in:.1?}, relay held {held} more descriptors, {still_open} still open; \
         signed delivery on a fresh connection: 200 in {latency:.1?}"
    );
    assert!(held >= idle, "the relay holds {held} of {idle} connections");
    assert_eq!(still_open, idle, "idle connections closed by the relay");
    drop(streams);

    // Exactly the one signed delivery came through (the worker of the same binary publishes it).
    let published = amqp.next(&queue, Duration::from_secs(5)).await.expect("the signed delivery is published");
    assert_eq!(openai_webhook_relay::inbox::header(&published.properties, "webhook-id"), Some(id.as_str()));
    assert!(amqp.next(&queue, Duration::from_millis(300)).await.is_none(), "nothing else was published");
    assert!(terminate(&mut child.0, Duration::from_secs(15)).await.success());
    assert_eq!(amqp.left_over(&topology).await, Vec::<String>::new(), "the delivery was acked");
}
