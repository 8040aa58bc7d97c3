//! Counts that show a regression before a stopwatch does: tensors created and host reads
//! of device values (each one a device sync on CUDA). `recall bench` reports them per step.

use std::cell::Cell;

use candle_core::{DType, Device, Tensor};

thread_local! {
    /// Per thread: the engine runs a step, and every plugin call of it, on one thread.
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// Run `read`, a copy of device values to the host, and count it.
pub fn read_back<T>(read: impl FnOnce() -> candle_core::Result<T>) -> candle_core::Result<T> {
    READS.set(READS.get() + 1);
    read()
}

/// Host reads of device values so far on this thread ([`read_back`]).
pub fn reads() -> u64 {
    READS.get()
}

/// Tensors created so far in this process. candle numbers every tensor from one global
/// counter and exposes the number only through `TensorId`'s `Debug`: a fresh scalar's id is
/// the count (the scalar itself included).
pub fn tensors_created() -> u64 {
    let Ok(probe) = Tensor::zeros((), DType::U8, &Device::Cpu) else { return 0 };
    let id = format!("{:?}", probe.id());
    id.trim_start_matches("TensorId(").trim_end_matches(')').parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_counted() {
        let before = reads();
        let v = read_back(|| Tensor::ones(3, DType::F32, &Device::Cpu)?.sum_all()?.to_scalar::<f32>()).unwrap();
        assert_eq!((v, reads() - before), (3.0, 1));
    }
}
