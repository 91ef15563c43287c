//! Memory layer benchmarks, each figure beside baselines measured in the same run:
//! - full layer write of a GuestMemory filled with three contents, in GiB/s of guest memory,
//!   beside memcpy of the same bytes and plain write+fsync of the same bytes, with the stored
//!   size against the raw size;
//! - restoring (materializing) the full layer into fresh memory, beside copying the raw file
//!   into fresh memory;
//! - diff layer writes with 1k, 10k and 100k dirty pages on each memory size (they must grow
//!   with dirty pages, not with memory size), beside write+fsync of the same pages raw.
//!
//! Run: `cargo bench -p snap-mem --bench layers`. Environment: LAYER_BENCH_SIZES_GIB (default
//! "1,4"), LAYER_BENCH_REPS (runs per figure, median printed; default 3 up to 1 GiB, 1 above),
//! LAYER_BENCH_DIRTY (default "1000,10000,100000"), LAYER_BENCH_CONTENTS (default
//! "half,random,text"), LAYER_BENCH_DIR (default the temp dir).
//! Files are in the page cache when read back (warm), for the layer and the baseline alike.
//! Each figure and its baseline run alternately, each going first in every other round (see
//! `time_pair`), after an untimed round per memory size, because on the nested development
//! machine the first touch of memory the host has not backed recently is several times slower
//! than reusing memory just freed.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snap_core::Id;
use snap_mem::GuestMemory;
use snap_mem::layer::{LayerChain, LayerOptions, NewLayer, PAGE, ParentRef, Restore, write_layer};

const GIB: u64 = 1 << 30;
const CHUNK: usize = 8 << 20;

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
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

fn time_runs(reps: usize, mut f: impl FnMut() -> Duration) -> Duration {
    median((0..reps).map(|_| f()).collect())
}

/// Medians of `ours` and `base`, run alternately, each going first in every other round (`ours`
/// in the first if `ours_first`). On this (nested) machine memory the host has not backed
/// recently is several times slower to touch than memory just freed, so whichever run needs new
/// memory first would pay for both.
fn time_pair(
    reps: usize,
    ours_first: bool,
    mut ours: impl FnMut() -> Duration,
    mut base: impl FnMut() -> Duration,
) -> (Duration, Duration) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..reps {
        if (i % 2 == 0) == ours_first {
            a.push(ours());
            b.push(base());
        } else {
            b.push(base());
            a.push(ours());
        }
    }
    (median(a), median(b))
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes()[..c.len()]);
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Content {
    HalfZero,
    Random,
    Text,
}

impl Content {
    fn key(self) -> &'static str {
        match self {
            Content::HalfZero => "half",
            Content::Random => "random",
            Content::Text => "text",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Content::HalfZero => "half zero pages, half random",
            Content::Random => "random bytes",
            Content::Text => "text-like",
        }
    }
}

/// 64 MiB of English-ish text: words from a small vocabulary with capitals, numbers and
/// punctuation mixed in.
fn text_pool(rng: &mut Rng) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the", "of", "and", "to", "in", "snapshot", "memory", "page", "layer", "guest", "virtual",
        "machine", "restore", "kernel", "process", "thread", "buffer", "request", "response",
        "server", "client", "error", "value", "table", "index", "record", "time", "state", "is",
        "was", "for", "with", "on", "as", "by", "at", "from", "that", "this", "which", "system",
        "network", "file", "data", "block", "device", "queue", "cache", "load", "store", "write",
        "read", "open", "close", "config", "user", "session", "token", "http", "json", "status",
        "result", "count", "offset", "length", "address",
    ];
    let mut out = Vec::with_capacity(64 << 20);
    while out.len() < 64 << 20 {
        let r = rng.next();
        let w = WORDS[(r % WORDS.len() as u64) as usize];
        match (r >> 16) % 40 {
            0 => out.extend_from_slice(format!("{}", (r >> 24) % 100_000).as_bytes()),
            1 => {
                let mut c = w.as_bytes().to_vec();
                c[0] = c[0].to_ascii_uppercase();
                out.extend_from_slice(&c);
            }
            _ => out.extend_from_slice(w.as_bytes()),
        }
        out.extend_from_slice(match (r >> 32) % 16 {
            0 => b". ",
            1 => b", ",
            2 => b"\n",
            3 => b"=",
            _ => b" ",
        });
    }
    out.truncate(64 << 20);
    out
}

/// Fills `m` with `content` (pwrite in 8 MiB chunks; every page written, zero pages too).
fn fill(m: &GuestMemory, content: Content, text: &[u8], rng: &mut Rng) {
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0;
    while at < m.size() {
        match content {
            Content::Random => rng.fill(&mut buf),
            Content::HalfZero => {
                for page in buf.chunks_mut(PAGE) {
                    if rng.next() % 2 == 0 {
                        page.fill(0);
                    } else {
                        rng.fill(page);
                    }
                }
            }
            Content::Text => {
                let start = (rng.next() % (text.len() - CHUNK) as u64) as usize;
                buf.copy_from_slice(&text[start..start + CHUNK]);
            }
        }
        m.file().write_all_at(&buf, at).unwrap();
        at += CHUNK as u64;
    }
}

/// Copies all of `m` through its mapping into a warm 64 MiB buffer.
fn memcpy(m: &GuestMemory, buf: &mut [u8]) -> Duration {
    timed(|| {
        for r in m.regions() {
            let mut done = 0;
            while done < r.len {
                let n = (r.len - done).min(buf.len() as u64) as usize;
                m.read(r.gpa + done, &mut buf[..n]).unwrap();
                done += n as u64;
            }
        }
    })
}

/// Writes all of `m` to `path` (copied out through the mapping) and fsyncs.
fn write_raw(m: &GuestMemory, path: &Path) -> Duration {
    let _ = std::fs::remove_file(path);
    let mut buf = vec![0u8; CHUNK];
    timed(|| {
        let mut f = File::create(path).unwrap();
        for r in m.regions() {
            let mut done = 0;
            while done < r.len {
                let n = (r.len - done).min(CHUNK as u64) as usize;
                m.read(r.gpa + done, &mut buf[..n]).unwrap();
                f.write_all(&buf[..n]).unwrap();
                done += n as u64;
            }
        }
        f.sync_all().unwrap();
    })
}

/// Copies the raw file into fresh memory (std's kernel copy: copy_file_range or sendfile).
fn copy_into_fresh(raw: &Path, size: u64) -> Duration {
    let target = GuestMemory::new(size).unwrap();
    let mut src = File::open(raw).unwrap();
    let mut dst = target.file();
    timed(|| {
        src.seek(SeekFrom::Start(0)).unwrap();
        dst.seek(SeekFrom::Start(0)).unwrap();
        assert_eq!(std::io::copy(&mut src, &mut dst).unwrap(), size);
    })
}

fn gibps(bytes: u64, d: Duration) -> String {
    format!("{:.2}", bytes as f64 / GIB as f64 / d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

struct DiffRow {
    dirty: u64,
    gib: u64,
    write: Duration,
    stored: u64,
    raw: Duration,
}

/// Diff layers of `dirty` pages spread at random over `memory`, beside writing the same pages
/// raw with fsync.
fn diff_rows(
    memory: &GuestMemory,
    gib: u64,
    counts: &[u64],
    options: &LayerOptions,
    dir: &Path,
    rng: &mut Rng,
) -> Vec<DiffRow> {
    let pages = memory.size() / PAGE as u64;
    let parent = ParentRef {
        id: Id::random(),
        digest: Default::default(),
    };
    let path = dir.join("diff.mlayer");
    let raw_path = dir.join("diff.raw");
    let mut rows = Vec::new();
    for &dirty in counts {
        let mut chosen: Vec<u64> = (0..dirty * 2).map(|_| rng.next() % pages).collect();
        chosen.sort_unstable();
        chosen.dedup();
        chosen.truncate(dirty as usize);
        let layer = NewLayer {
            id: Id::random(),
            parent: Some(parent),
            memory_bytes: memory.size(),
        };
        let mut stored = 0;
        let (write, raw) = time_pair(
            3,
            true,
            || {
                let _ = std::fs::remove_file(&path);
                timed(|| {
                    stored = write_layer(&path, &layer, chosen.iter().copied(), memory, options)
                        .unwrap()
                        .stored_bytes;
                })
            },
            || {
                let mut buf = vec![0u8; PAGE];
                let _ = std::fs::remove_file(&raw_path);
                timed(|| {
                    let mut f = File::create(&raw_path).unwrap();
                    for &p in &chosen {
                        memory
                            .file()
                            .read_exact_at(&mut buf, p * PAGE as u64)
                            .unwrap();
                        f.write_all(&buf).unwrap();
                    }
                    f.sync_all().unwrap();
                })
            },
        );
        rows.push(DiffRow {
            dirty: chosen.len() as u64,
            gib,
            write,
            stored,
            raw,
        });
    }
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&raw_path);
    rows
}

fn main() {
    let sizes = env_list("LAYER_BENCH_SIZES_GIB", "1,4");
    let reps_env = std::env::var("LAYER_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok());
    let dirty_counts = env_list("LAYER_BENCH_DIRTY", "1000,10000,100000");
    let contents: Vec<Content> = [Content::HalfZero, Content::Random, Content::Text]
        .into_iter()
        .filter(|c| {
            std::env::var("LAYER_BENCH_CONTENTS").map_or(true, |only| only.contains(c.key()))
        })
        .collect();
    let dir = tempfile::tempdir_in(
        std::env::var("LAYER_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), PathBuf::from),
    )
    .unwrap();
    let options = LayerOptions {
        threads: std::env::var("LAYER_BENCH_THREADS")
            .ok()
            .and_then(|v| v.parse().ok()),
        ..LayerOptions::default()
    };
    let started = Instant::now();
    let mut rng = Rng(42);
    let text = text_pool(&mut rng);
    // Touched once, so memcpy measures warm memory.
    let mut copy_buf = vec![1u8; 64 << 20];

    println!(
        "memory layers: frame {} KiB, zstd level {}, {} threads; medians; files warm in the page cache\n",
        options.frame_size >> 10,
        options.zstd_level,
        options.thread_count()
    );
    println!(
        "| memory | content | runs | layer write GiB/s | memcpy GiB/s | write+fsync GiB/s | stored / raw | restore (materialize) GiB/s | raw file into fresh memory GiB/s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut diffs = Vec::new();
    for &gib in &sizes {
        let size = gib * GIB;
        let pages = size / PAGE as u64;
        let reps = reps_env.unwrap_or(if gib <= 1 { 3 } else { 1 });
        let memory = GuestMemory::new(size).unwrap();
        let layer_path = dir.path().join(format!("full-{gib}.mlayer"));
        let raw_path = dir.path().join(format!("raw-{gib}"));
        for (ci, content) in contents.iter().copied().enumerate() {
            fill(&memory, content, &text, &mut rng);
            let copy = time_runs(reps, || memcpy(&memory, &mut copy_buf));
            let layer = NewLayer {
                id: Id::random(),
                parent: None,
                memory_bytes: size,
            };
            let mut stored = 0;
            let mut measure = |reps: usize, ours_first: bool| {
                let (write, raw) = time_pair(
                    reps,
                    ours_first,
                    || {
                        // Like the raw baseline, start without the previous file.
                        let _ = std::fs::remove_file(&layer_path);
                        timed(|| {
                            stored = write_layer(&layer_path, &layer, 0..pages, &memory, &options)
                                .unwrap()
                                .stored_bytes;
                        })
                    },
                    || write_raw(&memory, &raw_path),
                );
                let chain = LayerChain::open(&[&layer_path]).unwrap();
                let (restore, raw_read) = time_pair(
                    reps,
                    ours_first,
                    || {
                        let target = GuestMemory::new(size).unwrap();
                        timed(|| {
                            chain.materialize_into(&target, Restore::Fresh).unwrap();
                        })
                    },
                    || copy_into_fresh(&raw_path, size),
                );
                (write, raw, restore, raw_read)
            };
            if ci == 0 {
                // Untimed round: the first use of memory the host has not backed recently is
                // several times slower and would fall on the first figures.
                measure(1, true);
            }
            let (write, raw, restore, raw_read) = measure(reps, ci % 2 == 0);
            println!(
                "| {gib} GiB | {} | {reps} | {} | {} | {} | {:.3} | {} | {} |",
                content.name(),
                gibps(size, write),
                gibps(size, copy),
                gibps(size, raw),
                stored as f64 / size as f64,
                gibps(size, restore),
                gibps(size, raw_read),
            );
        }
        let _ = std::fs::remove_file(&layer_path);
        let _ = std::fs::remove_file(&raw_path);
        // The memory holds text-like content now.
        diffs.extend(diff_rows(
            &memory,
            gib,
            &dirty_counts,
            &options,
            dir.path(),
            &mut rng,
        ));
    }

    println!(
        "\n| dirty pages | memory | diff layer write ms | per dirty page us | layer bytes | raw write+fsync of the pages ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    diffs.sort_by_key(|r| (r.dirty, r.gib));
    for r in diffs {
        println!(
            "| {} | {} GiB | {} | {:.1} | {} | {} |",
            r.dirty,
            r.gib,
            ms(r.write),
            r.write.as_secs_f64() * 1e6 / r.dirty as f64,
            r.stored,
            ms(r.raw)
        );
    }
    println!(
        "\ntotal bench time {:.0} s",
        started.elapsed().as_secs_f64()
    );
}
