#!/usr/bin/env python3
"""The application's workload for scripts/bench (run 7, "app").

    app_load.py seed --redis-port P [--symbols 5000] [--kline-candles 120]
    app_load.py run  --label L --target-port P --redis-port P [options]

seed: SETs, directly on Redis, for every symbol 000001..NNNNNN
  quote:{sym}            JSON, {"v": 0, ...}             (~150 bytes)
  ind:{sym}:macd:1d      JSON indicator series          (~250 bytes)
  kline:{sym}:1d         JSON array of --kline-candles daily candles (~60 bytes each)

run: one side of the comparison, bounded in time.
  * a writer process rewrites quote:{sym} of the --write-symbols hottest symbols
    directly on Redis (--redis-port, loopback, no delay) every --write-every seconds
    (the exchanges' Level-1 snapshot cadence), pipelined in batches of --batch. Every
    round takes a new version from INCR bench:app:round (monotonic across sides and
    runs) and writes it into each value; the writer logs (version, batch, time the
    batch's replies arrived) = when that version was *acknowledged*.
  * --workers processes, each with redis-py's defaults, redis.Redis(host, port) (redis-py 8:
    RESP3, HELLO 3 / CLIENT MAINT_NOTIFICATIONS / CLIENT SETINFO at connect), run a closed
    loop of requests (or paced, with --rate): one request = GET quote:{sym},
    GET ind:{sym}:macd:1d, GET kline:{sym}:1d, sequentially, for a symbol drawn from a
    Zipf(--zipf) distribution over --symbols symbols (rank 0 = 000001 is the hottest).
    Latency = first GET sent .. third reply parsed.
  * timeline: workers connect; --warmup seconds unmeasured; --duration seconds measured.
    At the window's edges the parent takes upstream INFO commandstats (cmdstat_get, on a
    direct loopback connection to Redis), NEARCACHE STATS (--nearcache-port) and the CPU
    time of the processes given with --cpu name=pid.
  * stale check, after the run, over every quote read (warm-up included): a read that
    started at t and returned version u is *stale* if the writer had acknowledged a
    version v > u of that symbol before t - --stale-ms; it is *lagging* if it had
    acknowledged one before t at all (the invalidation window: informative, a direct
    read can never lag). *backwards*: one worker saw a symbol's version decrease.

Prints one JSON object (the bench script turns it into a table). Needs redis-py on
sys.path (scripts/bench puts the version pinned in tests/clients/requirements.txt there).
Exit status 1 if the run could not be done (connection refused, a worker died, ...).
"""

import argparse
import array
import bisect
import ctypes
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time

import redis

QUOTE, IND, KLINE = "quote:{}", "ind:{}:macd:1d", "kline:{}:1d"
ROUND_KEY = "bench:app:round"
HOST = "127.0.0.1"


def sym(i):
    return f"{i + 1:06d}"


def die_with_parent():
    """Children get SIGKILL when the parent dies, however it dies (prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def quote_value(s, v):
    r = random.Random(hash((s, v)))
    px = round(5 + r.random() * 95, 2)
    return json.dumps({"v": v, "sym": s, "price": px, "bid": round(px - 0.01, 2),
                       "ask": round(px + 0.01, 2), "volume": r.randrange(10**6, 10**8),
                       "ts": int(time.time() * 1000)}, separators=(",", ":"))


def seed(a):
    r = redis.Redis(host=HOST, port=a.redis_port)
    p = r.pipeline(transaction=False)
    t0 = time.monotonic()
    for i in range(a.symbols):
        s = sym(i)
        rnd = random.Random(i)
        p.set(QUOTE.format(s), quote_value(s, 0))
        series = [{"t": 1751040000000 - d * 86400000, "dif": round(rnd.gauss(0, 1), 4),
                   "dea": round(rnd.gauss(0, 1), 4), "macd": round(rnd.gauss(0, 1), 4)}
                  for d in range(3)]
        p.set(IND.format(s), json.dumps({"sym": s, "ind": "macd", "freq": "1d", "series": series},
                                        separators=(",", ":")))
        candles = []
        px = 10 + rnd.random() * 90
        for d in range(a.kline_candles):
            o = px
            px = max(0.5, px * (1 + rnd.gauss(0, 0.02)))
            candles.append([1751040000000 - d * 86400000, round(o, 2), round(max(o, px) * 1.01, 2),
                            round(min(o, px) * 0.99, 2), round(px, 2), rnd.randrange(10**5, 10**8)])
        p.set(KLINE.format(s), json.dumps(candles, separators=(",", ":")))
        if len(p) >= 3000:
            p.execute()
    p.execute()
    print(json.dumps({"seeded": a.symbols, "secs": round(time.monotonic() - t0, 2),
                      "kline_bytes": len(r.get(KLINE.format(sym(0))) or b"")}))


# ------------------------------------------------------------------ writer

def writer(a, ready, stop, out):
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    r = redis.Redis(host=HOST, port=a.redis_port)
    n = min(a.write_symbols, a.symbols)
    names = [QUOTE.format(sym(i)) for i in range(n)]
    log = []          # (version, batch, ack_ns)
    errors = 0
    period = int(a.write_every * 1e9)
    next_ns = time.monotonic_ns()
    rounds = 0
    while True:
        try:
            v = int(r.incr(ROUND_KEY))
            for b in range(0, n, a.batch):
                p = r.pipeline(transaction=False)
                for i in range(b, min(b + a.batch, n)):
                    p.set(names[i], quote_value(sym(i), v))
                p.execute()
                log.append((v, b // a.batch, time.monotonic_ns()))
            rounds += 1
        except redis.RedisError as e:
            errors += 1
            print(f"app_load writer: {e!r}", file=sys.stderr)
        if rounds == 1:
            ready.set()
        next_ns += period
        # wait for the next round, or stop
        if stop.wait(max(0.0, (next_ns - time.monotonic_ns()) / 1e9)):
            break
    out.put({"log": log, "rounds": rounds, "writes": rounds * n, "errors": errors})


# ------------------------------------------------------------------ workers

def worker(a, wid, t_start, t_measure, t_end, out):
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rng = random.Random(0x5EED + wid)
    cdf, acc = [], 0.0
    for k in range(a.symbols):
        acc += 1.0 / (k + 1) ** a.zipf
        cdf.append(acc)
    cdf = [c / acc for c in cdf]
    keys = [(QUOTE.format(sym(i)), IND.format(sym(i)), KLINE.format(sym(i))) for i in range(a.symbols)]
    lat = array.array("q")                                   # measured request latencies, ns
    rd_sym, rd_t, rd_v = array.array("i"), array.array("q"), array.array("q")   # every quote read
    last = {}
    backwards = errors = nils = 0
    first_error = None
    c = redis.Redis(host=HOST, port=a.target_port)            # the application's defaults
    try:
        c.ping()                                             # connect before the clock starts
    except redis.RedisError as e:
        out.put({"wid": wid, "fatal": repr(e)})
        return
    interval = int(a.workers * 1e9 / a.rate) if a.rate > 0 else 0
    while time.monotonic_ns() < t_start:
        time.sleep(0.001)
    next_ns = time.monotonic_ns()
    bisect_ = bisect.bisect_left
    rand = rng.random
    nsym = a.symbols - 1
    while True:
        if interval:
            now = time.monotonic_ns()
            if now < next_ns:
                time.sleep((next_ns - now) / 1e9)
            next_ns += interval
        i = min(bisect_(cdf, rand()), nsym)
        kq, ki, kk = keys[i]
        t0 = time.monotonic_ns()
        if t0 >= t_end:
            break
        try:
            q = c.get(kq)
            ind = c.get(ki)
            kl = c.get(kk)
        except redis.RedisError as e:
            errors += 1
            if first_error is None:
                first_error = repr(e)
            if errors > 1000:
                break
            continue
        t1 = time.monotonic_ns()
        if t0 >= t_measure:
            lat.append(t1 - t0)
        if q is None or ind is None or kl is None:
            nils += 1
            continue
        v = json.loads(q)["v"]
        rd_sym.append(i)
        rd_t.append(t0)
        rd_v.append(v)
        if v < last.get(i, -1):
            backwards += 1
        last[i] = v
    c.close()
    out.put({"wid": wid, "lat": lat.tobytes(), "rd_sym": rd_sym.tobytes(), "rd_t": rd_t.tobytes(),
             "rd_v": rd_v.tobytes(), "backwards": backwards, "errors": errors, "nils": nils,
             "first_error": first_error})


# ------------------------------------------------------------------ parent

def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])
    except (OSError, IndexError, ValueError):
        return None


def cmdstat_get(r):
    return int(r.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


def nc_stats(port):
    if not port:
        return None
    try:
        raw = redis.Redis(host=HOST, port=port, protocol=2).execute_command("NEARCACHE", "STATS")
    except redis.RedisError as e:
        return {"error": repr(e)}
    if isinstance(raw, dict):
        items = raw.items()
    else:
        items = zip(raw[0::2], raw[1::2])
    d = {}
    for k, v in items:
        k = k.decode() if isinstance(k, bytes) else str(k)
        d[k] = v.decode() if isinstance(v, bytes) else v
    return d


def sleep_until(ns):
    while True:
        left = ns - time.monotonic_ns()
        if left <= 0:
            return
        time.sleep(min(left / 1e9, 0.2))


def prewarm(a):
    """Reads every key once through the target (steady state: the app has been up for hours)."""
    c = redis.Redis(host=HOST, port=a.target_port)
    p = c.pipeline(transaction=False)
    for i in range(a.symbols):
        for k in (QUOTE, IND, KLINE):
            p.get(k.format(sym(i)))
        if len(p) >= 600:
            p.execute()
    p.execute()
    c.close()


def run(a):
    ctx = mp.get_context("fork")
    direct = redis.Redis(host=HOST, port=a.redis_port, protocol=2)
    direct.ping()
    if a.prewarm:
        prewarm(a)
    stop, ready = ctx.Event(), ctx.Event()
    wq, rq = ctx.Queue(), ctx.Queue()
    wp = ctx.Process(target=writer, args=(a, ready, stop, wq), daemon=True)
    wp.start()
    if not ready.wait(30):
        print(json.dumps({"label": a.label, "fatal": "writer did not finish its first round in 30 s"}))
        return 1
    t_start = time.monotonic_ns() + int(0.5e9)
    t_measure = t_start + int(a.warmup * 1e9)
    t_end = t_measure + int(a.duration * 1e9)
    procs = [ctx.Process(target=worker, args=(a, w, t_start, t_measure, t_end, rq), daemon=True)
             for w in range(a.workers)]
    for p in procs:
        p.start()
    pids = dict(a.cpu)
    for w, p in enumerate(procs):
        pids[f"worker{w}"] = p.pid
    sleep_until(t_measure)
    g0, s0 = cmdstat_get(direct), nc_stats(a.nearcache_port)
    c0, w0 = {k: cpu_ticks(p) for k, p in pids.items()}, time.monotonic_ns()
    sleep_until(t_end)
    g1, s1 = cmdstat_get(direct), nc_stats(a.nearcache_port)
    c1, w1 = {k: cpu_ticks(p) for k, p in pids.items()}, time.monotonic_ns()
    stop.set()
    results, fatal = [], []
    deadline = time.monotonic() + 30 + a.duration
    while len(results) + len(fatal) < a.workers and time.monotonic() < deadline:
        try:
            m = rq.get(timeout=1)
        except Exception:  # queue.Empty
            if not any(p.is_alive() for p in procs):
                break
            continue
        (fatal if "fatal" in m else results).append(m)
    wres = wq.get(timeout=30)
    for p in procs + [wp]:
        p.join(5)
        if p.is_alive():
            p.kill()
    if fatal or len(results) < a.workers:
        print(json.dumps({"label": a.label, "fatal": fatal or f"only {len(results)} of {a.workers} workers reported"}))
        return 1

    # latency
    lat = array.array("q")
    for m in results:
        lat.frombytes(m["lat"])
    lat = sorted(lat)
    n = len(lat)
    window = (w1 - w0) / 1e9

    def pct(p):
        return lat[min(n, max(1, -(-n * p // 100))) - 1] / 1e6 if n else float("nan")

    # stale check: per (symbol's batch) the acknowledged versions in time order
    acks = {}
    for v, b, t in wres["log"]:
        acks.setdefault(b, []).append((t, v))
    for lst in acks.values():
        lst.sort()
    ack_t = {b: [t for t, _ in lst] for b, lst in acks.items()}
    ack_v = {b: [v for _, v in lst] for b, lst in acks.items()}
    nwrite = min(a.write_symbols, a.symbols)
    bound = int(a.stale_ms * 1e6)
    reads = stale = lagging = 0
    max_stale_ms = max_lag_ms = 0.0
    examples = []
    for m in results:
        ss, ts, vs = array.array("i"), array.array("q"), array.array("q")
        ss.frombytes(m["rd_sym"]); ts.frombytes(m["rd_t"]); vs.frombytes(m["rd_v"])
        reads += len(ss)
        for s, t, u in zip(ss, ts, vs):
            if s >= nwrite:
                continue
            b = s // a.batch
            tl, vl = ack_t.get(b), ack_v.get(b)
            if not tl:
                continue
            j = bisect.bisect_left(tl, t) - 1          # newest ack strictly before t
            if j < 0 or vl[j] <= u:
                continue
            lagging += 1
            # how long before t was the first version newer than u acknowledged?
            k = j
            while k > 0 and vl[k - 1] > u:
                k -= 1
            age = (t - tl[k]) / 1e6
            max_lag_ms = max(max_lag_ms, age)
            if t - tl[k] > bound:
                stale += 1
                max_stale_ms = max(max_stale_ms, age)
                if len(examples) < 5:
                    examples.append({"sym": sym(s), "read_version": u, "acked_version": vl[j],
                                     "acked_ms_before_read": round(age, 3)})

    cpu = {}
    hz = os.sysconf("SC_CLK_TCK")
    for k in pids:
        if c0.get(k) is not None and c1.get(k) is not None and window > 0:
            cpu[k] = round(100.0 * (c1[k] - c0[k]) / hz / window, 1)
    wcpu = sum(v for k, v in cpu.items() if k.startswith("worker"))
    cpu = {k: v for k, v in cpu.items() if not k.startswith("worker")}
    cpu["workers"] = round(wcpu, 1)
    gets = g1 - g0
    print(json.dumps({
        "label": a.label, "workers": a.workers, "symbols": a.symbols, "window_s": round(window, 3),
        "requests": n, "rps": round(n / window, 1) if window > 0 else 0,
        "p50_ms": round(pct(50), 3), "p90_ms": round(pct(90), 3), "p99_ms": round(pct(99), 3),
        "max_ms": round(lat[-1] / 1e6, 3) if n else None,
        "redis_gets": gets, "gets_per_request": round(gets / n, 4) if n else None,
        "quote_reads": reads, "stale": stale, "max_stale_ms": round(max_stale_ms, 3),
        "lagging": lagging, "max_lag_ms": round(max_lag_ms, 3), "stale_examples": examples,
        "backwards": sum(m["backwards"] for m in results),
        "errors": sum(m["errors"] for m in results), "nils": sum(m["nils"] for m in results),
        "first_error": next((m["first_error"] for m in results if m["first_error"]), None),
        "writer_rounds": wres["rounds"], "writer_writes": wres["writes"], "writer_errors": wres["errors"],
        "cpu_pct": cpu, "nearcache_before": s0, "nearcache_after": s1,
        "redis_py": redis.__version__,
    }))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["seed", "run"])
    ap.add_argument("--redis-port", type=int, required=True, help="Redis itself, on loopback (writer, stats)")
    ap.add_argument("--target-port", type=int, help="where the workers connect")
    ap.add_argument("--nearcache-port", type=int, default=0, help="NEARCACHE STATS from here")
    ap.add_argument("--label", default="run")
    ap.add_argument("--symbols", type=int, default=5000)
    ap.add_argument("--kline-candles", type=int, default=120)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s over all workers; 0 = closed loop")
    ap.add_argument("--write-every", type=float, default=3.0)
    ap.add_argument("--write-symbols", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--stale-ms", type=float, default=100.0)
    ap.add_argument("--prewarm", type=int, default=1)
    ap.add_argument("--cpu", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                    help="name=pid: report this process' CPU %% over the measured window")
    a = ap.parse_args()
    a.cpu = [(k, int(v)) for k, v in a.cpu if v]
    if a.mode == "seed":
        seed(a)
        return 0
    if not a.target_port:
        ap.error("run needs --target-port")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # atexit stops the daemon children
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
