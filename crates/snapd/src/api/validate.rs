//! Checks of what clients send: names, ids, request ids, labels. Each failure is
//! INVALID_ARGUMENT naming the field.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};

/// Longest name.
pub const NAME_MAX: usize = 63;
/// Longest request id.
pub const REQUEST_ID_MAX: usize = 128;
/// Longest label value.
pub const LABEL_VALUE_MAX: usize = 256;
/// Most labels on one object.
pub const LABELS_MAX: usize = 64;

/// Checks a VM, snapshot or disk name: 1 to 63 characters of `[A-Za-z0-9._-]`, not starting
/// with `.` or `-`.
///
/// # Errors
/// INVALID_ARGUMENT naming `field` and what is wrong.
pub fn check_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if name.len() > NAME_MAX {
        return Err(Error::invalid(
            field,
            format!("{} characters, at most {NAME_MAX} allowed", name.len()),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::invalid(
            field,
            format!("{name:?} contains {c:?}; use only letters, digits, '.', '_' and '-'"),
        ));
    }
    if name.starts_with(['.', '-']) {
        return Err(Error::invalid(
            field,
            format!("{name:?} must not start with '.' or '-'"),
        ));
    }
    Ok(())
}

/// Checks a request id: 1 to 128 printable ASCII characters.
///
/// # Errors
/// INVALID_ARGUMENT saying what is wrong.
pub fn check_request_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(
            "request_id",
            "must be set: a client-chosen id, unique per intended action, so that a retry does nothing twice",
        ));
    }
    if id.len() > REQUEST_ID_MAX || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(
            "request_id",
            format!("must be 1 to {REQUEST_ID_MAX} printable ASCII characters without spaces"),
        ));
    }
    Ok(())
}

/// Checks labels and returns them ordered.
///
/// # Errors
/// INVALID_ARGUMENT naming the bad key or value.
pub fn check_labels(
    field: &str,
    labels: &HashMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    if labels.len() > LABELS_MAX {
        return Err(Error::invalid(
            field,
            format!("{} labels, at most {LABELS_MAX} allowed", labels.len()),
        ));
    }
    for (k, v) in labels {
        check_name(&format!("{field} key"), k)?;
        if v.len() > LABEL_VALUE_MAX || v.chars().any(char::is_control) {
            return Err(Error::invalid(
                &format!("{field}[{k}]"),
                format!(
                    "value must be at most {LABEL_VALUE_MAX} characters without control characters"
                ),
            ));
        }
    }
    Ok(labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Parses an id argument: 32 lowercase hex digits.
///
/// # Errors
/// INVALID_ARGUMENT naming `field` (the value is shown cut short).
pub fn parse_id<T: std::str::FromStr>(field: &str, id: &str) -> Result<T> {
    let ok = id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let parsed = if ok { id.parse().ok() } else { None };
    parsed.ok_or_else(|| {
        let shown: String = id.chars().take(40).collect();
        let more = if id.chars().count() > 40 { "..." } else { "" };
        Error::invalid(
            field,
            format!("{shown:?}{more} is not an id (32 lowercase hex digits)"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "vm-1", "A.b_c", &"x".repeat(63)] {
            check_name("name", ok).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("a/b", "'/'"),
            ("../x", "'/'"),
            (".hidden", "start"),
            ("-x", "start"),
            ("a b", "' '"),
            (&"x".repeat(64), "at most 63"),
        ] {
            let e = check_name("name", bad).unwrap_err();
            assert_eq!(e.kind, crate::error::ErrorKind::InvalidArgument);
            assert!(e.message.contains(why), "{bad:?}: {}", e.message);
        }
    }

    #[test]
    fn request_ids_and_ids() {
        check_request_id("retry-1").unwrap();
        assert!(check_request_id("").is_err());
        assert!(check_request_id("a b").is_err());
        assert!(check_request_id(&"r".repeat(129)).is_err());
        parse_id::<crate::ids::VmId>("vm_id", &"0123456789abcdef".repeat(2)).unwrap();
        assert!(parse_id::<crate::ids::VmId>("vm_id", "nope").is_err());
        assert!(parse_id::<crate::ids::VmId>("vm_id", &"0123456789ABCDEF".repeat(2)).is_err());
        let long = parse_id::<crate::ids::VmId>("vm_id", &"x".repeat(3 << 20)).unwrap_err();
        assert!(long.message.len() < 200, "a huge id is not echoed whole");
    }
}
