//! The in-memory dirty bitmap: one bit per block, two levels.
//!
//! The top level is an array of pages; a page (a leaf) holds [`PAGE_WORDS`] 64-bit words and is
//! allocated on the first bit set in it, so a bitmap of a mostly clean volume costs 8 bytes per
//! page (one per 127 MiB of a 4 KiB-block volume) plus the pages in use. A page is exactly the
//! payload of one on-disk bitmap record (see `store.rs`), so persisting is page by page.
//!
//! Setting bits is lock-free (`fetch_or`); every page has a "needs persisting" flag set after
//! its bits (Release) and taken by the writer-back before it reads them (Acquire), so a bit set
//! after the snapshot leaves the flag set for the next write-back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

/// 64-bit words per page: 4064 bytes, so a page plus its 32-byte record header is 4 KiB.
pub const PAGE_WORDS: usize = 508;
/// Bits (blocks) per page.
pub const PAGE_BITS: u64 = PAGE_WORDS as u64 * 64;

type Leaf = Box<[AtomicU64]>;

/// A bitmap of `len` bits.
#[derive(Debug)]
pub struct Bitmap {
    len: u64,
    pages: Box<[OnceLock<Leaf>]>,
    dirty: Box<[AtomicBool]>,
}

impl Bitmap {
    /// An all-clear bitmap of `len` bits (nothing allocated yet).
    pub fn new(len: u64) -> Bitmap {
        let n = len.div_ceil(PAGE_BITS) as usize;
        Bitmap {
            len,
            pages: (0..n).map(|_| OnceLock::new()).collect(),
            dirty: (0..n).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    fn leaf(&self, page: usize) -> &Leaf {
        self.pages[page].get_or_init(|| (0..PAGE_WORDS).map(|_| AtomicU64::new(0)).collect())
    }

    /// Sets bits `[first, end)` and flags their pages for write-back.
    pub fn set_range(&self, first: u64, end: u64) {
        let end = end.min(self.len);
        let mut at = first;
        while at < end {
            let page = (at / PAGE_BITS) as usize;
            let page_end = ((page as u64 + 1) * PAGE_BITS).min(end);
            let leaf = self.leaf(page);
            let base = page as u64 * PAGE_BITS;
            let mut bit = at - base;
            let stop = page_end - base;
            while bit < stop {
                let word = (bit / 64) as usize;
                let lo = bit % 64;
                let hi = (stop - word as u64 * 64).min(64);
                let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
                if leaf[word].load(Ordering::Relaxed) & mask != mask {
                    leaf[word].fetch_or(mask, Ordering::Relaxed);
                }
                bit = word as u64 * 64 + hi;
            }
            self.dirty[page].store(true, Ordering::Release);
            at = page_end;
        }
    }

    /// Clears every bit; every allocated page is flagged for write-back.
    pub fn clear_all(&self) {
        for (page, slot) in self.pages.iter().enumerate() {
            if let Some(leaf) = slot.get() {
                for w in leaf.iter() {
                    w.store(0, Ordering::Relaxed);
                }
                self.dirty[page].store(true, Ordering::Release);
            }
        }
    }

    /// Clears bits `[first, end)` except those for which `keep(bit)` is true; pages whose
    /// bits changed are flagged for write-back. Returns the number of bits cleared.
    ///
    /// A bit `keep` refuses is cleared first and `keep` asked again after (a kept bit is set
    /// again): so when `keep` looks at state that a concurrent writer updates *before* it sets
    /// its bit (the replication capture), that writer's bit is never lost. The page flag is
    /// set after the bits, so a write-back that saw the short-lived clear is followed by one
    /// that sees the restored bit.
    pub fn clear_range(&self, first: u64, end: u64, keep: impl Fn(u64) -> bool) -> u64 {
        let end = end.min(self.len);
        let mut cleared = 0;
        let mut at = first;
        while at < end {
            let page = (at / PAGE_BITS) as usize;
            let base = page as u64 * PAGE_BITS;
            let page_end = (base + PAGE_BITS).min(end);
            let Some(leaf) = self.pages[page].get() else {
                at = page_end;
                continue;
            };
            let mut changed = false;
            let mut bit = at - base;
            let stop = page_end - base;
            while bit < stop {
                let word = (bit / 64) as usize;
                let lo = bit % 64;
                let hi = (stop - word as u64 * 64).min(64);
                let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
                bit = word as u64 * 64 + hi;
                let mut set = leaf[word].load(Ordering::Relaxed) & mask;
                let mut drop = 0u64;
                while set != 0 {
                    let i = set.trailing_zeros();
                    set &= set - 1;
                    if !keep(base + word as u64 * 64 + u64::from(i)) {
                        drop |= 1 << i;
                    }
                }
                if drop == 0 {
                    continue;
                }
                // Cleared first, `keep` asked again after: a writer that updated what `keep`
                // sees in between sets its bit again here, one that updates it later sets
                // its bit itself.
                let was = leaf[word].fetch_and(!drop, Ordering::AcqRel) & drop;
                let mut back = 0u64;
                let mut rest = was;
                while rest != 0 {
                    let i = rest.trailing_zeros();
                    rest &= rest - 1;
                    if keep(base + word as u64 * 64 + u64::from(i)) {
                        back |= 1 << i;
                    }
                }
                if back != 0 {
                    leaf[word].fetch_or(back, Ordering::AcqRel);
                }
                cleared += u64::from((was & !back).count_ones());
                changed |= was != 0;
            }
            if changed {
                self.dirty[page].store(true, Ordering::Release);
            }
            at = page_end;
        }
        cleared
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let page = (i / PAGE_BITS) as usize;
        let bit = i % PAGE_BITS;
        self.pages[page].get().is_some_and(|l| {
            l[(bit / 64) as usize].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0
        })
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.pages
            .iter()
            .filter_map(|p| p.get())
            .flat_map(|l| l.iter())
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Runs of equal bits covering `[first, end)`: `(length in bits, set)`, alternating, at
    /// most `max_runs` (the answer then stops early).
    pub fn runs(&self, first: u64, end: u64, max_runs: usize) -> Vec<(u64, bool)> {
        let end = end.min(self.len);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let push = |n: u64, set: bool, runs: &mut Vec<(u64, bool)>| -> bool {
            match runs.last_mut() {
                Some(last) if last.1 == set => last.0 += n,
                _ => {
                    if runs.len() >= max_runs {
                        return false;
                    }
                    runs.push((n, set));
                }
            }
            true
        };
        let mut at = first;
        while at < end {
            let page = (at / PAGE_BITS) as usize;
            let base = page as u64 * PAGE_BITS;
            let page_end = (base + PAGE_BITS).min(end);
            let Some(leaf) = self.pages[page].get() else {
                if !push(page_end - at, false, &mut runs) {
                    break;
                }
                at = page_end;
                continue;
            };
            // Walk word by word; a word that is all 0 or all 1 is one step.
            while at < page_end {
                let bit = at - base;
                let word = leaf[(bit / 64) as usize].load(Ordering::Relaxed) >> (bit % 64);
                let avail = (64 - bit % 64).min(page_end - at);
                let set = word & 1 != 0;
                // Length of the run of `set` bits at the bottom of `word`, capped by `avail`.
                let n = if set { (!word).trailing_zeros() } else { word.trailing_zeros() };
                let n = u64::from(n).min(avail);
                if !push(n, set, &mut runs) {
                    return runs;
                }
                at += n;
            }
        }
        runs
    }

    /// Pages with memory allocated.
    pub fn allocated_pages(&self) -> usize {
        self.pages.iter().filter(|p| p.get().is_some()).count()
    }

    /// Takes page `page`'s write-back flag: true if it must be written.
    pub fn take_dirty(&self, page: usize) -> bool {
        self.dirty[page].swap(false, Ordering::AcqRel)
    }

    /// Flags page `page` for write-back again (after a failed write).
    pub fn mark_dirty(&self, page: usize) {
        self.dirty[page].store(true, Ordering::Release);
    }

    /// Copies page `page`'s words into `out` (zeros if the page was never allocated).
    pub fn snapshot(&self, page: usize, out: &mut [u64; PAGE_WORDS]) {
        match self.pages[page].get() {
            Some(l) => {
                for (o, w) in out.iter_mut().zip(l.iter()) {
                    *o = w.load(Ordering::Relaxed);
                }
            }
            None => out.fill(0),
        }
    }

    /// ORs `words` into page `page` (loading from disk); does not flag it for write-back.
    /// Bits beyond `len` are ignored.
    pub fn load(&self, page: usize, words: &[u64; PAGE_WORDS]) {
        if words.iter().all(|&w| w == 0) {
            return;
        }
        let leaf = self.leaf(page);
        let base = page as u64 * PAGE_BITS;
        for (i, (slot, &w)) in leaf.iter().zip(words.iter()).enumerate() {
            let first = base + i as u64 * 64;
            if first >= self.len {
                break;
            }
            let valid = (self.len - first).min(64);
            let mask = if valid == 64 { u64::MAX } else { (1u64 << valid) - 1 };
            slot.fetch_or(w & mask, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u64),
        Clear,
        Reload,
    }

    fn ops(len: u64) -> impl Strategy<Value = Vec<Op>> {
        let set = (0..len, 1..3 * PAGE_BITS).prop_map(move |(a, n)| Op::Set(a, (a + n).min(len)));
        // Ranges near page and word boundaries are where coalescing goes wrong.
        let edge = (1..4u64, 0..130u64, 0..130u64).prop_map(move |(p, l, r)| {
            let b = (p * PAGE_BITS).min(len);
            Op::Set(b.saturating_sub(l), (b + r).min(len))
        });
        let op = prop_oneof![4 => set, 4 => edge, 1 => Just(Op::Clear), 1 => Just(Op::Reload)];
        proptest::collection::vec(op, 1..40)
    }

    /// The runs of a model set over `[first, end)`.
    fn model_runs(m: &BTreeSet<u64>, first: u64, end: u64) -> Vec<(u64, bool)> {
        let mut runs: Vec<(u64, bool)> = Vec::new();
        for i in first..end {
            let s = m.contains(&i);
            match runs.last_mut() {
                Some(l) if l.1 == s => l.0 += 1,
                _ => runs.push((1, s)),
            }
        }
        runs
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// The bitmap against a BTreeSet: set, clear, iterate, persist (snapshot) and reload.
        #[test]
        fn matches_a_set_model(ops in ops(4 * PAGE_BITS + 77), probe in (0..4 * PAGE_BITS, 1..2 * PAGE_BITS)) {
            let len = 4 * PAGE_BITS + 77;
            let mut bm = Bitmap::new(len);
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Set(a, b) => {
                        bm.set_range(a, b);
                        model.extend(a..b);
                    }
                    Op::Clear => {
                        bm.clear_all();
                        model.clear();
                    }
                    Op::Reload => {
                        let fresh = Bitmap::new(len);
                        let mut w = [0u64; PAGE_WORDS];
                        for p in 0..bm.pages() {
                            bm.snapshot(p, &mut w);
                            fresh.load(p, &w);
                        }
                        bm = fresh;
                    }
                }
            }
            prop_assert_eq!(bm.count_ones(), model.len() as u64);
            prop_assert_eq!(bm.runs(0, len, usize::MAX), model_runs(&model, 0, len));
            let (a, n) = probe;
            let b = (a + n).min(len);
            prop_assert_eq!(bm.runs(a, b, usize::MAX), model_runs(&model, a, b));
            let capped = bm.runs(a, b, 2);
            let full = model_runs(&model, a, b);
            prop_assert_eq!(&capped[..], &full[..full.len().min(2)]);
            for i in [0, PAGE_BITS - 1, PAGE_BITS, 2 * PAGE_BITS + 63, len - 1] {
                prop_assert_eq!(bm.get(i), model.contains(&i));
            }
        }
    }

    #[test]
    fn runs_coalesce_across_page_and_word_boundaries() {
        let bm = Bitmap::new(3 * PAGE_BITS);
        bm.set_range(PAGE_BITS - 70, PAGE_BITS + 70);
        assert_eq!(
            bm.runs(0, 3 * PAGE_BITS, usize::MAX),
            vec![(PAGE_BITS - 70, false), (140, true), (2 * PAGE_BITS - 70, false)]
        );
        bm.set_range(0, 3 * PAGE_BITS);
        assert_eq!(bm.runs(5, 3 * PAGE_BITS, usize::MAX), vec![(3 * PAGE_BITS - 5, true)]);
        // Nothing beyond len is ever set.
        let small = Bitmap::new(100);
        small.set_range(90, 1000);
        assert_eq!(small.count_ones(), 10);
    }

    #[test]
    fn flags_pages_for_write_back() {
        let bm = Bitmap::new(2 * PAGE_BITS);
        bm.set_range(PAGE_BITS + 1, PAGE_BITS + 2);
        assert!(!bm.take_dirty(0));
        assert!(bm.take_dirty(1));
        assert!(!bm.take_dirty(1));
        bm.clear_all();
        assert!(bm.take_dirty(1) && !bm.take_dirty(0));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// `clear_range` against a set: clears the range but the kept bits, counts right, and
        /// flags exactly the pages it changed.
        #[test]
        fn clear_range_matches_a_set_model(
            sets in proptest::collection::vec((0..3 * PAGE_BITS, 1..PAGE_BITS), 1..8),
            (a, n) in (0..3 * PAGE_BITS, 1..2 * PAGE_BITS),
            modulus in 1..5u64,
        ) {
            let len = 3 * PAGE_BITS;
            let bm = Bitmap::new(len);
            let mut model = BTreeSet::new();
            for (s, k) in sets {
                let e = (s + k).min(len);
                bm.set_range(s, e);
                model.extend(s..e);
            }
            for p in 0..bm.pages() {
                bm.take_dirty(p);
            }
            let b = (a + n).min(len);
            let keep = |i: u64| i.is_multiple_of(modulus);
            let before = model.clone();
            model.retain(|&i| i < a || i >= b || keep(i));
            let cleared = bm.clear_range(a, b, keep);
            prop_assert_eq!(cleared, (before.len() - model.len()) as u64);
            prop_assert_eq!(bm.runs(0, len, usize::MAX), model_runs(&model, 0, len));
            for p in 0..bm.pages() {
                let (lo, hi) = (p as u64 * PAGE_BITS, (p as u64 + 1) * PAGE_BITS);
                let changed = before.range(lo.max(a)..hi.min(b).max(lo.max(a))).any(|&i| !keep(i));
                prop_assert_eq!(bm.take_dirty(p), changed, "page {}", p);
            }
        }
    }
}
