//! A fetched object's metadata on the output message: headers `openai-metadata-<key>`, which
//! a headers exchange bound to the topic exchange routes by (the README's example binding).

use std::time::Duration;

use lapin::ExchangeKind;
use lapin::options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use openai_webhook_relay::inbox::header;

use crate::fake_openai::Scripted;
use crate::helpers::{Options, event, spawn_relay};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn metadata_becomes_headers_that_a_headers_exchange_routes_by() {
    let relay = spawn_relay(Options::default()).await;
    let channel = &relay.amqp.channel;
    // Gone with its last queue binding, so with this test's connection.
    let by_metadata = format!("{}.by-metadata", relay.topology.exchange);
    let auto_delete = ExchangeDeclareOptions { auto_delete: true, ..Default::default() };
    channel.exchange_declare(by_metadata.as_str().into(), ExchangeKind::Headers, auto_delete, FieldTable::default()).await.unwrap();
    channel
        .exchange_bind(by_metadata.as_str().into(), relay.topology.exchange.as_str().into(), "response.*".into(), ExchangeBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let bind_where = async |pairs: &[(&str, &str)]| {
        let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let queue = channel.queue_declare("".into(), exclusive, FieldTable::default()).await.unwrap().name().to_string();
        let mut arguments = FieldTable::default();
        for (key, value) in pairs {
            arguments.insert((*key).into(), AMQPValue::LongString((*value).into()));
        }
        channel.queue_bind(queue.as_str().into(), by_metadata.as_str().into(), "".into(), QueueBindOptions::default(), arguments).await.unwrap();
        queue
    };
    let acme = bind_where(&[("x-match", "all"), ("openai-metadata-tenant", "acme"), ("openai-metadata-Cost.Center", "7")]).await;
    let globex = bind_where(&[("x-match", "any"), ("openai-metadata-tenant", "globex")]).await;
    let everything = relay.bind("#").await;

    let metadata = r#"{"tenant": "acme", "Cost.Center": "7", "priority": 1, "note": null}"#;
    let with = format!(r#"{{"id":"resp_meta","object":"response","status":"completed","output":[],"metadata":{metadata}}}"#);
    relay.openai.always("resp_meta", Scripted::status(200).body(&with));
    relay.openai.always("resp_plain", Scripted::completed("resp_plain"));
    for id in ["resp_meta", "resp_plain"] {
        assert_eq!(relay.deliver(&event("response.completed", id)).await.status(), 200);
    }
    // Both published (the topic queue has them) before the headers queues are looked at.
    for _ in 0..2 {
        relay.amqp.next(&everything, WAIT).await.expect("both events published");
    }

    let routed = relay.amqp.next(&acme, WAIT).await.expect("the headers exchange routes the event with the matching metadata");
    let properties = &routed.properties;
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&routed.data).unwrap()["subject"], "resp_meta");
    assert_eq!(header(properties, "openai-metadata-tenant"), Some("acme"));
    assert_eq!(header(properties, "openai-metadata-Cost.Center"), Some("7"), "keys as given");
    let names: Vec<String> = properties.headers().as_ref().unwrap().inner().keys().map(|k| k.to_string()).filter(|k| k.starts_with("openai-metadata-")).collect();
    assert_eq!(names, ["openai-metadata-Cost.Center", "openai-metadata-tenant"], "string values only");
    assert!(relay.amqp.next(&acme, Duration::ZERO).await.is_none(), "the event without metadata is not routed there");
    assert!(relay.amqp.next(&globex, Duration::ZERO).await.is_none(), "nor is anything to another tenant's binding");
}
