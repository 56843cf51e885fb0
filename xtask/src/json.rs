//! A minimal JSON reader for fio's `--output-format=json` (xtask keeps its dependencies to what it
//! already had: anyhow, clap, bindgen).

use anyhow::{anyhow, bail, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Value>),
    Obj(Vec<(String, Value)>),
}

impl Value {
    /// Member `key` of an object (`None` for other values or a missing key).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Follow a path of object keys and array indices (`"0"`, `"1"`, ...).
    pub fn at(&self, path: &[&str]) -> Option<&Value> {
        let mut v = self;
        for p in path {
            v = match v {
                Value::Arr(a) => a.get(p.parse::<usize>().ok()?)?,
                _ => v.get(p)?,
            };
        }
        Some(v)
    }

    pub fn num(&self) -> Option<f64> {
        match self {
            Value::Num(n) => Some(*n),
            _ => None,
        }
    }
}

pub fn parse(text: &str) -> Result<Value> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let v = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        bail!("trailing data at byte {}", p.i);
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Result<u8> {
        self.ws();
        self.s
            .get(self.i)
            .copied()
            .ok_or_else(|| anyhow!("unexpected end of JSON"))
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        if self.peek()? != c {
            bail!("expected {:?} at byte {}", c as char, self.i);
        }
        self.i += 1;
        Ok(())
    }

    fn literal(&mut self, word: &str, v: Value) -> Result<Value> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            bail!("bad literal at byte {}", self.i)
        }
    }

    fn value(&mut self) -> Result<Value> {
        match self.peek()? {
            b'{' => {
                self.i += 1;
                let mut m = Vec::new();
                if self.peek()? == b'}' {
                    self.i += 1;
                    return Ok(Value::Obj(m));
                }
                loop {
                    let Value::Str(k) = self.string()? else {
                        unreachable!()
                    };
                    self.expect(b':')?;
                    m.push((k, self.value()?));
                    match self.peek()? {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Ok(Value::Obj(m));
                        }
                        c => bail!("unexpected {:?} in object at byte {}", c as char, self.i),
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut a = Vec::new();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Ok(Value::Arr(a));
                }
                loop {
                    a.push(self.value()?);
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Ok(Value::Arr(a));
                        }
                        c => bail!("unexpected {:?} in array at byte {}", c as char, self.i),
                    }
                }
            }
            b'"' => self.string(),
            b't' => self.literal("true", Value::Bool(true)),
            b'f' => self.literal("false", Value::Bool(false)),
            b'n' => self.literal("null", Value::Null),
            _ => self.number(),
        }
    }

    fn string(&mut self) -> Result<Value> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            let c = *self
                .s
                .get(self.i)
                .ok_or_else(|| anyhow!("unterminated string"))?;
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = *self
                        .s
                        .get(self.i)
                        .ok_or_else(|| anyhow!("unterminated escape"))?;
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = self
                                .s
                                .get(self.i..self.i + 4)
                                .ok_or_else(|| anyhow!("short \\u escape"))?;
                            let code = u32::from_str_radix(std::str::from_utf8(hex)?, 16)?;
                            self.i += 4;
                            let ch = char::from_u32(code).unwrap_or('\u{fffd}');
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                c => out.push(c),
            }
        }
        Ok(Value::Str(String::from_utf8_lossy(&out).into_owned()))
    }

    fn number(&mut self) -> Result<Value> {
        let start = self.i;
        while self.i < self.s.len()
            && matches!(
                self.s[self.i],
                b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'
            )
        {
            self.i += 1;
        }
        let t = std::str::from_utf8(&self.s[start..self.i])?;
        t.parse::<f64>()
            .map(Value::Num)
            .map_err(|_| anyhow!("bad number {t:?} at byte {start}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_like_json() {
        let v = parse(
            r#"{ "fio version" : "fio-3.33", "jobs" : [ { "read" : { "iops" : 55751.25,
               "lat_ns" : { "mean" : 1.5e3, "percentile" : { "99.000000" : 1089536 } } },
               "ok" : true, "none" : null, "s" : "a\"b\u00e9", "e" : [] } ] }"#,
        )
        .unwrap();
        assert_eq!(
            v.at(&["jobs", "0", "read", "iops"]).and_then(Value::num),
            Some(55751.25)
        );
        assert_eq!(
            v.at(&["jobs", "0", "read", "lat_ns", "percentile", "99.000000"])
                .and_then(Value::num),
            Some(1089536.0)
        );
        assert_eq!(
            v.at(&["jobs", "0", "s"]),
            Some(&Value::Str("a\"b\u{e9}".into()))
        );
        assert_eq!(v.at(&["jobs", "0", "e"]), Some(&Value::Arr(vec![])));
        assert!(parse("{\"a\": 1} x").is_err());
        assert!(parse("[1, 2").is_err());
    }
}
