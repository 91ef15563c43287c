//! The remote store against a real Garage server: chunks are stored once, read back checked,
//! refused when overwritten with other bytes, listed and deleted; wrong credentials get a clear
//! error.

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use snap_remote::chunk;
use snap_remote::{Credentials, Remote, RemoteError};
use snap_testkit::garage::{BUCKET, Garage, REGION, garage_available};

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
    let (ida, uploaded) = remote.put_chunk(&a).await.unwrap();
    assert!(uploaded, "a new chunk is uploaded");
    let (again, uploaded) = remote.put_chunk(&a).await.unwrap();
    assert_eq!(again, ida);
    assert!(!uploaded, "the same bytes are stored once");
    let (idb, _) = remote.put_chunk(&b).await.unwrap();
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
    let raw = AmazonS3Builder::new()
        .with_endpoint(&garage.endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_bucket_name(BUCKET)
        .with_region(REGION)
        .with_access_key_id(&garage.access_key)
        .with_secret_access_key(&garage.secret_key)
        .build()
        .unwrap();
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
