//! Logging in through nearcache as Redis would have it: a client that
//! authenticates as another user (or with a password nearcache does not
//! know) gets its own upstream connection opened with its credentials, and
//! never reads L1, because its ACL may deny it the key. Real redis-server.

mod support;

use support::*;

fn acl(redis: &RedisServer, rule: &[&str]) {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER");
    for r in rule {
        cmd.arg(*r);
    }
    let _: () = cmd.query(&mut redis.conn()).unwrap();
}

fn text(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply).trim_end().to_string()
}

#[test]
fn users_with_other_acls_never_read_l1() {
    let redis = RedisServer::start();
    acl(&redis, &["noget", "on", ">pw1", "~*", "+@all", "-get"]);
    acl(&redis, &["other", "on", ">pw2", "~other:*", "+@all"]);
    let proxy = Proxy::start(&redis);
    proxy.wait_serving();
    let _: () = redis::cmd("SET")
        .arg("quote:acl")
        .arg("v")
        .query(&mut redis.conn())
        .unwrap();

    // nearcache's own user fills L1.
    let mut app = RawClient::connect(proxy.port);
    assert_eq!(app.line("GET quote:acl"), b"$1\r\nv\r\n".to_vec());
    assert_eq!(app.line("GET quote:acl"), b"$1\r\nv\r\n".to_vec());
    let hits = proxy.stat("hits");
    assert!(hits >= 1);

    // A user without GET, by AUTH and by HELLO AUTH, in both protocols.
    for login in [
        "AUTH noget pw1",
        "HELLO 3 AUTH noget pw1",
        "HELLO 2 AUTH noget pw1",
    ] {
        let mut c = RawClient::connect(proxy.port);
        let r = c.line(login);
        assert!(!r.starts_with(b"-"), "{login}: {}", text(&r));
        let r = c.line("GET quote:acl");
        assert!(text(&r).starts_with("-NOPERM"), "{login}: got {}", text(&r));
        assert!(c.line("PING").ends_with(b"PONG\r\n"));
        // It runs as that user on the server.
        assert_eq!(c.line("ACL WHOAMI"), b"$5\r\nnoget\r\n".to_vec());
    }
    // A user limited to other keys.
    let mut c = RawClient::connect(proxy.port);
    assert_eq!(c.line("AUTH other pw2"), b"+OK\r\n".to_vec());
    assert!(text(&c.line("GET quote:acl")).starts_with("-NOPERM"));
    assert_eq!(c.line("SET other:1 x"), b"+OK\r\n".to_vec());
    assert_eq!(c.line("GET other:1"), b"$1\r\nx\r\n".to_vec());
    assert_eq!(proxy.stat("hits"), hits, "no other user read L1");

    // A wrong password gets Redis' own answer and leaves the login as it was.
    let mut c = RawClient::connect(proxy.port);
    assert_eq!(
        text(&c.line("AUTH noget wrong")),
        "-WRONGPASS invalid username-password pair or user is disabled."
    );
    assert_eq!(c.line("GET quote:acl"), b"$1\r\nv\r\n".to_vec());
    assert_eq!(c.line("ACL WHOAMI"), b"$7\r\ndefault\r\n".to_vec());

    // Back to the default user (no password configured upstream): Redis' own
    // rule for AUTH without a password applies, and the client stays who it was.
    let mut c = RawClient::connect(proxy.port);
    assert_eq!(c.line("AUTH other pw2"), b"+OK\r\n".to_vec());
    let r = c.line("AUTH somepass");
    let direct = RawClient::connect(redis.port).line("AUTH somepass");
    assert_eq!(r, direct, "Redis' own answer");
}

/// `CONFIG SET requirepass x` followed by `AUTH x` behaves as on Redis,
/// although nearcache does not know the new password.
#[test]
fn auth_with_a_password_set_at_runtime() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    proxy.wait_serving();
    let mut admin = RawClient::connect(proxy.port);
    assert_eq!(
        admin.line("CONFIG SET requirepass s3cret"),
        b"+OK\r\n".to_vec()
    );
    let mut c = RawClient::connect(proxy.port);
    assert_eq!(
        text(&c.line("AUTH nope")),
        "-WRONGPASS invalid username-password pair or user is disabled."
    );
    assert_eq!(c.line("AUTH s3cret"), b"+OK\r\n".to_vec());
    assert_eq!(c.line("SET k v"), b"+OK\r\n".to_vec());
    assert_eq!(c.line("GET k"), b"$1\r\nv\r\n".to_vec());
    assert_eq!(c.line("ACL WHOAMI"), b"$7\r\ndefault\r\n".to_vec());
    // HELLO with the new password too.
    let mut h = RawClient::connect(proxy.port);
    let r = h.line("HELLO 3 AUTH default s3cret");
    assert!(r.starts_with(b"%"), "{}", text(&r));
    assert_eq!(h.line("GET k"), b"$1\r\nv\r\n".to_vec());
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("")
        .query(
            &mut redis::Client::open(format!("redis://:s3cret@127.0.0.1:{}", redis.port))
                .unwrap()
                .get_connection()
                .unwrap(),
        )
        .unwrap();
}
