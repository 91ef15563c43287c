//! Crash test: a writer process (the crate's `snap-disk-crash-writer`) writes, flushes and
//! seals at random and is killed with SIGKILL at a random moment, many times over the same
//! chain. After each kill the chain is opened and read whole: it must equal the disk as it was
//! before the run plus a prefix of the run's writes that ends where a flush or seal began and
//! includes every write before the last flush that returned. So no flushed write is lost and no
//! write is torn (all of it or none of it, partial-block writes included). Every layer must
//! also check clean, and the next run continues on the recovered chain (reusing its free slots).
//!
//! SIGKILL keeps the page cache, so this tests the order of our writes and the recovery, not
//! the device's flush (that is the fdatasync ordering the crate documentation argues).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use snap_disk::{Disk, check_layer};

#[path = "../src/bin/crash_writer/plan.rs"]
mod plan;

use plan::{chain, data};

struct Run {
    /// (offset, len) of each write announced, in order.
    writes: Vec<(u64, usize)>,
    /// Write counts at which a flush or seal began (a commit may hold exactly these prefixes).
    commit_points: Vec<usize>,
    /// Writes completed before the last flush or seal that returned.
    durable: usize,
    ready: bool,
}

fn parse(lines: &[String]) -> Run {
    let mut run = Run {
        writes: Vec::new(),
        commit_points: vec![0],
        durable: 0,
        ready: false,
    };
    for line in lines {
        let f: Vec<&str> = line.split(' ').collect();
        match f[0] {
            "R" => run.ready = true,
            "W" => {
                assert_eq!(f[1].parse::<usize>().unwrap(), run.writes.len());
                run.writes
                    .push((f[2].parse().unwrap(), f[3].parse().unwrap()));
            }
            "f" | "s" => run.commit_points.push(f[1].parse().unwrap()),
            "F" | "S" => run.durable = f[1].parse().unwrap(),
            other => panic!("writer said {other:?}"),
        }
    }
    run
}

/// Finds the prefix of `run`'s writes that turns `before` into `after`.
fn explain(before: &[u8], after: &[u8], run: &Run, seed: u64) -> Result<usize, String> {
    let mut state = before.to_vec();
    let mut applied = 0;
    for &point in &run.commit_points {
        for k in applied..point {
            let (offset, len) = run.writes[k];
            state[offset as usize..offset as usize + len]
                .copy_from_slice(&data(seed, k as u64, len));
        }
        applied = point;
        if point >= run.durable && state == after {
            return Ok(point);
        }
    }
    let first = state.iter().zip(after).position(|(a, b)| a != b);
    Err(format!(
        "the recovered disk is no prefix of the writes ending at a commit point at or after the \
         last returned flush ({} of {} writes, commit points {:?}); after all of them the first \
         differing byte is {first:?}",
        run.durable,
        run.writes.len(),
        run.commit_points
    ))
}

fn crash_many(block_size: u32, rounds: usize, budget: Duration) -> usize {
    let writer = env!("CARGO_BIN_EXE_snap-disk-crash-writer");
    let dir = tempfile::tempdir().unwrap();
    let disk_bytes: u64 = (4 << 20) + 1536;
    let mut model = vec![0u8; disk_bytes as usize];
    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(block_size);
    let started = Instant::now();
    let mut done = 0;
    while done < rounds && started.elapsed() < budget {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let seed = rng;
        let mut child = Command::new(writer)
            .args([
                dir.path().to_str().unwrap(),
                &seed.to_string(),
                &disk_bytes.to_string(),
                &block_size.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                if line == "R" {
                    let _ = ready_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        // Kill at a random moment after the disk is open (or give up waiting after 5 s).
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        std::thread::sleep(Duration::from_micros(200 + rng % 40_000));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        let lines = reader.join().unwrap();
        let run = parse(&lines);
        if !run.ready || status.success() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("writer failed before the kill (round {done}): {err}");
        }
        let paths = chain(dir.path());
        let disk = Disk::open_read_only(&paths)
            .unwrap_or_else(|e| panic!("round {done}: the chain does not open after a kill: {e}"));
        let mut after = vec![0u8; disk_bytes as usize];
        disk.read_at(0, &mut after).unwrap();
        drop(disk);
        if let Err(problem) = explain(&model, &after, &run, seed) {
            panic!("round {done} (seed {seed}, block size {block_size}): {problem}");
        }
        for p in &paths {
            let report = check_layer(p).unwrap();
            assert!(report.is_clean(), "round {done}: {report}");
        }
        model = after;
        done += 1;
    }
    done
}

#[test]
fn killed_writers_never_tear_or_lose_flushed_writes() {
    let budget = Duration::from_secs(20);
    let a = crash_many(64 << 10, 150, budget);
    let b = crash_many(4 << 10, 100, budget);
    println!("crash rounds: {a} with 64 KiB blocks, {b} with 4 KiB blocks");
    assert!(
        a >= 50 && b >= 50,
        "too few rounds in the time budget: {a}, {b}"
    );
}
