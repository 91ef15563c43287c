//! A pool of prepared VMs (see `snap_vmm::Vm::prepare`): the KVM VM, its memory slots and its
//! vCPUs built ahead, per VM shape, so that a restore only loads state. KVM's per-slot setup
//! grows with memory size (about 7 ms for 16 GiB under shadow paging); a pooled VM takes it off
//! the restore path. After a restore takes one, a background thread prepares the next.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use snap_vmm::{PreparedVm, Vm, VmConfig, VmError, VmOptions};

/// Prepared VMs by shape (memory bytes, vCPUs).
pub struct Pool {
    per_shape: usize,
    ready: Mutex<HashMap<(u64, u32), Vec<PreparedVm>>>,
}

impl Pool {
    /// A pool keeping `per_shape` prepared VMs of every shape it was asked for (0: none).
    pub fn new(per_shape: usize) -> Arc<Self> {
        Arc::new(Self {
            per_shape,
            ready: Mutex::new(HashMap::new()),
        })
    }

    /// A prepared VM of `config`'s shape: a pooled one if there is one, else one made now. The
    /// pool is topped up for that shape in the background either way.
    ///
    /// # Errors
    /// The error of preparing a VM.
    pub fn take(self: &Arc<Self>, config: VmConfig) -> Result<PreparedVm, VmError> {
        let key = (config.memory_bytes, config.vcpus);
        let pooled = self
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&key)
            .and_then(Vec::pop);
        if self.per_shape > 0 {
            let pool = Arc::clone(self);
            // Best effort: a VM that cannot be prepared now is prepared at the next restore.
            let _ = std::thread::Builder::new()
                .name("vm-pool".into())
                .spawn(move || pool.fill(config));
        }
        match pooled {
            Some(p) => Ok(p),
            None => Vm::prepare(config, &VmOptions::default()),
        }
    }

    /// How many prepared VMs of `config`'s shape are ready.
    pub fn ready(&self, config: VmConfig) -> usize {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(config.memory_bytes, config.vcpus))
            .map_or(0, Vec::len)
    }

    fn fill(&self, config: VmConfig) {
        let key = (config.memory_bytes, config.vcpus);
        while self.ready(config) < self.per_shape {
            match Vm::prepare(config, &VmOptions::default()) {
                Ok(p) => {
                    let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
                    let v = ready.entry(key).or_default();
                    if v.len() >= self.per_shape {
                        return;
                    }
                    v.push(p);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prepare a VM for the pool");
                    return;
                }
            }
        }
    }
}
