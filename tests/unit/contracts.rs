//! The contracts in `schemas/` agree with the code (contract §3-§5).
//!
//! - Inbound: every example under `schemas/examples/<Message>/valid` passes its
//!   JSON Schema and `inbound::decode`, to the same command; every example
//!   under `invalid` fails both. The few inputs where JSON Schema and the
//!   decoder disagree are listed in [`DIVERGENCES`], and the test checks that
//!   they still diverge exactly as written there.
//! - Outbound: the records `outbox::event_record` builds carry payloads that
//!   pass the event's schema, the SKU as key, and exactly the headers that
//!   `asyncapi.yaml` requires (plus `traceparent` when there was one); dead
//!   letters carry the `dlq.*` headers it lists, with the reasons it lists.
//! - `asyncapi.yaml` parses, every `$ref` in it resolves (to a file in
//!   `schemas/` or inside the document), its channels are the default topics of
//!   the command line, and every schema file is used by one of its messages.
//!
//! String lengths: JSON Schema's `maxLength` counts Unicode code points, as
//! the domain names' `parse` does (`chars().count()`), so the 255-character
//! limit agrees on multi-byte text too (examples `*-multibyte.json`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use allocation_worker::adapters::inbound::{decode, DecodeError, InboundKind};
use allocation_worker::adapters::inbound::{InboundMessage, MessageContext};
use allocation_worker::adapters::outbox::{
    dead_letter_record, event_record, wire_headers, OutboxKind, OutboxRecord, CE_SOURCE,
};
use allocation_worker::domain::events::{Allocated, Deallocated, OutOfStock};
use allocation_worker::domain::{BatchRef, Command, Event, OrderId, Sku};
use allocation_worker::entrypoints::cli::Cli;
use allocation_worker::service_layer::DeadLetterReason;
use clap::CommandFactory;
use jsonschema::Validator;
use serde_json::{json, Map, Value};

const INBOUND: [(&str, InboundKind); 3] = [
    ("BatchCreated", InboundKind::BatchCreated),
    ("BatchQuantityChanged", InboundKind::BatchQuantityChanged),
    ("AllocationRequired", InboundKind::AllocationRequired),
];

const OUTBOUND: [(&str, OutboxKind); 3] = [
    ("Allocated", OutboxKind::Allocated),
    ("Deallocated", OutboxKind::Deallocated),
    ("OutOfStock", OutboxKind::OutOfStock),
];

/// Each topic flag of `allocation-worker run`, the channel of `asyncapi.yaml`
/// whose address is its default, and the message on that channel.
const TOPICS: [(&str, &str, &str); 7] = [
    ("topic-batch-created", "batchCreated", "BatchCreated"),
    (
        "topic-batch-quantity-changed",
        "batchQuantityChanged",
        "BatchQuantityChanged",
    ),
    (
        "topic-allocation-required",
        "allocationRequired",
        "AllocationRequired",
    ),
    ("topic-allocated", "allocated", "Allocated"),
    ("topic-deallocated", "deallocated", "Deallocated"),
    ("topic-out-of-stock", "outOfStock", "OutOfStock"),
    ("topic-dead-letter", "deadLetter", "DeadLetter"),
];

/// Invalid examples that the schema accepts and the decoder rejects
/// (`invalid-message`), and why: JSON Schema cannot say it. Each must still
/// diverge as written: when one stops, remove it. The other way round (the
/// decoder more lenient than the contract) is never listed: it is a fix in
/// `src/adapters/inbound.rs`, as the `eta` leniencies this test found were.
const DIVERGENCES: &[(&str, &str)] = &[
    (
        "BatchCreated/invalid/qty-integral-float.json",
        "JSON Schema's `integer` is any number with no fractional part, so 20.0 is \
         one; the decoder takes only integer literals (serde_json reads 20.0 as a \
         float). No schema keyword sees how a number was written.",
    ),
    (
        "AllocationRequired/invalid/qty-exponent.json",
        "1e2 is the integer 100 to JSON Schema and a float to serde_json; as above.",
    ),
];

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn asyncapi() -> Value {
    let path = schemas_dir().join("asyncapi.yaml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A validator that asserts `format` (date, date-time, uuid), as the schemas'
/// descriptions promise.
fn validator(schema: &Value) -> Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
        .unwrap_or_else(|e| panic!("schema does not compile: {e}\n{schema:#}"))
}

fn schema_validator(message: &str) -> Validator {
    let path = schemas_dir().join(format!("{message}.schema.json"));
    let schema = read_json(&path);
    if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
        panic!("{} is not a draft 2020-12 schema: {e}", path.display());
    }
    validator(&schema)
}

fn schema_errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

struct Example {
    /// Relative to `schemas/examples`, with `/` separators.
    name: String,
    bytes: Vec<u8>,
    value: Value,
}

fn examples(message: &str, verdict: &str) -> Vec<Example> {
    let dir = schemas_dir().join("examples").join(message).join(verdict);
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    let examples: Vec<Example> = paths
        .into_iter()
        .map(|path| {
            assert_eq!(
                path.extension().and_then(|e| e.to_str()),
                Some("json"),
                "{}: examples are .json files",
                path.display()
            );
            let file = path.file_name().unwrap().to_str().unwrap();
            Example {
                name: format!("{message}/{verdict}/{file}"),
                bytes: fs::read(&path).unwrap(),
                value: read_json(&path),
            }
        })
        .collect();
    assert!(!examples.is_empty(), "{}: no examples", dir.display());
    examples
}

fn diverges(example: &str) -> bool {
    DIVERGENCES.iter().any(|(name, _)| *name == example)
}

/// The decoded command, as the JSON it was read from (aliases resolved,
/// absent `eta` as null), to compare with the example.
fn command_json(command: &Command) -> Value {
    match command {
        Command::CreateBatch(c) => json!({
            "ref": c.reference.as_str(),
            "sku": c.sku.as_str(),
            "qty": c.qty,
            "eta": c.eta.map(|d| d.format("%Y-%m-%d").to_string()),
        }),
        Command::ChangeBatchQuantity(c) => json!({"ref": c.reference.as_str(), "qty": c.qty}),
        Command::Allocate(c) => json!({
            "orderid": c.orderid.as_str(),
            "sku": c.sku.as_str(),
            "qty": c.qty,
        }),
    }
}

/// The fields of an inbound example that the command must carry.
fn expected_command_json(kind: InboundKind, example: &Value) -> Value {
    let field = |name: &str| example.get(name).cloned().unwrap_or(Value::Null);
    match kind {
        InboundKind::BatchCreated => json!({
            "ref": field("ref"), "sku": field("sku"), "qty": field("qty"), "eta": field("eta"),
        }),
        InboundKind::BatchQuantityChanged => {
            let reference = example.get("ref").or_else(|| example.get("batchref"));
            json!({"ref": reference, "qty": field("qty")})
        }
        InboundKind::AllocationRequired => json!({
            "orderid": field("orderid"), "sku": field("sku"), "qty": field("qty"),
        }),
    }
}

#[test]
fn valid_inbound_examples_pass_the_schema_and_decode_to_the_same_command() {
    for (message, kind) in INBOUND {
        let validator = schema_validator(message);
        for example in examples(message, "valid") {
            let errors = schema_errors(&validator, &example.value);
            assert!(
                errors.is_empty(),
                "{}: schema says {errors:?}",
                example.name
            );
            let command = decode(kind, Some(&example.bytes))
                .unwrap_or_else(|e| panic!("{}: decode says {e}", example.name));
            assert_eq!(
                command_json(&command),
                expected_command_json(kind, &example.value),
                "{}",
                example.name
            );
        }
    }
}

#[test]
fn invalid_inbound_examples_fail_the_schema_and_decode() {
    for (message, kind) in INBOUND {
        let validator = schema_validator(message);
        for example in examples(message, "invalid") {
            let schema_accepts = validator.is_valid(&example.value);
            let decoded = decode(kind, Some(&example.bytes));
            // Every example is JSON, so the decoder must call it invalid, not malformed.
            assert!(
                matches!(decoded, Ok(_) | Err(DecodeError::Invalid(_))),
                "{}: {decoded:?}",
                example.name
            );
            assert!(decoded.is_err(), "{}: decodes to {decoded:?}", example.name);
            assert_eq!(
                schema_accepts,
                diverges(&example.name),
                "{}: the schema {} it, and DIVERGENCES says otherwise; update the list",
                example.name,
                if schema_accepts { "accepts" } else { "rejects" }
            );
        }
    }
}

#[test]
fn outbound_examples_are_what_event_record_builds() {
    let context = MessageContext {
        idempotency_key: "erp.allocation-required/0/42".to_owned(),
        traceparent: None,
        tracestate: None,
    };
    for (message, _) in OUTBOUND {
        let validator = schema_validator(message);
        for example in examples(message, "valid") {
            let errors = schema_errors(&validator, &example.value);
            assert!(
                errors.is_empty(),
                "{}: schema says {errors:?}",
                example.name
            );
            let event = event_from_json(message, &example.value);
            let record = event_record(&event, &context, 0);
            assert_eq!(payload(&record), example.value, "{}", example.name);
        }
        for example in examples(message, "invalid") {
            assert!(
                !validator.is_valid(&example.value),
                "{}: the schema accepts it",
                example.name
            );
        }
    }
}

fn event_from_json(message: &str, value: &Value) -> Event {
    let text = |name: &str| {
        value[name]
            .as_str()
            .unwrap_or_else(|| panic!("{name} in {value}"))
            .to_owned()
    };
    let orderid = OrderId::parse(text("orderid")).unwrap();
    let sku = Sku::parse(text("sku")).unwrap();
    let qty = u32::try_from(value["qty"].as_u64().unwrap()).unwrap();
    match message {
        "Allocated" => Event::Allocated(Allocated {
            orderid,
            sku,
            qty,
            batchref: BatchRef::parse(text("batchref")).unwrap(),
        }),
        "Deallocated" => Event::Deallocated(Deallocated { orderid, sku, qty }),
        "OutOfStock" => Event::OutOfStock(OutOfStock { sku, orderid, qty }),
        other => panic!("no event {other}"),
    }
}

fn sample_events() -> Vec<Event> {
    let orderid = OrderId::parse("order-001").unwrap();
    let sku = Sku::parse("SMALL-TABLE").unwrap();
    vec![
        Event::Allocated(Allocated {
            orderid: orderid.clone(),
            sku: sku.clone(),
            qty: 3,
            batchref: BatchRef::parse("batch-001").unwrap(),
        }),
        Event::Deallocated(Deallocated {
            orderid: orderid.clone(),
            sku: sku.clone(),
            qty: 3,
        }),
        Event::OutOfStock(OutOfStock {
            sku,
            orderid,
            qty: 3,
        }),
    ]
}

fn payload(record: &OutboxRecord) -> Value {
    serde_json::from_slice(record.payload.as_deref().expect("a payload")).expect("JSON payload")
}

/// The headers a record is published with, as the relay sends them.
fn published_headers(record: &OutboxRecord) -> Vec<(String, Vec<u8>)> {
    let stored = record
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    wire_headers(record.kind, stored)
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.to_vec()))
        .collect()
}

fn header_names(headers: &[(String, Vec<u8>)]) -> BTreeSet<String> {
    let names: BTreeSet<String> = headers.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names.len(), headers.len(), "a header repeats: {headers:?}");
    names
}

fn headers_json(headers: &[(String, Vec<u8>)]) -> Value {
    let map: Map<String, Value> = headers
        .iter()
        .map(|(n, v)| {
            let text = String::from_utf8(v.clone()).unwrap_or_else(|_| panic!("{n} is not UTF-8"));
            (n.clone(), Value::String(text))
        })
        .collect();
    Value::Object(map)
}

#[test]
fn event_records_match_the_schemas_and_the_asyncapi_headers() {
    let doc = asyncapi();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for event in sample_events() {
        let message = event.name();
        let (_, kind) = OUTBOUND.iter().find(|(m, _)| *m == message).unwrap();
        let spec = &doc["components"]["messages"][message];
        assert!(spec.is_object(), "asyncapi.yaml has no message {message}");
        let headers_schema = inline_local_refs(&doc, &spec["headers"]);
        let (required, declared) = header_sets(&headers_schema);
        let headers_validator = validator(&headers_schema);
        let key_validator = validator(&inline_local_refs(&doc, &spec["bindings"]["kafka"]["key"]));
        let payload_validator = schema_validator(message);

        for traceparent in [None, Some(traceparent)] {
            let context = MessageContext {
                idempotency_key: "ce_id:erp-message-7".to_owned(),
                traceparent: traceparent.map(|t| t.as_bytes().to_vec()),
                tracestate: None,
            };
            let record = event_record(&event, &context, 2);
            assert_eq!(record.kind, *kind);
            let wire = published_headers(&record);

            let value = payload(&record);
            let errors = schema_errors(&payload_validator, &value);
            assert!(errors.is_empty(), "{message}: {value} {errors:?}");

            let key = String::from_utf8(record.key.clone().expect("a key")).unwrap();
            assert_eq!(key, event.sku().as_str(), "{message}: the key is the SKU");
            assert_eq!(value["sku"], json!(key));
            assert!(key_validator.is_valid(&json!(key)));

            let names = header_names(&wire);
            let mut expected = required.clone();
            if traceparent.is_some() {
                assert!(declared.contains("traceparent"));
                assert!(!required.contains("traceparent"));
                expected.insert("traceparent".to_owned());
            }
            assert_eq!(names, expected, "{message}: headers");
            let headers = headers_json(&wire);
            let errors = schema_errors(&headers_validator, &headers);
            assert!(errors.is_empty(), "{message}: {headers} {errors:?}");
            assert_eq!(headers["ce_type"], json!(format!("allocation.{message}")));
            assert_eq!(headers["ce_source"], json!(CE_SOURCE));
            if let Some(traceparent) = traceparent {
                assert_eq!(headers["traceparent"], json!(traceparent));
            }
        }

        // The schema's promise about ce_id: stable for the same decision,
        // distinct for another.
        let context = MessageContext {
            idempotency_key: "erp.batch-quantity-changed/1/9".to_owned(),
            traceparent: None,
            tracestate: None,
        };
        let ce_id = |position| {
            let record = event_record(&event, &context, position);
            headers_json(&record.headers)["ce_id"].clone()
        };
        assert_eq!(ce_id(0), ce_id(0));
        assert_ne!(ce_id(0), ce_id(1));
    }
}

/// Every reason the code can give; a new variant fails to compile here.
fn all_reasons() -> Vec<DeadLetterReason> {
    use DeadLetterReason::*;
    let all = vec![
        MalformedJson,
        InvalidMessage,
        UnknownSku,
        UnknownBatch,
        DuplicateBatch,
        DuplicateLine,
        UnknownTopic,
    ];
    for reason in &all {
        match reason {
            MalformedJson | InvalidMessage | UnknownSku | UnknownBatch | DuplicateBatch
            | DuplicateLine | UnknownTopic => {}
        }
    }
    all
}

#[test]
fn dead_letters_carry_the_asyncapi_headers_and_reasons() {
    let doc = asyncapi();
    let spec = &doc["components"]["messages"]["DeadLetter"];
    let headers_schema = inline_local_refs(&doc, &spec["headers"]);
    let (required, declared) = header_sets(&headers_schema);
    let headers_validator = validator(&headers_schema);

    let listed: BTreeSet<&str> = headers_schema["properties"]["dlq.reason"]["enum"]
        .as_array()
        .expect("dlq.reason has an enum")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let reasons = all_reasons();
    let coded: BTreeSet<&str> = reasons.iter().map(|r| r.as_str()).collect();
    assert_eq!(listed, coded, "dlq.reason in asyncapi.yaml");
    assert_eq!(coded.len(), 7);

    let message = InboundMessage {
        topic: "erp.allocation-required".to_owned(),
        partition: 3,
        offset: 1234,
        key: Some(b"SMALL-TABLE".to_vec()),
        payload: Some(br#"{"orderid":"o1","sku":"SMALL-TABLE","qty":0}"#.to_vec()),
        headers: vec![
            ("ce_id".to_owned(), Some(b"erp-42".to_vec())),
            ("x-erp-null".to_owned(), None),
        ],
    };
    for reason in reasons {
        let record = dead_letter_record(&message, reason, "qty 0 is less than 1");
        assert_eq!(record.kind, OutboxKind::DeadLetter);
        assert_eq!(record.key, message.key);
        assert_eq!(record.payload, message.payload);

        let wire = published_headers(&record);
        assert_eq!(wire, record.headers, "a dead letter goes as stored");
        let names = header_names(&wire);
        let original: BTreeSet<String> = message.headers.iter().map(|(n, _)| n.clone()).collect();
        let expected: BTreeSet<String> = original.union(&required).cloned().collect();
        assert_eq!(names, expected, "{reason:?}: headers");
        for name in names.difference(&original) {
            assert!(declared.contains(name), "{name} is not in asyncapi.yaml");
        }
        let headers = headers_json(&record.headers);
        let errors = schema_errors(&headers_validator, &headers);
        assert!(errors.is_empty(), "{reason:?}: {headers} {errors:?}");
        assert_eq!(headers["dlq.reason"], json!(reason.as_str()));
        assert_eq!(headers["dlq.original.topic"], json!(message.topic));
        assert_eq!(headers["dlq.original.partition"], json!("3"));
        assert_eq!(headers["dlq.original.offset"], json!("1234"));
        assert_eq!(headers["x-erp-null"], json!(""));
    }
}

/// `required` and `properties` names of a headers schema, through `allOf`.
fn header_sets(schema: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut required = BTreeSet::new();
    let mut declared = BTreeSet::new();
    let mut parts = vec![schema];
    if let Some(all_of) = schema["allOf"].as_array() {
        parts.extend(all_of);
    }
    for part in parts {
        if let Some(names) = part["required"].as_array() {
            required.extend(names.iter().map(|n| n.as_str().unwrap().to_owned()));
        }
        if let Some(properties) = part["properties"].as_object() {
            declared.extend(properties.keys().cloned());
        }
    }
    assert!(
        required.is_subset(&declared),
        "required headers not declared: {required:?} {declared:?}"
    );
    (required, declared)
}

/// `value` with every `{"$ref": "#/..."}` replaced by what it points to.
fn inline_local_refs(doc: &Value, value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                let pointer = reference
                    .strip_prefix('#')
                    .unwrap_or_else(|| panic!("not a local $ref: {reference}"));
                let target = doc
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("$ref {reference} points nowhere"));
                return inline_local_refs(doc, target);
            }
            Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), inline_local_refs(doc, v)))
                    .collect(),
            )
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| inline_local_refs(doc, v)).collect())
        }
        other => other.clone(),
    }
}

/// Every `$ref` string in `value`.
fn refs(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(reference)) => found.push(reference.clone()),
                    _ => refs(v, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
        _ => {}
    }
}

/// Resolves `reference` from a document in `schemas/`: a file of `schemas/`
/// (relative path), optionally with a fragment, or a fragment of `doc`.
/// Returns the file it names, if any.
fn resolve(doc: &Value, reference: &str) -> Option<String> {
    let (file, fragment) = reference.split_once('#').unwrap_or((reference, ""));
    if file.is_empty() {
        assert!(
            doc.pointer(fragment).is_some(),
            "$ref {reference} points nowhere"
        );
        return None;
    }
    assert!(
        !file.contains("://") && !file.starts_with('/'),
        "$ref {reference} leaves schemas/"
    );
    let dir = schemas_dir().canonicalize().unwrap();
    let path = dir.join(file);
    let path = path
        .canonicalize()
        .unwrap_or_else(|e| panic!("$ref {reference}: {}: {e}", path.display()));
    assert!(path.starts_with(&dir), "$ref {reference} leaves schemas/");
    let target = read_json(&path);
    assert!(
        target.pointer(fragment).is_some(),
        "$ref {reference}: no {fragment} in the file"
    );
    Some(
        path.strip_prefix(&dir)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned(),
    )
}

#[test]
fn asyncapi_document_is_whole_and_names_the_default_topics() {
    let doc = asyncapi();
    assert_eq!(doc["asyncapi"], json!("3.0.0"));

    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(!found.is_empty());
    let files: BTreeSet<String> = found.iter().filter_map(|r| resolve(&doc, r)).collect();

    // Every schema file is used, and every one's own $refs resolve in it.
    let mut schema_files = BTreeSet::new();
    for entry in fs::read_dir(schemas_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.ends_with(".schema.json") {
            let schema = read_json(&path);
            let mut inner = Vec::new();
            refs(&schema, &mut inner);
            for reference in inner {
                assert!(reference.starts_with('#'), "{name}: $ref {reference}");
                assert!(resolve(&schema, &reference).is_none());
            }
            schema_files.insert(name);
        }
    }
    assert_eq!(files, schema_files, "schema files used by asyncapi.yaml");

    // The channels are the command line's default topics, with their messages.
    let cli = Cli::command();
    let run = cli.find_subcommand("run").expect("a run subcommand");
    let mut flags = BTreeMap::new();
    for arg in run.get_arguments() {
        if let Some(long) = arg.get_long().filter(|l| l.starts_with("topic-")) {
            let default = arg.get_default_values();
            assert_eq!(default.len(), 1, "--{long} has one default");
            let env = arg.get_env().map(|e| e.to_str().unwrap().to_owned());
            flags.insert(
                long.to_owned(),
                (default[0].to_str().unwrap().to_owned(), env),
            );
        }
    }
    let expected_flags: BTreeSet<&str> = TOPICS.iter().map(|(flag, _, _)| *flag).collect();
    assert_eq!(
        flags.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        expected_flags,
        "topic flags of `allocation-worker run`"
    );
    let channels = doc["channels"].as_object().expect("channels");
    assert_eq!(channels.len(), TOPICS.len(), "one channel per topic");
    for (flag, channel, message) in TOPICS {
        let (default, env) = &flags[flag];
        let spec = &doc["channels"][channel];
        assert_eq!(spec["address"], json!(default), "channel {channel}");
        let description = spec["description"].as_str().unwrap_or_default();
        if let Some(env) = env {
            assert!(description.contains(env.as_str()), "{channel} names {env}");
        }
        let messages = spec["messages"].as_object().expect("messages");
        assert_eq!(
            messages.keys().collect::<Vec<_>>(),
            [message],
            "channel {channel}"
        );
        assert_eq!(
            messages[message]["$ref"],
            json!(format!("#/components/messages/{message}"))
        );
        let message_spec = &doc["components"]["messages"][message];
        assert_eq!(message_spec["name"], json!(message));
        if message != "DeadLetter" {
            assert_eq!(
                message_spec["payload"]["$ref"],
                json!(format!("./{message}.schema.json"))
            );
            assert_eq!(message_spec["contentType"], json!("application/json"));
        }

        // One operation per channel: the worker receives ERP topics and
        // sends the others.
        let operations: Vec<&Value> = doc["operations"]
            .as_object()
            .expect("operations")
            .values()
            .filter(|op| op["channel"]["$ref"] == json!(format!("#/channels/{channel}")))
            .collect();
        assert_eq!(operations.len(), 1, "operations on {channel}");
        let inbound = INBOUND.iter().any(|(m, _)| *m == message);
        let action = if inbound { "receive" } else { "send" };
        assert_eq!(operations[0]["action"], json!(action), "{channel}");
    }

    // Every inline schema of the document compiles.
    let components = inline_local_refs(&doc, &doc["components"]["schemas"]);
    for (name, schema) in components.as_object().unwrap() {
        validator(schema);
        assert!(
            jsonschema::draft202012::meta::is_valid(schema),
            "components.schemas.{name}"
        );
    }
}

#[test]
fn every_schema_has_valid_and_invalid_examples() {
    let dir = schemas_dir().join("examples");
    let listed: BTreeSet<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().to_owned())
        .collect();
    let messages: BTreeSet<String> = INBOUND
        .iter()
        .map(|(m, _)| *m)
        .chain(OUTBOUND.iter().map(|(m, _)| *m))
        .map(str::to_owned)
        .collect();
    assert_eq!(listed, messages, "folders of schemas/examples");
    for message in &messages {
        let verdicts: BTreeSet<String> = fs::read_dir(dir.join(message))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            verdicts,
            BTreeSet::from(["invalid".to_owned(), "valid".to_owned()]),
            "{message}"
        );
        examples(message, "valid");
        examples(message, "invalid");
    }
    for (name, why) in DIVERGENCES {
        assert!(dir.join(name).is_file(), "DIVERGENCES names {name}");
        assert!(!why.is_empty());
    }
}
