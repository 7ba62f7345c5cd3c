//! `IoBuf`: a byte buffer whose start is aligned to [`IO_ALIGN`], as O_DIRECT requires, made
//! without unsafe code by over-allocating a `Vec` and starting at the first aligned byte.
//!
//! Buffers are recycled: a dropped `IoBuf` of up to [`POOL_MAX_CLASS`] bytes goes back to a
//! small global pool (per power-of-two size class, bounded in count), and
//! [`IoBuf::for_overwrite`] takes one from there without zeroing it. A fresh 1 MiB `calloc`
//! per request costs page faults or a memset on every I/O; the pool removes both from the data
//! path. The pool holds at most [`POOL_BYTES_PER_CLASS`] per class, so its memory is bounded.

use std::sync::Mutex;

/// The alignment of every `IoBuf` (covers 512- and 4096-byte logical sectors).
pub const IO_ALIGN: usize = 4096;
/// The largest size class that is recycled; larger buffers are freed on drop.
pub const POOL_MAX_CLASS: usize = 4 << 20;
/// Bytes kept per size class at most (and at least 8, at most 512 buffers).
pub const POOL_BYTES_PER_CLASS: usize = 16 << 20;

const MIN_CLASS_SHIFT: u32 = 12; // 4 KiB
const CLASSES: usize = (POOL_MAX_CLASS.trailing_zeros() - MIN_CLASS_SHIFT + 1) as usize;

/// Free buffers per size class: `POOL[i]` holds raw vectors of `(4096 << i) + IO_ALIGN` bytes.
static POOL: [Mutex<Vec<Vec<u8>>>; CLASSES] = [const { Mutex::new(Vec::new()) }; CLASSES];

/// The size class index of a buffer of `len` bytes, if it is recycled.
fn class_of(len: usize) -> Option<usize> {
    if len > POOL_MAX_CLASS {
        return None;
    }
    let class = len.max(1 << MIN_CLASS_SHIFT).next_power_of_two();
    Some((class.trailing_zeros() - MIN_CLASS_SHIFT) as usize)
}

fn class_cap(class: usize) -> usize {
    (POOL_BYTES_PER_CLASS >> (class as u32 + MIN_CLASS_SHIFT)).clamp(8, 512)
}

/// An owned, fixed-length, [`IO_ALIGN`]-aligned buffer. It is moved into a disk engine for the
/// duration of an I/O and handed back, never shared, so the kernel may write into it.
pub struct IoBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> IoBuf {
        let mut b = IoBuf::for_overwrite(len);
        b.as_mut_slice().fill(0);
        b
    }

    /// A buffer of `len` bytes whose contents are unspecified (bytes of an earlier I/O of this
    /// process, or zeros): for callers that overwrite all of it, such as a read from the disk
    /// or from the socket. Taken from the pool when one of the right class is free.
    pub fn for_overwrite(len: usize) -> IoBuf {
        let raw = match class_of(len) {
            Some(c) => {
                let pooled = POOL[c].lock().unwrap_or_else(|p| p.into_inner()).pop();
                pooled.unwrap_or_else(|| {
                    vec![0u8; (1usize << (c as u32 + MIN_CLASS_SHIFT)) + IO_ALIGN]
                })
            }
            None => vec![0u8; len + IO_ALIGN],
        };
        let start = raw.as_ptr().align_offset(IO_ALIGN);
        assert!(start < IO_ALIGN, "align_offset on u8 pointers always succeeds");
        IoBuf { raw, start, len }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::for_overwrite(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shortens the visible length (the allocation is kept).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let capacity = self.raw.len() - IO_ALIGN;
        let Some(c) = class_of(capacity) else { return };
        if capacity != 1usize << (c as u32 + MIN_CLASS_SHIFT) {
            return; // not a pool-made buffer
        }
        let mut pool = POOL[c].lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < class_cap(c) {
            pool.push(std::mem::take(&mut self.raw));
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).finish()
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycled_buffers_are_aligned_and_zeroed_on_request() {
        let mut a = IoBuf::for_overwrite(8192);
        a.as_mut_slice().fill(0xee);
        drop(a);
        let b = IoBuf::zeroed(5000);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        assert_eq!(b.as_slice().as_ptr() as usize % IO_ALIGN, 0);
        let big = IoBuf::for_overwrite(POOL_MAX_CLASS + 1);
        assert_eq!(big.len(), POOL_MAX_CLASS + 1);
    }

    #[test]
    fn aligned_and_sized() {
        for len in [0, 1, 511, 4096, 65536 + 3] {
            let b = IoBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % IO_ALIGN, 0);
        }
    }
}
