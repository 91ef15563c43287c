//! Time to serve one page fault: the page server (window read from a layer chain, decompressed,
//! installed with UFFDIO_COPY) against a bare userfaultfd server that copies a ready buffer, in
//! the same run, at 64 KiB and 256 KiB units.
//!
//! A thread touches one byte in each window of fresh memory, in order, and times each touch; the
//! background filler is held back so that every touch is a fault.
//!
//! Run: `cargo bench -p snap-mem --bench faults` (FAULTS_BENCH_WINDOWS to change the count).

use std::time::{Duration, Instant};

use snap_core::Id;
use snap_mem::GuestMemory;
use snap_mem::layer::{LayerChain, LayerOptions, NewLayer, write_layer};
use snap_mem::lazy::{LazyOptions, PageServer};
use userfaultfd::{Event, UffdBuilder};

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

/// Touches one byte per window through the mapping and times each touch.
fn touch_each(mem: &GuestMemory, window_bytes: u64, windows: u64) -> Vec<Duration> {
    let mut b = [0u8; 1];
    (0..windows)
        .map(|w| {
            let t = Instant::now();
            mem.read(w * window_bytes + 123, &mut b).unwrap();
            t.elapsed()
        })
        .collect()
}

/// The page server over a one-layer chain of text-like data.
fn page_server(unit: u64, windows: u64, dir: &std::path::Path) -> Duration {
    let size = unit * windows;
    let src = GuestMemory::new(size).unwrap();
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog 0123456789 "
        .iter()
        .cycle()
        .take(unit as usize)
        .copied()
        .collect();
    for w in 0..windows {
        src.write_at_offset(w * unit, &text).unwrap();
        src.write_at_offset(w * unit, &w.to_le_bytes()).unwrap();
    }
    let path = dir.join(format!("layer-{unit}"));
    let options = LayerOptions {
        frame_size: unit as u32,
        ..LayerOptions::default()
    };
    let layer = NewLayer {
        id: Id::random(),
        parent: None,
        memory_bytes: size,
    };
    write_layer(&path, &layer, 0..size / 4096, &src, &options).unwrap();
    let chain = LayerChain::open(&[&path]).unwrap();
    let target = GuestMemory::new(size).unwrap();
    let lazy = LazyOptions {
        // Keep the filler out of the way: every touch must be a fault.
        fill_after_quiet: Some(Duration::from_secs(3600)),
        on_complete: Some(Box::new(|_, _| {})),
        ..LazyOptions::default()
    };
    let server = PageServer::start_with(&target, chain, lazy).unwrap();
    let mut t = touch_each(&target, unit, windows);
    assert_eq!(server.stats().faults, windows, "every touch is one fault");
    drop(server);
    median(&mut t)
}

/// A bare userfaultfd server: each fault is answered with one UFFDIO_COPY of a ready buffer.
fn bare_server(unit: u64, windows: u64) -> Duration {
    let size = unit * windows;
    let mem = GuestMemory::new(size).unwrap();
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(false)
        .user_mode_only(false)
        .create()
        .unwrap();
    let base = mem.host_address(0) as usize;
    uffd.register(base as *mut libc::c_void, size as usize)
        .unwrap();
    let buf = vec![7u8; unit as usize];
    let times = std::thread::scope(|s| {
        let server = s.spawn(|| {
            for _ in 0..windows {
                if let Some(Event::Pagefault { addr, .. }) = uffd.read_event().unwrap() {
                    let start = (addr as usize - base) / unit as usize * unit as usize + base;
                    // SAFETY: `buf` holds `unit` bytes; the destination window lies in the
                    // registered mapping, alive for the whole scope.
                    unsafe {
                        uffd.copy(
                            buf.as_ptr().cast(),
                            start as *mut libc::c_void,
                            unit as usize,
                            true,
                        )
                        .unwrap();
                    }
                }
            }
        });
        let t = touch_each(&mem, unit, windows);
        server.join().unwrap();
        t
    });
    let mut times = times;
    median(&mut times)
}

fn main() {
    // SAFETY: the userfaultfd syscall with valid flags; the fd is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        println!("SKIP faults bench: userfaultfd unavailable");
        return;
    }
    // SAFETY: closing the fd just opened.
    unsafe { libc::close(fd as i32) };
    let windows: u64 = std::env::var("FAULTS_BENCH_WINDOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir().unwrap();
    println!(
        "| unit | page server, one fault (median) | bare userfaultfd copy server (median) | ratio |"
    );
    println!("|---|---|---|---|");
    for unit in [64u64 << 10, 256 << 10] {
        let bare = bare_server(unit, windows);
        let ours = page_server(unit, windows, dir.path());
        println!(
            "| {} KiB | {} | {} | {:.2}x |",
            unit >> 10,
            us(ours),
            us(bare),
            ours.as_secs_f64() / bare.as_secs_f64()
        );
    }
}
