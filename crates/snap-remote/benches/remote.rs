//! The remote store against a real single-node Garage on this host, each figure beside its
//! baseline measured in the same run against the same Garage:
//!
//! - **push** of a full memory layer (incompressible, and compressible) against a plain
//!   multipart upload of the same bytes (16 MiB parts, 8 in flight): time and bytes sent;
//! - **eager pull** of that layer (every chunk fetched, the layer file written) against a plain
//!   download of the multipart object;
//! - **lazy restore, call to first page**: the manifest read, the page server started on fresh
//!   memory and one page touched, served from the remote, for memory of growing size (each
//!   holding 64 MiB of data);
//! - **one remote fault** (a cold window: one 256 KiB chunk fetched, checked, installed)
//!   against one plain range read of 256 KiB;
//! - **prefetch against lazy**: a "guest" touching 10% of memory's windows, faults counted with
//!   and without the recorded working set, and the chunk cache's hit rate on a second restore.
//!
//! Run: `cargo bench -p snap-remote --bench remote` (SNAP_BENCH_SIZES_MIB=256,1024 for push and
//! pull; SNAP_BENCH_LAZY_MIB=256,1024,4096,16384 for the first-page latency; SNAP_BENCH_ITERS=5).
//! Needs `garage` on the PATH.

use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use snap_core::Id;
use snap_mem::GuestMemory;
use snap_mem::layer::{LayerOptions, NewLayer, write_layer};
use snap_mem::lazy::{LazyOptions, PageServer, WindowSource};
use snap_mem::working_set::WorkingSet;
use snap_remote::cache::ChunkCache;
use snap_remote::manifest::SnapshotInfo;
use snap_remote::source::RemoteMemory;
use snap_remote::transfer::{PushSource, Transfer, pull_memory_layer, push};
use snap_remote::{Credentials, Remote};
use snap_testkit::garage::Garage;

const MIB: u64 = 1 << 20;

/// Fills a buffer with the bytes at an offset of some memory.
type Fill = dyn Fn(&mut [u8], u64);

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Layer options with the frame size of SNAP_BENCH_FRAME_KIB (default 256).
fn frame_options() -> LayerOptions {
    LayerOptions {
        frame_size: (env_list("SNAP_BENCH_FRAME_KIB", "256")[0] as u32) << 10,
        ..LayerOptions::default()
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn mbps(bytes: u64, d: Duration) -> String {
    format!("{:.0} MB/s", bytes as f64 / d.as_secs_f64() / 1e6)
}

/// xorshift bytes: incompressible.
fn noise(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for w in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        w.copy_from_slice(&b[..w.len()]);
    }
}

struct Bench {
    garage: Garage,
    runtime: tokio::runtime::Runtime,
    raw: Arc<dyn ObjectStore>,
    dir: tempfile::TempDir,
}

impl Bench {
    fn remote(&self, prefix: &str) -> Remote {
        let creds = Credentials {
            access_key: self.garage.access_key.clone(),
            secret_key: self.garage.secret_key.clone(),
        };
        Remote::new(&self.garage.url(prefix), &creds).expect("remote")
    }

    /// A full memory layer of `size` bytes: `data` bytes of it filled by `fill` (from the
    /// start), the rest zero. Returns its path.
    fn layer(
        &self,
        name: &str,
        size: u64,
        data: u64,
        fill: impl Fn(&mut [u8], u64),
    ) -> std::path::PathBuf {
        let memory = GuestMemory::new(size).expect("memory");
        let mut chunk = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < data {
            let n = chunk.len().min((data - off) as usize);
            fill(&mut chunk[..n], off);
            memory.write_at_offset(off, &chunk[..n]).expect("fill");
            off += n as u64;
        }
        let path = self.dir.path().join(name);
        let new = NewLayer {
            id: Id::random(),
            parent: None,
            memory_bytes: size,
        };
        write_layer(&path, &new, 0..size / 4096, &memory, &frame_options()).expect("layer");
        path
    }

    fn source(&self, layer: &std::path::Path, size: u64) -> PushSource {
        let state = self.dir.path().join("state");
        std::fs::write(&state, b"bench state").expect("state");
        PushSource {
            info: SnapshotInfo {
                id: Id::random().0,
                name: "bench".into(),
                memory_bytes: size,
                vcpus: 1,
                ..SnapshotInfo::default()
            },
            memory: vec![layer.to_path_buf()],
            disks: vec![],
            state,
            working_set: None,
        }
    }

    /// Uploads `bytes` bytes (made by `fill`) as one object in 16 MiB parts, 8 in flight.
    fn raw_upload(&self, key: &str, bytes: u64, fill: &Fill) -> Duration {
        let path = ObjectPath::from(key);
        let mut part = vec![0u8; 16 << 20];
        let started = Instant::now();
        self.runtime.block_on(async {
            let upload = self.raw.put_multipart(&path).await.expect("multipart");
            let mut w = WriteMultipart::new_with_chunk_size(upload, 16 << 20);
            let mut off = 0;
            while off < bytes {
                let n = part.len().min((bytes - off) as usize);
                fill(&mut part[..n], off);
                w.wait_for_capacity(8).await.expect("capacity");
                w.write(&part[..n]);
                off += n as u64;
            }
            w.finish().await.expect("finish");
        });
        started.elapsed()
    }

    fn raw_download(&self, key: &str) -> (Duration, u64) {
        let started = Instant::now();
        let n = self.runtime.block_on(async {
            self.raw
                .get(&ObjectPath::from(key))
                .await
                .expect("get")
                .bytes()
                .await
                .expect("bytes")
                .len() as u64
        });
        (started.elapsed(), n)
    }
}

fn main() {
    if !snap_testkit::garage::garage_available("remote bench") {
        return;
    }
    let iters = env_list("SNAP_BENCH_ITERS", "5")[0].max(1) as usize;
    let garage = Garage::single_node();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let raw: Arc<dyn ObjectStore> = Arc::new(garage.raw_store());
    let b = Bench {
        garage,
        runtime,
        raw,
        dir: tempfile::tempdir().expect("dir"),
    };
    push_and_pull(&b, iters);
    first_page(&b, iters);
    one_fault(&b);
    prefetch_against_lazy(&b);
}

fn push_and_pull(b: &Bench, iters: usize) {
    println!(
        "## push and eager pull against plain multipart upload and download (median of {iters})"
    );
    println!(
        "| memory | content | push | multipart upload | push / upload throughput | sent by push | sent by upload | eager pull | download | pull / download throughput |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let progress = |_| true;
    for size_mib in env_list("SNAP_BENCH_SIZES_MIB", "256,1024")
        .into_iter()
        .filter(|&s| s > 0)
    {
        let size = size_mib * MIB;
        let kinds: [(&str, &Fill); 2] = [
            ("incompressible", &|buf, off| noise(buf, off + 1)),
            ("compressible", &|buf, off| {
                // Every byte different from the next, but from 16 values: about half of it
                // compresses away, and no frame repeats another.
                noise(buf, off + 1);
                for c in buf.iter_mut() {
                    *c &= 0x0f;
                }
            }),
        ];
        for (kind, fill) in kinds {
            let layer = b.layer(&format!("{kind}-{size_mib}"), size, size, fill);
            let (mut pushes, mut uploads, mut pulls, mut downloads) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut sent, mut content) = (0, 0);
            for i in 0..iters {
                let remote = b.remote(&format!("push-{kind}-{size_mib}-{i}"));
                let t = Transfer {
                    handle: b.runtime.handle(),
                    remote: &remote,
                    progress: &progress,
                    in_flight: 32,
                };
                let source = b.source(&layer, size);
                let started = Instant::now();
                let stats = push(&t, &source, 3_600_000).expect("push");
                pushes.push(started.elapsed());
                (sent, content) = (stats.sent_bytes + stats.manifest_bytes, stats.content_bytes);
                let key = format!("raw-{kind}-{size_mib}-{i}");
                uploads.push(b.raw_upload(&key, size, fill));

                let manifest = b
                    .runtime
                    .block_on(remote.get_manifest(&source.info.id, &stats.manifest))
                    .expect("manifest");
                let out = b.dir.path().join("pulled");
                let started = Instant::now();
                pull_memory_layer(&t, &manifest.memory[0], size, Id::random(), None, &out)
                    .expect("pull");
                pulls.push(started.elapsed());
                std::fs::remove_file(&out).expect("remove");
                let (d, n) = b.raw_download(&key);
                assert_eq!(n, size);
                downloads.push(d);
            }
            let (p, u, l, d) = (
                median(&mut pushes),
                median(&mut uploads),
                median(&mut pulls),
                median(&mut downloads),
            );
            println!(
                "| {size_mib} MiB | {kind} | {} ({}) | {} ({}) | {:.2}x | {:.0} MiB | {size_mib} MiB | {} ({}) | {} ({}) | {:.2}x |",
                ms(p),
                mbps(content, p),
                ms(u),
                mbps(size, u),
                u.as_secs_f64() / p.as_secs_f64(),
                sent as f64 / MIB as f64,
                ms(l),
                mbps(content, l),
                ms(d),
                mbps(size, d),
                d.as_secs_f64() / l.as_secs_f64(),
            );
            std::fs::remove_file(&layer).expect("remove");
        }
    }
}

/// A pushed sparse snapshot of `size` bytes with 64 MiB of data spread over it; its manifest.
fn sparse_snapshot(b: &Bench, remote: &Remote, size: u64) -> snap_remote::Manifest {
    let memory = GuestMemory::new(size).expect("memory");
    let mut block = vec![0u8; 256 << 10];
    let blocks = 256u64; // 64 MiB in 256 KiB blocks, evenly spread
    for i in 0..blocks {
        noise(&mut block, i + 7);
        memory
            .write_at_offset(i * (size / blocks), &block)
            .expect("fill");
    }
    let path = b.dir.path().join(format!("sparse-{}", size / MIB));
    let new = NewLayer {
        id: Id::random(),
        parent: None,
        memory_bytes: size,
    };
    let pages: Vec<u64> = (0..blocks)
        .flat_map(|i| {
            let first = i * (size / blocks) / 4096;
            first..first + 64
        })
        .collect();
    write_layer(&path, &new, pages, &memory, &frame_options()).expect("layer");
    let progress = |_| true;
    let t = Transfer {
        handle: b.runtime.handle(),
        remote,
        progress: &progress,
        in_flight: 32,
    };
    let source = b.source(&path, size);
    let stats = push(&t, &source, 3_600_000).expect("push");
    std::fs::remove_file(&path).expect("remove");
    b.runtime
        .block_on(remote.get_manifest(&source.info.id, &stats.manifest))
        .expect("manifest")
}

fn first_page(b: &Bench, iters: usize) {
    println!();
    println!(
        "## lazy restore from the remote: call to first page (64 MiB of data in each; median of {iters})"
    );
    println!(
        "| memory | manifest | first page (manifest read, server started, one page served) | of which the manifest's GET | server start | first page, manifest in the host's cache |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for size_mib in env_list("SNAP_BENCH_LAZY_MIB", "256,1024,4096,16384") {
        let size = size_mib * MIB;
        let remote = b.remote(&format!("lazy-{size_mib}"));
        let manifest = sparse_snapshot(b, &remote, size);
        let stored = b
            .runtime
            .block_on(remote.manifests_of(&manifest.snapshot.id))
            .expect("listed")
            .remove(0);
        let (mut times, mut reads, mut ups, mut warm) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..iters {
            let cache_dir = tempfile::tempdir().expect("cache");
            let cache = Arc::new(ChunkCache::open(cache_dir.path(), 1 << 30).expect("cache"));
            let started = Instant::now();
            let m = b
                .runtime
                .block_on(remote.get_manifest(&stored.snapshot, &stored.id))
                .expect("manifest");
            let read = started.elapsed();
            let source = RemoteMemory::new(
                b.runtime.handle().clone(),
                remote.clone(),
                Arc::clone(&cache),
                &m,
                "bench".into(),
            );
            let memory = GuestMemory::new(size).expect("memory");
            let server = PageServer::start(&memory, source).expect("server");
            let up = started.elapsed();
            let mut page = [0u8; 4096];
            memory.read(size / 2, &mut page).expect("touch");
            let total = started.elapsed();
            times.push(total);
            // The same with the manifest in the host's cache (a later restore of the snapshot
            // on this host): the cached read replaces the GET.
            b.runtime
                .block_on(remote.get_manifest_cached(&stored.snapshot, &stored.id, &cache))
                .expect("manifest");
            let t = Instant::now();
            b.runtime
                .block_on(remote.get_manifest_cached(&stored.snapshot, &stored.id, &cache))
                .expect("manifest");
            warm.push(total - read + t.elapsed());
            reads.push(read);
            ups.push(up - read);
            drop(server);
        }

        println!(
            "| {size_mib} MiB | {} KiB | {} | {} | {} | {} |",
            stored.size >> 10,
            ms(median(&mut times)),
            ms(median(&mut reads)),
            ms(median(&mut ups)),
            ms(median(&mut warm)),
        );
    }
}

fn one_fault(b: &Bench) {
    println!();
    println!(
        "## one remote fault against one plain range read of the same size (cold; median of 50)"
    );
    let size = 256 * MIB;
    let remote = b.remote("fault");
    let manifest = sparse_snapshot(b, &remote, size);
    let cache_dir = tempfile::tempdir().expect("cache");
    let cache = Arc::new(ChunkCache::open(cache_dir.path(), 1 << 30).expect("cache"));
    let source = RemoteMemory::new(
        b.runtime.handle().clone(),
        remote.clone(),
        cache,
        &manifest,
        "bench".into(),
    );
    // Every other window with data, so that no read finds its chunk fetched ahead of it: each
    // read is one fetch (the read-ahead of the next windows is started, not waited for).
    let windows = source.windows_with_data().expect("windows");
    let key = "raw-ranges";
    b.raw_upload(key, size, &|buf, off| noise(buf, off + 3));
    let mut buf = vec![0u8; source.window_pages() as usize * 4096];
    let (mut faults, mut ranges) = (Vec::new(), Vec::new());
    for (i, &w) in windows.iter().rev().step_by(5).take(50).enumerate() {
        let started = Instant::now();
        source.read_window(w, &mut buf).expect("window");
        faults.push(started.elapsed());
        let off = (i as u64 * 5 + 1) * (256 << 10);
        let started = Instant::now();
        let got = b
            .runtime
            .block_on(
                b.raw
                    .get_range(&ObjectPath::from(key), off..off + (256 << 10)),
            )
            .expect("range");
        assert_eq!(got.len(), 256 << 10);
        ranges.push(started.elapsed());
    }
    let (f, r) = (median(&mut faults), median(&mut ranges));
    println!(
        "remote window (256 KiB chunk fetched, checked, composed): {}; plain range read of 256 KiB: {}; ratio {:.2}x",
        ms(f),
        ms(r),
        f.as_secs_f64() / r.as_secs_f64()
    );
}

fn prefetch_against_lazy(b: &Bench) {
    println!();
    println!(
        "## prefetch against lazy: a guest touching 10% of the windows with data, in a scattered order"
    );
    let size = 1024 * MIB;
    let remote = b.remote("prefetch");
    let manifest = sparse_snapshot(b, &remote, size);
    let caches: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("cache"))
        .collect();
    let cache = |i: usize| Arc::new(ChunkCache::open(caches[i].path(), 4 << 30).expect("cache"));
    let make = |cache: Arc<ChunkCache>| {
        Arc::new(RemoteMemory::new(
            b.runtime.handle().clone(),
            remote.clone(),
            cache,
            &manifest,
            "bench".into(),
        ))
    };
    let probe = make(cache(2));
    let window_pages = probe.window_pages();
    let windows = probe.windows_with_data().expect("windows");
    let touched: Vec<u64> = windows
        .iter()
        .enumerate()
        .filter(|(i, _)| (i * 7) % 10 == 3)
        .map(|(_, &w)| w)
        .collect();
    // The working set as a prefetch restore records it (units of one window).
    let wset_path = b.dir.path().join("wset");
    WorkingSet::record(&wset_path, window_pages, &touched, &*probe, [1; 32]).expect("record");
    let warm = cache(0);
    let runs = [
        ("lazy, cold cache", false, Arc::clone(&warm)),
        ("prefetch, cold cache", true, cache(1)),
        ("lazy, warm cache", false, warm),
    ];
    for (what, prefetch, cache) in runs {
        let source = make(cache);
        let set = prefetch.then(|| {
            WorkingSet::open(&wset_path, window_pages, size, [1; 32]).expect("working set")
        });
        let memory = GuestMemory::new(size).expect("memory");
        let started = Instant::now();
        let server = PageServer::start_with(
            &memory,
            Arc::clone(&source),
            LazyOptions {
                prefetch: set,
                ..LazyOptions::default()
            },
        )
        .expect("server");
        let mut page = [0u8; 4096];
        for &w in &touched {
            memory
                .read(w * window_pages * 4096, &mut page)
                .expect("touch");
        }
        let touched_in = started.elapsed();
        server.wait().expect("complete");
        let stats = server.stats();
        let r = source.stats();
        println!(
            "{what}: {} windows touched in {}; faults {}, prefetched {}; chunks fetched {}, cache hits {} ({:.0}% hit rate)",
            touched.len(),
            ms(touched_in),
            stats.faults,
            stats.prefetched,
            r.fetched,
            r.cache_hits,
            100.0 * r.cache_hits as f64 / (r.cache_hits + r.fetched).max(1) as f64
        );
    }
}
