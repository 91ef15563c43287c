//! The boot layout: where the VMM puts the GDT, page tables, stacks, boot parameters and the guest
//! program, and the initial vCPU state that starts a guest directly in 64-bit long mode.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

use crate::memory::{GuestMemory, MMIO_GAP_END, MemoryError, PAGE_SIZE};

/// Guest physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest physical address of the boot parameter block handed to the guest in RSI.
pub const BOOT_PARAMS_ADDR: u64 = 0x600;
/// Largest boot parameter block.
pub const BOOT_PARAMS_MAX: usize = 0x400;
/// Guest physical address of the PML4 page.
pub const PML4_ADDR: u64 = 0x1000;
/// Guest physical address of the PDPT page.
pub const PDPT_ADDR: u64 = 0x2000;
/// Guest physical address of the first page directory (one per GiB of address space).
pub const PD_ADDR: u64 = 0x3000;
/// Number of page directories: the identity map covers this many GiB.
pub const MAX_IDENTITY_GIB: u64 = 64;
/// Start of the per-vCPU stacks.
pub const STACKS_ADDR: u64 = 0x50000;
/// Stack size of each vCPU.
pub const STACK_SIZE: u64 = 0x2000;
/// Most vCPUs a VM may have (bounded by the stack area).
pub const MAX_VCPUS: u32 = 32;
/// Guest physical address the program is loaded at and started from.
pub const PROGRAM_ADDR: u64 = 0x10_0000;
/// Largest guest program.
pub const PROGRAM_MAX: usize = 0x10_0000;
/// Lowest memory size that holds the boot layout and a program.
pub const MIN_MEMORY: u64 = 4 << 20;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT_RW: u64 = 0b11;
const PDE_HUGE: u64 = 1 << 7;

const CODE_SELECTOR: u16 = 0x8;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// What the VMM loads into a fresh VM: a flat program and its boot parameter block.
#[derive(Debug, Clone)]
pub struct BootImage {
    /// Flat binary loaded at [`PROGRAM_ADDR`]; execution starts at its first byte.
    pub program: Vec<u8>,
    /// Bytes written at [`BOOT_PARAMS_ADDR`].
    pub params: Vec<u8>,
}

fn gdt_entry(flags: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

fn segment(selector: u16, type_: u8, long: bool, system: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xf_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long && system),
        s: u8::from(system),
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, the identity-mapped page tables (2 MiB pages over all guest memory), the boot
/// parameters and the program into `mem`.
///
/// # Errors
/// [`MemoryError::OutOfRange`] if memory is too small for the layout or the program.
pub fn load(mem: &GuestMemory, image: &BootImage) -> Result<(), MemoryError> {
    let gdt = [
        0,
        gdt_entry(0xa09b, 0, 0xf_ffff),
        gdt_entry(0xc093, 0, 0xf_ffff),
        gdt_entry(0x808b, 0, 0xf_ffff),
    ];
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write(GDT_ADDR, &gdt_bytes)?;

    // The map reaches at least 4 GiB, so that device windows in the MMIO gap (virtio-mmio) are
    // mapped whatever the memory size.
    let gib = mem
        .end_gpa()
        .max(MMIO_GAP_END)
        .div_ceil(1 << 30)
        .min(MAX_IDENTITY_GIB);
    mem.write(PML4_ADDR, &(PDPT_ADDR | PTE_PRESENT_RW).to_le_bytes())?;
    let mut pdpt = vec![0u8; PAGE_SIZE as usize];
    let mut pd = vec![0u8; PAGE_SIZE as usize];
    for g in 0..gib {
        let pd_addr = PD_ADDR + g * PAGE_SIZE;
        pdpt[g as usize * 8..][..8].copy_from_slice(&(pd_addr | PTE_PRESENT_RW).to_le_bytes());
        for (i, e) in pd.chunks_exact_mut(8).enumerate() {
            let addr = (g << 30) + ((i as u64) << 21);
            e.copy_from_slice(&(addr | PTE_PRESENT_RW | PDE_HUGE).to_le_bytes());
        }
        mem.write(pd_addr, &pd)?;
    }
    mem.write(PDPT_ADDR, &pdpt)?;

    if image.params.len() > BOOT_PARAMS_MAX {
        return Err(MemoryError::OutOfRange {
            gpa: BOOT_PARAMS_ADDR,
            len: image.params.len() as u64,
        });
    }
    mem.write(BOOT_PARAMS_ADDR, &image.params)?;
    if image.program.len() > PROGRAM_MAX {
        return Err(MemoryError::OutOfRange {
            gpa: PROGRAM_ADDR,
            len: image.program.len() as u64,
        });
    }
    mem.write(PROGRAM_ADDR, &image.program)
}

/// Initial general registers of vCPU `index`: at the program entry, on its own stack, with its
/// index in RDI and the boot parameters in RSI.
pub fn initial_regs(index: u32) -> kvm_regs {
    kvm_regs {
        rip: PROGRAM_ADDR,
        rsp: STACKS_ADDR + (u64::from(index) + 1) * STACK_SIZE - 16,
        rdi: u64::from(index),
        rsi: BOOT_PARAMS_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

/// Turns `sregs` (as KVM created them) into 64-bit long mode with paging on the identity map.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(CODE_SELECTOR, 0xb, true, true);
    let data = segment(DATA_SELECTOR, 0x3, false, true);
    let tss = segment(TSS_SELECTOR, 0xb, false, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET | CR0_PG) & !(0b11 << 29);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Initial FPU state (x87 control word and MXCSR at their reset values).
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map_memory_above_the_gap() {
        let mem = GuestMemory::new(5 << 30).unwrap();
        load(
            &mem,
            &BootImage {
                program: vec![0xf4],
                params: vec![1, 2, 3],
            },
        )
        .unwrap();
        // The PD entry for 5 GiB + 2 MiB lives in the sixth PD, entry 1.
        let mut e = [0u8; 8];
        mem.read(PD_ADDR + 5 * PAGE_SIZE + 8, &mut e).unwrap();
        assert_eq!(
            u64::from_le_bytes(e),
            ((5 << 30) + (2 << 20)) | PTE_PRESENT_RW | PDE_HUGE
        );
        let mut p = [0u8; 1];
        mem.read(PROGRAM_ADDR, &mut p).unwrap();
        assert_eq!(p[0], 0xf4);
    }

    #[test]
    fn oversized_params_are_refused() {
        let mem = GuestMemory::new(MIN_MEMORY).unwrap();
        let image = BootImage {
            program: vec![],
            params: vec![0; BOOT_PARAMS_MAX + 1],
        };
        assert!(load(&mem, &image).is_err());
    }
}
