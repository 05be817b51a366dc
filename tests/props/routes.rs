//! TDengine routes: key shape matching, parameter validation and SQL
//! building (`nearcache::tdengine::RoutePlanner`, which is exactly what
//! `Tdengine::matches` and `Tdengine::fetch` run), against an independent
//! model of what a route means.
//!
//! Input layout: a route set (templates, parameter rules from a list of
//! safe and hostile patterns and allow lists, or raw fuzz bytes as a
//! pattern), then keys built from the routes' literals and hostile values,
//! or raw bytes.
//!
//! Properties:
//! 1. compiling and planning never panic;
//! 2. a route set that compiles is sound: every pattern is a regular
//!    expression on its own (so anchoring it cannot be escaped by a `)|(`),
//!    no quoted placeholder is wrapped in quotes in the SQL;
//! 3. `plan(key)` agrees with the model: the key is refused exactly when no
//!    route's shape fits or the first route that fits has a value outside
//!    its allow list or pattern (or a non-identifier unquoted value, or a
//!    key over 1024 bytes); otherwise the SQL is exactly the template with
//!    each value substituted, quoted (`'`, `\` escaped) when the route says
//!    so: no SQL is built from a rejected value;
//! 4. the SQL's structure does not depend on the quoted values: lexed with
//!    quoted literals blanked, it is the same as with harmless values, so
//!    no value escapes its literal;
//! 5. `matches` is true exactly when some route's shape fits.

use std::time::Duration;

use nearcache::config::{TdParam, TdRoute};
use nearcache::tdengine::RoutePlanner;
use regex::Regex;

use super::Input;

const MAX_KEY_LEN: usize = 1024;

const LITS: &[&str] = &[
    "kline:", ":", "q:", "-", "::", "/", "x{y", "}", "ü:", "a", "k", "'", "\\",
];
const SEPS: &[&str] = &[":", "::", "-", "/", "|", ":x:", "'", ","];
const PATTERNS: &[&str] = &[
    "[0-9]+",
    "^[0-9A-Za-z.]{1,16}$",
    "[A-Za-z0-9_]{1,8}",
    "(?:1m|5m|1d)",
    ".*",
    ".+",
    "[^:]*",
    "\\w+",
    "(?i)[a-z]+",
    "[a-z]+)|(.*",
    "x)|(?:y",
    "[0-9]+)|(",
    "a{2,3}",
    "(",
    "[",
    "\\",
    "",
    "(?x)a #",
    "(?s).",
    "[\\x00-\\x7f]*",
];
const ALLOWS: &[&[&str]] = &[
    &["1m", "5m", "1d"],
    &["a_b", "AAPL", "0"],
    &["x';--", "it's", "a\\b"],
    &[""],
    &[],
];
const VALUES: &[&str] = &[
    "AAPL",
    "BRK.B",
    "1m",
    "1d",
    "0",
    "123",
    "",
    "a_b",
    "x';--",
    "it's",
    "a\\b",
    "\\",
    "'",
    "';DROP TABLE t;--",
    "\\'; SELECT 1; --",
    "ÄPPLE",
    "a\u{0}b",
    "a:b",
    "x{y",
    "a b",
    "\u{2028}",
    "aaa",
];

/// One generated route, as segments (ground truth for the model).
#[derive(Debug, Clone)]
struct Def {
    key: Vec<Seg>,
    sql: Vec<Seg>,
    params: Vec<(String, TdParam)>,
}

#[derive(Debug, Clone)]
enum Seg {
    Lit(String),
    Var(usize),
}

/// Template text for segments: literal braces doubled.
fn render(segs: &[Seg], params: &[(String, TdParam)]) -> String {
    segs.iter()
        .map(|s| match s {
            Seg::Lit(l) => l.replace('{', "{{").replace('}', "}}"),
            Seg::Var(i) => format!("{{{}}}", params[*i].0),
        })
        .collect()
}

fn gen_route(input: &mut Input) -> Def {
    let nparams = input.below(4);
    let mut params = Vec::new();
    for i in 0..nparams {
        let pattern = match input.byte() % 4 {
            0 => None,
            1 => Some(String::from_utf8_lossy(input.bytes(12)).into_owned()),
            _ => Some(PATTERNS[input.below(PATTERNS.len())].to_string()),
        };
        let allow = if pattern.is_none() || input.byte() % 4 == 0 {
            Some(
                ALLOWS[input.below(ALLOWS.len())]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )
        } else {
            None
        };
        params.push((
            format!("p{i}"),
            TdParam {
                pattern,
                allow,
                quote: input.byte() % 3 != 0,
            },
        ));
    }
    let mut key = vec![Seg::Lit(LITS[input.below(LITS.len())].to_string())];
    for i in 0..nparams {
        if i > 0 || input.bool() {
            key.push(Seg::Lit(SEPS[input.below(SEPS.len())].to_string()));
        }
        key.push(Seg::Var(i));
    }
    if input.byte() % 4 == 0 {
        key.push(Seg::Lit(SEPS[input.below(SEPS.len())].to_string()));
    }
    // Occasionally a broken key: two placeholders in a row.
    if nparams >= 2 && input.byte() == 0xff {
        key.retain(|s| !matches!(s, Seg::Lit(l) if l != LITS[0]) || input.bool());
    }
    let mut sql = vec![Seg::Lit("SELECT * FROM t".into())];
    for i in 0..nparams {
        match input.byte() % 5 {
            0 => {
                sql.push(Seg::Lit("_".into()));
                sql.push(Seg::Var(i));
            }
            1 => {
                // Quotes around the placeholder: refused when quote = true.
                sql.push(Seg::Lit(format!(" WHERE c{i} = '")));
                sql.push(Seg::Var(i));
                sql.push(Seg::Lit("'".into()));
            }
            _ => {
                sql.push(Seg::Lit(format!(" AND c{i} = ")));
                sql.push(Seg::Var(i));
            }
        }
    }
    sql.push(Seg::Lit(" LIMIT 5".into()));
    Def { key, sql, params }
}

fn td_route(d: &Def) -> TdRoute {
    TdRoute {
        key: render(&d.key, &d.params),
        sql: render(&d.sql, &d.params),
        ttl: Duration::from_secs(1),
        params: d.params.clone(),
    }
}

/// The model's key split: literals in order, each placeholder ends at the
/// first occurrence of the literal after it (the last one takes the rest).
fn split<'k>(d: &Def, key: &'k [u8]) -> Option<Vec<(usize, &'k [u8])>> {
    let mut rest = key;
    let mut out = Vec::new();
    for (i, s) in d.key.iter().enumerate() {
        match s {
            Seg::Lit(l) => rest = rest.strip_prefix(l.as_bytes())?,
            Seg::Var(v) => match d.key.get(i + 1) {
                Some(Seg::Lit(next)) => {
                    let n = next.as_bytes();
                    let end = (0..=rest.len().checked_sub(n.len())?)
                        .find(|&at| &rest[at..at + n.len()] == n)?;
                    out.push((*v, &rest[..end]));
                    rest = &rest[end..];
                }
                _ => {
                    out.push((*v, rest));
                    rest = &[];
                }
            },
        }
    }
    rest.is_empty().then_some(out)
}

fn quote(v: &str) -> String {
    let mut s = String::from("'");
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

fn identifier(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether `pat` matches all of `v`; compiled regexes are kept across
/// inputs (the fuzzer repeats the same patterns), `Err` if `pat` is none.
fn full_match(pat: &str, v: &str) -> Result<bool, ()> {
    use std::cell::RefCell;
    use std::collections::HashMap;
    thread_local! {
        static CACHE: RefCell<HashMap<String, Option<Regex>>> = RefCell::new(HashMap::new());
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() > 4096 {
            c.clear();
        }
        let re = c
            .entry(pat.to_string())
            .or_insert_with(|| Regex::new(&format!(r"\A(?:{pat})\z")).ok());
        re.as_ref().map(|re| re.is_match(v)).ok_or(())
    })
}

/// The model of `build_sql`: `Err` if any value fails its rule.
fn build(d: &Def, values: &[(usize, &[u8])], harmless: bool) -> Result<String, ()> {
    let mut checked: Vec<Option<String>> = vec![None; d.params.len()];
    for &(i, raw) in values {
        let p = &d.params[i].1;
        let v = std::str::from_utf8(raw).map_err(|_| ())?;
        if let Some(allow) = &p.allow {
            if !allow.iter().any(|a| a == v) {
                return Err(());
            }
        }
        if let Some(pat) = &p.pattern {
            if !full_match(pat, v)? {
                return Err(());
            }
        }
        if !p.quote && !identifier(v) {
            return Err(());
        }
        checked[i] = Some(v.to_string());
    }
    let mut sql = String::new();
    for s in &d.sql {
        match s {
            Seg::Lit(l) => sql.push_str(l),
            Seg::Var(i) => {
                let v = checked[*i].as_deref().ok_or(())?;
                if d.params[*i].1.quote {
                    sql.push_str(&quote(if harmless { "v" } else { v }));
                } else {
                    sql.push_str(v);
                }
            }
        }
    }
    Ok(sql)
}

/// SQL with every single-quoted literal (backslash escapes) replaced by `''`.
fn skeleton(sql: &str) -> String {
    let mut out = String::new();
    let mut chars = sql.chars();
    while let Some(c) = chars.next() {
        if c != '\'' {
            out.push(c);
            continue;
        }
        out.push_str("''");
        loop {
            match chars.next() {
                Some('\\') => {
                    chars.next();
                }
                Some('\'') | None => break,
                Some(_) => {}
            }
        }
    }
    out
}

fn gen_key(input: &mut Input, defs: &[Def]) -> Vec<u8> {
    if defs.is_empty() || input.byte() % 8 == 0 {
        return input.bytes(40).to_vec();
    }
    let d = &defs[input.below(defs.len())];
    let mut key = Vec::new();
    for s in &d.key {
        match s {
            Seg::Lit(l) => key.extend_from_slice(l.as_bytes()),
            Seg::Var(_) => match input.byte() % 4 {
                0 => key.extend_from_slice(input.bytes(16)),
                _ => key.extend_from_slice(VALUES[input.below(VALUES.len())].as_bytes()),
            },
        }
    }
    if input.byte() == 0xff {
        key.resize(MAX_KEY_LEN + 1 - usize::from(input.byte() & 1) * 2, b'a');
    }
    key
}

/// All the properties, on one fuzz input.
pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let defs: Vec<Def> = (0..1 + input.below(3))
        .map(|_| gen_route(&mut input))
        .collect();
    let routes: Vec<TdRoute> = defs.iter().map(td_route).collect();
    let Ok(planner) = RoutePlanner::compile(&routes) else {
        return;
    };
    // Property 2.
    for (d, r) in defs.iter().zip(&routes) {
        for (name, p) in &d.params {
            if let Some(pat) = &p.pattern {
                assert!(
                    Regex::new(pat).is_ok(),
                    "route {:?} compiled, but its pattern {pat:?} for {name} is no regex on its own",
                    r.key
                );
            }
        }
        for w in d.sql.windows(2) {
            if let [Seg::Lit(l), Seg::Var(i)] = w {
                if d.params[*i].1.quote {
                    assert!(
                        !l.ends_with(['\'', '"', '`']),
                        "quoted placeholder in quotes: {:?}",
                        r.sql
                    );
                }
            }
        }
    }
    let mut keys = 0;
    while !input.is_empty() && keys < 16 {
        keys += 1;
        let key = gen_key(&mut input, &defs);
        let fits = defs.iter().position(|d| split(d, &key).is_some());
        assert_eq!(planner.matches(&key), fits.is_some(), "matches({key:?})");
        let model = match fits {
            _ if key.len() > MAX_KEY_LEN => Err(()),
            None => Err(()),
            Some(i) => build(&defs[i], &split(&defs[i], &key).unwrap(), false).map(|s| (i, s)),
        };
        match (planner.plan(&key), model) {
            (Err(_), Err(())) => {}
            (Ok((i, sql)), Ok((mi, msql))) => {
                assert_eq!(
                    (i, &sql),
                    (mi, &msql),
                    "key {:?}",
                    String::from_utf8_lossy(&key)
                );
                let harmless = build(&defs[i], &split(&defs[i], &key).unwrap(), true).unwrap();
                assert_eq!(
                    skeleton(&sql),
                    skeleton(&harmless),
                    "a value escapes its literal: {sql}"
                );
            }
            (got, want) => panic!(
                "key {:?} on {:?}: planned {got:?}, the model says {want:?}",
                String::from_utf8_lossy(&key),
                routes.iter().map(|r| (&r.key, &r.sql)).collect::<Vec<_>>()
            ),
        }
    }
}
