//! The writer the crash test kills: opens (or creates) the chain of layers `0`, `1`, ... in a
//! directory and writes, flushes and seals at random until it is killed, announcing each step
//! on stdout so the test knows what may and what must have reached the disk:
//!
//! - `R` the disk is open;
//! - `W <k> <offset> <len>` before write `k` (its bytes are [`data`]`(seed, k, len)`);
//! - `f <k>` before a flush, when `k` writes have completed; `F <k>` after it returned;
//! - `s <k>` before a seal, `S <k>` after it returned.
//!
//! Usage: `snap-disk-crash-writer <dir> <seed> <disk bytes> <block size>`.

use std::io::Write;
use std::path::Path;

use snap_core::Id;
use snap_disk::{Disk, Geometry, NewLayer, create_layer, layer_info};

mod plan;

use plan::{chain, data};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        return Err("usage: snap-disk-crash-writer <dir> <seed> <disk bytes> <block size>".into());
    }
    let dir = Path::new(&args[1]);
    let seed: u64 = args[2].parse()?;
    let geometry = Geometry {
        disk_bytes: args[3].parse()?,
        block_size: args[4].parse()?,
    };
    let mut paths = chain(dir);
    let disk = if paths.is_empty() {
        Disk::create(&dir.join("0"), geometry)?
    } else {
        // A crash between sealing the top and creating the next leaves a sealed top.
        let top = layer_info(paths.last().expect("non-empty"))?;
        if top.sealed() {
            let next = dir.join(paths.len().to_string());
            let new = NewLayer {
                id: Id::random(),
                parent: top.as_parent(),
                geometry,
            };
            create_layer(&next, &new)?;
            paths.push(next);
        }
        Disk::open(&paths)?
    };
    let mut layers = paths.len().max(1);
    let mut out = std::io::stdout().lock();
    writeln!(out, "R")?;
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let sectors = geometry.disk_bytes / 512;
    let mut k = 0u64;
    loop {
        let roll = next() % 100;
        if roll < 85 {
            let start = next() % sectors;
            let n = 1 + next() % 256.min(sectors - start);
            let (offset, len) = (start * 512, (n * 512) as usize);
            writeln!(out, "W {k} {offset} {len}")?;
            disk.write_at(offset, &data(seed, k, len))?;
            k += 1;
        } else if roll < 97 || layers >= 8 {
            writeln!(out, "f {k}")?;
            disk.flush()?;
            writeln!(out, "F {k}")?;
        } else {
            writeln!(out, "s {k}")?;
            layers += 1;
            disk.seal(&dir.join((layers - 1).to_string()))?;
            writeln!(out, "S {k}")?;
        }
    }
}
