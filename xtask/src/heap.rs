//! The global allocator: mimalloc, counting the bytes the program holds so that a benchmark can
//! tell its live heap from what the allocator keeps (peak RSS is both).
//!
//! `COTLAB_HEAP_PROFILE=FILE` samples the live heap every 20 ms from a background thread and
//! writes `seconds live_bytes` lines to FILE when the process ends its `main`: where in a step
//! the peak falls, read beside the step's phases.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

/// mimalloc behind two relaxed counters (the live bytes and their peak).
pub struct Counting {
    inner: mimalloc::MiMalloc,
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl Counting {
    pub const fn new() -> Self {
        Self { inner: mimalloc::MiMalloc, live: AtomicUsize::new(0), peak: AtomicUsize::new(0) }
    }

    fn grew(&self, bytes: usize) {
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }

    fn shrank(&self, bytes: usize) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }
}

// SAFETY: every call forwards to mimalloc with the same arguments; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as received.
        let pointer = unsafe { self.inner.alloc(layout) };
        if !pointer.is_null() {
            self.grew(layout.size());
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as received.
        let pointer = unsafe { self.inner.alloc_zeroed(layout) };
        if !pointer.is_null() {
            self.grew(layout.size());
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        self.shrank(layout.size());
        // SAFETY: forwarded as received.
        unsafe { self.inner.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as received.
        let moved = unsafe { self.inner.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            self.shrank(layout.size());
            self.grew(new_size);
        }
        moved
    }
}

#[global_allocator]
pub static ALLOCATOR: Counting = Counting::new();

/// Bytes the program holds now (allocated and not yet freed).
pub fn live_bytes() -> usize {
    ALLOCATOR.live.load(Ordering::Relaxed)
}

/// The most bytes the program held at once so far.
pub fn peak_bytes() -> usize {
    ALLOCATOR.peak.load(Ordering::Relaxed)
}

/// Starts the sampler when `COTLAB_HEAP_PROFILE` names a file; the returned guard writes the
/// samples when dropped.
pub fn profile_from_env() -> Option<ProfileGuard> {
    let path = std::env::var_os("COTLAB_HEAP_PROFILE")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push((start.elapsed().as_secs_f64(), live_bytes()));
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            samples
        })
    };
    Some(ProfileGuard { path: path.into(), stop, thread: Some(thread) })
}

/// Writes the heap samples on drop.
pub struct ProfileGuard {
    path: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(f64, usize)>>>,
}

impl Drop for ProfileGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let Some(samples) = self.thread.take().and_then(|thread| thread.join().ok()) else { return };
        let text: String = samples.iter().map(|(seconds, bytes)| format!("{seconds:.2} {bytes}\n")).collect();
        if let Err(error) = std::fs::write(&self.path, text) {
            eprintln!("COTLAB_HEAP_PROFILE: cannot write {}: {error}", self.path.display());
        }
    }
}
