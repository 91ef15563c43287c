use super::*;
use crate::catalog::{LayerKind, LayerRecord};

fn open(root: &Path) -> Result<(Arc<Store>, Catalog), String> {
    Store::open(root, StoreOptions::default())
}

fn touch(root: &Path, file: &str) {
    std::fs::write(root.join(file), b"data").unwrap();
}

fn layer_row(catalog: &Catalog, file: &str) {
    catalog
        .write(|tx| {
            tx.insert_layer(&LayerRecord {
                id: LayerId::random(),
                kind: LayerKind::Disk,
                file: file.into(),
                bytes: 4,
            })
        })
        .unwrap();
}

#[test]
fn a_missing_catalog_beside_layer_files_is_refused_and_nothing_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (_, catalog) = open(root).unwrap();
    layer_row(&catalog, "layers/a.dlayer");
    touch(root, "layers/a.dlayer");
    drop(catalog);
    for gone in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::remove_file(root.join(gone));
    }
    let e = open(root).err().expect("refused");
    assert!(e.contains("catalog.db is missing or empty"), "{e}");
    assert!(e.contains("--keep-unknown-files"), "{e}");
    assert!(root.join("layers/a.dlayer").exists(), "a file was deleted");
    assert!(
        !root.join("catalog.db").exists(),
        "a refused start made a catalog"
    );
    // An emptied catalog is the same.
    std::fs::write(root.join("catalog.db"), b"").unwrap();
    assert!(open(root).is_err());
    // The operator's way on: an empty catalog, the files kept aside.
    let (store, catalog) = Store::open(
        root,
        StoreOptions {
            keep_unknown_files: true,
            ..Default::default()
        },
    )
    .unwrap();
    let swept = store.sweep(&catalog).unwrap();
    assert_eq!(swept.kept, 1);
    assert!(root.join("lost+found/layers_a.dlayer").exists());
}

#[test]
fn a_catalog_that_lost_commits_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (_, catalog) = open(root).unwrap();
    layer_row(&catalog, "layers/a.dlayer");
    // A copy of the catalog as of now: the "backup" a lost WAL rolls back to.
    drop(catalog);
    let old = std::fs::read(root.join("catalog.db")).unwrap();
    let (_, catalog) = open(root).unwrap();
    layer_row(&catalog, "layers/b.dlayer");
    layer_row(&catalog, "layers/c.dlayer");
    drop(catalog);
    std::fs::write(root.join("catalog.db"), old).unwrap();
    let e = open(root).err().expect("refused");
    assert!(e.contains("lost 2 committed transactions"), "{e}");
}

#[test]
fn a_new_directory_opens_and_records_its_generation() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let (store, catalog) = open(&root).unwrap();
    layer_row(&catalog, "layers/a.dlayer");
    assert_eq!(store.recorded_generation(), Some(1));
    drop(catalog);
    // A clean restart passes the check.
    open(&root).unwrap();
}

#[test]
fn the_sweep_removes_only_files_nobody_names_or_claims() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (store, catalog) = open(root).unwrap();
    layer_row(&catalog, "layers/named.dlayer");
    for f in [
        "layers/named.dlayer",
        "layers/orphan.dlayer",
        "layers/claimed.dlayer",
        "states/0123456789abcdef0123456789abcdef.wset",
    ] {
        touch(root, f);
    }
    // An atomic write of a claimed file, in progress in this process; one left by a dead one.
    let ours = format!("layers/.claimed.dlayer.{}.0.tmp", std::process::id());
    touch(root, &ours);
    touch(root, "layers/.named.dlayer.1.0.tmp");
    let claim = store.claim(vec!["layers/claimed.dlayer".into()]);
    let swept = store.sweep(&catalog).unwrap();
    assert_eq!(swept.removed, 3, "{swept:?}");
    for f in ["layers/named.dlayer", "layers/claimed.dlayer", &ours] {
        assert!(root.join(f).exists(), "{f} was removed");
    }
    // A claim dropped unpublished removes its files; a published one keeps them.
    drop(claim);
    assert!(!root.join("layers/claimed.dlayer").exists());
    touch(root, "layers/kept.dlayer");
    let claim = store.claim(vec!["layers/kept.dlayer".into()]);
    layer_row(&catalog, "layers/kept.dlayer");
    claim.publish();
    store.sweep(&catalog).unwrap();
    assert!(root.join("layers/kept.dlayer").exists());
}

#[test]
fn temporary_names_map_to_their_destination() {
    assert_eq!(
        temporary_of("layers/.x.mlayer.42.7.tmp"),
        Some(("layers/x.mlayer".into(), 42))
    );
    assert_eq!(temporary_of("layers/x.mlayer"), None);
    assert_eq!(temporary_of("layers/.x.tmp"), None);
}

#[test]
fn the_data_directory_is_made_private_and_never_widened() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir_all(root.join("layers")).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("notes"), b"x").unwrap();
    std::fs::set_permissions(root.join("notes"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(root.join("mine"), b"x").unwrap();
    std::fs::set_permissions(root.join("mine"), std::fs::Permissions::from_mode(0o400)).unwrap();
    open(&root).unwrap();
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700);
    assert_eq!(mode("layers"), 0o700);
    assert_eq!(mode("states"), 0o700);
    assert_eq!(mode("notes"), 0o600);
    assert_eq!(mode("mine"), 0o400, "a narrower mode stays");
}
