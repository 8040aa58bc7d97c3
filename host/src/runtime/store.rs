//! The host's tensor store: the slots behind the [`TensorId`] handles plugins hold.

use candle_core::Tensor;
use recall_sdk::abi::TensorId;

struct Slot {
    generation: u32,
    tensor: Option<Tensor>,
}

/// Slab of live tensors. A released slot is reused with a bumped generation, so a stale
/// handle is reported as such instead of aliasing a newer tensor.
#[derive(Default)]
pub struct TensorStore {
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
}

impl TensorStore {
    pub fn insert(&mut self, tensor: Tensor) -> TensorId {
        self.live += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.tensor = Some(tensor);
            TensorId { index, generation: slot.generation }
        } else {
            self.slots.push(Slot { generation: 0, tensor: Some(tensor) });
            TensorId { index: (self.slots.len() - 1) as u32, generation: 0 }
        }
    }

    pub fn get(&self, id: TensorId) -> Result<Tensor, String> {
        match self.slots.get(id.index as usize) {
            Some(Slot { generation, tensor: Some(t) }) if *generation == id.generation => Ok(t.clone()),
            Some(_) => Err(format!("stale tensor handle {}#{} (already released)", id.index, id.generation)),
            None => Err(format!("invalid tensor handle {}#{}", id.index, id.generation)),
        }
    }

    /// Release a handle; a stale or unknown handle is ignored (release is idempotent).
    pub fn release(&mut self, id: TensorId) -> Option<Tensor> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation || slot.tensor.is_none() {
            return None;
        }
        let t = slot.tensor.take();
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.index);
        self.live -= 1;
        t
    }

    /// Replace every live tensor for which `f` returns a substitute (used to swap frozen
    /// parameters for constants behind the handles plugins already hold).
    pub fn substitute(&mut self, f: impl Fn(&Tensor) -> Option<Tensor>) {
        for slot in &mut self.slots {
            if let Some(t) = &slot.tensor {
                if let Some(new) = f(t) {
                    slot.tensor = Some(new);
                }
            }
        }
    }

    /// Number of live handles (for leak reports).
    pub fn live(&self) -> usize {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn stale_handles_are_errors() {
        let mut s = TensorStore::default();
        let a = s.insert(Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap());
        assert!(s.release(a).is_some());
        let b = s.insert(Tensor::ones(1, candle_core::DType::F32, &Device::Cpu).unwrap());
        assert_eq!(a.index, b.index);
        assert!(s.get(a).unwrap_err().contains("stale"));
        assert!(s.get(b).is_ok());
        assert!(s.release(a).is_none(), "double release is a no-op");
        assert_eq!(s.live(), 1);
    }
}
