//! Benchmarks of the VM runtime, each beside a baseline measured in the same run:
//! - VM create to first guest instruction, beside a bare KVM VM (one memslot, one vCPU in real
//!   mode) created and run to its first instruction;
//! - pause latency (request until every vCPU is parked) for 1 and 4 vCPUs, beside a bare signal
//!   kick of a thread in KVM_RUN;
//! - save and restore for 1 and 4 vCPUs: vCPU/device state alone, and with a full memory layer,
//!   beside writing + fsyncing and reading back the same number of bytes.
//!
//! Run: `cargo bench -p snap-vmm --bench vmm` (SNAP_BENCH_MEMORY_MIB, SNAP_BENCH_ITERS to change).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use snap_vmm::{LayerChain, LayerOptions, TestGuest, Vm, VmConfig, VmState, vcpu};

mod common;

use common::{env_u64, kvm_available, median};

fn p99(v: &mut [Duration]) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn row(name: &str, ours: Duration, base_name: &str, base: Duration) {
    let f = if ours < Duration::from_millis(1) {
        us
    } else {
        ms
    };
    println!(
        "| {name} | {} | {base_name} | {} | {:.2}x |",
        f(ours),
        f(base),
        ours.as_secs_f64() / base.as_secs_f64()
    );
}

struct AnonMemory(*mut libc::c_void, usize);

impl AnonMemory {
    fn new(len: usize) -> Self {
        // SAFETY: anonymous private mapping with no address hint; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self(p, len)
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is valid for `len` bytes and uniquely borrowed through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.cast(), self.1) }
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

/// A bare KVM VM: one memslot over `mem`, one real-mode vCPU at 0x1000 running `code`.
fn bare_vm(mem: &mut AnonMemory, code: &[u8]) -> (kvm_ioctls::VmFd, kvm_ioctls::VcpuFd) {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    mem.bytes()[0x1000..0x1000 + code.len()].copy_from_slice(code);
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem.1 as u64,
        userspace_addr: mem.0 as u64,
    };
    // SAFETY: the region is the live mapping `mem`, which outlives the VM in every caller.
    unsafe { vm.set_user_memory_region(region).unwrap() };
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
    (vm, vcpu)
}

fn bench_create(iters: usize, memory: u64) {
    let config = VmConfig {
        memory_bytes: memory,
        vcpus: 1,
    };
    let image = TestGuest::default().boot_image(&config).unwrap();
    let mut ours = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        let vm = Vm::create(config, &image).unwrap();
        vm.resume().unwrap();
        let first = vm.wait_first_instruction(Duration::from_secs(10)).unwrap();
        ours.push(first - t);
        drop(vm);

        let t = Instant::now();
        let mut mem = AnonMemory::new(memory as usize);
        let (_vm, mut vcpu) = bare_vm(&mut mem, &[0xe6, 0xf5, 0xf4]);
        loop {
            if let VcpuExit::IoOut(0xf5, _) = vcpu.run().unwrap() {
                break;
            }
        }
        bare.push(t.elapsed());
    }
    row(
        &format!(
            "create to first instruction, {} MiB, 1 vCPU (median)",
            memory >> 20
        ),
        median(&mut ours),
        "bare KVM VM to first instruction",
        median(&mut bare),
    );
}

/// Median time from pthread_kill to a bare vCPU thread being back from KVM_RUN and reporting it.
fn bare_kick(iters: usize) -> (Duration, Duration) {
    vcpu::install_kick_handler().unwrap();
    let mut mem = AnonMemory::new(1 << 20);
    let (_vm, mut vcpu) = bare_vm(&mut mem, &[0xeb, 0xfe]); // jmp $
    let state = Arc::new((Mutex::new((0u64, 0u64)), Condvar::new())); // (exits seen, go)
    let s2 = Arc::clone(&state);
    let handle = std::thread::spawn(move || {
        let (lock, cond) = &*s2;
        let mut round = 0;
        loop {
            let _ = vcpu.run();
            round += 1;
            let mut g = lock.lock().unwrap();
            g.0 = round;
            cond.notify_all();
            while g.1 < round {
                g = cond.wait(g).unwrap();
            }
            if g.1 == u64::MAX {
                return;
            }
        }
    });
    let (lock, cond) = &*state;
    let mut lat = Vec::new();
    for round in 1..=iters as u64 {
        std::thread::sleep(Duration::from_millis(2));
        let t = Instant::now();
        // SAFETY: the thread is alive: it exits only after the final `go` below.
        unsafe { libc::pthread_kill(handle.as_pthread_t(), vcpu::kick_signal()) };
        let mut g = lock.lock().unwrap();
        while g.0 < round {
            g = cond.wait(g).unwrap();
        }
        lat.push(t.elapsed());
        g.1 = if round == iters as u64 {
            u64::MAX
        } else {
            round
        };
        cond.notify_all();
    }
    handle.join().unwrap();
    (median(&mut lat), p99(&mut lat))
}

fn long_guest(config: &VmConfig) -> snap_vmm::BootImage {
    TestGuest {
        seed: 3,
        working_set_pages: 1024,
        mutations_per_tick: 16,
        ticks: 100_000 / u64::from(config.vcpus),
        ..TestGuest::default()
    }
    .boot_image(config)
    .unwrap()
}

fn bench_pause(iters: usize, vcpus: u32, memory: u64, bare: (Duration, Duration)) {
    let config = VmConfig {
        memory_bytes: memory,
        vcpus,
    };
    let vm = Vm::create(config, &long_guest(&config)).unwrap();
    vm.resume().unwrap();
    vm.serial_output()
        .wait_for_lines(2, Duration::from_secs(30));
    let mut lat = Vec::new();
    for _ in 0..iters {
        std::thread::sleep(Duration::from_millis(2));
        let t = Instant::now();
        vm.pause();
        lat.push(t.elapsed());
        vm.resume().unwrap();
    }
    row(
        &format!("pause latency, {vcpus} vCPU (median)"),
        median(&mut lat),
        "bare KVM_RUN kick (median)",
        bare.0,
    );
    row(
        &format!("pause latency, {vcpus} vCPU (p99)"),
        p99(&mut lat),
        "bare KVM_RUN kick (p99)",
        bare.1,
    );
}

fn write_fsync(path: &std::path::Path, bytes: &[u8]) -> Duration {
    let t = Instant::now();
    let mut f = File::create(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    t.elapsed()
}

fn read_fresh(path: &std::path::Path, len: usize) -> Duration {
    let t = Instant::now();
    let mut mem = AnonMemory::new(len);
    File::open(path).unwrap().read_exact(mem.bytes()).unwrap();
    t.elapsed()
}

/// Fills guest memory beyond the test guest's own pages with incompressible bytes, as a guest that
/// has used all its memory would have.
fn fill_memory(vm: &Vm) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let start = 16u64 << 20;
    for r in vm.memory().regions() {
        let mut gpa = r.gpa.max(start);
        while gpa + chunk.len() as u64 <= r.gpa + r.len {
            vm.memory().write(gpa, &chunk).unwrap();
            gpa += chunk.len() as u64;
        }
    }
}

fn bench_save_restore(iters: usize, vcpus: u32, memory: u64, full: bool) {
    let config = VmConfig {
        memory_bytes: memory,
        vcpus,
    };
    let vm = Vm::create(config, &long_guest(&config)).unwrap();
    vm.resume().unwrap();
    vm.serial_output()
        .wait_for_lines(3, Duration::from_secs(30));
    vm.pause();
    if full {
        fill_memory(&vm);
    }
    let dir = tempfile::tempdir().unwrap();
    let (memory_file, state_file) = (
        dir.path().join("snap.mlayer"),
        dir.path().join("snap.state"),
    );
    let plain = dir.path().join("plain");
    // The baseline moves the raw bytes the snapshot covers: all of memory when full, else the
    // pages the guest touched (untouched pages are holes in memory and are not in the layer).
    let resident = vm.memory().resident_pages().unwrap().count() as usize * 4096;
    let mut payload = vm.memory().to_vec();
    payload.truncate(resident);
    let (mut state_save, mut full_save, mut base_write) = (vec![], vec![], vec![]);
    let (mut full_restore, mut revert, mut base_read) = (vec![], vec![], vec![]);
    for _ in 0..iters {
        let t = Instant::now();
        let state = vm.save().unwrap();
        state_save.push(t.elapsed());
        let _ = std::fs::remove_file(&memory_file);
        let _ = std::fs::remove_file(&state_file);
        let t = Instant::now();
        let pending = vm.begin_snapshot(None, &[]).unwrap();
        let layer = pending
            .write_memory(&memory_file, &LayerOptions::default())
            .unwrap();
        pending.write_state(&state_file).unwrap();
        pending.commit(&layer);
        full_save.push(t.elapsed());
        base_write.push(write_fsync(&plain, &payload));

        let chain = LayerChain::open(&[&memory_file]).unwrap();
        let t = Instant::now();
        vm.restore_in_place(&state, &chain).unwrap();
        revert.push(t.elapsed());
        let t = Instant::now();
        let saved = VmState::read_file(&state_file).unwrap();
        let chain = LayerChain::open(&[&memory_file]).unwrap();
        let restored = Vm::restore(&saved, &chain).unwrap();
        full_restore.push(t.elapsed());
        drop(restored);
        base_read.push(read_fresh(&plain, payload.len()));
    }
    let mib = memory >> 20;
    let what = if full { "full" } else { "sparse" };
    let moved = format!("{:.1}", payload.len() as f64 / f64::from(1 << 20));
    if !full {
        println!(
            "| save vCPU + device state, {vcpus} vCPU (median) | {} | | | |",
            us(median(&mut state_save))
        );
    }
    row(
        &format!("full snapshot (state + {mib} MiB {what} memory layer, fsync), {vcpus} vCPU"),
        median(&mut full_save),
        &format!("write + fsync {moved} MiB"),
        median(&mut base_write),
    );
    row(
        &format!("restore into a new VM, {mib} MiB {what}, {vcpus} vCPU"),
        median(&mut full_restore),
        &format!("read {moved} MiB into fresh memory"),
        median(&mut base_read),
    );
    row(
        &format!("revert in place (verify + load), {mib} MiB {what}, {vcpus} vCPU"),
        median(&mut revert),
        &format!("read {moved} MiB into fresh memory"),
        median(&mut base_read),
    );
}

fn main() {
    if !kvm_available("vmm bench") {
        return;
    }
    let memory = env_u64("SNAP_BENCH_MEMORY_MIB", 256) << 20;
    let iters = env_u64("SNAP_BENCH_ITERS", 30) as usize;
    println!("| measurement | snap-vmm | baseline (same run) | baseline | ratio |");
    println!("|---|---|---|---|---|");
    bench_create(iters, memory);
    let bare = bare_kick(iters * 3);
    for vcpus in [1, 4] {
        bench_pause(iters * 3, vcpus, memory, bare);
    }
    for full in [false, true] {
        for vcpus in [1, 4] {
            bench_save_restore(iters.div_ceil(3), vcpus, memory, full);
        }
    }
}
