//! Writes the seed corpus of every fuzz target with the project's own writers:
//! `cargo run --manifest-path fuzz/seeds/Cargo.toml [-- OUT_DIR]` (default `fuzz/corpus`).
//! Each seed is named `seed-<what>`, so regenerating replaces the seeds and leaves the inputs
//! the fuzzer added alone.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use snap_core::{FormatSpec, Id};
use snap_disk::{Disk, Geometry};
use snap_mem::layer::{LayerChain, LayerOptions, NewLayer, PAGE, write_layer};
use snap_mem::lazy::WindowSource;
use snap_mem::working_set::WorkingSet;
use snap_vmm::serial::SerialDeviceState;
use snap_vmm::virtio::VirtioBlkState;
use snap_vmm::virtio::blk::{QUEUE_MAX_SIZE, QueueSavedState};
use snap_vmm::{VcpuState, VmConfig, VmExit, VmState};

type Result<T = ()> = std::result::Result<T, Box<dyn Error>>;

struct Out {
    dir: PathBuf,
    scratch: PathBuf,
}

impl Out {
    fn seed(&self, target: &str, what: &str, bytes: &[u8]) -> Result {
        let dir = self.dir.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(format!("seed-{what}")), bytes)?;
        Ok(())
    }

    fn file(&self, target: &str, what: &str, path: &Path) -> Result {
        self.seed(target, what, &fs::read(path)?)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.scratch.join(name)
    }
}

fn core_header(out: &Out) -> Result {
    // The spec of the target, at the versions it reads; the first byte picks the payload cap
    // (index into [0, 1, 64, 4096, 1 MiB, unlimited]).
    let spec = |version| FormatSpec {
        name: "fuzzed",
        magic: *b"SNAPFUZZ",
        version,
        min_version: 2,
        max_payload: u64::MAX,
    };
    let with = |cap: u8, bytes: Vec<u8>| [vec![cap], bytes].concat();
    out.seed("core_header", "empty", &with(0, spec(3).encode(b"")))?;
    out.seed(
        "core_header",
        "small",
        &with(3, spec(3).encode(b"snapshot")),
    )?;
    out.seed("core_header", "v2", &with(4, spec(2).encode(&[7; 100])))?;
    out.seed("core_header", "cap64", &with(2, spec(3).encode(&[1; 64])))?;
    let mut trailing = spec(3).encode(b"prefix");
    trailing.extend_from_slice(b"and what follows it");
    out.seed("core_header", "trailing", &with(5, trailing))?;
    Ok(())
}

/// Chunk objects as snap-remote seals them: one stored as is, one compressed.
fn remote_chunks(out: &Out) -> Result {
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (_, raw) = snap_remote::chunk::seal(&noise, 3)?;
    out.seed("remote_chunk", "raw", &raw)?;
    let (_, zstd) = snap_remote::chunk::seal(&[9u8; 65536], 3)?;
    out.seed("remote_chunk", "zstd", &zstd)?;
    Ok(())
}

/// Manifests as snap-remote encodes them: a two-layer memory chain (one frame with zero
/// entries), a disk, a state and a working set.
fn remote_manifests(out: &Out) -> Result {
    use snap_remote::manifest::{
        Blob, DiskChain, DiskLayer, Manifest, MemoryFrame, MemoryLayer, SnapshotInfo,
    };
    let c = |b: u8| snap_remote::ChunkId([b; 32]);
    let frame = |region, present: u64, data: u64, chunk| MemoryFrame {
        region,
        present: vec![present],
        data: vec![data],
        chunk,
    };
    let layer = |id: u8, frames| MemoryLayer {
        id: [id; 16],
        digest: [id; 32],
        frame_size: 256 << 10,
        zstd_level: 1,
        frames,
    };
    let m = Manifest {
        snapshot: SnapshotInfo {
            id: [1; 16],
            name: "warm".into(),
            vm_id: [2; 16],
            vm_name: "web".into(),
            parent_id: Some([3; 16]),
            labels: [("tier".to_string(), "gold".to_string())].into(),
            memory_bytes: 1 << 20,
            vcpus: 1,
            ..SnapshotInfo::default()
        },
        memory: vec![
            layer(
                4,
                vec![frame(0, 5, 5, Some(c(1))), frame(2, 1, 1, Some(c(2)))],
            ),
            layer(
                5,
                vec![frame(1, 3, 0, None), frame(3, u64::MAX, 1, Some(c(3)))],
            ),
        ],
        disks: vec![DiskChain {
            name: "root".into(),
            size_bytes: 1 << 20,
            block_size: 65536,
            layers: vec![DiskLayer {
                id: [6; 16],
                digest: [6; 32],
                blocks: vec![0, 15],
                chunks: vec![c(4), c(1)],
                crcs: vec![0x0bad_cafe, 1],
            }],
        }],
        state: Blob {
            len: 100,
            chunks: vec![c(7)],
        },
        working_set: Some(Blob {
            len: 10,
            chunks: vec![c(8)],
        }),
    };
    let (_, object) = snap_remote::manifest::encode(&m)?;
    out.seed("remote_manifest", "chain", &object)?;
    Ok(())
}

/// Memory of `pages` pages where page `i` holds data if `data(i)`.
fn memory(pages: usize, data: impl Fn(usize) -> bool) -> Vec<u8> {
    let mut m = vec![0u8; pages * PAGE];
    for (p, page) in m.chunks_exact_mut(PAGE).enumerate() {
        if data(p) {
            for (i, b) in page.iter_mut().enumerate() {
                *b = (p * 31 + i / 64) as u8;
            }
        }
    }
    m
}

fn mem_layers(out: &Out) -> Result {
    let small = LayerOptions {
        frame_size: 64 << 10,
        threads: std::num::NonZeroUsize::new(1),
        ..LayerOptions::default()
    };
    // A full layer: data pages, zero pages left out, a partial last frame.
    let pages = 64 + 3;
    let base_mem = memory(pages, |p| p % 3 == 0 || p == pages - 1);
    let full = NewLayer {
        id: Id([1; 16]),
        parent: None,
        memory_bytes: (pages * PAGE) as u64,
    };
    let base_path = out.path("base.mlayer");
    let base = write_layer(&base_path, &full, 0..pages as u64, &base_mem, &small)?;
    out.file("mem_layer", "full", &base_path)?;

    // A diff layer: changed pages, and pages zeroed since the parent (zero entries).
    let mut diff_mem = base_mem.clone();
    diff_mem[3 * PAGE..4 * PAGE].fill(0);
    diff_mem[17 * PAGE..18 * PAGE].fill(9);
    let diff = NewLayer {
        id: Id([2; 16]),
        parent: Some(base.as_parent()),
        memory_bytes: full.memory_bytes,
    };
    let diff_path = out.path("diff.mlayer");
    write_layer(&diff_path, &diff, [3, 17, 40], &diff_mem, &small)?;
    out.file("mem_layer", "diff", &diff_path)?;

    let chain_seed = |parent: &Path, child: &Path| -> Result<Vec<u8>> {
        let (p, c) = (fs::read(parent)?, fs::read(child)?);
        Ok([&(p.len() as u32).to_le_bytes()[..], &p, &c].concat())
    };
    out.seed("mem_chain", "diff", &chain_seed(&base_path, &diff_path)?)?;

    // The default frame size, and a layer with no pages at all.
    let wide = LayerOptions {
        threads: small.threads,
        ..LayerOptions::default()
    };
    let wide_mem = memory(128, |p| p == 5 || p == 70);
    let wide_layer = NewLayer {
        id: Id([3; 16]),
        parent: None,
        memory_bytes: (128 * PAGE) as u64,
    };
    let path = out.path("wide.mlayer");
    write_layer(&path, &wide_layer, 0..128, &wide_mem, &wide)?;
    out.file("mem_layer", "frame-256k", &path)?;
    write_layer(&path, &wide_layer, [0u64; 0], &wide_mem, &wide)?;
    out.file("mem_layer", "empty", &path)?;

    // Chains whose layers have other frame sizes: a wide parent under a narrow child, and the
    // other way round.
    let wide_base = write_layer(&path, &wide_layer, 0..128, &wide_mem, &wide)?;
    let mut child_mem = wide_mem.clone();
    child_mem[5 * PAGE..6 * PAGE].fill(0);
    child_mem[90 * PAGE..91 * PAGE].fill(4);
    let child_layer = NewLayer {
        id: Id([4; 16]),
        parent: Some(wide_base.as_parent()),
        memory_bytes: wide_layer.memory_bytes,
    };
    let child_path = out.path("narrow.mlayer");
    write_layer(&child_path, &child_layer, [5, 90, 91], &child_mem, &small)?;
    out.seed("mem_chain", "wide-narrow", &chain_seed(&path, &child_path)?)?;
    let narrow_base = write_layer(&path, &wide_layer, 0..128, &wide_mem, &small)?;
    let child_layer = NewLayer {
        parent: Some(narrow_base.as_parent()),
        ..child_layer
    };
    write_layer(&child_path, &child_layer, [5, 90, 91], &child_mem, &wide)?;
    out.seed("mem_chain", "narrow-wide", &chain_seed(&path, &child_path)?)?;

    // Working sets recorded from the full layer: units of one page and of four.
    let chain = LayerChain::open(&[&base_path])?;
    let tag = chain.newest().info().digest.0;
    assert_eq!(chain.window_pages(), 16);
    let ws = out.path("ws");
    WorkingSet::record(&ws, 1, &[3, 0, 1, 66, 9], &chain, tag)?;
    out.file("mem_working_set", "unit-1", &ws)?;
    WorkingSet::record(&ws, 4, &[2, 0, 16], &chain, tag)?;
    out.file("mem_working_set", "unit-4", &ws)?;
    WorkingSet::record(&ws, 16, &[], &chain, tag)?;
    out.file("mem_working_set", "empty", &ws)?;
    assert!(chain.windows_with_data().is_some());
    Ok(())
}

/// Shortens an unsealed layer's file to its slots: a writable layer keeps file space reserved
/// ahead of them, which only makes the seed larger.
fn trim(path: &Path) -> Result {
    let info = snap_disk::layer_info(path)?;
    let len = 8192 + info.slots * u64::from(info.geometry.block_size);
    fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(len)?;
    Ok(())
}

fn disk_layers(out: &Out) -> Result {
    let geometry = Geometry {
        disk_bytes: 16 * 4096 + 1024,
        block_size: 4096,
    };
    let base = out.path("0.dlayer");
    let disk = Disk::create(&base, geometry)?;
    out.file("disk_layer", "empty", &base)?;
    disk.write_at(0, &[1; 4096])?;
    disk.write_at(5 * 4096 + 512, &[2; 1024])?;
    disk.flush()?;
    // A second commit: a map chain of two chunks, one superseded slot.
    disk.write_at(0, &[3; 512])?;
    disk.write_at(16 * 4096, &[4; 1024])?;
    disk.flush()?;
    trim(&base)?;
    out.file("disk_layer", "two-commits", &base)?;

    let top = out.path("1.dlayer");
    disk.seal(&top)?;
    out.file("disk_layer", "sealed", &base)?;
    disk.write_at(2 * 4096, &[5; 4096])?;
    disk.flush()?;
    drop(disk);
    trim(&top)?;
    out.file("disk_layer", "child", &top)?;

    Ok(())
}

fn vcpu(index: u32) -> VcpuState {
    let mut v = VcpuState {
        index,
        cpuid: vec![Default::default(); 4],
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        fpu: Default::default(),
        xsave: None,
        xcrs: None,
        debug_regs: Default::default(),
        lapic: Default::default(),
        msrs: vec![Default::default(); 6],
        events: Default::default(),
    };
    for (i, e) in v.cpuid.iter_mut().enumerate() {
        e.function = [0, 1, 0xb, 0x8000_0000][i];
        e.eax = 0x16;
        e.ebx = index << 24;
    }
    for (i, m) in v.msrs.iter_mut().enumerate() {
        m.index = 0x10 + i as u32;
        m.data = 1 << i;
    }
    v.regs.rip = 0x10_0000;
    v.regs.rflags = 2;
    v.sregs.cr0 = 0x8000_0011;
    v.lapic.regs[0x20] = index as _;
    v
}

fn vm_states(out: &Out) -> Result {
    let serial = SerialDeviceState {
        baud_divisor_low: 12,
        baud_divisor_high: 0,
        interrupt_enable: 1,
        interrupt_identification: 1,
        line_control: 3,
        line_status: 0x60,
        modem_control: 8,
        modem_status: 0xb0,
        scratch: 0,
        in_buffer: b"in".to_vec(),
    };
    let one = VmState {
        config: VmConfig {
            memory_bytes: 64 << 20,
            vcpus: 1,
        },
        vcpus: vec![vcpu(0)],
        clock: Default::default(),
        irqchip: snap_vmm::state::IrqchipState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
        },
        serial,
        disks: Vec::new(),
        stopped: None,
    };
    out.seed("vm_state", "one-vcpu", &one.to_bytes())?;

    // Two vCPUs with the optional parts, a stopped guest, and a disk whose driver set up its
    // queue in the first pages of memory.
    let mut vcpus = vec![vcpu(0), vcpu(1)];
    vcpus[1].xsave = Some(Default::default());
    vcpus[1].xcrs = Some(Default::default());
    let disk = VirtioBlkState {
        disk_bytes: 1 << 20,
        device_features_sel: 0,
        driver_features_sel: 0,
        driver_features: 1 << 32,
        status: 15,
        queue_sel: 0,
        interrupt_status: 0,
        config_generation: 0,
        queue: QueueSavedState {
            max_size: QUEUE_MAX_SIZE,
            size: 16,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            next_avail: 0,
            next_used: 0,
            event_idx: false,
        },
    };
    let two = VmState {
        config: VmConfig {
            memory_bytes: 64 << 20,
            vcpus: 2,
        },
        vcpus,
        disks: vec![disk.clone(), disk],
        stopped: Some(VmExit::Finished(0)),
        serial: SerialDeviceState {
            in_buffer: Vec::new(),
            ..one.serial.clone()
        },
        ..one
    };
    out.seed("vm_state", "two-vcpus-disks", &two.to_bytes())?;
    Ok(())
}

fn main() -> Result {
    let dir = std::env::args_os().nth(1).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus"),
        PathBuf::from,
    );
    let scratch = std::env::temp_dir().join(format!("snap-fuzz-seeds-{}", std::process::id()));
    fs::create_dir_all(&scratch)?;
    let out = Out { dir, scratch };
    let result = (|| {
        core_header(&out)?;
        mem_layers(&out)?;
        disk_layers(&out)?;
        vm_states(&out)?;
        remote_chunks(&out)?;
        remote_manifests(&out)
    })();
    fs::remove_dir_all(&out.scratch)?;
    result
}
