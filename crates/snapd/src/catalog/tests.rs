use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::ids::{LayerId, OpId, VmId};

fn vm(id: VmId, name: &str, chain: &[LayerId]) -> VmRecord {
    VmRecord {
        id,
        name: name.into(),
        memory_bytes: 1 << 24,
        vcpus: 1,
        guest: GuestSpec::default(),
        labels: BTreeMap::from([("team".into(), "a".into())]),
        state: VmStatus::Running,
        current_snapshot: None,
        mem_chain: chain.to_vec(),
        disks: Vec::new(),
        created_ms: 1,
        failure: None,
    }
}

fn layer(id: LayerId) -> LayerRecord {
    LayerRecord {
        id,
        kind: LayerKind::Memory,
        file: format!("layers/{id}.mlayer"),
        bytes: 10,
    }
}

#[test]
fn rows_round_trip_and_unused_layers_are_collected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let cat = Catalog::open(&path, None).unwrap();
    let (v1, a, b, c) = (
        VmId::random(),
        LayerId::random(),
        LayerId::random(),
        LayerId::random(),
    );
    cat.write(|tx| {
        tx.insert_vm(&vm(v1, "one", &[a, b]))?;
        for id in [a, b, c] {
            tx.insert_layer(&layer(id))?;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(
        cat.read(|tx| tx.vm(v1)).unwrap().unwrap(),
        vm(v1, "one", &[a, b])
    );
    let e = cat
        .write(|tx| tx.insert_vm(&vm(VmId::random(), "one", &[])))
        .unwrap_err();
    assert!(matches!(e, CatalogError::NameTaken(_)), "{e}");
    let freed = cat.write(|tx| tx.collect()).unwrap();
    assert_eq!(freed, vec![layer(c)]);
    // Reopening keeps everything.
    drop(cat);
    let cat = Catalog::open(&path, None).unwrap();
    assert_eq!(cat.read(|tx| tx.layers()).unwrap().len(), 2);
    assert_eq!(cat.read(|tx| tx.vms()).unwrap().len(), 1);
}

#[test]
fn old_requests_and_ended_operations_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open(&dir.path().join("c.db"), None).unwrap();
    let r = RequestRecord {
        method: "CreateVm".into(),
        fingerprint: vec![1],
        response: vec![2],
    };
    cat.write(|tx| {
        tx.put_request("old", &r, 10)?;
        tx.put_request("new", &r, 1000)?;
        tx.put_operation(OpId::random(), "vm", 10, true, b"x")?;
        tx.put_operation(OpId::random(), "vm", 10, false, b"y")
    })
    .unwrap();
    assert_eq!(cat.write(|tx| tx.prune(500)).unwrap(), 2);
    assert!(cat.read(|tx| tx.request("old")).unwrap().is_none());
    assert!(cat.read(|tx| tx.request("new")).unwrap().is_some());
    assert_eq!(
        cat.read(|tx| tx.operations()).unwrap().len(),
        1,
        "a running operation stays"
    );
}

#[test]
fn a_failed_transaction_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open(&dir.path().join("c.db"), None).unwrap();
    let r: Result<()> = cat.write(|tx| {
        tx.insert_vm(&vm(VmId::random(), "one", &[]))?;
        Err(CatalogError::Injected("test"))
    });
    assert!(r.is_err());
    assert!(cat.read(|tx| tx.vms()).unwrap().is_empty());
    assert_eq!(
        cat.generation().unwrap(),
        0,
        "a failed write commits no generation"
    );
}

struct Mark(Arc<AtomicU64>);

impl CommitMark for Mark {
    fn committed(&self, generation: u64) {
        self.0.store(generation, Ordering::SeqCst);
    }
}

#[test]
fn each_committed_write_advances_the_generation_and_tells_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let seen = Arc::new(AtomicU64::new(0));
    let cat = Catalog::open(&path, Some(Box::new(Mark(Arc::clone(&seen))))).unwrap();
    assert_eq!(cat.generation().unwrap(), 0);
    cat.write(|tx| tx.insert_layer(&layer(LayerId::random())))
        .unwrap();
    cat.read(|tx| tx.layers()).unwrap();
    cat.write(|tx| tx.insert_layer(&layer(LayerId::random())))
        .unwrap();
    assert_eq!(cat.generation().unwrap(), 2, "reads do not count");
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    drop(cat);
    assert_eq!(Catalog::open(&path, None).unwrap().generation().unwrap(), 2);
}

#[test]
fn a_file_that_is_not_a_catalog_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let e = Catalog::open(&path, None).err().expect("refused");
    assert!(e.to_string().contains("not a database"), "{e}");
}
