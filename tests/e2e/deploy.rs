//! The Kubernetes manifests (`deploy/k8s`) agree with the settings they ship and with the
//! processes: the settings file loads, ports and probe paths are the ones the processes
//! serve, scale-in gives a worker longer than its own shutdown grace, the autoscaler watches
//! the tasks queue of the deployment's namespace, every Deployment has a disruption budget and
//! resource requests, and every secret the pods read is one docs/deploy.md says to create;
//! and every Kubernetes resource validates, strictly, against the Kubernetes API schemas.

use std::{collections::HashMap, path::PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn k8s_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

/// Every document of every resource file the kustomization lists.
fn resources() -> Vec<Yaml> {
    let dir = k8s_dir();
    let text = std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization");
    let kustomization = YamlLoader::load_from_str(&text).expect("yaml").remove(0);
    let mut out = Vec::new();
    for file in kustomization["resources"].as_vec().expect("resources") {
        let file = file.as_str().expect("a file name");
        let text = std::fs::read_to_string(dir.join(file)).expect(file);
        out.extend(YamlLoader::load_from_str(&text).expect(file));
    }
    out
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s"))
}

fn port_of(listen: &str) -> i64 {
    listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

#[test]
fn the_kubernetes_manifests_agree_with_their_settings_and_the_processes() {
    // The settings file of the ConfigMap loads (unknown keys would be refused), with the
    // secret's variables set as the pods get them.
    let env: HashMap<String, String> = [
        ("FLEETBATCH_AMQP__URL", "amqp://u:p@rabbitmq:5672/%2f"),
        ("FLEETBATCH_REDIS__URL", "redis://redis:6379/"),
        (
            "FLEETBATCH_COORDINATOR__AUTH__BOOTSTRAP_TOKEN",
            "x".repeat(40).as_str(),
        ),
        ("KEDA_RABBITMQ_URL", "amqp://m:p@rabbitmq:5672/%2f"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let settings =
        shared::config::Settings::load_from(Some(&k8s_dir().join("fleetbatch.yaml")), &env)
            .expect("deploy/k8s/fleetbatch.yaml loads");
    let docs = resources();

    for (name, listen, grace) in [
        (
            "coordinator",
            settings.coordinator.listen.as_str(),
            // The coordinator stops after its planners' batch and the results under way.
            30,
        ),
        (
            "worker",
            settings.worker.listen.as_str(),
            settings.worker.shutdown_grace_secs,
        ),
    ] {
        let deployment = find(&docs, "Deployment", name);
        let pod = &deployment["spec"]["template"]["spec"];
        let period = pod["terminationGracePeriodSeconds"]
            .as_i64()
            .expect("grace period");
        assert!(
            period >= grace as i64 + 10,
            "{name}: terminationGracePeriodSeconds {period} leaves no room after its own {grace} s"
        );
        let container = &pod["containers"][0];
        let port = &container["ports"][0];
        assert_eq!(
            port["containerPort"].as_i64(),
            Some(port_of(listen)),
            "{name}: the container port is the one the settings listen on"
        );
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{name} {probe}");
            assert_eq!(get["port"], port["name"], "{name} {probe} port");
        }
        for key in ["cpu", "memory"] {
            assert!(
                !container["resources"]["requests"][key].is_badvalue(),
                "{name}: no {key} request"
            );
        }
        assert!(
            !container["resources"]["limits"]["memory"].is_badvalue(),
            "{name}: no memory limit"
        );
        let pdb = find(&docs, "PodDisruptionBudget", name);
        assert_eq!(
            pdb["spec"]["selector"], deployment["spec"]["selector"],
            "{name}: the disruption budget selects its pods"
        );
    }
    let replicas = find(&docs, "Deployment", "coordinator")["spec"]["replicas"]
        .as_i64()
        .expect("replicas");
    assert!(replicas >= 2, "{replicas} coordinator");

    // The autoscaler watches this deployment's tasks queue, at a depth the planners reach.
    let scaled = find(&docs, "ScaledObject", "worker");
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"].as_str(),
        Some("worker")
    );
    let trigger = &scaled["spec"]["triggers"][0]["metadata"];
    let names = shared::topology::Names::new(&settings.namespace);
    assert_eq!(
        trigger["queueName"].as_str(),
        Some(names.tasks_queue().as_str())
    );
    let per_worker: u32 = trigger["value"]
        .as_str()
        .expect("value")
        .parse()
        .expect("a number");
    assert!(
        per_worker < settings.coordinator.max_queued_tasks,
        "one worker per {per_worker} tasks, but planners keep at most {} in the queue",
        settings.coordinator.max_queued_tasks
    );

    // Every secret a pod or the autoscaler reads is one the deployment guide says to create.
    let guide =
        std::fs::read_to_string(k8s_dir().join("../../docs/deploy.md")).expect("docs/deploy.md");
    let mut secrets = Vec::new();
    for d in &docs {
        let pod = &d["spec"]["template"]["spec"];
        for c in pod["containers"].as_vec().into_iter().flatten() {
            for e in c["envFrom"].as_vec().into_iter().flatten() {
                secrets.extend(e["secretRef"]["name"].as_str());
            }
        }
        for v in pod["volumes"].as_vec().into_iter().flatten() {
            secrets.extend(v["secret"]["secretName"].as_str());
        }
        for r in d["spec"]["secretTargetRef"].as_vec().into_iter().flatten() {
            secrets.extend(r["name"].as_str());
            secrets.extend(r["key"].as_str());
        }
    }
    assert!(secrets.len() >= 3, "{secrets:?}");
    for s in secrets {
        assert!(
            guide.contains(s),
            "docs/deploy.md does not say how to create {s}"
        );
    }

    // Where kubectl is installed, kustomize renders the whole set.
    if let Ok(out) = std::process::Command::new("kubectl")
        .args(["kustomize"])
        .arg(k8s_dir())
        .output()
    {
        assert!(
            out.status.success(),
            "kubectl kustomize deploy/k8s: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The Kubernetes version whose API schemas the manifests must satisfy (the oldest the
/// manifests support, docs/deploy.md).
const KUBERNETES_VERSION: &str = "1.30.0";

#[test]
fn the_kubernetes_manifests_validate_strictly_against_the_kubernetes_schemas() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("agents/validate_k8s.py");
    let out = std::process::Command::new(crate::devices::python())
        .arg(script)
        .arg(KUBERNETES_VERSION)
        .arg(k8s_dir())
        .output()
        .expect("the validator runs");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "invalid manifests:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let valid = report
        .lines()
        .filter(|l| l.contains(r#""result": "valid""#))
        .count();
    // Every resource but KEDA's two custom ones was checked.
    assert_eq!(valid, resources().len() - 2, "{report}");
}
