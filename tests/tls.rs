//! TLS and ACL towards the upstream: a real `redis-server` with TLS, and
//! certificates made at test time (a CA, a server certificate for 127.0.0.1,
//! a client certificate, and an unrelated CA).

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// The test PKI (a CA, a server certificate for 127.0.0.1 and localhost, a
// client certificate, an unrelated CA), shared with tests/cluster_tls.rs.
use support::tls_cluster::TestPki as Pki;
use support::{free_port, wait_for_port, wait_until, Proxy, SentinelServer};

/// redis-server with a TLS port, plus a plain port used only to set it up.
struct TlsRedis {
    child: Child,
    plain_port: u16,
    tls_port: u16,
}

impl TlsRedis {
    fn start(pki: &Pki, auth_clients: &str) -> TlsRedis {
        TlsRedis::start_with(pki, auth_clients, &[])
    }

    /// With extra `redis-server` arguments.
    fn start_with(pki: &Pki, auth_clients: &str, extra: &[&str]) -> TlsRedis {
        let plain_port = free_port();
        let tls_port = free_port();
        let dir = pki.dir.join(format!("redis-{tls_port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("redis.log");
        let p = |p: &Path| p.to_str().unwrap().to_string();
        let child = Command::new("redis-server")
            .args(["--port", &plain_port.to_string()])
            .args(["--tls-port", &tls_port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", &p(&dir)])
            .args(["--tls-cert-file", &p(&pki.server_cert)])
            .args(["--tls-key-file", &p(&pki.server_key)])
            .args(["--tls-ca-cert-file", &p(&pki.ca)])
            .args(["--tls-auth-clients", auth_clients])
            .args(["--logfile", &p(&log)])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let mut r = TlsRedis {
            child,
            plain_port,
            tls_port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
            if let Ok(Some(status)) = r.child.try_wait() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!(
                    "redis-server with --tls-port exited ({status}). If its log says TLS is not \
                     supported, this redis-server was built without BUILD_TLS=yes; install one \
                     with TLS (Debian's redis-server package has it).\n{log}"
                );
            }
            assert!(Instant::now() < deadline, "redis TLS port never opened");
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_for_port(plain_port, Duration::from_secs(10));
        let mut c = r.admin();
        let pong: String = redis::cmd("PING").query(&mut c).unwrap();
        assert_eq!(pong, "PONG");
        r
    }

    /// A plain-TCP connection for test setup and checks.
    fn admin(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.plain_port))
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A nearcache configured through the TOML file schema, so the upstream.tls keys are exercised.
fn proxy(url: &str, tls: &str) -> Proxy {
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\
         [upstream]\nurl = \"{url}\"\ncommand_timeout = \"5s\"\n[upstream.tls]\n{tls}"
    );
    let config = nearcache::Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    // Not Proxy::with_config: that waits for the upstream, which some tests expect to refuse.
    Proxy::with_config_no_wait(config)
}

fn tls_keys(ca: &Path, client: Option<(&Path, &Path)>) -> String {
    let mut s = format!("ca_file = {:?}\n", ca.to_str().unwrap());
    if let Some((cert, key)) = client {
        s += &format!(
            "cert_file = {:?}\nkey_file = {:?}\n",
            cert.to_str().unwrap(),
            key.to_str().unwrap()
        );
    }
    s
}

/// Retries a command until the upstream connection is up (or `timeout`); returns the last result.
fn query_when_up<T: redis::FromRedisValue>(
    p: &Proxy,
    cmd: &redis::Cmd,
    timeout: Duration,
) -> redis::RedisResult<T> {
    let deadline = Instant::now() + timeout;
    let mut c = p.conn();
    loop {
        let r = cmd.query::<T>(&mut c);
        match &r {
            Err(e) if e.to_string().contains("not connected yet") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => return r,
        }
    }
}

fn get(key: &str) -> redis::Cmd {
    let mut c = redis::cmd("GET");
    c.arg(key);
    c
}

#[test]
fn rediss_with_ca_file_works() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, "optional");
    let url = format!("rediss://127.0.0.1:{}", redis.tls_port);
    let p = proxy(&url, &tls_keys(&pki.ca, None));
    p.wait_serving(); // the invalidation feed runs over TLS too
    let mut c = p.conn();
    redis::cmd("SET")
        .arg("quote:tls")
        .arg("over-tls")
        .exec(&mut c)
        .unwrap();
    for _ in 0..3 {
        let v: String = redis::cmd("GET").arg("quote:tls").query(&mut c).unwrap();
        assert_eq!(v, "over-tls");
    }
    // The write reached the real server, and the connections are TLS ones.
    let v: String = redis::cmd("GET")
        .arg("quote:tls")
        .query(&mut redis.admin())
        .unwrap();
    assert_eq!(v, "over-tls");
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut redis.admin())
        .unwrap();
    assert!(info.contains("total_connections_received"), "{info}");
    // An invalidation from another client arrives over the TLS feed.
    redis::cmd("SET")
        .arg("quote:tls")
        .arg("changed")
        .exec(&mut redis.admin())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let v: String = redis::cmd("GET").arg("quote:tls").query(&mut c).unwrap();
        if v == "changed" {
            break;
        }
        assert!(Instant::now() < deadline, "L1 kept {v:?} after a write");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(p.http_get("/readyz").0, 200);
}

#[test]
fn rediss_with_the_wrong_ca_fails_fast_and_says_why() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, "optional");
    let url = format!("rediss://127.0.0.1:{}", redis.tls_port);
    let p = proxy(&url, &tls_keys(&pki.other_ca, None));
    let e = query_when_up::<Option<String>>(&p, &get("k"), Duration::from_secs(5))
        .expect_err("an untrusted server certificate must not be used");
    let text = e.to_string();
    assert!(
        text.contains("upstream unavailable: TLS handshake:")
            && text.contains("certificate")
            && text.contains("UnknownIssuer"),
        "unclear error: {text}"
    );
    // Every later command fails at once, with the same reason.
    let mut c = p.conn();
    for _ in 0..5 {
        let t = Instant::now();
        let e = get("k").query::<Option<String>>(&mut c).unwrap_err();
        assert!(t.elapsed() < Duration::from_millis(500), "slow failure");
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    }
    let (code, body) = p.http_get("/readyz");
    assert_eq!(code, 503, "{body}");
    // A server name the certificate does not carry is refused as well.
    let p2 = proxy(
        &url,
        &format!(
            "{}server_name = \"redis.example\"\n",
            tls_keys(&pki.ca, None)
        ),
    );
    let e = query_when_up::<Option<String>>(&p2, &get("k"), Duration::from_secs(5)).unwrap_err();
    assert!(
        e.to_string().contains("TLS handshake") && e.to_string().contains("certificate"),
        "{e}"
    );
}

#[test]
fn client_certificate_when_redis_requires_one() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, "yes");
    let url = format!("rediss://127.0.0.1:{}", redis.tls_port);

    let with = proxy(
        &url,
        &tls_keys(&pki.ca, Some((&pki.client_cert, &pki.client_key))),
    );
    let _: () = query_when_up(
        &with,
        redis::cmd("SET").arg("m").arg("1"),
        Duration::from_secs(5),
    )
    .expect("with a client certificate the TLS port accepts nearcache");
    let v: Option<String> = query_when_up(&with, &get("m"), Duration::from_secs(5))
        .expect("with a client certificate the TLS port accepts nearcache");
    assert_eq!(v.as_deref(), Some("1"));
    with.wait_serving();

    let without = proxy(&url, &tls_keys(&pki.ca, None));
    let e = query_when_up::<Option<String>>(&without, &get("m"), Duration::from_secs(5))
        .expect_err("without a client certificate Redis must refuse");
    assert!(e.to_string().contains("upstream unavailable"), "{e}");
    eprintln!("without a client certificate: {e}");
    assert_eq!(without.http_get("/readyz").0, 503);
}

#[test]
fn acl_user_upstream() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, "optional");
    let mut admin = redis.admin();
    redis::cmd("ACL")
        .arg(&["SETUSER", "app", "on", ">secret", "~*", "&*", "+@all"][..])
        .exec(&mut admin)
        .unwrap();
    // The default user needs a password now, so nothing works by accident as default.
    redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "adminpw"][..])
        .exec(&mut admin)
        .unwrap();

    let url = format!("rediss://app:secret@127.0.0.1:{}", redis.tls_port);
    let p = proxy(&url, &tls_keys(&pki.ca, None));
    let who: String = query_when_up(&p, redis::cmd("ACL").arg("WHOAMI"), Duration::from_secs(5))
        .expect("ACL WHOAMI through nearcache");
    assert_eq!(who, "app");
    p.wait_serving(); // the feed authenticates as app too
    let mut c = p.conn();
    redis::cmd("SET")
        .arg("quote:acl")
        .arg("v")
        .exec(&mut c)
        .unwrap();
    let v: String = redis::cmd("GET").arg("quote:acl").query(&mut c).unwrap();
    assert_eq!(v, "v");

    // A wrong password: the error says the handshake was refused, without the password.
    let bad = proxy(
        &format!("rediss://app:wrong-pw@127.0.0.1:{}", redis.tls_port),
        &tls_keys(&pki.ca, None),
    );
    let e = query_when_up::<Option<String>>(&bad, &get("k"), Duration::from_secs(5)).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("WRONGPASS"), "{text}");
    assert!(!text.contains("wrong-pw"), "the password leaked: {text}");
}

/// `rediss-sentinel://`: the Sentinel and the servers listen with TLS
/// (`tls-port`; the Sentinel and the replica reach the servers with
/// `tls-replication yes`, so every address the Sentinel names is a TLS
/// port), and nearcache speaks TLS to both, verifying each certificate
/// against the host it dials. The master is found, writes reach it, and
/// after a `SENTINEL FAILOVER` they reach the promoted replica (whether
/// nearcache learns of it from `+switch-master` on its TLS subscription or
/// from a reconnect's resolution is not told apart here).
#[test]
fn rediss_sentinel_finds_and_follows_the_master_over_tls() {
    let pki = Pki::new();
    let p = |p: &Path| p.to_str().unwrap().to_string();
    // Outgoing TLS (replication, the Sentinel's links) presents the client
    // certificate: the server one is for server authentication only.
    let (client_cert, client_key) = (p(&pki.client_cert), p(&pki.client_key));
    let tls_out = [
        "--tls-replication",
        "yes",
        "--tls-client-cert-file",
        &client_cert,
        "--tls-client-key-file",
        &client_key,
    ];
    let master = TlsRedis::start_with(&pki, "optional", &tls_out);
    let master_port = master.tls_port.to_string();
    let replica = TlsRedis::start_with(
        &pki,
        "optional",
        &[&tls_out[..], &["--replicaof", "127.0.0.1", &master_port]].concat(),
    );
    wait_until("the replica is in sync", Duration::from_secs(20), || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut replica.admin())
            .unwrap_or_default();
        info.contains("master_link_status:up")
    });
    // A plain port too, for the test's own questions; nearcache gets the TLS one.
    let tls_port = free_port();
    let conf = [
        format!("tls-port {tls_port}"),
        format!("tls-cert-file {}", p(&pki.server_cert)),
        format!("tls-key-file {}", p(&pki.server_key)),
        format!("tls-ca-cert-file {}", p(&pki.ca)),
        "tls-auth-clients optional".into(),
        "tls-replication yes".into(),
        format!("tls-client-cert-file {client_cert}"),
        format!("tls-client-key-file {client_key}"),
    ];
    let conf: Vec<&str> = conf.iter().map(String::as_str).collect();
    let sentinel = SentinelServer::start_with(master.tls_port, free_port(), &conf);
    wait_for_port(tls_port, Duration::from_secs(10));
    wait_until(
        "the Sentinel knows the replica",
        Duration::from_secs(30),
        || sentinel.master_field("num-slaves").as_deref() == Some("1"),
    );

    let url = format!("rediss-sentinel://127.0.0.1:{tls_port}/m");
    let proxy = proxy(&url, &tls_keys(&pki.ca, None));
    let _: () = query_when_up(
        &proxy,
        redis::cmd("SET").arg("plain:k").arg("first"),
        Duration::from_secs(5),
    )
    .expect("the master is found through the TLS Sentinel");
    let v: String = redis::cmd("GET")
        .arg("plain:k")
        .query(&mut master.admin())
        .unwrap();
    assert_eq!(v, "first");
    proxy.wait_serving();

    // SENTINEL FAILOVER refuses (-NOGOODSLAVE) until the Sentinel has
    // talked to the replica.
    wait_until(
        "the Sentinel starts a failover",
        Duration::from_secs(20),
        || {
            redis::cmd("SENTINEL")
                .arg("FAILOVER")
                .arg("m")
                .query::<String>(&mut sentinel.conn())
                .is_ok()
        },
    );
    wait_until(
        "nearcache follows the switch",
        Duration::from_secs(30),
        || proxy.stat_text("sentinel_master") == format!("127.0.0.1:{}", replica.tls_port),
    );
    let mut c = proxy.conn();
    wait_until(
        "a write through nearcache lands on the new master",
        Duration::from_secs(10),
        || {
            let r: redis::RedisResult<()> =
                redis::cmd("SET").arg("plain:k").arg("second").query(&mut c);
            let on_new: Option<String> = redis::cmd("GET")
                .arg("plain:k")
                .query(&mut replica.admin())
                .unwrap_or(None);
            r.is_ok() && on_new.as_deref() == Some("second")
        },
    );

    // Plain TCP to the Sentinel's TLS port gets nowhere: TLS was used.
    let plain = proxy_plain_url(&url);
    let p2 = Proxy::with_config_no_wait(support::test_config(&plain));
    let e = query_when_up::<String>(&p2, &redis::cmd("PING"), Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("no Sentinel reachable"), "{e}");
    eprintln!("plain TCP to the TLS Sentinel: {e}");
}

fn proxy_plain_url(url: &str) -> String {
    url.replacen("rediss-sentinel://", "redis-sentinel://", 1)
}
