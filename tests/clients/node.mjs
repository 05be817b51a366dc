#!/usr/bin/env node
// Real-client harness, Node: do reads of hot keys through nearcache stay in L1?
//
// Usage: node node.mjs PROXY_PORT REDIS_PORT [--db N] [--password P] [--reads N]
//                      [--host H] [--format json|text]
//
// Same procedure as redis_py.py, for node-redis (the `redis` package) 5 and 6
// and ioredis 5 and 6, each in the configurations below: writes `quote:…`,
// `ind:…` (hash) and `kline:…` directly on Redis, reads each --reads times
// through nearcache checking every value, counts the reads that reached Redis
// (upstream INFO commandstats GET/HGETALL calls before/after, on a direct
// connection), checks read-your-writes through nearcache and polls through
// nearcache for a value written directly on Redis (limit 1 s), and reports
// how many upstream connections (CLIENT LIST on Redis) were added while the
// client was connected (nearcache's pools open at start, so an extra one is
// pinned to this client). One JSON line per configuration, then
// {"done": true, ...}. It judges nothing:
// tests/clients.rs asserts. Exit status is non-zero only when the script
// itself cannot run.
//
// The libraries come from tests/clients/node_modules (package.json +
// package-lock.json here; scripts/test runs `npm ci`). `redis5` and `ioredis5`
// are npm aliases of the previous majors, so both majors of each are covered.
//
// What each sends when it connects (seen on the wire through
// tests/clients/sniff.py in front of redis-server 7.0.15, and read in
// @redis/client dist/lib/client/index.js `#handshake`, ioredis
// built/redis/event_handler.js). `[..]` only when configured. node-redis
// pipelines its handshake; ioredis sends it, then INFO (ready check):
//
// | client / configuration             | connect-time commands, in order                                     |
// |------------------------------------|---------------------------------------------------------------------|
// | node-redis 5.12.1 default (RESP2)  | [AUTH <pw>]; [SELECT <db>]; CLIENT SETINFO LIB-VER 5.12.1;            |
// |                                    | CLIENT SETINFO LIB-NAME node-redis                                  |
// | node-redis 5 `RESP: 3`             | HELLO 3 [AUTH default <pw>]; [SELECT]; SETINFO LIB-VER, LIB-NAME;     |
// |                                    | CLIENT MAINT_NOTIFICATIONS ON moving-endpoint-type external-ip      |
// | node-redis 5 `name: X` (RESP2)     | [AUTH]; CLIENT SETNAME X; [SELECT]; SETINFO LIB-VER, LIB-NAME         |
// | node-redis 5 `RESP: 3, name: X`    | HELLO 3 [AUTH default <pw>] SETNAME X; [SELECT]; SETINFO x2;          |
// |                                    | CLIENT MAINT_NOTIFICATIONS ON moving-endpoint-type external-ip      |
// | node-redis 6.3.1 default (RESP3)   | as node-redis 5 `RESP: 3` (LIB-VER 6.3.1)                           |
// | node-redis 6 `RESP: 2`             | as node-redis 5 default                                             |
// | node-redis 6 `name: X` (RESP3)     | as node-redis 5 `RESP: 3, name: X`                                  |
// | node-redis 6 `RESP: 2, name: X`    | as node-redis 5 `name: X`                                           |
// | ioredis 5.11.1 default (RESP2)     | [AUTH <pw>]; [SELECT]; CLIENT SETINFO LIB-NAME ioredis;             |
// |                                    | CLIENT SETINFO LIB-VER 5.11.1; INFO                                 |
// | ioredis 5 `connectionName: X`      | [AUTH]; [SELECT]; CLIENT SETNAME X; SETINFO LIB-NAME, LIB-VER; INFO   |
// | ioredis 6.0.0 default (RESP3)      | HELLO 3 [AUTH default <pw>]; [SELECT]; CLIENT SETINFO LIB-VER 6.0.0;  |
// |                                    | CLIENT SETINFO LIB-NAME ioredis; INFO                               |
// | ioredis 6 `protocol: 2`            | [AUTH]; [SELECT]; SETINFO LIB-VER, LIB-NAME; INFO                     |
// | ioredis 6 `connectionName: X`      | HELLO 3 [AUTH ...]; [SELECT]; CLIENT SETNAME X; SETINFO x2; INFO      |
//
// node-redis picks the MAINT_NOTIFICATIONS endpoint type from the address:
// internal-* only for 10/8, 172.16/12, 192.168/16 and fc/fd/fe80/::1, so
// 127.0.0.1 gives external-ip. An error reply to it (Redis < 8) is ignored, as
// are errors to CLIENT SETINFO.

import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';

const HERE = dirname(fileURLToPath(import.meta.url));
const CLIENT_NAME = 'nearcache-harness';

function fatal(msg) {
  process.stdout.write(JSON.stringify({ fatal: msg }) + '\n');
  process.exit(3);
}

function parseArgs(argv) {
  const a = { db: 0, password: undefined, reads: 50, host: '127.0.0.1', format: 'json', pos: [] };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) fatal(`${k} needs a value`);
      return argv[++i];
    };
    if (k === '--db') a.db = Number(val());
    else if (k === '--password') a.password = val();
    else if (k === '--reads') a.reads = Number(val());
    else if (k === '--host') a.host = val();
    else if (k === '--format') a.format = val();
    else if (k.startsWith('--')) fatal(`unknown option ${k}`);
    else a.pos.push(Number(k));
  }
  if (a.pos.length !== 2 || a.pos.some((p) => !Number.isInteger(p))) {
    fatal('usage: node.mjs PROXY_PORT REDIS_PORT [--db N] [--password P] [--reads N] [--host H] [--format json|text]');
  }
  if (!['json', 'text'].includes(a.format)) fatal('--format is json or text');
  [a.proxyPort, a.redisPort] = a.pos;
  return a;
}

function version(pkg) {
  return JSON.parse(readFileSync(join(HERE, 'node_modules', pkg, 'package.json'), 'utf8')).version;
}

let libs;
try {
  libs = {
    redis6: (await import('redis')).createClient,
    redis5: (await import('redis5')).createClient,
    ioredis6: (await import('ioredis')).default,
    ioredis5: (await import('ioredis5')).default,
  };
} catch (e) {
  fatal(`node client libraries are not installed in ${join(HERE, 'node_modules')} (${e.message}): run scripts/test`);
}

// A uniform face over both libraries.
function nodeRedis(createClient, args, opts) {
  const client = createClient({
    socket: { host: args.host, port: args.proxyPort, reconnectStrategy: false },
    database: args.db,
    password: args.password,
    ...opts,
  });
  const errors = [];
  client.on('error', (e) => errors.push(e.message));
  return {
    errors,
    connect: () => client.connect(),
    get: (k) => client.get(k),
    hgetall: (k) => client.hGetAll(k),
    set: (k, v) => client.set(k, v),
    hset: (k, obj) => client.hSet(k, obj),
    close: async () => client.destroy(),
  };
}

function ioRedis(IORedis, args, opts) {
  const client = new IORedis({
    host: args.host,
    port: args.proxyPort,
    db: args.db,
    password: args.password,
    lazyConnect: true,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
    ...opts,
  });
  const errors = [];
  client.on('error', (e) => errors.push(e.message));
  return {
    errors,
    connect: () => client.connect(),
    get: (k) => client.get(k),
    hgetall: (k) => client.hgetall(k),
    set: (k, v) => client.set(k, v),
    hset: (k, obj) => client.hset(k, obj),
    close: async () => client.disconnect(),
  };
}

const CONFIGS = [
  ['node-redis', 'redis5', 'node-redis 5 default', 2, false, (a) => nodeRedis(libs.redis5, a, {})],
  ['node-redis', 'redis5', 'node-redis 5 RESP3', 3, false, (a) => nodeRedis(libs.redis5, a, { RESP: 3 })],
  ['node-redis', 'redis5', 'node-redis 5 name', 2, true, (a) => nodeRedis(libs.redis5, a, { name: CLIENT_NAME })],
  ['node-redis', 'redis5', 'node-redis 5 RESP3 name', 3, true, (a) => nodeRedis(libs.redis5, a, { RESP: 3, name: CLIENT_NAME })],
  ['node-redis', 'redis', 'node-redis 6 default', 3, false, (a) => nodeRedis(libs.redis6, a, {})],
  ['node-redis', 'redis', 'node-redis 6 RESP2', 2, false, (a) => nodeRedis(libs.redis6, a, { RESP: 2 })],
  ['node-redis', 'redis', 'node-redis 6 name', 3, true, (a) => nodeRedis(libs.redis6, a, { name: CLIENT_NAME })],
  ['node-redis', 'redis', 'node-redis 6 RESP2 name', 2, true, (a) => nodeRedis(libs.redis6, a, { RESP: 2, name: CLIENT_NAME })],
  ['ioredis', 'ioredis5', 'ioredis 5 default', 2, false, (a) => ioRedis(libs.ioredis5, a, {})],
  ['ioredis', 'ioredis5', 'ioredis 5 connectionName', 2, true, (a) => ioRedis(libs.ioredis5, a, { connectionName: CLIENT_NAME })],
  ['ioredis', 'ioredis', 'ioredis 6 default', 3, false, (a) => ioRedis(libs.ioredis6, a, {})],
  ['ioredis', 'ioredis', 'ioredis 6 protocol=2', 2, false, (a) => ioRedis(libs.ioredis6, a, { protocol: 2 })],
  ['ioredis', 'ioredis', 'ioredis 6 connectionName', 3, true, (a) => ioRedis(libs.ioredis6, a, { connectionName: CLIENT_NAME })],
];

// Strict: a string is a string, a hash is a plain object (not a Map, not a flat array).
function same(got, want) {
  if (typeof want === 'string') return got === want;
  if (got === null || typeof got !== 'object' || Array.isArray(got) || got instanceof Map) return false;
  const gk = Object.keys(got).sort();
  const wk = Object.keys(want).sort();
  return gk.length === wk.length && gk.every((k, i) => k === wk[i] && got[k] === want[k]);
}

function show(v) {
  if (v instanceof Map) return `Map ${JSON.stringify([...v])}`;
  return JSON.stringify(v) ?? String(v);
}

async function upstreamConnections(direct) {
  return (await direct.client('LIST')).trim().split('\n').length;
}

// After a client closed: wait (briefly) until any connection nearcache opened for it is gone.
async function waitConnectionsBack(direct, baseline, limitMs = 1000) {
  const deadline = performance.now() + limitMs;
  while ((await upstreamConnections(direct)) > baseline && performance.now() < deadline) await sleep(5);
}

async function upstreamCalls(direct, cmd) {
  const info = await direct.info('commandstats');
  const m = info.match(new RegExp(`^cmdstat_${cmd.toLowerCase()}:calls=(\\d+),`, 'm'));
  return m ? Number(m[1]) : 0;
}

async function hotReads(c, direct, cmd, key, want, n) {
  const read = cmd === 'GET' ? c.get : c.hgetall;
  const before = await upstreamCalls(direct, cmd);
  let wrong = 0;
  let firstWrong = null;
  for (let i = 0; i < n; i++) {
    const got = await read(key);
    if (!same(got, want)) {
      wrong++;
      if (firstWrong === null) firstWrong = show(got);
    }
  }
  const after = await upstreamCalls(direct, cmd);
  return { cmd, key, reads: n, wrong, first_wrong: firstWrong, upstream: after - before };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function pollUntil(c, cmd, key, want, allowed, limitMs = 1000) {
  const read = cmd === 'GET' ? c.get : c.hgetall;
  const start = performance.now();
  let polls = 0;
  let unexpected = null;
  for (;;) {
    const got = await read(key);
    polls++;
    const ms = Math.round((performance.now() - start) * 1000) / 1000;
    if (same(got, want)) return { cmd, key, ok: unexpected === null, ms, polls, unexpected };
    if (!allowed.some((a) => same(got, a)) && unexpected === null) unexpected = show(got);
    if (ms > limitMs) return { cmd, key, ok: false, ms, polls, unexpected, last: show(got) };
    await sleep(1);
  }
}

async function exercise(c, direct, slug, n, baseline) {
  const tok = randomBytes(4).toString('hex');
  const quote = `quote:nch-${slug}-${tok}`;
  const ind = `ind:nch-${slug}-${tok}:macd:1d`;
  const kline = `kline:nch-${slug}-${tok}:1d`;
  const qv = JSON.stringify({ price: 10.5, cfg: slug, tok });
  const iv = { dif: '0.12', dea: '0.10', macd: '0.04', cfg: slug };
  const kv = JSON.stringify([{ ts: 1751040000000, open: 11.2, close: 11.16, cfg: slug }]);
  await direct.set(quote, qv);
  await direct.hset(ind, iv);
  await direct.set(kline, kv);

  const reads = [
    await hotReads(c, direct, 'GET', quote, qv, n),
    await hotReads(c, direct, 'HGETALL', ind, iv, n),
    await hotReads(c, direct, 'GET', kline, kv, n),
  ];
  // Upstream connections nearcache opened for this client alone (pinned), if any.
  const extra = (await upstreamConnections(direct)) - baseline;

  // Read your writes: the old values are in L1 now.
  const qv2 = JSON.stringify({ price: 10.6, cfg: slug, tok });
  const iv2 = { ...iv, macd: '0.05' };
  await c.set(quote, qv2);
  const gotQ = await c.get(quote);
  await c.hset(ind, { macd: '0.05' });
  const gotI = await c.hgetall(ind);
  const ryw = [
    { cmd: 'SET then GET', key: quote, ok: same(gotQ, qv2), got: same(gotQ, qv2) ? null : show(gotQ) },
    { cmd: 'HSET then HGETALL', key: ind, ok: same(gotI, iv2), got: same(gotI, iv2) ? null : show(gotI) },
  ];

  // Writes behind nearcache's back: cache the current value, write on Redis, poll.
  for (let i = 0; i < 3; i++) {
    await c.get(quote);
    await c.hgetall(ind);
  }
  const qv3 = JSON.stringify({ price: 10.7, cfg: slug, tok });
  const iv3 = { ...iv2, macd: '0.06' };
  await direct.set(quote, qv3);
  const dq = await pollUntil(c, 'GET', quote, qv3, [qv2]);
  await direct.hset(ind, 'macd', '0.06');
  const di = await pollUntil(c, 'HGETALL', ind, iv3, [iv2]);
  return { reads, extra_upstream_connections: extra, read_your_writes: ryw, direct_write: [dq, di] };
}

function withTimeout(p, ms, what) {
  let t;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise((_, reject) => {
      t = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
    }),
  ]);
}

async function runConfig(args, direct, [family, pkg, label, protocol, named, make]) {
  const slug = `js-${label}`.replace(/[^A-Za-z0-9]+/g, '-');
  const result = {
    harness: family,
    lib: `${family} ${version(pkg)}`,
    package: pkg,
    config: label,
    protocol,
    client_name: named,
    db: args.db,
    password: args.password !== undefined,
    error: null,
  };
  let c;
  const baseline = await upstreamConnections(direct);
  try {
    c = make(args);
    await withTimeout(
      (async () => {
        await c.connect();
        Object.assign(result, await exercise(c, direct, slug, args.reads, baseline));
      })(),
      30000,
      label,
    );
  } catch (e) {
    result.error = `${e.name}: ${e.message}` + (c && c.errors.length ? ` (client errors: ${c.errors.join('; ')})` : '');
  } finally {
    if (c) await c.close().catch(() => {});
    await waitConnectionsBack(direct, baseline);
  }
  return result;
}

function textLine(r) {
  if (r.error) return `${r.config.padEnd(30)} ERROR ${r.error}`;
  const reads = r.reads
    .map((x) => `${x.cmd} ${x.upstream}/${x.reads} upstream` + (x.wrong ? ` ${x.wrong} WRONG` : ''))
    .join(', ');
  const ryw = r.read_your_writes.every((x) => x.ok) ? 'ok' : 'FAILED';
  const dw = r.direct_write.map((x) => (x.ok ? `${x.ms}ms` : 'FAILED')).join(', ');
  return `${r.config.padEnd(30)} ${reads}; read-your-writes ${ryw}; direct write seen after ${dw}`;
}

const args = parseArgs(process.argv.slice(2));
const direct = new libs.ioredis5({
  host: '127.0.0.1',
  port: args.redisPort,
  db: args.db,
  password: args.password,
  lazyConnect: true,
  maxRetriesPerRequest: 0,
  retryStrategy: () => null,
});
direct.on('error', () => {});
try {
  await direct.connect();
} catch (e) {
  fatal(`cannot reach Redis on ${args.redisPort}: ${e.message}`);
}
for (const cfg of CONFIGS) {
  const r = await runConfig(args, direct, cfg);
  process.stdout.write((args.format === 'json' ? JSON.stringify(r) : textLine(r)) + '\n');
}
const done = { done: true, harness: 'node', configs: CONFIGS.length };
process.stdout.write((args.format === 'json' ? JSON.stringify(done) : `done: ${CONFIGS.length} configurations`) + '\n');
direct.disconnect();
