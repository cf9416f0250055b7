//! Devices as the registry knows them, and the one attribute filter every target selection,
//! listing and count applies.
//!
//! Owns the device record, the rules for device and group ids, and what "matches a filter"
//! means. It never talks to Redis (the coordinator's registry does).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One device as registered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Device {
    /// Unique id.
    pub id: String,
    /// Groups it belongs to.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Model.
    #[serde(default)]
    pub model: String,
    /// Hardware revision.
    #[serde(default)]
    pub hardware_revision: String,
    /// Firmware version.
    #[serde(default)]
    pub firmware_version: String,
    /// Free-form tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// Match on registry attributes. Every given field must match exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttributeFilter {
    /// Device model.
    #[serde(default)]
    pub model: Option<String>,
    /// Hardware revision.
    #[serde(default)]
    pub hardware_revision: Option<String>,
    /// Current firmware version.
    #[serde(default)]
    pub firmware_version: Option<String>,
    /// Tags that must all be present with these values.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

impl AttributeFilter {
    /// Whether the filter names no attribute at all (it then matches every device).
    pub fn is_empty(&self) -> bool {
        self.model.is_none()
            && self.hardware_revision.is_none()
            && self.firmware_version.is_none()
            && self.tags.is_empty()
    }

    /// Whether `device` has every attribute the filter names, with the same value.
    pub fn matches(&self, device: &Device) -> bool {
        let same = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        same(&self.model, &device.model)
            && same(&self.hardware_revision, &device.hardware_revision)
            && same(&self.firmware_version, &device.firmware_version)
            && self
                .tags
                .iter()
                .all(|(k, v)| device.tags.get(k).is_some_and(|have| have == v))
    }
}

/// Device ids, group names and tag keys: 1 to 128 ASCII letters, digits, `-`, `_` and `.`,
/// starting with a letter or digit. Every transport carries these unescaped: no MQTT
/// wildcard or level separator (`+`, `#`, `/`), no `$` (broker topics), no `:` or braces
/// (storage key separators and hash tags), no spaces, commas or control characters.
/// A MAC address is written with `-` or `.` (`aa-bb-cc-dd-ee-ff`).
///
/// # Errors
/// What is wrong with the id.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > 128 {
        return Err(format!("{} characters; at most 128", id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{id:?} contains {c:?}; use ASCII letters, digits, '-', '_' and '.'"
        ));
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("{id:?} must start with a letter or digit"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        Device {
            id: "dev-1".into(),
            groups: vec!["eu".into()],
            model: "gw-100".into(),
            hardware_revision: "B".into(),
            firmware_version: "1.0".into(),
            tags: BTreeMap::from([("site".into(), "berlin".into())]),
        }
    }

    #[test]
    fn a_filter_matches_only_when_every_named_attribute_matches() {
        let d = device();
        assert!(AttributeFilter::default().matches(&d));
        let f = |model: Option<&str>, tag: Option<(&str, &str)>| AttributeFilter {
            model: model.map(Into::into),
            tags: tag
                .map(|(k, v)| BTreeMap::from([(k.to_owned(), v.to_owned())]))
                .unwrap_or_default(),
            ..AttributeFilter::default()
        };
        assert!(f(Some("gw-100"), None).matches(&d));
        assert!(!f(Some("gw-200"), None).matches(&d));
        assert!(f(Some("gw-100"), Some(("site", "berlin"))).matches(&d));
        assert!(!f(None, Some(("site", "paris"))).matches(&d));
        assert!(!f(None, Some(("rack", "berlin"))).matches(&d));
        let hw = AttributeFilter {
            hardware_revision: Some("C".into()),
            ..AttributeFilter::default()
        };
        assert!(!hw.matches(&d));
        assert!(!hw.is_empty());
    }

    #[test]
    fn ids_are_letters_digits_dashes_underscores_and_dots_that_every_transport_carries() {
        for ok in ["dev-0000001", "eu_west.2", "A1", "aa-bb-cc-dd-ee-ff"] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "a b", "a,b", "$SYS", "a+b", "a#", "a/b", "*", "{x}", "a:b", ".hidden", "-x", "é",
            "a\nb",
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_id(&"x".repeat(128)).is_ok());
        assert!(validate_id(&"x".repeat(129)).is_err());
    }
}
