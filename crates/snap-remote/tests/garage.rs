//! The remote store against a real Garage server: chunks are stored once, read back checked,
//! refused when overwritten with other bytes, listed and deleted; wrong credentials get a clear
//! error.

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use snap_remote::chunk;
use snap_remote::manifest::{Blob, MemoryFrame, MemoryLayer, SnapshotInfo};
use snap_remote::{Credentials, Manifest, Remote, RemoteError};
use snap_testkit::garage::{Garage, garage_available};

fn credentials(g: &Garage) -> Credentials {
    Credentials {
        access_key: g.access_key.clone(),
        secret_key: g.secret_key.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_are_stored_once_and_checked_on_every_read() {
    if !garage_available("chunks_are_stored_once_and_checked_on_every_read") {
        return;
    }
    let garage = Garage::single_node();
    let remote = Remote::new(&garage.url("fleet"), &credentials(&garage)).unwrap();
    let a = vec![0xa5u8; 256 << 10];
    let b: Vec<u8> = (0..65536u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let (ida, sent) = remote.put_chunk(&a, 0).await.unwrap();
    assert!(
        sent > 0 && sent < 4096,
        "a new chunk is uploaded, compressed: {sent}"
    );
    let (again, sent) = remote.put_chunk(&a, 0).await.unwrap();
    assert_eq!(again, ida);
    assert_eq!(sent, 0, "the same bytes are stored once");
    let (idb, _) = remote.put_chunk(&b, 0).await.unwrap();
    assert_eq!(remote.get_chunk(&ida).await.unwrap(), a);
    assert_eq!(remote.get_chunk(&idb).await.unwrap(), b);
    let mut listed: Vec<_> = remote
        .list_chunks()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    listed.sort();
    let mut want = vec![ida, idb];
    want.sort();
    assert_eq!(listed, want);

    // Another chunk's bytes written under a's name (straight into the bucket) are refused by
    // their digest, naming the chunk.
    let raw = garage.raw_store();
    let (_, b_object) = chunk::seal(&b, 3).unwrap();
    raw.put(
        &ObjectPath::from(ida.key("fleet").as_str()),
        PutPayload::from(b_object),
    )
    .await
    .unwrap();
    let e = remote.get_chunk(&ida).await.unwrap_err();
    assert!(
        matches!(e, RemoteError::Chunk { .. }) && e.to_string().contains(&ida.to_string()),
        "{e}"
    );

    remote.delete_chunk(&ida).await.unwrap();
    assert!(matches!(
        remote.get_chunk(&ida).await.unwrap_err(),
        RemoteError::Missing { .. }
    ));
    assert_eq!(remote.list_chunks().await.unwrap().len(), 1);

    // Wrong credentials: refused, saying so, naming the store.
    let wrong = Remote::new(
        &garage.url("fleet"),
        &Credentials {
            access_key: garage.access_key.clone(),
            secret_key: "0".repeat(64),
        },
    )
    .unwrap();
    let e = wrong.get_chunk(&idb).await.unwrap_err();
    assert!(matches!(e, RemoteError::Refused { .. }), "{e}");
    assert!(e.to_string().contains(&garage.endpoint), "{e}");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A one-frame manifest of snapshot `id` naming `chunk` (its memory) and `state`.
fn manifest(id: u8, frame: snap_remote::ChunkId, state: snap_remote::ChunkId) -> Manifest {
    Manifest {
        snapshot: SnapshotInfo {
            id: [id; 16],
            name: format!("s{id}"),
            memory_bytes: 1 << 20,
            vcpus: 1,
            ..SnapshotInfo::default()
        },
        memory: vec![MemoryLayer {
            id: [id; 16],
            digest: [0; 32],
            frame_size: 256 << 10,
            zstd_level: 1,
            frames: vec![MemoryFrame {
                region: 0,
                present: vec![1],
                data: vec![1],
                chunk: Some(frame),
            }],
        }],
        disks: vec![],
        state: Blob {
            len: 10,
            chunks: vec![state],
        },
        working_set: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_listed_and_the_sweep_keeps_what_they_name() {
    if !garage_available("manifests_are_listed_and_the_sweep_keeps_what_they_name") {
        return;
    }
    let garage = Garage::single_node();
    let remote = Remote::new(&garage.url("fleet"), &credentials(&garage)).unwrap();
    let page = |b: u8| vec![b; 4096];
    let (shared, _) = remote.put_chunk(&page(1), 0).await.unwrap();
    let (only_a, _) = remote.put_chunk(&page(2), 0).await.unwrap();
    let (only_b, _) = remote.put_chunk(&page(3), 0).await.unwrap();
    let (orphan, _) = remote.put_chunk(&page(4), 0).await.unwrap();
    let (a, _) = remote
        .put_manifest(&manifest(0xa, only_a, shared))
        .await
        .unwrap();
    let (b, _) = remote
        .put_manifest(&manifest(0xb, only_b, shared))
        .await
        .unwrap();
    let listed = remote.list_manifests().await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|m| (m.snapshot, m.id))
            .collect::<Vec<_>>(),
        vec![([0xa; 16], a), ([0xb; 16], b)]
    );
    assert_eq!(
        remote.get_manifest(&[0xa; 16], &a).await.unwrap(),
        manifest(0xa, only_a, shared)
    );

    // Within the grace period nothing goes; after it, only what no manifest names.
    let swept = remote.sweep(60_000, now_ms()).await.unwrap();
    assert_eq!((swept.removed, swept.kept_young), (0, 1));
    let later = now_ms() + 120_000;
    assert_eq!(remote.sweep(60_000, later).await.unwrap().removed, 1);
    assert_eq!(remote.delete_manifests(&[0xa; 16]).await.unwrap(), 1);
    let swept = remote.sweep(60_000, later).await.unwrap();
    assert_eq!((swept.manifests, swept.removed), (1, 1));
    let mut left: Vec<_> = remote
        .list_chunks()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    left.sort();
    let mut want = vec![shared, only_b];
    want.sort();
    assert_eq!(
        left, want,
        "exactly the chunks the remaining manifest names"
    );
    let _ = orphan;

    // A chunk older than the freshness bound is written again (renewing its age), not reused.
    let (_, sent) = remote.put_chunk(&page(1), later).await.unwrap();
    assert!(sent > 0, "a stale chunk is refreshed");

    // A damaged manifest stops the sweep before anything is removed.
    let raw_key = format!("fleet/v1/snapshots/{}/{}", "0b".repeat(16), b);
    let raw = garage.raw_store();
    raw.put(
        &ObjectPath::from(raw_key.as_str()),
        PutPayload::from(vec![0u8; 100]),
    )
    .await
    .unwrap();
    remote.put_chunk(&page(9), 0).await.unwrap();
    let e = remote.sweep(0, later + 1_000_000).await.unwrap_err();
    assert!(matches!(e, RemoteError::Manifest { .. }), "{e}");
    assert_eq!(
        remote.list_chunks().await.unwrap().len(),
        3,
        "nothing removed"
    );
}
