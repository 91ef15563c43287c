//! One virtio-blk request: parsed from a descriptor chain, checked, executed on the backend.
//!
//! The guest is not trusted. virtio-queue's [`Reader`] and [`Writer`] gather the chain's
//! device-readable and device-writable buffers, each checked to lie inside guest memory (the
//! chain itself is bounded by the queue size, so a loop of `next` links ends). On top of that
//! every request is checked before any byte moves: the header is 16 bytes, the last writable
//! byte is the status, IN data is device-writable and OUT data device-readable (a chain with
//! data on the wrong side is refused), data is a whole number of sectors and lies inside the
//! disk. Data moves through a bounded bounce buffer, so a huge descriptor costs no host memory.
//! Anything wrong yields `VIRTIO_BLK_S_IOERR` (`VIRTIO_BLK_S_UNSUPP` for an unknown type); a
//! chain whose last device-writable byte (the status) is missing or outside guest memory cannot
//! be answered and is returned with length 0.
//!
//! A backend error of a kind [`stops_vm`] names is not answered at all: the request ends as
//! [`Outcome::Stopped`], its status byte untouched, and the device leaves it pending to run
//! again from the start (data it already moved is moved again).

use std::io::{self, Read, Write};

use std::ops::Deref;
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Reader, Writer};

use super::guest_view::{GuestView, VmmWrites};
use crate::block::{BlockBackend, SECTOR_SIZE, stops_vm};

/// Size of the request header (type, reserved, sector).
const HEADER_LEN: usize = 16;
/// Largest piece of data moved at once between guest memory and the backend.
const BOUNCE_LEN: usize = 64 << 10;

/// The outcome of one request, as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Completion {
    /// Status byte written (None: the chain had no writable status byte).
    pub status: Option<u8>,
    /// Bytes written into the chain's device-writable buffers (the used length).
    pub used_len: u32,
}

/// What became of one request.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The request was answered (or cannot be): it goes into the used ring.
    Done(Completion),
    /// The backend failed with an error the guest must not see ([`stops_vm`]): the request was
    /// not answered and must run again.
    Stopped(io::Error),
}

/// Runs the request in `chain` against `disk`; `id` answers GET_ID.
pub(crate) fn execute<'m, M>(
    chain: DescriptorChain<M>,
    mem: &'m GuestView<'m>,
    disk: &dyn BlockBackend,
    id: &[u8; VIRTIO_BLK_ID_BYTES as usize],
) -> Outcome
where
    M: Deref<Target = GuestView<'m>> + Clone,
{
    let no_status = Outcome::Done(Completion {
        status: None,
        used_len: 0,
    });
    // The status is the last device-writable byte of the chain.
    let Some(status_addr) = chain
        .clone()
        .writable()
        .last()
        .and_then(|d| d.addr().checked_add(u64::from(d.len()).checked_sub(1)?))
    else {
        return no_status;
    };
    if !mem.check_range(status_addr, 1) {
        return no_status;
    }
    let answer = |status: u32, data_len: usize| {
        if mem.write_obj(status as u8, status_addr).is_err() {
            return no_status;
        }
        Outcome::Done(Completion {
            status: Some(status as u8),
            used_len: u32::try_from(data_len + 1).unwrap_or(u32::MAX),
        })
    };
    let (Ok(mut data_out), Ok(mut data_in)) = (
        Writer::<VmmWrites<'m>>::new(mem, chain.clone()),
        Reader::<VmmWrites<'m>>::new(mem, chain),
    ) else {
        // Some buffer lies outside guest memory.
        return answer(VIRTIO_BLK_S_IOERR, 0);
    };
    let writable = data_out.available_bytes();
    if writable == 0 || data_out.split_at(writable - 1).is_err() {
        return answer(VIRTIO_BLK_S_IOERR, 0);
    }
    match run(&mut data_in, &mut data_out, disk, id) {
        Ok(status) => answer(status, data_out.bytes_written()),
        Err(e) => Outcome::Stopped(e),
    }
}

/// The request's status, or the backend error that stops it unanswered.
fn run(
    data_in: &mut Reader<'_, VmmWrites<'_>>,
    data_out: &mut Writer<'_, VmmWrites<'_>>,
    disk: &dyn BlockBackend,
    id: &[u8; VIRTIO_BLK_ID_BYTES as usize],
) -> io::Result<u32> {
    let mut header = [0u8; HEADER_LEN];
    if data_in.read_exact(&mut header).is_err() {
        return Ok(VIRTIO_BLK_S_IOERR);
    }
    let kind = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    let status = match kind {
        VIRTIO_BLK_T_IN => {
            if data_in.available_bytes() != 0 {
                return Ok(VIRTIO_BLK_S_IOERR);
            }
            match disk_range(disk, sector, data_out.available_bytes()) {
                Some(offset) => status_of(read_disk(disk, offset, data_out)?),
                None => VIRTIO_BLK_S_IOERR,
            }
        }
        VIRTIO_BLK_T_OUT => {
            if data_out.available_bytes() != 0 {
                return Ok(VIRTIO_BLK_S_IOERR);
            }
            match disk_range(disk, sector, data_in.available_bytes()) {
                Some(offset) => status_of(write_disk(disk, offset, data_in)?),
                None => VIRTIO_BLK_S_IOERR,
            }
        }
        VIRTIO_BLK_T_FLUSH => status_of(backend_call(disk.flush(), "flush", 0, 0)?),
        VIRTIO_BLK_T_GET_ID => {
            let n = data_out.available_bytes().min(id.len());
            status_of(data_out.write_all(&id[..n]).is_ok())
        }
        _ => VIRTIO_BLK_S_UNSUPP,
    };
    Ok(status)
}

/// Sorts the result of a backend call: `Ok(true)` it worked, `Ok(false)` it failed and the guest
/// is told so, `Err` it failed with an error the guest must not see ([`stops_vm`]).
fn backend_call(result: io::Result<()>, op: &str, offset: u64, len: usize) -> io::Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if stops_vm(e.kind()) => {
            tracing::warn!(op, offset, len, error = %e, "virtio-blk request stopped; it stays pending");
            Err(e)
        }
        Err(e) => {
            tracing::warn!(op, offset, len, error = %e, "virtio-blk request failed");
            Ok(false)
        }
    }
}

fn status_of(ok: bool) -> u32 {
    if ok {
        VIRTIO_BLK_S_OK
    } else {
        VIRTIO_BLK_S_IOERR
    }
}

/// The byte offset of a transfer of `len` bytes at `sector`, if it is a non-empty whole number
/// of sectors inside the disk.
fn disk_range(disk: &dyn BlockBackend, sector: u64, len: usize) -> Option<u64> {
    let len = len as u64;
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (len > 0 && len % SECTOR_SIZE == 0 && end <= disk.size()).then_some(offset)
}

/// Reads the disk into the request's buffers; as [`backend_call`].
fn read_disk(
    disk: &dyn BlockBackend,
    offset: u64,
    out: &mut Writer<'_, VmmWrites<'_>>,
) -> io::Result<bool> {
    let mut buf = vec![0u8; out.available_bytes().min(BOUNCE_LEN)];
    let mut at = offset;
    while out.available_bytes() > 0 {
        let n = out.available_bytes().min(buf.len());
        if !backend_call(disk.read_at(at, &mut buf[..n]), "read", at, n)? {
            return Ok(false);
        }
        if out.write_all(&buf[..n]).is_err() {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Writes the request's buffers to the disk; as [`backend_call`].
fn write_disk(
    disk: &dyn BlockBackend,
    offset: u64,
    data: &mut Reader<'_, VmmWrites<'_>>,
) -> io::Result<bool> {
    let mut buf = vec![0u8; data.available_bytes().min(BOUNCE_LEN)];
    let mut at = offset;
    while data.available_bytes() > 0 {
        let n = data.available_bytes().min(buf.len());
        if data.read_exact(&mut buf[..n]).is_err() {
            return Ok(false);
        }
        if !backend_call(disk.write_at(at, &buf[..n]), "write", at, n)? {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}
