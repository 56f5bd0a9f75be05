//! Checks of the files in `deploy/`: they parse, they agree with each other, and they agree
//! with the relay itself (its `--help` for variable names, `topology` for the queues, its
//! `/metrics` for the alerting rules and the dashboard). No broker, no Docker, no cluster
//! needed; the Prometheus rules need `promtool`, installed when missing where possible.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use openai_webhook_relay::metrics::{Metrics, label};
use openai_webhook_relay::topology::{Arg, Topology};
use serde::Deserialize;
use serde_json::json;
use serde_norway::Value as Yaml;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(relative: &str) -> String {
    let path = deploy_dir().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read deploy/{relative}: {e}"))
}

/// Every document of a (possibly multi-document) YAML text.
fn yaml_documents(text: &str, name: &str) -> Vec<Yaml> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| Yaml::deserialize(document).unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}")))
        .collect()
}

/// The only document of a YAML file under `deploy/`.
fn yaml(relative: &str) -> Yaml {
    let mut documents = yaml_documents(&read(relative), relative);
    assert_eq!(documents.len(), 1, "deploy/{relative} should hold exactly one document");
    let mut document = documents.remove(0);
    // Compose files share settings through `<<: *anchor` merge keys.
    document.apply_merge().expect("merge keys resolve");
    document
}

fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable deploy directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            yaml_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "yaml" || ext == "yml") {
            found.push(path);
        }
    }
}

fn str_at<'a>(value: &'a Yaml, path: &[&str]) -> &'a str {
    at(value, path).as_str().unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
}

fn at<'a>(value: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(value, |v, key| v.get(*key).unwrap_or_else(|| panic!("missing {}", path.join("."))))
}

fn keys(mapping: &Yaml) -> Vec<String> {
    mapping
        .as_mapping()
        .expect("a mapping")
        .keys()
        .map(|k| k.as_str().expect("string keys").to_owned())
        .collect()
}

/// A YAML scalar as text (numbers and strings alike).
fn scalar(value: &Yaml) -> String {
    match value {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// `environment:` of a compose service, as a map (compose allows a map or `NAME=value` lines).
fn compose_environment(service: &Yaml) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Yaml::Mapping(map)) => {
            map.iter().map(|(k, v)| (k.as_str().expect("variable name").to_owned(), scalar(v))).collect()
        }
        Some(Yaml::Sequence(lines)) => lines
            .iter()
            .map(|line| {
                let line = line.as_str().expect("NAME=value");
                let (name, value) = line.split_once('=').unwrap_or((line, ""));
                (name.to_owned(), value.to_owned())
            })
            .collect(),
        Some(other) => panic!("unexpected environment: {other:?}"),
    }
}

/// Seconds of a compose duration such as `30s`, `1m30s` or `1m`.
fn compose_duration_secs(text: &str) -> u64 {
    let mut total = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
        } else {
            let n: u64 = number.parse().unwrap_or_else(|_| panic!("bad duration {text}"));
            number.clear();
            total += match c {
                'h' => n * 3600,
                'm' => n * 60,
                's' => n,
                _ => panic!("unsupported duration unit in {text}"),
            };
        }
    }
    assert!(number.is_empty(), "duration {text} lacks a unit");
    total
}

/// The variables the relay reads: every `[env: NAME...]` of `serve --help`, plus `RUST_LOG`,
/// which the log filter reads directly (it is not a flag).
fn known_env_vars() -> BTreeSet<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_openai-webhook-relay"))
        .args(["serve", "--help"])
        .output()
        .expect("the relay binary runs");
    assert!(output.status.success(), "serve --help failed: {}", String::from_utf8_lossy(&output.stderr));
    let help = String::from_utf8(output.stdout).expect("UTF-8 help");
    let mut names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().expect("a name").trim().to_owned())
        .collect();
    assert!(names.contains("AMQP_URL") && names.contains("OPENAI_WEBHOOK_SECRET"), "unexpected help: {help}");
    names.insert("RUST_LOG".to_owned());
    names
}

fn kubernetes(name: &str) -> Yaml {
    yaml(&format!("kubernetes/{name}"))
}

fn relay_container(deployment: &Yaml) -> &Yaml {
    let containers = at(deployment, &["spec", "template", "spec", "containers"]).as_sequence().expect("containers");
    containers
        .iter()
        .find(|c| str_at(c, &["name"]) == "relay")
        .expect("a container named relay")
}

fn compose() -> Yaml {
    yaml("compose.yaml")
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    let names: BTreeSet<String> =
        files.iter().map(|f| f.strip_prefix(deploy_dir()).unwrap().to_string_lossy().replace('\\', "/")).collect();
    for expected in [
        "compose.yaml",
        "kubernetes/deployment.yaml",
        "kubernetes/service.yaml",
        "kubernetes/pdb.yaml",
        "kubernetes/hpa.yaml",
        "kubernetes/configmap.yaml",
        "kubernetes/secret.example.yaml",
        "kubernetes/kustomization.yaml",
        "prometheus/alerts.yaml",
        "prometheus/alerts.test.yaml",
    ] {
        assert!(names.contains(expected), "deploy/{expected} is missing (found {names:?})");
    }
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let documents = yaml_documents(&text, &file.display().to_string());
        assert!(!documents.is_empty(), "{} holds no YAML document", file.display());
        assert!(documents.iter().all(|d| d.is_mapping()), "{} holds a document that is not a mapping", file.display());
    }
}

#[test]
fn every_kubernetes_manifest_except_the_examples_is_in_the_kustomization() {
    let kustomization = kubernetes("kustomization.yaml");
    let resources: BTreeSet<String> = at(&kustomization, &["resources"])
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("a file name").to_owned())
        .collect();
    let mut files = Vec::new();
    yaml_files(&deploy_dir().join("kubernetes"), &mut files);
    let manifests: BTreeSet<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|name| name != "kustomization.yaml" && !name.contains(".example."))
        .collect();
    assert_eq!(resources, manifests);
    assert!(!resources.contains("secret.example.yaml"), "the example secret must never be applied");
    for resource in &resources {
        let manifest = kubernetes(resource);
        assert!(manifest.get("metadata").and_then(|m| m.get("namespace")).is_none(), "{resource} names a namespace");
    }
}

#[test]
fn compose_runs_rabbitmq_and_a_relay_that_waits_for_it_to_be_healthy() {
    let compose = compose();
    let services = at(&compose, &["services"]);
    let names: BTreeSet<String> = keys(services).into_iter().collect();
    assert!(names.contains("rabbitmq") && names.contains("relay"), "services: {names:?}");

    let rabbitmq = at(services, &["rabbitmq"]);
    assert!(str_at(rabbitmq, &["image"]).starts_with("rabbitmq:3.13-management"));
    let check: Vec<String> =
        at(rabbitmq, &["healthcheck", "test"]).as_sequence().unwrap().iter().map(scalar).collect();
    assert_eq!(check, ["CMD", "rabbitmq-diagnostics", "-q", "ping"]);

    let relay = at(services, &["relay"]);
    assert_eq!(str_at(relay, &["build", "dockerfile"]), "deploy/Dockerfile");
    assert_eq!(str_at(relay, &["depends_on", "rabbitmq", "condition"]), "service_healthy");
    let environment = compose_environment(relay);
    assert!(environment["AMQP_URL"].contains("@rabbitmq:"), "AMQP_URL must name the rabbitmq service");
    for secret in ["OPENAI_WEBHOOK_SECRET", "OPENAI_API_KEY"] {
        let value = &environment[secret];
        assert!(value.starts_with(&format!("${{{secret}:?")), "{secret} must come from the host, required: {value}");
    }
    let ports: Vec<String> = at(relay, &["ports"]).as_sequence().unwrap().iter().map(scalar).collect();
    assert!(ports.iter().any(|p| p.ends_with(":8080")), "relay ports: {ports:?}");
}

#[test]
fn compose_gives_the_relay_time_to_shut_down_gracefully() {
    let compose = compose();
    let relay = at(&compose, &["services", "relay"]);
    let shutdown: u64 = compose_environment(relay)
        .get("RELAY_SHUTDOWN_TIMEOUT_SECS")
        .map_or(20, |v| v.parse().expect("a number"));
    let grace = compose_duration_secs(str_at(relay, &["stop_grace_period"]));
    assert!(grace > shutdown, "stop_grace_period {grace}s must exceed RELAY_SHUTDOWN_TIMEOUT_SECS {shutdown}s");
}

#[test]
fn the_compose_broker_imports_the_topology_and_the_user_the_relay_connects_as() {
    let compose = compose();
    let services = at(&compose, &["services"]);
    let mounts: Vec<(String, String)> = at(services, &["rabbitmq", "volumes"])
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| {
            let parts: Vec<&str> = v.as_str()?.split(':').collect();
            parts[0].starts_with("./").then(|| (parts[0].trim_start_matches("./").to_owned(), parts[1].to_owned()))
        })
        .collect();
    for (source, _) in &mounts {
        assert!(deploy_dir().join(source).is_file(), "compose mounts deploy/{source}, which does not exist");
    }
    let target_of = |source: &str| {
        mounts.iter().find(|(s, _)| s == source).map(|(_, t)| t.clone()).unwrap_or_else(|| panic!("{source} not mounted"))
    };

    let conf_target = target_of("rabbitmq/rabbitmq.conf");
    assert!(
        conf_target == "/etc/rabbitmq/rabbitmq.conf" || conf_target.starts_with("/etc/rabbitmq/conf.d/"),
        "rabbitmq.conf mounted where RabbitMQ does not read it: {conf_target}"
    );
    let conf = read("rabbitmq/rabbitmq.conf");
    let setting = |key: &str| {
        conf.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_owned())
    };
    let definitions_path = setting("definitions.local.path")
        .or_else(|| setting("load_definitions"))
        .expect("rabbitmq.conf imports definitions");
    let imported: Vec<String> = mounts
        .iter()
        .filter(|(_, target)| Path::new(target).parent() == Some(Path::new(&definitions_path)) || *target == definitions_path)
        .map(|(source, _)| source.clone())
        .collect();
    assert!(imported.contains(&"rabbitmq/definitions.json".to_owned()), "definitions.json is not imported: {imported:?}");

    // A node that imports definitions on its first boot creates no default (guest) user:
    // the user of the relay's AMQP_URL has to come from the imported files.
    let url = &compose_environment(at(services, &["relay"]))["AMQP_URL"];
    let credentials = url.split_once("://").unwrap().1.split_once('@').expect("AMQP_URL with credentials").0;
    let (user, password) = credentials.split_once(':').expect("user:password");
    let users: Vec<serde_json::Value> = imported
        .iter()
        .map(|source| serde_json::from_str::<serde_json::Value>(&read(source)).expect("JSON definitions"))
        .flat_map(|defs| defs.get("users").and_then(|u| u.as_array()).cloned().unwrap_or_default())
        .collect();
    let account = users.iter().find(|u| u["name"] == user).unwrap_or_else(|| panic!("no imported user {user}"));
    assert_eq!(account["password"], password, "the imported password of {user} differs from AMQP_URL's");
}

#[test]
fn the_deployment_probes_point_at_healthz_and_readyz_on_the_container_port() {
    let deployment = kubernetes("deployment.yaml");
    let container = relay_container(&deployment);
    let port = at(container, &["ports"]).as_sequence().unwrap().first().expect("a container port");
    let (port_name, port_number) = (str_at(port, &["name"]), at(port, &["containerPort"]).as_u64().unwrap());
    assert_eq!(port_number, 8080);
    let on_container_port = |probe: &str| {
        let target = at(container, &[probe, "httpGet", "port"]);
        assert!(
            target.as_str() == Some(port_name) || target.as_u64() == Some(port_number),
            "{probe} targets {target:?}, not the container port"
        );
    };
    on_container_port("livenessProbe");
    on_container_port("readinessProbe");
    assert_eq!(str_at(container, &["livenessProbe", "httpGet", "path"]), "/healthz");
    assert_eq!(str_at(container, &["readinessProbe", "httpGet", "path"]), "/readyz");
    assert_eq!(at(container, &["readinessProbe", "periodSeconds"]).as_u64(), Some(2));
    assert_eq!(at(container, &["readinessProbe", "failureThreshold"]).as_u64(), Some(1));

    let service = kubernetes("service.yaml");
    let service_port = at(&service, &["spec", "ports"]).as_sequence().unwrap().first().unwrap();
    let target = at(service_port, &["targetPort"]);
    assert!(target.as_str() == Some(port_name) || target.as_u64() == Some(port_number));
}

#[test]
fn the_deployment_outlasts_the_prestop_sleep_plus_the_relay_shutdown_timeout() {
    let deployment = kubernetes("deployment.yaml");
    let pod = at(&deployment, &["spec", "template", "spec"]);
    let grace = at(pod, &["terminationGracePeriodSeconds"]).as_u64().unwrap();
    let sleep = at(relay_container(&deployment), &["lifecycle", "preStop", "sleep", "seconds"]).as_u64().unwrap();
    let configmap = kubernetes("configmap.yaml");
    let shutdown: u64 = scalar(at(&configmap, &["data", "RELAY_SHUTDOWN_TIMEOUT_SECS"])).parse().unwrap();
    assert!(grace > sleep + shutdown, "terminationGracePeriodSeconds {grace} <= preStop {sleep} + shutdown {shutdown}");
}

#[test]
fn the_deployment_runs_locked_down_and_reads_the_configmap_and_secret_shipped_beside_it() {
    let deployment = kubernetes("deployment.yaml");
    assert_eq!(at(&deployment, &["spec", "replicas"]).as_u64(), Some(2));
    let container = relay_container(&deployment);
    let security = at(container, &["securityContext"]);
    assert_eq!(at(security, &["runAsNonRoot"]).as_bool(), Some(true));
    assert_eq!(at(security, &["readOnlyRootFilesystem"]).as_bool(), Some(true));
    assert_eq!(at(security, &["allowPrivilegeEscalation"]).as_bool(), Some(false));
    let dropped: Vec<String> = at(security, &["capabilities", "drop"]).as_sequence().unwrap().iter().map(scalar).collect();
    assert_eq!(dropped, ["ALL"]);
    assert!(at(container, &["resources", "limits", "memory"]).is_string());
    assert!(at(container, &["resources", "requests", "cpu"]).is_string(), "the HPA needs a CPU request");

    let sources = at(container, &["envFrom"]).as_sequence().unwrap();
    let configmap = kubernetes("configmap.yaml");
    let secret = kubernetes("secret.example.yaml");
    assert!(sources.iter().any(|s| s.get("configMapRef").map(|r| str_at(r, &["name"])) == Some(str_at(&configmap, &["metadata", "name"]))));
    assert!(sources.iter().any(|s| s.get("secretRef").map(|r| str_at(r, &["name"])) == Some(str_at(&secret, &["metadata", "name"]))));

    let hpa = kubernetes("hpa.yaml");
    assert_eq!(str_at(&hpa, &["apiVersion"]), "autoscaling/v2");
    assert_eq!(str_at(&hpa, &["spec", "scaleTargetRef", "name"]), str_at(&deployment, &["metadata", "name"]));
    let pdb = kubernetes("pdb.yaml");
    assert_eq!(at(&pdb, &["spec", "minAvailable"]).as_u64(), Some(1));
    assert_eq!(at(&pdb, &["spec", "selector", "matchLabels"]), at(&deployment, &["spec", "selector", "matchLabels"]));
}

#[test]
fn every_env_var_in_the_deploy_files_is_one_the_relay_knows() {
    let known = known_env_vars();
    let mut used: Vec<(String, &str)> = Vec::new();
    let configmap = kubernetes("configmap.yaml");
    used.extend(keys(at(&configmap, &["data"])).into_iter().map(|k| (k, "configmap.yaml")));
    let secret = kubernetes("secret.example.yaml");
    used.extend(keys(at(&secret, &["stringData"])).into_iter().map(|k| (k, "secret.example.yaml")));
    let deployment = kubernetes("deployment.yaml");
    if let Some(env) = relay_container(&deployment).get("env").and_then(|e| e.as_sequence()) {
        used.extend(env.iter().map(|e| (str_at(e, &["name"]).to_owned(), "deployment.yaml")));
    }
    let compose = compose();
    used.extend(compose_environment(at(&compose, &["services", "relay"])).into_keys().map(|k| (k, "compose.yaml")));
    assert!(used.len() > 10, "too few variables found: {used:?}");
    let unknown: Vec<_> = used.iter().filter(|(name, _)| !known.contains(name)).collect();
    assert!(unknown.is_empty(), "variables the relay does not read: {unknown:?} (it reads {known:?})");
}

#[test]
fn the_example_secret_shows_two_webhook_secrets_for_rotation() {
    let secret = kubernetes("secret.example.yaml");
    let data = at(&secret, &["stringData"]);
    let secrets: Vec<&str> = str_at(data, &["OPENAI_WEBHOOK_SECRET"]).split(',').map(str::trim).collect();
    assert_eq!(secrets.len(), 2);
    assert!(secrets.iter().all(|s| s.starts_with("whsec_")));
    assert!(str_at(data, &["AMQP_URL"]).contains('@'), "AMQP_URL carries the credentials");
    for key in ["OPENAI_API_KEY", "AMQP_URL"] {
        assert!(str_at(data, &[key]).contains("REPLACE"), "{key} should be a placeholder");
    }
}

#[test]
fn definitions_json_declares_exactly_the_relays_default_topology() {
    let topology = Topology { exchange: "openai.events".into(), inbox: "openai.webhooks.inbox".into(), requests: Some("openai.requests".into()) };
    let definitions: serde_json::Value = serde_json::from_str(&read("rabbitmq/definitions.json")).expect("valid JSON");
    assert!(definitions["rabbit_version"].is_string());
    assert!(definitions["vhosts"].as_array().unwrap().iter().any(|v| v["name"] == "/"));
    assert!(definitions.get("users").is_none_or(|u| u.as_array().is_some_and(Vec::is_empty)), "no users in the topology file");
    assert_eq!(definitions["bindings"], json!([]));

    // What the relay declares for each queue: a redeclare with other arguments would fail
    // with PRECONDITION_FAILED.
    let expected: BTreeMap<String, serde_json::Value> = topology
        .queue_specs()
        .into_iter()
        .map(|spec| {
            let arguments: serde_json::Map<String, serde_json::Value> = spec
                .arguments
                .iter()
                .map(|(key, value)| {
                    let value = match value {
                        Arg::Str(s) => json!(s),
                        Arg::Int(n) => json!(n),
                    };
                    ((*key).to_owned(), value)
                })
                .collect();
            (spec.name, serde_json::Value::Object(arguments))
        })
        .collect();
    let queues = definitions["queues"].as_array().expect("queues");
    let mut declared = BTreeMap::new();
    for queue in queues {
        let name = queue["name"].as_str().expect("queue name").to_owned();
        assert_eq!(queue["vhost"], "/", "{name}");
        assert_eq!(queue["durable"], true, "{name}");
        assert_eq!(queue["auto_delete"], false, "{name}");
        assert!(declared.insert(name.clone(), queue["arguments"].clone()).is_none(), "{name} declared twice");
    }
    assert_eq!(declared, expected);

    let exchanges = definitions["exchanges"].as_array().expect("exchanges");
    assert_eq!(
        exchanges.as_slice(),
        [json!({
            "name": topology.exchange,
            "vhost": "/",
            "type": "topic",
            "durable": true,
            "auto_delete": false,
            "internal": false,
            "arguments": {}
        })]
    );
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_as_a_non_root_user_in_another() {
    let dockerfile = read("Dockerfile");
    let instructions: Vec<(String, String)> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(op, rest)| (op.to_ascii_uppercase(), rest.trim().to_owned()))
        .collect();
    let froms: Vec<usize> = instructions.iter().enumerate().filter(|(_, (op, _))| op == "FROM").map(|(i, _)| i).collect();
    assert!(froms.len() >= 2, "not a multi-stage build");
    assert!(instructions[froms[0]].1.starts_with("rust:"), "the first stage should build with the Rust image");
    assert!(dockerfile.contains("cargo build --release --locked"));

    let runtime = &instructions[*froms.last().unwrap()..];
    assert!(runtime.iter().any(|(op, rest)| op == "COPY" && rest.starts_with("--from=")), "the runtime stage copies the binary");
    let user = runtime.iter().rev().find(|(op, _)| op == "USER").map(|(_, u)| u.as_str()).expect("a USER in the runtime stage");
    let user = user.split(':').next().unwrap();
    assert!(user != "root" && user != "0", "runs as root: USER {user}");
    assert!(runtime.iter().any(|(op, rest)| op == "EXPOSE" && rest.split_whitespace().any(|p| p.trim_end_matches("/tcp") == "8080")));
    let entrypoint = runtime.iter().find(|(op, _)| op == "ENTRYPOINT").map(|(_, e)| e.as_str()).expect("an ENTRYPOINT");
    assert_eq!(serde_json::from_str::<Vec<String>>(entrypoint).unwrap(), ["/usr/local/bin/openai-webhook-relay"]);
    let cmd = runtime.iter().find(|(op, _)| op == "CMD").map(|(_, c)| c.as_str()).expect("a CMD");
    assert_eq!(serde_json::from_str::<Vec<String>>(cmd).unwrap(), ["serve"]);
}

#[test]
fn the_cluster_compose_runs_three_nodes_and_two_relays_that_list_every_node() {
    let compose = yaml("compose.cluster.yaml");
    let services = at(&compose, &["services"]).as_mapping().expect("services");
    let name = |key: &Yaml| key.as_str().unwrap().to_owned();
    let nodes: BTreeSet<String> = services.keys().map(name).filter(|n| n.starts_with("rabbit-")).collect();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    let relays: Vec<&Yaml> = services.iter().filter(|(k, _)| name(k).starts_with("relay-")).map(|(_, v)| v).collect();
    assert_eq!(relays.len(), 2);
    for relay in relays {
        let url = compose_environment(relay).remove("AMQP_URL").expect("AMQP_URL");
        let parsed = openai_webhook_relay::broker::Nodes::parse(&url).expect("AMQP_URL parses");
        let hosts: BTreeSet<String> = (0..parsed.len()).map(|i| parsed.get(i).authority.host.clone()).collect();
        assert_eq!(hosts, nodes, "each relay lists every node");
    }
    let conf = read("rabbitmq/cluster.conf");
    for node in &nodes {
        assert!(conf.contains(&format!("rabbit@{node}")), "cluster.conf names {node}");
    }
    let balancer = read("haproxy/haproxy.cfg");
    assert!(balancer.contains("option httpchk GET /readyz"), "the balancer sends only to ready replicas");
}

/// Metrics the rules and the dashboard read that the relay does not serve: Prometheus's own
/// `up` of each scrape target, and the inbox's length from RabbitMQ's prometheus plugin
/// (per-object metrics), since the relay cannot see how many messages wait in a queue.
const FOREIGN_METRICS: [&str; 2] = ["up", "rabbitmq_queue_messages_ready"];

/// Every sample name the relay's `/metrics` can carry, from its `# TYPE` lines: a counter's
/// samples end in `_total`, a histogram's in `_bucket`, `_sum` and `_count`.
fn exported_metric_names() -> BTreeSet<String> {
    let metrics = Metrics::default();
    // prometheus-client leaves a labelled family out of the exposition, `# TYPE` line and all,
    // until it holds a sample, so each gets one here. A family missing from these lists shows
    // up below as a metric the relay does not serve.
    let sample = label("test", "");
    for family in [
        &metrics.deliveries,
        &metrics.verify_failures,
        &metrics.fetches,
        &metrics.events_published,
        &metrics.retries,
        &metrics.dead_letters,
        &metrics.settle_failures,
        &metrics.gateway_requests,
        &metrics.gateway_posts,
        &metrics.replies,
        &metrics.watches,
    ] {
        drop(family.get_or_create(&sample));
    }
    drop(metrics.broker_node.get_or_create(&sample));
    drop(metrics.fetch_seconds.get_or_create(&sample));
    let text = metrics.render();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(declaration) = line.strip_prefix("# TYPE ") else { continue };
        let (family, kind) = declaration.split_once(' ').unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "gauge" => &[""],
            "histogram" => &["_bucket", "_sum", "_count"],
            other => panic!("no sample names known for {family} of kind {other}"),
        };
        names.extend(suffixes.iter().map(|suffix| format!("{family}{suffix}")));
    }
    names
}

/// Index just past the `close` that ends the bracket opened at `open`, skipping strings.
fn past_closing(chars: &[char], open: usize, close: char) -> usize {
    let mut i = open + 1;
    while i < chars.len() && chars[i] != close {
        i = if matches!(chars[i], '"' | '\'' | '`') { past_string(chars, i) } else { i + 1 };
    }
    assert!(i < chars.len(), "no {close} closes the {} at {open}", chars[open]);
    i + 1
}

/// Index just past the string literal that starts at `start`.
fn past_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        i += if chars[i] == '\\' && quote != '`' { 2 } else { 1 };
    }
    assert!(i < chars.len(), "unterminated string at {start}");
    i + 1
}

/// The metric names a PromQL expression selects. A misspelled name is no PromQL error, the rule
/// or panel just never sees data, so names are checked against `/metrics`; promtool has no
/// command that lists them, hence this small lexer: a name is an identifier where a selector
/// can stand that is not a function (followed by `(`), an aggregation or a keyword. Label
/// matchers `{..}`, the label lists of `by`/`on`-style clauses, ranges `[..]`, strings, numbers
/// and durations are skipped.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 22] = [
        "and", "or", "unless", "offset", "bool", "atan2", "inf", "nan", "sum", "min", "max", "avg", "group", "stddev",
        "stdvar", "count", "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    ];
    const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    let chars: Vec<char> = expr.chars().collect();
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i = match c {
            '"' | '\'' | '`' => past_string(&chars, i),
            '{' => past_closing(&chars, i, '}'),
            '[' => past_closing(&chars, i, ']'),
            '#' => chars[i..].iter().position(|&c| c == '\n').map_or(chars.len(), |n| i + n),
            // Numbers and durations: 0.99, 1e3, 0x1f, 15m.
            _ if c.is_ascii_digit() || c == '.' => i + chars[i..].iter().take_while(|&&c| is_name_char(c) || c == '.').count(),
            _ if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let end = i + chars[i..].iter().take_while(|&&c| is_name_char(c)).count();
                let word: String = chars[i..end].iter().collect();
                let lower = word.to_ascii_lowercase();
                let next = chars[end..].iter().position(|c| !c.is_whitespace()).map(|n| end + n);
                let opens = next.is_some_and(|n| chars[n] == '(');
                match next {
                    Some(n) if opens && LABEL_LISTS.contains(&lower.as_str()) => past_closing(&chars, n, ')'),
                    _ if opens || KEYWORDS.contains(&lower.as_str()) || LABEL_LISTS.contains(&lower.as_str()) => end,
                    _ => {
                        names.insert(word);
                        end
                    }
                }
            }
            _ => i + 1,
        };
    }
    names
}

/// The alerting rules of `deploy/prometheus/alerts.yaml`.
fn alert_rules() -> Vec<Yaml> {
    let rules = yaml("prometheus/alerts.yaml");
    let groups = at(&rules, &["groups"]).as_sequence().expect("groups");
    groups.iter().flat_map(|group| at(group, &["rules"]).as_sequence().expect("rules").clone()).collect()
}

/// Every PromQL expression of `deploy/grafana/`'s dashboard, wherever a panel or row holds it.
fn dashboard_expressions() -> Vec<String> {
    fn collect(value: &serde_json::Value, found: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(expr) = map.get("expr") {
                    found.push(expr.as_str().expect("a string expr").to_owned());
                }
                map.values().for_each(|v| collect(v, found));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    collect(&dashboard(), &mut found);
    found
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("grafana/openai-webhook-relay.json")).expect("the dashboard is valid JSON")
}

/// A `promtool` command, or `None` when promtool is missing and `tests/support/services.sh
/// promtool` cannot install it (no root, no Debian package index): these checks need the real
/// PromQL parser and rule evaluator, and there is no other in Rust.
fn promtool() -> Option<Command> {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    let available = *AVAILABLE.get_or_init(|| {
        let runs = || Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
        if !runs() {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/services.sh");
            // Its output says why when it fails; the check below is what counts.
            let _ = Command::new("bash").args([script, "promtool"]).status();
        }
        runs()
    });
    if !available {
        eprintln!("SKIP: promtool is missing and tests/support/services.sh could not install it (Debian package prometheus)");
    }
    available.then(|| Command::new("promtool"))
}

fn assert_succeeds(mut command: Command) {
    let output = command.output().expect("promtool runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{command:?} failed:\n{stdout}\n{stderr}");
}

#[test]
fn the_promql_name_extractor_finds_every_selector_and_nothing_else() {
    let expr = r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="}", y=~'{'}[5m])))
        / ignoring (status) group_left sum without(kind) (b_total offset 15m) > bool 1e3
        or absent(c) unless on(instance) d # e is a comment
        and (sum(rate(f[$__rate_interval])) or vector(0)) and Inf > g:recorded"#;
    let names: Vec<String> = promql_metric_names(expr).into_iter().collect();
    assert_eq!(names, ["a_bucket", "b_total", "c", "d", "f", "g:recorded"]);
}

#[test]
fn every_metric_the_alerts_and_the_dashboard_read_is_one_the_relay_serves() {
    let exported = exported_metric_names();
    for name in ["relay_dead_letters_total", "relay_broker_connected", "relay_fetch_seconds_bucket"] {
        assert!(exported.contains(name), "{name} is missing from {exported:?}");
    }
    let mut expressions: Vec<(String, String)> = alert_rules()
        .iter()
        .map(|rule| (format!("alert {}", str_at(rule, &["alert"])), str_at(rule, &["expr"]).to_owned()))
        .collect();
    expressions.extend(dashboard_expressions().into_iter().map(|expr| ("the dashboard".to_owned(), expr)));
    // The unit tests' input series must be real metrics too, or they test an alert on nothing.
    let tests = yaml("prometheus/alerts.test.yaml");
    for group in at(&tests, &["tests"]).as_sequence().expect("tests") {
        for series in at(group, &["input_series"]).as_sequence().expect("input_series") {
            let series = str_at(series, &["series"]);
            expressions.push(("alerts.test.yaml".to_owned(), series.split('{').next().unwrap().to_owned()));
        }
    }
    let mut unknown = Vec::new();
    for (place, expr) in &expressions {
        let names = promql_metric_names(expr);
        assert!(!names.is_empty(), "{place}: no metric found in {expr}");
        unknown.extend(
            names
                .into_iter()
                .filter(|name| !exported.contains(name) && !FOREIGN_METRICS.contains(&name.as_str()))
                .map(|name| format!("{name} ({place})")),
        );
    }
    assert!(unknown.is_empty(), "metrics the relay does not serve: {unknown:?}\nit serves {exported:?}");
}

#[test]
fn every_alert_has_a_severity_a_runbook_and_unit_tests_where_it_fires_and_where_it_does_not() {
    let rules = alert_rules();
    let tests = yaml("prometheus/alerts.test.yaml");
    let cases: Vec<&Yaml> = at(&tests, &["tests"])
        .as_sequence()
        .expect("tests")
        .iter()
        .flat_map(|group| at(group, &["alert_rule_test"]).as_sequence().expect("alert_rule_test"))
        .collect();
    let mut names = BTreeSet::new();
    for rule in &rules {
        let name = str_at(rule, &["alert"]);
        assert!(names.insert(name), "{name} is defined twice");
        assert!(["critical", "warning"].contains(&str_at(rule, &["labels", "severity"])), "{name}: severity");
        assert!(!str_at(rule, &["annotations", "summary"]).is_empty(), "{name}: summary");
        assert!(str_at(rule, &["annotations", "description"]).len() > 100, "{name}: a description saying what to do");
        let fired: Vec<bool> = cases
            .iter()
            .filter(|case| str_at(case, &["alertname"]) == name)
            .map(|case| at(case, &["exp_alerts"]).as_sequence().is_some_and(|alerts| !alerts.is_empty()))
            .collect();
        assert!(fired.contains(&true) && fired.contains(&false), "{name}: alerts.test.yaml needs a case where it fires and one where it does not");
    }
}

#[test]
fn the_alerting_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(mut check) = promtool() else { return };
    check.arg("check").arg("rules").arg(deploy_dir().join("prometheus/alerts.yaml"));
    assert_succeeds(check);
    let mut test = promtool().expect("promtool is available");
    test.arg("test").arg("rules").arg(deploy_dir().join("prometheus/alerts.test.yaml"));
    assert_succeeds(test);
}

#[test]
fn every_dashboard_expression_is_promql_that_promtool_accepts() {
    let Some(mut check) = promtool() else { return };
    // promtool parses PromQL in rule files only: each expression becomes a recording rule,
    // with Grafana's interval variables replaced by a duration.
    let rules: Vec<serde_json::Value> = dashboard_expressions()
        .iter()
        .enumerate()
        .map(|(i, expr)| {
            let expr = ["$__rate_interval", "$__interval", "$__range"].iter().fold(expr.clone(), |e, var| e.replace(var, "5m"));
            assert!(!expr.contains('$'), "a dashboard variable this test does not replace: {expr}");
            json!({ "record": format!("dashboard:panel_{i}"), "expr": expr })
        })
        .collect();
    let file = std::env::temp_dir().join(format!("relay-dashboard-rules-{}.json", std::process::id()));
    std::fs::write(&file, json!({ "groups": [{ "name": "dashboard", "rules": rules }] }).to_string()).expect("temporary rule file");
    check.arg("check").arg("rules").arg(&file);
    let output = check.output().expect("promtool runs");
    std::fs::remove_file(&file).ok();
    assert!(output.status.success(), "{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
}

#[test]
fn the_dashboard_reads_from_a_prometheus_datasource_chosen_on_import() {
    let dashboard = dashboard();
    let variables = dashboard["templating"]["list"].as_array().expect("templating variables");
    let datasource = variables.iter().find(|v| v["name"] == "datasource").expect("a datasource variable");
    assert_eq!((&datasource["type"], &datasource["query"]), (&json!("datasource"), &json!("prometheus")));
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().expect("a panel id")), "panel id {} twice", panel["id"]);
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for source in std::iter::once(&panel["datasource"]).chain(targets.iter().map(|t| &t["datasource"])) {
            assert_eq!(source["uid"], "${datasource}", "panel {} queries a fixed datasource", panel["title"]);
        }
    }
}
