//! Chunks: content-addressed, compressed, verified on every read (see the crate docs' layout).

use std::fmt;

use snap_core::FormatSpec;

/// Largest chunk content (a memory frame is at most 2 MiB; disk blocks and state blobs are
/// smaller). A chunk that claims more is refused before anything is allocated for it.
pub const MAX_CHUNK: usize = 4 << 20;

/// The chunk object's file format.
pub const CHUNK: FormatSpec = FormatSpec {
    name: "remote chunk",
    magic: *b"SNAPCHNK",
    version: 1,
    min_version: 1,
    // The codec byte, plus zstd's worst case over MAX_CHUNK (it never needs more than 1/128
    // more, plus a header).
    max_payload: 1 + MAX_CHUNK as u64 + (MAX_CHUNK as u64 >> 7) + 4096,
};

const RAW: u8 = 0;
const ZSTD: u8 = 1;

/// A chunk's name: the BLAKE3 digest of its content.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `content`.
    #[must_use]
    pub fn of(content: &[u8]) -> Self {
        Self(*blake3::hash(content).as_bytes())
    }

    /// The object key of this chunk under `prefix` (no trailing slash).
    #[must_use]
    pub fn key(&self, prefix: &str) -> String {
        let hex = self.to_string();
        format!("{prefix}/v1/chunks/{}/{hex}", &hex[..2])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl std::str::FromStr for ChunkId {
    type Err = ChunkError;

    fn from_str(s: &str) -> Result<Self, ChunkError> {
        let bad = || ChunkError::BadName(s.chars().take(80).collect());
        if s.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

/// Why a chunk cannot be made or used.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The content is larger than a chunk may be.
    #[error("a chunk of {0} bytes: at most {MAX_CHUNK}")]
    TooLarge(usize),
    /// Not a chunk name.
    #[error("{0:?} is not a chunk name (64 hex digits)")]
    BadName(String),
    /// The object is not a well-formed chunk (format, CRC, codec or size).
    #[error("chunk {id}: {problem}")]
    Damaged {
        /// The chunk.
        id: ChunkId,
        /// What is wrong.
        problem: String,
    },
    /// The object is well formed, but holds other bytes than its name says.
    #[error("chunk {id}: its content has digest {found}, not its name: the object was overwritten")]
    WrongContent {
        /// The chunk.
        id: ChunkId,
        /// The digest of what the object holds.
        found: ChunkId,
    },
}

/// Makes the chunk object of `content`: its id and the bytes to store under [`ChunkId::key`],
/// compressed with zstd at `level` unless that saves nothing.
///
/// # Errors
/// [`ChunkError::TooLarge`].
pub fn seal(content: &[u8], level: i32) -> Result<(ChunkId, Vec<u8>), ChunkError> {
    if content.len() > MAX_CHUNK {
        return Err(ChunkError::TooLarge(content.len()));
    }
    let id = ChunkId::of(content);
    let mut payload = Vec::with_capacity(content.len() / 2 + 16);
    payload.push(ZSTD);
    match zstd::bulk::compress(content, level) {
        Ok(z) if z.len() < content.len() => payload.extend_from_slice(&z),
        _ => {
            payload.clear();
            payload.push(RAW);
            payload.extend_from_slice(content);
        }
    }
    Ok((id, CHUNK.encode(&payload)))
}

/// Makes the chunk object of `content` from `zstd`, one zstd frame that decompresses to it (a
/// memory layer's frame, as its layer stores it: nothing is compressed again). The caller
/// vouches for the frame; a reader checks it all the same ([`open`]). Stored as zstd even if
/// no smaller (incompressible data costs a few bytes per 128 KiB), so that a pull can write it
/// back as the layer's frame unchanged.
///
/// # Errors
/// [`ChunkError::TooLarge`].
pub fn seal_compressed(content: &[u8], zstd: &[u8]) -> Result<(ChunkId, Vec<u8>), ChunkError> {
    if content.len() > MAX_CHUNK {
        return Err(ChunkError::TooLarge(content.len()));
    }
    let mut payload = Vec::with_capacity(zstd.len() + 1);
    payload.push(ZSTD);
    payload.extend_from_slice(zstd);
    Ok((ChunkId::of(content), CHUNK.encode(&payload)))
}

/// The content of chunk `id` from its stored `object`, after every check: the format and its
/// CRC, the codec, the size bound, and the content's digest against the name.
///
/// # Errors
/// [`ChunkError::Damaged`] or [`ChunkError::WrongContent`], naming the chunk.
pub fn open(id: &ChunkId, object: &[u8]) -> Result<Vec<u8>, ChunkError> {
    open_parts(id, object).map(|(content, _)| content)
}

/// As [`open`], with the zstd frame the content was stored as (`None` if stored as is): it
/// decompresses to the content, which was checked against the name.
///
/// # Errors
/// As [`open`].
pub fn open_parts(id: &ChunkId, object: &[u8]) -> Result<(Vec<u8>, Option<Vec<u8>>), ChunkError> {
    let damaged = |problem: String| ChunkError::Damaged { id: *id, problem };
    let decoded = CHUNK.decode(object).map_err(|e| damaged(e.to_string()))?;
    let (codec, body) = decoded
        .payload
        .split_first()
        .ok_or_else(|| damaged("empty payload".into()))?;
    let (content, zstd) = match *codec {
        RAW if body.len() <= MAX_CHUNK => (body.to_vec(), None),
        RAW => return Err(damaged(format!("{} bytes stored: too large", body.len()))),
        ZSTD => (
            zstd::bulk::decompress(body, MAX_CHUNK).map_err(|e| damaged(format!("zstd: {e}")))?,
            Some(body.to_vec()),
        ),
        other => return Err(damaged(format!("unknown codec {other}"))),
    };
    let found = ChunkId::of(&content);
    if found != *id {
        return Err(ChunkError::WrongContent { id: *id, found });
    }
    Ok((content, zstd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunks_round_trip_and_are_named_by_their_content() {
        let zeros = vec![0u8; 256 << 10];
        let (id, object) = seal(&zeros, 3).unwrap();
        assert!(object.len() < 1024, "compressed");
        assert_eq!(open(&id, &object).unwrap(), zeros);
        assert_eq!(id, ChunkId::of(&zeros));
        assert_eq!(
            seal(&zeros, 1).unwrap().0,
            id,
            "the level does not change the name"
        );

        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (nid, nobj) = seal(&noise, 3).unwrap();
        assert_eq!(open(&nid, &nobj).unwrap(), noise);
        assert_eq!(nid.to_string().parse::<ChunkId>().unwrap(), nid);
        assert!(
            nid.key("fleet")
                .starts_with(&format!("fleet/v1/chunks/{}/", &nid.to_string()[..2]))
        );
    }

    #[test]
    fn another_chunks_bytes_under_a_name_are_refused_by_digest() {
        let (a, _) = seal(b"the bytes of a", 3).unwrap();
        let (_, other) = seal(b"the bytes of b", 3).unwrap();
        let e = open(&a, &other).unwrap_err();
        assert!(matches!(e, ChunkError::WrongContent { .. }), "{e}");
        assert!(e.to_string().contains(&a.to_string()), "{e}");
    }

    #[test]
    fn damage_and_oversize_are_refused() {
        let (id, mut object) = seal(&[7u8; 9000], 3).unwrap();
        let last = object.len() - 1;
        object[last] ^= 1;
        assert!(matches!(
            open(&id, &object).unwrap_err(),
            ChunkError::Damaged { .. }
        ));
        assert!(matches!(
            seal(&vec![0; MAX_CHUNK + 1], 3).unwrap_err(),
            ChunkError::TooLarge(_)
        ));
        // A well-formed object whose zstd frame claims more than a chunk may hold.
        let big = zstd::bulk::compress(&vec![0u8; MAX_CHUNK + 4096], 1).unwrap();
        let mut payload = vec![ZSTD];
        payload.extend_from_slice(&big);
        let e = open(&id, &CHUNK.encode(&payload)).unwrap_err();
        assert!(matches!(e, ChunkError::Damaged { .. }), "{e}");
        assert!("zz".parse::<ChunkId>().is_err());
    }

    #[test]
    fn a_layers_own_zstd_frame_is_stored_and_given_back_as_it_is() {
        let content = vec![5u8; 64 << 10];
        let frame = zstd::bulk::compress(&content, 1).unwrap();
        let (id, object) = seal_compressed(&content, &frame).unwrap();
        assert_eq!(id, ChunkId::of(&content));
        let (back, zstd) = open_parts(&id, &object).unwrap();
        assert_eq!((back, zstd), (content, Some(frame)));
        // A frame of other bytes is refused by the content's digest.
        let (_, lie) =
            seal_compressed(b"claimed", &zstd::bulk::compress(b"actual", 1).unwrap()).unwrap();
        assert!(matches!(
            open(&ChunkId::of(b"claimed"), &lie).unwrap_err(),
            ChunkError::WrongContent { .. }
        ));
    }

    proptest! {
        #[test]
        fn any_content_round_trips(content in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            let (id, object) = seal(&content, 1).unwrap();
            prop_assert_eq!(open(&id, &object).unwrap(), content);
        }
    }
}
