//! A parallel map whose results are consumed in order: workers compress (or decompress) items
//! while one thread writes results in item order, so output is deterministic.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, PoisonError};

struct Progress {
    /// Next item a worker may take.
    next: usize,
    /// Items consumed so far.
    consumed: usize,
    /// Set on the first error: workers stop taking items.
    stop: bool,
}

/// Runs `work` on items `0..n` on `threads` scoped workers, each with its own state from
/// `init`, and hands the results to `consume` in item order on the calling thread.
///
/// At most `window` items are taken but not yet consumed, which bounds the memory held by
/// results waiting for an earlier, slower item. The first error (from `work` or `consume`)
/// stops the workers and is returned.
pub(crate) fn ordered_map<S, T, E>(
    n: usize,
    threads: usize,
    window: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, usize) -> Result<T, E> + Sync,
    mut consume: impl FnMut(usize, T) -> Result<(), E>,
) -> Result<(), E>
where
    T: Send,
    E: Send,
{
    let threads = threads.min(n);
    if threads <= 1 {
        let mut state = init();
        for i in 0..n {
            consume(i, work(&mut state, i)?)?;
        }
        return Ok(());
    }
    let window = window.max(threads);
    let progress = Mutex::new(Progress {
        next: 0,
        consumed: 0,
        stop: false,
    });
    let wake = Condvar::new();
    let lock = || progress.lock().unwrap_or_else(PoisonError::into_inner);

    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Result<T, E>)>();
        for _ in 0..threads {
            let tx = tx.clone();
            let (init, work, wake, lock) = (&init, &work, &wake, &lock);
            scope.spawn(move || {
                let mut state = init();
                loop {
                    let item = {
                        let mut p = lock();
                        while !p.stop && p.next < n && p.next >= p.consumed.saturating_add(window) {
                            p = wake.wait(p).unwrap_or_else(PoisonError::into_inner);
                        }
                        if p.stop || p.next >= n {
                            return;
                        }
                        p.next += 1;
                        p.next - 1
                    };
                    let result = work(&mut state, item);
                    let failed = result.is_err();
                    if tx.send((item, result)).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(tx);

        let mut waiting = BTreeMap::new();
        let mut consumed = 0;
        let outcome = (|| {
            while consumed < n {
                // A closed channel means a worker panicked; the scope re-raises that panic.
                let Ok((i, result)) = rx.recv() else {
                    return Ok(());
                };
                waiting.insert(i, result);
                while let Some(result) = waiting.remove(&consumed) {
                    consume(consumed, result?)?;
                    consumed += 1;
                    lock().consumed = consumed;
                    wake.notify_all();
                }
            }
            Ok(())
        })();
        lock().stop = true;
        wake.notify_all();
        outcome
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_arrive_in_order_and_errors_stop_the_run() {
        for threads in [1, 2, 5] {
            let mut seen = Vec::new();
            ordered_map(
                100,
                threads,
                3,
                || 0u64,
                |calls, i| {
                    *calls += 1;
                    // Uneven work, so later items often finish first.
                    std::thread::sleep(std::time::Duration::from_micros((i % 7) as u64 * 50));
                    Ok::<_, String>(i * 2)
                },
                |i, v| {
                    assert_eq!(v, i * 2);
                    seen.push(i);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(seen, (0..100).collect::<Vec<_>>());

            let err = ordered_map(
                100,
                threads,
                4,
                || (),
                |(), i| {
                    if i == 37 {
                        Err(format!("item {i}"))
                    } else {
                        Ok(i)
                    }
                },
                |_, _| Ok(()),
            )
            .unwrap_err();
            assert_eq!(err, "item 37");
        }
    }
}
