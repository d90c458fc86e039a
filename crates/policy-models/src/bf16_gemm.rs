//! A matrix product with bf16 operands and f32 accumulation on CPUs with AVX-512 BF16
//! (`vdpbf16ps`: 32 bf16 products summed into 16 f32 lanes per instruction, twice the
//! multiply-adds of an f32 FMA of the same width).
//!
//! flex multiplies bf16 tensors by converting both to f32, running its f32 product and
//! converting the result back: a bf16 pass then costs more than an f32 one. PyTorch's oneDNN
//! kernels use this instruction (or AMX) for `bfloat16`, which is what TRL's `bf16=True` runs on
//! such a CPU. [`matmul`] is that product: operands are rounded to bf16 (round to nearest even,
//! as `half::bf16::from_f32` and `vcvtne2ps2bf16`) while they are packed, products accumulate in
//! f32, and the result is f32.
//!
//! The layout is the usual one of BLIS-style kernels (Goto and van de Geijn, "Anatomy of
//! high-performance matrix multiplication", 2008): A is packed into panels of [`MR`] rows and B
//! into panels of [`NR`] columns, each as pairs of consecutive k (the two bf16 halves of one
//! 32-bit lane, the unit `vdpbf16ps` multiplies); a micro-kernel keeps an [`MR`] x [`NR`] block of
//! C in 24 registers over [`KC`] pairs, the A block it sweeps sits in L2 and the B panel in L1.
//!
//! # Shapes
//! - `a`: [M, K], `b`: [K, N], any strides (a transpose is a view), f32 or bf16 elements;
//! - output: [M, N] f32, row-major.

use rayon::prelude::*;

/// Rows of A per micro-kernel (12 x 2 accumulator registers of the 32).
pub const MR: usize = 12;
/// Columns of B per micro-kernel (two 16-lane registers).
pub const NR: usize = 32;
/// k pairs per pass of the micro-kernel: a B panel of 128 x 32 lanes is 16 KiB (L1).
const KC: usize = 128;
/// Rows of a tile: 8 A panels of 128 pairs, 48 KiB (L2).
const MC: usize = 8 * MR;
/// Columns of a tile.
const NC: usize = 16 * NR;

/// The elements of an operand.
#[derive(Debug, Clone, Copy)]
pub enum Elems<'a> {
    /// f32 values, rounded to bf16 when packed.
    F32(&'a [f32]),
    /// bf16 values.
    Bf16(&'a [half::bf16]),
}

/// A strided matrix: element (i, j) at `offset + i * row_stride + j * col_stride`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    /// The storage.
    pub elems: Elems<'a>,
    /// Index of element (0, 0).
    pub offset: usize,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between rows, in elements.
    pub row_stride: isize,
    /// Distance between columns, in elements.
    pub col_stride: isize,
}

impl MatRef<'_> {
    /// The transpose (a view).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }
}

/// Whether this CPU runs [`matmul`] (AVX-512 F and AVX-512 BF16), checked once; false when the
/// environment sets `COTLAB_BF16_KERNEL=off` (to measure flex's own bf16 path beside it).
pub fn supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        if std::env::var("COTLAB_BF16_KERNEL").is_ok_and(|v| v == "off") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `a` [M, K] times `b` [K, N] into `out` [M, N] (overwritten), operands rounded to bf16 and
/// products accumulated in f32.
///
/// # Panics
/// When the shapes disagree or the CPU lacks AVX-512 BF16 (check [`supported`]).
pub fn matmul(a: MatRef<'_>, b: MatRef<'_>, out: &mut [f32]) {
    assert_eq!(a.cols, b.rows, "bf16 matmul: [{}, {}] x [{}, {}]", a.rows, a.cols, b.rows, b.cols);
    let packed_b = Scratch::pack(b.t(), NR, b.rows.div_ceil(2));
    run(a, &packed_b, b.cols, out);
}

/// A right operand packed once for many products ([`matmul_packed`]): a weight during
/// generation, where packing it again for every token's few rows would cost as much as the
/// product.
#[derive(Debug)]
pub struct PackedB {
    lanes: Vec<u32>,
    rows: usize,
    cols: usize,
}

impl PackedB {
    /// Packs `b` [K, N].
    pub fn new(b: MatRef<'_>) -> Self {
        let pairs = b.rows.div_ceil(2);
        let mut lanes = vec![0u32; b.cols.div_ceil(NR) * pairs * NR];
        pack(b.t(), NR, pairs, &mut lanes);
        Self { lanes, rows: b.rows, cols: b.cols }
    }

    /// [K, N].
    pub fn dims(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }
}

/// [`matmul`] with `b` packed beforehand.
pub fn matmul_packed(a: MatRef<'_>, b: &PackedB, out: &mut [f32]) {
    assert_eq!(a.cols, b.rows, "bf16 matmul: [{}, {}] x packed [{}, {}]", a.rows, a.cols, b.rows, b.cols);
    run(a, &b.lanes, b.cols, out);
}

/// `a` times the packed B of `n` columns into `out`.
fn run(a: MatRef<'_>, packed_b: &[u32], n: usize, out: &mut [f32]) {
    assert!(supported(), "bf16_gemm::matmul needs AVX-512 BF16");
    let (m, k) = (a.rows, a.cols);
    assert_eq!(out.len(), m * n, "bf16 matmul: output of {} for [{m}, {n}]", out.len());
    out.fill(0.0);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let pairs = k.div_ceil(2);
    let packed_a = Scratch::pack(a, MR, pairs);
    // Narrower tiles when there are few rows (generation's), so that every thread has some.
    let wanted = 4 * rayon::current_num_threads();
    let row_tiles = m.div_ceil(MC);
    let nc = if row_tiles >= wanted {
        NC
    } else {
        n.div_ceil(wanted.div_ceil(row_tiles)).next_multiple_of(NR).clamp(NR, NC)
    };
    let tiles: Vec<(usize, usize)> = (0..m).step_by(MC).flat_map(|i| (0..n).step_by(nc).map(move |j| (i, j))).collect();
    let out = SharedOut(out.as_mut_ptr());
    let work = |&(i0, j0): &(usize, usize)| {
        let (rows, cols) = ((m - i0).min(MC), (n - j0).min(nc));
        for p0 in (0..pairs).step_by(KC) {
            let kc = (pairs - p0).min(KC);
            for j in (0..cols).step_by(NR) {
                let b_panel = &packed_b[((j0 + j) / NR * pairs + p0) * NR..];
                for i in (0..rows).step_by(MR) {
                    let a_panel = &packed_a[((i0 + i) / MR * pairs + p0) * MR..];
                    // SAFETY: tiles are disjoint, so each output element is written by one
                    // thread; the panels hold `kc` pairs past the offsets taken.
                    unsafe {
                        kernel(
                            kc,
                            a_panel.as_ptr(),
                            b_panel.as_ptr(),
                            out.at((i0 + i) * n + j0 + j),
                            n,
                            (rows - i).min(MR),
                            (cols - j).min(NR),
                        );
                    }
                }
            }
        }
    };
    if (m as u64) * (n as u64) * (k as u64) < 1 << 20 || tiles.len() == 1 {
        tiles.iter().for_each(work);
    } else {
        tiles.par_iter().for_each(work);
    }
}

/// A packed operand in a buffer that goes back to a pool when dropped: fresh allocations of
/// a few MB each product were page-faulted in and zeroed by the kernel (a tenth of a bf16
/// training step in a profile).
struct Scratch(Vec<u32>);

/// Buffers of finished products, kept while they total at most [`POOL_BYTES`].
static POOL: std::sync::Mutex<Vec<Vec<u32>>> = std::sync::Mutex::new(Vec::new());
/// See [`POOL`].
const POOL_BYTES: usize = 64 << 20;

impl Scratch {
    /// [`pack`] into a pooled buffer.
    fn pack(x: MatRef<'_>, width: usize, pairs: usize) -> Self {
        let len = x.rows.div_ceil(width) * pairs * width;
        let mut buffer = {
            let mut pool = POOL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match pool.iter().position(|b| b.capacity() >= len) {
                Some(i) => pool.swap_remove(i),
                None => Vec::new(),
            }
        };
        buffer.clear();
        buffer.resize(len, 0);
        pack(x, width, pairs, &mut buffer);
        Self(buffer)
    }
}

impl std::ops::Deref for Scratch {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.0);
        let mut pool = POOL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let held: usize = pool.iter().map(|b| b.capacity() * 4).sum();
        if held + buffer.capacity() * 4 <= POOL_BYTES {
            pool.push(buffer);
        }
    }
}

/// The output's base pointer, shared by the tiles' threads.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: each tile writes its own rectangle of the output.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(self, index: usize) -> *mut f32 {
        self.0.wrapping_add(index)
    }
}

/// `x` [R, K] packed in panels of `width` rows: panel `s`, pair `p`, row `r` at
/// `(s * pairs + p) * width + r`, holding x[s width + r, 2p] in its low half and x[.., 2p + 1] in
/// its high half (zero past the matrix), into `packed` (zeroed, of that length).
fn pack(x: MatRef<'_>, width: usize, pairs: usize, packed: &mut [u32]) {
    match x.elems {
        Elems::F32(values) => pack_with(x, values, width, pairs, packed),
        Elems::Bf16(values) => pack_with(x, values, width, pairs, packed),
    }
}

/// An element type [`pack`] reads.
trait Element: Copy + Sync {
    /// The value as bf16 bits.
    fn bits(self) -> u16;
}

impl Element for f32 {
    #[inline(always)]
    fn bits(self) -> u16 {
        round(self)
    }
}

impl Element for half::bf16 {
    #[inline(always)]
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

/// One packed lane: `low` and `high` as the low and high bf16 halves.
#[inline(always)]
fn lane<E: Element>(low: E, high: E) -> u32 {
    u32::from(low.bits()) | (u32::from(high.bits()) << 16)
}

/// [`pack`] reading element bits through `bits` (a storage index in, bf16 bits out).
///
/// The source is walked in its memory order: along k when k is its unit-stride dimension (a
/// row-major A, a B given transposed), across the panel's rows when they are (a row-major B, or
/// A = X^T in a weight gradient, whose k runs over thousands of rows). A profile of a bf16
/// training step put as much time in an index-per-element version of this as in the kernel.
#[inline(always)]
fn pack_with<E: Element>(x: MatRef<'_>, values: &[E], width: usize, pairs: usize, packed: &mut [u32]) {
    let (rs, cs) = (x.row_stride, x.col_stride);
    let odd = x.cols % 2 == 1;
    packed.par_chunks_mut(pairs * width).enumerate().for_each(|(s, panel)| {
        let rows = (x.rows - s * width).min(width);
        let start = x.offset as isize + (s * width) as isize * rs; // element (s width, 0)
        let at = |r: usize, k: usize| (start + r as isize * rs + k as isize * cs) as usize;
        let full = if odd { pairs - 1 } else { pairs }; // pairs with both halves in the matrix
        if cs == 1 {
            for r in 0..rows {
                let row = &values[at(r, 0)..][..2 * full];
                for (pair, out) in row.chunks_exact(2).zip(panel[r..].iter_mut().step_by(width)) {
                    *out = lane(pair[0], pair[1]);
                }
            }
        } else if rs == 1 {
            for (p, lanes) in panel.chunks_exact_mut(width).take(full).enumerate() {
                let even = &values[at(0, 2 * p)..][..rows];
                let next = &values[at(0, 2 * p + 1)..][..rows];
                for ((out, &low), &high) in lanes[..rows].iter_mut().zip(even).zip(next) {
                    *out = lane(low, high);
                }
            }
        } else {
            for (p, lanes) in panel.chunks_exact_mut(width).take(full).enumerate() {
                for (r, out) in lanes[..rows].iter_mut().enumerate() {
                    *out = lane(values[at(r, 2 * p)], values[at(r, 2 * p + 1)]);
                }
            }
        }
        if odd {
            // The last pair's high half is past the matrix: zero.
            for (r, out) in panel[(pairs - 1) * width..][..rows].iter_mut().enumerate() {
                *out = u32::from(values[at(r, 2 * pairs - 2)].bits());
            }
        }
    });
}

/// `values` rounded to bf16 ([`round`]), in parallel chunks.
pub fn to_bf16(values: &[f32]) -> Vec<half::bf16> {
    let mut rounded = vec![half::bf16::ZERO; values.len()];
    rounded.par_chunks_mut(1 << 14).zip(values.par_chunks(1 << 14)).for_each(|(rounded, values)| {
        for (r, x) in rounded.iter_mut().zip(values) {
            *r = half::bf16::from_bits(round(*x));
        }
    });
    rounded
}

/// `x` rounded to the nearest bf16, ties to even (`half::bf16::from_f32` without its
/// subnormal and infinity branches, which the rounding handles: a NaN stays a quiet NaN).
#[inline(always)]
pub fn round(x: f32) -> u16 {
    let bits = x.to_bits();
    // Wrapping: a NaN's bits can overflow here, and its result is discarded below.
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() { ((bits >> 16) | 0x0040) as u16 } else { rounded }
}

/// C[rows, cols] += A-panel · B-panel over `pairs` k pairs (C at `c`, rows `ldc` apart).
///
/// # Safety
/// The CPU has AVX-512 F and BF16 (checked by [`matmul`]); `a` holds `pairs * MR` lanes, `b`
/// `pairs * NR`, and `c` is writable for `rows` rows of `cols` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(pairs: usize, a: *const u32, b: *const u32, c: *mut f32, ldc: usize, rows: usize, cols: usize) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): bounds as the caller promises; the transmutes reinterpret 512 bits.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..pairs {
            let b_lanes = b.add(p * NR);
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b_lanes.cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b_lanes.add(16).cast()));
            let a_lanes = a.add(p * MR);
            for (r, acc) in acc.iter_mut().enumerate() {
                let a_r: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a_lanes.add(r) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], a_r, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], a_r, b1);
            }
        }
        let low = if cols >= 16 { 0xFFFF } else { (1u32 << cols) as u16 - 1 };
        let high = if cols >= 32 {
            0xFFFF
        } else if cols > 16 {
            (1u32 << (cols - 16)) as u16 - 1
        } else {
            0
        };
        for (r, acc) in acc.iter().enumerate() {
            if r < rows {
                let row = c.add(r * ldc);
                _mm512_mask_storeu_ps(row, low, _mm512_add_ps(_mm512_maskz_loadu_ps(low, row), acc[0]));
                let row = row.add(16);
                _mm512_mask_storeu_ps(row, high, _mm512_add_ps(_mm512_maskz_loadu_ps(high, row), acc[1]));
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: usize, _: *const u32, _: *const u32, _: *mut f32, _: usize, _: usize, _: usize) {
    unreachable!("bf16_gemm::supported() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let round = |x: f32| half::bf16::from_f32(x).to_f32();
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] =
                    (0..k).map(|p| f64::from(round(a[i * k + p]) * round(b[p * n + j]))).sum::<f64>() as f32;
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5)
            .collect()
    }

    /// Ragged shapes (every edge: rows past a panel, columns past a register, an odd depth,
    /// depth past one KC block) against a product of the rounded operands in f64.
    #[test]
    fn matches_the_rounded_product() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        for &(m, k, n) in &[(1, 1, 1), (13, 7, 33), (100, 301, 70), (25, 576, 600), (200, 64, 17)] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let mut out = vec![f32::NAN; m * n];
            fn at(values: &[f32], rows: usize, cols: usize) -> MatRef<'_> {
                MatRef { elems: Elems::F32(values), offset: 0, rows, cols, row_stride: cols as isize, col_stride: 1 }
            }
            matmul(at(&a, m, k), at(&b, k, n), &mut out);
            let expected = reference(&a, &b, m, k, n);
            for (x, y) in out.iter().zip(&expected) {
                assert!(
                    (x - y).abs() <= 1e-5 * (k as f32).sqrt() + 1e-6 * y.abs(),
                    "[{m}, {k}] x [{k}, {n}]: {x} vs {y}"
                );
            }
            // The same product through bf16 storage and a transposed view of B.
            let a16: Vec<half::bf16> = a.iter().map(|x| half::bf16::from_f32(*x)).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect(); // [N, K]
            let mut again = vec![f32::NAN; m * n];
            let a16 = MatRef { elems: Elems::Bf16(&a16), ..at(&a, m, k) };
            matmul(a16, at(&bt, n, k).t(), &mut again);
            assert_eq!(out, again, "[{m}, {k}] x [{k}, {n}] from bf16 storage and a transposed view");
            // A transposed A (a weight gradient's X^T) and a B packed once.
            let at_: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect(); // [K, M]
            let packed = PackedB::new(at(&b, k, n));
            let mut third = vec![f32::NAN; m * n];
            matmul_packed(at(&at_, k, m).t(), &packed, &mut third);
            assert_eq!(out, third, "[{m}, {k}] x [{k}, {n}] from A^T and a packed B");
        }
    }

    /// The rounding packs use is `half`'s (round to nearest, ties to even), NaN included.
    #[test]
    fn rounds_as_half_does() {
        let specials = [0.0f32, -0.0, 1.0, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY, 1e-40, -1e-40];
        let ties = [f32::from_bits(0x3F80_8000), f32::from_bits(0x3F81_8000), f32::from_bits(0x3F80_7FFF)];
        let spread = (0..100_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)));
        for x in specials.into_iter().chain(ties).chain(spread) {
            if x.is_nan() {
                assert!(half::bf16::from_bits(round(x)).is_nan(), "{x:?}");
            } else {
                assert_eq!(round(x), half::bf16::from_f32(x).to_bits(), "{x:e} ({:#x})", x.to_bits());
            }
        }
    }
}
