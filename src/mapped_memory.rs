//! Tensors whose buffers are pages of a memory-mapped weights file.
//!
//! Reading a 3.4 GB U-Net into fresh heap buffers costs a zero-filled page fault and a copy per
//! page: 3-8 s on a 2-core VM even with the file in the page cache, while mapping the cached
//! pages takes milliseconds (PyTorch's safetensors loader maps too). candle's CPU tensors own a
//! `Vec`, so a mapped tensor is a `Vec` whose pointer lies inside a private (copy-on-write)
//! mapping, and [`MappingAwareAllocator`], installed as the global allocator, recognises such
//! pointers when the `Vec` is freed: it counts the mapping's live buffers down instead of freeing,
//! and unmaps the file once the last one is gone.
//!
//! Without that allocator installed (a program using the library with its own allocator) no
//! mapping is made and weights are read as before: [`MappedFile::map`] returns `None`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The global allocator that lets [`MappedFile`] hand out `Vec`s over mapped pages; every other
/// allocation goes to the system allocator unchanged. Install it in the binary:
/// `#[global_allocator] static ALLOC: MappingAwareAllocator = MappingAwareAllocator;`
pub struct MappingAwareAllocator;

/// Set by the first allocation through [`MappingAwareAllocator`]: the proof that it is the
/// global allocator (long before any weights are loaded).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// How many files can be mapped at once (a pipeline maps three or four).
const SLOTS: usize = 32;

/// One mapped file: its address range and how many holders (buffers, plus the [`MappedFile`]
/// itself) still point into it. `start == 0` marks a free slot.
struct Region {
    start: AtomicUsize,
    len: AtomicUsize,
    holders: AtomicUsize,
    claimed: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE_REGION: Region = Region {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    holders: AtomicUsize::new(0),
    claimed: AtomicBool::new(false),
};

static REGIONS: [Region; SLOTS] = [FREE_REGION; SLOTS];
/// Mapped regions in use: frees skip the region scan while none is.
static MAPPED_COUNT: AtomicUsize = AtomicUsize::new(0);

/// How many files are mapped now (each stays mapped while a buffer points into it).
pub fn mapped_file_count() -> usize {
    MAPPED_COUNT.load(Ordering::Acquire)
}

/// The region whose range holds `ptr`, if any.
fn region_of(ptr: *mut u8) -> Option<&'static Region> {
    if MAPPED_COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    let addr = ptr as usize;
    REGIONS.iter().find(|region| {
        let start = region.start.load(Ordering::Acquire);
        start != 0 && addr >= start && addr < start + region.len.load(Ordering::Acquire)
    })
}

impl Region {
    /// Drops one holder; the last one unmaps the file and frees the slot.
    fn release(&self) {
        if self.holders.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let start = self.start.swap(0, Ordering::AcqRel);
        let len = self.len.load(Ordering::Acquire);
        MAPPED_COUNT.fetch_sub(1, Ordering::AcqRel);
        // SAFETY: [start, start + len) is the mapping this region made, and no buffer points
        // into it any more (the holder count reached zero).
        unsafe { libc::munmap(start as *mut libc::c_void, len) };
        self.claimed.store(false, Ordering::Release);
    }
}

/// Returns the pages that lie wholly inside a freed buffer to the system, so that a weight
/// replaced at load (quantized, converted, merged with a LoRA) stops counting in the
/// process's memory while the rest of its file stays mapped. [`MappedFile::vec`] never hands
/// out a byte twice, so those pages belonged to this buffer alone; the pages at its ends may
/// hold a neighbour's bytes and are kept.
fn discard_pages(ptr: *mut u8, size: usize) {
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    let mut page = PAGE.load(Ordering::Relaxed);
    if page == 0 {
        // SAFETY: sysconf only reads a system constant.
        page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0);
        if page == 0 {
            return;
        }
        PAGE.store(page, Ordering::Relaxed);
    }
    let start = (ptr as usize).next_multiple_of(page);
    let end = (ptr as usize + size) / page * page;
    if end > start {
        // SAFETY: whole pages of a private mapping that only the freed buffer used; the
        // mapping stays valid (discarded pages read back from the file).
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

/// Records that [`MappingAwareAllocator`] serves this program (a load, and a store only once).
#[inline(always)]
fn mark_installed() {
    if !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

// SAFETY: every allocation comes from `System`; pointers inside a mapped region are never
// passed to `System` (they did not come from it) but released to their region.
unsafe impl GlobalAlloc for MappingAwareAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        mark_installed();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        mark_installed();
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match region_of(ptr) {
            Some(region) => {
                discard_pages(ptr, layout.size());
                region.release()
            }
            None => System.dealloc(ptr, layout),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(region) = region_of(ptr) else {
            return System.realloc(ptr, layout, new_size);
        };
        // A mapped buffer that grows or shrinks moves to the heap.
        let new = System.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            discard_pages(ptr, layout.size());
            region.release();
        }
        new
    }
}

/// A whole file mapped private (copy-on-write: a buffer written in place gets its own pages and
/// the file is never modified), handing out typed buffers over its pages.
pub struct MappedFile {
    region: &'static Region,
    /// The byte ranges handed out (start → end): each byte goes to one buffer only, so a buffer
    /// written in place (a trained weight) is never seen through another, and freeing one can
    /// discard its pages.
    handed_out: Mutex<BTreeMap<usize, usize>>,
}

impl MappedFile {
    /// Maps `file` (`len` bytes), or `None` when mapped buffers cannot be used: the
    /// [`MappingAwareAllocator`] is not the global allocator, the file is empty, every slot is
    /// taken or the system refuses the mapping. The caller then reads the file instead.
    pub fn map(file: &File, len: usize) -> Option<Self> {
        if !INSTALLED.load(Ordering::Relaxed) || len == 0 {
            return None;
        }
        let region = REGIONS.iter().find(|region| {
            region
                .claimed
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })?;
        // SAFETY: a fresh private mapping of an open file; the kernel picks the address.
        let start = unsafe {
            use std::os::fd::AsRawFd;
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if start == libc::MAP_FAILED {
            region.claimed.store(false, Ordering::Release);
            return None;
        }
        // SAFETY: advice on the mapping just made; it only starts read-ahead of uncached pages.
        unsafe { libc::madvise(start, len, libc::MADV_WILLNEED) };
        region.len.store(len, Ordering::Release);
        region.holders.store(1, Ordering::Release);
        MAPPED_COUNT.fetch_add(1, Ordering::AcqRel);
        region.start.store(start as usize, Ordering::Release);
        COLLECTED.with_borrow_mut(|collected| {
            if let Some(collected) = collected {
                region.holders.fetch_add(1, Ordering::AcqRel);
                collected.push(MappedPages { region });
            }
        });
        Some(Self {
            region,
            handed_out: Mutex::default(),
        })
    }

    /// `count` values of `T` at byte `offset` of the file, as a `Vec` over the mapped pages, or
    /// `None` when they do not lie inside the file, are misaligned for `T` or overlap bytes
    /// already handed out (the caller then reads its own copy).
    ///
    /// `T` must be plain old data (floats, integers: every bit pattern valid) and little-endian
    /// like the file.
    pub fn vec<T: Copy>(&self, offset: usize, count: usize) -> Option<Vec<T>> {
        let start = self.region.start.load(Ordering::Acquire);
        let bytes = count.checked_mul(std::mem::size_of::<T>())?;
        let end = offset.checked_add(bytes)?;
        let address = start + offset;
        if count == 0
            || end > self.region.len.load(Ordering::Acquire)
            || !address.is_multiple_of(std::mem::align_of::<T>())
        {
            return None;
        }
        if !self.claim(offset, end) {
            return None;
        }
        self.region.holders.fetch_add(1, Ordering::AcqRel);
        // SAFETY: the range lies inside the mapping, aligned for T, and stays mapped while this
        // buffer holds the region; freeing it goes through `MappingAwareAllocator::dealloc`,
        // which releases the region instead of calling the system allocator (the global
        // allocator is that allocator: `map` checked it).
        Some(unsafe { Vec::from_raw_parts(address as *mut T, count, count) })
    }

    /// Records `[start, end)` as handed out, unless it overlaps a range that already was.
    fn claim(&self, start: usize, end: usize) -> bool {
        let mut handed_out = self
            .handed_out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before_end = handed_out.range(..end).next_back();
        if before_end.is_some_and(|(_, &prior_end)| prior_end > start) {
            return false;
        }
        handed_out.insert(start, end);
        true
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        self.region.release();
    }
}

thread_local! {
    /// Where [`collecting_mappings`] gathers the files mapped on this thread.
    static COLLECTED: RefCell<Option<Vec<MappedPages>>> = const { RefCell::new(None) };
}

/// Runs `load` and returns, with its result, the pages of every file it mapped (on this
/// thread), for [`MappedPages::drop_resident`]: how a pipeline finds its U-Net's file.
pub fn collecting_mappings<R>(load: impl FnOnce() -> R) -> (R, Vec<MappedPages>) {
    let outer = COLLECTED.replace(Some(Vec::new()));
    let result = load();
    let collected = COLLECTED.replace(outer).unwrap_or_default();
    (result, collected)
}

/// The pages of one mapped file; the file stays mapped while this handle lives.
pub struct MappedPages {
    region: &'static Region,
}

impl MappedPages {
    /// Takes the file's pages out of the process's resident memory now. They stay mapped and
    /// read back from the file (the page cache, while it holds them) when next touched, so
    /// this costs only page faults later: a one-shot run drops its U-Net's 3.4 GB before the
    /// VAE decoder's peak.
    ///
    /// # Safety
    /// No buffer over the file may have been written in place (a trained weight): a written
    /// page is the process's own copy, and dropping it brings back the file's values.
    pub unsafe fn drop_resident(&self) {
        let start = self.region.start.load(Ordering::Acquire);
        let len = self.region.len.load(Ordering::Acquire);
        // SAFETY: this handle holds the region, so [start, start + len) is still the file's
        // private mapping; the caller vouches that none of its pages was written.
        unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    }
}

impl Drop for MappedPages {
    fn drop(&mut self) {
        self.region.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn without_the_allocator_installed_nothing_is_mapped() {
        // The library's unit tests run with the system allocator.
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[0u8; 64]).unwrap();
        assert!(MappedFile::map(&file, 64).is_none());
    }
}
