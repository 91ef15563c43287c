//! Long operations: admission by the [`scheduler`], a thread that runs the work, its progress,
//! cancellation and end, recorded in the catalog and told to watchers ([`events`]); and the
//! client request ids every mutating call carries ([`requests`]).
//!
//! A long call is admitted before it returns: a conflict fails the call itself with ABORTED,
//! unless the client asked to wait, in which case the call returns the operation at once in
//! state PENDING and it runs when what it needs is free (or fails if it waited too long or was
//! cancelled meanwhile).

pub mod events;
pub mod requests;
pub mod scheduler;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use snap_api::v1 as pb;

use crate::catalog::{CatalogError, Tx};
use crate::daemon::Daemon;
use crate::error::{Error, ErrorKind, Result};
use crate::ids::{OpId, SnapshotId, VmId};
use crate::now_ms;
use requests::RequestCtx;
use scheduler::{Admission, Footprint, Holder, Patience};

/// How long an operation that asked to wait may wait for what it needs.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(600);

/// How long ended operations are kept (in memory here, in the catalog until the next start).
pub const OPERATION_RETENTION_MS: i64 = 24 * 3600 * 1000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A long operation as it runs.
pub struct OpCell {
    op: Mutex<pb::Operation>,
    cancel: AtomicBool,
}

impl OpCell {
    fn new(op: pb::Operation) -> Arc<Self> {
        Arc::new(Self {
            op: Mutex::new(op),
            cancel: AtomicBool::new(false),
        })
    }

    fn get(&self) -> pb::Operation {
        lock(&self.op).clone()
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }
}

/// The operations the daemon knows: running ones, and ended ones for a day.
#[derive(Default)]
pub struct Operations {
    cells: Mutex<HashMap<OpId, Arc<OpCell>>>,
}

impl Operations {
    /// Adds an operation found in the catalog at start (one that had not ended is recorded as
    /// failed by the caller first).
    pub fn insert(&self, op: pb::Operation) {
        if let Ok(id) = op.id.parse() {
            lock(&self.cells).insert(id, OpCell::new(op));
        }
    }

    fn cell(&self, id: OpId) -> Result<Arc<OpCell>> {
        lock(&self.cells)
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::not_found("operation", id))
    }

    /// One operation.
    ///
    /// # Errors
    /// NOT_FOUND.
    pub fn get(&self, id: OpId) -> Result<pb::Operation> {
        Ok(self.cell(id)?.get())
    }

    /// Every operation, oldest first.
    pub fn list(&self) -> Vec<pb::Operation> {
        let mut ops: Vec<pb::Operation> = lock(&self.cells).values().map(|c| c.get()).collect();
        ops.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        ops
    }

    /// How many operations have not ended (pending or running).
    pub fn open(&self) -> usize {
        lock(&self.cells)
            .values()
            .filter(|c| lock(&c.op).ended_unix_ms == 0)
            .count()
    }

    /// Asks an operation to stop before its point of no return.
    ///
    /// # Errors
    /// NOT_FOUND, or FAILED_PRECONDITION once it cannot be cancelled.
    pub fn cancel(&self, id: OpId) -> Result<pb::Operation> {
        let cell = self.cell(id)?;
        let op = lock(&cell.op);
        if !op.cancellable {
            return Err(Error::precondition(format!(
                "operation {id} can no longer be cancelled (it has ended or passed its point of no return)"
            )));
        }
        cell.cancel.store(true, Ordering::Release);
        Ok(op.clone())
    }

    /// Forgets operations that ended more than [`OPERATION_RETENTION_MS`] ago.
    pub fn forget_old(&self) {
        let before = now_ms() - OPERATION_RETENTION_MS;
        lock(&self.cells).retain(|_, c| {
            let op = lock(&c.op);
            op.ended_unix_ms == 0 || op.ended_unix_ms >= before
        });
    }
}

/// What a running operation reports through, and asks whether it was cancelled.
pub struct Progress<'a> {
    daemon: &'a Daemon,
    cell: &'a OpCell,
    kind: pb::OperationKind,
    timer: Mutex<PhaseTimer>,
}

/// The phase an operation is in: its name, since when, and its trace span (closed when the
/// phase ends); and the memory mode of a restore.
#[derive(Default)]
struct PhaseTimer {
    current: Option<(&'static str, Instant, tracing::Span)>,
    mode: Option<&'static str>,
}

impl<'a> Progress<'a> {
    fn new(daemon: &'a Daemon, cell: &'a OpCell) -> Self {
        let kind = lock(&cell.op).kind();
        Self {
            daemon,
            cell,
            kind,
            timer: Mutex::default(),
        }
    }

    /// Sets the phase `phase` and byte counts, and tells watchers.
    pub fn phase(&self, phase: &'static str, done: u64, total: u64) {
        self.phase_as(phase, phase, done, total);
    }

    /// Sets the phase, shown as `text` and measured as `name` (its fixed part: `text` may name
    /// a VM), and byte counts, and tells watchers. The phase before it ends: its duration goes
    /// to the operation's `phases` and the metrics, and its trace span closes.
    pub fn phase_as(&self, name: &'static str, text: &str, done: u64, total: u64) {
        let span = tracing::debug_span!("phase", phase = name);
        let ended = lock(&self.timer)
            .current
            .replace((name, Instant::now(), span));
        let op = {
            let mut op = lock(&self.cell.op);
            if let Some((name, since, _)) = ended {
                self.phase_ended(&mut op, name, since.elapsed());
            }
            op.progress = Some(pb::Progress {
                phase: text.into(),
                bytes_done: done,
                bytes_total: total,
            });
            op.clone()
        };
        self.daemon.events.emit(pb::event::Kind::Operation(op));
    }

    fn phase_ended(&self, op: &mut pb::Operation, name: &'static str, took: Duration) {
        op.phases.push(pb::PhaseTime {
            name: name.into(),
            duration_us: took.as_micros() as u64,
        });
        self.daemon.metrics.phase_ended(self.kind, name, took);
    }

    /// Ends the phase the operation is in (it is ending).
    fn end_phase(&self) {
        let ended = lock(&self.timer).current.take();
        if let Some((name, since, _)) = ended {
            self.phase_ended(&mut lock(&self.cell.op), name, since.elapsed());
        }
    }

    /// Records that the operation restores memory as `mode` (its duration is then a restore's
    /// latency in the metrics).
    pub fn memory_mode(&self, mode: snap_vmm::MemoryRestore) {
        lock(&self.timer).mode = Some(crate::metrics::mode_label(mode));
    }

    /// Moves the current phase's progress to `done` of `total` bytes; watchers hear of it at
    /// each tenth of the way.
    pub fn advance(&self, done: u64, total: u64) {
        let op = {
            let mut op = lock(&self.cell.op);
            let Some(p) = op.progress.as_mut() else {
                return;
            };
            let tenth = |b: u64| b.saturating_mul(10) / total.max(1);
            let step = tenth(done) != tenth(p.bytes_done);
            p.bytes_done = done;
            p.bytes_total = total;
            if !step {
                return;
            }
            op.clone()
        };
        self.daemon.events.emit(pb::event::Kind::Operation(op));
    }

    /// Whether the client cancelled (and the operation may still stop).
    pub fn is_cancelled(&self) -> bool {
        self.cell.cancelled()
    }

    /// Records how a snapshot copies memory.
    pub fn set_snapshot_copy(&self, copy: pb::SnapshotCopy) {
        lock(&self.cell.op).snapshot_copy = Some(copy);
    }

    /// Records the method a snapshot copies memory with.
    pub fn snapshot_copy_method(&self, method: &str) {
        if let Some(c) = lock(&self.cell.op).snapshot_copy.as_mut() {
            c.method = method.into();
        }
    }

    /// Records what the fault path of a write-protected copy did.
    pub fn live_copy_done(&self, saved_ahead: u64, held: Duration) {
        if let Some(c) = lock(&self.cell.op).snapshot_copy.as_mut() {
            c.pages_saved_ahead = saved_ahead;
            c.fault_hold_us = held.as_micros() as u64;
        }
    }

    /// Fails with CANCELLED if the client cancelled.
    ///
    /// # Errors
    /// CANCELLED.
    pub fn check_cancel(&self) -> Result<()> {
        if self.cell.cancelled() {
            return Err(Error::cancelled());
        }
        Ok(())
    }

    /// The point of no return: after a last cancellation check the operation can no longer be
    /// cancelled.
    ///
    /// # Errors
    /// CANCELLED.
    pub fn no_return(&self) -> Result<()> {
        let mut op = lock(&self.cell.op);
        self.check_cancel()?;
        op.cancellable = false;
        Ok(())
    }

    /// Records how long the operation paused its VM.
    pub fn set_pause(&self, pause: Duration) {
        lock(&self.cell.op).pause_us = pause.as_micros() as u64;
    }

    /// Records, inside the transaction that publishes what the operation made, that it has
    /// succeeded with `result`: a crash after that commit finds the operation SUCCEEDED, never
    /// FAILED with its work published. (Its end is recorded again, with its final figures, when
    /// it returns.)
    ///
    /// # Errors
    /// The catalog's error.
    pub fn succeeded_in(
        &self,
        tx: &Tx<'_>,
        result: &pb::OperationResult,
    ) -> std::result::Result<(), CatalogError> {
        let mut op = lock(&self.cell.op).clone();
        op.set_state(pb::OperationState::Succeeded);
        set_result(&mut op, result.clone());
        op.ended_unix_ms = now_ms();
        op.cancellable = false;
        let body = prost::Message::encode_to_vec(&op);
        tx.put_operation(cell_id(&op), &op.vm_id, op.created_unix_ms, true, &body)
    }
}

/// What a long operation is and what it is about.
pub struct OpSpec {
    /// Its kind.
    pub kind: pb::OperationKind,
    /// The VM it changes, if one.
    pub vm: Option<VmId>,
    /// The snapshot it is about, if one.
    pub snapshot: Option<SnapshotId>,
    /// Wait for conflicting operations instead of failing ABORTED.
    pub wait: bool,
    /// It frees space, so it must start on a full filesystem (the space reserve is given back
    /// if recording it finds the disk full).
    pub frees_space: bool,
}

impl OpSpec {
    fn holder(&self, op: OpId) -> Holder {
        let kind = match self.kind {
            pb::OperationKind::CreateSnapshot => "CreateSnapshot",
            pb::OperationKind::RestoreSnapshot => "RestoreSnapshot",
            pb::OperationKind::CloneSnapshot => "CloneSnapshot",
            pb::OperationKind::DeleteSnapshot => "DeleteSnapshot",
            pb::OperationKind::DeleteVm => "DeleteVm",
            pb::OperationKind::PushSnapshot => "PushSnapshot",
            pb::OperationKind::PullSnapshot => "PullSnapshot",
            pb::OperationKind::DeleteRemoteSnapshot => "DeleteRemoteSnapshot",
            pb::OperationKind::SweepRemote => "SweepRemote",
            pb::OperationKind::Unspecified => "an operation",
        };
        let what = match (self.vm, self.snapshot) {
            (Some(v), Some(s)) => format!("{kind} of VM {v} to snapshot {s}"),
            (Some(v), None) => format!("{kind} of VM {v}"),
            (None, Some(s)) => format!("{kind} of snapshot {s}"),
            (None, None) => kind.to_string(),
        };
        Holder { op: Some(op), what }
    }
}

type Plan<T> = Box<dyn FnMut(&Daemon) -> Result<(Footprint, T)> + Send>;

impl Daemon {
    /// Admits a call that is not a long operation (start, pause, resume, stop) now, or, with
    /// `wait`, once what it needs is free (at most [`ADMISSION_WAIT`]).
    ///
    /// # Errors
    /// `plan`'s error, or ABORTED.
    pub(crate) fn admit_now<T>(
        &self,
        what: String,
        wait: bool,
        mut plan: impl FnMut(&Daemon) -> Result<(Footprint, T)>,
    ) -> Result<(Admission, T)> {
        let never = || false;
        let patience = if wait {
            Patience::Until(Instant::now() + ADMISSION_WAIT, &never)
        } else {
            Patience::None
        };
        self.scheduler
            .admit(Holder { op: None, what }, patience, || plan(self))
    }

    /// Starts a long operation: admits it with the footprint `plan` computes (failing the call
    /// with ABORTED on a conflict, unless `spec.wait`), records it with the request's answer in
    /// one transaction, and runs `work` on a thread of its own. Returns the operation as it
    /// starts.
    ///
    /// # Errors
    /// `plan`'s error, ABORTED, or the catalog's error; nothing was started then.
    pub(crate) fn launch<T: Send + 'static>(
        self: &Arc<Self>,
        spec: OpSpec,
        ctx: &RequestCtx,
        plan: impl FnMut(&Daemon) -> Result<(Footprint, T)> + Send + 'static,
        work: impl FnOnce(&Daemon, &Progress<'_>, T) -> Result<pb::OperationResult> + Send + 'static,
    ) -> Result<pb::Operation> {
        let id = OpId::random();
        let holder = spec.holder(id);
        let mut plan: Plan<T> = Box::new(plan);
        let admitted = if spec.wait {
            None
        } else {
            Some(
                self.scheduler
                    .admit(holder.clone(), Patience::None, || plan(self))?,
            )
        };
        let mut op = pb::Operation {
            id: id.to_string(),
            kind: spec.kind as i32,
            vm_id: spec.vm.map(|v| v.to_string()).unwrap_or_default(),
            snapshot_id: spec.snapshot.map(|s| s.to_string()).unwrap_or_default(),
            created_unix_ms: now_ms(),
            cancellable: true,
            caller: ctx.caller.clone(),
            ..Default::default()
        };
        op.set_state(if admitted.is_some() {
            pb::OperationState::Running
        } else {
            pb::OperationState::Pending
        });
        let body = prost::Message::encode_to_vec(&op);
        let record = || {
            self.catalog.write(|tx| {
                tx.put_operation(id, &op.vm_id, op.created_unix_ms, false, &body)?;
                ctx.answer(tx, &op)
            })
        };
        if spec.frees_space {
            self.with_reserve(record)?;
        } else {
            record()?;
        }
        let cell = OpCell::new(op.clone());
        lock(&self.ops.cells).insert(id, Arc::clone(&cell));
        self.events.emit(pb::event::Kind::Operation(op.clone()));
        let daemon = Arc::clone(self);
        let caller = ctx.caller.clone();
        let run = move || {
            crate::auth::acting_as(&caller, || {
                run_op(&daemon, &cell, admitted, holder, plan, work)
            });
        };
        fn run_op<T>(
            daemon: &Arc<Daemon>,
            cell: &Arc<OpCell>,
            admitted: Option<(Admission, T)>,
            holder: Holder,
            plan: Plan<T>,
            work: impl FnOnce(&Daemon, &Progress<'_>, T) -> Result<pb::OperationResult>,
        ) {
            let started = Instant::now();
            let progress = Progress::new(daemon, cell);
            let span = {
                let op = lock(&cell.op);
                tracing::info_span!(
                    "operation",
                    id = %op.id,
                    kind = crate::metrics::kind_label(op.kind()),
                    vm = %op.vm_id,
                    snapshot = %op.snapshot_id
                )
            };
            let _in_span = span.enter();
            let result = match admitted {
                Some((admission, found)) => {
                    let r = work(daemon, &progress, found);
                    drop(admission);
                    r
                }
                None => daemon.run_when_admitted(&progress, holder, plan, work),
            };
            progress.end_phase();
            let mode = lock(&progress.timer).mode;
            daemon.end(cell, result, started.elapsed(), mode);
        }
        std::thread::Builder::new()
            .name(format!("op-{}", &id.to_string()[..8]))
            .spawn(run)
            .map_err(|e| Error::internal(format!("starting the operation: {e}")))?;
        Ok(op)
    }

    fn run_when_admitted<T>(
        &self,
        progress: &Progress<'_>,
        holder: Holder,
        mut plan: Plan<T>,
        work: impl FnOnce(&Daemon, &Progress<'_>, T) -> Result<pb::OperationResult>,
    ) -> Result<pb::OperationResult> {
        let cancelled = || progress.cell.cancelled();
        let patience = Patience::Until(Instant::now() + ADMISSION_WAIT, &cancelled);
        let (admission, found) = self.scheduler.admit(holder, patience, || plan(self))?;
        let op = {
            let mut op = lock(&progress.cell.op);
            op.set_state(pb::OperationState::Running);
            op.clone()
        };
        self.events.emit(pb::event::Kind::Operation(op));
        let result = work(self, progress, found);
        drop(admission);
        result
    }

    /// Records an operation's end (in the catalog and the metrics: it took `took`, restoring
    /// memory as `mode` if it did) and tells watchers.
    fn end(
        &self,
        cell: &OpCell,
        result: Result<pb::OperationResult>,
        took: Duration,
        mode: Option<&'static str>,
    ) {
        let op = {
            let mut op = lock(&cell.op);
            op.ended_unix_ms = now_ms();
            op.cancellable = false;
            match result {
                Ok(r) => {
                    op.set_state(pb::OperationState::Succeeded);
                    set_result(&mut op, r);
                }
                Err(e) => {
                    op.set_state(if e.kind == ErrorKind::Cancelled {
                        pb::OperationState::Cancelled
                    } else {
                        pb::OperationState::Failed
                    });
                    op.error = Some(crate::api::status::operation_error(&e));
                }
            }
            op.clone()
        };
        let outcome = match op.state() {
            pb::OperationState::Succeeded => "succeeded",
            pb::OperationState::Cancelled => "cancelled",
            _ => "failed",
        };
        self.metrics.operation_ended(op.kind(), outcome, took);
        if outcome == "succeeded" {
            if op.kind() == pb::OperationKind::CreateSnapshot {
                self.metrics
                    .pause_seconds
                    .observe(Duration::from_micros(op.pause_us).as_secs_f64());
            }
            if let Some(mode) = mode {
                self.metrics
                    .restore_seconds
                    .get_or_create(&crate::metrics::ModeLabel { mode })
                    .observe(took.as_secs_f64());
            }
        }
        let body = prost::Message::encode_to_vec(&op);
        let id = cell_id(&op);
        if let Err(e) = self
            .catalog
            .write(|tx| tx.put_operation(id, &op.vm_id, op.created_unix_ms, true, &body))
        {
            tracing::error!(error = %e, op = %op.id, "cannot record the operation's end");
        }
        self.events.emit(pb::event::Kind::Operation(op));
        self.watch_states();
    }
}

/// Sets a succeeded operation's result, and the snapshot it made (CreateSnapshot).
fn set_result(op: &mut pb::Operation, result: pb::OperationResult) {
    if let Some(s) = &result.snapshot {
        op.snapshot_id.clone_from(&s.id);
    }
    op.result = Some(result);
}

fn cell_id(op: &pb::Operation) -> OpId {
    op.id.parse().expect("operation ids are made here")
}
