//! What the Kubernetes schemas cannot check in `deploy/`: that the pieces
//! agree with each other and with the binary. `kubernetes-validate
//! --strict` (in `.ci/run`) checks each object against the API's schema;
//! these tests read the manifests and check that probes hit the ports the
//! containers open, the policy is mounted where `--policy` points, the
//! headless Service governs the StatefulSet, the PDB keeps a Raft majority,
//! the grace period covers the shutdown, the peer port is reached by the
//! relayrate pods alone and the cluster secret is mounted where the
//! entrypoint reads it, and the container runs the repository's entrypoint
//! script; the command line that script builds from the manifest's
//! environment is checked as a whole. The Postfix,
//! sendmail and systemd files are checked by the tools that read them
//! (postconf, m4 with sendmail-cf, systemd-analyze) where installed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

/// Bound of `NodeHandle::wait_in_flight` at SIGTERM (src/node/lifecycle.rs).
const DRAIN_SECS: u64 = 5;
/// Bound of the leader's hand-over at SIGTERM: 3 x election_timeout_max
/// (3 s, src/node/config.rs).
const HAND_OVER_SECS: u64 = 9;
/// curl's --max-time in prestop.sh when it asks the API for the replicas.
const API_SECS: u64 = 5;
/// One try of prestop.sh's removal, begun just before its deadline:
/// remove-node then members, each with relayratectl --timeout-secs 5.
const LAST_TRY_SECS: u64 = 2 * 5;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every object of every `deploy/kubernetes/*.yaml` but
/// `kustomization.yaml` (kubectl's list of them), as JSON values.
fn objects() -> Vec<Value> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut all = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in yaml_serde::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                all.push(v);
            }
        }
    }
    all
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

fn only<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let of_kind: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(of_kind.len(), 1, "expected one {kind}");
    of_kind[0]
}

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

fn number(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {v}"))
}

fn list<'a>(v: &'a Value, pointer: &str) -> &'a Vec<Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no list at {pointer} in {v}"))
}

fn statefulset(objects: &[Value]) -> &Value {
    only(objects, "StatefulSet")
}

fn container<'a>(sts: &'a Value, name: &str) -> &'a Value {
    list(sts, "/spec/template/spec/containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// Whether every label of `selector` is on the pods.
fn selects(selector: &Value, pod_labels: &Value) -> bool {
    let selector = selector.as_object().expect("a selector map");
    !selector.is_empty() && selector.iter().all(|(k, v)| &pod_labels[k] == v)
}

/// The container port a probe or Service port names (by number or name).
fn resolve_port(container: &Value, port: &Value) -> Option<u64> {
    list(container, "/ports").iter().find_map(|p| {
        let number = p["containerPort"].as_u64()?;
        (port.as_u64() == Some(number) || port.as_str() == p["name"].as_str()).then_some(number)
    })
}

fn env_value<'a>(container: &'a Value, name: &str) -> &'a str {
    list(container, "/env")
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("no env {name} with a value"))
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().expect("a port")
}

/// The relayrate container's ports: clients (Limiter, Admin, health) and
/// peers (Raft).
fn client_port(relayrate: &Value) -> u64 {
    resolve_port(relayrate, &Value::from("grpc")).expect("a grpc port")
}

fn peer_port(relayrate: &Value) -> u64 {
    resolve_port(relayrate, &Value::from("peer")).expect("a peer port")
}

/// The example Secret, kept out of `kubectl apply -f deploy/kubernetes/`.
const EXAMPLE_SECRET: &str = "deploy/kubernetes/examples/cluster-secret.yaml";

fn example_secret() -> Value {
    let text = read(EXAMPLE_SECRET);
    let docs: Vec<Value> = yaml_serde::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 1, "{EXAMPLE_SECRET}: one object");
    docs[0].clone()
}

#[test]
fn every_object_is_in_the_one_namespace() {
    let objects = objects();
    let ns = text(only(&objects, "Namespace"), "/metadata/name");
    for o in objects.iter().filter(|o| o["kind"] != "Namespace") {
        assert_eq!(o["metadata"]["namespace"], ns, "{}", o["metadata"]["name"]);
    }
    let binding = only(&objects, "RoleBinding");
    for s in list(binding, "/subjects") {
        assert_eq!(s["namespace"], ns);
    }
}

#[test]
fn the_headless_service_governs_the_statefulset() {
    let objects = objects();
    let sts = statefulset(&objects);
    let peers = find(&objects, "Service", text(sts, "/spec/serviceName"));
    assert_eq!(
        peers["spec"]["clusterIP"], "None",
        "the peer Service is headless"
    );
    // Peers must resolve each other before they are ready (joining, or
    // after a full restart, when none is).
    assert_eq!(peers["spec"]["publishNotReadyAddresses"], true);
    let pod_labels = &sts["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&peers["spec"]["selector"], pod_labels));
    assert!(selects(&sts["spec"]["selector"]["matchLabels"], pod_labels));
    let relayrate = container(sts, "relayrate");
    for p in list(peers, "/spec/ports") {
        assert!(resolve_port(relayrate, &p["targetPort"]).is_some(), "{p}");
    }
    // It names the peer port (Raft) beside the client port.
    for port in [peer_port(relayrate), client_port(relayrate)] {
        assert!(
            list(peers, "/spec/ports")
                .iter()
                .any(|p| p["port"] == port
                    && resolve_port(relayrate, &p["targetPort"]) == Some(port)),
            "the peer Service has no port {port}"
        );
    }
    // After a full outage no pod is ready alone: OrderedReady would never
    // start pod 1.
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
}

#[test]
fn the_client_service_reaches_postfix_and_keeps_client_addresses() {
    let objects = objects();
    let sts = statefulset(&objects);
    let pod_labels = &sts["spec"]["template"]["metadata"]["labels"];
    let client = objects
        .iter()
        .find(|o| o["kind"] == "Service" && o["spec"]["clusterIP"] != "None")
        .expect("a client Service");
    assert!(selects(&client["spec"]["selector"], pod_labels));
    let postfix = container(sts, "postfix");
    let ports = list(client, "/spec/ports");
    assert!(ports.iter().any(|p| p["port"] == 25));
    for p in ports {
        assert!(resolve_port(postfix, &p["targetPort"]).is_some(), "{p}");
    }
    // The limits are per client address: no SNAT to another node's.
    assert_eq!(client["spec"]["externalTrafficPolicy"], "Local");
}

#[test]
fn probes_hit_the_ports_their_container_opens() {
    let objects = objects();
    let sts = statefulset(&objects);
    let mut probes = 0;
    for c in list(sts, "/spec/template/spec/containers") {
        for kind in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let Some(probe) = c.get(kind) else { continue };
            let port = ["grpc", "tcpSocket", "httpGet"]
                .iter()
                .find_map(|h| probe.get(*h).map(|x| &x["port"]));
            if let Some(port) = port {
                assert!(resolve_port(c, port).is_some(), "{}: {kind}", c["name"]);
                probes += 1;
            }
        }
    }
    assert!(probes >= 4);
    // relayrate: grpc.health.v1 on its gRPC port; ready ("") once in the
    // cluster with its policy, live ("liveness") as soon as it serves.
    let relayrate = container(sts, "relayrate");
    let grpc = client_port(relayrate);
    let ready = &relayrate["readinessProbe"]["grpc"];
    assert_eq!(ready["port"].as_u64(), Some(grpc));
    assert!(ready.get("service").is_none() || ready["service"] == "");
    for kind in ["livenessProbe", "startupProbe"] {
        let live = &relayrate[kind]["grpc"];
        assert_eq!(live["port"].as_u64(), Some(grpc), "{kind}");
        assert_eq!(live["service"], "liveness", "{kind}");
    }
}

#[test]
fn the_pdb_keeps_a_raft_majority() {
    let objects = objects();
    let sts = statefulset(&objects);
    let pdb = only(&objects, "PodDisruptionBudget");
    assert!(selects(
        &pdb["spec"]["selector"]["matchLabels"],
        &sts["spec"]["template"]["metadata"]["labels"]
    ));
    // As deployed, and after `kubectl scale --replicas=5`.
    let replicas = number(sts, "/spec/replicas");
    assert!(
        replicas >= 3 && replicas % 2 == 1,
        "an odd number of voters"
    );
    for n in [replicas, 5] {
        let majority = n / 2 + 1;
        if let Some(min) = pdb["spec"]["minAvailable"].as_u64() {
            assert!(min >= majority, "minAvailable {min} < {majority} of {n}");
        } else {
            let max = number(pdb, "/spec/maxUnavailable");
            assert!(
                max >= 1 && max <= (n - 1) / 2,
                "maxUnavailable {max} of {n}"
            );
        }
    }
}

/// Whether a NetworkPolicy ingress rule lets traffic to `port` through
/// (a rule without ports covers them all).
fn covers(rule: &Value, port: u64, name: &str) -> bool {
    match rule.get("ports").and_then(Value::as_array) {
        None => true,
        Some(ports) if ports.is_empty() => true,
        Some(ports) => ports.iter().any(|p| match p.get("port") {
            None => true,
            Some(v) => v.as_u64() == Some(port) || v.as_str() == Some(name),
        }),
    }
}

/// Whether every source a rule admits is a relayrate pod of the policy's
/// namespace: a `from` that is present, not empty, and made of pod
/// selectors that pick the pods' labels (no namespace selector, no
/// address block).
fn only_relayrate_pods(rule: &Value, pod_labels: &Value) -> bool {
    let Some(from) = rule.get("from").and_then(Value::as_array) else {
        return false;
    };
    !from.is_empty()
        && from.iter().all(|peer| {
            let keys: Vec<&String> = peer
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_default();
            keys == ["podSelector"]
                && peer["podSelector"]
                    .as_object()
                    .is_some_and(|s| s.keys().all(|k| k == "matchLabels"))
                && selects(&peer["podSelector"]["matchLabels"], pod_labels)
        })
}

#[test]
fn the_peer_port_is_declared_and_only_the_relayrate_pods_reach_it() {
    let objects = objects();
    let sts = statefulset(&objects);
    let relayrate = container(sts, "relayrate");
    let pod_labels = &sts["spec"]["template"]["metadata"]["labels"];
    // The container declares the peer port, 7460, beside the client port
    // (relayrate's default: client port + 10); the nodes advertise it.
    let peer = peer_port(relayrate);
    assert_eq!(peer, 7460);
    assert_eq!(peer, client_port(relayrate) + 10);
    let env = pod_env(relayrate, "relayrate-0", "relayrate");
    assert_eq!(port_of(&env["RELAYRATE_PEER"]), peer);
    assert_eq!(port_of(&env["RELAYRATE_PEER_LISTEN"]), peer);

    let policy = only(&objects, "NetworkPolicy");
    assert!(selects(
        &policy["spec"]["podSelector"]["matchLabels"],
        pod_labels
    ));
    assert!(list(policy, "/spec/policyTypes").contains(&Value::from("Ingress")));
    let rules = list(policy, "/spec/ingress");
    // Every rule that opens the peer port opens it to relayrate pods only,
    // and one does (else the pods could not reach each other).
    let to_peers: Vec<&Value> = rules.iter().filter(|r| covers(r, peer, "peer")).collect();
    assert!(
        !to_peers.is_empty(),
        "no rule lets the pods reach port {peer}"
    );
    for rule in to_peers {
        assert!(
            only_relayrate_pods(rule, pod_labels),
            "port {peer} open to more: {rule}"
        );
    }
    // The client port: the pods' scripts ask each other there.
    assert!(rules
        .iter()
        .any(|r| covers(r, client_port(relayrate), "grpc")
            && r.get("from").is_some_and(|f| f.as_array().is_some_and(|f| f
                .iter()
                .any(|p| selects(&p["podSelector"]["matchLabels"], pod_labels))))));
    // SMTP stays open to the web servers.
    assert!(rules
        .iter()
        .any(|r| covers(r, 25, "smtp") && r.get("from").is_none()));

    // And the check can fail: a rule open to every source, or to another
    // namespace's pods, is caught.
    let open = serde_json::json!({"ports": [{"port": peer}]});
    assert!(covers(&open, peer, "peer") && !only_relayrate_pods(&open, pod_labels));
    let other_ns = serde_json::json!({"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": pod_labels}}]});
    assert!(!only_relayrate_pods(&other_ns, pod_labels));
}

#[test]
fn the_cluster_secret_is_mounted_where_the_entrypoint_reads_it() {
    let objects = objects();
    let sts = statefulset(&objects);
    let relayrate = container(sts, "relayrate");
    let flags = entrypoint_argv(sts, "relayrate-1", "relayrate");
    let file = Path::new(&flags["--cluster-secret-file"]);
    // A read-only mount of a Secret volume...
    let mount = list(relayrate, "/volumeMounts")
        .iter()
        .find(|m| file.parent() == Some(Path::new(text(m, "/mountPath"))))
        .expect("--cluster-secret-file is in a mounted directory");
    assert_eq!(mount["readOnly"], true);
    let volume = list(sts, "/spec/template/spec/volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let secret_name = text(volume, "/secret/secretName");
    // ...readable by the container's user (the files belong to root), and
    // by no other container.
    let mode = number(volume, "/secret/defaultMode");
    assert_eq!(mode & 0o004, 0o004, "mode {mode:o}");
    for c in list(sts, "/spec/template/spec/containers") {
        if c["name"] != "relayrate" {
            let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
            assert!(
                mounts.iter().all(|m| m["name"] != mount["name"]),
                "{}",
                c["name"]
            );
        }
    }
    // The example Secret is that one, in the namespace, with that key.
    let example = example_secret();
    let ns = text(only(&objects, "Namespace"), "/metadata/name");
    assert_eq!(example["kind"], "Secret");
    assert_eq!(example["metadata"]["name"], secret_name);
    assert_eq!(example["metadata"]["namespace"], ns);
    let key = file.file_name().unwrap().to_str().unwrap();
    let placeholder = text(&example, &format!("/stringData/{key}"));
    // `kubectl apply -f deploy/kubernetes/` must not overwrite the real
    // Secret with the example.
    assert!(
        objects.iter().all(|o| o["kind"] != "Secret"),
        "a Secret among the applied manifests"
    );
    // The placeholder is refused: a cluster cannot run on a published secret.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(key);
    std::fs::write(&path, placeholder).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_relayrate"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--milter-listen",
            "inet:127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--cluster-secret-file")
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{said}");
    assert!(said.contains("at least 16"), "{said}");
    // The command the example and the README give makes one that is not.
    let readme = read("deploy/README.md");
    let example_text = read(EXAMPLE_SECRET);
    let make = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    assert!(example_text.contains(make) && readme.contains(make));
    let made = Command::new("sh").arg("-c").arg(make).output().unwrap();
    assert_eq!(String::from_utf8(made.stdout).unwrap().len(), 64);
}

#[test]
fn the_grace_period_covers_the_hook_and_the_hand_over() {
    let objects = objects();
    let sts = statefulset(&objects);
    let grace = number(sts, "/spec/template/spec/terminationGracePeriodSeconds");
    let relayrate = container(sts, "relayrate");
    let remove: u64 = env_value(relayrate, "RELAYRATE_REMOVE_TIMEOUT")
        .parse()
        .unwrap();
    // The hook tries for its timeout and less than one second more.
    let needed = API_SECS + remove + 1 + LAST_TRY_SECS + DRAIN_SECS + HAND_OVER_SECS;
    let hook = read("deploy/kubernetes/prestop.sh");
    assert_eq!(hook.matches("--timeout-secs 5").count(), 2);
    assert!(hook.contains("--max-time 5"));
    assert!(grace >= needed, "grace {grace} s < {needed} s");
}

#[test]
fn volumes_are_claimed_and_mounted() {
    let objects = objects();
    let sts = statefulset(&objects);
    let mut names: Vec<String> = list(sts, "/spec/volumeClaimTemplates")
        .iter()
        .map(|t| text(t, "/metadata/name").to_string())
        .collect();
    names.extend(
        list(sts, "/spec/template/spec/volumes")
            .iter()
            .map(|v| text(v, "/name").to_string()),
    );
    let spec = &sts["spec"]["template"]["spec"];
    let containers = list(spec, "/containers")
        .iter()
        .chain(list(spec, "/initContainers"));
    for c in containers {
        for m in list(c, "/volumeMounts") {
            assert!(names.iter().any(|n| m["name"] == n.as_str()), "{m}");
        }
    }
    // Every ConfigMap a volume names exists.
    for v in list(sts, "/spec/template/spec/volumes") {
        if let Some(cm) = v.pointer("/configMap/name").and_then(Value::as_str) {
            find(&objects, "ConfigMap", cm);
        }
    }
    // The sled data is on a claim, not on the container's file system.
    let relayrate = container(sts, "relayrate");
    let data_dir = env_value(relayrate, "RELAYRATE_DATA_DIR");
    let mount = list(relayrate, "/volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == data_dir)
        .expect("the data dir is mounted");
    assert!(list(sts, "/spec/volumeClaimTemplates")
        .iter()
        .any(|t| t["metadata"]["name"] == mount["name"]));
}

#[test]
fn rbac_lets_the_hook_read_the_replicas_and_nothing_more() {
    let objects = objects();
    let sts = statefulset(&objects);
    let account = text(sts, "/spec/template/spec/serviceAccountName");
    find(&objects, "ServiceAccount", account);
    let binding = only(&objects, "RoleBinding");
    assert!(list(binding, "/subjects")
        .iter()
        .any(|s| s["kind"] == "ServiceAccount" && s["name"] == account));
    let role = find(&objects, "Role", text(binding, "/roleRef/name"));
    let rules = list(role, "/rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["apiGroups"], serde_json::json!(["apps"]));
    assert_eq!(
        rules[0]["resources"],
        serde_json::json!(["statefulsets/scale"])
    );
    assert_eq!(rules[0]["verbs"], serde_json::json!(["get"]));
    assert_eq!(rules[0]["resourceNames"][0], sts["metadata"]["name"]);
}

#[test]
fn the_policy_configmap_is_a_valid_policy() {
    let objects = objects();
    let policy = text(
        find(&objects, "ConfigMap", "relayrate-policy"),
        "/data/ze-policy.txt",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ze-policy.txt");
    std::fs::write(&file, policy).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_relayrate"))
        .args(["policy", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// ---------------------------------------------------------------------------
// The container, the image and the entrypoint script

/// A Dockerfile's instructions, continuation lines joined.
fn dockerfile(path: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in read(path).lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(part) = line.strip_suffix('\\') {
            pending.push_str(part);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let (op, rest) = pending.split_once(' ').unwrap_or((&pending, ""));
        out.push((op.to_uppercase(), rest.trim().to_string()));
        pending.clear();
    }
    out
}

/// The last stage's `COPY SRC DEST` lines from the build context, as
/// (source, destination file).
fn copies_from_context(instructions: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (op, rest) in instructions {
        if op != "COPY" || rest.contains("--from") {
            continue;
        }
        let words: Vec<&str> = rest
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let (dest, sources) = words.split_last().unwrap();
        for s in sources {
            let to = if dest.ends_with('/') {
                format!("{dest}{}", s.rsplit('/').next().unwrap())
            } else {
                dest.to_string()
            };
            out.push((s.to_string(), to));
        }
    }
    out
}

fn last_stage(instructions: &[(String, String)]) -> &[(String, String)] {
    let start = instructions
        .iter()
        .rposition(|(op, _)| op == "FROM")
        .unwrap();
    &instructions[start..]
}

/// Where the image installs a file of the repository.
fn installed_at(instructions: &[(String, String)], source: &str) -> String {
    copies_from_context(last_stage(instructions))
        .into_iter()
        .find(|(s, _)| s == source)
        .unwrap_or_else(|| panic!("the image does not install {source}"))
        .1
}

#[test]
fn the_image_is_multi_stage_non_root_and_builds_both_binaries() {
    let image = dockerfile("Dockerfile");
    let froms = image.iter().filter(|(op, _)| op == "FROM").count();
    assert!(froms >= 2, "multi-stage");
    let last = last_stage(&image);
    let user = last
        .iter()
        .rev()
        .find(|(op, _)| op == "USER")
        .map(|(_, u)| u.split(':').next().unwrap().to_string())
        .expect("a USER in the runtime stage");
    assert!(user != "0" && user != "root", "USER {user}");
    // The pod runs as the image's user, whose volume the init container
    // hands over.
    let objects = objects();
    let sts = statefulset(&objects);
    let relayrate = container(sts, "relayrate");
    assert_eq!(
        relayrate["securityContext"]["runAsUser"]
            .as_u64()
            .map(|u| u.to_string()),
        Some(user.clone())
    );
    assert_eq!(relayrate["securityContext"]["runAsNonRoot"], true);
    let chown = list(sts, "/spec/template/spec/initContainers")
        .iter()
        .find_map(|c| c["command"].as_array().filter(|c| c[0] == "chown"))
        .expect("an init container chowns the data volume");
    assert!(chown[1].as_str().unwrap().starts_with(&format!("{user}:")));

    // Both binaries are built and installed.
    let build = image
        .iter()
        .find(|(op, r)| op == "RUN" && r.contains("cargo build"))
        .map(|(_, r)| r.as_str())
        .expect("cargo build");
    for bin in ["relayrate", "relayratectl"] {
        assert!(build.contains(&format!("--bin {bin}")), "{bin} built");
        assert!(
            last.iter().any(|(op, r)| op == "COPY"
                && r.contains("--from")
                && r.contains(&format!("/{bin} "))),
            "{bin} installed"
        );
        let source = [
            format!("src/bin/{bin}.rs"),
            format!("src/bin/{bin}/main.rs"),
        ];
        assert!(
            source.iter().any(|s| repo().join(s).exists()),
            "no source for the binary {bin}"
        );
    }
}

#[test]
fn the_build_context_holds_what_the_image_copies() {
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    let is_ignored = |path: &str| {
        ignored.iter().any(|p| match p.strip_prefix('*') {
            Some(suffix) => path.ends_with(suffix),
            None => path == p || path.starts_with(&format!("{p}/")),
        })
    };
    assert!(
        is_ignored("target"),
        "the target dir stays out of the context"
    );
    let image = dockerfile("Dockerfile");
    for (op, rest) in &image {
        if op != "COPY" || rest.contains("--from") {
            continue;
        }
        let words: Vec<&str> = rest
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        for source in &words[..words.len() - 1] {
            let source = source.trim_end_matches('/');
            assert!(
                repo().join(source).exists(),
                "COPY {source}: not in the repo"
            );
            assert!(
                !is_ignored(source),
                "COPY {source}: left out by .dockerignore"
            );
        }
    }
}

#[test]
fn the_container_runs_the_repositorys_entrypoint_and_hook() {
    let image = dockerfile("Dockerfile");
    let objects = objects();
    let sts = statefulset(&objects);
    let relayrate = container(sts, "relayrate");
    let entrypoint = installed_at(&image, "deploy/kubernetes/entrypoint.sh");
    let runs = relayrate["command"][0]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| {
            let (_, e) = image.iter().rfind(|(op, _)| op == "ENTRYPOINT").unwrap();
            serde_json::from_str::<Vec<String>>(e).unwrap()[0].clone()
        });
    assert_eq!(runs, entrypoint);
    let (_, image_entrypoint) = image.iter().rfind(|(op, _)| op == "ENTRYPOINT").unwrap();
    assert_eq!(
        serde_json::from_str::<Vec<String>>(image_entrypoint).unwrap(),
        vec![entrypoint]
    );
    let hook = text(relayrate, "/lifecycle/preStop/exec/command/0");
    assert_eq!(hook, installed_at(&image, "deploy/kubernetes/prestop.sh"));
    for script in [
        "deploy/kubernetes/entrypoint.sh",
        "deploy/kubernetes/prestop.sh",
    ] {
        assert!(
            read(script).starts_with("#!/bin/sh\n"),
            "{script}: POSIX sh"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(repo().join(script))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "{script} is executable");
    }
    // The script's default binary is where the image puts it.
    let bin = read("deploy/kubernetes/entrypoint.sh")
        .lines()
        .find_map(|l| {
            l.strip_prefix("bin=${RELAYRATE_BIN:-")
                .map(|r| r.trim_end_matches('}').to_string())
        })
        .expect("the script's RELAYRATE_BIN default");
    let installed = last_stage(&image).iter().any(|(op, r)| {
        op == "COPY"
            && r.contains("relayrate ")
            && r.ends_with(&format!("{}/", Path::new(&bin).parent().unwrap().display()))
    });
    assert!(installed, "the image installs relayrate at {bin}");
}

/// Expands `$(VAR)` with the variables defined before, as the kubelet does.
fn kube_expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = value.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// The container's environment for pod `pod`, fieldRefs filled in.
fn pod_env(relayrate: &Value, pod: &str, namespace: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in list(relayrate, "/env") {
        let name = text(e, "/name").to_string();
        let value = match e
            .pointer("/valueFrom/fieldRef/fieldPath")
            .and_then(Value::as_str)
        {
            Some("metadata.name") => pod.to_string(),
            Some("metadata.namespace") => namespace.to_string(),
            Some(other) => panic!("fieldRef {other} not expected"),
            None => kube_expand(text(e, "/value"), &env),
        };
        env.insert(name, value);
    }
    env
}

/// What the entrypoint script execs in pod `pod`: `relayrate`'s arguments,
/// with the environment and arguments the manifest gives the container.
fn entrypoint_argv(sts: &Value, pod: &str, namespace: &str) -> BTreeMap<String, String> {
    let relayrate = container(sts, "relayrate");
    let dir = tempfile::tempdir().unwrap();
    let stub = dir.path().join("relayrate");
    std::fs::write(&stub, "#!/bin/sh\nprintf '%s\\n' \"$@\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let args: Vec<String> = relayrate["args"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    // The files the environment names (the cluster secret: a Secret's
    // mount), under a stand-in root; the flags are given back without it.
    let root = dir.path().join("root");
    let mut env = pod_env(relayrate, pod, namespace);
    for (name, value) in env.iter_mut() {
        if name.ends_with("_FILE") {
            let file = root.join(value.trim_start_matches('/'));
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, "0123456789abcdef0123456789abcdef").unwrap();
            *value = file.display().to_string();
        }
    }
    // Pod 0 with an empty volume asks the others, as many as the
    // StatefulSet's Scale says: a first start, each in no cluster.
    let scale = dir.path().join("scale.json");
    let replicas = sts["spec"]["replicas"].as_u64().unwrap();
    std::fs::write(
        &scale,
        format!(r#"{{"kind":"Scale","spec":{{"replicas":{replicas}}}}}"#),
    )
    .unwrap();
    let ctl = dir.path().join("relayratectl");
    std::fs::write(&ctl, "#!/bin/sh\necho '{\"members\":[]}'\n").unwrap();
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("sh")
        .arg(repo().join("deploy/kubernetes/entrypoint.sh"))
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .envs(env)
        .env("RELAYRATE_BIN", &stub)
        .env("RELAYRATECTL", &ctl)
        .env("RELAYRATE_SCALE_JSON", &scale)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = root.display().to_string();
    let argv: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|a| a.strip_prefix(&root).unwrap_or(a).to_string())
        .collect();
    assert_eq!(argv[0], "run");
    let mut flags = BTreeMap::new();
    for pair in argv[1..].chunks(2) {
        assert!(pair[0].starts_with("--") && pair.len() == 2, "{argv:?}");
        assert!(
            flags.insert(pair[0].clone(), pair[1].clone()).is_none(),
            "{argv:?}"
        );
    }
    flags
}

/// The main.cf setting `name` in a ConfigMap or file's text.
fn main_cf(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == name).then(|| v.trim().to_string())
    })
}

#[test]
fn the_entrypoint_builds_the_command_line_the_manifests_expect() {
    let objects = objects();
    let sts = statefulset(&objects);
    let ns = text(sts, "/metadata/namespace");
    let name = text(sts, "/metadata/name");
    let relayrate = container(sts, "relayrate");
    let grpc = client_port(relayrate);
    let peer_port = peer_port(relayrate);
    // The pod's name in the headless Service, and a port of it.
    let host = |ordinal: u64, port: u64| {
        format!(
            "{name}-{ordinal}.{}.{ns}.svc.cluster.local:{port}",
            text(sts, "/spec/serviceName")
        )
    };
    // Peers advertise, and join through, their peer listeners.
    let peer = |ordinal: u64| host(ordinal, peer_port);
    // relayratectl in the scripts asks the other pods' client ports.
    let env = pod_env(relayrate, &format!("{name}-2"), ns);
    assert_eq!(
        env["RELAYRATE_CLIENT"].replace("{ordinal}", "0"),
        host(0, grpc)
    );

    let first = entrypoint_argv(sts, &format!("{name}-0"), ns);
    assert_eq!(first["--id"], "1");
    assert!(!first.contains_key("--join"), "pod 0 creates the cluster");
    let third = entrypoint_argv(sts, &format!("{name}-2"), ns);
    assert_eq!(third["--id"], "3");
    assert_eq!(third["--advertise"], peer(2));
    // Every lower ordinal, pod 0 first: a new pod joins while pod 0 is down.
    assert_eq!(third["--join"], format!("{},{}", peer(0), peer(1)));

    for flags in [&first, &third] {
        assert_eq!(port_of(&flags["--listen"]), grpc);
        assert_eq!(port_of(&flags["--peer-listen"]), peer_port);
        // Every pod the same secret file (the mounted Secret).
        assert_eq!(
            flags["--cluster-secret-file"],
            env_value(relayrate, "RELAYRATE_CLUSTER_SECRET_FILE")
        );
        // --data-dir is the claim's mount (volumes_are_claimed_and_mounted).
        assert_eq!(
            flags["--data-dir"],
            env_value(relayrate, "RELAYRATE_DATA_DIR")
        );
        // --policy is a key of the ConfigMap mounted there.
        let policy = Path::new(&flags["--policy"]);
        let mount = list(relayrate, "/volumeMounts")
            .iter()
            .find(|m| policy.parent() == Some(Path::new(text(m, "/mountPath"))))
            .expect("--policy is in a mounted directory");
        let volume = list(sts, "/spec/template/spec/volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let cm = find(&objects, "ConfigMap", text(volume, "/configMap/name"));
        let key = policy.file_name().unwrap().to_str().unwrap();
        assert!(cm["data"].get(key).is_some(), "ConfigMap has no {key}");
        // The Postfix sidecar asks the milter where it listens.
        let postfix = text(
            find(&objects, "ConfigMap", "relayrate-postfix"),
            "/data/main.cf",
        );
        let milter = flags["--milter-listen"].strip_prefix("inet:").unwrap();
        assert!(
            milter.starts_with("127.0.0.1:"),
            "the milter is for this pod only"
        );
        assert_eq!(
            main_cf(postfix, "smtpd_milters").unwrap(),
            format!("inet:{milter}")
        );
        // Prometheus scrapes where the metrics are served.
        let metrics = port_of(&flags["--metrics-listen"]);
        assert_eq!(
            resolve_port(relayrate, &Value::from("metrics")),
            Some(metrics)
        );
        let annotations = &sts["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/port"], metrics.to_string());
    }
}

#[test]
fn the_container_passes_only_flags_relayrate_run_knows() {
    let objects = objects();
    let sts = statefulset(&objects);
    let flags = entrypoint_argv(sts, "relayrate-1", "relayrate");
    let help = Command::new(env!("CARGO_BIN_EXE_relayrate"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let missing: Vec<&String> = flags
        .keys()
        .filter(|f| !help.contains(&format!("{f} ")))
        .collect();
    assert!(
        missing.is_empty(),
        "relayrate run does not know {missing:?}"
    );
}

// ---------------------------------------------------------------------------
// Postfix, sendmail, systemd

/// Skips loudly and returns false when `tool` is missing.
fn have(tool: &str, test: &str) -> bool {
    let found = Path::new(tool).exists();
    if !found {
        common::skip(test, &format!("{tool} is not installed"));
    }
    found
}

/// postconf's warnings about a main.cf (unknown names, bad values).
fn postconf_warnings(main_cf: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("main.cf"), main_cf).unwrap();
    std::fs::copy("/etc/postfix/master.cf", dir.path().join("master.cf")).unwrap();
    let out = Command::new("/usr/sbin/postconf")
        .arg("-c")
        .arg(dir.path())
        .arg("-n")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_postfix_lines_agree_and_postconf_knows_them() {
    let relay = read("deploy/postfix/relay-main.cf");
    let objects = objects();
    let sidecar = text(
        find(&objects, "ConfigMap", "relayrate-postfix"),
        "/data/main.cf",
    );
    let milter_lines = [
        "smtpd_milters",
        "milter_default_action",
        "milter_protocol",
        "milter_connect_timeout",
        "milter_command_timeout",
        "milter_content_timeout",
        "mynetworks",
        "smtpd_relay_restrictions",
    ];
    for name in milter_lines {
        let host = main_cf(&relay, name).unwrap_or_else(|| panic!("relay-main.cf: no {name}"));
        assert_eq!(main_cf(sidecar, name), Some(host), "{name}");
    }
    assert_eq!(
        main_cf(&relay, "milter_default_action").unwrap(),
        "tempfail"
    );
    assert_eq!(main_cf(&relay, "milter_protocol").unwrap(), "6");
    // The seed's web server side: queue every 5 minutes, 15 before a retry.
    let web = read("deploy/postfix/webserver-main.cf");
    assert_eq!(main_cf(&web, "queue_run_delay").unwrap(), "5m");
    assert_eq!(main_cf(&web, "minimal_backoff_time").unwrap(), "15m");
    let transport = read("deploy/postfix/webserver-transport");
    assert!(transport
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["*", "smtp:[1.1.10.10]"]));

    if !have("/usr/sbin/postconf", "postconf checks") {
        return;
    }
    for (file, text) in [
        ("relay-main.cf", relay.as_str()),
        ("webserver-main.cf", &web),
        ("the sidecar's main.cf", sidecar),
    ] {
        let warnings = postconf_warnings(text);
        assert!(warnings.is_empty(), "{file}: {warnings}");
    }
    // And a misspelt name is caught, so the check above can fail.
    assert!(postconf_warnings("milter_defualt_action = tempfail\n").contains("unused parameter"));
}

#[test]
fn the_sendmail_lines_build_a_sendmail_cf() {
    let relay = read("deploy/sendmail/relay.mc");
    let web = read("deploy/sendmail/webserver.mc");
    let mailertable = read("deploy/sendmail/webserver-mailertable");
    assert!(mailertable
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == [".", "esmtp:[1.1.10.10]"]));
    let access = read("deploy/sendmail/relay-access");
    assert!(access
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Connect:1.1.1.11", "RELAY"]));
    // The same milter port as Postfix's and the systemd unit's.
    let postfix = main_cf(&read("deploy/postfix/relay-main.cf"), "smtpd_milters").unwrap();
    let port = port_of(&postfix);
    assert!(relay.contains(&format!("S=inet:{port}@127.0.0.1")));
    assert!(read("deploy/systemd/relayrate.service")
        .contains(&format!("--milter-listen inet:127.0.0.1:{port}")));

    let cf_m4 = "/usr/share/sendmail/cf/m4/cf.m4";
    if !have(cf_m4, "sendmail.cf build (apt-get install sendmail-cf)") {
        return;
    }
    let mc = format!(
        "divert(-1)\ninclude(`{cf_m4}')\ndivert(0)dnl\nOSTYPE(`debian')dnl\nDOMAIN(`generic')dnl\n{relay}{web}MAILER(`local')dnl\nMAILER(`smtp')dnl\n"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("test.mc"), mc).unwrap();
    let out = Command::new("m4")
        .arg(dir.path().join("test.mc"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cf = String::from_utf8(out.stdout).unwrap();
    for line in [
        format!("Xrelayrate, S=inet:{port}@127.0.0.1, F=T, T=C:10s;S:10s;R:10s;E:30s"),
        "O InputMailFilters=relayrate".to_string(),
        "O MinQueueAge=15m".to_string(),
        "Kmailertable hash /etc/mail/mailertable".to_string(),
    ] {
        assert!(cf.lines().any(|l| l == line), "sendmail.cf has no `{line}`");
    }
    assert!(cf.lines().any(|l| l.starts_with("Kaccess ")), "access_db");
}

/// A unit file's `Name=value` settings (the last of each name wins, as
/// far as these tests care).
fn unit(path: &str) -> BTreeMap<String, String> {
    read(path)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn the_systemd_units_are_hardened_and_stop_in_time() {
    let units = [
        "deploy/systemd/relayrate.service",
        "deploy/systemd/relayrate-node.service",
        "deploy/systemd/relayrate-milter.service",
    ];
    for path in units {
        let u = unit(path);
        for (k, v) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("DynamicUser", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(u.get(k).map(String::as_str), Some(v), "{path}: {k}");
        }
        let stop: u64 = u["TimeoutStopSec"].parse().unwrap();
        if path.ends_with("milter.service") {
            assert!(stop >= 10, "{path}");
            continue;
        }
        // The node keeps state and re-reads its policy on SIGHUP.
        assert_eq!(u["StateDirectory"], "relayrate", "{path}");
        assert!(
            u["ExecStart"].contains("--data-dir /var/lib/relayrate"),
            "{path}"
        );
        assert_eq!(u["ExecReload"], "/bin/kill -HUP $MAINPID", "{path}");
        assert!(stop >= DRAIN_SECS + HAND_OVER_SECS + 5, "{path}: {stop} s");
        // The cluster secret: root's file, handed to the dynamic user as a
        // credential (%d is the credentials directory).
        assert_eq!(
            u["LoadCredential"], "cluster-secret:/etc/relayrate/cluster-secret",
            "{path}"
        );
        assert!(
            u["ExecStart"].contains(" --cluster-secret-file %d/cluster-secret "),
            "{path}"
        );
    }

    if !have("/usr/bin/systemd-analyze", "systemd-analyze verify") {
        return;
    }
    // verify checks that ExecStart's program exists: point it at the
    // built binary.
    let dir = tempfile::tempdir().unwrap();
    for path in units {
        let name = Path::new(path).file_name().unwrap();
        let text = read(path).replace("/usr/local/bin/relayrate", env!("CARGO_BIN_EXE_relayrate"));
        std::fs::write(dir.path().join(name), text).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(name))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{path}: {said}"
        );
    }
}

#[test]
fn the_default_file_joins_through_peer_listeners() {
    // Every RELAYRATE_RUN_ARGS / RELAYRATE_NODE_ARGS line, example or not:
    // (subcommand, its arguments).
    let mut lines: Vec<(&str, Vec<String>)> = Vec::new();
    for line in read("deploy/systemd/relayrate.default").lines() {
        let line = line.trim_start_matches('#');
        for (var, sub) in [
            ("RELAYRATE_RUN_ARGS=", "run"),
            ("RELAYRATE_NODE_ARGS=", "node"),
        ] {
            if let Some(value) = line.strip_prefix(var) {
                let words = value.trim_matches('"').split_whitespace().map(String::from);
                lines.push((sub, words.collect()));
            }
        }
    }
    let flag = |words: &[String], name: &str| {
        words
            .iter()
            .position(|w| w == name)
            .map(|i| words[i + 1].clone())
    };
    let mut joins = 0;
    for (sub, words) in &lines {
        // Flags the subcommand knows.
        let help = Command::new(env!("CARGO_BIN_EXE_relayrate"))
            .args([sub, &"--help"])
            .output()
            .unwrap();
        let help = String::from_utf8(help.stdout).unwrap();
        let known: Vec<&str> = help
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| w.starts_with("--"))
            .collect();
        for w in words.iter().filter(|w| w.starts_with("--")) {
            assert!(known.contains(&w.as_str()), "relayrate {sub} has no {w}");
        }
        // --join names another example's peer listener, not a client port.
        if let Some(join) = flag(words, "--join") {
            joins += 1;
            assert!(
                lines
                    .iter()
                    .any(|(s, w)| s == sub
                        && flag(w, "--peer-listen").as_deref() == Some(join.as_str())),
                "--join {join}: no example listens for peers there"
            );
            assert_ne!(Some(join), flag(words, "--peer-listen"));
        }
    }
    assert!(joins >= 2, "an example of joining for run and for node");
}

/// `kubectl apply -k deploy/kubernetes/` applies every manifest of the
/// directory, the namespace first, and nothing else.
#[test]
fn the_kustomization_lists_every_manifest_namespace_first() {
    let k: Value = yaml_serde::from_str(&read("deploy/kubernetes/kustomization.yaml")).unwrap();
    assert_eq!(k["kind"], "Kustomization");
    let listed: Vec<&str> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(listed.first(), Some(&"namespace.yaml"), "{listed:?}");
    let mut files: Vec<String> = std::fs::read_dir(repo().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    files.sort();
    let mut sorted: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
    sorted.sort();
    assert_eq!(sorted, files);
}
