//! Cache-line (64-byte) aligned buffers for AMX tiles and the blocks the tiles store to.
//!
//! A tile load or store moves 16 rows of 64 bytes. When a row straddles two cache lines (a
//! buffer that starts 16, 32 or 48 bytes into a line — what glibc's heap hands out) every row
//! is a split access, and on the Sapphire-Rapids-class Xeon these benchmarks ran on a tile load
//! then took 17 ns instead of 2.5 ns and a store 17 ns instead of 4.8 ns (`tdpbf16ps` itself:
//! 5.4 ns). With misaligned operands the 2 × 2-tile GEMM kernel was bound by its loads at about
//! a third of what the multiplies allow. Every tile buffer is therefore one of these.
//!
//! ```text
//! let mut tiles = Aligned::<u16>::filled(n_tiles * TILE, 0);   // derefs to [u16]
//! let c = Aligned::<f32>::filled(32 * n, 0.0);                 // a band of C
//! ```

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::mem::MaybeUninit;
use std::ptr::NonNull;

/// Bytes of alignment (one cache line, one tile row).
pub(crate) const ALIGN: usize = 64;

/// A fixed-length buffer of `Copy` values starting on a 64-byte boundary.
pub(crate) struct Aligned<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: the buffer owns its values (like a Vec<T>); T: Copy values have no shared state.
unsafe impl<T: Copy + Send> Send for Aligned<T> {}
// SAFETY: as above; shared access only reads.
unsafe impl<T: Copy + Sync> Sync for Aligned<T> {}

impl<T: Copy> Aligned<T> {
    fn layout(len: usize) -> Layout {
        let bytes = len
            .max(1)
            .checked_mul(size_of::<T>().max(1))
            .expect("aligned buffer size overflows usize");
        // Only fails for sizes near isize::MAX, which no tensor here reaches.
        Layout::from_size_align(bytes, ALIGN.max(align_of::<T>())).expect("aligned buffer layout")
    }

    /// `len` values, uninitialised.
    pub(crate) fn uninit(len: usize) -> Aligned<MaybeUninit<T>> {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc(layout) } as *mut MaybeUninit<T>;
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        Aligned { ptr, len }
    }

    /// `len` copies of `value`.
    pub(crate) fn filled(len: usize, value: T) -> Self {
        let mut buf = Self::uninit(len);
        buf.fill(MaybeUninit::new(value));
        // SAFETY: every element was just written.
        unsafe { buf.assume_init() }
    }

    /// A copy of `values`.
    pub(crate) fn from_slice(values: &[T]) -> Self {
        let mut buf = Self::uninit(values.len());
        for (d, &v) in buf.iter_mut().zip(values) {
            *d = MaybeUninit::new(v);
        }
        // SAFETY: every element was just written.
        unsafe { buf.assume_init() }
    }
}

impl<T: Copy> Aligned<MaybeUninit<T>> {
    /// The same buffer, its values taken as written.
    ///
    /// # Safety
    /// Every element has been written.
    pub(crate) unsafe fn assume_init(self) -> Aligned<T> {
        let me = std::mem::ManuallyDrop::new(self);
        // MaybeUninit<T> and T share size and alignment, so the allocation's layout is the same.
        Aligned {
            ptr: me.ptr.cast(),
            len: me.len,
        }
    }
}

impl<T: Copy> Drop for Aligned<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `uninit` with this layout (the length never changes).
        unsafe { dealloc(self.ptr.as_ptr() as *mut u8, Self::layout(self.len)) };
    }
}

impl<T: Copy> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised values (the constructors' invariant) at `ptr`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref; `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> Clone for Aligned<T> {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl<T: Copy> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Aligned([{}; {}])", std::any::type_name::<T>(), self.len)
    }
}

/// `len` f32 kept in a `Vec` but starting on a 64-byte boundary inside it (up to 15 zeros
/// before and after them): a GEMM's `C`, which the tile stores write on whole cache lines and
/// which becomes a candle tensor without a copy.
pub struct AlignedVec {
    vec: Vec<f32>,
    offset: usize,
    len: usize,
}

impl AlignedVec {
    /// `len` values written by `write`, which is given them uninitialised.
    ///
    /// # Safety
    /// `write` writes every element of the slice it is given.
    pub(crate) unsafe fn new_with(len: usize, write: impl FnOnce(&mut [MaybeUninit<f32>])) -> Self {
        let lanes = ALIGN / size_of::<f32>();
        let total = len + lanes;
        let mut vec: Vec<MaybeUninit<f32>> = Vec::with_capacity(total);
        // SAFETY: MaybeUninit needs no initialisation.
        unsafe { vec.set_len(total) };
        // f32 values are 4-byte aligned, so some offset below 16 lands on the boundary.
        let offset = vec.as_ptr().align_offset(ALIGN).min(lanes);
        vec[..offset].fill(MaybeUninit::new(0.0));
        vec[offset + len..].fill(MaybeUninit::new(0.0));
        write(&mut vec[offset..offset + len]);
        let mut vec = std::mem::ManuallyDrop::new(vec);
        // SAFETY: the pads were zeroed and `write` wrote the rest (the caller's promise);
        // MaybeUninit<f32> and f32 share their layout, so the allocation is the same.
        let vec =
            unsafe { Vec::from_raw_parts(vec.as_mut_ptr() as *mut f32, total, vec.capacity()) };
        Self { vec, offset, len }
    }

    /// Values computed elsewhere (not aligned: the paths without tiles).
    pub(crate) fn from_vec(vec: Vec<f32>) -> Self {
        let len = vec.len();
        Self {
            vec,
            offset: 0,
            len,
        }
    }

    /// The values as a `Vec` (a move of them to its front when they are not there already).
    pub fn into_vec(mut self) -> Vec<f32> {
        self.vec.truncate(self.offset + self.len);
        self.vec.drain(..self.offset);
        self.vec
    }

    /// The values as a tensor of shape `dims` on `device`, sharing this buffer (a view past
    /// the front pad).
    pub(crate) fn into_tensor(
        self,
        dims: &[usize],
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let total = self.vec.len();
        let t = candle_core::Tensor::from_vec(self.vec, total, device)?;
        let t = if self.offset == 0 && total == self.len {
            t
        } else {
            t.narrow(0, self.offset, self.len)?
        };
        t.reshape(dims)
    }
}

impl std::ops::Deref for AlignedVec {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.vec[self.offset..self.offset + self.len]
    }
}

impl std::ops::DerefMut for AlignedVec {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.vec[self.offset..self.offset + self.len]
    }
}

impl std::fmt::Debug for AlignedVec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedVec([f32; {}])", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_cache_line_and_hold_their_values() {
        for len in [0, 1, 7, 512, 4097] {
            let a = Aligned::<u16>::filled(len, 3);
            assert_eq!(a.as_ptr() as usize % ALIGN, 0, "len {len}");
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&v| v == 3));
            let b = a.clone();
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(&*a, &*b);
        }
        let f = Aligned::<f32>::from_slice(&[1.0, 2.0, 3.0]);
        assert_eq!(&*f, &[1.0, 2.0, 3.0]);
        assert_eq!(f.as_ptr() as usize % ALIGN, 0);
    }

    #[test]
    fn aligned_vecs_become_tensors_and_vecs_of_their_values() {
        for len in [0, 1, 5, 48, 1000] {
            let want: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 3.0).collect();
            let make = || {
                // SAFETY: the closure writes every element.
                unsafe {
                    AlignedVec::new_with(len, |c| {
                        for (d, &v) in c.iter_mut().zip(&want) {
                            *d = MaybeUninit::new(v);
                        }
                    })
                }
            };
            let a = make();
            assert_eq!(a.as_ptr() as usize % ALIGN, 0, "len {len}");
            assert_eq!(&*a, &want[..]);
            assert_eq!(make().into_vec(), want);
            let t = make()
                .into_tensor(&[len, 1], &candle_core::Device::Cpu)
                .unwrap();
            assert_eq!(t.dims(), &[len, 1]);
            assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        }
        assert_eq!(
            AlignedVec::from_vec(vec![1.0, 2.0]).into_vec(),
            vec![1.0, 2.0]
        );
    }
}
