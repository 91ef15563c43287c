//! Demo: boots the test guest, snapshots it mid-run, lets it finish, then restores the snapshot into
//! a new VM and reverts the original to it, checking that both continue exactly as the original did.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use snap_vmm::{TestGuest, Vm, VmConfig, VmExit, snapshot};

/// Boot the test guest, snapshot it, restore it, and show that it continues identically.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Ticks the guest runs in all.
    #[arg(long, default_value_t = 30)]
    ticks: u64,
    /// Take the snapshot once this many tick lines were printed.
    #[arg(long, default_value_t = 10)]
    snapshot_at: usize,
    /// Pages in the guest's working set.
    #[arg(long, default_value_t = 1024)]
    working_set_pages: u64,
    /// Where to write the snapshot (default: a fresh temporary directory).
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
    };
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("snap-demo-{}", std::process::id()));
            tmp.clone()
        }
    };

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
    if !vm.serial_output().wait_for_lines(args.snapshot_at, TIMEOUT) {
        return Err("the guest did not reach the snapshot point".into());
    }
    let t = Instant::now();
    vm.pause();
    let paused = t.elapsed();
    let cut = vm.serial_output().len();
    let lines_at_cut = vm.serial_output().lines();
    let t = Instant::now();
    snapshot::save(&vm, &dir)?;
    println!(
        "paused after {lines_at_cut} lines (pause took {}), saved state and memory to {} ({})",
        ms(paused),
        dir.display(),
        ms(t.elapsed())
    );
    run_to_end(&vm)?;
    let original = vm.serial_output().bytes();
    let original_memory = vm.memory().to_vec();
    let tail = String::from_utf8_lossy(&original[cut..]).into_owned();
    println!(
        "original finished; {} lines after the snapshot, last: {}",
        tail.lines().count(),
        tail.lines().last().unwrap_or("")
    );

    let t = Instant::now();
    let restored = snapshot::restore(&dir)?;
    println!("restored the snapshot into a new VM ({})", ms(t.elapsed()));
    run_to_end(&restored)?;
    let same_output = restored.serial_output().bytes() == original[cut..];
    let same_memory = restored.memory().to_vec() == original_memory;
    println!(
        "new VM: serial output after the snapshot identical: {same_output}; guest memory identical: {same_memory}"
    );

    vm.pause();
    let before = vm.serial_output().len();
    let t = Instant::now();
    snapshot::revert(&vm, &dir)?;
    println!(
        "reverted the original VM to the snapshot ({})",
        ms(t.elapsed())
    );
    run_to_end(&vm)?;
    let reverted = vm.serial_output().bytes();
    let same_revert = reverted[before..] == original[cut..];
    let same_revert_memory = vm.memory().to_vec() == original_memory;
    println!(
        "reverted VM: output repeats exactly: {same_revert}; guest memory identical: {same_revert_memory}"
    );
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if same_output && same_memory && same_revert && same_revert_memory {
        println!("OK");
        Ok(())
    } else {
        Err("a restored VM diverged from the original".into())
    }
}
