//! CreateVm: a new VM running the test guest, on new disks (empty, or a raw image imported as a
//! sealed base), recorded in one catalog transaction with the request's answer.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use snap_api::v1 as pb;
use snap_disk::Disk;
use snap_vmm::{TestGuest, Vm, VmConfig, VmOptions};

use crate::api::convert;
use crate::catalog::{GuestSpec, VmRecord, VmStatus};
use crate::daemon::Daemon;
use crate::disks::DiskSet;
use crate::error::{Error, Result};
use crate::ids::VmId;
use crate::now_ms;
use crate::ops::requests::RequestCtx;

/// Sectors of its first disk the test guest uses at most.
const GUEST_DISK_SECTORS: u64 = 2048;

/// What a VM is created with.
#[derive(Debug, Clone)]
pub struct NewVmSpec {
    /// Name.
    pub name: String,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The guest program.
    pub guest: GuestSpec,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Let the guest run at once.
    pub start: bool,
    /// Its disks.
    pub disks: Vec<NewDisk>,
}

/// A disk a new VM gets.
#[derive(Debug, Clone)]
pub struct NewDisk {
    /// Name within the VM.
    pub name: String,
    /// Size in bytes (0 with an image: the image's size).
    pub size_bytes: u64,
    /// A raw image imported as the disk's base.
    pub image: Option<PathBuf>,
}

/// The test guest program `g`.
pub fn test_guest(g: &GuestSpec) -> TestGuest {
    TestGuest {
        seed: g.seed,
        working_set_pages: g.working_set_pages,
        mutations_per_tick: g.mutations_per_tick,
        ticks: g.ticks,
        disk_blocks_per_tick: g.disk_sectors_per_tick,
        ..TestGuest::default()
    }
}

/// A new VM booting the test guest `g` on `disks` (paused at its first instruction), their I/O
/// counted in `metrics`.
///
/// # Errors
/// The VMM's error.
pub fn boot(
    config: VmConfig,
    g: &GuestSpec,
    disks: &[Arc<Disk>],
    metrics: &Arc<crate::metrics::Metrics>,
) -> Result<Vm> {
    let mut guest = test_guest(g);
    if let Some(d) = disks.first() {
        guest.disk_sectors = (d.size() / 512).min(GUEST_DISK_SECTORS);
    }
    let options = VmOptions {
        disks: crate::disks::backends(disks, metrics),
        ..VmOptions::default()
    };
    Ok(guest.create_vm(config, &options)?)
}

impl Daemon {
    /// Creates a VM (and starts it if asked).
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a shape or program that cannot run or an image that cannot be
    /// imported, ALREADY_EXISTS for a taken name, RESOURCE_EXHAUSTED for memory or disk space the
    /// host does not have. Nothing is left behind then.
    pub fn create_vm(&self, spec: NewVmSpec, ctx: &RequestCtx) -> Result<pb::Vm> {
        // 1. Check what can be checked before anything is made.
        if self.catalog.read(|tx| tx.vm_named(&spec.name))?.is_some() {
            return Err(Error::exists(format!("a VM named {:?} exists", spec.name)));
        }
        let config = VmConfig {
            memory_bytes: spec.memory_bytes,
            vcpus: spec.vcpus,
        };
        snap_vmm::vm::validate_config(&config)?;
        test_guest(&spec.guest).validate(&config)?;
        // 2. The disks: images imported as sealed bases, each with a fresh top (claimed files).
        let disks = self.new_disks(&spec.disks, ctx)?;
        // 3. The VM, paused at its first instruction.
        let vm = boot(config, &spec.guest, &disks.disks, &self.metrics)?;
        // 4. Publish: the layers, the VM and the answer, in one transaction.
        let rec = VmRecord {
            id: VmId::random(),
            name: spec.name,
            memory_bytes: spec.memory_bytes,
            vcpus: spec.vcpus,
            guest: spec.guest,
            labels: spec.labels,
            state: if spec.start {
                VmStatus::Running
            } else {
                VmStatus::Created
            },
            current_snapshot: None,
            mem_chain: Vec::new(),
            disks: disks.records.clone(),
            created_ms: now_ms(),
            failure: None,
        };
        let answer = convert::vm(&rec, rec.state, None);
        if ctx.is_abandoned() {
            // Nobody would learn of the VM: make none (a retry with the request id makes it).
            return Err(Error::new(
                crate::error::ErrorKind::Cancelled,
                "the caller gave up before the VM was made (it cancelled, its deadline passed or \
                 it went away): nothing was created",
            ));
        }
        self.catalog.write(|tx| {
            disks.insert_layers(tx)?;
            tx.insert_vm(&rec)?;
            ctx.answer(tx, &answer)
        })?;
        // 5. Let it run if asked.
        self.add_instance(rec.id, vm, disks, spec.start, true);
        Ok(answer)
    }

    fn new_disks(&self, specs: &[NewDisk], ctx: &RequestCtx) -> Result<DiskSet> {
        let mut set = DiskSet::new(&self.store);
        for (i, spec) in specs.iter().enumerate() {
            let (size, base) = match &spec.image {
                Some(image) => {
                    let field = format!("disks[{i}].image_path");
                    let (file, _) = self.images.open(&field, image)?;
                    let (path, id, size) =
                        set.import_image(&self.store, &file, image, &mut || {
                            !ctx.is_abandoned() && !self.stopping()
                        })?;
                    if spec.size_bytes != 0 && spec.size_bytes != size {
                        return Err(Error::invalid(
                            "disks.size_bytes",
                            format!(
                                "disk {:?}: {} bytes asked, the image holds {size} (use 0 for the image's size)",
                                spec.name, spec.size_bytes
                            ),
                        ));
                    }
                    (size, vec![(path, id)])
                }
                None => (spec.size_bytes, Vec::new()),
            };
            set.add(&self.store, &spec.name, size, base)?;
        }
        Ok(set)
    }
}
