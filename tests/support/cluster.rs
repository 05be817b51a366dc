//! A real Redis Cluster for tests: `redis-server --cluster-enabled yes`
//! processes on ephemeral ports, slots assigned by `redis-cli --cluster
//! create`, killed on drop with their nodes.conf (in each server's scratch
//! directory).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{free_port, RedisServer};

/// A `redis-server --cluster-enabled yes`, not yet in a cluster.
fn start_node() -> RedisServer {
    start_node_of(Path::new("redis-server"))
}

/// [`start_node`] with another `redis-server` binary.
fn start_node_of(bin: &Path) -> RedisServer {
    let mut tries = 0;
    loop {
        // The bus port defaults to port + 10000, which Redis refuses for
        // ports above 55535 (ephemeral ports go up to 60999). Either port
        // may be taken by another test before the server binds it: new ones.
        let bus = free_port().to_string();
        match RedisServer::try_start_bin(
            bin,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                &bus,
            ],
        ) {
            Ok(node) => return node,
            Err(why) if tries < 5 => {
                tries += 1;
                eprintln!("cluster node did not start ({why}); other ports");
            }
            Err(why) => panic!("cluster node did not start: {why}"),
        }
    }
}

/// A cluster node alone in a cluster of its own that owns every slot
/// (config epoch 0): what a node cut off from the real cluster, still
/// answering with a map of its own, looks like to a client.
pub fn lone_node_owning_every_slot() -> RedisServer {
    let node = start_node();
    let _: () = redis::cmd("CLUSTER")
        .arg(&["ADDSLOTSRANGE", "0", "16383"][..])
        .query(&mut node.conn())
        .unwrap();
    super::wait_until("the lone node is ok", Duration::from_secs(10), || {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query(&mut node.conn())
            .unwrap();
        info.contains("cluster_state:ok")
    });
    node
}

/// The first step of moving `slot` from `from` to `to`: IMPORTING on the
/// new owner, MIGRATING on the old one (keys then move with MIGRATE).
pub fn begin_slot_move(slot: impl std::fmt::Display, from: &RedisServer, to: &RedisServer) {
    let s = slot.to_string();
    let _: () = redis::cmd("CLUSTER")
        .arg(&["SETSLOT", &s, "IMPORTING", &from.node_id()][..])
        .query(&mut to.conn())
        .unwrap();
    let _: () = redis::cmd("CLUSTER")
        .arg(&["SETSLOT", &s, "MIGRATING", &to.node_id()][..])
        .query(&mut from.conn())
        .unwrap();
}

/// The last step: `CLUSTER SETSLOT slot NODE to` on `to` first, then on
/// each other node of `nodes` (the order Redis documents for a migration).
pub fn assign_slot<'a>(
    slot: impl std::fmt::Display,
    to: &RedisServer,
    nodes: impl IntoIterator<Item = &'a RedisServer>,
) {
    let (s, to_id) = (slot.to_string(), to.node_id());
    let others: Vec<&RedisServer> = nodes.into_iter().filter(|n| n.port != to.port).collect();
    for n in std::iter::once(to).chain(others) {
        let _: () = redis::cmd("CLUSTER")
            .arg(&["SETSLOT", &s, "NODE", &to_id][..])
            .query(&mut n.conn())
            .unwrap();
    }
}

pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    /// `n` masters, no replicas, every slot assigned, `cluster_state:ok`
    /// everywhere.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with_replicas(n, 0)
    }

    /// `masters` masters with `replicas` replicas each (`redis-cli` picks
    /// which replica follows which master).
    pub fn start_with_replicas(masters: usize, replicas: usize) -> Cluster {
        Cluster::start_of(Path::new("redis-server"), masters, replicas)
    }

    /// [`Cluster::start_with_replicas`] of another `redis-server` binary
    /// (joined by the `redis-cli` on PATH).
    pub fn start_of(bin: &Path, masters: usize, replicas: usize) -> Cluster {
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| start_node_of(bin))
            .collect();
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for node in &nodes {
            cmd.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = cmd
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = Cluster { nodes };
        c.wait_ok();
        c
    }

    /// Waits until every node says `cluster_state:ok` and agrees on the owner
    /// of every slot.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self.nodes.iter().all(|n| {
                let mut c = n.conn();
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).unwrap();
                info.contains("cluster_state:ok")
            });
            let views: Vec<Vec<(u16, u16)>> = self.nodes.iter().map(|n| n.slot_ranges()).collect();
            if ok && views.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster never became ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node whose port is `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes.iter().find(|n| n.port == port).expect("a node")
    }

    /// The node that owns `key`'s slot, asked of the first node.
    pub fn owner_of(&self, key: &str) -> &RedisServer {
        let mut c = self.nodes[0].conn();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .unwrap();
        self.owner_of_slot(slot)
    }

    pub fn owner_of_slot(&self, slot: u16) -> &RedisServer {
        let mut c = self.nodes[0].conn();
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut c).unwrap();
        for r in ranges {
            let redis::Value::Array(f) = r else { continue };
            let (redis::Value::Int(s), redis::Value::Int(e), redis::Value::Array(node)) =
                (&f[0], &f[1], &f[2])
            else {
                continue;
            };
            if (*s..=*e).contains(&(slot as i64)) {
                let redis::Value::Int(port) = node[1] else {
                    panic!("port")
                };
                return self.node(port as u16);
            }
        }
        panic!("slot {slot} has no owner");
    }

    /// Masters that own slots, as the first node's `CLUSTER SLOTS` says.
    pub fn masters(&self) -> usize {
        let mut c = self.nodes[0].conn();
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut c).unwrap();
        let mut ports: Vec<i64> = ranges
            .iter()
            .filter_map(|r| match r {
                redis::Value::Array(f) => match f.get(2) {
                    Some(redis::Value::Array(node)) => match node.get(1) {
                        Some(redis::Value::Int(port)) => Some(*port),
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            })
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports.len()
    }

    /// Keys `prefix0`, `prefix1`, … until every master owns two of them.
    pub fn keys_on_every_master(&self, prefix: &str) -> Vec<String> {
        let masters = self.masters();
        let mut per: std::collections::HashMap<u16, usize> = Default::default();
        let mut keys = Vec::new();
        for i in 0.. {
            let k = format!("{prefix}{i}");
            let n = per.entry(self.owner_of(&k).port).or_default();
            if *n < 2 {
                *n += 1;
                keys.push(k);
            }
            if per.len() == masters && per.values().all(|&n| n == 2) {
                break;
            }
        }
        keys
    }

    /// `redis-cluster://` URL with every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis-cluster://{}", seeds.join(","))
    }
}

impl RedisServer {
    /// This node's cluster id.
    pub fn node_id(&self) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.conn())
            .unwrap()
    }

    /// This node's cluster bus port (`ip:port@cport` of its own line in
    /// CLUSTER NODES).
    pub fn bus_port(&self) -> u16 {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut self.conn())
            .unwrap();
        let mine = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .expect("a myself line");
        let addr = mine.split(' ').nth(1).expect("an address");
        let cport = addr.split('@').nth(1).expect("@cport");
        cport.split(',').next().unwrap().parse().expect("a port")
    }

    /// `(start, end)` of every slot range in this node's view, sorted.
    pub fn slot_ranges(&self) -> Vec<(u16, u16)> {
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut self.conn())
            .unwrap();
        let mut out: Vec<(u16, u16)> = ranges
            .into_iter()
            .filter_map(|r| match r {
                redis::Value::Array(f) => match (&f[0], &f[1]) {
                    (redis::Value::Int(s), redis::Value::Int(e)) => Some((*s as u16, *e as u16)),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        out.sort();
        out
    }
}

impl Cluster {
    /// The node that replicates `master` (by `ROLE`).
    pub fn replica_of(&self, master: &RedisServer) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| {
                let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut n.conn()).unwrap();
                matches!((&role[0], &role[2]), (redis::Value::BulkString(r), redis::Value::Int(p))
                    if r == b"slave" && *p as u16 == master.port)
            })
            .expect("a replica of the master")
    }
}

impl RedisServer {
    /// Makes this replica its master's successor (`CLUSTER FAILOVER`) and
    /// waits until it is a master. A manual failover gives up after a few
    /// seconds when the replica is not in sync yet: it is asked again then,
    /// while the replication link is up.
    pub fn take_over(&self) {
        let mut asked: Option<Instant> = None;
        super::wait_until("the replica is a master", Duration::from_secs(30), || {
            if super::info_field(self, "replication", "role") == "master" {
                return true;
            }
            let due = asked.is_none_or(|at| at.elapsed() > Duration::from_secs(6));
            if due && super::info_field(self, "replication", "master_link_status") == "up" {
                let _: () = redis::cmd("CLUSTER")
                    .arg("FAILOVER")
                    .query(&mut self.conn())
                    .unwrap();
                asked = Some(Instant::now());
            }
            false
        });
    }
}

impl Cluster {
    /// Starts a node, joins it to the cluster as a replica of `master` and
    /// waits until its replication link is up. Not in `nodes` (it owns no
    /// slot); killed on drop of the returned server.
    pub fn add_replica(&self, master: &RedisServer) -> RedisServer {
        let replica = start_node();
        let _: () = redis::cmd("CLUSTER")
            .arg(
                &[
                    "MEET",
                    "127.0.0.1",
                    &master.port.to_string(),
                    &master.bus_port().to_string(),
                ][..],
            )
            .query(&mut replica.conn())
            .unwrap();
        let id = master.node_id();
        // Unknown node until the gossip has told the replica about it.
        super::wait_until(
            "the replica knows its master",
            Duration::from_secs(30),
            || {
                let r: redis::RedisResult<()> = redis::cmd("CLUSTER")
                    .arg(&["REPLICATE", &id][..])
                    .query(&mut replica.conn());
                r.is_ok()
            },
        );
        super::wait_until("the replica's link is up", Duration::from_secs(30), || {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut replica.conn())
                .unwrap();
            info.contains("master_link_status:up")
        });
        replica
    }
}
