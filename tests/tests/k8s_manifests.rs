//! The Kubernetes manifests as `kubectl apply -k` would send them (issue 17): `kubectl kustomize`
//! (the machine's, from the Google Cloud SDK) renders `k8s/`, with and without the Cloud SQL Auth
//! Proxy component, and the emulators' Python (PyYAML) turns the YAML into JSON to check.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// The rendered objects of a kustomization directory.
fn render(dir: &Path) -> Vec<Value> {
    let kustomize = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("kubectl is needed (it ships with the Google Cloud SDK): {e}"));
    assert!(
        kustomize.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&kustomize.stderr)
    );
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/emulators/venv/bin/python");
    let mut to_json = Command::new(&python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{} is needed: bash tests/emulators.sh start installs it ({e})",
                python.display()
            )
        });
    use std::io::Write as _;
    to_json
        .stdin
        .take()
        .unwrap()
        .write_all(&kustomize.stdout)
        .unwrap();
    let out = to_json.wait_with_output().unwrap();
    assert!(out.status.success(), "PyYAML could not read the render");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn deployments(objects: &[Value]) -> Vec<&Value> {
    objects
        .iter()
        .filter(|o| o["kind"] == "Deployment")
        .collect()
}

fn container_ports(container: &Value) -> Vec<u64> {
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect()
}

#[test]
fn the_cloud_sql_proxy_component_adds_a_native_sidecar_to_the_dispatcher_and_workers() {
    let k8s = Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s");
    // The base alone: no proxy (not every source is on Cloud SQL).
    let base = render(&k8s);
    let names: Vec<&str> = deployments(&base)
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["shardflow-dispatcher", "shardflow-worker"]);
    for d in deployments(&base) {
        assert!(d["spec"]["template"]["spec"]["initContainers"].is_null());
    }

    // With the component, as the README says to enable it.
    let dir = common::scratch("k8s-with-proxy");
    for entry in std::fs::read_dir(&k8s).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::create_dir_all(dir.join("cloudsql-proxy")).unwrap();
    for file in ["kustomization.yaml", "sidecar.yaml"] {
        std::fs::copy(
            k8s.join("cloudsql-proxy").join(file),
            dir.join("cloudsql-proxy").join(file),
        )
        .unwrap();
    }
    let mut kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    kustomization.push_str("components:\n  - cloudsql-proxy\n");
    std::fs::write(dir.join("kustomization.yaml"), kustomization).unwrap();

    let with_proxy = render(&dir);
    assert_eq!(deployments(&with_proxy).len(), 2);
    for d in deployments(&with_proxy) {
        let name = d["metadata"]["name"].as_str().unwrap();
        let pod = &d["spec"]["template"]["spec"];
        let sidecars = pod["initContainers"].as_array().expect("an init container");
        assert_eq!(sidecars.len(), 1, "{name}");
        let proxy = &sidecars[0];
        assert_eq!(proxy["name"], "cloud-sql-proxy", "{name}");
        // Native sidecar: up (startup probe passed) before shardflow starts, down after it.
        assert_eq!(proxy["restartPolicy"], "Always", "{name}");
        assert_eq!(
            proxy["startupProbe"]["httpGet"]["path"], "/startup",
            "{name}"
        );
        let image = proxy["image"].as_str().unwrap();
        assert!(
            image.starts_with("gcr.io/cloud-sql-connectors/cloud-sql-proxy:2."),
            "{name}: {image}"
        );
        let security = &proxy["securityContext"];
        assert_eq!(security["runAsNonRoot"], true, "{name}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
        // The proxy's listeners, its health port and shardflow's metrics port never collide.
        let args: Vec<&str> = proxy["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let mut ports: Vec<u64> = args
            .iter()
            .filter_map(|a| a.split_once("?port=").map(|(_, p)| p.parse().unwrap()))
            .collect();
        assert!(
            !ports.is_empty(),
            "{name}: instances with a local port each"
        );
        assert!(args.contains(&"--health-check"), "{name}");
        // The health server listens where the probes look: --http-port (the proxy's default
        // is 9090, shardflow's metrics port) is the declared port.
        let health: u64 = args
            .iter()
            .find_map(|a| a.strip_prefix("--http-port="))
            .unwrap_or_else(|| panic!("{name}: no --http-port (the default 9090 collides)"))
            .parse()
            .unwrap();
        assert_eq!(container_ports(proxy), [health], "{name}");
        assert_eq!(
            proxy["startupProbe"]["httpGet"]["port"], proxy["ports"][0]["name"],
            "{name}"
        );
        assert!(args.contains(&"--structured-logs"), "{name}");
        ports.extend(container_ports(proxy));
        for container in pod["containers"].as_array().unwrap() {
            ports.extend(container_ports(container));
        }
        let mut unique = ports.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            ports.len(),
            "{name}: ports collide: {ports:?}"
        );
        // shardflow's own container is untouched.
        let own = &pod["containers"][0];
        assert_eq!(own["ports"][0]["containerPort"], 9090, "{name}");
    }
}
