//! Deployment artefacts agree with the binary: the Helm chart (helm/nearcache), the
//! Compose stack (docker-compose.yml) and their nearcache configurations.
//!
//! There is no helm binary here, so this file carries a small renderer for the subset of
//! Go templates + Sprig the chart uses (`if/else if/else`, `range`, `with`, `define`,
//! `include`, variables, pipelines, parentheses and the functions in [`Renderer::call`]).
//! Anything outside that subset fails the test loudly instead of being skipped, so a
//! template change that the renderer does not understand is noticed, not silently passed.
//!
//! What is checked:
//! * Chart.yaml and values.yaml parse; every template renders to valid YAML with the
//!   default values and with every optional feature enabled;
//! * the sidecar's arguments only use flags `nearcache --help` lists, it listens on
//!   127.0.0.1:6379, its probes and container port are the admin port of its arguments,
//!   and its security context is the hardened one;
//! * the same sidecar renders from an application chart's context (values under `nearcache:`);
//! * every key of the ConfigMap's TOML exists in conf/nearcache.toml and the rendered file
//!   passes `nearcache --check-config`;
//! * the Compose nearcache service publishes the ports its arguments bind, mounts the file
//!   its `--config` names, and deploy/nearcache.compose.toml passes `--check-config`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::{Mapping, Value};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn path(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn yaml(text: &str, what: &str) -> Value {
    serde_yaml_ng::from_str(text)
        .unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}\n---\n{text}"))
}

// ---------------------------------------------------------------------------
// A Go-template subset renderer.

#[derive(Debug, Clone)]
enum Tok {
    Str(String),
    Num(i64),
    Ident(String),
    /// `$name.f.g` ("" for `$`).
    Var(String, Vec<String>),
    /// `.f.g` (empty for `.`).
    Field(Vec<String>),
    LParen,
    RParen,
    Pipe,
}

#[derive(Debug, Clone)]
enum Operand {
    Lit(Value),
    Var(String, Vec<String>),
    Field(Vec<String>),
    Func(String),
    Sub(Pipeline),
}

type Command_ = Vec<Operand>;
type Pipeline = Vec<Command_>;

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Out(Pipeline),
    Assign(String, Pipeline),
    If(Vec<(Pipeline, Vec<Node>)>, Vec<Node>),
    Range(Option<String>, Option<String>, Pipeline, Vec<Node>),
    With(Pipeline, Vec<Node>),
}

fn lex_expr(src: &str) -> Vec<Tok> {
    let b: Vec<char> = src.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let read_path = |i: &mut usize| {
        let mut fields = Vec::new();
        while *i < b.len() && b[*i] == '.' {
            *i += 1;
            let s = *i;
            while *i < b.len() && ident(b[*i]) {
                *i += 1;
            }
            if *i > s {
                fields.push(b[s..*i].iter().collect::<String>());
            }
        }
        fields
    };
    while i < b.len() {
        let c = b[i];
        match c {
            ' ' | '\t' | '\n' => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1
            }
            '|' => {
                out.push(Tok::Pipe);
                i += 1
            }
            '"' => {
                let mut s = String::new();
                i += 1;
                while b[i] != '"' {
                    if b[i] == '\\' {
                        i += 1;
                        s.push(match b[i] {
                            'n' => '\n',
                            't' => '\t',
                            c => c,
                        });
                    } else {
                        s.push(b[i]);
                    }
                    i += 1;
                }
                i += 1;
                out.push(Tok::Str(s));
            }
            '$' => {
                i += 1;
                let s = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                let name: String = b[s..i].iter().collect();
                out.push(Tok::Var(name, read_path(&mut i)));
            }
            '.' => out.push(Tok::Field(read_path(&mut i))),
            c if c.is_ascii_digit() || c == '-' => {
                let s = i;
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let n: String = b[s..i].iter().collect();
                out.push(Tok::Num(
                    n.parse()
                        .unwrap_or_else(|_| panic!("bad number {n:?} in {src:?}")),
                ));
            }
            c if ident(c) => {
                let s = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                out.push(Tok::Ident(b[s..i].iter().collect()));
            }
            other => panic!("template renderer: unsupported character {other:?} in {{{{{src}}}}}"),
        }
    }
    out
}

fn parse_pipeline(toks: &[Tok], pos: &mut usize) -> Pipeline {
    let mut pipe = vec![Vec::new()];
    while *pos < toks.len() {
        let t = toks[*pos].clone();
        *pos += 1;
        let op = match t {
            Tok::RParen => {
                *pos -= 1;
                break;
            }
            Tok::Pipe => {
                pipe.push(Vec::new());
                continue;
            }
            Tok::LParen => {
                let sub = parse_pipeline(toks, pos);
                assert!(
                    matches!(toks.get(*pos), Some(Tok::RParen)),
                    "unbalanced parentheses"
                );
                *pos += 1;
                Operand::Sub(sub)
            }
            Tok::Str(s) => Operand::Lit(Value::String(s)),
            Tok::Num(n) => Operand::Lit(Value::Number(n.into())),
            Tok::Ident(id) => match id.as_str() {
                "true" => Operand::Lit(Value::Bool(true)),
                "false" => Operand::Lit(Value::Bool(false)),
                "nil" => Operand::Lit(Value::Null),
                _ => Operand::Func(id),
            },
            Tok::Var(n, f) => Operand::Var(n, f),
            Tok::Field(f) => Operand::Field(f),
        };
        pipe.last_mut().unwrap().push(op);
    }
    assert!(
        pipe.iter().all(|c| !c.is_empty()),
        "empty command in pipeline"
    );
    pipe
}

fn pipeline(src: &str) -> Pipeline {
    let toks = lex_expr(src);
    let mut pos = 0;
    let p = parse_pipeline(&toks, &mut pos);
    assert_eq!(pos, toks.len(), "trailing tokens in {src:?}");
    p
}

/// Splits a template into text and actions, applying the `{{-` / `-}}` trim markers and
/// dropping comments.
fn tokenize(src: &str) -> Vec<(bool, String)> {
    let mut out: Vec<(bool, String)> = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    loop {
        let Some(start) = rest.find("{{") else {
            let mut t = rest.to_string();
            if trim_next {
                t = t.trim_start().to_string();
            }
            out.push((false, t));
            break;
        };
        let mut text = rest[..start].to_string();
        if trim_next {
            text = text.trim_start().to_string();
        }
        let after = &rest[start + 2..];
        let (trim_left, inner_start) = if after.starts_with("- ") {
            (true, 2)
        } else {
            (false, 0)
        };
        if trim_left {
            text = text.trim_end().to_string();
        }
        out.push((false, text));
        let body = &after[inner_start..];
        let (inner, consumed) = if body.trim_start().starts_with("/*") {
            let end = body.find("*/").expect("unterminated comment") + 2;
            let close = body[end..].find("}}").expect("unterminated comment action") + end;
            (None, close)
        } else {
            (
                Some(body[..body.find("}}").expect("unterminated action")].to_string()),
                body.find("}}").unwrap(),
            )
        };
        let raw = &body[..consumed];
        trim_next = raw.ends_with(" -") || raw.ends_with("\t-");
        if let Some(inner) = inner {
            let inner = inner.trim();
            let inner = inner.strip_suffix('-').unwrap_or(inner).trim();
            out.push((true, inner.to_string()));
        }
        rest = &body[consumed + 2..];
    }
    out
}

/// Parses tokens into nodes until an `end`/`else` at this level; returns the terminator.
fn parse_nodes(
    toks: &[(bool, String)],
    pos: &mut usize,
    defines: &mut BTreeMap<String, Vec<Node>>,
) -> (Vec<Node>, Option<String>) {
    let mut nodes = Vec::new();
    while *pos < toks.len() {
        let (action, s) = &toks[*pos];
        *pos += 1;
        if !action {
            if !s.is_empty() {
                nodes.push(Node::Text(s.clone()));
            }
            continue;
        }
        let (word, rest) = s.split_once(' ').unwrap_or((s.as_str(), ""));
        match word {
            "end" => return (nodes, Some("end".into())),
            "else" => return (nodes, Some(s.clone())),
            "define" => {
                let name = rest.trim().trim_matches('"').to_string();
                let (body, term) = parse_nodes(toks, pos, defines);
                assert_eq!(term.as_deref(), Some("end"), "define {name} not closed");
                defines.insert(name, body);
            }
            "if" => {
                let mut branches = Vec::new();
                let mut cond = pipeline(rest);
                let mut otherwise = Vec::new();
                loop {
                    let (body, term) = parse_nodes(toks, pos, defines);
                    let term = term.expect("if not closed");
                    branches.push((cond.clone(), body));
                    if term == "end" {
                        break;
                    } else if let Some(c) = term.strip_prefix("else if ") {
                        cond = pipeline(c);
                    } else {
                        assert_eq!(term, "else", "unsupported {term:?}");
                        let (body, term) = parse_nodes(toks, pos, defines);
                        assert_eq!(term.as_deref(), Some("end"), "if/else not closed");
                        otherwise = body;
                        break;
                    }
                }
                nodes.push(Node::If(branches, otherwise));
            }
            "range" | "with" => {
                let (vars, expr) = match rest.split_once(":=") {
                    Some((vars, expr)) => (Some(vars), expr),
                    None => (None, rest),
                };
                let (body, term) = parse_nodes(toks, pos, defines);
                assert_eq!(
                    term.as_deref(),
                    Some("end"),
                    "{word} with else is not supported by the test renderer"
                );
                if word == "with" {
                    assert!(vars.is_none(), "with $x := is not supported");
                    nodes.push(Node::With(pipeline(expr), body));
                } else {
                    let names: Vec<String> = vars
                        .map(|v| {
                            v.split(',')
                                .map(|n| n.trim().trim_start_matches('$').to_string())
                                .collect()
                        })
                        .unwrap_or_default();
                    let (k, v) = match names.len() {
                        0 => (None, None),
                        1 => (None, Some(names[0].clone())),
                        _ => (Some(names[0].clone()), Some(names[1].clone())),
                    };
                    nodes.push(Node::Range(k, v, pipeline(expr), body));
                }
            }
            _ if s.starts_with('$') && s.contains(":=") => {
                let (var, expr) = s.split_once(":=").unwrap();
                nodes.push(Node::Assign(
                    var.trim().trim_start_matches('$').to_string(),
                    pipeline(expr),
                ));
            }
            "block" | "template" | "break" | "continue" => {
                panic!("template renderer: {word} is not supported")
            }
            _ => nodes.push(Node::Out(pipeline(s))),
        }
    }
    (nodes, None)
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Sequence(s) => !s.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        Value::Tagged(_) => true,
    }
}

fn to_str(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => panic!("template renderer: cannot print {other:?} (Go would print a map/slice)"),
    }
}

fn to_json(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut o = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => o.push_str("\\\""),
                    '\\' => o.push_str("\\\\"),
                    '\n' => o.push_str("\\n"),
                    '\t' => o.push_str("\\t"),
                    '<' | '>' | '&' => o.push_str(&format!("\\u{:04x}", c as u32)),
                    c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
                    c => o.push(c),
                }
            }
            o.push('"');
            o
        }
        Value::Sequence(s) => format!("[{}]", s.iter().map(to_json).collect::<Vec<_>>().join(",")),
        Value::Mapping(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{}:{}", to_json(k), to_json(v)))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Value::Tagged(t) => to_json(&t.value),
    }
}

fn field(v: &Value, name: &str, what: &str) -> Value {
    match v {
        Value::Mapping(m) => m.get(name).cloned().unwrap_or(Value::Null),
        Value::Null => panic!("template error: nil pointer evaluating {what}.{name}"),
        other => panic!("template error: can't evaluate field {name} in {other:?}"),
    }
}

fn indent(n: usize, s: &str) -> String {
    let pad = " ".repeat(n);
    s.split('\n')
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut o = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                o.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                o.push('=');
            }
        }
    }
    o
}

struct Renderer {
    defines: BTreeMap<String, Vec<Node>>,
}

struct Scope {
    dot: Value,
    root: Value,
    vars: Vec<(String, Value)>,
}

impl Renderer {
    /// Loads every `define` of the chart's templates.
    fn new(chart: &Path) -> Renderer {
        let mut defines = BTreeMap::new();
        for entry in std::fs::read_dir(chart.join("templates")).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "tpl") {
                let toks = tokenize(&std::fs::read_to_string(&p).unwrap());
                let mut pos = 0;
                parse_nodes(&toks, &mut pos, &mut defines);
            }
        }
        Renderer { defines }
    }

    fn render_file(&self, text: &str, ctx: &Value) -> String {
        let toks = tokenize(text);
        let mut pos = 0;
        let mut defines = BTreeMap::new();
        let (nodes, term) = parse_nodes(&toks, &mut pos, &mut defines);
        assert!(term.is_none(), "unexpected {term:?} at top level");
        let mut out = String::new();
        let mut scope = Scope {
            dot: ctx.clone(),
            root: ctx.clone(),
            vars: Vec::new(),
        };
        self.exec(&nodes, &mut scope, &mut out);
        out
    }

    fn include(&self, name: &str, ctx: &Value) -> String {
        let nodes = self
            .defines
            .get(name)
            .unwrap_or_else(|| panic!("no template {name:?}"));
        let mut out = String::new();
        let mut scope = Scope {
            dot: ctx.clone(),
            root: ctx.clone(),
            vars: Vec::new(),
        };
        self.exec(nodes, &mut scope, &mut out);
        out
    }

    fn exec(&self, nodes: &[Node], scope: &mut Scope, out: &mut String) {
        let saved = scope.vars.len();
        for node in nodes {
            match node {
                Node::Text(t) => out.push_str(t),
                Node::Out(p) => out.push_str(&to_str(&self.eval(p, scope))),
                Node::Assign(name, p) => {
                    let v = self.eval(p, scope);
                    scope.vars.push((name.clone(), v));
                }
                Node::If(branches, otherwise) => {
                    let body = branches
                        .iter()
                        .find(|(c, _)| truthy(&self.eval(c, scope)))
                        .map(|(_, b)| b)
                        .unwrap_or(otherwise);
                    self.exec(body, scope, out);
                }
                Node::With(p, body) => {
                    let v = self.eval(p, scope);
                    if truthy(&v) {
                        let dot = std::mem::replace(&mut scope.dot, v);
                        self.exec(body, scope, out);
                        scope.dot = dot;
                    }
                }
                Node::Range(kvar, vvar, p, body) => {
                    let items: Vec<(Value, Value)> = match self.eval(p, scope) {
                        Value::Null => Vec::new(),
                        Value::Sequence(s) => s
                            .into_iter()
                            .enumerate()
                            .map(|(i, v)| (Value::Number((i as i64).into()), v))
                            .collect(),
                        Value::Mapping(m) => {
                            let mut kv: Vec<_> = m.into_iter().collect();
                            kv.sort_by_key(|(k, _)| to_str(k));
                            kv
                        }
                        other => panic!("range over {other:?}"),
                    };
                    for (k, v) in items {
                        let n = scope.vars.len();
                        if let Some(kn) = kvar {
                            scope.vars.push((kn.clone(), k));
                        }
                        if let Some(vn) = vvar {
                            scope.vars.push((vn.clone(), v.clone()));
                        }
                        let dot = std::mem::replace(&mut scope.dot, v);
                        self.exec(body, scope, out);
                        scope.dot = dot;
                        scope.vars.truncate(n);
                    }
                }
            }
        }
        scope.vars.truncate(saved);
    }

    fn eval(&self, p: &Pipeline, scope: &Scope) -> Value {
        let mut prev: Option<Value> = None;
        for cmd in p {
            let (head, rest) = cmd.split_first().unwrap();
            let mut args: Vec<Value> = rest.iter().map(|o| self.operand(o, scope)).collect();
            if let Some(v) = prev.take() {
                args.push(v);
            }
            prev = Some(match head {
                Operand::Func(name) => self.call(name, args, scope),
                other => {
                    assert!(
                        args.is_empty(),
                        "arguments given to a non-function {other:?}"
                    );
                    self.operand(other, scope)
                }
            });
        }
        prev.unwrap()
    }

    fn operand(&self, o: &Operand, scope: &Scope) -> Value {
        match o {
            Operand::Lit(v) => v.clone(),
            Operand::Sub(p) => self.eval(p, scope),
            Operand::Func(name) => self.call(name, Vec::new(), scope),
            Operand::Field(fields) => fields
                .iter()
                .fold(scope.dot.clone(), |v, f| field(&v, f, ".")),
            Operand::Var(name, fields) => {
                let base = if name.is_empty() {
                    scope.root.clone()
                } else {
                    scope
                        .vars
                        .iter()
                        .rev()
                        .find(|(n, _)| n == name)
                        .unwrap_or_else(|| panic!("undefined variable ${name}"))
                        .1
                        .clone()
                };
                fields
                    .iter()
                    .fold(base, |v, f| field(&v, f, &format!("${name}")))
            }
        }
    }

    fn call(&self, name: &str, a: Vec<Value>, _scope: &Scope) -> Value {
        let s = |v: &Value| {
            Value::String(
                v.clone()
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| to_str(v)),
            )
        };
        let n = |v: &Value| match v {
            Value::Number(n) => n.as_i64().or(n.as_f64().map(|f| f as i64)).unwrap(),
            Value::String(s) => s.parse().unwrap_or(0),
            Value::Null => 0,
            other => panic!("not a number: {other:?}"),
        };
        let arity = |k: usize| assert_eq!(a.len(), k, "{name} takes {k} arguments, got {a:?}");
        match name {
            "include" => {
                arity(2);
                Value::String(self.include(a[0].as_str().unwrap(), &a[1]))
            }
            "toYaml" => {
                arity(1);
                let y = serde_yaml_ng::to_string(&a[0]).unwrap();
                Value::String(y.trim_end_matches('\n').to_string())
            }
            "fromYaml" => {
                arity(1);
                serde_yaml_ng::from_str(a[0].as_str().unwrap()).unwrap()
            }
            "toJson" => {
                arity(1);
                Value::String(to_json(&a[0]))
            }
            "toString" => {
                arity(1);
                match &a[0] {
                    Value::Null => Value::String("<nil>".into()),
                    v => s(v),
                }
            }
            "quote" => {
                arity(1);
                let q = to_str(&a[0]).replace('\\', "\\\\").replace('"', "\\\"");
                Value::String(format!("\"{q}\""))
            }
            "nindent" | "indent" => {
                arity(2);
                let body = indent(n(&a[0]) as usize, &to_str(&a[1]));
                Value::String(if name == "nindent" {
                    format!("\n{body}")
                } else {
                    body
                })
            }
            "int" => {
                arity(1);
                Value::Number(n(&a[0]).into())
            }
            "default" => {
                arity(2);
                if truthy(&a[1]) {
                    a[1].clone()
                } else {
                    a[0].clone()
                }
            }
            "not" => {
                arity(1);
                Value::Bool(!truthy(&a[0]))
            }
            "and" => a
                .iter()
                .find(|v| !truthy(v))
                .unwrap_or(a.last().unwrap())
                .clone(),
            "or" => a
                .iter()
                .find(|v| truthy(v))
                .unwrap_or(a.last().unwrap())
                .clone(),
            "eq" | "ne" => {
                arity(2);
                Value::Bool((a[0] == a[1]) == (name == "eq"))
            }
            "hasKey" => {
                arity(2);
                Value::Bool(
                    a[0].as_mapping()
                        .is_some_and(|m| m.contains_key(a[1].as_str().unwrap())),
                )
            }
            "contains" => {
                arity(2);
                Value::Bool(to_str(&a[1]).contains(&to_str(&a[0])))
            }
            "trunc" => {
                arity(2);
                Value::String(to_str(&a[1]).chars().take(n(&a[0]) as usize).collect())
            }
            "trimSuffix" => {
                arity(2);
                let v = to_str(&a[1]);
                Value::String(v.strip_suffix(&to_str(&a[0])).unwrap_or(&v).to_string())
            }
            "printf" => {
                let fmt = to_str(&a[0]);
                let mut args = a[1..].iter();
                let mut o = String::new();
                let mut chars = fmt.chars();
                while let Some(c) = chars.next() {
                    if c == '%' {
                        match chars.next() {
                            Some('s') | Some('d') | Some('v') => {
                                o.push_str(&to_str(args.next().expect("printf: missing argument")))
                            }
                            other => panic!("printf verb {other:?} not supported"),
                        }
                    } else {
                        o.push(c);
                    }
                }
                Value::String(o)
            }
            "b64enc" => {
                arity(1);
                Value::String(base64(to_str(&a[0]).as_bytes()))
            }
            "sha256sum" => {
                arity(1);
                // Stand-in: only the shape matters here.
                Value::String(format!("{:064x}", to_str(&a[0]).len()))
            }
            other => panic!(
                "template renderer: function {other:?} is not supported; extend tests/chart.rs"
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Fixtures.

const CHART: &str = "helm/nearcache";

fn values() -> Value {
    yaml(&read(&format!("{CHART}/values.yaml")), "values.yaml")
}

fn chart_meta() -> Value {
    yaml(&read(&format!("{CHART}/Chart.yaml")), "Chart.yaml")
}

fn context(values: Value) -> Value {
    let meta = chart_meta();
    yaml(
        &format!(
            "Release: {{Name: demo, Namespace: apps, Service: Helm}}\nChart: {{Name: {}, Version: {}, AppVersion: {:?}}}\n",
            to_str(&meta["name"]),
            to_str(&meta["version"]),
            to_str(&meta["appVersion"])
        ),
        "context",
    )
    .as_mapping()
    .cloned()
    .map(|mut m| {
        m.insert("Values".into(), values);
        Value::Mapping(m)
    })
    .unwrap()
}

/// Sets `a.b.c` in a values tree (creating maps on the way).
fn set(v: &mut Value, dotted: &str, new: Value) {
    let mut cur = v;
    let parts: Vec<&str> = dotted.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        if cur.get(*p).is_none() {
            cur.as_mapping_mut()
                .unwrap()
                .insert((*p).into(), Value::Mapping(Mapping::new()));
        }
        cur = cur.get_mut(*p).unwrap();
    }
    cur.as_mapping_mut()
        .unwrap()
        .insert(parts[parts.len() - 1].into(), new);
}

/// The values with every optional part switched on, including the Compose kline route.
fn everything_on() -> Value {
    let mut v = values();
    set(&mut v, "example.enabled", true.into());
    set(&mut v, "serviceMonitor.enabled", true.into());
    set(
        &mut v,
        "serviceMonitor.labels",
        yaml("release: kube-prometheus-stack", "labels"),
    );
    set(&mut v, "upstream.password", "s3cret".into());
    set(&mut v, "upstream.tls.existingSecret", "redis-tls".into());
    set(&mut v, "upstream.tls.serverName", "redis.internal".into());
    set(
        &mut v,
        "sidecar.extraEnv",
        yaml("- {name: REDIS_DB, value: \"2\"}", "extraEnv"),
    );
    set(&mut v, "tdengine.enabled", true.into());
    set(
        &mut v,
        "tdengine.dsn",
        "taos+ws://root:taosdata@tdengine:6041/market".into(),
    );
    set(
        &mut v,
        "tdengine.routes",
        yaml(
            r#"
- key: "kline:{symbol}:{freq}"
  sql: "SELECT ts, open, high, low, close, volume FROM kline_{freq} WHERE symbol = {symbol} ORDER BY ts DESC LIMIT 500"
  ttl: 15m
  params:
    symbol: { pattern: "^[0-9A-Za-z.\\-]{1,16}$", quote: true }
    freq: { allow: ["1m", "5m", "15m", "30m", "60m", "1d", "1w"] }
"#,
            "routes",
        ),
    );
    v
}

fn renderer() -> Renderer {
    Renderer::new(&path(CHART))
}

fn templates() -> Vec<(String, String)> {
    let mut out: Vec<_> = std::fs::read_dir(path(&format!("{CHART}/templates")))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn nearcache(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nearcache"))
        .args(args)
        .env_clear()
        .current_dir(ROOT)
        .output()
        .expect("run nearcache")
}

/// Long flags `nearcache --help` documents.
fn cli_flags() -> BTreeSet<String> {
    let out = nearcache(&["--help"]);
    assert!(out.status.success(), "nearcache --help failed");
    let help = String::from_utf8_lossy(&out.stdout);
    let flags: BTreeSet<String> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .collect();
    for f in [
        "--listen",
        "--admin",
        "--config",
        "--upstream",
        "--check-config",
    ] {
        assert!(
            flags.contains(f),
            "{f} missing from nearcache --help:\n{help}"
        );
    }
    flags
}

/// `--flag value` pairs of an argument list (flags without a value map to "").
fn flag_map(args: &[String], known: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        let (flag, value) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        assert!(
            flag.starts_with("--"),
            "argument {a:?} is not a flag (positional arguments are not accepted)"
        );
        assert!(
            known.contains(&flag),
            "{flag} is not a nearcache flag (nearcache --help lists {known:?})"
        );
        let value = value.or_else(|| {
            if it.peek().is_some_and(|n| !n.starts_with("--")) {
                it.next().cloned()
            } else {
                None
            }
        });
        out.insert(flag, value.unwrap_or_default());
    }
    out
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no port in {addr:?}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
        .iter()
        .map(to_str)
        .collect()
}

/// Every key path of a TOML document: arrays of tables as `[]`, route parameter names as `*`.
fn toml_keys(t: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in t {
        let key = if prefix.ends_with(".params") {
            format!("{prefix}.*")
        } else if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) => toml_keys(sub, &key, out),
            toml::Value::Array(items)
                if items.iter().all(|i| i.is_table()) && !items.is_empty() =>
            {
                for i in items {
                    toml_keys(i.as_table().unwrap(), &format!("{key}[]"), out);
                }
            }
            _ => {
                out.insert(key);
            }
        }
    }
}

/// The keys conf/nearcache.toml documents, including its commented-out [tdengine] example.
fn documented_keys() -> BTreeSet<String> {
    let conf = read("conf/nearcache.toml");
    let mut text = String::new();
    let mut in_example = false;
    for line in conf.lines() {
        if line.trim_start().starts_with("# [tdengine]") {
            in_example = true;
        }
        if in_example {
            text.push_str(
                line.trim_start()
                    .trim_start_matches('#')
                    .strip_prefix(' ')
                    .unwrap_or(""),
            );
        } else {
            text.push_str(line);
        }
        text.push('\n');
    }
    let table: toml::Table =
        toml::from_str(&text).expect("conf/nearcache.toml (with the tdengine example) parses");
    let mut keys = BTreeSet::new();
    toml_keys(&table, "", &mut keys);
    for k in [
        "tdengine.dsn",
        "tdengine.routes[].key",
        "tdengine.routes[].params.*",
    ] {
        assert!(
            keys.iter().any(|x| x.starts_with(k)),
            "expected {k} among the documented keys: {keys:?}"
        );
    }
    keys
}

fn check_config(file: &Path) -> std::process::Output {
    nearcache(&["--check-config", "--config", file.to_str().unwrap()])
}

// ---------------------------------------------------------------------------
// Chart tests.

#[test]
fn chart_metadata_and_values_parse() {
    let meta = chart_meta();
    assert_eq!(meta["apiVersion"], Value::from("v2"));
    assert_eq!(
        meta["name"],
        Value::from("nearcache"),
        "the helpers hard-code the chart name"
    );
    assert_eq!(
        to_str(&meta["appVersion"]),
        env!("CARGO_PKG_VERSION"),
        "Chart.yaml appVersion follows the crate version"
    );
    let helpers = read(&format!("{CHART}/templates/_helpers.tpl"));
    assert!(
        helpers.contains(&format!("default \"{}\"", env!("CARGO_PKG_VERSION"))),
        "nearcache.image's default tag follows appVersion"
    );
    let v = values();
    assert_eq!(v["listenPort"], Value::from(6379));
    assert!(v["admin"]["port"].as_u64().is_some());
    // The default policies are the application's key scheme (config::default_policies).
    let patterns: Vec<String> = v["cache"]["policies"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| to_str(&p["pattern"]))
        .collect();
    let expected: Vec<String> = nearcache::config::default_policies()
        .into_iter()
        .map(|p| p.pattern)
        .collect();
    assert_eq!(patterns, expected);
    // Plain-YAML files elsewhere in the chart (no template actions) must parse as they are.
    for (name, text) in templates() {
        if !text.contains("{{") {
            yaml(&text, &name);
        }
    }
}

#[test]
fn every_template_renders_to_yaml() {
    let r = renderer();
    for (label, values) in [
        ("default values", values()),
        ("everything enabled", everything_on()),
    ] {
        let ctx = context(values);
        let mut kinds = BTreeSet::new();
        for (name, text) in templates() {
            let out = r.render_file(&text, &ctx);
            if out.trim().is_empty() {
                continue;
            }
            let doc = yaml(&out, &format!("{name} ({label})"));
            let kind = to_str(&doc["kind"]);
            assert!(
                !kind.is_empty() && doc["apiVersion"].is_string(),
                "{name}: no kind/apiVersion"
            );
            assert!(
                doc["metadata"]["name"].is_string(),
                "{name}: no metadata.name"
            );
            kinds.insert(kind);
        }
        if label == "everything enabled" {
            let want: BTreeSet<String> = [
                "ConfigMap",
                "Secret",
                "Deployment",
                "Service",
                "ServiceMonitor",
            ]
            .map(String::from)
            .into();
            assert_eq!(kinds, want, "{label}");
        } else {
            assert_eq!(kinds, BTreeSet::from(["ConfigMap".to_string()]), "{label}");
        }
    }
}

fn render_sidecar(values: Value) -> Mapping {
    let out = renderer().include("nearcache.sidecar", &context(values));
    let list = yaml(&out, "nearcache.sidecar");
    let items = list
        .as_sequence()
        .expect("nearcache.sidecar renders a list item");
    assert_eq!(
        items.len(),
        1,
        "nearcache.sidecar renders exactly one container"
    );
    items[0].as_mapping().unwrap().clone()
}

fn check_sidecar(c: &Mapping, flags: &BTreeSet<String>) {
    let c = Value::Mapping(c.clone());
    let args = flag_map(&strings(&c["args"]), flags);
    assert_eq!(
        args.get("--listen").map(String::as_str),
        Some("127.0.0.1:6379"),
        "sidecar listen"
    );
    let admin = args.get("--admin").expect("the sidecar sets --admin");
    let admin_port = port_of(admin);
    assert!(
        admin.starts_with("0.0.0.0:") || admin.starts_with("$(POD_IP):"),
        "admin must be reachable by the kubelet: {admin}"
    );
    if admin.contains("$(POD_IP)") {
        let env = c["env"].as_sequence().unwrap();
        let pod_ip = env
            .iter()
            .find(|e| e["name"] == "POD_IP")
            .expect("POD_IP env for $(POD_IP)");
        assert_eq!(
            pod_ip["valueFrom"]["fieldRef"]["fieldPath"],
            Value::from("status.podIP")
        );
    }
    let config = args.get("--config").expect("the sidecar sets --config");
    let mounts = c["volumeMounts"].as_sequence().unwrap();
    let config_mount = mounts
        .iter()
        .find(|m| config.starts_with(&format!("{}/", to_str(&m["mountPath"]))))
        .unwrap_or_else(|| panic!("no volumeMount holds {config}"));
    assert_eq!(config_mount["name"], Value::from("nearcache-config"));

    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        let port = &get["port"];
        let port = if let Some(p) = port.as_u64() {
            p as u16
        } else {
            let name = to_str(port);
            let p = c["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name.as_str());
            p.unwrap_or_else(|| panic!("{probe} names port {name} the container lacks"))
                ["containerPort"]
                .as_u64()
                .unwrap() as u16
        };
        assert_eq!(port, admin_port, "{probe} port vs --admin {admin}");
        let want = if probe == "livenessProbe" {
            "/healthz"
        } else {
            "/readyz"
        };
        assert_eq!(get["path"], Value::from(want), "{probe} path");
    }
    let ports = c["ports"].as_sequence().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p["containerPort"].as_u64() == Some(admin_port as u64)),
        "container ports {ports:?} lack the admin port {admin_port}"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], Value::from(true));
    assert_eq!(sc["runAsUser"], Value::from(10001));
    assert_eq!(sc["readOnlyRootFilesystem"], Value::from(true));
    assert_eq!(sc["allowPrivilegeEscalation"], Value::from(false));
    assert_eq!(
        strings(&sc["capabilities"]["drop"]),
        vec!["ALL".to_string()]
    );
    assert_eq!(sc["seccompProfile"]["type"], Value::from("RuntimeDefault"));
    let res = &c["resources"];
    assert!(
        res["requests"]["memory"].is_string() && res["limits"]["memory"].is_string(),
        "resources: {res:?}"
    );
}

#[test]
fn sidecar_matches_the_cli_and_its_probes() {
    let flags = cli_flags();
    let c = render_sidecar(values());
    check_sidecar(&c, &flags);
    assert!(Value::Mapping(c.clone())["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .all(|e| e["name"] != "REDIS_PASSWORD"));

    // Admin bound to the pod IP via the downward API.
    let mut v = values();
    set(&mut v, "admin.bindPodIP", true.into());
    set(&mut v, "admin.port", 9200.into());
    check_sidecar(&render_sidecar(v), &flags);

    // Secrets: the password comes from a secretKeyRef, to the chart's or an existing Secret.
    let c = Value::Mapping(render_sidecar(everything_on()));
    check_sidecar(c.as_mapping().unwrap(), &flags);
    let env = c["env"].as_sequence().unwrap();
    let pw = env
        .iter()
        .find(|e| e["name"] == "REDIS_PASSWORD")
        .expect("REDIS_PASSWORD");
    assert_eq!(
        pw["valueFrom"]["secretKeyRef"]["name"],
        Value::from("demo-nearcache")
    );
    assert_eq!(
        pw["valueFrom"]["secretKeyRef"]["key"],
        Value::from("redis-password")
    );
    assert!(
        env.iter().any(|e| e["name"] == "REDIS_DB"),
        "extraEnv is appended"
    );
    let mut v = values();
    set(&mut v, "upstream.existingSecret", "app-redis".into());
    set(&mut v, "upstream.existingSecretKey", "password".into());
    let c = Value::Mapping(render_sidecar(v.clone()));
    let pw = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "REDIS_PASSWORD")
        .cloned();
    let pw = pw.expect("REDIS_PASSWORD from existingSecret");
    assert_eq!(
        pw["valueFrom"]["secretKeyRef"]["name"],
        Value::from("app-redis")
    );
    assert_eq!(
        pw["valueFrom"]["secretKeyRef"]["key"],
        Value::from("password")
    );
    // ...and then the chart creates no Secret of its own.
    let secret = renderer().render_file(
        &read(&format!("{CHART}/templates/secret.yaml")),
        &context(v),
    );
    assert!(
        secret.trim().is_empty(),
        "secret.yaml must render nothing with existingSecret:\n{secret}"
    );
}

#[test]
fn sidecar_renders_from_an_application_chart() {
    // An application chart that depends on nearcache: our values live under `nearcache:`.
    let mut app = yaml(
        "replicaCount: 2\nimage: {repository: my/app}\n",
        "app values",
    );
    set(&mut app, "nearcache", values());
    let r = renderer();
    let ctx = context(app);
    let from_app = r.include("nearcache.sidecar", &ctx);
    let own = r.include("nearcache.sidecar", &context(values()));
    assert_eq!(
        from_app, own,
        "the sidecar must not depend on the including chart"
    );
    check_sidecar(
        yaml(&from_app, "sidecar from the app chart")[0]
            .as_mapping()
            .unwrap(),
        &cli_flags(),
    );
    // The volume points at the ConfigMap this chart renders, under the same name.
    let vols = yaml(&r.include("nearcache.volumes", &ctx), "nearcache.volumes");
    let cm = yaml(
        &r.render_file(
            &read(&format!("{CHART}/templates/configmap.yaml")),
            &context(values()),
        ),
        "configmap",
    );
    assert_eq!(vols[0]["name"], Value::from("nearcache-config"));
    assert_eq!(vols[0]["configMap"]["name"], cm["metadata"]["name"]);
    // The example Deployment wires the same pieces together.
    let mut v = values();
    set(&mut v, "example.enabled", true.into());
    let dep = yaml(
        &r.render_file(
            &read(&format!("{CHART}/templates/deployment-example.yaml")),
            &context(v),
        ),
        "example",
    );
    let spec = &dep["spec"]["template"]["spec"];
    let containers = spec["containers"].as_sequence().unwrap();
    assert!(containers.iter().any(|c| c["name"] == "nearcache"));
    assert_eq!(
        spec["volumes"][0]["configMap"]["name"],
        cm["metadata"]["name"]
    );
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > 15,
        "terminationGracePeriodSeconds {grace} must exceed preStop sleep + shutdown_grace"
    );
}

fn rendered_config(values: Value) -> String {
    let cm = renderer().render_file(
        &read(&format!("{CHART}/templates/configmap.yaml")),
        &context(values),
    );
    let cm = yaml(&cm, "configmap.yaml");
    to_str(&cm["data"]["nearcache.toml"])
}

#[test]
fn configmap_keys_exist_and_pass_check_config() {
    let documented = documented_keys();
    let dir = std::env::temp_dir().join(format!("nearcache-chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (label, values) in [("default", values()), ("everything", everything_on())] {
        let text = rendered_config(values);
        let table: toml::Table = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("ConfigMap TOML ({label}) does not parse: {e}\n{text}"));
        let mut keys = BTreeSet::new();
        toml_keys(&table, "", &mut keys);
        let unknown: Vec<_> = keys.difference(&documented).collect();
        assert!(
            unknown.is_empty(),
            "ConfigMap ({label}) renders keys conf/nearcache.toml lacks: {unknown:?}"
        );

        // The policies arrive exactly as in the values (lock:* uncached).
        let cfg = nearcache::Config::from_toml(
            &text.replace("/etc/nearcache-tls/", &format!("{}/", dir.display())),
        );
        if label == "default" {
            let cfg = cfg.unwrap_or_else(|e| panic!("{e}\n{text}"));
            let lock = cfg
                .cache
                .policies
                .iter()
                .find(|p| p.pattern == "lock:*")
                .unwrap();
            assert!(lock.ttl.is_none(), "lock:* must not be cached");
            assert_eq!(cfg.cache.policies.len(), 4);
            let file = dir.join("default.toml");
            std::fs::write(&file, &text).unwrap();
            let out = check_config(&file);
            assert!(
                out.status.success(),
                "nearcache --check-config rejects the chart's ConfigMap: {}\n{text}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            // The TLS files are mounted from a Secret in the pod; stand them in here.
            assert!(
                text.contains("ca_file = \"/etc/nearcache-tls/ca.crt\""),
                "{text}"
            );
            std::fs::write(dir.join("ca.crt"), "test").unwrap();
            let local = text.replace("/etc/nearcache-tls/", &format!("{}/", dir.display()));
            let file = dir.join("everything.toml");
            std::fs::write(&file, &local).unwrap();
            let out = check_config(&file);
            assert!(
                out.status.success(),
                "nearcache --check-config rejects the chart's ConfigMap with TDengine and TLS (if the message is about \
                 [tdengine], the TDengine module may not have landed yet): {}\n{local}",
                String::from_utf8_lossy(&out.stderr)
            );
            let cfg = nearcache::Config::from_toml(&local).unwrap();
            let td = cfg.tdengine.expect("tdengine section rendered");
            assert_eq!(td.routes.len(), 1);
            assert_eq!(td.routes[0].key, "kline:{symbol}:{freq}");
            let symbol = &td.routes[0]
                .params
                .iter()
                .find(|(n, _)| n == "symbol")
                .unwrap()
                .1;
            assert_eq!(
                symbol.pattern.as_deref(),
                Some("^[0-9A-Za-z.\\-]{1,16}$"),
                "escapes survive rendering"
            );
            assert!(symbol.quote);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Compose.

fn compose() -> Value {
    yaml(&read("docker-compose.yml"), "docker-compose.yml")
}

fn compose_args(svc: &Value) -> Vec<String> {
    match &svc["command"] {
        Value::Sequence(_) => strings(&svc["command"]),
        Value::String(s) => s.split_whitespace().map(String::from).collect(),
        Value::Null => vec![
            "--listen".into(),
            "0.0.0.0:6380".into(),
            "--admin".into(),
            "0.0.0.0:9121".into(),
        ],
        other => panic!("unexpected command {other:?}"),
    }
}

#[test]
fn compose_nearcache_ports_agree_with_its_arguments() {
    let c = compose();
    let services = c["services"].as_mapping().unwrap();
    for s in [
        "redis",
        "tdengine",
        "tdengine-init",
        "nearcache",
        "example-client",
    ] {
        assert!(services.contains_key(s), "compose service {s} missing");
    }
    let nc = &c["services"]["nearcache"];
    let args = flag_map(&compose_args(nc), &cli_flags());
    let listen = args.get("--listen").expect("--listen");
    let admin = args.get("--admin").expect("--admin");
    assert!(
        listen.starts_with("0.0.0.0:") && admin.starts_with("0.0.0.0:"),
        "bind all interfaces in a container"
    );
    let container_ports: BTreeSet<u16> = strings(&nc["ports"])
        .iter()
        .map(|p| {
            p.rsplit(':')
                .next()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(
        container_ports,
        BTreeSet::from([port_of(listen), port_of(admin)]),
        "published ports vs arguments"
    );
    let hc = strings(&nc["healthcheck"]["test"]).join(" ");
    assert!(
        hc.contains(&format!("/{}", port_of(admin))) && hc.contains("/readyz"),
        "healthcheck: {hc}"
    );

    // --config names the mounted deploy/nearcache.compose.toml.
    let config = args.get("--config").expect("--config");
    let mount = strings(&nc["volumes"])
        .into_iter()
        .find(|m| m.split(':').nth(1) == Some(config.as_str()))
        .unwrap_or_else(|| panic!("no volume mounts {config}"));
    assert_eq!(
        mount.split(':').next(),
        Some("./deploy/nearcache.compose.toml")
    );

    // Redis publishes keyspace events, so the invalidation feed works.
    let redis_cmd = strings(&c["services"]["redis"]["command"]).join(" ");
    assert!(
        redis_cmd.contains("--notify-keyspace-events KEA"),
        "{redis_cmd}"
    );

    // Every table the route can name exists in the seed SQL.
    let sql = read("deploy/tdengine-init.sql");
    let cfg = nearcache::Config::from_toml(&read("deploy/nearcache.compose.toml"))
        .expect("compose TOML parses");
    assert_eq!(cfg.upstream.url.address(), "redis:6379");
    let td = cfg
        .tdengine
        .expect("compose config has a [tdengine] section");
    let route = td
        .routes
        .iter()
        .find(|r| r.key == "kline:{symbol}:{freq}")
        .expect("kline route");
    let freqs = route
        .params
        .iter()
        .find(|(n, _)| n == "freq")
        .unwrap()
        .1
        .allow
        .clone()
        .unwrap();
    for f in freqs {
        assert!(
            sql.contains(&format!("market.kline_{f} (")),
            "tdengine-init.sql lacks kline_{f}"
        );
    }
}

#[test]
fn compose_config_passes_check_config() {
    let out = check_config(&path("deploy/nearcache.compose.toml"));
    assert!(
        out.status.success(),
        "nearcache --check-config --config deploy/nearcache.compose.toml failed ({}). If this is about [tdengine], \
         the TDengine module may not support this section yet.\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Dashboard and guide.

/// `nearcache_*` names in a text (histogram series reduced to the histogram's name).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("nearcache_") {
        let word_start = rest[..i]
            .chars()
            .last()
            .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
        let tail = &rest[i + "nearcache_".len()..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = format!("nearcache_{}", &tail[..len]);
        if word_start && len > 0 {
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name)
                .to_string();
            out.insert(name);
        }
        rest = &tail[len..];
    }
    out
}

#[test]
fn dashboard_and_guide_use_real_metric_names() {
    let defined = metric_names(&read("src/metrics.rs"));
    assert!(
        defined.contains("nearcache_cache_hits_total") && defined.len() > 20,
        "{defined:?}"
    );
    let dash_text = read("deploy/grafana-dashboard.json");
    let dash = yaml(&dash_text, "deploy/grafana-dashboard.json");
    assert_eq!(dash["uid"], Value::from("nearcache"));
    let vars = dash["templating"]["list"].as_sequence().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "the Prometheus data source is a variable"
    );
    let used = metric_names(&dash_text);
    let unknown: Vec<_> = used.difference(&defined).collect();
    assert!(
        unknown.is_empty(),
        "dashboard uses metrics src/metrics.rs does not define: {unknown:?}"
    );
    let missing: Vec<_> = defined.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "metrics without a dashboard panel: {missing:?}"
    );
    for doc in ["docs/deploy.md", "helm/nearcache/README.md"] {
        let unknown: Vec<_> = metric_names(&read(doc))
            .difference(&defined)
            .cloned()
            .collect();
        assert!(
            unknown.is_empty(),
            "{doc} names metrics src/metrics.rs does not define: {unknown:?}"
        );
    }
}

/// `cargo test --test chart -- --ignored --nocapture` prints what the chart renders with
/// every feature on (a stand-in for `helm template`).
#[test]
#[ignore]
fn print_rendered_chart() {
    let r = renderer();
    let ctx = context(everything_on());
    for (name, text) in templates() {
        let out = r.render_file(&text, &ctx);
        if !out.trim().is_empty() {
            println!(
                "---\n# Source: nearcache/templates/{name}\n{}",
                out.trim_start_matches('\n')
            );
        }
    }
}
