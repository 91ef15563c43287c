//! Dirty-page harvest time at 1, 4 and 16 GiB of guest memory, KVM dirty bitmap against KVM dirty
//! ring, in the same run. The guest dirties a fixed working set between harvests, so a harvest
//! that grows with memory size shows up here.
//!
//! Run: `cargo bench -p snap-vmm --bench dirty` (SNAP_BENCH_ITERS, SNAP_BENCH_SIZES_GIB="1,4,16").

use std::time::{Duration, Instant};

use snap_vmm::{DirtyTracking, TestGuest, Vm, VmConfig, VmOptions};

mod common;

use common::{env_list, env_u64, kvm_available, median};

fn bench(gib: u64, dirty: DirtyTracking, iters: usize) -> (Duration, u64) {
    let config = VmConfig {
        memory_bytes: gib << 30,
        vcpus: 1,
    };
    let guest = TestGuest {
        seed: 5,
        working_set_pages: 4096,
        mutations_per_tick: 64,
        ticks: 200_000,
        ..TestGuest::default()
    };
    let options = VmOptions {
        dirty_tracking: dirty,
        ..VmOptions::default()
    };
    let vm = Vm::create_with(config, &guest.boot_image(&config).unwrap(), &options).unwrap();
    vm.harvest_dirty().unwrap();
    vm.commit_dirty();
    vm.resume().unwrap();
    let mut times = Vec::new();
    let mut pages = 0;
    for i in 0..iters {
        let lines = vm.serial_output().lines();
        vm.serial_output()
            .wait_for_lines(lines + 4, Duration::from_secs(30));
        vm.pause();
        let t = Instant::now();
        let h = vm.harvest_dirty().unwrap();
        let took = t.elapsed();
        vm.commit_dirty();
        if i > 0 {
            times.push(took);
            pages += h.count();
        }
        vm.resume().unwrap();
    }
    (median(&mut times), pages / (iters as u64 - 1))
}

fn main() {
    if !kvm_available("dirty bench") {
        return;
    }
    let iters = env_u64("SNAP_BENCH_ITERS", 21) as usize;
    let sizes = env_list("SNAP_BENCH_SIZES_GIB", "1,4,16");
    println!(
        "| guest memory | dirty pages per harvest | KVM dirty bitmap | KVM dirty ring (4096 entries) | ring / bitmap |"
    );
    println!("|---|---|---|---|---|");
    for gib in sizes {
        let (bitmap, pages) = bench(gib, DirtyTracking::Bitmap, iters);
        let (ring, ring_pages) = bench(gib, DirtyTracking::Ring { entries: 4096 }, iters);
        println!(
            "| {gib} GiB | {pages} / {ring_pages} | {:.1} us | {:.1} us | {:.2}x |",
            bitmap.as_secs_f64() * 1e6,
            ring.as_secs_f64() * 1e6,
            ring.as_secs_f64() / bitmap.as_secs_f64()
        );
    }
}
