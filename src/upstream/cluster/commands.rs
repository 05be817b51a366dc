//! What the cluster itself says about its commands (`COMMAND`, read once
//! from a node): where each command's keys are (key specs, interpreted the
//! way Redis' `getKeysUsingKeySpecs` does), and its tips (`request_policy`,
//! `response_policy`), which decide where a keyless command goes and how
//! the replies of several nodes become one. Modules and commands newer
//! than nearcache are routed correctly because nothing here is by name,
//! except SORT's STORE destination (a spec Redis marks incomplete).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::protocol;

/// Where a keyless command goes (tip `request_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestPolicy {
    /// No tip: any one master.
    Default,
    /// Every node; nearcache sends it to every master (replicas only ever
    /// get keyed reads, with `replica_reads`).
    AllNodes,
    AllShards,
    /// A multi-key command: split per slot.
    MultiShard,
    Special,
}

/// How several nodes' replies become one (tip `response_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponsePolicy {
    /// No tip: arrays are concatenated (in slot order), anything else is one node's reply.
    Default,
    OneSucceeded,
    AllSucceeded,
    AggLogicalAnd,
    AggLogicalOr,
    AggMin,
    AggMax,
    AggSum,
    Special,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Begin {
    Index(i64),
    Keyword { keyword: Bytes, startfrom: i64 },
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Find {
    Range {
        lastkey: i64,
        keystep: i64,
        limit: i64,
    },
    KeyNum {
        keynumidx: i64,
        firstkey: i64,
        keystep: i64,
    },
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct KeySpec {
    begin: Begin,
    find: Find,
}

/// One command (or subcommand) as the cluster describes it.
#[derive(Clone, Debug)]
pub struct CommandInfo {
    /// Lower case; `container|sub` for a subcommand.
    pub name: String,
    pub arity: i64,
    pub write: bool,
    pub readonly: bool,
    pub blocking: bool,
    /// In the `@scripting` ACL category (EVAL_RO, FCALL_RO, …).
    pub scripting: bool,
    pub request_policy: RequestPolicy,
    pub response_policy: ResponsePolicy,
    specs: Vec<KeySpec>,
    has_subcommands: bool,
}

/// Why a command's keys cannot be found.
#[derive(Debug, PartialEq, Eq)]
pub enum KeysError {
    /// Not a command this cluster knows, or the wrong number of
    /// arguments: any node answers it with the error Redis gives.
    Invalid,
    /// A key spec nearcache cannot follow (module commands with key
    /// callbacks, MIGRATE).
    Unroutable,
}

impl CommandInfo {
    /// Does Redis accept this many arguments (the name included)?
    pub fn arity_fits(&self, argc: usize) -> bool {
        let argc = argc as i64;
        (self.arity <= 0 || argc == self.arity) && (self.arity >= 0 || argc >= -self.arity)
    }

    /// The positions of the keys in `args` (`args[0]` is the name).
    pub fn key_positions(&self, args: &[Bytes]) -> Result<Vec<usize>, KeysError> {
        let argc = args.len() as i64;
        if !self.arity_fits(args.len()) {
            return Err(KeysError::Invalid);
        }
        let mut out = Vec::new();
        for spec in &self.specs {
            let first = match &spec.begin {
                Begin::Index(i) => *i,
                Begin::Keyword { keyword, startfrom } => {
                    let (start, end) = if *startfrom > 0 {
                        (*startfrom, argc - 1)
                    } else {
                        (argc + startfrom, 1)
                    };
                    let mut found = 0;
                    let mut i = start;
                    loop {
                        if i >= argc || i < 1 {
                            break;
                        }
                        if args[i as usize].eq_ignore_ascii_case(keyword) {
                            found = i + 1;
                            break;
                        }
                        if i == end {
                            break;
                        }
                        i = if start <= end { i + 1 } else { i - 1 };
                    }
                    if found == 0 {
                        continue;
                    }
                    found
                }
                Begin::Unknown => {
                    if self.name == "sort" || self.name == "sort_ro" {
                        // STORE <destination> (the spec Redis marks incomplete).
                        if let Some(at) = args.iter().position(|a| a.eq_ignore_ascii_case(b"STORE"))
                        {
                            if at + 1 < args.len() {
                                out.push(at + 1);
                            }
                        }
                        continue;
                    }
                    return Err(KeysError::Unroutable);
                }
            };
            let (first, last, step) = match spec.find {
                Find::Range {
                    lastkey,
                    keystep,
                    limit,
                } => {
                    let last = if lastkey >= 0 {
                        first + lastkey
                    } else if limit == 0 {
                        argc + lastkey
                    } else {
                        first + ((argc - first) / limit + lastkey)
                    };
                    (first, last, keystep)
                }
                Find::KeyNum {
                    keynumidx,
                    firstkey,
                    keystep,
                } => {
                    let Some(n) = args
                        .get((first + keynumidx) as usize)
                        .and_then(|a| std::str::from_utf8(a).ok())
                        .and_then(|a| a.parse::<i64>().ok())
                        .filter(|n| *n >= 0)
                    else {
                        return Err(KeysError::Invalid);
                    };
                    let first = first + firstkey;
                    (first, first + (n - 1) * keystep.max(1), keystep)
                }
                Find::Unknown => return Err(KeysError::Unroutable),
            };
            if last < first {
                // No keys (numkeys 0): Redis finds none either.
                continue;
            }
            if last >= argc || first >= argc || step < 1 {
                return Err(KeysError::Invalid);
            }
            let mut i = first;
            while i <= last {
                out.push(i as usize);
                i += step;
            }
        }
        // Two specs can name the same argument (SORT has two incomplete
        // ones, both meaning STORE's destination): one position, once.
        let mut seen = std::collections::HashSet::new();
        out.retain(|i| seen.insert(*i));
        Ok(out)
    }

    /// The keys in `args`.
    pub fn keys(&self, args: &[Bytes]) -> Result<Vec<Bytes>, KeysError> {
        Ok(self
            .key_positions(args)?
            .into_iter()
            .map(|i| args[i].clone())
            .collect())
    }
}

/// Every command of the cluster, by lower-case name (`container|sub` for subcommands).
#[derive(Debug, Default)]
pub struct CommandTable {
    map: HashMap<String, Arc<CommandInfo>>,
}

impl CommandTable {
    /// Reads a RESP2 `COMMAND` reply.
    pub fn parse(reply: &[u8]) -> Option<CommandTable> {
        let mut map = HashMap::new();
        for entry in parts(reply)? {
            let Some(info) = parse_entry(entry) else {
                continue;
            };
            let subs = parts(entry).and_then(|p| p.get(9).copied());
            if let Some(subs) = subs.and_then(parts) {
                for sub in subs {
                    if let Some(s) = parse_entry(sub) {
                        map.insert(s.name.clone(), Arc::new(s));
                    }
                }
            }
            map.insert(info.name.clone(), Arc::new(info));
        }
        (!map.is_empty()).then_some(CommandTable { map })
    }

    /// The command (or subcommand) `args` invoke, if the cluster knows it.
    pub fn lookup(&self, args: &[Bytes]) -> Option<Arc<CommandInfo>> {
        let name = String::from_utf8_lossy(args.first()?).to_ascii_lowercase();
        let cmd = self.map.get(&name)?;
        if cmd.has_subcommands {
            if let Some(sub) = args.get(1) {
                let full = format!(
                    "{name}|{}",
                    String::from_utf8_lossy(sub).to_ascii_lowercase()
                );
                if let Some(s) = self.map.get(&full) {
                    return Some(s.clone());
                }
            }
        }
        Some(cmd.clone())
    }

    /// Does the cluster know this command (and its subcommand, for a
    /// container)? Else a node refuses it before running anything.
    pub fn knows(&self, args: &[Bytes]) -> bool {
        self.lookup(args)
            .is_some_and(|i| !i.has_subcommands || i.name.contains('|'))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The element frames of an array reply.
fn parts(bytes: &[u8]) -> Option<Vec<&[u8]>> {
    Some(
        protocol::elements(bytes)?
            .into_iter()
            .map(|r| &bytes[r])
            .collect(),
    )
}

fn text(item: &[u8]) -> Option<String> {
    let s = protocol::scalar(item)?;
    Some(String::from_utf8_lossy(&s).into_owned())
}

fn int(item: &[u8]) -> Option<i64> {
    text(item)?.parse().ok()
}

/// `[k1, v1, k2, v2, ...]` as pairs of the key's text and the value's frame.
fn pairs(bytes: &[u8]) -> Vec<(String, &[u8])> {
    let Some(items) = parts(bytes) else {
        return Vec::new();
    };
    items
        .chunks(2)
        .filter_map(|c| match c {
            [k, v] => Some((text(k)?.to_ascii_lowercase(), *v)),
            _ => None,
        })
        .collect()
}

fn parse_entry(entry: &[u8]) -> Option<CommandInfo> {
    let f = parts(entry)?;
    let name = text(f.first()?)?.to_ascii_lowercase();
    let arity = int(f.get(1)?)?;
    let flags: Vec<String> = f
        .get(2)
        .and_then(|x| parts(x))
        .unwrap_or_default()
        .into_iter()
        .filter_map(text)
        .collect();
    let has = |flag: &str| flags.iter().any(|x| x.eq_ignore_ascii_case(flag));
    let scripting = f
        .get(6)
        .and_then(|x| parts(x))
        .unwrap_or_default()
        .into_iter()
        .filter_map(text)
        .any(|c| c.eq_ignore_ascii_case("@scripting"));
    let mut request_policy = RequestPolicy::Default;
    let mut response_policy = ResponsePolicy::Default;
    for tip in f
        .get(7)
        .and_then(|x| parts(x))
        .unwrap_or_default()
        .into_iter()
        .filter_map(text)
    {
        match tip.to_ascii_lowercase().as_str() {
            "request_policy:all_nodes" => request_policy = RequestPolicy::AllNodes,
            "request_policy:all_shards" => request_policy = RequestPolicy::AllShards,
            "request_policy:multi_shard" => request_policy = RequestPolicy::MultiShard,
            "request_policy:special" => request_policy = RequestPolicy::Special,
            "response_policy:one_succeeded" => response_policy = ResponsePolicy::OneSucceeded,
            "response_policy:all_succeeded" => response_policy = ResponsePolicy::AllSucceeded,
            "response_policy:agg_logical_and" => response_policy = ResponsePolicy::AggLogicalAnd,
            "response_policy:agg_logical_or" => response_policy = ResponsePolicy::AggLogicalOr,
            "response_policy:agg_min" => response_policy = ResponsePolicy::AggMin,
            "response_policy:agg_max" => response_policy = ResponsePolicy::AggMax,
            "response_policy:agg_sum" => response_policy = ResponsePolicy::AggSum,
            "response_policy:special" => response_policy = ResponsePolicy::Special,
            _ => {}
        }
    }
    let mut specs = Vec::new();
    match f.get(8).and_then(|x| parts(x)) {
        Some(list) => {
            for spec in list {
                specs.push(parse_spec(spec));
            }
        }
        None => {
            // Before key specs (Redis 6): first, last, step.
            let (first, last, step) = (int(f.get(3)?)?, int(f.get(4)?)?, int(f.get(5)?)?);
            if first > 0 {
                specs.push(KeySpec {
                    begin: Begin::Index(first),
                    find: Find::Range {
                        lastkey: if last < 0 { last } else { last - first },
                        keystep: step,
                        limit: 0,
                    },
                });
            }
        }
    }
    let has_subcommands = f
        .get(9)
        .and_then(|x| parts(x))
        .is_some_and(|s| !s.is_empty());
    Some(CommandInfo {
        name,
        arity,
        write: has("write"),
        readonly: has("readonly"),
        blocking: has("blocking"),
        scripting,
        request_policy,
        response_policy,
        specs,
        has_subcommands,
    })
}

fn parse_spec(spec: &[u8]) -> KeySpec {
    let mut begin = Begin::Unknown;
    let mut find = Find::Unknown;
    for (k, v) in pairs(spec) {
        let fields = pairs(v);
        let kind = fields
            .iter()
            .find(|(n, _)| n == "type")
            .and_then(|(_, t)| text(t))
            .unwrap_or_default();
        let inner = fields
            .iter()
            .find(|(n, _)| n == "spec")
            .map(|(_, s)| pairs(s))
            .unwrap_or_default();
        let get = |name: &str| inner.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        let num = |name: &str| get(name).and_then(int);
        match (k.as_str(), kind.as_str()) {
            ("begin_search", "index") => {
                if let Some(i) = num("index") {
                    begin = Begin::Index(i);
                }
            }
            ("begin_search", "keyword") => {
                if let (Some(kw), Some(from)) =
                    (get("keyword").and_then(protocol::scalar), num("startfrom"))
                {
                    begin = Begin::Keyword {
                        keyword: kw,
                        startfrom: from,
                    };
                }
            }
            ("find_keys", "range") => {
                if let (Some(lastkey), Some(keystep), Some(limit)) =
                    (num("lastkey"), num("keystep"), num("limit"))
                {
                    find = Find::Range {
                        lastkey,
                        keystep,
                        limit,
                    };
                }
            }
            ("find_keys", "keynum") => {
                if let (Some(keynumidx), Some(firstkey), Some(keystep)) =
                    (num("keynumidx"), num("firstkey"), num("keystep"))
                {
                    find = Find::KeyNum {
                        keynumidx,
                        firstkey,
                        keystep,
                    };
                }
            }
            _ => {}
        }
    }
    KeySpec { begin, find }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    /// A hand-written COMMAND reply in Redis 7's shape.
    fn table() -> CommandTable {
        let idx = |i: i64, last: i64| {
            format!(
                "*6\r\n$5\r\nflags\r\n*0\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n*2\r\n$5\r\nindex\r\n:{i}\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n*6\r\n$7\r\nlastkey\r\n:{last}\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:0\r\n"
            )
        };
        let keynum = "*6\r\n$5\r\nflags\r\n*0\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n*2\r\n$5\r\nindex\r\n:2\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$6\r\nkeynum\r\n$4\r\nspec\r\n*6\r\n$9\r\nkeynumidx\r\n:0\r\n$8\r\nfirstkey\r\n:1\r\n$7\r\nkeystep\r\n:1\r\n";
        let streams = "*6\r\n$5\r\nflags\r\n*0\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$7\r\nkeyword\r\n$4\r\nspec\r\n*4\r\n$7\r\nkeyword\r\n$7\r\nSTREAMS\r\n$9\r\nstartfrom\r\n:1\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n*6\r\n$7\r\nlastkey\r\n:-1\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:2\r\n";
        let cmd = |name: &str,
                   arity: i64,
                   flags: &str,
                   tips: &[&str],
                   specs: &[String],
                   subs: &str| {
            let tips: String = tips
                .iter()
                .map(|t| format!("${}\r\n{t}\r\n", t.len()))
                .collect();
            format!(
                "*10\r\n${}\r\n{name}\r\n:{arity}\r\n*1\r\n+{flags}\r\n:0\r\n:0\r\n:0\r\n*0\r\n*{}\r\n{tips}*{}\r\n{}{subs}",
                name.len(),
                tips.matches("\r\n").count() / 2,
                specs.len(),
                specs.concat()
            )
        };
        let mget = cmd(
            "mget",
            -2,
            "readonly",
            &["request_policy:multi_shard"],
            &[idx(1, -1)],
            "*0\r\n",
        );
        let eval = cmd("eval", -3, "noscript", &[], &[keynum.to_string()], "*0\r\n");
        let xread = cmd(
            "xread",
            -4,
            "readonly",
            &[],
            &[streams.to_string()],
            "*0\r\n",
        );
        let dbsize = cmd(
            "dbsize",
            1,
            "readonly",
            &["request_policy:all_shards", "response_policy:agg_sum"],
            &[],
            "*0\r\n",
        );
        let usage = cmd("memory|usage", -3, "readonly", &[], &[idx(2, 0)], "*0\r\n");
        let memory = cmd(
            "memory",
            -2,
            "readonly",
            &[],
            &[],
            &format!("*1\r\n{usage}"),
        );
        let reply = format!(
            "*6\r\n{mget}{eval}{xread}{dbsize}{memory}{}",
            cmd("set", -3, "write", &[], &[idx(1, 0)], "*0\r\n")
        );
        CommandTable::parse(reply.as_bytes()).expect("parses")
    }

    fn keys(t: &CommandTable, s: &str) -> Result<Vec<String>, KeysError> {
        let a = args(s);
        let info = t.lookup(&a).ok_or(KeysError::Invalid)?;
        Ok(info
            .keys(&a)?
            .into_iter()
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .collect())
    }

    #[test]
    fn key_specs_are_followed() {
        let t = table();
        assert_eq!(keys(&t, "MGET a b c").unwrap(), ["a", "b", "c"]);
        assert_eq!(keys(&t, "SET k v").unwrap(), ["k"]);
        assert_eq!(keys(&t, "EVAL s 2 a b x").unwrap(), ["a", "b"]);
        assert_eq!(keys(&t, "EVAL s 0").unwrap(), Vec::<String>::new());
        assert_eq!(
            keys(&t, "XREAD COUNT 2 STREAMS s1 s2 0 0").unwrap(),
            ["s1", "s2"]
        );
        assert_eq!(keys(&t, "MEMORY USAGE k").unwrap(), ["k"]);
        assert_eq!(keys(&t, "memory usage k SAMPLES 5").unwrap(), ["k"]);
        assert_eq!(keys(&t, "DBSIZE").unwrap(), Vec::<String>::new());
        assert_eq!(keys(&t, "MGET"), Err(KeysError::Invalid));
        assert_eq!(keys(&t, "EVAL s 3 a"), Err(KeysError::Invalid));
        assert_eq!(keys(&t, "EVAL s x a"), Err(KeysError::Invalid));
        assert_eq!(keys(&t, "NOSUCH a"), Err(KeysError::Invalid));
        let db = t.lookup(&args("dbsize")).unwrap();
        assert_eq!(
            (db.request_policy, db.response_policy),
            (RequestPolicy::AllShards, ResponsePolicy::AggSum)
        );
        let mget = t.lookup(&args("MGET a")).unwrap();
        assert_eq!(mget.request_policy, RequestPolicy::MultiShard);
        assert!(mget.readonly && !mget.write);
    }
}
