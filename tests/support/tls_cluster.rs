//! A real Redis Cluster that speaks TLS only: every node is
//! `redis-server --port 0 --tls-port …` with `--tls-cluster yes` (the
//! cluster bus over TLS, so `CLUSTER SLOTS` / `CLUSTER NODES` asked over TLS
//! name the TLS ports) and `--tls-replication yes`, clients must present a
//! certificate (`--tls-auth-clients yes`), slots assigned by
//! `redis-cli --tls … --cluster create`. Certificates are made at test time
//! ([`TestPki`]). Every check the tests make on the nodes goes through
//! `redis-cli --tls`: there is no plain port to fall back on. Processes are
//! killed and their directories removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::{free_port, scratch_dir, wait_for_port};

/// PEM files of a throwaway PKI: a CA, a server certificate for 127.0.0.1
/// (server use only) and a client certificate (client use only), both
/// signed by it, and an unrelated CA.
pub struct TestPki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (p.self_signed(&key).unwrap(), key)
}

fn leaf(
    cn: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &rcgen::Certificate,
    issuer_key: &KeyPair,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut p = CertificateParams::new(sans).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![usage];
    let cert = p.signed_by(&key, issuer, issuer_key).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = scratch_dir();
        let (ca_cert, ca_key) = ca("nearcache test CA");
        let (server_pem, server_key) = leaf(
            "redis",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca_cert,
            &ca_key,
        );
        let (client_pem, client_key) = leaf(
            "nearcache",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            &ca_cert,
            &ca_key,
        );
        let (other_ca, _) = ca("some other CA");
        let write = |file: &str, text: &str| {
            let p = dir.join(file);
            std::fs::write(&p, text).unwrap();
            p
        };
        TestPki {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_pem),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_pem),
            client_key: write("client.key", &client_key),
            other_ca: write("other-ca.pem", &other_ca.pem()),
            dir,
            ca_cert,
            ca_key,
        }
    }

    /// Another server certificate from the same CA, valid for `names` only:
    /// its certificate and key files.
    pub fn server_cert_for(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let (pem, key) = leaf(
            "redis",
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            &self.ca_cert,
            &self.ca_key,
        );
        let stem = format!("server-{}", names.join("+"));
        let cert_path = self.dir.join(format!("{stem}.pem"));
        let key_path = self.dir.join(format!("{stem}.key"));
        std::fs::write(&cert_path, pem).unwrap();
        std::fs::write(&key_path, key).unwrap();
        (cert_path, key_path)
    }

    /// `[upstream.tls]` keys: the CA and the client certificate.
    pub fn upstream_tls_toml(&self) -> String {
        format!(
            "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            path(&self.ca),
            path(&self.client_cert),
            path(&self.client_key)
        )
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// One TLS-only cluster node.
pub struct TlsNode {
    pub tls_port: u16,
    /// The names its server certificate is valid for.
    pub names: Vec<String>,
    child: Child,
    dir: PathBuf,
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct TlsCluster {
    pub nodes: Vec<TlsNode>,
    pub pki: TestPki,
}

impl TlsCluster {
    /// `n` masters, no replicas, every slot assigned, `cluster_state:ok`
    /// on every node and the same slot owners in every node's view.
    pub fn start(n: usize) -> TlsCluster {
        TlsCluster::start_with_names(&vec![&["127.0.0.1", "localhost"][..]; n])
    }

    /// One master per entry, each with a server certificate valid for
    /// those names only.
    pub fn start_with_names(names: &[&[&str]]) -> TlsCluster {
        let pki = TestPki::new();
        let nodes: Vec<TlsNode> = names
            .iter()
            .map(|names| TlsCluster::spawn(&pki, names))
            .collect();
        let mut c = TlsCluster { nodes, pki };
        for node in &c.nodes {
            let port = node.tls_port;
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.cli(port, &["PING"]).trim() != "PONG" {
                assert!(
                    Instant::now() < deadline,
                    "node {port} never answered PING over TLS"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut cmd = c.cli_command();
        cmd.args(["--cluster", "create"]);
        for node in &c.nodes {
            cmd.arg(format!("127.0.0.1:{}", node.tls_port));
        }
        let out = cmd
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --tls --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait_ok();
        c.nodes.sort_by_key(|n| n.tls_port);
        c
    }

    fn spawn(pki: &TestPki, names: &[&str]) -> TlsNode {
        let (server_cert, server_key) = pki.server_cert_for(names);
        let tls_port = free_port();
        // The bus port given explicitly rather than port + 10000, which may
        // be taken, or above 65535 (redis-server refuses ports over 55535).
        let bus_port = free_port();
        let dir = scratch_dir();
        let log = dir.join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &tls_port.to_string()])
            .args(["--cluster-port", &bus_port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &path(&dir), "--logfile", &path(&log)])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", "2000"])
            .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
            .args(["--tls-cert-file", &path(&server_cert)])
            .args(["--tls-key-file", &path(&server_key)])
            // Outgoing TLS (the bus, replication) presents the client
            // certificate: the server one is for server authentication only.
            .args(["--tls-client-cert-file", &path(&pki.client_cert)])
            .args(["--tls-client-key-file", &path(&pki.client_key)])
            .args(["--tls-ca-cert-file", &path(&pki.ca)])
            .args(["--tls-auth-clients", "yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let mut node = TlsNode {
            tls_port,
            names: names.iter().map(|n| n.to_string()).collect(),
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
            if let Ok(Some(status)) = node.child.try_wait() {
                panic!(
                    "redis-server (TLS cluster node) exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "TLS port {tls_port} never opened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_for_port(tls_port, Duration::from_secs(1));
        node
    }

    /// `redis-cli` with TLS, the CA and the client certificate.
    fn cli_command(&self) -> Command {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["--tls", "--cacert", &path(&self.pki.ca)])
            .args(["--cert", &path(&self.pki.client_cert)])
            .args(["--key", &path(&self.pki.client_key)]);
        cmd
    }

    /// One command on a node over TLS; redis-cli's output (an error reply
    /// is printed as its text).
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = self
            .cli_command()
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli must be installed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The slot owners in one node's view (`CLUSTER NODES` over TLS):
    /// `(start, end, port)` sorted.
    pub fn owners_seen_by(&self, port: u16) -> Vec<(u16, u16, u16)> {
        let text = self.cli(port, &["CLUSTER", "NODES"]);
        let mut out = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") {
                continue;
            }
            let addr = f[1].split('@').next().unwrap();
            let Some(Ok(node_port)) = addr.rsplit_once(':').map(|(_, p)| p.parse::<u16>()) else {
                continue;
            };
            for range in &f[8..] {
                if range.starts_with('[') {
                    continue;
                }
                let (s, e) = range.split_once('-').unwrap_or((range, range));
                out.push((s.parse().unwrap(), e.parse().unwrap(), node_port));
            }
        }
        out.sort();
        out
    }

    /// Waits until every node says `cluster_state:ok` and every node sees
    /// the same owner for every slot.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self.nodes.iter().all(|n| {
                self.cli(n.tls_port, &["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")
            });
            let views: Vec<_> = self
                .nodes
                .iter()
                .map(|n| self.owners_seen_by(n.tls_port))
                .collect();
            let covered: u32 = views[0].iter().map(|(s, e, _)| (e - s) as u32 + 1).sum();
            if ok && covered == 16384 && views.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the TLS cluster never became ok: {views:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The TLS port of the node owning `key`'s slot (`CLUSTER KEYSLOT` and
    /// `CLUSTER NODES` of the first node).
    pub fn owner_of(&self, key: &str) -> u16 {
        let first = self.nodes[0].tls_port;
        let slot: u16 = self
            .cli(first, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT");
        self.owners_seen_by(first)
            .into_iter()
            .find(|(s, e, _)| (*s..=*e).contains(&slot))
            .map(|(_, _, port)| port)
            .unwrap_or_else(|| panic!("slot {slot} has no owner"))
    }

    /// Every node as a seed, after `scheme://`.
    pub fn url(&self, scheme: &str) -> String {
        let seeds: Vec<String> = self.addresses();
        format!("{scheme}://{}", seeds.join(","))
    }

    /// `127.0.0.1:<tls port>` of every node, in port order.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.tls_port))
            .collect()
    }
}
