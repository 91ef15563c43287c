//! CloneSnapshot: `count` new VMs from one snapshot, all or none. Every clone is built first
//! (its memory restored, fresh disk tops over the snapshot's sealed layers, which all clones
//! share), then one catalog transaction records them all, then they run: a failure or a crash
//! before that transaction leaves no clone, one after it leaves all of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use snap_api::v1 as pb;
use snap_vmm::MemoryRestore;

use crate::daemon::Daemon;
use crate::error::Result;
use crate::ids::SnapshotId;
use crate::ops::OpSpec;
use crate::ops::requests::RequestCtx;
use crate::restore::reads_snapshot;

/// What a clone makes.
#[derive(Debug, Clone)]
pub struct CloneSpec {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// How many VMs.
    pub count: u32,
    /// Their names are `<prefix>-<i>`.
    pub prefix: String,
    /// Labels of each.
    pub labels: BTreeMap<String, String>,
    /// How their memory is restored.
    pub mode: MemoryRestore,
    /// Leave them paused.
    pub leave_paused: bool,
    /// Wait for conflicting operations instead of failing ABORTED.
    pub wait: bool,
}

impl Daemon {
    /// Starts a clone.
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED, ALREADY_EXISTS for a taken name.
    pub fn clone_snapshot(
        self: &Arc<Self>,
        spec: CloneSpec,
        ctx: &RequestCtx,
    ) -> Result<pb::Operation> {
        let names: Vec<String> = (0..spec.count)
            .map(|i| format!("{}-{i}", spec.prefix))
            .collect();
        self.check_new_names(&names)?;
        let s = spec.snapshot;
        let op = OpSpec {
            kind: pb::OperationKind::CloneSnapshot,
            vm: None,
            snapshot: Some(s),
            wait: spec.wait,
            frees_space: false,
        };
        self.launch(op, ctx, reads_snapshot(s), move |d, op, snap| {
            let vms = d.restore_into_new_vms(
                op,
                &snap,
                names,
                &spec.labels,
                spec.mode,
                spec.leave_paused,
            )?;
            Ok(pb::OperationResult {
                vms,
                ..Default::default()
            })
        })
    }
}
