/*
 * Entry point of the test guest. The VMM starts every vCPU here in 64-bit mode with
 * RDI = vCPU index, RSI = address of the boot parameters and RSP = the vCPU's own stack.
 */
    .section .text.start, "ax"
    .global _start
_start:
    /* First instruction: tells the VMM this vCPU executes guest code (port 0xf5). */
    outb %al, $0xf5
    call guest_main
1:
    cli
    hlt
    jmp 1b

    .section .note.GNU-stack, "", @progbits
