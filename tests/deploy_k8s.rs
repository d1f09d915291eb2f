//! The deployment files of `deploy/`, checked offline: no Kubernetes API server can run here.
//!
//! - Every overlay of `deploy/k8s/overlays` renders with `kubectl kustomize`, and
//!   `kubernetes-validate --strict` accepts every rendered object for Kubernetes 1.30 and for the
//!   newest version it knows (strict: a misspelled field is an error, not ignored).
//! - Every component of `deploy/k8s/components` renders on top of the cpu overlay; its objects
//!   are custom resources (PodMonitor, cert-manager) or checked ones (HPA), and each is checked
//!   against the workloads it refers to (selected pods and ports, certificate names against the
//!   URLs the clients dial, the autoscaler's target).
//! - Every `hindsight` command line in `deploy/` (rendered Kubernetes objects, and compose
//!   files where they exist) passes only flags and `HINDSIGHT_*` variables that its subcommand
//!   accepts, and every port in a container, probe, Service or scrape annotation is one the
//!   process listens on, on an address other than loopback when it is reached from outside.
//!   The accepted flags, variables and defaults come from the real binary's `--help`.
//!
//! Needs `kubectl` and `python3`: kubernetes-validate (PyPI) is installed into
//! `${HINDSIGHT_CACHE:-~/.cache/hindsight}/venv-k8s` if missing, and its PyYAML parses YAML for
//! the checks. Without them the tests fail with a message that says what is missing; they never
//! skip.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

/// The validator release the checks are written against (its schemas: Kubernetes 1.25-1.37).
const KUBERNETES_VALIDATE: &str = "1.37.0";
/// The oldest Kubernetes version the manifests must be valid for.
const OLDEST_KUBERNETES: &str = "1.30.0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn k8s_dir() -> PathBuf {
    repo().join("deploy/k8s")
}

/// `path` relative to the repository, for messages.
fn shown(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// Tools: kubectl and a virtual environment with kubernetes-validate.

struct Tools {
    kubectl: PathBuf,
    python: PathBuf,
    /// The newest Kubernetes version the validator has schemas for.
    newest: String,
}

fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let kubectl = PathBuf::from(std::env::var_os("KUBECTL").unwrap_or("kubectl".into()));
        match Command::new(&kubectl)
            .args(["version", "--client"])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "`{} version --client` failed: {}\nThe Kubernetes manifests are validated with \
                 `kubectl kustomize`; install kubectl (or set KUBECTL) to run these tests.",
                kubectl.display(),
                output_text(&out)
            ),
            Err(e) => panic!(
                "cannot run `{}`: {e}\nThe Kubernetes manifests are validated with `kubectl \
                 kustomize`; install kubectl (https://kubernetes.io/docs/tasks/tools/) or set \
                 KUBECTL to run these tests.",
                kubectl.display()
            ),
        }
        let python = validator_venv();
        let out = Command::new(&python)
            .args([
                "-c",
                "import kubernetes_validate.utils as u; print(u.latest_version())",
            ])
            .output()
            .expect("running the venv's python");
        assert!(
            out.status.success(),
            "asking kubernetes-validate for its newest version: {}",
            output_text(&out)
        );
        let newest = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            version_key(&newest) >= version_key(OLDEST_KUBERNETES),
            "kubernetes-validate's newest version {newest} is older than {OLDEST_KUBERNETES}"
        );
        Tools {
            kubectl,
            python,
            newest,
        }
    })
}

fn version_key(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

/// The python of `${HINDSIGHT_CACHE:-~/.cache/hindsight}/venv-k8s`, with kubernetes-validate
/// installed from PyPI if it is not there yet (under a file lock: test binaries may race).
fn validator_venv() -> PathBuf {
    let cache = match std::env::var_os("HINDSIGHT_CACHE").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is not set"))
            .join(".cache/hindsight"),
    };
    std::fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("creating {}: {e}", cache.display()));
    let venv = cache.join("venv-k8s");
    let lock_path = cache.join("venv-k8s.lock");
    let lock = std::fs::File::create(&lock_path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", lock_path.display()));
    lock.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", lock_path.display()));
    let python = venv.join("bin/python");
    let installed = || {
        Command::new(&python)
            .args(["-m", "kubernetes_validate", "--version"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if installed().as_deref() != Some(KUBERNETES_VALIDATE) {
        let _ = std::fs::remove_dir_all(&venv);
        let out = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run python3 to make {}: {e}\nThese tests need python3 (with venv) \
                     to install kubernetes-validate from PyPI.",
                    venv.display()
                )
            });
        assert!(
            out.status.success(),
            "`python3 -m venv {}` failed: {}",
            venv.display(),
            output_text(&out)
        );
        let out = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                &format!("kubernetes-validate=={KUBERNETES_VALIDATE}"),
            ])
            .output()
            .expect("running pip");
        assert!(
            out.status.success(),
            "installing kubernetes-validate=={KUBERNETES_VALIDATE} from PyPI into {} failed \
             (is PyPI reachable?): {}",
            venv.display(),
            output_text(&out)
        );
        assert_eq!(
            installed().as_deref(),
            Some(KUBERNETES_VALIDATE),
            "kubernetes-validate does not run after installing it into {}",
            venv.display()
        );
    }
    python
}

/// Every document of a YAML stream, as JSON values (parsed by the venv's PyYAML).
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    const SCRIPT: &str = "import sys, json, yaml\n\
        docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
        json.dump(docs, sys.stdout, default=str)\n";
    let mut child = Command::new(&tools().python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the venv's python");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} is not valid YAML: {}",
        output_text(&out)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        other => panic!("unexpected parse of {what}: {other}"),
    }
}

/// `kubectl kustomize DIR`.
fn render(dir: &Path) -> String {
    let out = Command::new(&tools().kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("running kubectl");
    assert!(
        out.status.success(),
        "`kubectl kustomize {}` failed: {}",
        shown(dir),
        output_text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A kustomization in a fresh directory of the target dir that builds on `resources` and adds
/// `components` (kustomize only accepts relative paths between kustomization roots), with each
/// object annotated with the file it comes from.
fn render_wrapped(label: &str, resources: &[PathBuf], components: &[PathBuf]) -> String {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("deploy_k8s")
        .join(format!("{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let list = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| format!("  - {}\n", relative(&dir, p).display()))
            .collect::<String>()
    };
    let mut text = String::from(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         buildMetadata: [originAnnotations]\nresources:\n",
    );
    text += &list(resources);
    if !components.is_empty() {
        text += "components:\n";
        text += &list(components);
    }
    std::fs::write(dir.join("kustomization.yaml"), text).unwrap();
    let rendered = render(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    rendered
}

/// `to` relative to the directory `from` (both absolute).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from = from.canonicalize().unwrap();
    let to = to.canonicalize().unwrap();
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}

struct Validation {
    status_ok: bool,
    passed: usize,
    warnings: Vec<String>,
    errors: Vec<String>,
    /// The whole output.
    text: String,
    /// The output without the INFO lines of objects that passed.
    issues: String,
}

/// `kubernetes-validate --strict -k VERSION` on a rendered stream.
fn validate(rendered: &str, version: &str, label: &str) -> Validation {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deploy_k8s");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{label}-{version}-{}.yaml", std::process::id()));
    std::fs::write(&file, rendered).unwrap();
    let out = Command::new(&tools().python)
        .args(["-m", "kubernetes_validate", "--strict", "-k", version])
        .arg(&file)
        .output()
        .expect("running kubernetes-validate");
    let _ = std::fs::remove_file(&file);
    let text = output_text(&out).replace(&file.display().to_string(), label);
    let lines = |prefix: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_string)
            .collect()
    };
    Validation {
        status_ok: out.status.success(),
        passed: text
            .lines()
            .filter(|l| l.starts_with("INFO") && l.contains(" passed for resource "))
            .count(),
        warnings: lines("WARN"),
        errors: lines("ERROR"),
        issues: text
            .lines()
            .filter(|l| !l.starts_with("INFO"))
            .collect::<Vec<_>>()
            .join("\n"),
        text,
    }
}

// ---------------------------------------------------------------------------------------------
// Reading Kubernetes objects.

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path).and_then(Value::as_str)
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn arr<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    get(v, path)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn kind_name(doc: &Value) -> String {
    format!(
        "{}/{}",
        s(doc, &["kind"]).unwrap_or("?"),
        s(doc, &["metadata", "name"]).unwrap_or("?")
    )
}

/// "Kind/name (from deploy/k8s/base/x.yaml)" using kustomize's origin annotation.
fn describe(doc: &Value) -> String {
    let origin = s(
        doc,
        &["metadata", "annotations", "config.kubernetes.io/origin"],
    )
    .and_then(|o| {
        o.lines().find_map(|l| {
            let l = l.trim();
            let p = l
                .strip_prefix("path: ")
                .or_else(|| l.strip_prefix("configuredIn: "))?;
            p.find("deploy/").map(|i| p[i..].to_string())
        })
    });
    match origin {
        Some(o) => format!("{} (from {o})", kind_name(doc)),
        None => kind_name(doc),
    }
}

/// The pod template (metadata + spec) of a workload, or the pod itself.
fn pod_template(doc: &Value) -> Option<&Value> {
    match s(doc, &["kind"])? {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            get(doc, &["spec", "template"])
        }
        "CronJob" => get(doc, &["spec", "jobTemplate", "spec", "template"]),
        "Pod" => Some(doc),
        _ => None,
    }
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    get(v, &["metadata", "labels"])
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    selector.as_object().is_some_and(|m| {
        !m.is_empty()
            && m.iter()
                .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
    })
}

fn namespace(doc: &Value) -> &str {
    s(doc, &["metadata", "namespace"]).unwrap_or("default")
}

fn image_name_and_tag(image: &str) -> (String, String) {
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((n, t)) => (n.to_string(), t.to_string()),
        None => (last.to_string(), "latest".to_string()),
    }
}

fn is_hindsight_program(p: &str) -> bool {
    Path::new(p).file_name().and_then(|f| f.to_str()) == Some("hindsight")
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// What the binary accepts, from its own --help.

#[derive(Default, Debug)]
struct SubHelp {
    /// Long flags (without `--`).
    flags: BTreeSet<String>,
    /// Environment variable of each flag that reads one.
    env_of: HashMap<String, String>,
    /// Documented default of each flag that has one.
    default_of: HashMap<String, String>,
}

impl SubHelp {
    fn envs(&self) -> BTreeSet<&str> {
        self.env_of.values().map(String::as_str).collect()
    }
}

struct Binary {
    subcommands: BTreeSet<String>,
    subs: std::sync::Mutex<HashMap<String, Option<std::sync::Arc<SubHelp>>>>,
}

fn binary() -> &'static Binary {
    static BINARY: OnceLock<Binary> = OnceLock::new();
    BINARY.get_or_init(|| {
        let out = Command::new(env!("CARGO_BIN_EXE_hindsight"))
            .arg("--help")
            .output()
            .expect("running hindsight --help");
        assert!(
            out.status.success(),
            "hindsight --help: {}",
            output_text(&out)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let subcommands: BTreeSet<String> = text
            .lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| l.starts_with(' '))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .filter(|c| c != "help")
            .collect();
        assert!(
            subcommands.contains("replay-server") && subcommands.contains("actor"),
            "could not read the subcommands from `hindsight --help`:\n{text}"
        );
        Binary {
            subcommands,
            subs: Default::default(),
        }
    })
}

impl Binary {
    /// The help of `hindsight SUB`, or None for a subcommand the binary does not have.
    fn sub(&self, sub: &str) -> Option<std::sync::Arc<SubHelp>> {
        if !self.subcommands.contains(sub) {
            return None;
        }
        let mut subs = self.subs.lock().unwrap();
        subs.entry(sub.to_string())
            .or_insert_with(|| {
                let out = Command::new(env!("CARGO_BIN_EXE_hindsight"))
                    .args([sub, "--help"])
                    .output()
                    .expect("running hindsight SUB --help");
                assert!(
                    out.status.success(),
                    "hindsight {sub} --help: {}",
                    output_text(&out)
                );
                Some(std::sync::Arc::new(parse_help(&String::from_utf8_lossy(
                    &out.stdout,
                ))))
            })
            .clone()
    }
}

/// Reads clap's long help: option lines (`  -x, --flag <V>`) followed by their description,
/// in which `[env: NAME=...]` and `[default: ...]` appear.
fn parse_help(text: &str) -> SubHelp {
    let mut help = SubHelp::default();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim_start();
        let opt = t
            .strip_prefix("--")
            .or_else(|| {
                // `-x, --flag`
                let rest = t.strip_prefix('-')?;
                let (short, rest) = rest.split_at(rest.find(", --")?);
                (short.len() == 1).then(|| &rest[4..])
            })
            .filter(|_| line.len() - t.len() <= 6);
        if let Some(opt) = opt {
            let name: String = opt
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() {
                help.flags.insert(name.clone());
                current = Some(name);
            }
        }
        let Some(flag) = &current else { continue };
        if let Some(i) = line.find("[env: ") {
            let env: String = line[i + 6..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            help.env_of.insert(flag.clone(), env);
        }
        if let Some(i) = line.find("[default: ") {
            let rest = &line[i + 10..];
            if let Some(end) = rest.find(']') {
                help.default_of
                    .insert(flag.clone(), rest[..end].to_string());
            }
        }
    }
    help
}

// ---------------------------------------------------------------------------------------------
// One hindsight process as a deployment file describes it, and its checks.

/// A port something outside or inside the process expects it to listen on.
struct PortUse {
    port: u16,
    what: String,
    /// Reached from outside the container (kubelet probe, Service, scrape, published port):
    /// a loopback listener does not do.
    from_outside: bool,
}

struct Process {
    /// File, object and container, for messages.
    origin: String,
    /// The arguments after `hindsight`.
    argv: Vec<String>,
    /// Environment: name and value where known (None: from a field or secret).
    env: Vec<(String, Option<String>)>,
    ports: Vec<PortUse>,
    /// Command lines of exec probes / healthchecks that run `hindsight` (after `hindsight`),
    /// with the probe's name.
    probes: Vec<(String, Vec<String>)>,
}

/// `--flag=value` / `--flag value` pairs of an argument list (the value is the next token when
/// it does not start with `-`).
fn flags_of(argv: &[String]) -> Vec<(String, Option<String>)> {
    let mut out = vec![];
    let mut i = 0;
    while i < argv.len() {
        if let Some(f) = argv[i].strip_prefix("--") {
            if let Some((name, value)) = f.split_once('=') {
                out.push((name.to_string(), Some(value.to_string())));
            } else {
                let value = argv.get(i + 1).filter(|v| !v.starts_with('-')).cloned();
                out.push((f.to_string(), value));
            }
        }
        i += 1;
    }
    out
}

/// The port of `HOST:PORT`, `[V6]:PORT` or a URL, and whether the host is loopback.
fn addr_port(addr: &str) -> Option<(u16, bool)> {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    let loopback = matches!(
        host.trim_matches(|c| c == '[' || c == ']'),
        "127.0.0.1" | "localhost" | "::1"
    ) || host.starts_with("127.");
    Some((port.parse().ok()?, loopback))
}

/// The subcommand of an argument list: its first word that names one.
fn subcommand_of(argv: &[String]) -> Option<(usize, String)> {
    argv.iter()
        .enumerate()
        .find(|(_, a)| binary().subcommands.contains(a.as_str()))
        .map(|(i, a)| (i, a.clone()))
}

/// Checks flags and variables of `hindsight ARGV` against the binary; returns the help of its
/// subcommand when there is one.
fn check_command(
    origin: &str,
    argv: &[String],
    env: &[(String, Option<String>)],
    problems: &mut Vec<String>,
) -> Option<(String, std::sync::Arc<SubHelp>)> {
    let Some((_, sub)) = subcommand_of(argv) else {
        problems.push(format!(
            "{origin}: `hindsight {}` names no subcommand the binary has (it has: {})",
            argv.join(" "),
            binary()
                .subcommands
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return None;
    };
    let help = binary().sub(&sub).expect("listed subcommand");
    for (flag, _) in flags_of(argv) {
        if !help.flags.contains(&flag) {
            problems.push(format!(
                "{origin}: `hindsight {sub}` does not accept --{flag}"
            ));
        }
    }
    let envs = help.envs();
    for (name, _) in env {
        if name.starts_with("HINDSIGHT_") && !envs.contains(name.as_str()) {
            problems.push(format!("{origin}: `hindsight {sub}` does not read {name}"));
        }
    }
    Some((sub, help))
}

/// Ports the process listens on: `--listen`, `--*-addr` and `--rendezvous` from the command
/// line, else from the flag's variable, else the documented default; rank 0's rendezvous port
/// (MASTER_PORT). Each with whether it is a loopback address.
fn listening(
    argv: &[String],
    env: &[(String, Option<String>)],
    help: &SubHelp,
) -> Vec<(u16, bool, String)> {
    let flags = flags_of(argv);
    let env_value = |name: &str| {
        env.iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.clone())
    };
    let value_of = |flag: &str| {
        let from_argv = flags
            .iter()
            .rev()
            .find(|(f, _)| f == flag)
            .and_then(|(_, v)| v.clone());
        from_argv
            .map(|v| (v, "command line"))
            .or_else(|| {
                let env = help.env_of.get(flag)?;
                env_value(env).map(|v| (v, "environment"))
            })
            .or_else(|| {
                help.default_of
                    .get(flag)
                    .map(|v| (v.clone(), "documented default"))
            })
    };
    // `hindsight learner --local-ranks N`: local rank i listens on each port + 100 x i.
    let local_ranks: u16 = value_of("local-ranks")
        .and_then(|(v, _)| v.parse().ok())
        .unwrap_or(1);
    let mut out = vec![];
    for flag in &help.flags {
        if !(flag == "listen" || flag.ends_with("-addr") || flag == "rendezvous") {
            continue;
        }
        if let Some((value, source)) = value_of(flag) {
            if let Some((port, loopback)) = addr_port(&value) {
                out.push((port, loopback, format!("--{flag} {value} ({source})")));
                if flag != "rendezvous" {
                    for i in 1..local_ranks {
                        out.push((
                            port + 100 * i,
                            loopback,
                            format!("--{flag} {value} + {} ({source}; local rank {i})", 100 * i),
                        ));
                    }
                }
            }
        }
    }
    if let Some(port) = env_value("MASTER_PORT").and_then(|p| p.parse().ok()) {
        out.push((
            port,
            false,
            format!("MASTER_PORT={port} (rank 0's rendezvous)"),
        ));
    }
    out
}

fn check_process(p: &Process, problems: &mut Vec<String>) {
    let Some((sub, help)) = check_command(&p.origin, &p.argv, &p.env, problems) else {
        return;
    };
    let listens = listening(&p.argv, &p.env, &help);
    let describe_listens = || {
        if listens.is_empty() {
            "nothing".to_string()
        } else {
            listens
                .iter()
                .map(|(_, _, d)| d.clone())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    for u in &p.ports {
        match listens.iter().find(|(port, _, _)| *port == u.port) {
            None => problems.push(format!(
                "{}: {} names port {}, but `hindsight {sub}` listens on {}",
                p.origin,
                u.what,
                u.port,
                describe_listens()
            )),
            Some((_, true, d)) if u.from_outside => problems.push(format!(
                "{}: {} names port {}, which `hindsight {sub}` serves on loopback only ({d}): \
                 unreachable from outside the container",
                p.origin, u.what, u.port
            )),
            Some(_) => {}
        }
    }
    for (what, argv) in &p.probes {
        let origin = format!("{} {what}", p.origin);
        let Some((probe_sub, _)) = check_command(&origin, argv, &[], problems) else {
            continue;
        };
        if probe_sub == "health" {
            let target = argv
                .iter()
                .skip_while(|a| *a != "health")
                .skip(1)
                .find(|a| !a.starts_with('-'));
            match target.and_then(|t| addr_port(t)) {
                Some((port, _)) if listens.iter().any(|(l, _, _)| *l == port) => {}
                Some((port, _)) => problems.push(format!(
                    "{origin}: `hindsight health` asks port {port}, but `hindsight {sub}` \
                     listens on {}",
                    describe_listens()
                )),
                None => problems.push(format!(
                    "{origin}: `hindsight {}` names no HOST:PORT to ask",
                    argv.join(" ")
                )),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes objects as processes.

/// The arguments after `hindsight` of a container, or None when it does not run hindsight.
fn container_argv(c: &Value) -> Option<Vec<String>> {
    let command = string_list(c.get("command"));
    let args = string_list(c.get("args"));
    let (name, _) = image_name_and_tag(s(c, &["image"]).unwrap_or(""));
    if let Some(first) = command.first() {
        if is_hindsight_program(first) {
            return Some(command[1..].iter().chain(&args).cloned().collect());
        }
        if name == "hindsight" {
            // A hindsight image running something else (a shell...): nothing to check it by.
            return Some(vec![format!("<command {}>", command.join(" "))]);
        }
        return None;
    }
    // The image's entrypoint is `hindsight`.
    (name == "hindsight").then_some(args)
}

/// Resolves a container's environment against the ConfigMaps of the same rendering.
fn container_env(
    c: &Value,
    config_maps: &HashMap<(String, String), &Value>,
    ns: &str,
    origin: &str,
    problems: &mut Vec<String>,
) -> Vec<(String, Option<String>)> {
    let mut env = vec![];
    for from in arr(c, &["envFrom"]) {
        let prefix = s(from, &["prefix"]).unwrap_or("");
        if let Some(name) = s(from, &["configMapRef", "name"]) {
            match config_maps.get(&(ns.to_string(), name.to_string())) {
                Some(cm) => {
                    if let Some(data) = get(cm, &["data"]).and_then(Value::as_object) {
                        for (k, v) in data {
                            env.push((format!("{prefix}{k}"), v.as_str().map(str::to_string)));
                        }
                    }
                }
                None if get(from, &["configMapRef", "optional"]) == Some(&Value::Bool(true)) => {}
                None => problems.push(format!(
                    "{origin}: envFrom names ConfigMap {name}, which is not in the rendering"
                )),
            }
        }
    }
    for e in arr(c, &["env"]) {
        let Some(name) = s(e, &["name"]) else {
            continue;
        };
        let value = s(e, &["value"]).map(str::to_string).or_else(|| {
            let cm = s(e, &["valueFrom", "configMapKeyRef", "name"])?;
            let key = s(e, &["valueFrom", "configMapKeyRef", "key"])?;
            let cm = config_maps.get(&(ns.to_string(), cm.to_string()))?;
            s(cm, &["data", key]).map(str::to_string)
        });
        env.push((name.to_string(), value));
    }
    env
}

/// A probe's port (number, or a container port's name), resolved to a number.
fn resolve_port(port: &Value, c: &Value) -> Result<u16, String> {
    match port {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| format!("port {n} out of range")),
        Value::String(name) => arr(c, &["ports"])
            .iter()
            .find(|p| s(p, &["name"]) == Some(name))
            .and_then(|p| get(p, &["containerPort"])?.as_u64())
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| format!("port name {name:?} is not a port of the container")),
        other => Err(format!("unreadable port {other}")),
    }
}

/// Every hindsight container of a rendering as a Process, plus the Services' and scrape
/// annotations' ports.
fn k8s_processes(docs: &[Value], problems: &mut Vec<String>) -> Vec<Process> {
    let config_maps: HashMap<(String, String), &Value> = docs
        .iter()
        .filter(|d| s(d, &["kind"]) == Some("ConfigMap"))
        .map(|d| {
            (
                (
                    namespace(d).to_string(),
                    s(d, &["metadata", "name"]).unwrap_or("").to_string(),
                ),
                d,
            )
        })
        .collect();
    let mut out = vec![];
    for doc in docs {
        let Some(template) = pod_template(doc) else {
            continue;
        };
        let ns = namespace(doc);
        let pod_labels = labels(template);
        let containers = arr(template, &["spec", "containers"])
            .iter()
            .chain(arr(template, &["spec", "initContainers"]));
        for c in containers {
            let cname = s(c, &["name"]).unwrap_or("?");
            let origin = format!("{}, container {cname}", describe(doc));
            let Some(argv) = container_argv(c) else {
                continue;
            };
            let env = container_env(c, &config_maps, ns, &origin, problems);
            let mut ports = vec![];
            for p in arr(c, &["ports"]) {
                if let Some(n) = get(p, &["containerPort"]).and_then(Value::as_u64) {
                    ports.push(PortUse {
                        port: n as u16,
                        what: format!("containerPort {}", s(p, &["name"]).unwrap_or("")),
                        from_outside: true,
                    });
                }
            }
            let mut probes = vec![];
            for kind in ["readinessProbe", "livenessProbe", "startupProbe"] {
                let Some(probe) = c.get(kind) else { continue };
                for how in ["httpGet", "tcpSocket", "grpc"] {
                    if let Some(port) = get(probe, &[how, "port"]) {
                        match resolve_port(port, c) {
                            Ok(port) => ports.push(PortUse {
                                port,
                                what: format!("{kind} {how}"),
                                from_outside: true,
                            }),
                            Err(e) => problems.push(format!("{origin}: {kind}: {e}")),
                        }
                    }
                }
                let command = string_list(get(probe, &["exec", "command"]));
                if command.first().is_some_and(|p| is_hindsight_program(p)) {
                    probes.push((kind.to_string(), command[1..].to_vec()));
                }
            }
            // Scrape annotations name the pod's metrics port.
            if let Some(port) = s(template, &["metadata", "annotations", "prometheus.io/port"]) {
                match port.parse() {
                    Ok(port) => ports.push(PortUse {
                        port,
                        what: "annotation prometheus.io/port".into(),
                        from_outside: true,
                    }),
                    Err(_) => problems.push(format!(
                        "{origin}: annotation prometheus.io/port {port:?} is not a port number"
                    )),
                }
            }
            // Services that select this pod and reach it through one of its ports.
            for svc in docs.iter().filter(|d| {
                s(d, &["kind"]) == Some("Service")
                    && namespace(d) == ns
                    && get(d, &["spec", "selector"]).is_some_and(|sel| selects(sel, &pod_labels))
            }) {
                for sp in arr(svc, &["spec", "ports"]) {
                    let target = get(sp, &["targetPort"])
                        .or_else(|| get(sp, &["port"]))
                        .cloned()
                        .unwrap_or(Value::Null);
                    match resolve_port(&target, c) {
                        Ok(port) => ports.push(PortUse {
                            port,
                            what: format!(
                                "{} port {}",
                                describe(svc),
                                s(sp, &["name"]).unwrap_or("")
                            ),
                            from_outside: true,
                        }),
                        Err(e) => {
                            problems.push(format!("{origin}: {} targetPort: {e}", describe(svc)))
                        }
                    }
                }
            }
            out.push(Process {
                origin,
                argv,
                env,
                ports,
                probes,
            });
        }
    }
    // A Service that selects no pod of the rendering.
    for svc in docs.iter().filter(|d| s(d, &["kind"]) == Some("Service")) {
        let selected = docs.iter().any(|d| {
            pod_template(d).is_some_and(|t| {
                namespace(d) == namespace(svc)
                    && get(svc, &["spec", "selector"]).is_some_and(|sel| selects(sel, &labels(t)))
            })
        });
        if !selected {
            problems.push(format!("{}: selects no pod", describe(svc)));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Compose files as processes.

/// `${VAR:-default}`, `${VAR-default}`, `${VAR}` and `$VAR` as compose fills them in, from the
/// environment and the `.env` file next to the compose file.
fn interpolate(text: &str, dotenv: &HashMap<String, String>) -> String {
    let lookup = |name: &str| {
        std::env::var(name)
            .ok()
            .or_else(|| dotenv.get(name).cloned())
    };
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out += &rest[..i];
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}').unwrap_or(r.len());
            let expr = &r[..end];
            rest = r.get(end + 1..).unwrap_or("");
            let (name, default) = match expr.find([':', '-', '?']) {
                Some(j) => {
                    let d = expr[j..].trim_start_matches([':', '-', '?']);
                    (&expr[..j], Some(d))
                }
                None => (expr, None),
            };
            out += &lookup(name)
                .filter(|v| !v.is_empty())
                .or(default.map(str::to_string))
                .unwrap_or_default();
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out += &lookup(&rest[..end]).unwrap_or_default();
            rest = &rest[end..];
        }
    }
    out + rest
}

fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", shown(path)))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_string(),
                v.trim().trim_matches(['"', '\'']).to_string(),
            )
        })
        .collect())
}

/// A compose command: a list, or a string split on white space.
fn words(v: Option<&Value>, dotenv: &HashMap<String, String>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => interpolate(s, dotenv)
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        Some(Value::Array(_)) => string_list(v)
            .iter()
            .map(|w| interpolate(w, dotenv))
            .collect(),
        _ => vec![],
    }
}

fn compose_processes(file: &Path, doc: &Value, problems: &mut Vec<String>) -> Vec<Process> {
    let dir = file.parent().unwrap();
    let dotenv: HashMap<String, String> = read_env_file(&dir.join(".env"))
        .map(|v| v.into_iter().collect())
        .unwrap_or_default();
    let mut out = vec![];
    let Some(services) = get(doc, &["services"]).and_then(Value::as_object) else {
        return out;
    };
    for (name, svc) in services {
        let origin = format!("{} service {name}", shown(file));
        let image = interpolate(s(svc, &["image"]).unwrap_or(""), &dotenv);
        let (image_name, _) = image_name_and_tag(&image);
        let entrypoint = words(svc.get("entrypoint"), &dotenv);
        let command = words(svc.get("command"), &dotenv);
        let argv = match entrypoint.first() {
            Some(first) if is_hindsight_program(first) => {
                entrypoint[1..].iter().chain(&command).cloned().collect()
            }
            Some(_) => continue,
            None if command.first().is_some_and(|c| is_hindsight_program(c)) => {
                command[1..].to_vec()
            }
            None if image_name == "hindsight" => command,
            None => continue,
        };
        let mut env = vec![];
        let env_files = match svc.get("env_file") {
            Some(Value::String(f)) => vec![f.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|f| f.as_str().or_else(|| s(f, &["path"])).map(str::to_string))
                .collect(),
            _ => vec![],
        };
        for f in env_files {
            match read_env_file(&dir.join(interpolate(&f, &dotenv))) {
                Ok(vars) => env.extend(vars.into_iter().map(|(k, v)| (k, Some(v)))),
                Err(e) => problems.push(format!("{origin}: env_file: {e}")),
            }
        }
        match svc.get("environment") {
            Some(Value::Object(m)) => env.extend(m.iter().map(|(k, v)| {
                let v = match v {
                    Value::String(s) => Some(interpolate(s, &dotenv)),
                    Value::Null => None,
                    other => Some(other.to_string()),
                };
                (k.clone(), v)
            })),
            Some(Value::Array(_)) => {
                for item in string_list(svc.get("environment")) {
                    let item = interpolate(&item, &dotenv);
                    match item.split_once('=') {
                        Some((k, v)) => env.push((k.to_string(), Some(v.to_string()))),
                        None => env.push((item, None)),
                    }
                }
            }
            _ => {}
        }
        let mut ports = vec![];
        for p in arr(svc, &["ports"]).iter().chain(arr(svc, &["expose"])) {
            let target = match p {
                Value::Object(_) => get(p, &["target"]).map(|t| t.to_string()),
                Value::String(s) => interpolate(s, &dotenv)
                    .rsplit(':')
                    .next()
                    .map(|t| t.split('/').next().unwrap_or(t).to_string()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            };
            match target.as_deref().map(str::parse::<u16>) {
                Some(Ok(port)) => ports.push(PortUse {
                    port,
                    what: format!("port {p}"),
                    from_outside: true,
                }),
                _ => problems.push(format!("{origin}: unreadable port {p}")),
            }
        }
        let mut probes = vec![];
        let test = match get(svc, &["healthcheck", "test"]) {
            Some(Value::String(s)) => vec!["CMD-SHELL".to_string(), s.clone()],
            other => string_list(other),
        };
        let test_argv: Vec<String> = match test.first().map(String::as_str) {
            Some("CMD") => test[1..].to_vec(),
            Some("CMD-SHELL") => test
                .get(1)
                .map(|s| s.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
            _ => vec![],
        };
        if test_argv.first().is_some_and(|p| is_hindsight_program(p)) {
            probes.push((
                "healthcheck".to_string(),
                test_argv[1..]
                    .iter()
                    .map(|w| interpolate(w, &dotenv))
                    .collect(),
            ));
        }
        out.push(Process {
            origin,
            argv,
            env,
            ports,
            probes,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Files.

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name().is_some_and(|n| {
        n == "kustomization.yaml" || n == "kustomization.yml" || n == "Kustomization"
    })
}

/// Every file a kustomization (and those it builds on) reads: resources, components, patches
/// and generator inputs.
fn kustomize_inputs(dir: &Path, seen: &mut BTreeSet<PathBuf>) {
    let file = ["kustomization.yaml", "kustomization.yml", "Kustomization"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{} has no kustomization file", shown(dir)));
    if !seen.insert(file.clone()) {
        return;
    }
    let text = std::fs::read_to_string(&file).unwrap();
    let doc = yaml_docs(&text, &shown(&file)).pop().unwrap_or(Value::Null);
    let mut paths = vec![];
    for key in ["resources", "components", "patchesStrategicMerge", "crds"] {
        paths.extend(string_list(doc.get(key)));
    }
    for p in arr(&doc, &["patches"]) {
        paths.extend(s(p, &["path"]).map(str::to_string));
    }
    for key in ["configMapGenerator", "secretGenerator"] {
        for g in arr(&doc, &[key]) {
            paths.extend(string_list(g.get("envs")));
            paths.extend(
                string_list(g.get("files"))
                    .iter()
                    .map(|f| f.split_once('=').map_or(f.as_str(), |(_, p)| p).to_string()),
            );
        }
    }
    for p in paths {
        let full = dir.join(&p);
        if full.is_dir() {
            kustomize_inputs(&full, seen);
        } else if let Ok(c) = full.canonicalize() {
            seen.insert(c);
        }
    }
}

fn is_crd_object(doc: &Value) -> bool {
    let api = s(doc, &["apiVersion"]).unwrap_or("");
    let group = api.rsplit_once('/').map_or("", |(g, _)| g);
    group.contains('.') && !group.ends_with(".k8s.io")
}

fn versions() -> [String; 2] {
    [OLDEST_KUBERNETES.to_string(), tools().newest.clone()]
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn every_overlay_renders_and_is_valid_for_kubernetes_1_30_and_the_newest() {
    let overlays = subdirs(&k8s_dir().join("overlays"));
    let names: Vec<String> = overlays
        .iter()
        .map(|o| o.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for required in ["cpu", "gpu"] {
        assert!(
            names.iter().any(|n| n == required),
            "deploy/k8s/overlays has no {required} overlay (has: {names:?})"
        );
    }
    let version = env!("CARGO_PKG_VERSION");
    let mut problems = vec![];
    for (overlay, name) in overlays.iter().zip(&names) {
        let label = format!("overlays/{name}");
        let rendered = render(overlay);
        let docs = yaml_docs(&rendered, &label);
        for v in versions() {
            let r = validate(&rendered, &v, &name.replace('/', "-"));
            if !r.status_ok || !r.errors.is_empty() || !r.warnings.is_empty() {
                // An overlay holds no custom resource: a warning is an unknown kind.
                problems.push(format!(
                    "{label}: kubernetes-validate --strict -k {v} did not accept it:\n{}",
                    r.issues
                ));
            } else if r.passed != docs.len() {
                problems.push(format!(
                    "{label}: kubernetes-validate -k {v} passed {} of {} objects:\n{}",
                    r.passed,
                    docs.len(),
                    r.text
                ));
            }
        }
        // What the cluster needs: the replay server and the learner keep state on volumes,
        // ranks find each other through a headless Service, actors scale as a Deployment.
        let find = |kind: &str, n: &str| {
            docs.iter()
                .find(|d| s(d, &["kind"]) == Some(kind) && s(d, &["metadata", "name"]) == Some(n))
        };
        for (kind, n) in [
            ("StatefulSet", "hindsight-replay-server"),
            ("StatefulSet", "hindsight-learner"),
        ] {
            match find(kind, n) {
                Some(d) if !arr(d, &["spec", "volumeClaimTemplates"]).is_empty() => {}
                Some(_) => problems.push(format!("{label}: {kind}/{n} claims no volume")),
                None => problems.push(format!("{label}: no {kind}/{n}")),
            }
        }
        if find("Deployment", "hindsight-actor").is_none() {
            problems.push(format!("{label}: no Deployment/hindsight-actor"));
        }
        match find("Service", "hindsight-learner") {
            Some(svc) => {
                if s(svc, &["spec", "clusterIP"]) != Some("None") {
                    problems.push(format!(
                        "{label}: Service/hindsight-learner is not headless"
                    ));
                }
                let port_names: BTreeSet<&str> = arr(svc, &["spec", "ports"])
                    .iter()
                    .filter_map(|p| s(p, &["name"]))
                    .collect();
                for p in ["grpc", "metrics", "rendezvous"] {
                    if !port_names.contains(p) {
                        problems.push(format!(
                            "{label}: Service/hindsight-learner has no {p} port"
                        ));
                    }
                }
            }
            None => problems.push(format!("{label}: no Service/hindsight-learner")),
        }
        // GPU containers run the CUDA image of this version, the others the CPU one.
        let mut gpu_containers = 0;
        for doc in &docs {
            let Some(t) = pod_template(doc) else { continue };
            for c in arr(t, &["spec", "containers"]) {
                let image = s(c, &["image"]).unwrap_or("");
                let (_, tag) = image_name_and_tag(image);
                let gpus = get(c, &["resources", "limits", "nvidia.com/gpu"]).is_some();
                let cname = s(c, &["name"]).unwrap_or("?");
                if gpus {
                    gpu_containers += 1;
                    if tag != format!("{version}-cuda") {
                        problems.push(format!(
                            "{label}: {} container {cname} requests nvidia.com/gpu but runs \
                             {image}, not the CUDA image hindsight:{version}-cuda",
                            kind_name(doc)
                        ));
                    }
                } else if tag.ends_with("-cuda") {
                    problems.push(format!(
                        "{label}: {} container {cname} runs the CUDA image {image} without a \
                         GPU (a CUDA build needs the driver to start)",
                        kind_name(doc)
                    ));
                }
            }
        }
        if name.starts_with("gpu") && gpu_containers == 0 {
            problems.push(format!("{label}: requests no nvidia.com/gpu"));
        }
        if !name.starts_with("gpu") && gpu_containers > 0 {
            problems.push(format!("{label}: requests nvidia.com/gpu"));
        }
        if problems.is_empty() {
            eprintln!(
                "{label}: {} objects valid for Kubernetes {}",
                docs.len(),
                versions().join(" and ")
            );
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn every_component_renders_on_the_cpu_overlay_and_agrees_with_it() {
    let cpu = k8s_dir().join("overlays/cpu");
    let base_docs = yaml_docs(
        &render_wrapped("cpu", std::slice::from_ref(&cpu), &[]),
        "overlays/cpu",
    );
    let base_ids: BTreeSet<String> = base_docs.iter().map(kind_name).collect();
    let components = subdirs(&k8s_dir().join("components"));
    let mut problems = vec![];
    for required in ["podmonitor", "cert-manager"] {
        if !components.iter().any(|c| c.ends_with(required)) {
            problems.push(format!("deploy/k8s/components has no {required} component"));
        }
    }
    for component in &components {
        let label = format!(
            "components/{}",
            component.file_name().unwrap().to_string_lossy()
        );
        let rendered = render_wrapped(
            &label.replace('/', "-"),
            std::slice::from_ref(&cpu),
            std::slice::from_ref(component),
        );
        let docs = yaml_docs(&rendered, &label);
        let added: Vec<&Value> = docs
            .iter()
            .filter(|d| !base_ids.contains(&kind_name(d)))
            .collect();
        if added.is_empty() {
            problems.push(format!("{label}: adds no object to the cpu overlay"));
        }
        // Custom resources have no schema in the validator: it may only warn about those.
        let crd_kinds: BTreeSet<&str> = added
            .iter()
            .filter(|d| is_crd_object(d))
            .filter_map(|d| s(d, &["kind"]))
            .collect();
        let crd_objects = docs.iter().filter(|d| is_crd_object(d)).count();
        for v in versions() {
            let r = validate(&rendered, &v, &label.replace('/', "-"));
            for w in &r.warnings {
                let expected = crd_kinds
                    .iter()
                    .any(|k| w.contains(&format!("Couldn't find schema for kind {k} ")));
                if !expected {
                    problems.push(format!("{label} (-k {v}): {w}"));
                }
            }
            if !r.status_ok || !r.errors.is_empty() {
                problems.push(format!(
                    "{label}: kubernetes-validate --strict -k {v} did not accept it:\n{}",
                    r.issues
                ));
            } else if r.passed + crd_objects != docs.len() {
                problems.push(format!(
                    "{label} (-k {v}): {} objects passed and {crd_objects} are custom \
                     resources, of {}:\n{}",
                    r.passed,
                    docs.len(),
                    r.text
                ));
            }
        }
        for doc in &added {
            check_component_object(&label, doc, &docs, &mut problems);
        }
        eprintln!(
            "{label}: {} objects on the cpu overlay ({} custom resources: {:?})",
            added.len(),
            crd_objects,
            crd_kinds
        );
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// The hindsight pod templates of a rendering: (workload, template).
fn hindsight_pods(docs: &[Value]) -> Vec<(&Value, &Value)> {
    docs.iter()
        .filter_map(|d| Some((d, pod_template(d)?)))
        .filter(|(_, t)| {
            arr(t, &["spec", "containers"])
                .iter()
                .any(|c| container_argv(c).is_some())
        })
        .collect()
}

/// A component's object checked against the objects it refers to.
fn check_component_object(label: &str, doc: &Value, docs: &[Value], problems: &mut Vec<String>) {
    let what = format!("{label}: {}", kind_name(doc));
    let pods = hindsight_pods(docs);
    if let Some((workload, _)) = pods.first() {
        if namespace(doc) != namespace(workload) {
            problems.push(format!(
                "{what} is in namespace {}, the workloads in {}",
                namespace(doc),
                namespace(workload)
            ));
        }
    }
    match s(doc, &["kind"]).unwrap_or("") {
        "PodMonitor" => {
            let selector = get(doc, &["spec", "selector", "matchLabels"]).unwrap_or(&Value::Null);
            let endpoints: Vec<&str> = arr(doc, &["spec", "podMetricsEndpoints"])
                .iter()
                .filter_map(|e| s(e, &["port"]))
                .collect();
            if endpoints.is_empty() {
                problems.push(format!("{what} scrapes no named port"));
            }
            for (workload, t) in &pods {
                if !selects(selector, &labels(t)) {
                    problems.push(format!(
                        "{what} does not select the pods of {}",
                        kind_name(workload)
                    ));
                    continue;
                }
                for port in &endpoints {
                    let has = arr(t, &["spec", "containers"]).iter().any(|c| {
                        arr(c, &["ports"])
                            .iter()
                            .any(|p| s(p, &["name"]) == Some(port))
                    });
                    if !has {
                        problems.push(format!(
                            "{what} scrapes port {port:?}, which the pods of {} do not name",
                            kind_name(workload)
                        ));
                    }
                }
            }
        }
        "Issuer" | "ClusterIssuer" => {
            if let Some(secret) = s(doc, &["spec", "ca", "secretName"]) {
                let made = docs.iter().any(|d| {
                    s(d, &["kind"]) == Some("Certificate")
                        && s(d, &["spec", "secretName"]) == Some(secret)
                });
                if !made {
                    problems.push(format!(
                        "{what} signs with the CA in Secret {secret}, which no Certificate makes"
                    ));
                }
            }
        }
        "Certificate" => {
            let issuer = s(doc, &["spec", "issuerRef", "name"]).unwrap_or("");
            let issuer_kind = s(doc, &["spec", "issuerRef", "kind"]).unwrap_or("Issuer");
            if !docs.iter().any(|d| {
                s(d, &["kind"]) == Some(issuer_kind) && s(d, &["metadata", "name"]) == Some(issuer)
            }) {
                problems.push(format!(
                    "{what} names {issuer_kind} {issuer:?}, not in the rendering"
                ));
            }
            if get(doc, &["spec", "isCA"]) == Some(&Value::Bool(true)) {
                return;
            }
            // The server certificate: written where the servers read their key pair from,
            // valid for every host the clients dial.
            let secret = s(doc, &["spec", "secretName"]).unwrap_or("");
            let mut mounted_as_key_pair = false;
            let mut hosts = BTreeSet::new();
            for (_, t) in &pods {
                for c in arr(t, &["spec", "containers"]) {
                    let Some(argv) = container_argv(c) else {
                        continue;
                    };
                    for (flag, value) in flags_of(&argv) {
                        let Some(value) = value else { continue };
                        if let Some(rest) = value.strip_prefix("https://") {
                            let authority = rest.split('/').next().unwrap_or(rest);
                            let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
                            hosts.insert(host.to_string());
                        }
                        if flag == "tls-key" {
                            let dir = Path::new(&value).parent().unwrap_or(Path::new("/"));
                            let mount = arr(c, &["volumeMounts"])
                                .iter()
                                .find(|m| s(m, &["mountPath"]).map(Path::new) == Some(dir));
                            let volume = mount.and_then(|m| s(m, &["name"])).and_then(|n| {
                                arr(t, &["spec", "volumes"])
                                    .iter()
                                    .find(|v| s(v, &["name"]) == Some(n))
                            });
                            if volume.and_then(|v| s(v, &["secret", "secretName"])) == Some(secret)
                            {
                                mounted_as_key_pair = true;
                            }
                        }
                    }
                }
            }
            if !mounted_as_key_pair {
                problems.push(format!(
                    "{what} writes Secret {secret:?}, which no server mounts for --tls-key"
                ));
            }
            let names: BTreeSet<&str> = arr(doc, &["spec", "dnsNames"])
                .iter()
                .chain(arr(doc, &["spec", "ipAddresses"]))
                .filter_map(Value::as_str)
                .collect();
            if hosts.is_empty() {
                problems.push(format!("{what}: no client dials an https:// URL"));
            }
            for host in hosts {
                if !names.contains(host.as_str()) {
                    problems.push(format!(
                        "{what} is not valid for {host}, which the clients dial (names: {names:?})"
                    ));
                }
            }
        }
        "HorizontalPodAutoscaler" => {
            let kind = s(doc, &["spec", "scaleTargetRef", "kind"]).unwrap_or("");
            let name = s(doc, &["spec", "scaleTargetRef", "name"]).unwrap_or("");
            if !docs
                .iter()
                .any(|d| s(d, &["kind"]) == Some(kind) && s(d, &["metadata", "name"]) == Some(name))
            {
                problems.push(format!("{what} scales {kind}/{name}, not in the rendering"));
            }
            if arr(doc, &["spec", "metrics"]).is_empty() {
                problems.push(format!("{what} has no metric"));
            }
        }
        other => problems.push(format!(
            "{what}: no check knows what a {other} must agree with; add one to {}",
            file!()
        )),
    }
}

#[test]
fn deploy_files_pass_only_flags_variables_and_ports_the_binary_has() {
    let deploy = repo().join("deploy");
    let mut files = vec![];
    yaml_files(&deploy, &mut files);
    let mut problems = vec![];
    // Compose services (Kubernetes containers are checked rendering by rendering).
    let mut processes = vec![];

    // Kubernetes: every overlay and every component rendered (so that ConfigMaps resolve and
    // patches apply), each object named with the file it comes from.
    let k8s = k8s_dir();
    let overlays = subdirs(&k8s.join("overlays"));
    let components = subdirs(&k8s.join("components"));
    let mut renders: Vec<(String, Vec<PathBuf>, Vec<PathBuf>)> = overlays
        .iter()
        .map(|o| {
            (
                format!("overlays/{}", o.file_name().unwrap().to_string_lossy()),
                vec![o.clone()],
                vec![],
            )
        })
        .collect();
    for c in &components {
        renders.push((
            format!("cpu+{}", c.file_name().unwrap().to_string_lossy()),
            vec![k8s.join("overlays/cpu")],
            vec![c.clone()],
        ));
    }
    // The same base object appears in every rendering: each problem is reported once, with
    // the renderings it appears in.
    let mut k8s_problems: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut k8s_processes_count = 0;
    for (label, resources, comps) in &renders {
        let rendered = render_wrapped(&label.replace(['/', '+'], "-"), resources, comps);
        let docs = yaml_docs(&rendered, label);
        let mut found = vec![];
        let procs = k8s_processes(&docs, &mut found);
        for p in &procs {
            check_process(p, &mut found);
        }
        // One model for the whole run.
        let models = models_named(&procs);
        if models.len() > 1 {
            found.push(format!("the roles name different models: {models:?}"));
        }
        for problem in found {
            k8s_problems.entry(problem).or_default().push(label.clone());
        }
        k8s_processes_count += procs.len();
    }
    problems.extend(
        k8s_problems
            .into_iter()
            .map(|(p, labels)| format!("{p}  [in {}]", labels.join(", "))),
    );
    assert!(
        k8s_processes_count >= 3 * overlays.len(),
        "found only {k8s_processes_count} hindsight containers in {} renderings",
        renders.len()
    );

    // Every YAML file under deploy/k8s feeds some overlay or component (otherwise it is never
    // checked, nor applied).
    let mut inputs = BTreeSet::new();
    for dir in overlays.iter().chain(&components) {
        kustomize_inputs(dir, &mut inputs);
    }
    for f in files.iter().filter(|f| f.starts_with(&k8s)) {
        let c = f.canonicalize().unwrap();
        if !is_kustomization(f) && !inputs.contains(&c) {
            problems.push(format!(
                "{}: no overlay or component uses this file, so nothing checks it",
                shown(f)
            ));
        }
    }

    // Compose files (deploy/compose, when it exists) and any other YAML with `services:`.
    let mut compose_files = 0;
    for f in files.iter().filter(|f| !f.starts_with(&k8s)) {
        let text = std::fs::read_to_string(f).unwrap();
        for doc in yaml_docs(&text, &shown(f)) {
            if get(&doc, &["services"]).is_some_and(Value::is_object) {
                compose_files += 1;
                processes.extend(compose_processes(f, &doc, &mut problems));
            }
        }
    }

    for p in &processes {
        check_process(p, &mut problems);
    }
    eprintln!(
        "checked {k8s_processes_count} hindsight containers in {} Kubernetes renderings and \
         {} hindsight services in {compose_files} compose files",
        renders.len(),
        processes.len()
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// The models the processes name (`--model` or HINDSIGHT_MODEL), with who names each.
fn models_named(processes: &[Process]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in processes {
        let from_argv = flags_of(&p.argv)
            .into_iter()
            .rev()
            .find(|(f, _)| f == "model")
            .and_then(|(_, v)| v);
        let from_env = p
            .env
            .iter()
            .rev()
            .find(|(n, _)| n == "HINDSIGHT_MODEL")
            .and_then(|(_, v)| v.clone());
        if let Some(model) = from_argv.or(from_env) {
            out.entry(model).or_default().push(p.origin.clone());
        }
    }
    out
}
