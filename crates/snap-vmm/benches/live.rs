//! The pause of a snapshot, for guests of growing size, in the same run:
//! - write-protect (live): the pause of [`Vm::begin_snapshot_live`] after
//!   [`Vm::prepare_live_snapshot`], from the pause request to the resume;
//! - the copy path: pause, [`Vm::begin_snapshot`] and copying the pages out, then resume (what
//!   snapd does up to `--copy-before-resume-mib`; above it the pause also covers the layer's
//!   write);
//! - QEMU's background-snapshot (userfaultfd write-protect too) for a VM of the same size and
//!   content: its own `downtime` figure, from `query-migrate`, when `qemu-system-x86_64` is
//!   installed.
//!
//! Guests are half filled host-side (every other 64 KiB of memory holds data). Full snapshots
//! at every size, then diffs of 1%, 10% and 50% of memory at 1 GiB. For each size, one live
//! snapshot is also written whole while the guest runs: the total time, the pages the fault
//! path kept, and the guest's ticks per second during the copy against its rate before.
//!
//! Run: `cargo bench -p snap-vmm --bench live` (SNAP_BENCH_SIZES_MIB=256,1024,4096,16384,
//! SNAP_BENCH_ITERS=7, SNAP_BENCH_COPY_MAX_MIB=4096: larger guests skip the copy path, which
//! needs minutes to touch the copy's fresh memory).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snap_mem::layer::PageSource;
use snap_vmm::{LayerOptions, TestGuest, Vm, VmConfig};

mod common;

use common::{env_list, env_u64, kvm_available, median};

const MIB: u64 = 1 << 20;
const FILL_CHUNK: u64 = 64 << 10;

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn p99(v: &mut [Duration]) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// Fills every other 64 KiB chunk of `[0, size)` through `write` with bytes that differ per
/// chunk.
fn fill_half(size: u64, mut write: impl FnMut(u64, &[u8])) {
    let mut chunk = vec![0u8; FILL_CHUNK as usize];
    let mut off = 0;
    while off < size {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (off / FILL_CHUNK + i as u64 / 8) as u8 | 1;
        }
        write(off, &chunk);
        off += 2 * FILL_CHUNK;
    }
}

/// A running VM of `size` bytes whose guest runs long, its memory half filled host-side.
fn busy_vm(size: u64) -> Vm {
    let config = VmConfig {
        memory_bytes: size,
        vcpus: 1,
    };
    let guest = TestGuest {
        working_set_pages: 256,
        mutations_per_tick: 64,
        ticks: 200_000,
        ..TestGuest::default()
    };
    let vm = Vm::create(config, &guest.boot_image(&config).unwrap()).unwrap();
    // The guest's own program and working set sit low in memory: fill above them.
    let floor = 16 * MIB;
    fill_half(size - floor, |off, data| {
        vm.memory().write_at_offset(floor + off, data).unwrap();
    });
    vm.resume().unwrap();
    assert!(
        vm.serial_output()
            .wait_for_lines(1, Duration::from_secs(60))
    );
    vm
}

/// The pause of one live snapshot (its layer not written: the snapshot is dropped, which lifts
/// every protection and leaves the pages pending).
fn live_pause(vm: &Vm, full: bool, parent: Option<&snap_mem::layer::LayerInfo>) -> Duration {
    let live = vm.prepare_live_snapshot(full).unwrap();
    let at = Instant::now();
    vm.pause();
    let pending = vm.begin_snapshot_live(live, parent, &[]).unwrap();
    vm.resume().unwrap();
    let pause = at.elapsed();
    drop(pending);
    pause
}

/// The pause of one snapshot on the copy path (pages copied out, then resume).
fn copy_pause(vm: &Vm, parent: Option<&snap_mem::layer::LayerInfo>) -> Duration {
    let at = Instant::now();
    vm.pause();
    let mut pending = vm.begin_snapshot(parent, &[]).unwrap();
    pending.copy_pages().unwrap();
    vm.resume().unwrap();
    let pause = at.elapsed();
    drop(pending);
    pause
}

/// Ticks the guest printed per second over `d`.
fn tick_rate(vm: &Vm, d: Duration) -> f64 {
    let before = vm.serial_output().text().lines().count();
    std::thread::sleep(d);
    let after = vm.serial_output().text().lines().count();
    (after - before) as f64 / d.as_secs_f64()
}

/// One live full snapshot written whole beside the running guest: total time, the fault path's
/// counters, and the guest's tick rate during the copy against before it.
fn live_write(vm: &Vm, dir: &Path) -> (Duration, snap_mem::protect::ProtectStats, f64, f64) {
    let before = tick_rate(vm, Duration::from_secs(2));
    let at = Instant::now();
    let live = vm.prepare_live_snapshot(true).unwrap();
    vm.pause();
    let pending = vm.begin_snapshot_live(live, None, &[]).unwrap();
    vm.resume().unwrap();
    let lines_at = vm.serial_output().text().lines().count();
    let copy_start = Instant::now();
    let layer = pending
        .write_memory(&dir.join("live.mlayer"), &LayerOptions::default())
        .unwrap();
    let copy_time = copy_start.elapsed();
    let during =
        (vm.serial_output().text().lines().count() - lines_at) as f64 / copy_time.as_secs_f64();
    let stats = pending.live_stats().unwrap();
    pending.commit(&layer);
    (at.elapsed(), stats, during, before)
}

/// QEMU's background snapshot of a VM of `size` bytes whose memory file is half filled like
/// ours: its downtime as QEMU reports it, or None without qemu-system-x86_64.
fn qemu_downtime(size: u64, dir: &Path) -> Option<Duration> {
    let qemu = which("qemu-system-x86_64")?;
    let image = dir.join("qemu-ram");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(size).unwrap();
    fill_half(size, |off, data| {
        std::os::unix::fs::FileExt::write_all_at(&file, data, off).unwrap();
    });
    drop(file);
    let qmp = dir.join("qmp.sock");
    let mib = size / MIB;
    let mut child: Child = Command::new(qemu)
        .args(["-machine", "q35,accel=kvm", "-m"])
        .arg(format!("{mib}M"))
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=ram,size={mib}M,mem-path={},share=on",
            image.display()
        ))
        .args([
            "-machine",
            "memory-backend=ram",
            "-S",
            "-nodefaults",
            "-display",
            "none",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&qmp) {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut call = |cmd: &str| -> serde_json::Value {
        writeln!(writer, "{cmd}").unwrap();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    };
    // (The greeting, and any event, is skipped by `call`.)
    call(r#"{"execute":"qmp_capabilities"}"#);
    call(r#"{"execute":"cont"}"#);
    std::thread::sleep(Duration::from_millis(500));
    call(
        r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"background-snapshot","state":true}]}}"#,
    );
    let out = dir.join("qemu-snapshot");
    let r = call(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {}"}}}}"#,
        out.display()
    ));
    let mut downtime = None;
    if r.get("error").is_none() {
        let deadline = Instant::now() + Duration::from_secs(600);
        while Instant::now() < deadline {
            let s = call(r#"{"execute":"query-migrate"}"#);
            let ret = &s["return"];
            match ret["status"].as_str() {
                Some("completed") => {
                    downtime = ret["downtime"].as_u64().map(Duration::from_millis);
                    break;
                }
                Some("failed") | Some("cancelled") => {
                    eprintln!("qemu background snapshot: {ret}");
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    } else {
        eprintln!("qemu migrate: {r}");
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&out);
    downtime
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

fn main() {
    if !kvm_available("live") {
        return;
    }
    let sizes = env_list("SNAP_BENCH_SIZES_MIB", "256,1024,4096,16384");
    let iters = env_u64("SNAP_BENCH_ITERS", 7) as usize;
    let copy_max = env_u64("SNAP_BENCH_COPY_MAX_MIB", 4096);
    let dir = tempfile::tempdir().unwrap();

    println!("\nFull snapshots, memory half filled: pause (median and p99 of {iters})\n");
    println!("| memory | write-protect | copy path | QEMU background-snapshot downtime |");
    println!("|---|---|---|---|");
    let mut totals = Vec::new();
    for &mib in &sizes {
        let vm = busy_vm(mib * MIB);
        let mut live: Vec<Duration> = (0..iters).map(|_| live_pause(&vm, true, None)).collect();
        let copy = if mib <= copy_max {
            let mut v: Vec<Duration> = (0..iters.min(3)).map(|_| copy_pause(&vm, None)).collect();
            format!("{} (p99 {})", ms(median(&mut v)), ms(p99(&mut v)))
        } else {
            "(skipped)".into()
        };
        totals.push((mib, live_write(&vm, dir.path())));
        drop(vm);
        let qemu =
            qemu_downtime(mib * MIB, dir.path()).map_or_else(|| "(not measured)".to_string(), ms);
        println!(
            "| {mib} MiB | {} (p99 {}) | {copy} | {qemu} |",
            ms(median(&mut live)),
            ms(p99(&mut live))
        );
    }

    println!("\nOne live full snapshot written whole beside the running guest\n");
    println!(
        "| memory | total | pages kept by the fault path | guest held on faults | guest ticks/s during the copy | before |"
    );
    println!("|---|---|---|---|---|---|");
    for (mib, (total, stats, during, before)) in totals {
        println!(
            "| {mib} MiB | {} | {} | {} | {during:.1} | {before:.1} |",
            ms(total),
            stats.saved_ahead,
            ms(stats.held)
        );
    }

    println!("\nDiffs of a 1 GiB guest: pause (median of {iters})\n");
    println!("| dirty | write-protect | copy path |");
    println!("|---|---|---|");
    let vm = busy_vm(1024 * MIB);
    // The base: a full snapshot, written.
    vm.pause();
    let base = vm.begin_snapshot(None, &[]).unwrap();
    let layer = base
        .write_memory(&dir.path().join("base.mlayer"), &LayerOptions::default())
        .unwrap();
    base.commit(&layer);
    vm.resume().unwrap();
    let pages = vm.memory().page_count();
    for pct in [1u64, 10, 50] {
        // Dirty pct% of memory host-side (spread over it); they stay pending across the
        // measured snapshots, which are dropped.
        let step = 100 / pct;
        let page = vec![0x5au8; 4096];
        for p in (4096..pages).step_by(step as usize) {
            vm.memory().write_at_offset(p * 4096, &page).unwrap();
        }
        let mut live: Vec<Duration> = (0..iters)
            .map(|_| live_pause(&vm, false, Some(&layer)))
            .collect();
        let mut copy: Vec<Duration> = (0..iters.min(3))
            .map(|_| copy_pause(&vm, Some(&layer)))
            .collect();
        println!(
            "| {pct}% | {} (p99 {}) | {} |",
            ms(median(&mut live)),
            ms(p99(&mut live)),
            ms(median(&mut copy))
        );
    }
}
