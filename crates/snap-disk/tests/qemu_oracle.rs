//! qemu-img as an independent oracle: the same writes go into one of our chains and into a
//! qcow2 chain built with qemu-img and qemu-io; at every snapshot point `qemu-img compare`
//! finds our raw and qcow2 exports identical to qemu's image, `qemu-img check` finds our qcow2
//! clean, and a merge (ours into the parent, qemu's `commit`) keeps them identical.

use std::path::{Path, PathBuf};
use std::process::Command;

use snap_disk::{Disk, Geometry, MergeInto, import_raw};

fn qemu_present() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed: {text}");
    text
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small deterministic generator, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Pair {
    dir: PathBuf,
    disk: Disk,
    qemu: Vec<PathBuf>,
    size: u64,
}

impl Pair {
    /// Random writes of any 512-aligned size and offset, each filled with one byte, into both.
    fn writes(&mut self, rng: &mut Rng, count: usize) {
        let sectors = self.size / 512;
        let mut commands = Vec::new();
        for _ in 0..count {
            let start = rng.next() % sectors;
            // Mostly small writes, some spanning several blocks.
            let max = if rng.next() % 4 == 0 { 1024 } else { 64 };
            let n = 1 + rng.next() % max.min(sectors - start);
            let pattern = (rng.next() % 255 + 1) as u8;
            let (offset, len) = (start * 512, n * 512);
            self.disk
                .write_at(offset, &vec![pattern; len as usize])
                .unwrap();
            commands.push(format!("write -P {pattern} {offset} {len}"));
        }
        for batch in commands.chunks(200) {
            let mut args = vec!["-f", "qcow2"];
            for c in batch {
                args.extend(["-c", c.as_str()]);
            }
            let top = self.qemu.last().unwrap().clone();
            args.push(s(&top));
            run("qemu-io", &args);
        }
    }

    fn seal(&mut self) {
        let k = self.qemu.len();
        self.disk.seal(&self.dir.join(format!("layer{k}"))).unwrap();
        let next = self.dir.join(format!("q{k}.qcow2"));
        let backing = self.qemu.last().unwrap().clone();
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                s(&backing),
                "-F",
                "qcow2",
                s(&next),
            ],
        );
        self.qemu.push(next);
    }

    /// Our chain up to layer `k` against qemu's image `k`.
    fn compare(&self, ours: &Disk, k: usize, tag: &str) {
        let raw = self.dir.join(format!("{tag}.raw"));
        let qcow = self.dir.join(format!("{tag}.qcow2"));
        ours.export_raw(&raw).unwrap();
        ours.export_qcow2(&qcow).unwrap();
        let theirs = s(&self.qemu[k]);
        let out = run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "qcow2", s(&raw), theirs],
        );
        assert!(out.contains("identical"), "{tag}: {out}");
        let out = run(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "qcow2", s(&qcow), theirs],
        );
        assert!(out.contains("identical"), "{tag}: {out}");
        let out = run("qemu-img", &["check", "-f", "qcow2", s(&qcow)]);
        assert!(out.contains("No errors were found"), "{tag}: {out}");
        std::fs::remove_file(raw).unwrap();
        std::fs::remove_file(qcow).unwrap();
    }

    fn compare_all(&self, tag: &str) {
        // Other handles of the files see what was committed.
        self.disk.flush().unwrap();
        let paths = self.disk.paths();
        assert_eq!(paths.len(), self.qemu.len());
        for k in 0..paths.len() {
            let prefix = Disk::open_read_only(&paths[..=k]).unwrap();
            self.compare(&prefix, k, &format!("{tag}-{k}"));
        }
    }
}

fn oracle(seed: u64, geometry: Geometry) {
    let dir = tempfile::tempdir().unwrap();
    let size = geometry.disk_bytes;
    let q0 = dir.path().join("q0.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&q0), &size.to_string()],
    );
    let mut pair = Pair {
        dir: dir.path().to_path_buf(),
        disk: Disk::create(&dir.path().join("layer0"), geometry).unwrap(),
        qemu: vec![q0],
        size,
    };
    let mut rng = Rng(seed);
    for round in 0..4 {
        pair.writes(&mut rng, 150);
        pair.disk.flush().unwrap();
        pair.compare(&pair.disk, round, &format!("live{round}"));
        pair.seal();
    }
    pair.writes(&mut rng, 100);
    pair.compare_all("chain");

    // Delete the snapshot of layer 1: ours merges layer 2 into its parent, qemu commits q2 into
    // q1 (keeping q2, which q3 still reads through; it reads the same either way).
    let merged = pair.disk.merge(1, MergeInto::Parent).unwrap();
    std::fs::remove_file(&merged.unused).unwrap();
    run(
        "qemu-img",
        &["commit", "-q", "-d", "-f", "qcow2", s(&pair.qemu[2])],
    );
    pair.qemu.remove(2);
    pair.compare_all("merged");

    // Import qemu's view of the newest sealed point as a raw base; it must read the same.
    let raw = dir.path().join("import.raw");
    let k = pair.qemu.len() - 2;
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            s(&pair.qemu[k]),
            s(&raw),
        ],
    );
    let base = dir.path().join("imported");
    import_raw(&raw, &base, geometry.block_size).unwrap();
    let imported = Disk::open_read_only(&[&base]).unwrap();
    pair.compare(&imported, k, "imported");
}

#[test]
fn qemu_agrees_with_our_chains() {
    if !qemu_present() {
        println!("SKIP qemu_agrees_with_our_chains: qemu-img not found");
        return;
    }
    // 64 KiB blocks and a partial last block; 4 KiB blocks; 1 MiB blocks (larger than qcow2's
    // clusters).
    oracle(
        0x1234_5678_9abc_def1,
        Geometry {
            disk_bytes: (8 << 20) + 1536,
            block_size: 64 << 10,
        },
    );
    oracle(
        0x0fed_cba9_8765_4321,
        Geometry {
            disk_bytes: 4 << 20,
            block_size: 4 << 10,
        },
    );
    oracle(
        0x5555_aaaa_1234_4321,
        Geometry {
            disk_bytes: 6 << 20,
            block_size: 1 << 20,
        },
    );
}
