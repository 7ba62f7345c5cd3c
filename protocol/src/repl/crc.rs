//! crc32c of a concatenation from the crcs of its parts, in constant time for a fixed part
//! length.
//!
//! The agent computes every block's crc32c when it captures the write and keeps it with the
//! data until the target checks it, so that a block damaged in memory between capture and send
//! is caught. Adjacent blocks travel merged into one frame, whose crc is combined from the
//! blocks' crcs rather than recomputed from the (possibly damaged) bytes. `crc32c::crc32c_combine`
//! derives the operator for the length on every call (about 30 polynomial products); the blocks
//! of a volume all have one length, so [`Combiner`] derives it once and each combine is one
//! product. The arithmetic is zlib's `crc32_combine_gen`/`crc32_combine_op` with the Castagnoli
//! polynomial.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82f6_3b78;

/// `a * b mod p` over GF(2), reflected bit order.
fn mult_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                return p;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
}

/// `x^(8 * len) mod p`: the operator that moves a crc past `len` more bytes.
fn shift_operator(len: u64) -> u32 {
    // x2n[k] = x^(2^k) mod p, starting at x^1.
    let mut x2n = [0u32; 32];
    let mut p = 1u32 << 30;
    x2n[0] = p;
    for slot in x2n.iter_mut().skip(1) {
        p = mult_mod_p(p, p);
        *slot = p;
    }
    // x^(8 len) = x^(len * 2^3): walk the bits of len from k = 3.
    let (mut n, mut k, mut op) = (len, 3usize, 1u32 << 31);
    while n != 0 {
        if n & 1 != 0 {
            op = mult_mod_p(x2n[k & 31], op);
        }
        n >>= 1;
        k += 1;
    }
    op
}

/// Combines crc32c values of parts that all follow a part of a fixed length.
#[derive(Debug, Clone, Copy)]
pub struct Combiner {
    len: u64,
    op: u32,
}

impl Combiner {
    /// A combiner for second parts of `len` bytes.
    pub fn new(len: u64) -> Combiner {
        Combiner { len, op: shift_operator(len) }
    }

    /// The crc32c of `A || B` from `crc_a` and the crc32c `crc_b` of the `len` bytes `B`.
    pub fn combine(&self, crc_a: u32, crc_b: u32) -> u32 {
        mult_mod_p(self.op, crc_a) ^ crc_b
    }

    /// The part length this combiner is for.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a combiner of empty parts (which leave a crc unchanged).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The crc32c of `A || B` for any length of `B` (derives the operator each call).
pub fn combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    Combiner::new(len_b).combine(crc_a, crc_b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_the_crc_of_the_concatenation() {
        let a: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let b: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
        let whole = [a.as_slice(), b.as_slice()].concat();
        let c = Combiner::new(4096);
        assert_eq!(c.combine(crc32c::crc32c(&a), crc32c::crc32c(&b)), crc32c::crc32c(&whole));
        assert_eq!(Combiner::new(0).combine(crc32c::crc32c(&a), 0), crc32c::crc32c(&a));
    }

    proptest! {
        #[test]
        fn agrees_with_the_crc32c_crate(a in proptest::collection::vec(any::<u8>(), 0..300),
                                        b in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let whole = [a.as_slice(), b.as_slice()].concat();
            let (ca, cb) = (crc32c::crc32c(&a), crc32c::crc32c(&b));
            prop_assert_eq!(combine(ca, cb, b.len() as u64), crc32c::crc32c(&whole));
            prop_assert_eq!(combine(ca, cb, b.len() as u64), crc32c::crc32c_combine(ca, cb, b.len()));
        }
    }
}
