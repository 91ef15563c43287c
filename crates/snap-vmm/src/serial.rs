//! The 16550 UART at COM1 (vm-superio), its interrupt line, and the output buffer callers read.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of I/O ports of the UART.
pub const COM1_PORTS: u16 = 8;
/// Legacy interrupt line of COM1.
pub const COM1_GSI: u32 = 4;

/// Everything the guest has written to the serial port, shared between the device and readers.
#[derive(Clone, Default)]
pub struct SerialOutput {
    inner: Arc<(Mutex<Vec<u8>>, Condvar)>,
}

impl SerialOutput {
    /// A copy of all bytes written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// At most `max` bytes of the output from byte `offset` (none past its end), and the length
    /// of the whole output: a bounded read, whatever the output's size.
    pub fn window(&self, offset: u64, max: usize) -> (Vec<u8>, u64) {
        let buf = self.lock();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(buf.len());
        let end = start.saturating_add(max).min(buf.len());
        (buf[start..end].to_vec(), buf.len() as u64)
    }

    /// Forgets the output so far (after the VM was reverted: what follows is a new run).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// All output so far as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    /// Number of bytes written so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing has been written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of complete lines written so far.
    pub fn lines(&self) -> usize {
        self.lock().iter().filter(|&&b| b == b'\n').count()
    }

    /// Waits until at least `n` bytes were written; returns false on timeout. Waiters are woken at
    /// the first byte and at each line end.
    pub fn wait_for_bytes(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |buf| buf.len() >= n)
    }

    /// Waits until at least `n` complete lines were written; returns false on timeout.
    pub fn wait_for_lines(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |buf| {
            buf.iter().filter(|&&b| b == b'\n').count() >= n
        })
    }

    fn wait_until(&self, timeout: Duration, ready: impl Fn(&[u8]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.inner;
        let mut buf = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !ready(&buf) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            buf = cond
                .wait_timeout(buf, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = self.lock();
        let first = out.is_empty();
        out.extend_from_slice(buf);
        drop(out);
        if first || buf.contains(&b'\n') {
            self.inner.1.notify_all();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART's interrupt line: an eventfd registered with KVM as an irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Plain saved state of the UART registers and its receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The COM1 UART device.
pub struct SerialDevice {
    uart: Serial<IrqLine, NoEvents, SerialOutput>,
}

impl SerialDevice {
    /// A UART in its reset state writing to `out`.
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        Self {
            uart: Serial::new(IrqLine(irq), out),
        }
    }

    /// A UART with saved register state.
    ///
    /// # Errors
    /// If the saved receive FIFO is larger than the device's.
    pub fn from_state(
        state: &SerialDeviceState,
        irq: EventFd,
        out: SerialOutput,
    ) -> Result<Self, String> {
        Serial::from_state(&state.into(), IrqLine(irq), NoEvents, out)
            .map(|uart| Self { uart })
            .map_err(|e| format!("{e:?}"))
    }

    /// The register state.
    pub fn state(&self) -> SerialDeviceState {
        self.uart.state().into()
    }

    /// Handles a guest read of `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read((port - COM1_BASE) as u8)
    }

    /// Handles a guest write of `value` to `port`.
    pub fn write(&mut self, port: u16, value: u8) {
        if let Err(e) = self.uart.write((port - COM1_BASE) as u8, value) {
            tracing::warn!(port, error = ?e, "serial write failed");
        }
    }

    /// The output buffer.
    pub fn output(&self) -> &SerialOutput {
        self.uart.writer()
    }
}
