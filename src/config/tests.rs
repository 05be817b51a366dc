//! Configuration: defaults, precedence, shipped file, errors naming keys.

use super::*;

#[test]
fn defaults_match_the_documented_ones() {
    let c = Config::defaults();
    assert_eq!(c.listen.to_string(), "127.0.0.1:6380");
    assert_eq!(c.admin.unwrap().to_string(), "127.0.0.1:9121");
    assert_eq!(c.upstream.url.address(), "127.0.0.1:6379");
    assert_eq!(c.server.proto_max_bulk_len, 512 << 20);
    assert_eq!(c.cache.max_bytes, 256 << 20);
    assert_eq!(c.cache.policies.len(), 4);
    assert!(c.tdengine.is_none());
}

#[test]
fn shipped_conf_file_states_the_defaults() {
    let shipped = Config::from_toml(include_str!("../../conf/nearcache.toml")).unwrap();
    let d = Config::defaults();
    assert_eq!(shipped.listen, d.listen);
    assert_eq!(shipped.admin, d.admin);
    assert_eq!(shipped.shutdown_grace, d.shutdown_grace);
    assert_eq!(shipped.server.max_clients, d.server.max_clients);
    assert_eq!(
        shipped.server.proto_max_bulk_len,
        d.server.proto_max_bulk_len
    );
    assert_eq!(
        shipped.server.client_query_buffer_limit,
        d.server.client_query_buffer_limit
    );
    assert_eq!(shipped.server.worker_threads, d.server.worker_threads);
    assert_eq!(shipped.upstream.url, d.upstream.url);
    assert_eq!(shipped.upstream.pool_size, d.upstream.pool_size);
    assert_eq!(shipped.upstream.command_timeout, d.upstream.command_timeout);
    assert_eq!(shipped.cache.max_bytes, d.cache.max_bytes);
    assert_eq!(shipped.cache.invalidation, d.cache.invalidation);
    assert_eq!(shipped.cache.default_ttl, d.cache.default_ttl);
    let pats = |c: &Config| {
        c.cache
            .policies
            .iter()
            .map(|p| (p.pattern.clone(), p.ttl))
            .collect::<Vec<_>>()
    };
    assert_eq!(pats(&shipped), pats(&d));
    assert!(shipped.tdengine.is_none());
}

#[test]
fn flag_beats_env_beats_file() {
    let dir = std::env::temp_dir().join(format!("nc-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("f.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:1111\"\n[upstream]\nurl = \"redis://file:1\"\n",
    )
    .unwrap();
    let env = [
        ("NEARCACHE_LISTEN", "127.0.0.1:2222"),
        ("NEARCACHE_UPSTREAM", "redis://env:2"),
    ];
    let cli = Cli {
        config: Some(path.clone()),
        ..Default::default()
    };
    let c = Config::resolve(&cli, &env).unwrap();
    assert_eq!(c.listen.port(), 2222);
    assert_eq!(c.upstream.url.host, "env");
    let cli = Cli {
        config: Some(path),
        listen: Some("127.0.0.1:3333".into()),
        upstream: Some("redis://flag:3/4".into()),
        ..Default::default()
    };
    let c = Config::resolve(&cli, &env).unwrap();
    assert_eq!(c.listen.port(), 3333);
    assert_eq!(
        (c.upstream.url.host.as_str(), c.upstream.url.db),
        ("flag", 4)
    );
}

#[test]
fn application_redis_variables_build_the_upstream() {
    let env = [
        ("REDIS_HOST", "redis.internal"),
        ("REDIS_PORT", "6390"),
        ("REDIS_PASSWORD", "s3cret"),
        ("REDIS_DB", "2"),
        ("ENABLE_REDIS_CACHE", "False"),
    ];
    let c = Config::resolve(&Cli::default(), &env).unwrap();
    assert_eq!(c.upstream.url.address(), "redis.internal:6390");
    assert_eq!(c.upstream.url.password.as_deref(), Some("s3cret"));
    assert_eq!(c.upstream.url.db, 2);
    assert!(!c.cache.enabled);
    assert!(!format!("{:?}", c.upstream.url).contains("s3cret"));
}

#[test]
fn errors_name_the_key() {
    let e = Config::from_toml("[cache]\nmax_bytes = \"lots\"\n").unwrap_err();
    assert_eq!(e.key, "cache.max_bytes");
    let e = Config::from_toml("[upstream]\nurl = \"http://x\"\n").unwrap_err();
    assert_eq!(e.key, "upstream.url");
    let e = Config::from_toml("[cache]\nbogus = 1\n").unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = Config::from_toml("[[cache.policies]]\npattern = \"a*\"\n").unwrap_err();
    assert_eq!(e.key, "cache.policies[0].ttl");
    let e = Config::from_toml("[upstream]\npool_size = 0\n").unwrap_err();
    assert_eq!(e.key, "upstream.pool_size");
}

#[test]
fn tdengine_tls_dsn_and_keys() {
    let c = Config::from_toml(
        "[tdengine]\ndsn = \"taos+wss://root:taosdata@td.example:443/market\"\n\
         [tdengine.tls]\nserver_name = \"td.internal\"\n",
    )
    .unwrap();
    let td = c.tdengine.unwrap();
    assert_eq!(td.dsn, "taos+wss://root:taosdata@td.example:443/market");
    assert_eq!(td.tls.server_name.as_deref(), Some("td.internal"));
    assert_eq!(td.tls.ca_file, None);
    let c = Config::from_toml("[tdengine]\ndsn = \"wss://td.example/market\"\n").unwrap();
    assert!(c.tdengine.is_some());
    let e = Config::from_toml(
        "[tdengine]\ndsn = \"wss://td.example/market\"\n[tdengine.tls]\nca_file = \"/nonexistent/ca.pem\"\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "tdengine.tls.ca_file");
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    let e = Config::from_toml("[tdengine]\ndsn = \"https://td.example/market\"\n").unwrap_err();
    assert_eq!(e.key, "tdengine.dsn");
    let e = Config::from_toml("[tdengine.tls]\nverify = false\n").unwrap_err();
    assert!(e.to_string().contains("verify"), "{e}");
}

#[test]
fn sizes_and_durations() {
    assert_eq!(parse_bytes("256MiB").unwrap(), 256 << 20);
    assert_eq!(parse_bytes("1gb").unwrap(), 1 << 30);
    assert_eq!(parse_bytes("4096").unwrap(), 4096);
    assert!(parse_bytes("12XB").is_err());
    assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
}

#[test]
fn url_forms() {
    let u = UpstreamUrl::parse("rediss://app:p%40ss@[::1]:7000/3").unwrap();
    assert!(u.tls);
    assert_eq!(u.username.as_deref(), Some("app"));
    assert_eq!(u.password.as_deref(), Some("p@ss"));
    assert_eq!(u.address(), "[::1]:7000");
    assert_eq!(u.db, 3);
    assert!(UpstreamUrl::parse("redis://h/x").is_err());
}

#[test]
fn client_output_limit_parses_like_redis() {
    use super::resolve::{parse_output_limits, DEFAULT_OUTPUT_LIMITS};
    let mib = 1024 * 1024;
    let d = parse_output_limits(DEFAULT_OUTPUT_LIMITS).unwrap();
    assert_eq!(d, parse_output_limits("normal 256MiB 64MiB 60").unwrap());
    assert_eq!(d.normal.hard, 256 * mib);
    assert_eq!(d.pubsub.soft, 8 * mib);
    assert_eq!(d.pubsub.soft_for, Duration::from_secs(60));
    // A class not named keeps its default; 0 means no limit.
    let l = parse_output_limits("pubsub 0 0 0").unwrap();
    assert_eq!(l.normal, d.normal);
    assert_eq!((l.pubsub.hard, l.pubsub.soft), (0, 0));
    let l = parse_output_limits("NORMAL 1mb 512k 10s").unwrap();
    assert_eq!((l.normal.hard, l.normal.soft), (mib, 512 * 1024));
    assert_eq!(l.normal.soft_for, Duration::from_secs(10));
    for bad in [
        "",
        "normal 1mb",
        "replica 1mb 1mb 1",
        "normal lots 1mb 1",
        "normal 1mb 1mb soon",
    ] {
        assert!(parse_output_limits(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn sentinel_upstream_from_flag_and_file() {
    let cli = Cli {
        upstream: Some("redis-sentinel://s1:26379,s2/mymaster".into()),
        ..Default::default()
    };
    let c = Config::resolve(&cli, &([] as [(&str, &str); 0])).unwrap();
    let s = c.upstream.url.sentinel.as_ref().unwrap();
    assert_eq!(s.sentinels, ["s1:26379", "s2:26379"]);
    assert_eq!(s.master_name, "mymaster");
    assert_eq!(c.upstream.sentinel.timeout, Duration::from_millis(300));
    assert!(c.upstream.sentinel.password.is_none());

    let c = Config::from_toml(
        "[upstream]\nurl = \"redis-sentinel://:master-pw@s1,s2:26380/m/2\"\n\
         [upstream.sentinel]\nusername = \"watcher\"\npassword = \"sentinel-pw\"\ntimeout = \"500ms\"\n",
    )
    .unwrap();
    let u = &c.upstream;
    assert_eq!(u.url.password.as_deref(), Some("master-pw"));
    assert_eq!(u.url.db, 2);
    assert_eq!(u.sentinel.username.as_deref(), Some("watcher"));
    assert_eq!(u.sentinel.password.as_deref(), Some("sentinel-pw"));
    assert_eq!(u.sentinel.timeout, Duration::from_millis(500));
    let shown = format!("{u:?}");
    assert!(
        !shown.contains("sentinel-pw") && !shown.contains("master-pw"),
        "{shown}"
    );
}

#[test]
fn sentinel_errors_name_the_key() {
    let cli = Cli {
        upstream: Some("redis-sentinel://s1,s2".into()),
        ..Default::default()
    };
    let e = Config::resolve(&cli, &([] as [(&str, &str); 0])).unwrap_err();
    assert_eq!(e.key, "--upstream");
    assert!(e.to_string().contains("master's name"), "{e}");
    for (toml, key) in [
        (
            "[upstream]\nurl = \"redis-sentinel://s1:x/m\"\n",
            "upstream.url",
        ),
        (
            "[upstream.sentinel]\nusername = \"u\"\n",
            "upstream.sentinel.username",
        ),
        (
            "[upstream.sentinel]\ntimeout = \"0s\"\n",
            "upstream.sentinel.timeout",
        ),
        (
            "[upstream.sentinel]\ntimeout = \"soon\"\n",
            "upstream.sentinel.timeout",
        ),
    ] {
        let e = Config::from_toml(toml).unwrap_err();
        assert_eq!(e.key, key, "{toml}: {e}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }
    let e = Config::from_toml("[upstream.sentinel]\nmaster = \"m\"\n").unwrap_err();
    assert!(e.to_string().contains("master"), "{e}");
}

#[test]
fn redis_host_replaces_the_files_sentinels() {
    let dir = std::env::temp_dir().join(format!("nc-cfg-sentinel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("f.toml");
    std::fs::write(&path, "[upstream]\nurl = \"redis-sentinel://s1,s2/m\"\n").unwrap();
    let cli = Cli {
        config: Some(path),
        ..Default::default()
    };
    let c = Config::resolve(&cli, &[("REDIS_HOST", "redis.internal")]).unwrap();
    assert!(c.upstream.url.sentinel.is_none());
    assert_eq!(c.upstream.url.address(), "redis.internal:6379");
    let c = Config::resolve(&cli, &[("REDIS_PASSWORD", "pw")]).unwrap();
    assert_eq!(c.upstream.url.sentinel.unwrap().master_name, "m");
    assert_eq!(c.upstream.url.password.as_deref(), Some("pw"));
}

#[test]
fn cluster_upstream_in_the_file_and_the_url() {
    let c = Config::from_toml(
        "[upstream]\nurl = \"redis-cluster://a:7000,b:7001\"\n[upstream.cluster]\nrefresh_interval = \"7s\"\nreplica_reads = true\n",
    )
    .unwrap();
    let seeds = c.upstream.url.cluster.clone().unwrap();
    assert_eq!(seeds.addresses(), ["a:7000", "b:7001"]);
    assert_eq!(c.upstream.cluster.refresh_interval, Duration::from_secs(7));
    assert!(c.upstream.cluster.replica_reads);
    // The URL's options beat the file's.
    let c = Config::from_toml(
        "[upstream]\nurl = \"redis-cluster://a:7000?refresh_interval=2s\"\n[upstream.cluster]\nrefresh_interval = \"7s\"\n",
    )
    .unwrap();
    assert_eq!(c.upstream.cluster.refresh_interval, Duration::from_secs(2));
    assert!(!c.upstream.cluster.replica_reads);
    let e = Config::from_toml("[upstream.cluster]\nrefresh_interval = \"0s\"\n").unwrap_err();
    assert!(
        e.to_string().contains("upstream.cluster.refresh_interval"),
        "{e}"
    );
}
