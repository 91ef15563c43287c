//! Restore latency, eager against lazy against prefetch, at growing guest memory sizes, in the
//! same run.
//!
//! The guest touches a fixed working set (the rest of memory is never touched, so it is not in
//! the snapshot). For each size a full snapshot is taken mid-run; then, alternating modes, the
//! snapshot is restored into a new VM and resumed, and the bench records:
//! - the restore call (VM built, paused);
//! - restore call to the guest's first serial byte after resuming: the guest has run again
//!   (its instructions up to that byte, and every fault they take, included);
//! - restore call to 10 more lines of output: a fixed amount of work after the restore;
//! - for lazy and prefetch restores, the faults served and the units installed without a fault
//!   (prefetched from the recorded working set, or filled in the background).
//!
//! Run: `cargo bench -p snap-vmm --bench restore` (SNAP_BENCH_ITERS, SNAP_BENCH_SIZES_MIB, and
//! SNAP_BENCH_FRAME_KIB for the layer frame size, which is the lazy restore unit, and
//! SNAP_BENCH_DIRTY=bitmap|ring|off for the restored VMs' dirty tracking).

use std::time::{Duration, Instant};

use snap_testkit::vmm::{Saved, Snapshots};
use snap_vmm::{DirtyTracking, LayerOptions, MemoryRestore, TestGuest, Vm, VmConfig, VmOptions};

const TIMEOUT: Duration = Duration::from_secs(60);

mod common;

use common::{env_list, env_u64, kvm_available, median};

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

struct Sample {
    call: Duration,
    first_output: Duration,
    work: Duration,
    faults: u64,
    filled: u64,
}

fn restore_once(
    saved: &Saved,
    config: VmConfig,
    mode: MemoryRestore,
    prepared: bool,
    dirty: DirtyTracking,
) -> Sample {
    let options = VmOptions {
        memory_restore: mode,
        dirty_tracking: dirty,
        ..VmOptions::default()
    };
    // A prepared VM is built before the clock starts, as a pool would have it ready.
    let ready = prepared.then(|| Vm::prepare(config, &options).unwrap());
    let t = Instant::now();
    let vm = match ready {
        Some(p) => saved.restore_into(p, mode).unwrap(),
        None => saved.restore(&options).unwrap(),
    };
    let call = t.elapsed();
    vm.resume().unwrap();
    assert!(vm.serial_output().wait_for_bytes(1, TIMEOUT));
    let first_output = t.elapsed();
    assert!(vm.serial_output().wait_for_lines(10, TIMEOUT));
    let work = t.elapsed();
    let stats = vm.lazy_stats().unwrap_or_default();
    Sample {
        call,
        first_output,
        work,
        faults: stats.faults,
        filled: stats.filled + stats.prefetched,
    }
}

fn main() {
    if !kvm_available("restore bench") {
        return;
    }
    let iters = env_u64("SNAP_BENCH_ITERS", 11) as usize;
    let sizes = env_list("SNAP_BENCH_SIZES_MIB", "256,1024,4096,16384");
    let frame_kib = env_u64("SNAP_BENCH_FRAME_KIB", 256) as u32;
    let layer_options = LayerOptions {
        frame_size: frame_kib << 10,
        ..LayerOptions::default()
    };
    let dirty = match std::env::var("SNAP_BENCH_DIRTY").as_deref() {
        Ok("off") => DirtyTracking::Off,
        Ok("ring") => DirtyTracking::Ring { entries: 4096 },
        _ => DirtyTracking::Bitmap,
    };
    println!(
        "frame size (restore unit): {frame_kib} KiB; dirty tracking of restored VMs: {dirty:?}"
    );
    println!(
        "| guest memory | mode | restore call | to first guest output | to 10 lines of work | faults served | units installed without a fault |"
    );
    println!("|---|---|---|---|---|---|---|");
    for mib in sizes {
        let config = VmConfig {
            memory_bytes: mib << 20,
            vcpus: 1,
        };
        let guest = TestGuest {
            seed: 11,
            working_set_pages: 4096,
            mutations_per_tick: 64,
            ticks: 100_000,
            ..TestGuest::default()
        };
        let snaps = Snapshots::new();
        let saved = {
            let vm = Vm::create(config, &guest.boot_image(&config).unwrap()).unwrap();
            vm.resume().unwrap();
            assert!(vm.serial_output().wait_for_lines(40, TIMEOUT));
            vm.pause();
            snaps.take(&vm, None, &layer_options).unwrap()
        };
        // Record the working set once (a prefetch restore of a snapshot without one records it).
        {
            let options = VmOptions {
                memory_restore: MemoryRestore::Prefetch,
                dirty_tracking: dirty,
                ..VmOptions::default()
            };
            let vm = saved.restore(&options).unwrap();
            vm.resume().unwrap();
            assert!(vm.serial_output().wait_for_lines(10, TIMEOUT));
            vm.wait_memory_resident().unwrap();
        }
        let modes = [
            (MemoryRestore::Eager, false, "eager"),
            (MemoryRestore::Lazy, false, "lazy"),
            (MemoryRestore::Prefetch, false, "prefetch"),
            (MemoryRestore::Eager, true, "eager, prepared VM"),
            (MemoryRestore::Lazy, true, "lazy, prepared VM"),
            (MemoryRestore::Prefetch, true, "prefetch, prepared VM"),
        ];
        let n = modes.len();
        let mut samples: Vec<Vec<Sample>> = (0..n).map(|_| Vec::new()).collect();
        for i in 0..(iters + 1) * n {
            // Rotate which mode goes first; drop the first round (warm-up).
            let m = (i + i / n) % n;
            let (mode, prepared, _) = modes[m];
            let s = restore_once(&saved, config, mode, prepared, dirty);
            if i >= n {
                samples[m].push(s);
            }
        }
        for (m, &(_, _, name)) in modes.iter().enumerate() {
            let v = &mut samples[m];
            let mut call: Vec<_> = v.iter().map(|s| s.call).collect();
            let mut first: Vec<_> = v.iter().map(|s| s.first_output).collect();
            let mut work: Vec<_> = v.iter().map(|s| s.work).collect();
            let faults = v.iter().map(|s| s.faults).sum::<u64>() / v.len() as u64;
            let filled = v.iter().map(|s| s.filled).sum::<u64>() / v.len() as u64;
            println!(
                "| {mib} MiB | {name} | {} | {} | {} | {faults} | {filled} |",
                ms(median(&mut call)),
                ms(median(&mut first)),
                ms(median(&mut work))
            );
        }
    }
}
