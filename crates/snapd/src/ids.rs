//! The ids of the things the daemon keeps: one type per kind, so that a VM id cannot be passed
//! where a snapshot id is meant. Each is a random 128-bit [`Id`], written as 32 lowercase hex
//! digits in the API, the catalog and file names.

use std::fmt;
use std::str::FromStr;

use snap_core::Id;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub Id);

        impl $name {
            /// A new random id.
            #[must_use]
            pub fn random() -> Self {
                Self(Id::random())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = snap_core::id::ParseIdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map(Self)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A VM.
    VmId
);
id_type!(
    /// A snapshot.
    SnapshotId
);
id_type!(
    /// A memory or disk layer (the id in the layer file's own header).
    LayerId
);
id_type!(
    /// A long operation.
    OpId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_as_text_and_json() {
        let id = VmId::random();
        assert_eq!(id.to_string().parse::<VmId>().unwrap(), id);
        let json = serde_json::to_string(&vec![id]).unwrap();
        assert_eq!(json, format!("[\"{id}\"]"));
        assert_eq!(serde_json::from_str::<Vec<VmId>>(&json).unwrap(), vec![id]);
        assert!("nope".parse::<SnapshotId>().is_err());
        assert!(serde_json::from_str::<Vec<LayerId>>("[\"nope\"]").is_err());
    }
}
