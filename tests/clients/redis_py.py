#!/usr/bin/env python3
"""Real-client harness, redis-py: do reads of hot keys through nearcache stay in L1?

Usage: redis_py.py PROXY_PORT REDIS_PORT [--db N] [--password P] [--reads N]
                   [--host H] [--format json|text]

For each client configuration below (sync and asyncio; default settings, i.e.
RESP3, and protocol=2; with and without client_name; always
decode_responses=True, and db=/password= when given, as the application
does), the script
  1. writes `quote:…` (string), `ind:…` (hash) and `kline:…` (string) directly
     on Redis (REDIS_PORT),
  2. reads each of them --reads times through nearcache (GET, HGETALL, GET),
     checks every value, and counts how many of those reads reached Redis
     (upstream `INFO commandstats` calls of GET/HGETALL before and after each
     key's reads, on a direct connection),
  3. read-your-writes: SET / HSET through nearcache, then reads the new value,
  4. writes directly on Redis and polls through nearcache until the new value
     appears (limit 1 s).
It also reports how many upstream connections (CLIENT LIST on Redis) were
added while the client was connected: nearcache's pools are opened at start,
so an extra one is a connection pinned to this client.
It prints one JSON line per configuration, then {"done": true, ...}. It judges
nothing: tests/clients.rs asserts. Exit status is non-zero only when the
script itself cannot run (redis-py missing, bad arguments, Redis unreachable).

The library comes from tests/clients/pylib (scripts/test installs the version
pinned in tests/clients/requirements.txt there), falling back to site-packages.

What redis-py 8.1.0 sends when it connects (sync and asyncio identical; seen
on the wire through tests/clients/sniff.py in front of redis-server 7.0.15,
and read in redis/connection.py `on_connect_check_health`). `[..]` only when
configured; every command waits for its reply before the next is sent:

| configuration            | connect-time commands, in order                                                  |
|--------------------------|----------------------------------------------------------------------------------|
| default (RESP3)          | HELLO 3 [AUTH default <pw>]; CLIENT MAINT_NOTIFICATIONS ON moving-endpoint-type   |
|                          | internal-fqdn (host "localhost"; internal-ip for "127.0.0.1"); CLIENT SETINFO     |
|                          | LIB-NAME redis-py; CLIENT SETINFO LIB-VER 8.1.0; [SELECT <db>]                    |
| default + client_name=X  | same, with CLIENT SETNAME X right after MAINT_NOTIFICATIONS                       |
| protocol=2               | [AUTH <pw>]; CLIENT SETINFO LIB-NAME redis-py; CLIENT SETINFO LIB-VER 8.1.0;      |
|                          | [SELECT <db>]  (no HELLO, no MAINT_NOTIFICATIONS: those are RESP3-only)           |
| protocol=2 + client_name | [AUTH <pw>]; CLIENT SETNAME X; CLIENT SETINFO LIB-NAME ...; LIB-VER ...; [SELECT] |

redis-py 8's default protocol is 3 (redis/utils.py DEFAULT_RESP_VERSION = 3).
MAINT_NOTIFICATIONS is sent by default on RESP3 (enabled="auto"; an error
reply, as from Redis < 8, is ignored). A failing CLIENT SETINFO is ignored.
"""

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "pylib"))

try:
    import redis
    import redis.asyncio
except ImportError as e:  # pragma: no cover - reported to the Rust test
    print(json.dumps({"fatal": f"redis-py is not installed ({e}): run scripts/test"}), flush=True)
    sys.exit(3)

CLIENT_NAME = "nearcache-harness"

# (mode, name, extra keyword arguments for redis.Redis / redis.asyncio.Redis)
CONFIGS = [
    (mode, name, kwargs)
    for mode in ("sync", "asyncio")
    for name, kwargs in (
        ("default", {}),
        ("protocol=2", {"protocol": 2}),
        ("client_name", {"client_name": CLIENT_NAME}),
        ("protocol=2 client_name", {"protocol": 2, "client_name": CLIENT_NAME}),
    )
]


class SyncAsAsync:
    """Lets one async routine drive a sync client (calls still block)."""

    def __init__(self, client):
        self.c = client

    async def get(self, key):
        return self.c.get(key)

    async def hgetall(self, key):
        return self.c.hgetall(key)

    async def set(self, key, value):
        return self.c.set(key, value)

    async def hset(self, key, mapping=None):
        return self.c.hset(key, mapping=mapping)

    async def aclose(self):
        self.c.close()


def upstream_connections(direct):
    return len(direct.client_list())


def wait_connections_back(direct, baseline, limit=1.0):
    """After a client closed: wait (briefly) until any connection nearcache opened for it is gone."""
    deadline = time.monotonic() + limit
    while upstream_connections(direct) > baseline and time.monotonic() < deadline:
        time.sleep(0.005)


def upstream_calls(direct, cmd):
    stats = direct.info("commandstats")
    return int(stats.get(f"cmdstat_{cmd.lower()}", {}).get("calls", 0))


async def hot_reads(client, direct, cmd, key, expected, n):
    read = client.get if cmd == "GET" else client.hgetall
    before = upstream_calls(direct, cmd)
    wrong, first_wrong = 0, None
    for _ in range(n):
        got = await read(key)
        if got != expected:
            wrong += 1
            if first_wrong is None:
                first_wrong = repr(got)
    after = upstream_calls(direct, cmd)
    return {
        "cmd": cmd,
        "key": key,
        "reads": n,
        "wrong": wrong,
        "first_wrong": first_wrong,
        "upstream": after - before,
    }


async def poll_until(client, cmd, key, want, allowed, limit=1.0):
    """Reads through nearcache until `want` shows; anything but `allowed` values is an error."""
    read = client.get if cmd == "GET" else client.hgetall
    start = time.monotonic()
    polls = 0
    unexpected = None
    while True:
        got = await read(key)
        polls += 1
        elapsed = time.monotonic() - start
        if got == want:
            return {"cmd": cmd, "key": key, "ok": unexpected is None, "ms": round(elapsed * 1000, 3),
                    "polls": polls, "unexpected": unexpected}
        if got not in allowed and unexpected is None:
            unexpected = repr(got)
        if elapsed > limit:
            return {"cmd": cmd, "key": key, "ok": False, "ms": round(elapsed * 1000, 3),
                    "polls": polls, "unexpected": unexpected, "last": repr(got)}
        await asyncio.sleep(0.001)


async def exercise(client, direct, slug, n, baseline):
    tok = uuid.uuid4().hex[:8]
    quote = f"quote:nch-{slug}-{tok}"
    ind = f"ind:nch-{slug}-{tok}:macd:1d"
    kline = f"kline:nch-{slug}-{tok}:1d"
    qv = json.dumps({"price": 10.5, "cfg": slug, "tok": tok})
    iv = {"dif": "0.12", "dea": "0.10", "macd": "0.04", "cfg": slug}
    kv = json.dumps([{"ts": 1751040000000, "open": 11.2, "close": 11.16, "cfg": slug}])
    direct.set(quote, qv)
    direct.hset(ind, mapping=iv)
    direct.set(kline, kv)

    reads = [
        await hot_reads(client, direct, "GET", quote, qv, n),
        await hot_reads(client, direct, "HGETALL", ind, iv, n),
        await hot_reads(client, direct, "GET", kline, kv, n),
    ]
    # Upstream connections nearcache opened for this client alone (pinned), if any.
    extra = upstream_connections(direct) - baseline

    # Read your writes: the old values are in L1 now.
    qv2 = json.dumps({"price": 10.6, "cfg": slug, "tok": tok})
    iv2 = dict(iv, macd="0.05")
    await client.set(quote, qv2)
    got_q = await client.get(quote)
    await client.hset(ind, mapping={"macd": "0.05"})
    got_i = await client.hgetall(ind)
    ryw = [
        {"cmd": "SET then GET", "key": quote, "ok": got_q == qv2, "got": None if got_q == qv2 else repr(got_q)},
        {"cmd": "HSET then HGETALL", "key": ind, "ok": got_i == iv2, "got": None if got_i == iv2 else repr(got_i)},
    ]

    # Writes behind nearcache's back: cache the current value, write on Redis, poll.
    for _ in range(3):
        await client.get(quote)
        await client.hgetall(ind)
    qv3 = json.dumps({"price": 10.7, "cfg": slug, "tok": tok})
    iv3 = dict(iv2, macd="0.06")
    direct.set(quote, qv3)
    dq = await poll_until(client, "GET", quote, qv3, [qv2])
    direct.hset(ind, "macd", "0.06")
    di = await poll_until(client, "HGETALL", ind, iv3, [iv2])
    return {"reads": reads, "extra_upstream_connections": extra, "read_your_writes": ryw,
            "direct_write": [dq, di]}


async def run_config(args, direct, mode, name, kwargs):
    label = f"redis-py {mode} {name}"
    slug = f"py-{mode}-{name}".replace(" ", "-").replace("=", "")
    common = dict(host=args.host, port=args.proxy_port, db=args.db, password=args.password,
                  decode_responses=True, socket_timeout=10)
    common.update(kwargs)
    result = {"harness": "redis-py", "lib": f"redis-py {redis.__version__}", "config": label,
              "mode": mode, "protocol": kwargs.get("protocol", 3), "client_name": "client_name" in kwargs,
              "db": args.db, "password": args.password is not None, "error": None}
    client = None
    baseline = upstream_connections(direct)
    try:
        if mode == "sync":
            client = SyncAsAsync(redis.Redis(**common))
        else:
            client = redis.asyncio.Redis(**common)
        result.update(await exercise(client, direct, slug, args.reads, baseline))
    except Exception as e:  # reported, judged by the Rust test
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if client is not None:
            try:
                await client.aclose()
            except Exception:
                pass
        wait_connections_back(direct, baseline)
    return result


def text_line(r):
    if r.get("error"):
        return f"{r['config']:<40} ERROR {r['error']}"
    reads = ", ".join(f"{x['cmd']} {x['upstream']}/{x['reads']} upstream"
                      + (f" {x['wrong']} WRONG" if x["wrong"] else "") for x in r["reads"])
    ryw = "ok" if all(x["ok"] for x in r["read_your_writes"]) else "FAILED"
    dw = ", ".join(f"{x['ms']}ms" if x["ok"] else "FAILED" for x in r["direct_write"])
    return f"{r['config']:<40} {reads}; read-your-writes {ryw}; direct write seen after {dw}"


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("proxy_port", type=int)
    p.add_argument("redis_port", type=int)
    p.add_argument("--db", type=int, default=0)
    p.add_argument("--password", default=None)
    p.add_argument("--reads", type=int, default=50)
    p.add_argument("--host", default="localhost", help="how the client reaches nearcache (the app uses localhost)")
    p.add_argument("--format", choices=("json", "text"), default="json")
    args = p.parse_args()

    direct = redis.Redis(host="127.0.0.1", port=args.redis_port, db=args.db, password=args.password,
                         protocol=2, decode_responses=True, socket_timeout=10)
    direct.ping()
    for mode, name, kwargs in CONFIGS:
        r = await run_config(args, direct, mode, name, kwargs)
        print(json.dumps(r) if args.format == "json" else text_line(r), flush=True)
    done = {"done": True, "harness": "redis-py", "lib": f"redis-py {redis.__version__}", "configs": len(CONFIGS)}
    print(json.dumps(done) if args.format == "json" else f"done: {len(CONFIGS)} configurations", flush=True)
    direct.close()


if __name__ == "__main__":
    asyncio.run(main())
