//! Damaged files are found, named, and never read as good data: flipped bytes in a sealed disk
//! layer stop the guest that reads them, with the layer and block named.

use std::os::unix::fs::FileExt;
use std::path::Path;

use snap_api::v1 as pb;

use super::common::*;

/// Flips bytes inside every data block the sealed, parentless disk layer at `path` holds;
/// returns how many blocks were damaged.
fn damage_every_block(path: &Path) -> usize {
    const B: u64 = 64 << 10;
    const DATA_OFFSET: u64 = 8192;
    let layer = snap_disk::Disk::open_read_only(&[path]).unwrap();
    let id = layer.layers()[0].id;
    let ranges = layer.changed_ranges(None, id).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut damaged = 0;
    for block in ranges.iter().flat_map(|r| r.start / B..r.end.div_ceil(B)) {
        let mut data = vec![0u8; B as usize];
        layer.read_at(block * B, &mut data).unwrap();
        // A non-zero sector of the block, found in the file's slots at the same offset.
        let Some(at) = data.chunks(512).position(|s| s.iter().any(|&b| b != 0)) else {
            continue;
        };
        let at = (at * 512) as u64;
        let want = &data[at as usize..at as usize + 64];
        let slot = (0..)
            .map(|s| DATA_OFFSET + s * B + at)
            .take_while(|&off| off + 64 <= bytes.len() as u64)
            .find(|&off| &bytes[off as usize..off as usize + 64] == want)
            .expect("each block of the layer is in one of its slots");
        let flipped: Vec<u8> = want[..16].iter().map(|b| !b).collect();
        file.write_all_at(&flipped, slot).unwrap();
        damaged += 1;
    }
    damaged
}

/// A snapshot whose sealed disk layer has flipped bytes restores, but its guest stops at the
/// first read of a damaged block: the VM pauses, and its state names the layer file and the
/// block. It never runs on with the damaged data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_sealed_disk_layer_stops_the_guest_naming_the_block() {
    if !kvm_available("a_damaged_sealed_disk_layer_stops_the_guest_naming_the_block") {
        return;
    }
    let (daemon, mut c) = start("").await;
    let v = create_vm_running(&mut c, "v", true, long_guest()).await;
    wait_lines(&mut c, &v.id, 20).await;
    let s = take_snapshot(&mut c, &v.id, "s").await;
    stop(&mut c, &v.id).await;
    // The snapshot's disk is the VM's first layer, sealed by the snapshot.
    let sealed = get_vm(&mut c, &v.id).await.disks[0].layer_ids[0].clone();
    let path = daemon.layer_path(&sealed);
    assert!(damage_every_block(&path) > 0, "the guest wrote its disk");

    let r = restore_new(&mut c, &s.id, "r", pb::MemoryRestoreMode::Eager).await;
    let deadline = std::time::Instant::now() + TIMEOUT;
    let stopped = loop {
        let now = get_vm(&mut c, &r.id).await;
        if now.state() != pb::VmState::Running {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never read a damaged block"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(stopped.state(), pb::VmState::Paused, "{stopped:?}");
    let why = &stopped.failure;
    assert!(
        why.contains("checksum")
            && why.contains("block")
            && why.contains(&path.display().to_string()),
        "the reason names the layer and the block: {why}"
    );
    assert!(why.contains("damaged"), "{why}");
    // The guest never saw the damaged data: everything it printed is its model's.
    let out = console(&mut c, &r.id).await;
    assert!(model(&long_guest()).contains(&out), "{out}");
}
