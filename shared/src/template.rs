//! Job templates: a job spec with `{{parameter}}` placeholders in its string values, and the
//! parameters a job made from it must give.
//!
//! Owns the template document, its validation (every placeholder declared, every declared
//! parameter used) and rendering (a spec with the values put in, as JSON; the caller then
//! creates it like any hand-written job, so a rendered spec meets exactly the same checks).
//! Placeholders are substituted inside string values only, never in the document's text,
//! so a value cannot change the spec's structure. No I/O.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::SpecError;

/// Longest template name.
const MAX_NAME: usize = 128;
/// Most parameters a template declares.
const MAX_PARAMETERS: usize = 64;
/// Longest parameter value.
const MAX_VALUE: usize = 4096;

/// A job template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Its name (`fw-update`): 1-128 letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The parameters a job made from it gives.
    #[serde(default)]
    pub parameters: Vec<Parameter>,
    /// The job spec, with `{{name}}` placeholders in string values.
    pub spec: Value,
}

/// One parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parameter {
    /// Its name: a letter or `_`, then letters, digits and `_`.
    pub name: String,
    /// What it means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The value when a job gives none; without a default the parameter is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> SpecError {
    SpecError::new(field, problem)
}

/// The placeholders in `text`, in order, or what is wrong with one.
fn placeholders(text: &str) -> Result<Vec<&str>, String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| "a \"{{\" without its \"}}\"".to_owned())?;
        let name = after[..end].trim();
        if !is_parameter_name(name) {
            return Err(format!("{{{{{name}}}}} is not a parameter name"));
        }
        found.push(name);
        rest = &after[end + 2..];
    }
    Ok(found)
}

fn is_parameter_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 64
}

/// Every string value of `v` with its dotted path.
fn strings<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::String(s) => out.push((path, s)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                strings(item, p, out);
            }
        }
        _ => {}
    }
}

impl Template {
    /// Parses and checks a template document (JSON or TOML: `name`, `description`,
    /// `[[parameters]]`, `[spec]`), naming the field at fault.
    ///
    /// # Errors
    /// The document does not parse, has a field of the wrong type or an unknown one, or
    /// fails [`Self::validate`].
    pub fn parse(text: &str, format: crate::job::SpecFormat) -> Result<Self, SpecError> {
        let value = crate::job::document_value(text, format)?;
        let template: Self = serde_path_to_error::deserialize(&value).map_err(|e| {
            let path = e.path().to_string();
            err(
                if path == "." { ".".into() } else { path },
                e.into_inner().to_string(),
            )
        })?;
        template.validate()?;
        Ok(template)
    }

    /// Checks the template: its name, its parameters, and that the spec's placeholders and
    /// the declared parameters are the same set.
    ///
    /// # Errors
    /// The field at fault (`name`, `parameters[1].name`, `spec.action.version`...).
    pub fn validate(&self) -> Result<(), SpecError> {
        crate::device::validate_id(&self.name).map_err(|p| err("name", p))?;
        if self.name.len() > MAX_NAME {
            return Err(err("name", format!("at most {MAX_NAME} characters")));
        }
        if !self.spec.is_object() {
            return Err(err("spec", "must be a job spec (a table or object)"));
        }
        if self.parameters.len() > MAX_PARAMETERS {
            return Err(err(
                "parameters",
                format!(
                    "{} parameters; at most {MAX_PARAMETERS}",
                    self.parameters.len()
                ),
            ));
        }
        let mut declared = BTreeSet::new();
        for (i, p) in self.parameters.iter().enumerate() {
            if !is_parameter_name(&p.name) {
                return Err(err(
                    format!("parameters[{i}].name"),
                    format!(
                        "{:?}: a letter or _, then letters, digits and _ (at most 64)",
                        p.name
                    ),
                ));
            }
            if !declared.insert(p.name.as_str()) {
                return Err(err(
                    format!("parameters[{i}].name"),
                    format!("{:?} is declared twice", p.name),
                ));
            }
        }
        let mut used = BTreeSet::new();
        let mut texts = Vec::new();
        strings(&self.spec, "spec".into(), &mut texts);
        for (path, text) in texts {
            for name in placeholders(text).map_err(|p| err(path.clone(), p))? {
                if !declared.contains(name) {
                    return Err(err(
                        path,
                        format!("{{{{{name}}}}} is not a declared parameter"),
                    ));
                }
                used.insert(name);
            }
        }
        if let Some((i, p)) = self
            .parameters
            .iter()
            .enumerate()
            .find(|(_, p)| !used.contains(p.name.as_str()))
        {
            return Err(err(
                format!("parameters[{i}]"),
                format!("{:?} is never used in spec", p.name),
            ));
        }
        Ok(())
    }

    /// The spec with `given` values (and defaults) put in place of the placeholders.
    ///
    /// # Errors
    /// `parameters.<name>`: a parameter the template does not declare, a required one not
    /// given, or a value too long.
    pub fn render(&self, given: &BTreeMap<String, String>) -> Result<Value, SpecError> {
        let names: Vec<&str> = self.parameters.iter().map(|p| p.name.as_str()).collect();
        if let Some(unknown) = given.keys().find(|k| !names.contains(&k.as_str())) {
            return Err(err(
                format!("parameters.{unknown}"),
                format!(
                    "template {} has no such parameter (it has: {})",
                    self.name,
                    names.join(", ")
                ),
            ));
        }
        let mut values = BTreeMap::new();
        for p in &self.parameters {
            let value = given.get(&p.name).or(p.default.as_ref()).ok_or_else(|| {
                err(
                    format!("parameters.{}", p.name),
                    format!("required by template {} and not given", self.name),
                )
            })?;
            if value.len() > MAX_VALUE {
                return Err(err(
                    format!("parameters.{}", p.name),
                    format!("{} bytes; at most {MAX_VALUE}", value.len()),
                ));
            }
            values.insert(p.name.as_str(), value.as_str());
        }
        let mut spec = self.spec.clone();
        substitute(&mut spec, &values);
        Ok(spec)
    }
}

fn substitute(v: &mut Value, values: &BTreeMap<&str, &str>) {
    match v {
        Value::String(s) if s.contains("{{") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("{{") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let Some(end) = after.find("}}") else {
                    // Unclosed (validation refuses these): kept as written.
                    out.push_str(&rest[start..]);
                    rest = "";
                    break;
                };
                let name = after[..end].trim();
                out.push_str(values.get(name).copied().unwrap_or_default());
                rest = &after[end + 2..];
            }
            out.push_str(rest);
            *s = out;
        }
        Value::Array(items) => items.iter_mut().for_each(|i| substitute(i, values)),
        Value::Object(map) => map.values_mut().for_each(|i| substitute(i, values)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template() -> Template {
        Template {
            name: "fw-update".into(),
            description: None,
            parameters: vec![
                Parameter {
                    name: "version".into(),
                    description: None,
                    default: None,
                },
                Parameter {
                    name: "group".into(),
                    description: None,
                    default: Some("fleet".into()),
                },
            ],
            spec: json!({
                "name": "firmware {{ version }}",
                "target": {"groups": ["{{group}}"]},
                "action": {"type": "firmware_update", "version": "{{version}}",
                           "url": "https://fw.example.com/{{version}}.bin"}
            }),
        }
    }

    #[test]
    fn rendering_puts_values_and_defaults_in_string_values_only() {
        let t = template();
        t.validate().expect("valid");
        let spec = t
            .render(&BTreeMap::from([("version".into(), "2.1.0\", \"x".into())]))
            .expect("renders");
        assert_eq!(spec["name"], "firmware 2.1.0\", \"x");
        assert_eq!(spec["target"]["groups"], json!(["fleet"]));
        assert_eq!(
            spec["action"]["url"],
            "https://fw.example.com/2.1.0\", \"x.bin"
        );
    }

    #[test]
    fn missing_unknown_and_undeclared_parameters_are_refused_by_name() {
        let t = template();
        let e = t.render(&BTreeMap::new()).expect_err("missing");
        assert_eq!(e.field, "parameters.version", "{e}");
        let e = t
            .render(&BTreeMap::from([
                ("version".into(), "2".into()),
                ("verison".into(), "2".into()),
            ]))
            .expect_err("unknown");
        assert_eq!(e.field, "parameters.verison", "{e}");

        let mut bad = template();
        bad.spec["action"]["sha256"] = json!("{{checksum}}");
        let e = bad.validate().expect_err("undeclared");
        assert_eq!(e.field, "spec.action.sha256", "{e}");
        let mut unused = template();
        unused.parameters.push(Parameter {
            name: "rate".into(),
            description: None,
            default: None,
        });
        assert_eq!(
            unused.validate().expect_err("unused").field,
            "parameters[2]"
        );
        let mut open = template();
        open.spec["name"] = json!("firmware {{version");
        assert_eq!(open.validate().expect_err("open").field, "spec.name");
    }
}
