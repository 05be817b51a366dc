// node-redis and ioredis against nearcache in front of a Redis Cluster
// (tests/cluster_clients.rs): node cluster_node.mjs <nearcache-port> <keys> <reads>
// Same procedure and output as cluster_py.py, with each library's defaults
// (a plain, non-cluster client: the sidecar routes).
const [port, nkeys, reads] = process.argv.slice(2).map(Number);

async function run(config, connect) {
  const out = { config, wrong: 0, first_wrong: null, mget_ok: false, error: null };
  let client;
  try {
    client = await connect();
    const keys = Array.from({ length: nkeys }, (_, i) => `ind:${i}:macd:1d`);
    const tag = config.replaceAll(' ', '_');
    for (const k of keys) await client.set(k, `${tag}:${k}`);
    for (let n = 0; n < reads; n++) {
      for (const k of keys) {
        const v = await client.get(k);
        if (v !== `${tag}:${k}`) {
          out.wrong++;
          out.first_wrong ??= `${k}=${v}`;
        }
      }
    }
    const all = await (client.mGet ? client.mGet(keys) : client.mget(keys));
    out.mget_ok = JSON.stringify(all) === JSON.stringify(keys.map((k) => `${tag}:${k}`));
  } catch (e) {
    out.error = String(e && e.stack ? e.message : e);
  } finally {
    try { await client?.quit(); } catch (_) { /* closing only */ }
  }
  console.log(JSON.stringify(out));
}

const nodeRedis = (createClient, extra) => async () => {
  const c = createClient({ socket: { host: '127.0.0.1', port, reconnectStrategy: false }, ...extra });
  c.on('error', () => {});
  await c.connect();
  return c;
};
const ioredis = (IORedis, extra) => async () => {
  const c = new IORedis({ host: '127.0.0.1', port, maxRetriesPerRequest: 1, retryStrategy: () => null, ...extra });
  c.on('error', () => {});
  await new Promise((resolve, reject) => { c.once('ready', resolve); c.once('end', () => reject(new Error('closed before ready'))); });
  return c;
};

await run('node-redis 6 default', nodeRedis((await import('redis')).createClient, {}));
await run('node-redis 5 default', nodeRedis((await import('redis5')).createClient, {}));
await run('ioredis 6 default', ioredis((await import('ioredis')).default, {}));
await run('ioredis 5 connectionName', ioredis((await import('ioredis5')).default, { connectionName: 'cluster-harness' }));
