//! Pushing a chain of layer files to a real Garage and pulling it back on another "host" (a
//! directory that never saw it): memory and disks read back the same, a second push sends
//! nothing, a push after a small change sends about that change, and a damaged chunk stops a
//! pull with its name.

use std::path::{Path, PathBuf};

use object_store::ObjectStoreExt;
use snap_core::Id;
use snap_disk::{Disk, Geometry};
use snap_mem::GuestMemory;
use snap_mem::layer::{LayerChain, LayerOptions, NewLayer, Restore, write_layer};
use snap_remote::manifest::{Guest, SnapshotInfo};
use snap_remote::transfer::{
    DiskSource, PushSource, Transfer, TransferError, pull_blob, pull_bytes, pull_disk_layer,
    pull_memory_layer, push, push_bytes,
};
use snap_remote::{Credentials, Remote};
use snap_testkit::garage::{Garage, garage_available};

const MEMORY: u64 = 8 << 20;

fn remote(g: &Garage) -> Remote {
    let creds = Credentials {
        access_key: g.access_key.clone(),
        secret_key: g.secret_key.clone(),
    };
    Remote::new(&g.url("fleet"), &creds).unwrap()
}

/// Fills page `p` with bytes that depend on `p` and `salt` (incompressible enough).
fn scribble(memory: &GuestMemory, p: u64, salt: u64) {
    let mut page = vec![0u8; 4096];
    let mut x = p.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt;
    for b in page.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    memory.write_at_offset(p * 4096, &page).unwrap();
}

struct Host {
    dir: tempfile::TempDir,
    memory: GuestMemory,
    layers: Vec<PathBuf>,
    disk: Disk,
    disk_layers: Vec<PathBuf>,
}

impl Host {
    /// A VM's memory and disk, with a full snapshot taken.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let memory = GuestMemory::new(MEMORY).unwrap();
        for p in 0..MEMORY / 4096 / 2 {
            scribble(&memory, p, 0);
        }
        let disk = Disk::create(&dir.path().join("d0"), Geometry::new(4 << 20)).unwrap();
        disk.write_at(0, &[7u8; 8192]).unwrap();
        disk.write_at(1 << 20, &[9u8; 512]).unwrap();
        let mut host = Self {
            dir,
            memory,
            layers: vec![],
            disk,
            disk_layers: vec![],
        };
        host.snapshot(0..MEMORY / 4096);
        host
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a memory layer of `pages` (a diff after the first) and seals the disk.
    fn snapshot(&mut self, pages: impl IntoIterator<Item = u64>) {
        let n = self.layers.len();
        let parent = self
            .layers
            .last()
            .map(|p| snap_mem::layer::Layer::open(p).unwrap().info().as_parent());
        let path = self.path(&format!("m{n}"));
        let new = NewLayer {
            id: Id::random(),
            parent,
            memory_bytes: MEMORY,
        };
        write_layer(&path, &new, pages, &self.memory, &LayerOptions::default()).unwrap();
        self.layers.push(path);
        let sealed = self.disk.seal(&self.path(&format!("d{}", n + 1))).unwrap();
        self.disk_layers.push(sealed.path);
        std::fs::write(self.path(&format!("state{n}")), format!("state {n}")).unwrap();
    }

    fn source(&self) -> PushSource {
        let n = self.layers.len() - 1;
        PushSource {
            info: SnapshotInfo {
                id: [n as u8 + 1; 16],
                name: format!("s{n}"),
                vm_id: [0xee; 16],
                vm_name: "vm".into(),
                memory_bytes: MEMORY,
                vcpus: 1,
                guest: Guest {
                    seed: 3,
                    ..Guest::default()
                },
                ..SnapshotInfo::default()
            },
            memory: self.layers.clone(),
            disks: vec![DiskSource {
                name: "root".into(),
                layers: self.disk_layers.clone(),
            }],
            state: self.path(&format!("state{n}")),
            working_set: None,
        }
    }
}

fn transfer<'a>(
    handle: &'a tokio::runtime::Handle,
    remote: &'a Remote,
    progress: &'a (dyn Fn(u64) -> bool + Sync),
) -> Transfer<'a> {
    Transfer {
        handle,
        remote,
        progress,
        in_flight: 16,
    }
}

/// Pulls every layer of `manifest` into `dir`; returns the memory and disk layer paths.
fn pull_all(
    t: &Transfer<'_>,
    manifest: &snap_remote::Manifest,
    dir: &Path,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>), TransferError> {
    let mut memory = vec![];
    let mut parent = None;
    for (i, l) in manifest.memory.iter().enumerate() {
        let out = dir.join(format!("m{i}"));
        let info = pull_memory_layer(t, l, manifest.snapshot.memory_bytes, Id(l.id), parent, &out)?;
        assert_eq!(
            info.digest.0, l.digest,
            "the copy has the pushed layer's digest"
        );
        parent = Some(info.as_parent());
        memory.push(out);
    }
    let mut disk = vec![];
    let mut parent = None;
    let chain = &manifest.disks[0];
    for (i, l) in chain.layers.iter().enumerate() {
        let out = dir.join(format!("d{i}"));
        let info = pull_disk_layer(t, chain, l, Id(l.id), parent, &out)?;
        parent = info.as_parent();
        disk.push(out);
    }
    pull_blob(t, &manifest.state, &dir.join("state"))?;
    Ok((memory, disk))
}

#[test]
fn a_chain_pushed_from_one_host_is_pulled_whole_on_another() {
    if !garage_available("a_chain_pushed_from_one_host_is_pulled_whole_on_another") {
        return;
    }
    let garage = Garage::single_node();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let handle = runtime.handle();
    let remote = remote(&garage);
    let done = std::sync::atomic::AtomicU64::new(0);
    let progress = |n| {
        done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        true
    };
    let t = transfer(handle, &remote, &progress);
    let grace = 3_600_000;

    let mut a = Host::new();
    let first = push(&t, &a.source(), grace).unwrap();
    assert_eq!(first.deduplicated, 0);
    assert_eq!(first.uploaded, first.chunks);
    assert_eq!(
        done.load(std::sync::atomic::Ordering::Relaxed),
        push_bytes(&a.source()).unwrap(),
        "progress adds up to the total"
    );
    // Again: every chunk is there, nothing is sent, the manifest is the same.
    let again = push(&t, &a.source(), grace).unwrap();
    assert_eq!((again.uploaded, again.sent_bytes), (0, 0));
    assert_eq!(again.manifest, first.manifest);

    // About 5% of memory changes; a diff snapshot pushed sends about that much.
    let pages = MEMORY / 4096;
    let changed: Vec<u64> = (0..pages).filter(|p| p % 20 == 3).collect();
    for &p in &changed {
        scribble(&a.memory, p, 1);
    }
    a.disk.write_at(2 << 20, &[5u8; 4096]).unwrap();
    a.snapshot(changed.iter().copied());
    let second = push(&t, &a.source(), grace).unwrap();
    assert!(
        second.content_bytes > changed.len() as u64 * 4096,
        "the whole chain was read"
    );
    let new_bytes = second.sent_bytes as f64 / (pages * 4096) as f64;
    assert!(
        new_bytes < 0.06,
        "a 5% change sent {:.1}% of memory",
        new_bytes * 100.0
    );

    // Host B pulls the second snapshot by its manifest alone.
    let manifest = handle
        .block_on(remote.get_manifest(&a.source().info.id, &second.manifest))
        .unwrap();
    assert_eq!(manifest.snapshot, a.source().info);
    done.store(0, std::sync::atomic::Ordering::Relaxed);
    let b = tempfile::tempdir().unwrap();
    let (memory, disk) = pull_all(&t, &manifest, b.path()).unwrap();
    assert_eq!(
        done.load(std::sync::atomic::Ordering::Relaxed),
        pull_bytes(&manifest)
    );
    let restored = GuestMemory::new(MEMORY).unwrap();
    LayerChain::open(&memory)
        .unwrap()
        .materialize_into(&restored, Restore::Fresh)
        .unwrap();
    assert!(restored.to_vec() == a.memory.to_vec(), "memory is exact");
    let (x, y) = (
        Disk::open_read_only(&a.disk_layers).unwrap(),
        Disk::open_read_only(&disk).unwrap(),
    );
    let (mut bx, mut by) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    x.read_at(0, &mut bx).unwrap();
    y.read_at(0, &mut by).unwrap();
    assert!(bx == by, "the disk is exact");
    assert_eq!(std::fs::read(b.path().join("state")).unwrap(), b"state 1");

    // A chunk overwritten in the bucket with other bytes stops the pull, naming it; nothing
    // is left where the layer was being written.
    let victim = manifest.memory[1].frames[0].chunk.unwrap();
    let other = manifest.memory[0].frames[0].chunk.unwrap();
    let raw = garage.raw_store();
    let key = |c: snap_remote::ChunkId| object_store::path::Path::from(c.key("fleet").as_str());
    handle.block_on(async {
        let bytes = raw.get(&key(other)).await.unwrap().bytes().await.unwrap();
        raw.put(&key(victim), bytes.into()).await.unwrap();
    });
    let c = tempfile::tempdir().unwrap();
    let e = pull_all(&t, &manifest, c.path()).unwrap_err();
    assert!(
        matches!(e, TransferError::Remote(_)) && e.to_string().contains(&victim.to_string()),
        "{e}"
    );
    assert!(!c.path().join("m1").exists());

    // Cancelling stops a pull.
    let stop = |_| false;
    let t2 = transfer(handle, &remote, &stop);
    let e = pull_all(&t2, &manifest, c.path()).unwrap_err();
    assert!(matches!(e, TransferError::Cancelled), "{e}");
}

#[test]
fn memory_restores_lazily_straight_from_the_remote() {
    if !garage_available("memory_restores_lazily_straight_from_the_remote") {
        return;
    }
    use snap_mem::lazy::PageServer;
    use snap_remote::cache::ChunkCache;
    use snap_remote::source::RemoteMemory;
    use std::sync::Arc;

    let garage = Garage::single_node();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let handle = runtime.handle();
    let remote = remote(&garage);
    let progress = |_| true;
    let t = transfer(handle, &remote, &progress);
    let mut a = Host::new();
    let pages = MEMORY / 4096;
    // A diff that overwrites some pages and zeroes others: the chain decides per page.
    let changed: Vec<u64> = (0..pages).filter(|p| p % 7 == 1).collect();
    for &p in &changed {
        if p % 2 == 0 {
            a.memory.write_at_offset(p * 4096, &[0u8; 4096]).unwrap();
        } else {
            scribble(&a.memory, p, 9);
        }
    }
    a.snapshot(changed.iter().copied());
    let pushed = push(&t, &a.source(), 3_600_000).unwrap();
    let manifest = handle
        .block_on(remote.get_manifest(&a.source().info.id, &pushed.manifest))
        .unwrap();

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ChunkCache::open(cache_dir.path(), 64 << 20).unwrap());
    for round in 0..2 {
        let source = Arc::new(RemoteMemory::new(
            handle.clone(),
            remote.clone(),
            Arc::clone(&cache),
            &manifest,
            "snapshot s1".into(),
        ));
        let memory = GuestMemory::new(MEMORY).unwrap();
        let server = PageServer::start(&memory, Arc::clone(&source)).unwrap();
        // A touch in the middle is served on fault; the rest arrives in the background.
        let mut page = [0u8; 4096];
        memory.read(1001 * 4096, &mut page).unwrap();
        server.wait().unwrap();
        assert!(
            memory.to_vec() == a.memory.to_vec(),
            "round {round}: memory is exact"
        );
        let s = source.stats();
        if round == 0 {
            assert!(s.fetched > 0, "{s:?}");
        } else {
            assert_eq!(
                s.fetched, 0,
                "the second restore is served by the cache: {s:?}"
            );
            assert!(s.cache_hits > 0);
        }
    }
}
