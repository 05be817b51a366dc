#!/usr/bin/env python3
"""Captures Redis' own key specifications into fuzz/keyspecs.json, the oracle
of the command-classification properties (tests/fuzz_props.rs and the
`classify` fuzz target): every key Redis says a command writes must be among
the keys nearcache invalidates for it.

It starts a throwaway redis-server on a unix socket (no TCP port), reads
`COMMAND INFO` (the key specs of every command and subcommand that has a key
with a write flag: RW, OW or RM), and asks `COMMAND GETKEYSANDFLAGS` about a
deterministic corpus of concrete commands: the hand-written lines of
corpus.txt beside this script, plus synthetic argument lists for each such
command (distinct key-like tokens, a small number at each position in turn,
each keyword of its key specs at each position in turn). Only the commands
Redis accepts are kept, with the keys it names and their flags.

Regenerate (needs redis-server on PATH; no Python packages):
    python3 fuzz/keyspecs/generate.py            # writes fuzz/keyspecs.json
    python3 fuzz/keyspecs/generate.py --check    # exit 1 if it would change
Commit the output with the script. The Redis version is recorded in the file;
commands newer than it (e.g. HGETEX, HSETEX, HGETDEL on 7.x) are absent.
"""
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "keyspecs.json")
WRITE_FLAGS = {"RW", "OW", "RM"}
MAX_EXTRA = 6
NUMBERS = ["0", "1", "2", "3"]


class Conn:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = b""

    def send(self, args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a.encode() if isinstance(a, str) else a
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.s.sendall(b"".join(out))

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise EOFError("redis-server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise EOFError("redis-server closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def read(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            return RedisError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode("utf-8", "surrogateescape")
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise ValueError("unexpected reply line %r" % line)

    def call(self, *args):
        self.send(list(args))
        return self.read()

    def pipeline(self, commands, batch=512):
        out = []
        for i in range(0, len(commands), batch):
            part = commands[i : i + batch]
            for c in part:
                self.send(c)
            out.extend(self.read() for _ in part)
        return out


class RedisError(str):
    pass


def pairs(flat):
    """A RESP2 map (flat key, value list) as a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def key_spec(raw):
    spec = pairs(raw)
    bs, fk = pairs(spec["begin_search"]), pairs(spec["find_keys"])
    begin = {"type": bs["type"]}
    begin.update(pairs(bs["spec"]) if bs["spec"] else {})
    find = {"type": fk["type"]}
    find.update(pairs(fk["spec"]) if fk["spec"] else {})
    return {"flags": spec["flags"], "begin_search": begin, "find_keys": find}


def commands(conn):
    """Every command and subcommand: name (`XGROUP|CREATE`), arity, flags, key specs."""
    out = {}

    def visit(info):
        name, arity, flags = info[0].upper(), info[1], info[2]
        out[name] = {
            "arity": arity,
            "flags": sorted(flags),
            "key_specs": [key_spec(k) for k in info[8]],
        }
        for sub in info[9] or []:
            visit(sub)

    for info in conn.call("COMMAND", "INFO"):
        visit(info)
    return out


def writes_keys(cmd):
    return any(WRITE_FLAGS & set(k["flags"]) for k in cmd["key_specs"])


def synthetic(name, cmd):
    """Argument lists for one command: every token in a list is distinct."""
    prefix = name.split("|")
    keywords = sorted(
        {
            k["begin_search"]["keyword"]
            for k in cmd["key_specs"]
            if k["begin_search"]["type"] == "keyword"
        }
    )
    lists = []
    for extra in range(MAX_EXTRA + 1):
        names = ["k%d" % i for i in range(1, extra + 1)]
        lists.append(prefix + names)
        for p in range(extra):
            for n in NUMBERS:
                lists.append(prefix + names[:p] + [n] + names[p + 1 :])
            for kw in keywords:
                lists.append(prefix + names[:p] + [kw] + names[p + 1 :])
                # A number after the keyword too (LIMIT-like options, STREAMS ids).
                if p + 1 < extra:
                    lists.append(prefix + names[:p] + [kw, "1"] + names[p + 2 :])
    return lists


def main():
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "redis.sock")
        server = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", sock, "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(200):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            conn = Conn(sock)
            version = pairs(conn.call("HELLO", "2"))["version"]
            cmds = commands(conn)
            written = {n: c for n, c in sorted(cmds.items()) if writes_keys(c)}
            corpus = []
            with open(os.path.join(HERE, "corpus.txt")) as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        corpus.append(shlex.split(line))
            for name, cmd in written.items():
                corpus.extend(synthetic(name, cmd))
            seen, unique = set(), []
            for args in corpus:
                if tuple(args) not in seen:
                    seen.add(tuple(args))
                    unique.append(args)
            replies = conn.pipeline([["COMMAND", "GETKEYSANDFLAGS"] + a for a in unique])
            getkeys = []
            for args, reply in zip(unique, replies):
                if isinstance(reply, RedisError):
                    continue
                keys = [[k, sorted(flags)] for k, flags in reply]
                getkeys.append({"args": args, "keys": keys})
        finally:
            server.terminate()
            server.wait()
    doc = {
        "generated_by": "fuzz/keyspecs/generate.py",
        "redis_version": version,
        "write_flags": sorted(WRITE_FLAGS),
        "commands": written,
        "getkeys": getkeys,
    }
    text = json.dumps(doc, indent=None, separators=(",", ":"), sort_keys=True)
    # One command or one GETKEYS answer a line: reviewable diffs.
    text = (
        text.replace(',"getkeys":[{', ',\n"getkeys":[\n{')
        .replace('},{"args"', '},\n{"args"')
        .replace('},"', '},\n"', 0)
    )
    text = text.replace('"commands":{"', '"commands":{\n"').replace(']},"', ']},\n"') + "\n"
    if check:
        with open(OUT) as f:
            same = f.read() == text
        print("fuzz/keyspecs.json is %s" % ("current" if same else "out of date"))
        sys.exit(0 if same else 1)
    with open(OUT, "w") as f:
        f.write(text)
    print("wrote %s: Redis %s, %d write commands, %d GETKEYSANDFLAGS answers (%d asked)"
          % (OUT, version, len(written), len(getkeys), len(unique)))


if __name__ == "__main__":
    main()
