#!/usr/bin/env python3
"""redis-py against nearcache in front of a Redis Cluster (tests/cluster_clients.rs).

    cluster_py.py <nearcache-port> <keys> <reads>

For each configuration (redis-py's defaults = RESP3, protocol=2, a client
name), with a plain (non-cluster) redis.Redis: SET of every key `ind:{i}:macd:1d`
(spread over the cluster's masters), then <reads> GETs of each, then one MGET
of all of them in order. Prints one JSON line per configuration:
{"config", "wrong", "first_wrong", "mget_ok", "error"}; the Rust side checks
the values and, with NEARCACHE STATS, that the hot reads were L1 hits.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pylib"))
import redis  # noqa: E402

port, nkeys, reads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
CONFIGS = [("redis-py default", {}), ("redis-py protocol=2", {"protocol": 2}),
           ("redis-py client_name", {"client_name": "cluster-harness"})]
for name, kwargs in CONFIGS:
    out = {"config": name, "wrong": 0, "first_wrong": None, "mget_ok": False, "error": None,
           "lib": redis.__version__}
    try:
        r = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, **kwargs)
        keys = [f"ind:{i}:macd:1d" for i in range(nkeys)]
        tag = name.replace(" ", "_")
        for k in keys:
            r.set(k, f"{tag}:{k}")
        for _ in range(reads):
            for k in keys:
                v = r.get(k)
                if v != f"{tag}:{k}":
                    out["wrong"] += 1
                    out["first_wrong"] = out["first_wrong"] or f"{k}={v!r}"
        out["mget_ok"] = r.mget(keys) == [f"{tag}:{k}" for k in keys]
        r.close()
    except Exception as e:  # reported, judged on the Rust side
        out["error"] = repr(e)
    print(json.dumps(out), flush=True)
