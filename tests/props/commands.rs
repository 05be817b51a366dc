//! Command classification against Redis' own key specs.
//!
//! The oracle is `fuzz/keyspecs.json`, captured from a real redis-server by
//! `fuzz/keyspecs/generate.py`: the key specs (`COMMAND INFO`) of every
//! command with a key it writes (flag RW, OW or RM), and Redis' answer to
//! `COMMAND GETKEYSANDFLAGS` for a corpus of concrete commands.
//!
//! Properties:
//! 1. `classify` and `write_keys` never panic, on any name and arguments;
//! 2. for every command of the corpus, every key Redis says it writes is
//!    among the keys nearcache invalidates for it (`write_keys`, or
//!    `Keys::All`): a write nearcache misses leaves a stale L1 entry;
//! 3. the same for random argument lists, with Redis' key specs interpreted
//!    here the way `getKeysUsingKeySpecs` (db.c) does, for the commands whose
//!    specs are complete (no `unknown` search, no INCOMPLETE flag);
//! 4. the interpreter itself agrees with Redis on the corpus (the keys it
//!    finds are the keys GETKEYSANDFLAGS names), so property 3 checks
//!    against Redis and not against a mistake here.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use bytes::Bytes;
use nearcache::command::{classify, write_keys, Class, Keys};
use serde_json::Value;

use super::Input;

pub const KEYSPECS_JSON: &str = include_str!("../../fuzz/keyspecs.json");

/// Flags of a key Redis writes.
const WRITE_FLAGS: [&str; 3] = ["RW", "OW", "RM"];

#[derive(Debug)]
pub enum Begin {
    Index(i64),
    Keyword { keyword: String, startfrom: i64 },
}

#[derive(Debug)]
pub enum Find {
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
}

#[derive(Debug)]
pub struct Spec {
    pub begin: Option<Begin>,
    pub find: Option<Find>,
    pub write: bool,
    pub incomplete: bool,
}

#[derive(Debug)]
pub struct Command {
    pub arity: i64,
    pub specs: Vec<Spec>,
}

impl Command {
    /// Whether [`Command::keys`] can stand for Redis on any arguments.
    pub fn interpretable(&self) -> bool {
        self.specs
            .iter()
            .all(|s| s.begin.is_some() && s.find.is_some() && !s.incomplete)
    }

    /// The keys Redis finds in `args` (`args[0]` the name), each with
    /// whether it is written; `None` where Redis would refuse the command
    /// (arity) or its specs do not fit (Redis then refuses it too, or finds
    /// keys another way, which the corpus covers).
    pub fn keys(&self, args: &[Bytes]) -> Option<Vec<(usize, bool)>> {
        let argc = args.len() as i64;
        if (self.arity > 0 && argc != self.arity) || (self.arity < 0 && argc < -self.arity) {
            return None;
        }
        let mut out = Vec::new();
        for spec in &self.specs {
            let first = match spec.begin.as_ref()? {
                Begin::Index(i) => *i,
                Begin::Keyword { keyword, startfrom } => {
                    let start = if *startfrom > 0 {
                        *startfrom
                    } else {
                        argc + startfrom
                    };
                    let end = if *startfrom > 0 { argc - 1 } else { 1 };
                    let mut i = start;
                    let mut found = 0;
                    while i != end {
                        if i >= argc || i < 1 {
                            break;
                        }
                        if args[i as usize].eq_ignore_ascii_case(keyword.as_bytes()) {
                            found = i + 1;
                            break;
                        }
                        i = if start <= end { i + 1 } else { i - 1 };
                    }
                    if found == 0 {
                        continue;
                    }
                    found
                }
            };
            let (first, last, step) = match spec.find.as_ref()? {
                Find::Range {
                    lastkey,
                    keystep,
                    limit,
                } => {
                    let last = if *lastkey >= 0 {
                        first + lastkey
                    } else if *limit == 0 {
                        argc + lastkey
                    } else {
                        first + ((argc - first) / limit + lastkey)
                    };
                    (first, last, *keystep)
                }
                Find::KeyNum {
                    keynumidx,
                    firstkey,
                    keystep,
                } => {
                    let at = first + keynumidx;
                    if at >= argc {
                        return None;
                    }
                    let numkeys = super::requests::string2ll(&args[at as usize])?;
                    if numkeys < 0 {
                        return None;
                    }
                    let first = first + firstkey;
                    (first, first.checked_add(numkeys)? - 1, *keystep)
                }
            };
            if last >= argc || last < first || first >= argc {
                return None;
            }
            let mut i = first;
            while i <= last {
                out.push((i as usize, spec.write));
                i += step.max(1);
            }
        }
        Some(out)
    }
}

/// One `COMMAND GETKEYSANDFLAGS` answer of the corpus.
#[derive(Debug)]
pub struct GetKeys {
    pub args: Vec<Bytes>,
    /// Key names, each with whether Redis writes it.
    pub keys: Vec<(Bytes, bool)>,
}

pub struct Oracle {
    pub redis_version: String,
    /// By name, subcommands as `XGROUP|CREATE`.
    pub commands: BTreeMap<String, Command>,
    pub getkeys: Vec<GetKeys>,
    /// Every keyword the specs search for, for argument generation.
    pub keywords: Vec<String>,
}

fn int(v: &Value, field: &str) -> i64 {
    v[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

fn write_flag(flags: &Value) -> bool {
    flags
        .as_array()
        .unwrap()
        .iter()
        .any(|f| WRITE_FLAGS.contains(&f.as_str().unwrap()))
}

pub fn oracle() -> &'static Oracle {
    static ORACLE: OnceLock<Oracle> = OnceLock::new();
    ORACLE.get_or_init(|| {
        let doc: Value = serde_json::from_str(KEYSPECS_JSON).expect("fuzz/keyspecs.json");
        let mut commands = BTreeMap::new();
        let mut keywords = Vec::new();
        for (name, c) in doc["commands"].as_object().unwrap() {
            let specs = c["key_specs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let b = &s["begin_search"];
                    let begin = match b["type"].as_str() {
                        Some("index") => Some(Begin::Index(int(b, "index"))),
                        Some("keyword") => {
                            let keyword = b["keyword"].as_str().unwrap().to_string();
                            keywords.push(keyword.clone());
                            Some(Begin::Keyword {
                                keyword,
                                startfrom: int(b, "startfrom"),
                            })
                        }
                        _ => None,
                    };
                    let f = &s["find_keys"];
                    let find = match f["type"].as_str() {
                        Some("range") => Some(Find::Range {
                            lastkey: int(f, "lastkey"),
                            keystep: int(f, "keystep"),
                            limit: int(f, "limit"),
                        }),
                        Some("keynum") => Some(Find::KeyNum {
                            keynumidx: int(f, "keynumidx"),
                            firstkey: int(f, "firstkey"),
                            keystep: int(f, "keystep"),
                        }),
                        _ => None,
                    };
                    let flags = s["flags"].as_array().unwrap();
                    Spec {
                        begin,
                        find,
                        write: write_flag(&s["flags"]),
                        incomplete: flags.iter().any(|f| f == "incomplete"),
                    }
                })
                .collect();
            commands.insert(
                name.clone(),
                Command {
                    arity: int(c, "arity"),
                    specs,
                },
            );
        }
        let getkeys = doc["getkeys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| GetKeys {
                args: g["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| Bytes::copy_from_slice(a.as_str().unwrap().as_bytes()))
                    .collect(),
                keys: g["keys"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| {
                        (
                            Bytes::copy_from_slice(k[0].as_str().unwrap().as_bytes()),
                            write_flag(&k[1]),
                        )
                    })
                    .collect(),
            })
            .collect();
        keywords.sort();
        keywords.dedup();
        Oracle {
            redis_version: doc["redis_version"].as_str().unwrap().to_string(),
            commands,
            getkeys,
            keywords,
        }
    })
}

impl Oracle {
    /// The key specs for a request: `NAME|SUB` for container commands.
    pub fn command(&self, args: &[Bytes]) -> Option<&Command> {
        let name = String::from_utf8_lossy(args.first()?).to_ascii_uppercase();
        if let Some(sub) = args.get(1) {
            let full = format!(
                "{name}|{}",
                String::from_utf8_lossy(sub).to_ascii_uppercase()
            );
            if let Some(c) = self.commands.get(&full) {
                return Some(c);
            }
        }
        self.commands.get(&name)
    }
}

fn show(args: &[Bytes]) -> String {
    args.iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Property 2 for one command: `written` keys must be invalidated.
pub fn check_invalidates(args: &[Bytes], written: &[Bytes]) {
    if written.is_empty() || args.is_empty() {
        return;
    }
    let name = args[0].to_ascii_uppercase();
    match write_keys(&name, args) {
        Keys::All => {}
        Keys::Some(keys) => {
            for w in written {
                assert!(
                    keys.contains(w),
                    "`{}`: Redis writes {:?}, nearcache invalidates only {:?}",
                    show(args),
                    String::from_utf8_lossy(w),
                    keys.iter()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .collect::<Vec<_>>()
                );
            }
        }
        Keys::None => panic!(
            "`{}`: Redis writes {:?}, nearcache classifies it as {:?} and invalidates nothing",
            show(args),
            written
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect::<Vec<_>>(),
            classify(&name, args)
        ),
    }
}

/// Properties 2 and 4 over the whole recorded corpus; returns how many
/// commands were checked against the interpreter.
pub fn check_corpus() -> usize {
    let o = oracle();
    let mut interpreted = 0;
    for g in &o.getkeys {
        let written: Vec<Bytes> = g
            .keys
            .iter()
            .filter(|(_, w)| *w)
            .map(|(k, _)| k.clone())
            .collect();
        check_invalidates(&g.args, &written);
        if let Some(c) = o.command(&g.args).filter(|c| c.interpretable()) {
            if let Some(found) = c.keys(&g.args) {
                let names: Vec<&Bytes> = found.iter().map(|&(i, _)| &g.args[i]).collect();
                let redis: Vec<&Bytes> = g.keys.iter().map(|(k, _)| k).collect();
                assert_eq!(
                    names,
                    redis,
                    "the key spec interpreter differs from Redis on `{}`",
                    show(&g.args)
                );
                interpreted += 1;
            }
        }
    }
    interpreted
}

const TOKENS: &[&str] = &[
    "k1",
    "k2",
    "k3",
    "k4",
    "0",
    "1",
    "2",
    "3",
    "-1",
    "01",
    "+1",
    "10",
    "",
    "STORE",
    "STOREDIST",
    "STREAMS",
    "BLOCK",
    "KEYS",
    "COUNT",
    "LEFT",
    "RIGHT",
    "GET",
    "BY",
    "LIMIT",
    "WEIGHTS",
    "NX",
    "EX",
    "FIELDS",
    "GROUP",
    "CREATE",
    "MKSTREAM",
    "$",
    ">",
    "*",
    "#",
    "store",
    "streams",
    "block",
];

/// Properties 1 and 3 on one fuzz input:
/// `[name mode] [argc] ([arg mode] [arg bytes])*`.
pub fn check(data: &[u8]) {
    let o = oracle();
    let mut input = Input::new(data);
    let names: Vec<&String> = o.commands.keys().collect();
    let known = nearcache::command::known_commands();
    let mode = input.byte();
    let mut args: Vec<Bytes> = match mode % 4 {
        0 | 1 => names[input.below(names.len())]
            .split('|')
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect(),
        2 => vec![Bytes::from_static(
            known[input.below(known.len())].as_bytes(),
        )],
        _ => vec![Bytes::copy_from_slice(input.bytes(24))],
    };
    if mode & 0x80 != 0 {
        // Any case: Redis command names are case-insensitive.
        let lower = args[0].to_ascii_lowercase();
        args[0] = Bytes::from(lower);
    }
    let argc = input.below(14);
    for _ in 0..argc {
        let a = match input.byte() % 4 {
            0 | 1 => Bytes::from_static(TOKENS[input.below(TOKENS.len())].as_bytes()),
            2 if !o.keywords.is_empty() => {
                Bytes::copy_from_slice(o.keywords[input.below(o.keywords.len())].as_bytes())
            }
            _ => Bytes::copy_from_slice(input.bytes(12)),
        };
        args.push(a);
    }
    let name = args[0].to_ascii_uppercase();
    let class = classify(&name, &args);
    let keys = write_keys(&name, &args);
    match &class {
        Class::CacheableRead { key } => {
            assert_eq!(Some(key), args.get(1), "a cacheable read of another key");
            assert_eq!(keys, Keys::None);
        }
        Class::Write { keys: k } | Class::Pinned { keys: k, .. } => assert_eq!(&keys, k),
        _ => assert_eq!(keys, Keys::None),
    }
    if let Some(c) = o.command(&args).filter(|c| c.interpretable()) {
        if let Some(found) = c.keys(&args) {
            let written: Vec<Bytes> = found
                .iter()
                .filter(|&&(_, w)| w)
                .map(|&(i, _)| args[i].clone())
                .collect();
            check_invalidates(&args, &written);
        }
    }
}
