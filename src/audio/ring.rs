//! The two lock-free SPSC rings that connect the audio engine with the voice thread.
//!
//! Samples are 48 kHz mono `f32` in `[-1, 1]`. The rings survive device switches: the engine
//! keeps the opposite ends and bridges them to whatever backend is active.

use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

/// Creates a ring of 48 kHz mono samples with room for `capacity` samples (at least 1).
pub(super) fn sample_ring(capacity: usize) -> (HeapProd<f32>, HeapCons<f32>) {
    HeapRb::<f32>::new(capacity.max(1)).split()
}

/// Read end of the capture ring: microphone (or virtual source) samples at 48 kHz mono.
///
/// Exists so the voice thread owns a plain lock-free consumer that stays the same object when
/// the input device is switched. Invariant: only the voice thread pops; the engine pushes.
/// When the voice thread falls behind, new samples are dropped and counted as capture overruns.
pub struct CaptureRing(HeapCons<f32>);

impl CaptureRing {
    pub(super) fn new(inner: HeapCons<f32>) -> Self {
        Self(inner)
    }

    /// Moves up to `out.len()` samples into `out`; returns how many were written.
    pub fn pop_into(&mut self, out: &mut [f32]) -> usize {
        self.0.pop_slice(out)
    }

    /// Number of samples waiting to be read.
    pub fn available(&self) -> usize {
        self.0.occupied_len()
    }

    /// Total number of samples the ring can hold.
    pub fn capacity(&self) -> usize {
        self.0.capacity().get()
    }

    /// Drops everything queued (e.g. after unmuting, to avoid replaying stale audio).
    pub fn clear(&mut self) -> usize {
        self.0.clear()
    }

    /// The underlying `ringbuf` consumer, for callers that want its full trait API.
    pub fn inner_mut(&mut self) -> &mut HeapCons<f32> {
        &mut self.0
    }

    /// Gives up the wrapper and returns the `ringbuf` consumer.
    pub fn into_inner(self) -> HeapCons<f32> {
        self.0
    }
}

/// Write end of the playback ring: mixed 48 kHz mono samples for the speaker (or virtual sink).
///
/// Exists so the voice thread owns a plain lock-free producer that stays the same object when
/// the output device is switched. Invariant: only the voice thread pushes; the engine pops at
/// the device's pace and plays silence (counted as underrun) when the ring is empty.
pub struct PlaybackRing(HeapProd<f32>);

impl PlaybackRing {
    pub(super) fn new(inner: HeapProd<f32>) -> Self {
        Self(inner)
    }

    /// Queues as many of `samples` as fit; returns how many were queued.
    pub fn push(&mut self, samples: &[f32]) -> usize {
        self.0.push_slice(samples)
    }

    /// Number of samples that can still be queued.
    pub fn free(&self) -> usize {
        self.0.vacant_len()
    }

    /// Number of samples queued and not yet taken by the output.
    pub fn queued(&self) -> usize {
        self.0.occupied_len()
    }

    /// Total number of samples the ring can hold.
    pub fn capacity(&self) -> usize {
        self.0.capacity().get()
    }

    /// The underlying `ringbuf` producer, for callers that want its full trait API.
    pub fn inner_mut(&mut self) -> &mut HeapProd<f32> {
        &mut self.0
    }

    /// Gives up the wrapper and returns the `ringbuf` producer.
    pub fn into_inner(self) -> HeapProd<f32> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn playback_ring_refuses_samples_beyond_capacity_and_capture_reads_in_order() {
        let (prod, cons) = sample_ring(4);
        let mut play = PlaybackRing::new(prod);
        let mut cap = CaptureRing::new(cons);
        assert_eq!(play.push(&[0.1, 0.2, 0.3, 0.4, 0.5]), 4);
        assert_eq!(play.free(), 0);
        assert_eq!(cap.available(), 4);
        let mut out = [0.0; 3];
        assert_eq!(cap.pop_into(&mut out), 3);
        assert_eq!(out, [0.1, 0.2, 0.3]);
        assert_eq!(play.queued(), 1);
    }
}
