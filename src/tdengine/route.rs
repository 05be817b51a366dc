//! Route templates: key shape matching, parameter validation and SQL building.
//!
//! Every value taken from a client key is validated (anchored regex and/or
//! exact allow list) before any SQL text exists, and is then emitted either as
//! a SQL string literal (`quote = true`, with `'` and `\` escaped) or as an
//! identifier fragment restricted to `[A-Za-z0-9_]`.

use std::time::Duration;

use regex::Regex;

use crate::config::{TdParam, TdRoute};

/// Keys longer than this never reach parameter validation.
pub const MAX_KEY_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Var(usize),
}

#[derive(Debug)]
struct Param {
    name: String,
    pattern: Option<Regex>,
    allow: Option<Vec<String>>,
    quote: bool,
}

/// One compiled `[[tdengine.routes]]` entry.
#[derive(Debug)]
pub struct Route {
    /// The key template as configured, used as the metrics label.
    pub template: String,
    pub ttl: Duration,
    key: Vec<Seg>,
    sql: Vec<Seg>,
    params: Vec<Param>,
}

/// Parse `{name}` placeholders; `{{` and `}}` are literal braces.
fn parse_template(
    text: &str,
    what: &str,
    mut var: impl FnMut(&str) -> Result<usize, String>,
) -> Result<Vec<Seg>, String> {
    let mut segs = Vec::new();
    let mut lit = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) if c.is_ascii_alphanumeric() || c == '_' => name.push(c),
                        Some(c) => {
                            return Err(format!(
                                "{what}: invalid character {c:?} in placeholder name"
                            ))
                        }
                        None => return Err(format!("{what}: unterminated placeholder {{{name}")),
                    }
                }
                if name.is_empty() {
                    return Err(format!("{what}: empty placeholder {{}}"));
                }
                if !lit.is_empty() {
                    segs.push(Seg::Lit(std::mem::take(&mut lit)));
                }
                segs.push(Seg::Var(var(&name)?));
            }
            '}' => {
                return Err(format!(
                    "{what}: unmatched '}}' (write '}}}}' for a literal brace)"
                ))
            }
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        segs.push(Seg::Lit(lit));
    }
    Ok(segs)
}

/// Whether every string the regex can match consists of `[A-Za-z0-9_]` only.
fn pattern_is_identifier_safe(pattern: &str) -> Result<bool, String> {
    use regex_syntax::hir::{Class, Hir, HirKind};
    fn ok_char(c: u32) -> bool {
        char::from_u32(c).is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    }
    fn walk(h: &Hir) -> bool {
        match h.kind() {
            HirKind::Empty | HirKind::Look(_) => true,
            HirKind::Literal(lit) => lit.0.iter().all(|&b| ok_char(u32::from(b))),
            HirKind::Class(Class::Unicode(cls)) => cls
                .ranges()
                .iter()
                .all(|r| (u32::from(r.start())..=u32::from(r.end())).all(ok_char)),
            HirKind::Class(Class::Bytes(cls)) => cls
                .ranges()
                .iter()
                .all(|r| (u32::from(r.start())..=u32::from(r.end())).all(ok_char)),
            HirKind::Repetition(rep) => walk(&rep.sub),
            HirKind::Capture(cap) => walk(&cap.sub),
            HirKind::Concat(hs) | HirKind::Alternation(hs) => hs.iter().all(walk),
        }
    }
    let hir = regex_syntax::Parser::new()
        .parse(pattern)
        .map_err(|e| e.to_string())?;
    Ok(walk(&hir))
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A SQL string literal: single quotes, with `\` and `'` backslash-escaped.
pub fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Route {
    /// Compile one route; `ctx` is its config path, e.g. `tdengine.routes[0]`.
    pub fn compile(ctx: &str, r: &TdRoute) -> Result<Route, String> {
        let mut params: Vec<Param> = Vec::new();
        for (name, p) in &r.params {
            params.push(Self::compile_param(
                &format!("{ctx}.params.{name}"),
                name,
                p,
            )?);
        }
        let mut seen = vec![false; params.len()];
        let key = parse_template(&r.key, &format!("{ctx}.key"), |name| {
            let i = params.iter().position(|p| p.name == name).ok_or_else(|| {
                format!("{ctx}.params.{name}: placeholder {{{name}}} in the key has no param rule")
            })?;
            if seen[i] {
                return Err(format!("{ctx}.key: placeholder {{{name}}} appears twice"));
            }
            seen[i] = true;
            Ok(i)
        })?;
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(format!(
                "{ctx}.params.{}: not a placeholder of the key {:?}",
                params[i].name, r.key
            ));
        }
        if !matches!(key.first(), Some(Seg::Lit(_))) {
            return Err(format!(
                "{ctx}.key: must start with literal text, e.g. \"kline:{{symbol}}\""
            ));
        }
        for w in key.windows(2) {
            if matches!(w, [Seg::Var(_), Seg::Var(_)]) {
                return Err(format!(
                    "{ctx}.key: placeholders must be separated by literal text"
                ));
            }
        }
        let sql = parse_template(&r.sql, &format!("{ctx}.sql"), |name| {
            params
                .iter()
                .position(|p| p.name == name)
                .filter(|&i| seen[i])
                .ok_or_else(|| {
                    format!(
                        "{ctx}.sql: unknown placeholder {{{name}}} (not in the key {:?})",
                        r.key
                    )
                })
        })?;
        if !sql.iter().any(|s| matches!(s, Seg::Var(_)))
            && !key.iter().any(|s| matches!(s, Seg::Var(_)))
        {
            // A constant route is allowed (e.g. "market:status").
        }
        // A quoted placeholder must not be wrapped in quotes by the SQL text.
        for (i, s) in sql.iter().enumerate() {
            if let Seg::Var(v) = s {
                if params[*v].quote {
                    let before = i.checked_sub(1).and_then(|j| match &sql[j] {
                        Seg::Lit(l) => l.chars().last(),
                        Seg::Var(_) => None,
                    });
                    if matches!(before, Some('\'' | '"' | '`')) {
                        return Err(format!(
                            "{ctx}.sql: {{{}}} is quoted by nearcache (quote = true); remove the quotes around it",
                            params[*v].name
                        ));
                    }
                }
            }
        }
        Ok(Route {
            template: r.key.clone(),
            ttl: r.ttl,
            key,
            sql,
            params,
        })
    }

    fn compile_param(ctx: &str, name: &str, p: &TdParam) -> Result<Param, String> {
        if p.pattern.is_none() && p.allow.is_none() {
            return Err(format!("{ctx}: needs a pattern or an allow list"));
        }
        let pattern = match &p.pattern {
            None => None,
            Some(pat) => {
                // The pattern must be a regex on its own: anchored as
                // `\A(?:{pat})\z`, a pattern like `[0-9]+)|(.*` would
                // otherwise compile and match anything.
                regex_syntax::Parser::new()
                    .parse(pat)
                    .map_err(|e| format!("{ctx}.pattern: {e}"))?;
                let re = Regex::new(&format!(r"\A(?:{pat})\z"))
                    .map_err(|e| format!("{ctx}.pattern: {e}"))?;
                if !p.quote
                    && p.allow.is_none()
                    && !pattern_is_identifier_safe(pat)
                        .map_err(|e| format!("{ctx}.pattern: {e}"))?
                {
                    return Err(format!(
                        "{ctx}.pattern: an unquoted (identifier) placeholder needs an allow list or a pattern restricted to [A-Za-z0-9_]; set quote = true for string values"
                    ));
                }
                Some(re)
            }
        };
        if let Some(allow) = &p.allow {
            if allow.is_empty() {
                return Err(format!("{ctx}.allow: must not be empty"));
            }
            if !p.quote {
                if let Some(bad) = allow.iter().find(|a| !is_identifier(a)) {
                    return Err(format!(
                        "{ctx}.allow: {bad:?} is not an identifier fragment ([A-Za-z0-9_]+); set quote = true for string values"
                    ));
                }
            }
        }
        Ok(Param {
            name: name.to_string(),
            pattern,
            allow: p.allow.clone(),
            quote: p.quote,
        })
    }

    /// Split a key by the template's shape; values are byte slices of `key`,
    /// indexed by parameter.
    pub fn split<'k>(&self, key: &'k [u8]) -> Option<Vec<(usize, &'k [u8])>> {
        let mut rest = key;
        let mut out = Vec::with_capacity(self.params.len());
        let mut i = 0;
        while i < self.key.len() {
            match &self.key[i] {
                Seg::Lit(l) => {
                    rest = rest.strip_prefix(l.as_bytes())?;
                }
                Seg::Var(v) => match self.key.get(i + 1) {
                    Some(Seg::Lit(next)) => {
                        let end = find(rest, next.as_bytes())?;
                        out.push((*v, &rest[..end]));
                        rest = &rest[end..];
                    }
                    _ => {
                        out.push((*v, rest));
                        rest = &[];
                    }
                },
            }
            i += 1;
        }
        rest.is_empty().then_some(out)
    }

    /// Validate every value of a key that [`Route::split`] accepted and build
    /// the SQL. `Err` names the failing parameter; no SQL exists then.
    pub fn build_sql(&self, values: &[(usize, &[u8])]) -> Result<String, String> {
        let mut checked: Vec<Option<&str>> = vec![None; self.params.len()];
        for &(i, raw) in values {
            let p = &self.params[i];
            let v = std::str::from_utf8(raw).map_err(|_| format!("{}: not UTF-8", p.name))?;
            if let Some(allow) = &p.allow {
                if !allow.iter().any(|a| a == v) {
                    return Err(format!("{}: not in the allow list", p.name));
                }
            }
            if let Some(re) = &p.pattern {
                if !re.is_match(v) {
                    return Err(format!("{}: does not match the pattern", p.name));
                }
            }
            // Defence in depth: config load already guarantees this.
            if !p.quote && !is_identifier(v) {
                return Err(format!("{}: not an identifier", p.name));
            }
            checked[i] = Some(v);
        }
        let mut sql = String::new();
        for s in &self.sql {
            match s {
                Seg::Lit(l) => sql.push_str(l),
                Seg::Var(i) => {
                    let v =
                        checked[*i].ok_or_else(|| format!("{}: missing", self.params[*i].name))?;
                    if self.params[*i].quote {
                        sql.push_str(&quote_literal(v));
                    } else {
                        sql.push_str(v);
                    }
                }
            }
        }
        Ok(sql)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// name, pattern, allow, quote
    type P<'a> = (&'a str, Option<&'a str>, Option<&'a [&'a str]>, bool);

    fn route(key: &str, sql: &str, params: &[P<'_>]) -> Result<Route, String> {
        let r = TdRoute {
            key: key.into(),
            sql: sql.into(),
            ttl: Duration::from_secs(60),
            params: params
                .iter()
                .map(|(n, pat, allow, quote)| {
                    (
                        n.to_string(),
                        TdParam {
                            pattern: pat.map(str::to_string),
                            allow: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
                            quote: *quote,
                        },
                    )
                })
                .collect(),
        };
        Route::compile("tdengine.routes[0]", &r)
    }

    const FREQS: &[&str] = &["1m", "5m", "1d"];

    fn kline() -> Route {
        route(
            "kline:{symbol}:{freq}",
            "SELECT * FROM kline_{freq} WHERE symbol = {symbol} LIMIT 5",
            &[
                ("symbol", Some("^[0-9A-Za-z.]{1,16}$"), None, true),
                ("freq", None, Some(FREQS), false),
            ],
        )
        .unwrap()
    }

    fn sql_for(r: &Route, key: &str) -> Result<String, String> {
        let v = r.split(key.as_bytes()).ok_or("no shape match")?;
        r.build_sql(&v)
    }

    #[test]
    fn splits_on_literal_separators() {
        let r = kline();
        let v = r.split(b"kline:AAPL:1d").unwrap();
        assert_eq!(v, vec![(0, &b"AAPL"[..]), (1, &b"1d"[..])]);
        // The last placeholder takes the rest, separators included.
        let v = r.split(b"kline:A:B:C").unwrap();
        assert_eq!(v, vec![(0, &b"A"[..]), (1, &b"B:C"[..])]);
        assert!(r.split(b"kline:AAPL").is_none());
        assert!(r.split(b"other:AAPL:1d").is_none());
        assert!(r.split(b"kline").is_none());
    }

    #[test]
    fn builds_escaped_sql() {
        let r = kline();
        assert_eq!(
            sql_for(&r, "kline:BRK.B:1d").unwrap(),
            "SELECT * FROM kline_1d WHERE symbol = 'BRK.B' LIMIT 5"
        );
    }

    #[test]
    fn rejects_bad_values() {
        let r = kline();
        for key in [
            "kline:0';DROP TABLE kline_1d;--:1d",
            "kline:AAPL:2h",
            "kline:AAPL:1d;DROP",
            "kline::1d",
            "kline:ÄPPLE:1d",
            "kline:AAPL\u{0}:1d",
            "kline:AAPLAAPLAAPLAAPLAAPL:1d",
        ] {
            assert!(sql_for(&r, key).is_err(), "{key}");
        }
        let v = r.split(b"kline:\xff\xfe:1d").unwrap();
        assert!(r.build_sql(&v).is_err());
    }

    #[test]
    fn quote_escapes_quotes_and_backslashes() {
        assert_eq!(quote_literal("abc"), "'abc'");
        assert_eq!(quote_literal("a'b"), "'a\\'b'");
        assert_eq!(quote_literal("a\\'b"), "'a\\\\\\'b'");
        assert_eq!(quote_literal("x\\"), "'x\\\\'");
        // A permissive pattern still produces a closed literal.
        let r = route(
            "k:{s}",
            "SELECT 1 FROM t WHERE s = {s}",
            &[("s", Some(".*"), None, true)],
        )
        .unwrap();
        assert_eq!(
            sql_for(&r, "k:';--").unwrap(),
            "SELECT 1 FROM t WHERE s = '\\';--'"
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = route("k:{s}", "SELECT {s}", &[("s", Some("("), None, true)]).unwrap_err();
        assert!(e.starts_with("tdengine.routes[0].params.s.pattern:"), "{e}");
        let e = route("k:{s}", "SELECT {s} {t}", &[("s", Some("a"), None, true)]).unwrap_err();
        assert!(
            e.starts_with("tdengine.routes[0].sql:") && e.contains("{t}"),
            "{e}"
        );
        let e = route("k:{s}:{t}", "SELECT {s}", &[("s", Some("a"), None, true)]).unwrap_err();
        assert!(e.starts_with("tdengine.routes[0].params.t:"), "{e}");
        let e = route(
            "k:{s}",
            "SELECT {s}",
            &[("s", Some("a"), None, true), ("u", Some("a"), None, true)],
        )
        .unwrap_err();
        assert!(e.starts_with("tdengine.routes[0].params.u:"), "{e}");
        let e = route(
            "k:{s}{t}",
            "SELECT {s}",
            &[("s", Some("a"), None, true), ("t", Some("a"), None, true)],
        )
        .unwrap_err();
        assert!(e.starts_with("tdengine.routes[0].key:"), "{e}");
        let e = route("k:{s", "SELECT 1", &[]).unwrap_err();
        assert!(e.starts_with("tdengine.routes[0].key:"), "{e}");
        let e = route("k:{s}", "SELECT '{s}'", &[("s", Some("a"), None, true)]).unwrap_err();
        assert!(e.contains("remove the quotes"), "{e}");
    }

    #[test]
    fn identifier_params_must_be_restricted() {
        // Identifier with a permissive pattern: refused.
        let e = route(
            "k:{t}",
            "SELECT * FROM {t}",
            &[("t", Some("[a-z.]+"), None, false)],
        )
        .unwrap_err();
        assert!(e.starts_with("tdengine.routes[0].params.t.pattern:"), "{e}");
        let e = route(
            "k:{t}",
            "SELECT * FROM {t}",
            &[("t", Some(".+"), None, false)],
        )
        .unwrap_err();
        assert!(e.contains("[A-Za-z0-9_]"), "{e}");
        let e = route(
            "k:{t}",
            "SELECT * FROM {t}",
            &[("t", Some("\\w+"), None, false)],
        )
        .unwrap_err();
        assert!(e.contains("[A-Za-z0-9_]"), "{e}");
        // Restricted pattern or allow list: accepted.
        route(
            "k:{t}",
            "SELECT * FROM t_{t}",
            &[("t", Some("^[A-Za-z0-9_]{1,8}$"), None, false)],
        )
        .unwrap();
        route(
            "k:{t}",
            "SELECT * FROM t_{t}",
            &[("t", Some("(?:1m|5m)"), None, false)],
        )
        .unwrap();
        route(
            "k:{t}",
            "SELECT * FROM t_{t}",
            &[("t", None, Some(&["1m", "x_y"]), false)],
        )
        .unwrap();
        // Allow entries of identifier params must themselves be identifiers.
        let e = route(
            "k:{t}",
            "SELECT * FROM {t}",
            &[("t", None, Some(&["a;b"]), false)],
        )
        .unwrap_err();
        assert!(e.starts_with("tdengine.routes[0].params.t.allow:"), "{e}");
        // Neither pattern nor allow.
        let e = route("k:{t}", "SELECT {t}", &[("t", None, None, true)]).unwrap_err();
        assert!(e.starts_with("tdengine.routes[0].params.t:"), "{e}");
    }

    /// Found by fuzz/ (routes): a pattern that is no regex on its own
    /// escaped its anchors once wrapped (`\A(?:[0-9]+)|(.*)\z`), and matched
    /// anything.
    #[test]
    fn patterns_must_be_regexes_on_their_own() {
        for pat in ["[0-9]+)|(.*", "x)|(?:y", "[0-9]+)|("] {
            let e = route(
                "k:{s}",
                "SELECT 1 FROM t WHERE s = {s}",
                &[("s", Some(pat), None, true)],
            )
            .unwrap_err();
            assert!(e.starts_with("tdengine.routes[0].params.s.pattern:"), "{e}");
        }
    }

    #[test]
    fn literal_braces() {
        let r = route(
            "k:{s}",
            "SELECT '{{x}}' FROM t WHERE s = {s}",
            &[("s", Some("[a-z]+"), None, true)],
        )
        .unwrap();
        assert_eq!(
            sql_for(&r, "k:abc").unwrap(),
            "SELECT '{x}' FROM t WHERE s = 'abc'"
        );
    }
}
