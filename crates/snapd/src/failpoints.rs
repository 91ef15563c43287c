//! Failure injection for tests of the atomic protocol: `SNAPD_FAILPOINTS` holds a
//! comma-separated list of `name=fail:N` (the next N passes through `name` fail) and
//! `name=sleep:MS` (each pass sleeps MS milliseconds, so a test can kill the daemon there).
//!
//! Points: `snapshot.seal-disk` (after the disks are sealed), `snapshot.write-memory` (before
//! the memory layer is written), `snapshot.write-state` (after it), `snapshot.before-publish`
//! (just before the catalog transaction), `snapshot.publish` (inside it, before its commit) and
//! `snapshot.after-publish` (a sleep point after it);
//! `restore.before-publish` (a restore or clone, its VMs built, before the transaction that
//! records them), `delete.before-commit` (a delete, admitted, before its transaction) and
//! `filling.layer` (the background filler, before it fills a disk layer restored lazily from a
//! remote: a failure leaves the layer for the next round).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
enum Action {
    Fail(u64),
    SleepMs(u64),
}

/// The configured failure points.
#[derive(Debug, Default)]
pub struct FailPoints {
    points: Mutex<HashMap<String, Action>>,
}

impl FailPoints {
    /// Parses `spec` (the `SNAPD_FAILPOINTS` syntax).
    ///
    /// # Errors
    /// A message naming the entry that does not parse.
    pub fn parse(spec: &str) -> std::result::Result<Self, String> {
        let mut points = HashMap::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || format!("failpoint {entry:?}: expected name=fail:N or name=sleep:MS");
            let (name, action) = entry.split_once('=').ok_or_else(bad)?;
            let (kind, n) = action.split_once(':').ok_or_else(bad)?;
            let n: u64 = n.parse().map_err(|_| bad())?;
            let action = match kind {
                "fail" => Action::Fail(n),
                "sleep" => Action::SleepMs(n),
                _ => return Err(bad()),
            };
            points.insert(name.to_string(), action);
        }
        Ok(Self {
            points: Mutex::new(points),
        })
    }

    /// From the environment (none configured if `SNAPD_FAILPOINTS` is unset).
    ///
    /// # Errors
    /// As [`FailPoints::parse`].
    pub fn from_env() -> std::result::Result<Self, String> {
        Self::parse(&std::env::var("SNAPD_FAILPOINTS").unwrap_or_default())
    }

    /// Passes point `name`: fails or sleeps if so configured.
    ///
    /// # Errors
    /// INTERNAL "injected failure at <name>".
    pub fn pass(&self, name: &str) -> Result<()> {
        let action = {
            let mut points = self.points.lock().unwrap_or_else(|e| e.into_inner());
            match points.get_mut(name) {
                Some(Action::Fail(n)) if *n > 0 => {
                    *n -= 1;
                    Some(Action::Fail(1))
                }
                Some(a @ Action::SleepMs(_)) => Some(*a),
                _ => None,
            }
        };
        match action {
            Some(Action::Fail(_)) => Err(Error::internal(format!("injected failure at {name}"))),
            Some(Action::SleepMs(ms)) => {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(())
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_counts_down() {
        let f = FailPoints::parse("a=fail:2, b=sleep:1").unwrap();
        assert!(f.pass("a").is_err());
        assert!(f.pass("a").is_err());
        assert!(f.pass("a").is_ok());
        assert!(f.pass("b").is_ok());
        assert!(f.pass("c").is_ok());
        assert!(FailPoints::parse("a=explode:1").is_err());
        assert!(FailPoints::parse("a").is_err());
    }
}
