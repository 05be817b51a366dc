//! Deployment artefacts agree with the binary: the Helm chart (helm/nearcache), the
//! Compose stack (docker-compose.yml) and their nearcache configurations.
//!
//! The chart is rendered by the real Helm 3 and the manifests are checked against the
//! Kubernetes 1.30 schemas by `kubernetes-validate --strict`. `scripts/test` installs both
//! (through `scripts/chart-tools`) into `~/.cache/nearcache-tools/bin`, or
//! `$NEARCACHE_TOOLS/bin`, where this file looks for them before `PATH`; without them the
//! chart tests fail and say so.
//!
//! What is checked:
//! * Chart.yaml and values.yaml parse; `helm lint --strict` passes and `helm template`
//!   renders manifests that pass `kubernetes-validate --strict`, with the default values
//!   and with each optional part switched on ([`CASES`]), each rendering exactly the kinds
//!   it should;
//! * the sidecar (from the example Deployment) only uses flags `nearcache --help` lists, it
//!   listens on 127.0.0.1:6379, its probes and container port are the admin port of its
//!   arguments, its security context is the hardened one, and the pod's grace period
//!   outlasts preStop + shutdown_grace;
//! * passwords and DSNs reach it from Secrets, extraEnv is appended, the TLS Secret is
//!   mounted where the config looks, the ServiceMonitor finds the sidecar's admin port,
//!   and the pod annotation changes exactly when the config does;
//! * the same sidecar renders from an application chart that depends on this one (values
//!   under `nearcache:`), and its volume names the ConfigMap rendered beside it;
//! * every key of the ConfigMap's TOML exists in conf/nearcache.toml and the rendered file
//!   passes `nearcache --check-config`;
//! * the Compose nearcache service publishes the ports its arguments bind, mounts the file
//!   its `--config` names, and deploy/nearcache.compose.toml passes `--check-config`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = "helm/nearcache";
/// The Kubernetes version the manifests are validated against.
const KUBERNETES: &str = "1.30.0";

fn path(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn yaml(text: &str, what: &str) -> Value {
    serde_yaml_ng::from_str(text)
        .unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}\n---\n{text}"))
}

fn to_str(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// helm and kubernetes-validate.

/// Where scripts/chart-tools installs the tools.
fn tools_bin() -> Option<PathBuf> {
    std::env::var_os("NEARCACHE_TOOLS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/nearcache-tools")))
        .map(|dir| dir.join("bin"))
}

fn find_tool(name: &str) -> PathBuf {
    let installed = tools_bin().map(|bin| bin.join(name));
    if let Some(p) = installed.as_ref().filter(|p| p.is_file()) {
        return p.clone();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} not found in {} nor on PATH. Run scripts/test (or just \
                 scripts/chart-tools): it installs helm and kubernetes-validate into \
                 ~/.cache/nearcache-tools/bin, or $NEARCACHE_TOOLS/bin when that is set.",
                installed.map_or("~/.cache/nearcache-tools/bin (HOME is unset)".into(), |p| p
                    .display()
                    .to_string())
            )
        })
}

fn helm_bin() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let helm = find_tool("helm");
        let out = Command::new(&helm)
            .args(["version", "--short"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", helm.display()));
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && version.starts_with("v3."),
            "{} is not Helm 3 ({version}); run scripts/chart-tools",
            helm.display()
        );
        helm
    })
}

fn kubernetes_validate_bin() -> &'static Path {
    static KV: OnceLock<PathBuf> = OnceLock::new();
    KV.get_or_init(|| find_tool("kubernetes-validate"))
}

/// A directory of its own for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nearcache-chart-{}-{label}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs helm with its cache, config and data directories in `scratch` (nothing of the
/// user's helm set-up is read or written) and returns its stdout; fails on an error.
fn helm(scratch: &Scratch, args: &[&str]) -> String {
    let home = scratch.0.join("helm-home");
    let out = Command::new(helm_bin())
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .current_dir(ROOT)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Values files (`helm -f`), one per snippet; helm merges them over the chart's defaults.
fn values_files(scratch: &Scratch, values: &[&str]) -> Vec<String> {
    values
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let file = scratch.write(&format!("values-{i}.yaml"), text);
            file.to_str().unwrap().to_string()
        })
        .collect()
}

fn with_values<'a>(mut args: Vec<&'a str>, files: &'a [String]) -> Vec<&'a str> {
    for f in files {
        args.push("-f");
        args.push(f);
    }
    args
}

fn helm_lint(scratch: &Scratch, chart: &str, values: &[&str]) {
    let files = values_files(scratch, values);
    let out = helm(
        scratch,
        &with_values(vec!["lint", "--strict", chart], &files),
    );
    assert!(
        out.contains("1 chart(s) linted, 0 chart(s) failed"),
        "helm lint:\n{out}"
    );
}

/// `helm template demo <chart> -n apps -f ...`, validated and split into documents.
fn render_chart(scratch: &Scratch, chart: &str, values: &[&str]) -> Rendered {
    let files = values_files(scratch, values);
    let args = with_values(
        vec!["template", "demo", chart, "--namespace", "apps"],
        &files,
    );
    let text = helm(scratch, &args);
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("helm template output is not YAML: {e}\n{text}"))
        })
        .collect();
    for doc in &docs {
        assert!(
            doc["apiVersion"].is_string()
                && doc["kind"].is_string()
                && doc["metadata"]["name"].is_string(),
            "a rendered document lacks apiVersion, kind or metadata.name:\n{text}"
        );
    }
    let rendered = Rendered { text, docs };
    rendered.validate();
    rendered
}

/// The output of one `helm template`.
struct Rendered {
    text: String,
    docs: Vec<Value>,
}

impl Rendered {
    fn kinds(&self) -> BTreeSet<String> {
        self.docs.iter().map(|d| to_str(&d["kind"])).collect()
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn get(&self, kind: &str) -> Option<&Value> {
        let all = self.all(kind);
        assert!(all.len() <= 1, "more than one {kind}:\n{}", self.text);
        all.first().copied()
    }

    fn one(&self, kind: &str) -> &Value {
        self.get(kind)
            .unwrap_or_else(|| panic!("no {kind} rendered:\n{}", self.text))
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} rendered:\n{}", self.text))
    }

    /// The ConfigMap's nearcache.toml.
    fn config(&self) -> String {
        let cm = self.one("ConfigMap");
        cm["data"]["nearcache.toml"]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap without data.nearcache.toml:\n{}", self.text))
            .to_string()
    }

    /// `kubernetes-validate --strict` against the Kubernetes schemas: every built-in
    /// resource must be reported as passed; only the Prometheus Operator's
    /// ServiceMonitor (a CRD) has no schema there.
    fn validate(&self) {
        let mut child = Command::new(kubernetes_validate_bin())
            .args(["--strict", "--kubernetes-version", KUBERNETES, "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubernetes-validate");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(self.text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubernetes-validate --strict (Kubernetes {KUBERNETES}) rejects the rendered chart:\n{report}\n---\n{}",
            self.text
        );
        let minor = KUBERNETES.rsplit_once('.').unwrap().0;
        for doc in &self.docs {
            let kind = to_str(&doc["kind"]);
            let name = to_str(&doc["metadata"]["name"]);
            let expected = if kind == "ServiceMonitor" {
                "Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1"
                    .to_string()
            } else {
                format!(
                    "passed for resource {}/{name} against version {minor}",
                    kind.to_lowercase()
                )
            };
            assert!(
                report.contains(&expected),
                "kubernetes-validate did not report {expected:?}:\n{report}"
            );
        }
        for line in report.lines().filter(|l| !l.starts_with("INFO ")) {
            assert!(
                line.contains("kind ServiceMonitor with api version monitoring.coreos.com/v1"),
                "kubernetes-validate: {line}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Fixtures: values files that switch on each optional part of the chart.

const EXAMPLE: &str = "example: {enabled: true}";
const SERVICE_MONITOR: &str =
    "serviceMonitor: {enabled: true, labels: {release: kube-prometheus-stack}}";
const MONITOR_SELECTOR: &str = "serviceMonitor: {selector: {app.kubernetes.io/name: shop}}";
const PASSWORD: &str = "upstream: {password: s3cret}";
const EXISTING_SECRET: &str = "upstream: {existingSecret: app-redis, existingSecretKey: password}";
const TLS: &str =
    "upstream: {tls: {existingSecret: redis-tls, clientCert: true, serverName: redis.internal}}";
const BIND_POD_IP: &str = "admin: {bindPodIP: true, port: 9200}";
const EXTRA_ENV: &str = "sidecar: {extraEnv: [{name: REDIS_DB, value: \"2\"}]}";
const NO_PRESTOP: &str = "sidecar: {preStopSleepSeconds: 0}";
const CACHE_OFF: &str = "cache: {enabled: false}";
const FULLNAME: &str = "fullnameOverride: shop-cache";
/// The Compose kline route.
const TDENGINE: &str = r#"
tdengine:
  enabled: true
  dsn: taos+ws://root:taosdata@tdengine:6041/market
  routes:
    - key: "kline:{symbol}:{freq}"
      sql: "SELECT ts, open, high, low, close, volume FROM kline_{freq} WHERE symbol = {symbol} ORDER BY ts DESC LIMIT 500"
      ttl: 15m
      params:
        symbol: { pattern: "^[0-9A-Za-z.\\-]{1,16}$", quote: true }
        freq: { allow: ["1m", "5m", "15m", "30m", "60m", "1d", "1w"] }
"#;
const TDENGINE_SECRET: &str = "tdengine: {existingSecret: td-dsn}";

/// Every optional part that adds to the output, at once.
const EVERYTHING: &[&str] = &[
    EXAMPLE,
    SERVICE_MONITOR,
    PASSWORD,
    TLS,
    BIND_POD_IP,
    EXTRA_ENV,
    TDENGINE,
    TDENGINE_SECRET,
];

struct Case {
    name: &'static str,
    values: &'static [&'static str],
    kinds: &'static [&'static str],
}

/// The default values, each toggle on (with the example Deployment, which carries the
/// sidecar), and everything on.
const CASES: &[Case] = &[
    Case {
        name: "defaults",
        values: &[],
        kinds: &["ConfigMap"],
    },
    Case {
        name: "example.enabled",
        values: &[EXAMPLE],
        kinds: &["ConfigMap", "Deployment"],
    },
    Case {
        name: "serviceMonitor.enabled",
        values: &[SERVICE_MONITOR],
        kinds: &["ConfigMap", "Service", "ServiceMonitor"],
    },
    Case {
        name: "serviceMonitor.selector",
        values: &[EXAMPLE, SERVICE_MONITOR, MONITOR_SELECTOR],
        kinds: &["ConfigMap", "Deployment", "Service", "ServiceMonitor"],
    },
    Case {
        name: "upstream.password",
        values: &[EXAMPLE, PASSWORD],
        kinds: &["ConfigMap", "Deployment", "Secret"],
    },
    Case {
        name: "upstream.existingSecret",
        values: &[EXAMPLE, PASSWORD, EXISTING_SECRET],
        kinds: &["ConfigMap", "Deployment"],
    },
    Case {
        name: "upstream.tls",
        values: &[EXAMPLE, TLS],
        kinds: &["ConfigMap", "Deployment"],
    },
    Case {
        name: "admin.bindPodIP",
        values: &[EXAMPLE, BIND_POD_IP],
        kinds: &["ConfigMap", "Deployment"],
    },
    Case {
        name: "sidecar.extraEnv",
        values: &[EXAMPLE, EXTRA_ENV],
        kinds: &["ConfigMap", "Deployment"],
    },
    Case {
        name: "sidecar.preStopSleepSeconds=0",
        values: &[EXAMPLE, NO_PRESTOP],
        kinds: &["ConfigMap", "Deployment"],
    },
    Case {
        name: "cache.enabled=false",
        values: &[EXAMPLE, CACHE_OFF],
        kinds: &["ConfigMap", "Deployment"],
    },
    Case {
        name: "fullnameOverride",
        values: &[EXAMPLE, FULLNAME],
        kinds: &["ConfigMap", "Deployment"],
    },
    Case {
        name: "tdengine.enabled",
        values: &[EXAMPLE, TDENGINE],
        kinds: &["ConfigMap", "Deployment"],
    },
    Case {
        name: "tdengine.existingSecret",
        values: &[EXAMPLE, TDENGINE, TDENGINE_SECRET],
        kinds: &["ConfigMap", "Deployment"],
    },
    Case {
        name: "everything",
        values: EVERYTHING,
        kinds: &[
            "ConfigMap",
            "Deployment",
            "Secret",
            "Service",
            "ServiceMonitor",
        ],
    },
];

/// Renders this chart with `values` (helm template, then kubernetes-validate).
fn render(values: &[&str]) -> Rendered {
    let scratch = Scratch::new("render");
    render_chart(&scratch, CHART, values)
}

fn values() -> Value {
    yaml(&read(&format!("{CHART}/values.yaml")), "values.yaml")
}

fn chart_meta() -> Value {
    yaml(&read(&format!("{CHART}/Chart.yaml")), "Chart.yaml")
}

fn templates() -> Vec<(String, String)> {
    let mut out: Vec<_> = std::fs::read_dir(path(&format!("{CHART}/templates")))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn nearcache(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nearcache"))
        .args(args)
        .env_clear()
        .current_dir(ROOT)
        .output()
        .expect("run nearcache")
}

/// Long flags `nearcache --help` documents.
fn cli_flags() -> BTreeSet<String> {
    let out = nearcache(&["--help"]);
    assert!(out.status.success(), "nearcache --help failed");
    let help = String::from_utf8_lossy(&out.stdout);
    let flags: BTreeSet<String> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .collect();
    for f in [
        "--listen",
        "--admin",
        "--config",
        "--upstream",
        "--check-config",
    ] {
        assert!(
            flags.contains(f),
            "{f} missing from nearcache --help:\n{help}"
        );
    }
    flags
}

/// `--flag value` pairs of an argument list (flags without a value map to "").
fn flag_map(args: &[String], known: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        let (flag, value) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        assert!(
            flag.starts_with("--"),
            "argument {a:?} is not a flag (positional arguments are not accepted)"
        );
        assert!(
            known.contains(&flag),
            "{flag} is not a nearcache flag (nearcache --help lists {known:?})"
        );
        let value = value.or_else(|| {
            if it.peek().is_some_and(|n| !n.starts_with("--")) {
                it.next().cloned()
            } else {
                None
            }
        });
        out.insert(flag, value.unwrap_or_default());
    }
    out
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no port in {addr:?}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
        .iter()
        .map(to_str)
        .collect()
}

/// Every key path of a TOML document: arrays of tables as `[]`, route parameter names as `*`.
fn toml_keys(t: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in t {
        let key = if prefix.ends_with(".params") {
            format!("{prefix}.*")
        } else if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) => toml_keys(sub, &key, out),
            toml::Value::Array(items)
                if items.iter().all(|i| i.is_table()) && !items.is_empty() =>
            {
                for i in items {
                    toml_keys(i.as_table().unwrap(), &format!("{key}[]"), out);
                }
            }
            _ => {
                out.insert(key);
            }
        }
    }
}

/// The keys conf/nearcache.toml documents, including its commented-out [tdengine] example.
fn documented_keys() -> BTreeSet<String> {
    let conf = read("conf/nearcache.toml");
    let mut text = String::new();
    let mut in_example = false;
    for line in conf.lines() {
        if line.trim_start().starts_with("# [tdengine]") {
            in_example = true;
        }
        if in_example {
            text.push_str(
                line.trim_start()
                    .trim_start_matches('#')
                    .strip_prefix(' ')
                    .unwrap_or(""),
            );
        } else {
            text.push_str(line);
        }
        text.push('\n');
    }
    let table: toml::Table =
        toml::from_str(&text).expect("conf/nearcache.toml (with the tdengine example) parses");
    let mut keys = BTreeSet::new();
    toml_keys(&table, "", &mut keys);
    for k in [
        "tdengine.dsn",
        "tdengine.routes[].key",
        "tdengine.routes[].params.*",
    ] {
        assert!(
            keys.iter().any(|x| x.starts_with(k)),
            "expected {k} among the documented keys: {keys:?}"
        );
    }
    keys
}

fn check_config(file: &Path) -> std::process::Output {
    nearcache(&["--check-config", "--config", file.to_str().unwrap()])
}

// ---------------------------------------------------------------------------
// Chart tests.

#[test]
fn chart_metadata_and_values_parse() {
    let meta = chart_meta();
    assert_eq!(meta["apiVersion"], Value::from("v2"));
    assert_eq!(
        meta["name"],
        Value::from("nearcache"),
        "the helpers hard-code the chart name"
    );
    assert_eq!(
        to_str(&meta["appVersion"]),
        env!("CARGO_PKG_VERSION"),
        "Chart.yaml appVersion follows the crate version"
    );
    let helpers = read(&format!("{CHART}/templates/_helpers.tpl"));
    assert!(
        helpers.contains(&format!("default \"{}\"", env!("CARGO_PKG_VERSION"))),
        "nearcache.image's default tag follows appVersion"
    );
    let v = values();
    assert_eq!(v["listenPort"], Value::from(6379));
    assert!(v["admin"]["port"].as_u64().is_some());
    // The default policies are the application's key scheme (config::default_policies).
    let patterns: Vec<String> = v["cache"]["policies"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| to_str(&p["pattern"]))
        .collect();
    let expected: Vec<String> = nearcache::config::default_policies()
        .into_iter()
        .map(|p| p.pattern)
        .collect();
    assert_eq!(patterns, expected);
    // Plain-YAML files elsewhere in the chart (no template actions) must parse as they are.
    for (name, text) in templates() {
        if !text.contains("{{") {
            yaml(&text, &name);
        }
    }
}

fn check_sidecar(c: &Mapping, flags: &BTreeSet<String>) {
    let c = Value::Mapping(c.clone());
    let args = flag_map(&strings(&c["args"]), flags);
    assert_eq!(
        args.get("--listen").map(String::as_str),
        Some("127.0.0.1:6379"),
        "sidecar listen"
    );
    let admin = args.get("--admin").expect("the sidecar sets --admin");
    let admin_port = port_of(admin);
    assert!(
        admin.starts_with("0.0.0.0:") || admin.starts_with("$(POD_IP):"),
        "admin must be reachable by the kubelet: {admin}"
    );
    if admin.contains("$(POD_IP)") {
        let env = c["env"].as_sequence().unwrap();
        let pod_ip = env
            .iter()
            .find(|e| e["name"] == "POD_IP")
            .expect("POD_IP env for $(POD_IP)");
        assert_eq!(
            pod_ip["valueFrom"]["fieldRef"]["fieldPath"],
            Value::from("status.podIP")
        );
    }
    let config = args.get("--config").expect("the sidecar sets --config");
    let mounts = c["volumeMounts"].as_sequence().unwrap();
    let config_mount = mounts
        .iter()
        .find(|m| config.starts_with(&format!("{}/", to_str(&m["mountPath"]))))
        .unwrap_or_else(|| panic!("no volumeMount holds {config}"));
    assert_eq!(config_mount["name"], Value::from("nearcache-config"));

    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        let port = &get["port"];
        let port = if let Some(p) = port.as_u64() {
            p as u16
        } else {
            let name = to_str(port);
            let p = c["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name.as_str());
            p.unwrap_or_else(|| panic!("{probe} names port {name} the container lacks"))
                ["containerPort"]
                .as_u64()
                .unwrap() as u16
        };
        assert_eq!(port, admin_port, "{probe} port vs --admin {admin}");
        let want = if probe == "livenessProbe" {
            "/healthz"
        } else {
            "/readyz"
        };
        assert_eq!(get["path"], Value::from(want), "{probe} path");
    }
    let ports = c["ports"].as_sequence().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p["containerPort"].as_u64() == Some(admin_port as u64)),
        "container ports {ports:?} lack the admin port {admin_port}"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], Value::from(true));
    assert_eq!(sc["runAsUser"], Value::from(10001));
    assert_eq!(sc["readOnlyRootFilesystem"], Value::from(true));
    assert_eq!(sc["allowPrivilegeEscalation"], Value::from(false));
    assert_eq!(
        strings(&sc["capabilities"]["drop"]),
        vec!["ALL".to_string()]
    );
    assert_eq!(sc["seccompProfile"]["type"], Value::from("RuntimeDefault"));
    let res = &c["resources"];
    assert!(
        res["requests"]["memory"].is_string() && res["limits"]["memory"].is_string(),
        "resources: {res:?}"
    );
}

fn pod_spec(dep: &Value) -> &Value {
    &dep["spec"]["template"]["spec"]
}

/// The nearcache container of a Deployment.
fn sidecar_of(dep: &Value) -> Mapping {
    let containers = pod_spec(dep)["containers"]
        .as_sequence()
        .unwrap_or_else(|| panic!("a Deployment without containers: {dep:?}"));
    let ours: Vec<_> = containers
        .iter()
        .filter(|c| c["name"] == "nearcache")
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "exactly one nearcache container: {containers:?}"
    );
    ours[0].as_mapping().unwrap().clone()
}

fn env_var<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_sequence()
        .expect("the sidecar has env")
        .iter()
        .find(|e| e["name"] == name)
}

fn config_checksum(dep: &Value) -> String {
    let sum =
        to_str(&dep["spec"]["template"]["metadata"]["annotations"]["checksum/nearcache-config"]);
    assert!(
        sum.len() == 64 && sum.chars().all(|c| c.is_ascii_hexdigit()),
        "checksum/nearcache-config is not a sha256: {sum:?}"
    );
    sum
}

/// A pod that runs the sidecar: the sidecar itself ([`check_sidecar`]), its volumes (the
/// config volume is the ConfigMap of the same release), the config checksum annotation,
/// and a grace period that outlasts the preStop sleep plus nearcache's shutdown_grace.
fn check_pod(r: &Rendered, dep: &Value, flags: &BTreeSet<String>) {
    let c = Value::Mapping(sidecar_of(dep));
    check_sidecar(c.as_mapping().unwrap(), flags);
    let spec = pod_spec(dep);
    let volumes = spec["volumes"].as_sequence().expect("pod volumes");
    for m in c["volumeMounts"].as_sequence().unwrap() {
        assert!(
            volumes.iter().any(|v| v["name"] == m["name"]),
            "the sidecar mounts {:?}, which the pod lacks: {volumes:?}",
            m["name"]
        );
    }
    let config = volumes
        .iter()
        .find(|v| v["name"] == "nearcache-config")
        .expect("nearcache-config volume");
    assert_eq!(
        config["configMap"]["name"],
        r.one("ConfigMap")["metadata"]["name"],
        "the config volume is the ConfigMap rendered beside it"
    );
    config_checksum(dep);

    let pre_stop = match &c["lifecycle"]["preStop"]["exec"]["command"] {
        Value::Null => 0,
        cmd => {
            let cmd = strings(cmd);
            assert_eq!(cmd.len(), 2, "preStop {cmd:?}");
            assert_eq!(cmd[0], "sleep", "preStop {cmd:?}");
            cmd[1].parse().expect("preStop sleep seconds")
        }
    };
    let table: toml::Table = toml::from_str(&r.config()).expect("the ConfigMap's TOML parses");
    let shutdown = humantime::parse_duration(table["shutdown_grace"].as_str().unwrap()).unwrap();
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) > Duration::from_secs(pre_stop) + shutdown,
        "terminationGracePeriodSeconds {grace} must exceed preStop sleep {pre_stop}s + shutdown_grace {shutdown:?}"
    );
}

/// The ConfigMap's keys all exist in conf/nearcache.toml and `nearcache --check-config`
/// accepts it (the TLS files, mounted from a Secret in the pod, stood in under `scratch`).
/// Returns the file as checked.
fn check_rendered_config(
    scratch: &Scratch,
    r: &Rendered,
    documented: &BTreeSet<String>,
    label: &str,
) -> String {
    let text = r.config();
    let table: toml::Table = toml::from_str(&text)
        .unwrap_or_else(|e| panic!("ConfigMap TOML ({label}) does not parse: {e}\n{text}"));
    let mut keys = BTreeSet::new();
    toml_keys(&table, "", &mut keys);
    let unknown: Vec<_> = keys.difference(documented).collect();
    assert!(
        unknown.is_empty(),
        "ConfigMap ({label}) renders keys conf/nearcache.toml lacks: {unknown:?}"
    );
    let tls = scratch.0.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    for f in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::write(tls.join(f), "test").unwrap();
    }
    let local = text.replace("/etc/nearcache-tls/", &format!("{}/", tls.display()));
    let file = scratch.write("nearcache.toml", &local);
    let out = check_config(&file);
    assert!(
        out.status.success(),
        "nearcache --check-config rejects the chart's ConfigMap ({label}; if the message is about \
         [tdengine], the TDengine module may not have landed yet): {}\n{local}",
        String::from_utf8_lossy(&out.stderr)
    );
    local
}

#[test]
fn chart_lints_renders_and_validates_with_each_toggle() {
    let flags = cli_flags();
    let documented = documented_keys();
    for case in CASES {
        eprintln!("case {}: {:?}", case.name, case.values);
        let scratch = Scratch::new("case");
        helm_lint(&scratch, CHART, case.values);
        let r = render_chart(&scratch, CHART, case.values);
        let want: BTreeSet<String> = case.kinds.iter().map(|k| k.to_string()).collect();
        assert_eq!(r.kinds(), want, "{}: rendered kinds", case.name);
        assert_eq!(
            r.docs.len(),
            want.len(),
            "{}: one document of each kind:\n{}",
            case.name,
            r.text
        );
        for doc in &r.docs {
            assert_eq!(
                doc["metadata"]["labels"]["app.kubernetes.io/instance"],
                Value::from("demo"),
                "{}: {} labels",
                case.name,
                to_str(&doc["kind"])
            );
        }
        if let Some(dep) = r.get("Deployment") {
            check_pod(&r, dep, &flags);
        }
        check_rendered_config(&scratch, &r, &documented, case.name);
    }
}

#[test]
fn sidecar_defaults_match_the_values_and_the_docs() {
    let r = render(&[EXAMPLE]);
    let c = Value::Mapping(sidecar_of(r.one("Deployment")));
    let args = strings(&c["args"]).join(" ");
    assert_eq!(
        args,
        "--listen 127.0.0.1:6379 --admin 0.0.0.0:9121 --config /etc/nearcache/nearcache.toml --log-format json"
    );
    for doc in ["docs/deploy.md", "helm/nearcache/README.md"] {
        assert!(
            read(doc).contains(&args),
            "{doc} should show the sidecar's arguments as rendered: {args}"
        );
    }
    assert!(env_var(&c, "REDIS_PASSWORD").is_none(), "no password set");
    assert!(
        env_var(&c, "TDENGINE_DSN").is_none(),
        "no TDengine Secret set"
    );
    assert_eq!(
        env_var(&c, "RUST_LOG").unwrap()["value"],
        Value::from("info")
    );
    let v = values();
    assert_eq!(
        strings(&c["lifecycle"]["preStop"]["exec"]["command"]),
        ["sleep", &to_str(&v["sidecar"]["preStopSleepSeconds"])]
    );
    assert_eq!(c["resources"], v["sidecar"]["resources"]);
    assert_eq!(c["securityContext"], v["sidecar"]["securityContext"]);
    assert_eq!(
        c["image"],
        Value::from(format!(
            "ghcr.io/example/nearcache:{}",
            env!("CARGO_PKG_VERSION")
        ))
    );

    // preStopSleepSeconds: 0 drops the hook.
    let r = render(&[EXAMPLE, NO_PRESTOP]);
    let c = Value::Mapping(sidecar_of(r.one("Deployment")));
    assert!(c["lifecycle"].is_null(), "lifecycle: {:?}", c["lifecycle"]);
}

#[test]
fn admin_can_bind_the_pod_ip() {
    let r = render(&[EXAMPLE, BIND_POD_IP]);
    let c = Value::Mapping(sidecar_of(r.one("Deployment")));
    let args = flag_map(&strings(&c["args"]), &cli_flags());
    assert_eq!(args["--admin"], "$(POD_IP):9200");
    assert_eq!(c["ports"][0]["containerPort"], Value::from(9200));
}

#[test]
fn passwords_and_dsns_come_from_secrets() {
    // upstream.password: the chart's Secret, referenced by name and key.
    let r = render(&[EXAMPLE, PASSWORD]);
    let c = Value::Mapping(sidecar_of(r.one("Deployment")));
    let secret = r.one("Secret");
    assert_eq!(secret["metadata"]["name"], Value::from("demo-nearcache"));
    assert_eq!(
        secret["data"]["redis-password"],
        Value::from("czNjcmV0"),
        "base64 of s3cret"
    );
    let pw = env_var(&c, "REDIS_PASSWORD").expect("REDIS_PASSWORD");
    assert_eq!(
        pw["valueFrom"]["secretKeyRef"]["name"],
        secret["metadata"]["name"]
    );
    assert_eq!(
        pw["valueFrom"]["secretKeyRef"]["key"],
        Value::from("redis-password")
    );
    assert!(
        !r.config().contains("s3cret"),
        "the password must not be in the ConfigMap"
    );

    // upstream.existingSecret wins over password, and the chart creates no Secret.
    let r = render(&[EXAMPLE, PASSWORD, EXISTING_SECRET]);
    assert!(
        r.get("Secret").is_none(),
        "no Secret with existingSecret:\n{}",
        r.text
    );
    let c = Value::Mapping(sidecar_of(r.one("Deployment")));
    let pw = env_var(&c, "REDIS_PASSWORD").expect("REDIS_PASSWORD from existingSecret");
    assert_eq!(
        pw["valueFrom"]["secretKeyRef"]["name"],
        Value::from("app-redis")
    );
    assert_eq!(
        pw["valueFrom"]["secretKeyRef"]["key"],
        Value::from("password")
    );

    // tdengine.existingSecret: the whole DSN as TDENGINE_DSN.
    let r = render(&[EXAMPLE, TDENGINE, TDENGINE_SECRET]);
    let c = Value::Mapping(sidecar_of(r.one("Deployment")));
    let dsn = env_var(&c, "TDENGINE_DSN").expect("TDENGINE_DSN");
    assert_eq!(
        dsn["valueFrom"]["secretKeyRef"]["name"],
        Value::from("td-dsn")
    );
    assert_eq!(
        dsn["valueFrom"]["secretKeyRef"]["key"],
        Value::from("tdengine-dsn")
    );

    // sidecar.extraEnv is appended after the chart's own variables.
    let r = render(&[EXAMPLE, PASSWORD, EXTRA_ENV]);
    let c = Value::Mapping(sidecar_of(r.one("Deployment")));
    let env = c["env"].as_sequence().unwrap();
    assert_eq!(
        env.len(),
        4,
        "POD_IP, RUST_LOG, REDIS_PASSWORD, REDIS_DB: {env:?}"
    );
    assert_eq!(env[3], yaml("{name: REDIS_DB, value: \"2\"}", "REDIS_DB"));
}

#[test]
fn tls_secret_is_mounted_where_the_config_looks() {
    let r = render(&[EXAMPLE, TLS]);
    let dep = r.one("Deployment");
    let c = Value::Mapping(sidecar_of(dep));
    let vol = pod_spec(dep)["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "nearcache-tls")
        .expect("nearcache-tls volume");
    assert_eq!(vol["secret"]["secretName"], Value::from("redis-tls"));
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "nearcache-tls")
        .expect("nearcache-tls mount");
    assert_eq!(mount["readOnly"], Value::from(true));
    let dir = format!("{}/", to_str(&mount["mountPath"]));
    let table: toml::Table = toml::from_str(&r.config()).unwrap();
    let tls = table["upstream"]["tls"]
        .as_table()
        .expect("[upstream.tls] rendered");
    for (key, file) in [
        ("ca_file", "ca.crt"),
        ("cert_file", "tls.crt"),
        ("key_file", "tls.key"),
    ] {
        assert_eq!(
            tls.get(key).and_then(|v| v.as_str()),
            Some(format!("{dir}{file}").as_str()),
            "{key} in the mounted Secret"
        );
    }
    assert_eq!(tls["server_name"].as_str(), Some("redis.internal"));

    // Without a TLS Secret: no volume, no mount, no [upstream.tls].
    let r = render(&[EXAMPLE]);
    let dep = r.one("Deployment");
    assert_eq!(pod_spec(dep)["volumes"].as_sequence().unwrap().len(), 1);
    assert_eq!(
        Value::Mapping(sidecar_of(dep))["volumeMounts"]
            .as_sequence()
            .unwrap()
            .len(),
        1
    );
    let table: toml::Table = toml::from_str(&r.config()).unwrap();
    assert!(table["upstream"].get("tls").is_none());
}

#[test]
fn configmap_carries_the_values() {
    // The policies arrive exactly as in the values (lock:* uncached).
    let r = render(&[]);
    let cfg =
        nearcache::Config::from_toml(&r.config()).unwrap_or_else(|e| panic!("{e}\n{}", r.config()));
    let lock = cfg
        .cache
        .policies
        .iter()
        .find(|p| p.pattern == "lock:*")
        .unwrap();
    assert!(lock.ttl.is_none(), "lock:* must not be cached");
    assert_eq!(cfg.cache.policies.len(), 4);
    let table: toml::Table = toml::from_str(&r.config()).unwrap();
    assert_eq!(table["cache"]["enabled"].as_bool(), Some(true));
    assert!(table.get("tdengine").is_none());

    let r = render(&[CACHE_OFF]);
    let table: toml::Table = toml::from_str(&r.config()).unwrap();
    assert_eq!(table["cache"]["enabled"].as_bool(), Some(false));

    // The Compose kline route, with its escapes intact.
    let scratch = Scratch::new("tdengine");
    let r = render_chart(&scratch, CHART, EVERYTHING);
    let local = check_rendered_config(&scratch, &r, &documented_keys(), "everything");
    let cfg = nearcache::Config::from_toml(&local).unwrap();
    let td = cfg.tdengine.expect("tdengine section rendered");
    assert_eq!(td.dsn, "taos+ws://root:taosdata@tdengine:6041/market");
    assert_eq!(td.routes.len(), 1);
    assert_eq!(td.routes[0].key, "kline:{symbol}:{freq}");
    assert_eq!(td.routes[0].ttl, Duration::from_secs(15 * 60));
    let symbol = &td.routes[0]
        .params
        .iter()
        .find(|(n, _)| n == "symbol")
        .unwrap()
        .1;
    assert_eq!(
        symbol.pattern.as_deref(),
        Some("^[0-9A-Za-z.\\-]{1,16}$"),
        "escapes survive rendering"
    );
    assert!(symbol.quote);
    let freq = &td.routes[0]
        .params
        .iter()
        .find(|(n, _)| n == "freq")
        .unwrap()
        .1;
    assert_eq!(freq.allow.as_ref().map(Vec::len), Some(7));
    assert!(!freq.quote);
}

#[test]
fn pod_annotation_changes_exactly_when_the_config_does() {
    let checksum = |values: &[&str]| config_checksum(render(values).one("Deployment"));
    let base = checksum(&[EXAMPLE]);
    assert_eq!(
        base,
        checksum(&[EXAMPLE, EXTRA_ENV]),
        "extraEnv is not part of the config"
    );
    assert_ne!(base, checksum(&[EXAMPLE, CACHE_OFF]));
    assert_ne!(base, checksum(&[EXAMPLE, TDENGINE]));
}

#[test]
fn service_monitor_scrapes_the_sidecar_admin_port() {
    let r = render(EVERYTHING);
    let dep = r.one("Deployment");
    let c = Value::Mapping(sidecar_of(dep));
    let admin = port_of(&flag_map(&strings(&c["args"]), &cli_flags())["--admin"]);
    let svc = r.one("Service");
    let sm = r.one("ServiceMonitor");
    assert_eq!(svc["spec"]["clusterIP"], Value::from("None"));

    let subset = |small: &Value, big: &Value, what: &str| {
        let small = small
            .as_mapping()
            .unwrap_or_else(|| panic!("{what}: {small:?}"));
        assert!(!small.is_empty(), "{what} is empty");
        for (k, v) in small {
            assert_eq!(big.get(k), Some(v), "{what}: {k:?} vs {big:?}");
        }
    };
    subset(
        &sm["spec"]["selector"]["matchLabels"],
        &svc["metadata"]["labels"],
        "the ServiceMonitor selects the metrics Service",
    );
    subset(
        &svc["spec"]["selector"],
        &dep["spec"]["template"]["metadata"]["labels"],
        "the Service selects the example pods",
    );
    assert_eq!(
        strings(&sm["spec"]["namespaceSelector"]["matchNames"]),
        ["apps"]
    );
    assert_eq!(
        sm["metadata"]["labels"]["release"],
        Value::from("kube-prometheus-stack")
    );
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], Value::from("/metrics"));
    let svc_port = svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == endpoint["port"])
        .unwrap_or_else(|| panic!("the Service has no port {:?}", endpoint["port"]));
    assert_eq!(svc_port["port"].as_u64(), Some(admin as u64));
    let target = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == svc_port["targetPort"])
        .unwrap_or_else(|| panic!("the sidecar has no port {:?}", svc_port["targetPort"]));
    assert_eq!(target["containerPort"].as_u64(), Some(admin as u64));

    // serviceMonitor.selector points the Service at the application's pods instead.
    let r = render(&[SERVICE_MONITOR, MONITOR_SELECTOR]);
    assert_eq!(
        r.one("Service")["spec"]["selector"],
        yaml("{app.kubernetes.io/name: shop}", "selector")
    );
}

#[test]
fn fullname_override_names_the_configmap_the_pod_mounts() {
    for (values, name) in [
        (&[EXAMPLE][..], "demo-nearcache"),
        (&[EXAMPLE, FULLNAME][..], "shop-cache"),
    ] {
        let r = render(values);
        assert_eq!(r.one("ConfigMap")["metadata"]["name"], Value::from(name));
        let vols = &pod_spec(r.one("Deployment"))["volumes"];
        assert_eq!(vols[0]["name"], Value::from("nearcache-config"));
        assert_eq!(vols[0]["configMap"]["name"], Value::from(name));
    }
}

/// The pod template of an application's Deployment, as helm/nearcache/README.md shows it.
const APP_DEPLOYMENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-shop
spec:
  replicas: {{ .Values.replicaCount }}
  selector:
    matchLabels:
      app.kubernetes.io/name: shop
  template:
    metadata:
      labels:
        app.kubernetes.io/name: shop
      annotations:
        {{- include "nearcache.podAnnotations" . | nindent 8 }}
    spec:
      terminationGracePeriodSeconds: 30
      containers:
        - name: app
          image: {{ .Values.image.repository }}:1.2.3
          env:
            - name: REDIS_HOST
              value: 127.0.0.1
            - name: REDIS_PORT
              value: "6379"
        {{- include "nearcache.sidecar" . | nindent 8 }}
      volumes:
        {{- include "nearcache.volumes" . | nindent 8 }}
"#;

#[test]
fn sidecar_renders_from_an_application_chart() {
    // An application chart that depends on nearcache: our values live under `nearcache:`.
    let scratch = Scratch::new("app");
    let meta = chart_meta();
    scratch.write(
        "shop/Chart.yaml",
        &format!(
            "apiVersion: v2\nname: shop\nversion: 1.0.0\ndependencies:\n  - name: nearcache\n    version: {}\n    repository: file://{}\n",
            to_str(&meta["version"]),
            path(CHART).display()
        ),
    );
    scratch.write(
        "shop/values.yaml",
        "replicaCount: 2\nimage: {repository: my/app}\n",
    );
    scratch.write("shop/templates/deployment.yaml", APP_DEPLOYMENT);
    let app = scratch.0.join("shop");
    let app = app.to_str().unwrap();
    helm(&scratch, &["dependency", "build", app]);
    helm_lint(&scratch, app, &[]);
    let flags = cli_flags();

    for (app_values, own_values) in [(&[][..], &[EXAMPLE][..]), (EVERYTHING, EVERYTHING)] {
        let nested: Vec<String> = app_values
            .iter()
            .map(|v| {
                let mut m = Mapping::new();
                m.insert("nearcache".into(), yaml(v, "values"));
                serde_yaml_ng::to_string(&m).unwrap()
            })
            .collect();
        let nested: Vec<&str> = nested.iter().map(String::as_str).collect();
        let from_app = render_chart(&scratch, app, &nested);
        let own = render_chart(&scratch, CHART, own_values);
        let shop = from_app.named("Deployment", "demo-shop");
        let example = own.one("Deployment");
        assert_eq!(
            sidecar_of(shop),
            sidecar_of(example),
            "the sidecar must not depend on the including chart"
        );
        assert_eq!(pod_spec(shop)["volumes"], pod_spec(example)["volumes"]);
        assert_eq!(config_checksum(shop), config_checksum(example));
        assert_eq!(
            from_app.one("ConfigMap"),
            own.one("ConfigMap"),
            "the dependency renders the same ConfigMap"
        );
        check_pod(&from_app, shop, &flags);
        let app_container = &pod_spec(shop)["containers"][0];
        assert_eq!(app_container["image"], Value::from("my/app:1.2.3"));
    }
}

// ---------------------------------------------------------------------------
// Compose.

fn compose() -> Value {
    yaml(&read("docker-compose.yml"), "docker-compose.yml")
}

fn compose_args(svc: &Value) -> Vec<String> {
    match &svc["command"] {
        Value::Sequence(_) => strings(&svc["command"]),
        Value::String(s) => s.split_whitespace().map(String::from).collect(),
        Value::Null => vec![
            "--listen".into(),
            "0.0.0.0:6380".into(),
            "--admin".into(),
            "0.0.0.0:9121".into(),
        ],
        other => panic!("unexpected command {other:?}"),
    }
}

#[test]
fn compose_nearcache_ports_agree_with_its_arguments() {
    let c = compose();
    let services = c["services"].as_mapping().unwrap();
    for s in [
        "redis",
        "tdengine",
        "tdengine-init",
        "nearcache",
        "example-client",
    ] {
        assert!(services.contains_key(s), "compose service {s} missing");
    }
    let nc = &c["services"]["nearcache"];
    let args = flag_map(&compose_args(nc), &cli_flags());
    let listen = args.get("--listen").expect("--listen");
    let admin = args.get("--admin").expect("--admin");
    assert!(
        listen.starts_with("0.0.0.0:") && admin.starts_with("0.0.0.0:"),
        "bind all interfaces in a container"
    );
    let container_ports: BTreeSet<u16> = strings(&nc["ports"])
        .iter()
        .map(|p| {
            p.rsplit(':')
                .next()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(
        container_ports,
        BTreeSet::from([port_of(listen), port_of(admin)]),
        "published ports vs arguments"
    );
    let hc = strings(&nc["healthcheck"]["test"]).join(" ");
    assert!(
        hc.contains(&format!("/{}", port_of(admin))) && hc.contains("/readyz"),
        "healthcheck: {hc}"
    );

    // --config names the mounted deploy/nearcache.compose.toml.
    let config = args.get("--config").expect("--config");
    let mount = strings(&nc["volumes"])
        .into_iter()
        .find(|m| m.split(':').nth(1) == Some(config.as_str()))
        .unwrap_or_else(|| panic!("no volume mounts {config}"));
    assert_eq!(
        mount.split(':').next(),
        Some("./deploy/nearcache.compose.toml")
    );

    // Redis publishes keyspace events, so the invalidation feed works.
    let redis_cmd = strings(&c["services"]["redis"]["command"]).join(" ");
    assert!(
        redis_cmd.contains("--notify-keyspace-events KEA"),
        "{redis_cmd}"
    );

    // Every table the route can name exists in the seed SQL.
    let sql = read("deploy/tdengine-init.sql");
    let cfg = nearcache::Config::from_toml(&read("deploy/nearcache.compose.toml"))
        .expect("compose TOML parses");
    assert_eq!(cfg.upstream.url.address(), "redis:6379");
    let td = cfg
        .tdengine
        .expect("compose config has a [tdengine] section");
    let route = td
        .routes
        .iter()
        .find(|r| r.key == "kline:{symbol}:{freq}")
        .expect("kline route");
    let freqs = route
        .params
        .iter()
        .find(|(n, _)| n == "freq")
        .unwrap()
        .1
        .allow
        .clone()
        .unwrap();
    for f in freqs {
        assert!(
            sql.contains(&format!("market.kline_{f} (")),
            "tdengine-init.sql lacks kline_{f}"
        );
    }
}

#[test]
fn compose_config_passes_check_config() {
    let out = check_config(&path("deploy/nearcache.compose.toml"));
    assert!(
        out.status.success(),
        "nearcache --check-config --config deploy/nearcache.compose.toml failed ({}). If this is about [tdengine], \
         the TDengine module may not support this section yet.\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Dashboard and guide.

/// `nearcache_*` names in a text (histogram series reduced to the histogram's name).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("nearcache_") {
        let word_start = rest[..i]
            .chars()
            .last()
            .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
        let tail = &rest[i + "nearcache_".len()..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = format!("nearcache_{}", &tail[..len]);
        if word_start && len > 0 {
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name)
                .to_string();
            out.insert(name);
        }
        rest = &tail[len..];
    }
    out
}

#[test]
fn dashboard_and_guide_use_real_metric_names() {
    let defined = metric_names(&read("src/metrics.rs"));
    assert!(
        defined.contains("nearcache_cache_hits_total") && defined.len() > 20,
        "{defined:?}"
    );
    let dash_text = read("deploy/grafana-dashboard.json");
    let dash = yaml(&dash_text, "deploy/grafana-dashboard.json");
    assert_eq!(dash["uid"], Value::from("nearcache"));
    let vars = dash["templating"]["list"].as_sequence().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "the Prometheus data source is a variable"
    );
    let used = metric_names(&dash_text);
    let unknown: Vec<_> = used.difference(&defined).collect();
    assert!(
        unknown.is_empty(),
        "dashboard uses metrics src/metrics.rs does not define: {unknown:?}"
    );
    let missing: Vec<_> = defined.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "metrics without a dashboard panel: {missing:?}"
    );
    for doc in ["docs/deploy.md", "helm/nearcache/README.md"] {
        let unknown: Vec<_> = metric_names(&read(doc))
            .difference(&defined)
            .cloned()
            .collect();
        assert!(
            unknown.is_empty(),
            "{doc} names metrics src/metrics.rs does not define: {unknown:?}"
        );
    }
}
