//! nearcache driven by `redis-cli` as a subprocess: its output through the
//! proxy must match its output against Redis directly.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::*;

/// Runs redis-cli with `args`, feeding `stdin`; returns stdout.
fn cli_stdin(port: u16, args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli must be installed");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        input.write_all(&data).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pair() -> (RedisServer, RedisServer, Proxy) {
    let direct = RedisServer::start();
    let behind = RedisServer::start();
    let proxy = Proxy::start(&behind);
    (direct, behind, proxy)
}

const SESSION: &[&[&str]] = &[
    &["SET", "user:1", "alice"],
    &["GET", "user:1"],
    &["HSET", "profile:1", "name", "alice", "age", "30"],
    &["HGETALL", "profile:1"],
    &["LPUSH", "queue", "a", "b", "c"],
    &["LRANGE", "queue", "0", "-1"],
    &["INCR", "visits"],
    &["INCR", "visits"],
    &["EXPIRE", "user:1", "100"],
    &["TTL", "user:1"],
    &["ZADD", "z", "1.5", "m"],
    &["ZSCORE", "z", "m"],
    &["SMEMBERS", "nosuch"],
    &["GET", "nosuch"],
    &["LPUSH", "user:1", "x"],
    &["DEL", "queue", "nosuch"],
    &["KEYS", "user:*"],
    &["NOSUCHCOMMAND"],
];

#[test]
fn scripted_session_matches_redis_in_resp2_resp3_and_raw() {
    let (direct, _behind, proxy) = pair();
    for mode in [&[][..], &["-3"][..], &["--raw"][..], &["--no-raw"][..]] {
        for p in [direct.port, proxy.port] {
            redis_cli(p, &["FLUSHALL"]);
        }
        for cmd in SESSION {
            let args: Vec<&str> = mode.iter().chain(cmd.iter()).copied().collect();
            let expected = redis_cli(direct.port, &args);
            let got = redis_cli(proxy.port, &args);
            assert_eq!(got, expected, "redis-cli {args:?}");
        }
    }
    // RESP3 types as redis-cli shows them.
    let score = redis_cli(proxy.port, &["-3", "--no-raw", "ZSCORE", "z", "m"]);
    assert_eq!(score.trim(), "(double) 1.5");
    let map = redis_cli(proxy.port, &["-3", "--no-raw", "HGETALL", "profile:1"]);
    assert!(map.contains("1# \"name\" => \"alice\""), "{map}");
}

#[test]
fn commands_from_stdin_match_redis() {
    let (direct, _behind, proxy) = pair();
    warm_resp3(proxy.port);
    let script = b"SET a 1\nINCR a\nGET a\nHSET h f v\nHGETALL h\nRPUSH l x y\nLRANGE l 0 -1\nGET nosuch\nDEL a l\n";
    for mode in [&[][..], &["--raw"][..], &["-3"][..]] {
        for p in [direct.port, proxy.port] {
            redis_cli(p, &["FLUSHALL"]);
        }
        let expected = cli_stdin(direct.port, mode, script);
        let got = cli_stdin(proxy.port, mode, script);
        assert!(expected.contains("OK"), "{expected}");
        assert_eq!(got, expected, "redis-cli {mode:?} < script");
    }
    // -x: the last argument from stdin.
    let _ = cli_stdin(proxy.port, &["-x", "SET", "fromstdin"], b"payload\n");
    assert_eq!(redis_cli(proxy.port, &["GET", "fromstdin"]), "payload\n\n");
}

#[test]
fn pipe_mass_insertion_of_10000_sets() {
    let (_direct, behind, proxy) = pair();
    let mut input = Vec::new();
    for i in 0..10_000 {
        let (k, v) = (format!("mass:{i}"), format!("value-{i}"));
        input.extend(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
                k.len(),
                v.len()
            )
            .bytes(),
        );
    }
    let out = cli_stdin(proxy.port, &["--pipe"], &input);
    assert!(out.contains("errors: 0, replies: 10000"), "{out}");
    assert_eq!(redis_cli(proxy.port, &["DBSIZE"]).trim(), "10000");
    assert_eq!(redis_cli(behind.port, &["DBSIZE"]).trim(), "10000");
    assert_eq!(
        redis_cli(proxy.port, &["GET", "mass:9999"]).trim(),
        "value-9999"
    );
}

#[test]
fn nearcache_admin_commands_through_redis_cli() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url());
    config.cache.policies.clear();
    config.cache.default_ttl = Some(std::time::Duration::from_secs(60));
    let proxy = Proxy::with_config(config);
    proxy.wait_serving();
    redis_cli(proxy.port, &["SET", "hot", "1"]);
    for _ in 0..5 {
        assert_eq!(redis_cli(proxy.port, &["GET", "hot"]).trim(), "1");
    }
    let stats = redis_cli(proxy.port, &["NEARCACHE", "STATS"]);
    assert!(stats.lines().any(|l| l == "serving"), "{stats}");
    let stats3 = redis_cli(proxy.port, &["-3", "NEARCACHE", "STATS"]);
    assert!(stats3.contains("serving"), "{stats3}");
    let hot = redis_cli(proxy.port, &["NEARCACHE", "HOTKEYS", "5"]);
    assert!(hot.lines().any(|l| l == "hot"), "{hot}");
    let bad = redis_cli(proxy.port, &["NEARCACHE", "HOTKEYS", "x"]);
    assert!(bad.contains("ERR"), "{bad}");
    assert_eq!(redis_cli(proxy.port, &["NEARCACHE", "FLUSH"]).trim(), "OK");
}

#[test]
fn stdin_transaction_then_select_back() {
    let (direct, _behind, proxy) = pair();
    let script = b"SET a 1\nMULTI\nINCR a\nEXEC\nSELECT 1\nSET in1 v\nSELECT 0\nGET in1\nGET a\n";
    let expected = cli_stdin(direct.port, &[], script);
    let got = cli_stdin(proxy.port, &[], script);
    assert_eq!(got, expected);
}

/// Waits until a RESP3 client gets through (the pools connect in the background).
fn warm_resp3(port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while redis_cli(port, &["-3", "PING"]).trim() != "PONG" {
        assert!(
            std::time::Instant::now() < deadline,
            "RESP3 pool never came up"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn first_resp3_client_with_command_docs() {
    let (direct, _behind, proxy) = pair();
    let script = b"SET a 1\nGET a\n";
    let expected = cli_stdin(direct.port, &["-3"], script);
    let got = cli_stdin(proxy.port, &["-3"], script);
    assert_eq!(got, expected);
}
