//! Builds the freestanding test guest from `guest/` into a flat binary in `OUT_DIR`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is gcc/binutils installed?)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let cc = env::var("SNAP_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    let elf = out.join("test_guest.elf");
    let bin = out.join("test_guest.bin");
    for f in ["guest/start.S", "guest/main.c", "guest/guest.ld"] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=SNAP_GUEST_CC");
    run(Command::new(&cc)
        .args([
            "-O2",
            "-ffreestanding",
            "-fno-pic",
            "-fno-pie",
            "-no-pie",
            "-mgeneral-regs-only",
            "-mno-red-zone",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-nostdlib",
            "-static",
            "-Wall",
            "-Werror",
            "-Wl,--build-id=none",
            "-T",
            "guest/guest.ld",
            "guest/start.S",
            "guest/main.c",
            "-o",
        ])
        .arg(&elf));
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&bin));
}
