//! Disk chain benchmarks, each beside a baseline measured in the same run:
//! - sequential and random reads and writes of 4 KiB and 64 KiB through chains of depth 1, 4 and
//!   16 (64 KiB blocks), beside the same I/O on a raw file of the same data. In a chain of depth
//!   `d`, block `b` of the data region lives in layer `b % d`, so reads visit every layer. Writes
//!   go into a fresh empty top over the chain (the first write after a snapshot: a partial-block
//!   write copies its block up from below) and end with a flush; the raw baseline overwrites its
//!   file in place and ends with fdatasync. Each read figure is timed on a chain just opened;
//!   the `again` row under it times the same reads once more through the same open chain (and
//!   the same raw file), which is what a disk that has been in use for a while costs.
//! - merging a delta layer holding 1 GiB into its parent, beside `qemu-img commit` of a qcow2
//!   overlay holding the same data into its base.
//!
//! Run: `cargo bench -p snap-disk --bench disk`. Environment: DISK_BENCH_ITERS (runs per
//! figure, median printed; default 5), DISK_BENCH_REGION_MIB (data region, default 256),
//! DISK_BENCH_IO_MIB (bytes moved per figure, default 256), DISK_BENCH_MERGE_GIB (default 1,
//! 0 skips), DISK_BENCH_MERGE_ITERS (default 3), DISK_BENCH_DIR (default the temp dir).
//! Reads are warm (the files are in the page cache) for the chain and the raw file alike.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use snap_core::Id;
use snap_disk::{Disk, Geometry, MergeInto, NewLayer, create_layer};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const BLOCK: u64 = 64 * KIB;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let n = v.len();
    if n % 2 == 0 {
        (v[n / 2 - 1] + v[n / 2]) / 2
    } else {
        v[n / 2]
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Content of the data region: distinct per 4 KiB, never zero.
fn content(offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let v = ((offset / 8 + i as u64) | 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    Sequential,
    Random,
}

/// Offsets of `count` requests of `size` bytes inside `region`.
fn offsets(pattern: Pattern, size: u64, count: u64, region: u64, seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed | 1);
    (0..count)
        .map(|i| match pattern {
            Pattern::Sequential => (i * size) % region,
            Pattern::Random => (rng.next() % (region / size)) * size,
        })
        .collect()
}

trait Target {
    fn read(&self, offset: u64, buf: &mut [u8]);
    fn write(&self, offset: u64, buf: &[u8]);
    fn sync(&self);
}

impl Target for File {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        self.read_exact_at(buf, offset).unwrap();
    }
    fn write(&self, offset: u64, buf: &[u8]) {
        self.write_all_at(buf, offset).unwrap();
    }
    fn sync(&self) {
        self.sync_data().unwrap();
    }
}

impl Target for Disk {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        self.read_at(offset, buf).unwrap();
    }
    fn write(&self, offset: u64, buf: &[u8]) {
        self.write_at(offset, buf).unwrap();
    }
    fn sync(&self) {
        self.flush().unwrap();
    }
}

fn time_reads(t: &dyn Target, offsets: &[u64], size: usize) -> Duration {
    let mut buf = vec![0u8; size];
    let start = Instant::now();
    for &o in offsets {
        t.read(o, &mut buf);
    }
    start.elapsed()
}

fn time_writes(t: &dyn Target, offsets: &[u64], size: usize) -> Duration {
    let buf = content(7, size);
    let start = Instant::now();
    for &o in offsets {
        t.write(o, &buf);
    }
    t.sync();
    start.elapsed()
}

/// A sealed chain of `depth` layers over the region (block `b` in layer `b % depth`), with the
/// path of each layer.
fn build_chain(dir: &Path, depth: u64, disk_bytes: u64, region: u64) -> Vec<PathBuf> {
    let paths: Vec<PathBuf> = (0..=depth)
        .map(|i| dir.join(format!("d{depth}-{i}")))
        .collect();
    let disk = Disk::create(&paths[0], Geometry::new(disk_bytes)).unwrap();
    for layer in 0..depth {
        for block in (0..region / BLOCK).filter(|b| b % depth == layer) {
            let offset = block * BLOCK;
            disk.write_at(offset, &content(offset, BLOCK as usize))
                .unwrap();
        }
        disk.seal(&paths[layer as usize + 1]).unwrap();
    }
    drop(disk);
    // The last path is an empty top; the chain below it is what the reads go through.
    std::fs::remove_file(&paths[depth as usize]).unwrap();
    paths[..depth as usize].to_vec()
}

/// Opens `chain` with a fresh empty top (replacing any earlier one).
fn with_fresh_top(chain: &[PathBuf], top: &Path) -> Disk {
    let _ = std::fs::remove_file(top);
    let below = Disk::open_read_only(chain).unwrap();
    let parent = below.layers().last().unwrap().as_parent();
    create_layer(
        top,
        &NewLayer {
            id: Id::random(),
            parent,
            geometry: below.geometry(),
        },
    )
    .unwrap();
    let mut paths = chain.to_vec();
    paths.push(top.to_path_buf());
    Disk::open(&paths).unwrap()
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn io_table(dir: &Path, iters: usize) {
    let region = env_u64("DISK_BENCH_REGION_MIB", 256) * MIB;
    let io_bytes = env_u64("DISK_BENCH_IO_MIB", 256) * MIB;
    let disk_bytes = region * 2;
    let depths = [1u64, 4, 16];

    let raw_path = dir.join("raw");
    {
        let raw = File::create(&raw_path).unwrap();
        raw.set_len(disk_bytes).unwrap();
        for block in 0..region / BLOCK {
            raw.write_all_at(&content(block * BLOCK, BLOCK as usize), block * BLOCK)
                .unwrap();
        }
        raw.sync_all().unwrap();
    }
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&raw_path)
        .unwrap();
    let chains: Vec<Vec<PathBuf>> = depths
        .iter()
        .map(|&d| build_chain(dir, d, disk_bytes, region))
        .collect();
    let top = dir.join("top");

    println!(
        "| I/O | raw file | depth 1 | depth 4 | depth 16 | depth 16 / depth 1 (time) | depth 1 / raw (time) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for write in [false, true] {
        for pattern in [Pattern::Sequential, Pattern::Random] {
            for size in [4 * KIB, 64 * KIB] {
                let count = io_bytes / size;
                let offs = offsets(pattern, size, count, region, 0x5eed ^ size);
                let mut times: Vec<Vec<Duration>> = vec![Vec::new(); 1 + depths.len()];
                let mut again: Vec<Vec<Duration>> = vec![Vec::new(); 1 + depths.len()];
                for iter in 0..iters + 1 {
                    let mut run = |slot: usize, t: &dyn Target| {
                        let d = if write {
                            time_writes(t, &offs, size as usize)
                        } else {
                            time_reads(t, &offs, size as usize)
                        };
                        let d_again = (!write).then(|| time_reads(t, &offs, size as usize));
                        // The first round warms the page cache and is not counted.
                        if iter > 0 {
                            times[slot].push(d);
                            again[slot].extend(d_again);
                        }
                    };
                    run(0, &raw);
                    for (i, chain) in chains.iter().enumerate() {
                        let disk = with_fresh_top(chain, &top);
                        run(i + 1, &disk);
                    }
                }
                let name = format!(
                    "{} {} {} KiB",
                    if pattern == Pattern::Sequential {
                        "seq"
                    } else {
                        "rand"
                    },
                    if write { "write" } else { "read" },
                    size / KIB
                );
                print_row(&name, times, io_bytes);
                if !write {
                    print_row(&format!("{name}, again"), again, io_bytes);
                }
            }
        }
    }
    let _ = std::fs::remove_file(&top);
}

/// One row of the I/O table: the median of each column's times, and the ratios.
fn print_row(name: &str, times: Vec<Vec<Duration>>, io_bytes: u64) {
    let med: Vec<Duration> = times.into_iter().map(median).collect();
    let cells: Vec<String> = med
        .iter()
        .map(|d| format!("{:.0} MiB/s", mib_s(io_bytes, *d)))
        .collect();
    println!(
        "| {name} | {} | {:.2}x | {:.2}x |",
        cells.join(" | "),
        med[3].as_secs_f64() / med[1].as_secs_f64(),
        med[1].as_secs_f64() / med[0].as_secs_f64()
    );
}

fn qemu(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn merge_table(dir: &Path, gib: u64, iters: usize) {
    let have_qemu = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let bytes = gib << 30;
    let disk_bytes = bytes * 2;
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..iters {
        // Ours: an empty base and a delta holding `bytes` of data, merged into the base.
        let (base, delta) = (dir.join("m-base"), dir.join("m-delta"));
        {
            let disk = Disk::create(&base, Geometry::new(disk_bytes)).unwrap();
            disk.seal(&delta).unwrap();
            let chunk = vec![0x5au8; MIB as usize];
            for off in (0..bytes).step_by(MIB as usize) {
                disk.write_at(off, &chunk).unwrap();
            }
            disk.flush().unwrap();
        }
        let disk = Disk::open(&[&base, &delta]).unwrap();
        let start = Instant::now();
        let out = disk.merge(0, MergeInto::Parent).unwrap();
        ours.push(start.elapsed());
        drop(disk);
        std::fs::remove_file(out.unused).unwrap();
        std::fs::remove_file(&base).unwrap();

        if have_qemu {
            let (qbase, qdelta) = (dir.join("m-base.qcow2"), dir.join("m-delta.qcow2"));
            let (qb, qd) = (qbase.to_str().unwrap(), qdelta.to_str().unwrap());
            qemu(&["create", "-q", "-f", "qcow2", qb, &disk_bytes.to_string()]);
            qemu(&["create", "-q", "-f", "qcow2", "-b", qb, "-F", "qcow2", qd]);
            let status = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", &format!("write -P 0x5a 0 {bytes}"), qd])
                .output()
                .unwrap();
            assert!(status.status.success());
            let start = Instant::now();
            qemu(&["commit", "-q", "-f", "qcow2", qd]);
            theirs.push(start.elapsed());
            std::fs::remove_file(&qbase).unwrap();
            std::fs::remove_file(&qdelta).unwrap();
        }
    }
    println!();
    println!("| merge of a {gib} GiB delta into its parent | time | GiB/s |");
    println!("|---|---:|---:|");
    let ours = median(ours);
    println!(
        "| snap-disk merge (MergeInto::Parent, synced) | {:.2} s | {:.2} |",
        ours.as_secs_f64(),
        gib as f64 / ours.as_secs_f64()
    );
    if have_qemu {
        let theirs = median(theirs);
        println!(
            "| qemu-img commit (qcow2 overlay into qcow2 base) | {:.2} s | {:.2} |",
            theirs.as_secs_f64(),
            gib as f64 / theirs.as_secs_f64()
        );
        println!(
            "| ratio snap-disk / qemu-img (time) | {:.2}x | |",
            ours.as_secs_f64() / theirs.as_secs_f64()
        );
    } else {
        println!("| qemu-img commit | not run: qemu-img not found | |");
    }
}

fn main() {
    let iters = env_u64("DISK_BENCH_ITERS", 5).max(1) as usize;
    let base = std::env::var_os("DISK_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = tempfile::tempdir_in(base).unwrap();
    println!(
        "snap-disk bench: 64 KiB blocks, median of {iters} runs, files in {}",
        dir.path().display()
    );
    println!();
    io_table(dir.path(), iters);
    let gib = env_u64("DISK_BENCH_MERGE_GIB", 1);
    if gib > 0 {
        merge_table(
            dir.path(),
            gib,
            env_u64("DISK_BENCH_MERGE_ITERS", 3).max(1) as usize,
        );
    }
}
