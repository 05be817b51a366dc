#!/usr/bin/env python3
"""Example application talking to nearcache exactly as it would talk to Redis.

Run by the `example-client` service of docker-compose.yml, or from the host:

    pip install redis
    NEARCACHE_PORT=6380 python deploy/example_client.py

1. SET quote:000001 (forwarded to Redis; the local copy is invalidated).
2. GET quote:000001 twice: the first read is an L1 miss filled from Redis,
   the second is answered from nearcache's memory (policy quote:* = 5s).
3. GET kline:000001:1d: in neither L1 nor Redis, so nearcache runs the
   TDengine route from deploy/nearcache.compose.toml and caches the result.
4. NEARCACHE STATS: nearcache's own counters (hits, misses, TDengine, ...).
"""

import json
import os
import sys
import time

import redis

HOST = os.environ.get("NEARCACHE_HOST", "127.0.0.1")
PORT = int(os.environ.get("NEARCACHE_PORT", "6380"))


def connect(deadline_s: float = 60.0) -> redis.Redis:
    """nearcache may still be starting; retry until it answers PING."""
    client = redis.Redis(host=HOST, port=PORT, socket_timeout=5, decode_responses=True)
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            client.ping()
            return client
        except redis.exceptions.ConnectionError as e:
            if time.monotonic() > deadline:
                sys.exit(f"nearcache at {HOST}:{PORT} is not answering: {e}")
            time.sleep(1)


def timed(label, fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    print(f"{label:<28} {(time.perf_counter() - start) * 1000:7.2f} ms  -> {value!r}"[:200])
    return value


def show_stats(client: redis.Redis) -> None:
    stats = client.execute_command("NEARCACHE", "STATS")
    print("\nNEARCACHE STATS")
    if isinstance(stats, str):  # INFO-style text
        print(stats)
    elif isinstance(stats, dict):  # RESP3 map
        for k, v in stats.items():
            print(f"  {k}: {v}")
    elif isinstance(stats, (list, tuple)):  # flat [field, value, ...] or lines
        if len(stats) % 2 == 0 and all(isinstance(k, str) for k in stats[::2]):
            for k, v in zip(stats[::2], stats[1::2]):
                print(f"  {k}: {v}")
        else:
            for line in stats:
                print(f"  {line}")
    else:
        print(f"  {stats!r}")


def main() -> int:
    client = connect()
    print(f"connected to nearcache at {HOST}:{PORT}\n")

    timed("SET quote:000001", client.set, "quote:000001", json.dumps({"symbol": "000001", "price": 11.27}))
    timed("GET quote:000001 (miss)", client.get, "quote:000001")
    timed("GET quote:000001 (L1 hit)", client.get, "quote:000001")

    try:
        kline = timed("GET kline:000001:1d", client.get, "kline:000001:1d")
    except redis.exceptions.ResponseError as e:
        # on_error = "error": TDengine down, slow or the circuit is open.
        print(f"GET kline:000001:1d failed: {e}")
        kline = None
    if kline is None:
        print("kline:000001:1d is nil: is the [tdengine] route configured and TDengine seeded?")
    else:
        try:
            rows = json.loads(kline)
            print(f"  TDengine returned {len(rows) if hasattr(rows, '__len__') else '?'} rows; first: {json.dumps(rows[0]) if rows else None}")
        except (ValueError, TypeError, KeyError, IndexError):
            print(f"  {len(kline)} bytes (not JSON)")
        timed("GET kline:000001:1d (L1 hit)", client.get, "kline:000001:1d")

    try:
        show_stats(client)
    except redis.exceptions.ResponseError as e:
        print(f"\nNEARCACHE STATS not available: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
