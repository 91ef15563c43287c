//! One vCPU: its saved state, the ioctls that save and load it, and the kick that forces it out of
//! KVM_RUN.
//!
//! The kick is a real-time signal sent to the vCPU's thread. Its handler sets `immediate_exit` in
//! that thread's `kvm_run` page, so a kick that lands just before KVM_RUN is entered still makes
//! KVM_RUN return at once with EINTR, and one that lands inside KVM_RUN interrupts it. No polling.

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, Msrs, kvm_cpuid_entry2, kvm_debugregs,
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

/// Most MSRs KVM_GET_MSRS / KVM_SET_MSRS takes in one call (the FAM wrapper's bound).
const MSR_CHUNK: usize = 256;

/// Complete saved state of one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (also its APIC id).
    pub index: u32,
    /// CPUID table (KVM_GET_CPUID2).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (KVM_GET_MP_STATE).
    pub mp_state: kvm_mp_state,
    /// General registers (KVM_GET_REGS).
    pub regs: kvm_regs,
    /// Segment and control registers (KVM_GET_SREGS).
    pub sregs: kvm_sregs,
    /// Legacy FPU state (KVM_GET_FPU).
    #[serde(with = "fpu_bytes")]
    pub fpu: kvm_fpu,
    /// Extended state (KVM_GET_XSAVE), where KVM supports it.
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers (KVM_GET_XCRS), where KVM supports them.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers (KVM_GET_DEBUGREGS).
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers (KVM_GET_LAPIC).
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists that can be read (KVM_GET_MSR_INDEX_LIST, KVM_GET_MSRS).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs (KVM_GET_VCPU_EVENTS).
    pub events: kvm_vcpu_events,
}

/// kvm-bindings has no serde support for `kvm_fpu`: it is stored as its raw bytes.
mod fpu_bytes {
    use kvm_bindings::kvm_fpu;
    use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error};

    const SIZE: usize = std::mem::size_of::<kvm_fpu>();
    // The struct has explicit padding fields and no implicit padding, so every byte is a
    // defined integer byte and any byte pattern is a valid value.
    const _: () = assert!(SIZE == 416);

    pub fn serialize<S: Serializer>(fpu: &kvm_fpu, s: S) -> Result<S::Ok, S::Error> {
        // SAFETY: kvm_fpu is repr(C) plain integers without implicit padding (asserted above), so
        // all SIZE bytes are initialised.
        let bytes =
            unsafe { std::slice::from_raw_parts((fpu as *const kvm_fpu).cast::<u8>(), SIZE) };
        bytes.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<kvm_fpu, D::Error> {
        let bytes: Vec<u8> = Vec::deserialize(d)?;
        if bytes.len() != SIZE {
            return Err(D::Error::custom(format!(
                "kvm_fpu is {SIZE} bytes, got {}",
                bytes.len()
            )));
        }
        let mut fpu = kvm_fpu::default();
        // SAFETY: `bytes` holds exactly SIZE bytes and every byte pattern is a valid kvm_fpu
        // (plain integers, no padding); the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut fpu as *mut kvm_fpu).cast::<u8>(),
                SIZE,
            );
        }
        Ok(fpu)
    }
}

/// Which optional state this host's KVM can save.
#[derive(Debug, Clone)]
pub(crate) struct VcpuCaps {
    pub xsave: bool,
    pub xcrs: bool,
    /// MSR indices that KVM lists and that read back on this host.
    pub msr_indices: Vec<u32>,
}

impl VcpuCaps {
    /// Probes KVM, reading each listed MSR on `vcpu` once to drop the ones that cannot be read.
    pub fn probe(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Self, kvm_ioctls::Error> {
        let listed = kvm.get_msr_index_list()?;
        let mut msr_indices = Vec::new();
        for &index in listed.as_slice() {
            let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .expect("one entry fits");
            if vcpu.get_msrs(&mut msrs)? == 1 {
                msr_indices.push(index);
            }
        }
        Ok(Self {
            xsave: kvm.check_extension(kvm_ioctls::Cap::Xsave),
            xcrs: kvm.check_extension(kvm_ioctls::Cap::Xcrs),
            msr_indices,
        })
    }
}

/// A failed vCPU ioctl, naming which one.
#[derive(Debug, thiserror::Error)]
#[error("vCPU {index}: {op}: {source}")]
pub struct VcpuError {
    /// vCPU index.
    pub index: u32,
    /// The ioctl or step that failed.
    pub op: &'static str,
    /// The KVM error.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn ctx<T>(index: u32, op: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
    r.map_err(|source| VcpuError { index, op, source })
}

fn partial(index: u32, op: &'static str, msr: u32) -> VcpuError {
    tracing::error!(
        vcpu = index,
        msr = format_args!("{msr:#x}"),
        "{op} stopped at MSR"
    );
    VcpuError {
        index,
        op,
        source: kvm_ioctls::Error::new(libc::EINVAL),
    }
}

/// Reads the complete state of `vcpu`. The vCPU must not be running.
pub(crate) fn save(index: u32, vcpu: &VcpuFd, caps: &VcpuCaps) -> Result<VcpuState, VcpuError> {
    // KVM_GET_MP_STATE first: on some hosts it settles pending APIC events that the others report.
    let mp_state = ctx(index, "KVM_GET_MP_STATE", vcpu.get_mp_state())?;
    let regs = ctx(index, "KVM_GET_REGS", vcpu.get_regs())?;
    let sregs = ctx(index, "KVM_GET_SREGS", vcpu.get_sregs())?;
    let fpu = ctx(index, "KVM_GET_FPU", vcpu.get_fpu())?;
    let xsave = if caps.xsave {
        Some(ctx(index, "KVM_GET_XSAVE", vcpu.get_xsave())?)
    } else {
        None
    };
    let xcrs = if caps.xcrs {
        Some(ctx(index, "KVM_GET_XCRS", vcpu.get_xcrs())?)
    } else {
        None
    };
    let debug_regs = ctx(index, "KVM_GET_DEBUGREGS", vcpu.get_debug_regs())?;
    let lapic = ctx(index, "KVM_GET_LAPIC", vcpu.get_lapic())?;
    let mut msrs = Vec::with_capacity(caps.msr_indices.len());
    for chunk in caps.msr_indices.chunks(MSR_CHUNK) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut fam = Msrs::from_entries(&entries).expect("chunk fits the MSR bound");
        let n = ctx(index, "KVM_GET_MSRS", vcpu.get_msrs(&mut fam))?;
        if n != chunk.len() {
            return Err(partial(index, "KVM_GET_MSRS", chunk[n]));
        }
        msrs.extend_from_slice(fam.as_slice());
    }
    let cpuid = ctx(
        index,
        "KVM_GET_CPUID2",
        vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES),
    )?
    .as_slice()
    .to_vec();
    let events = ctx(index, "KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?;
    Ok(VcpuState {
        index,
        cpuid,
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

/// Loads `state` into `vcpu`. The vCPU must not be running. CPUID is set only when `with_cpuid`
/// (KVM refuses to change CPUID once a vCPU has run).
pub(crate) fn restore(vcpu: &VcpuFd, state: &VcpuState, with_cpuid: bool) -> Result<(), VcpuError> {
    let index = state.index;
    if with_cpuid {
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError {
            index,
            op: "CPUID table",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        ctx(index, "KVM_SET_CPUID2", vcpu.set_cpuid2(&cpuid))?;
    }
    // Order follows what KVM needs: mode (sregs) before registers that depend on it, xsave
    // before xcrs, LAPIC before MSRs such as TSC_DEADLINE, events last.
    ctx(index, "KVM_SET_MP_STATE", vcpu.set_mp_state(state.mp_state))?;
    ctx(index, "KVM_SET_SREGS", vcpu.set_sregs(&state.sregs))?;
    ctx(index, "KVM_SET_REGS", vcpu.set_regs(&state.regs))?;
    ctx(index, "KVM_SET_FPU", vcpu.set_fpu(&state.fpu))?;
    if let Some(xsave) = &state.xsave {
        // SAFETY: `xsave` is a complete kvm_xsave of the legacy 4 KiB size that KVM_GET_XSAVE
        // filled; it was not produced by KVM_GET_XSAVE2 with a larger buffer.
        ctx(index, "KVM_SET_XSAVE", unsafe { vcpu.set_xsave(xsave) })?;
    }
    if let Some(xcrs) = &state.xcrs {
        ctx(index, "KVM_SET_XCRS", vcpu.set_xcrs(xcrs))?;
    }
    ctx(
        index,
        "KVM_SET_DEBUGREGS",
        vcpu.set_debug_regs(&state.debug_regs),
    )?;
    ctx(index, "KVM_SET_LAPIC", vcpu.set_lapic(&state.lapic))?;
    for chunk in state.msrs.chunks(MSR_CHUNK) {
        let fam = Msrs::from_entries(chunk).expect("chunk fits the MSR bound");
        let n = ctx(index, "KVM_SET_MSRS", vcpu.set_msrs(&fam))?;
        if n != chunk.len() {
            return Err(partial(index, "KVM_SET_MSRS", chunk[n].index));
        }
    }
    ctx(
        index,
        "KVM_SET_VCPU_EVENTS",
        vcpu.set_vcpu_events(&state.events),
    )?;
    Ok(())
}

/// Sets up a fresh vCPU for boot: CPUID with its APIC id, runnable, long mode at the program entry.
pub(crate) fn setup_boot(kvm: &Kvm, vcpu: &VcpuFd, index: u32) -> Result<(), VcpuError> {
    let mut cpuid = ctx(
        index,
        "KVM_GET_SUPPORTED_CPUID",
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
    )?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    ctx(index, "KVM_SET_CPUID2", vcpu.set_cpuid2(&cpuid))?;
    ctx(
        index,
        "KVM_SET_MP_STATE",
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        }),
    )?;
    let sregs = ctx(index, "KVM_GET_SREGS", vcpu.get_sregs())?;
    ctx(
        index,
        "KVM_SET_SREGS",
        vcpu.set_sregs(&crate::boot::long_mode_sregs(sregs)),
    )?;
    ctx(
        index,
        "KVM_SET_REGS",
        vcpu.set_regs(&crate::boot::initial_regs(index)),
    )?;
    ctx(
        index,
        "KVM_SET_FPU",
        vcpu.set_fpu(&crate::boot::initial_fpu()),
    )?;
    Ok(())
}

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs, for the kick handler.
    static KVM_RUN_PAGE: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let page = KVM_RUN_PAGE.with(Cell::get);
    if !page.is_null() {
        // SAFETY: the pointer was set by this same thread to its vCPU's kvm_run mapping, which
        // stays mapped until the thread clears the pointer; a volatile byte store is signal-safe.
        unsafe { std::ptr::addr_of_mut!((*page).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process (every VM does this; other users of the kick
/// signal must too, or the signal would end the process).
///
/// # Errors
/// The error of sigaction.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), on_kick));
    result
}

/// Publishes this thread's vCPU `kvm_run` page to the kick handler (null to withdraw it).
pub(crate) fn set_thread_run_page(page: *mut kvm_run) {
    KVM_RUN_PAGE.with(|c| c.set(page));
}

/// Sets `immediate_exit` on this thread's vCPU: the next KVM_RUN completes a pending access and
/// returns EINTR without entering the guest.
pub(crate) fn set_immediate_exit() {
    let page = KVM_RUN_PAGE.with(Cell::get);
    if !page.is_null() {
        // SAFETY: as in `on_kick`: the page belongs to this thread's vCPU and is still mapped.
        unsafe { std::ptr::addr_of_mut!((*page).immediate_exit).write_volatile(1) };
    }
}

/// Clears `immediate_exit` on this thread's vCPU before deciding whether to run it again.
pub(crate) fn clear_immediate_exit() {
    let page = KVM_RUN_PAGE.with(Cell::get);
    if !page.is_null() {
        // SAFETY: as in `on_kick`: the page belongs to this thread's vCPU and is still mapped.
        unsafe { std::ptr::addr_of_mut!((*page).immediate_exit).write_volatile(0) };
    }
}
