//! `IoBuf`: a byte buffer whose start is aligned to [`IO_ALIGN`], as O_DIRECT requires, made
//! without unsafe code by over-allocating a `Vec` and starting at the first aligned byte.

/// The alignment of every `IoBuf` (covers 512- and 4096-byte logical sectors).
pub const IO_ALIGN: usize = 4096;

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
        let raw = vec![0u8; len + IO_ALIGN];
        let start = raw.as_ptr().align_offset(IO_ALIGN);
        assert!(start < IO_ALIGN, "align_offset on u8 pointers always succeeds");
        IoBuf { raw, start, len }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::zeroed(data.len());
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
    fn aligned_and_sized() {
        for len in [0, 1, 511, 4096, 65536 + 3] {
            let b = IoBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % IO_ALIGN, 0);
        }
    }
}
