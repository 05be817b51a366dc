//! Row encoding: an array of objects keyed by column name, in TDengine's row
//! order, as JSON (what Python's `orjson.loads` reads) or MessagePack.
//!
//! Timestamps are epoch milliseconds (integers) whatever the database
//! precision; integers stay integers, floats are floats (`FLOAT` columns keep
//! their shortest decimal form), strings are strings, NULL is `null`/nil.
//! Binary columns (VARBINARY, GEOMETRY) are lowercase hex strings in JSON and
//! `bin` in MessagePack; JSON tags and DECIMAL are strings.

use crate::config::TdFormat;

/// One decoded cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
}

/// Rows as returned by TDengine: column names plus row-major cells.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

pub fn encode(rows: &Rows, format: TdFormat) -> Vec<u8> {
    match format {
        TdFormat::Json => to_json(rows),
        TdFormat::Msgpack => to_msgpack(rows),
    }
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's string escaping; writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn to_json(rows: &Rows) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::with_capacity(64 + rows.rows.len() * rows.columns.len() * 16);
    out.push(b'[');
    for (ri, row) in rows.rows.iter().enumerate() {
        if ri > 0 {
            out.push(b',');
        }
        out.push(b'{');
        for (ci, (name, cell)) in rows.columns.iter().zip(row).enumerate() {
            if ci > 0 {
                out.push(b',');
            }
            json_str(&mut out, name);
            out.push(b':');
            let _ = match cell {
                Cell::Null => out.write_all(b"null"),
                Cell::Bool(b) => out.write_all(if *b { b"true" } else { b"false" }),
                Cell::Int(i) => write!(out, "{i}"),
                Cell::UInt(u) => write!(out, "{u}"),
                Cell::Float(f) if f.is_finite() => {
                    // serde_json prints the shortest round-trip form, always with a '.' or exponent.
                    serde_json::to_writer(&mut out, f).map_err(std::io::Error::other)
                }
                Cell::Float(_) => out.write_all(b"null"),
                Cell::Str(s) => {
                    json_str(&mut out, s);
                    Ok(())
                }
                Cell::Bin(b) => {
                    out.push(b'"');
                    for byte in b {
                        let _ = write!(out, "{byte:02x}");
                    }
                    out.push(b'"');
                    Ok(())
                }
            };
        }
        out.push(b'}');
    }
    out.push(b']');
    out
}

fn to_msgpack(rows: &Rows) -> Vec<u8> {
    use rmpv::Value;
    let array = rows
        .rows
        .iter()
        .map(|row| {
            Value::Map(
                rows.columns
                    .iter()
                    .zip(row)
                    .map(|(name, cell)| {
                        let v = match cell {
                            Cell::Null => Value::Nil,
                            Cell::Bool(b) => Value::Boolean(*b),
                            Cell::Int(i) => Value::from(*i),
                            Cell::UInt(u) => Value::from(*u),
                            Cell::Float(f) => Value::F64(*f),
                            Cell::Str(s) => Value::from(s.as_str()),
                            Cell::Bin(b) => Value::Binary(b.clone()),
                        };
                        (Value::from(name.as_str()), v)
                    })
                    .collect(),
            )
        })
        .collect();
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &Value::Array(array));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Rows {
        Rows {
            columns: vec![
                "ts".into(),
                "close".into(),
                "volume".into(),
                "name".into(),
                "ok".into(),
            ],
            rows: vec![
                vec![
                    Cell::Int(1_700_000_000_000),
                    Cell::Float(1.5),
                    Cell::Int(42),
                    Cell::Str("a\"b".into()),
                    Cell::Bool(true),
                ],
                vec![
                    Cell::Int(1),
                    Cell::Float(f64::NAN),
                    Cell::Null,
                    Cell::Str("é".into()),
                    Cell::Bool(false),
                ],
            ],
        }
    }

    #[test]
    fn json_shape() {
        let s = String::from_utf8(encode(&sample(), TdFormat::Json)).unwrap();
        assert_eq!(
            s,
            r#"[{"ts":1700000000000,"close":1.5,"volume":42,"name":"a\"b","ok":true},{"ts":1,"close":null,"volume":null,"name":"é","ok":false}]"#
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v[0]["ts"], 1_700_000_000_000i64);
        assert_eq!(encode(&Rows::default(), TdFormat::Json), b"[]");
    }

    #[test]
    fn msgpack_shape() {
        let bytes = encode(&sample(), TdFormat::Msgpack);
        let v = rmpv::decode::read_value(&mut &bytes[..]).unwrap();
        let rows = v.as_array().unwrap();
        assert_eq!(rows.len(), 2);
        let first = rows[0].as_map().unwrap();
        assert_eq!(first[0].0.as_str(), Some("ts"));
        assert_eq!(first[0].1.as_i64(), Some(1_700_000_000_000));
        assert_eq!(first[1].1.as_f64(), Some(1.5));
        assert!(rows[1].as_map().unwrap()[2].1.is_nil());
    }
}
