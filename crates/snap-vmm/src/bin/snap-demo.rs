//! Demo: boots the test guest, takes a full snapshot and then a diff snapshot mid-run, lets it
//! finish, then restores the diff snapshot (through its chain) into a new VM and reverts the
//! original to the full one, checking that each continues exactly as the original did.
//!
//! Each snapshot is two files in the demo's directory, `<name>.state` and `<name>.mlayer` (a
//! full memory layer, or a diff over its parent's); the demo keeps the chain of layers itself.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use snap_mem::layer::LayerInfo;
use snap_vmm::{LayerChain, LayerOptions, TestGuest, Vm, VmConfig, VmExit, VmState};

/// Boot the test guest, snapshot it twice (full, then diff), restore and revert, and show that
/// it continues identically.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Ticks the guest runs in all.
    #[arg(long, default_value_t = 30)]
    ticks: u64,
    /// Take the full snapshot once this many tick lines were printed, the diff at twice as many.
    #[arg(long, default_value_t = 8)]
    snapshot_at: usize,
    /// Pages in the guest's working set.
    #[arg(long, default_value_t = 1024)]
    working_set_pages: u64,
    /// Directory to keep the snapshots in (default: a fresh temporary directory, removed after).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const TIMEOUT: Duration = Duration::from_secs(300);

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn run_to_end(vm: &Vm) -> Result<(), Box<dyn std::error::Error>> {
    vm.resume()?;
    match vm.wait_for_exit(TIMEOUT)? {
        VmExit::Finished(0) => Ok(()),
        other => Err(format!("guest stopped abnormally: {other:?}").into()),
    }
}

/// A snapshot the demo wrote: its state file and its chain of memory layers, oldest first.
struct Snapshot {
    state: PathBuf,
    layers: Vec<PathBuf>,
    layer: LayerInfo,
}

impl Snapshot {
    /// Reads its state and opens its chain of layers, checking both.
    fn open(&self) -> Result<(VmState, LayerChain), Box<dyn std::error::Error>> {
        Ok((
            VmState::read_file(&self.state)?,
            LayerChain::open(&self.layers)?,
        ))
    }
}

/// Pauses after `lines` lines and takes snapshot `name` into `dir` (a diff over `parent`, or a
/// full one); returns the output length then and the snapshot.
fn snapshot_after(
    vm: &Vm,
    lines: usize,
    dir: &Path,
    name: &str,
    parent: Option<&Snapshot>,
) -> Result<(usize, Snapshot), Box<dyn std::error::Error>> {
    if !vm.serial_output().wait_for_lines(lines, TIMEOUT) {
        return Err("the guest did not reach the snapshot point".into());
    }
    let t = Instant::now();
    vm.pause();
    let paused = t.elapsed();
    let cut = vm.serial_output().len();
    let t = Instant::now();
    let (memory, state) = (
        dir.join(format!("{name}.mlayer")),
        dir.join(format!("{name}.state")),
    );
    // The state and the pages of the layer; the pages stay pending until the commit.
    let pending = vm.begin_snapshot(parent.map(|p| &p.layer), &[])?;
    let layer = pending.write_memory(&memory, &LayerOptions::default())?;
    pending.write_state(&state)?;
    pending.commit(&layer);
    println!(
        "paused after {} lines (pause took {}); {} snapshot {}: {} pages, {} stored with data, {} KiB on disk ({})",
        vm.serial_output().lines(),
        ms(paused),
        if parent.is_some() { "diff" } else { "full" },
        memory.display(),
        layer.pages_present,
        layer.pages_stored,
        layer.stored_bytes / 1024,
        ms(t.elapsed())
    );
    vm.resume()?;
    let mut layers = parent.map_or_else(Vec::new, |p| p.layers.clone());
    layers.push(memory);
    Ok((
        cut,
        Snapshot {
            state,
            layers,
            layer,
        },
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let config = VmConfig {
        memory_bytes: args.memory_mib << 20,
        vcpus: args.vcpus,
    };
    let guest = TestGuest {
        seed: 42,
        working_set_pages: args.working_set_pages,
        mutations_per_tick: 32,
        ticks: args.ticks,
        ..TestGuest::default()
    };
    let root = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("snap-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&root)?;

    let t0 = Instant::now();
    let vm = Vm::create(config, &guest.boot_image(&config)?)?;
    vm.resume()?;
    println!(
        "created a VM: {} MiB, {} vCPUs, test guest with {} ticks ({})",
        args.memory_mib,
        args.vcpus,
        args.ticks,
        ms(t0.elapsed())
    );
    let (cut_full, full) = snapshot_after(&vm, args.snapshot_at, &root, "full", None)?;
    let (cut_diff, diff) = snapshot_after(&vm, 2 * args.snapshot_at, &root, "diff", Some(&full))?;
    run_to_end(&vm)?;
    let original = vm.serial_output().bytes();
    let original_memory = vm.memory().to_vec();
    println!(
        "original finished: {} lines, last: {}",
        vm.serial_output().lines(),
        vm.serial_output().text().lines().last().unwrap_or("")
    );

    let t = Instant::now();
    let (state, chain) = diff.open()?;
    let restored = Vm::restore(&state, &chain)?;
    println!(
        "restored the diff snapshot (chain of 2 layers) into a new VM ({})",
        ms(t.elapsed())
    );
    run_to_end(&restored)?;
    let same_output = restored.serial_output().bytes() == original[cut_diff..];
    let same_memory = restored.memory().to_vec() == original_memory;
    println!(
        "new VM: output after the snapshot identical: {same_output}; guest memory identical: {same_memory}"
    );

    let before = vm.serial_output().len();
    let t = Instant::now();
    let (state, chain) = full.open()?;
    vm.restore_in_place(&state, &chain)?;
    println!(
        "reverted the original VM to the full snapshot ({})",
        ms(t.elapsed())
    );
    run_to_end(&vm)?;
    let same_revert = vm.serial_output().bytes()[before..] == original[cut_full..];
    let same_revert_memory = vm.memory().to_vec() == original_memory;
    println!(
        "reverted VM: output repeats exactly: {same_revert}; guest memory identical: {same_revert_memory}"
    );
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    if same_output && same_memory && same_revert && same_revert_memory {
        println!("OK");
        Ok(())
    } else {
        Err("a restored VM diverged from the original".into())
    }
}
