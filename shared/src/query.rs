//! Device queries, in the spirit of hawkBit's target filters: conditions on registry
//! attributes joined by `and`, e.g. `firmware_version < 2.1.0 and tags.site in (berlin, paris)`.
//!
//! Owns the query language, its parser (errors name the position and what was expected) and
//! the match of one device. Fields: `id`, `model`, `hardware_revision`, `firmware_version`,
//! `group`, `tags.<key>`. Operators: `=`, `!=`, `<`, `<=`, `>`, `>=` (versions compare as
//! versions: `2.10.0 > 2.9.1`, `2.1.0-rc.1 < 2.1.0`), `in (a, b)`, `prefix`. Values are bare
//! words or `"quoted strings"`. No I/O.

use std::cmp::Ordering;

use crate::device::Device;

/// A parsed query: every condition must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Query(Vec<Condition>);

#[derive(Debug, Clone, PartialEq)]
enum Field {
    Id,
    Model,
    HardwareRevision,
    FirmwareVersion,
    Group,
    Tag(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Prefix,
}

#[derive(Debug, Clone, PartialEq)]
enum Condition {
    Compare(Field, Op, String),
    In(Field, Vec<String>),
}

/// Longest query accepted.
const MAX_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Quoted(String),
    Op(&'static str),
    Open,
    Close,
    Comma,
}

fn tokens(text: &str) -> Result<Vec<(usize, Token)>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at = i + 1;
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push((at, Token::Open));
                i += 1;
            }
            ')' => {
                out.push((at, Token::Close));
                i += 1;
            }
            ',' => {
                out.push((at, Token::Comma));
                i += 1;
            }
            '"' => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|&c| c == '"')
                    .ok_or_else(|| format!("position {at}: a quote without its end"))?;
                out.push((
                    at,
                    Token::Quoted(chars[i + 1..i + 1 + end].iter().collect()),
                ));
                i += end + 2;
            }
            '=' | '!' | '<' | '>' => {
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                let op = match two.as_str() {
                    "!=" => "!=",
                    "<=" => "<=",
                    ">=" => ">=",
                    "==" => "=",
                    _ => match c {
                        '=' => "=",
                        '<' => "<",
                        '>' => ">",
                        _ => return Err(format!("position {at}: \"!\" must be \"!=\"")),
                    },
                };
                i += if two.len() == 2 && matches!(two.as_str(), "!=" | "<=" | ">=" | "==") {
                    2
                } else {
                    1
                };
                out.push((at, Token::Op(op)));
            }
            _ => {
                let start = i;
                while i < chars.len()
                    && !chars[i].is_whitespace()
                    && !matches!(chars[i], '(' | ')' | ',' | '"' | '=' | '!' | '<' | '>')
                {
                    i += 1;
                }
                out.push((at, Token::Word(chars[start..i].iter().collect())));
            }
        }
    }
    Ok(out)
}

fn field(word: &str) -> Option<Field> {
    Some(match word {
        "id" => Field::Id,
        "model" => Field::Model,
        "hardware_revision" => Field::HardwareRevision,
        "firmware_version" => Field::FirmwareVersion,
        "group" => Field::Group,
        _ => {
            let key = word.strip_prefix("tags.")?;
            crate::device::validate_id(key).ok()?;
            Field::Tag(key.to_owned())
        }
    })
}

impl Query {
    /// Parses a query.
    ///
    /// # Errors
    /// Where the query is wrong and what was expected there.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_LEN {
            return Err(format!("{} characters; at most {MAX_LEN}", text.len()));
        }
        let toks = tokens(text)?;
        let mut it = toks.into_iter().peekable();
        let mut conditions = Vec::new();
        let end = text.chars().count() + 1;
        let value = |t: Option<(usize, Token)>| match t {
            Some((_, Token::Word(w) | Token::Quoted(w))) => Ok(w),
            Some((at, t)) => Err(format!("position {at}: expected a value, found {t:?}")),
            None => Err(format!("position {end}: expected a value")),
        };
        loop {
            let (at, f) = match it.next() {
                Some((at, Token::Word(w))) => (at, w),
                Some((at, t)) => {
                    return Err(format!("position {at}: expected a field, found {t:?}"));
                }
                None => return Err(format!("position {end}: expected a condition")),
            };
            let fld = field(&f).ok_or_else(|| {
                format!(
                    "position {at}: unknown field {f:?} (id, model, hardware_revision, firmware_version, group, tags.<key>)"
                )
            })?;
            let condition = match it.next() {
                Some((_, Token::Op(op))) => {
                    let op = match op {
                        "=" => Op::Eq,
                        "!=" => Op::Ne,
                        "<" => Op::Lt,
                        "<=" => Op::Le,
                        ">" => Op::Gt,
                        _ => Op::Ge,
                    };
                    Condition::Compare(fld, op, value(it.next())?)
                }
                Some((_, Token::Word(w))) if w.eq_ignore_ascii_case("prefix") => {
                    Condition::Compare(fld, Op::Prefix, value(it.next())?)
                }
                Some((at, Token::Word(w))) if w.eq_ignore_ascii_case("in") => {
                    if !matches!(it.next(), Some((_, Token::Open))) {
                        return Err(format!("position {at}: \"in\" takes a list: in (a, b)"));
                    }
                    let mut values = vec![value(it.next())?];
                    loop {
                        match it.next() {
                            Some((_, Token::Comma)) => values.push(value(it.next())?),
                            Some((_, Token::Close)) => break,
                            Some((at, t)) => {
                                return Err(format!(
                                    "position {at}: expected \",\" or \")\", found {t:?}"
                                ));
                            }
                            None => return Err(format!("position {end}: expected \")\"")),
                        }
                    }
                    Condition::In(fld, values)
                }
                Some((at, t)) => {
                    return Err(format!(
                        "position {at}: expected an operator (=, !=, <, <=, >, >=, in, prefix), found {t:?}"
                    ));
                }
                None => return Err(format!("position {end}: expected an operator")),
            };
            conditions.push(condition);
            match it.next() {
                None => return Ok(Self(conditions)),
                Some((_, Token::Word(w))) if w.eq_ignore_ascii_case("and") => {}
                Some((at, t)) => {
                    return Err(format!("position {at}: expected \"and\", found {t:?}"));
                }
            }
        }
    }

    /// Whether `device` meets every condition.
    pub fn matches(&self, device: &Device) -> bool {
        self.0.iter().all(|c| c.holds(device))
    }
}

impl Condition {
    fn holds(&self, d: &Device) -> bool {
        match self {
            Condition::In(Field::Group, values) => values.iter().any(|v| d.groups.contains(v)),
            Condition::In(f, values) => {
                value_of(f, d).is_some_and(|have| values.iter().any(|v| v == have))
            }
            Condition::Compare(Field::Group, op, v) => {
                let member = d.groups.contains(v);
                match op {
                    Op::Eq => member,
                    Op::Ne => !member,
                    Op::Prefix => d.groups.iter().any(|g| g.starts_with(v.as_str())),
                    _ => false,
                }
            }
            Condition::Compare(f, op, v) => {
                let Some(have) = value_of(f, d) else {
                    return *op == Op::Ne;
                };
                match op {
                    Op::Eq => have == v,
                    Op::Ne => have != v,
                    Op::Prefix => have.starts_with(v.as_str()),
                    Op::Lt => compare_versions(have, v) == Ordering::Less,
                    Op::Le => compare_versions(have, v) != Ordering::Greater,
                    Op::Gt => compare_versions(have, v) == Ordering::Greater,
                    Op::Ge => compare_versions(have, v) != Ordering::Less,
                }
            }
        }
    }
}

fn value_of<'a>(f: &Field, d: &'a Device) -> Option<&'a str> {
    match f {
        Field::Id => Some(&d.id),
        Field::Model => Some(&d.model),
        Field::HardwareRevision => Some(&d.hardware_revision),
        Field::FirmwareVersion => Some(&d.firmware_version),
        Field::Tag(k) => d.tags.get(k).map(String::as_str),
        Field::Group => None,
    }
}

/// Orders two versions: as semantic versions when both are (`2.1.0-rc.1 < 2.1.0`), else part
/// by part (`.`-separated, numbers as numbers, missing parts as 0: `2.1 = 2.1.0`, `2.10 > 2.9`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    if let (Ok(x), Ok(y)) = (semver::Version::parse(a), semver::Version::parse(b)) {
        return x.cmp(&y);
    }
    let parts = |s: &str| -> Vec<String> { s.split(['.', '-', '+']).map(str::to_owned).collect() };
    let (pa, pb) = (parts(a), parts(b));
    for i in 0..pa.len().max(pb.len()) {
        let x = pa.get(i).map_or("0", String::as_str);
        let y = pb.get(i).map_or("0", String::as_str);
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(fw: &str, groups: &[&str], tags: &[(&str, &str)]) -> Device {
        Device {
            id: "dev-0000042".into(),
            groups: groups.iter().map(|g| (*g).into()).collect(),
            model: "gw-100".into(),
            hardware_revision: "B".into(),
            firmware_version: fw.into(),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    fn q(text: &str) -> Query {
        Query::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn versions_compare_as_versions() {
        assert_eq!(compare_versions("2.10.0", "2.9.1"), Ordering::Greater);
        assert_eq!(compare_versions("2.1.0-rc.1", "2.1.0"), Ordering::Less);
        assert_eq!(compare_versions("2.1", "2.1.0"), Ordering::Equal);
        assert_eq!(compare_versions("1.3", "1.10"), Ordering::Less);
    }

    #[test]
    fn conditions_on_every_field_and_operator() {
        let d = device("1.3.0", &["fleet", "eu-west"], &[("site", "berlin")]);
        assert!(q("firmware_version < 2.1.0").matches(&d));
        assert!(!q("firmware_version >= 2.1.0").matches(&d));
        assert!(q("firmware_version<=1.3.0 and model = gw-100").matches(&d));
        assert!(q("group = eu-west and group != canary").matches(&d));
        assert!(q("tags.site in (paris, berlin) and id prefix dev-00").matches(&d));
        assert!(q("tags.rack != 4").matches(&d), "an absent tag is not 4");
        assert!(!q("tags.rack = 4").matches(&d));
        assert!(q("hardware_revision in (A, B) AND model == \"gw-100\"").matches(&d));
        assert!(!q("group in (us-east, canary)").matches(&d));
    }

    #[test]
    fn mistakes_are_refused_with_their_position() {
        for (text, want) in [
            ("firmware < ", "unknown field \"firmware\""),
            ("firmware_version ~ 2", "position 18: expected an operator"),
            ("model = gw or model = x", "position 12: expected \"and\""),
            ("tags.site in berlin", "\"in\" takes a list"),
            ("model = \"gw", "a quote without its end"),
            ("", "expected a condition"),
            ("model =", "expected a value"),
        ] {
            let e = Query::parse(text).expect_err(text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
