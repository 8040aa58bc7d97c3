//! Host copies of small tensors the host made from host data (token ids), so that a plugin
//! reading them back (the text tower finds each row's end-of-text position) costs no device
//! read. Keyed by candle's tensor id, which is unique in the process; the last few are kept.

use std::cell::RefCell;

use candle_core::{Tensor, TensorId};

/// Batches kept: the current batch's ids, read by the model and the frozen copies.
const KEPT: usize = 4;

thread_local! {
    static COPIES: RefCell<Vec<(TensorId, Vec<u32>)>> = const { RefCell::new(Vec::new()) };
}

/// Remember `values` as the content of `t` (which the caller made from them).
pub fn remember_u32(t: &Tensor, values: &[u32]) {
    COPIES.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() == KEPT {
            c.remove(0);
        }
        c.push((t.id(), values.to_vec()));
    });
}

/// The host copy of `t`, if the host made it from host data recently.
pub fn u32_of(t: &Tensor) -> Option<Vec<u32>> {
    COPIES.with(|c| c.borrow().iter().find(|(id, _)| *id == t.id()).map(|(_, v)| v.clone()))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn the_last_batches_are_kept_and_older_ones_forgotten() {
        let ts: Vec<Tensor> = (0..5u32).map(|i| Tensor::new(&[i, i + 1], &Device::Cpu).unwrap()).collect();
        for (i, t) in ts.iter().enumerate() {
            super::remember_u32(t, &[i as u32, i as u32 + 1]);
        }
        assert_eq!(super::u32_of(&ts[4]), Some(vec![4, 5]));
        assert_eq!(super::u32_of(&ts[1]), Some(vec![1, 2]));
        assert_eq!(super::u32_of(&ts[0]), None, "the oldest is forgotten");
        // A view of the same values is another tensor: read from the device as before.
        assert_eq!(super::u32_of(&ts[4].reshape((1, 2)).unwrap()), None);
    }
}
