//! Serialising a strategy's own tensors for `save_state` / `load_state` (resume): a list of
//! named f32 tensors in a small self-describing binary layout (little-endian: `u32` count;
//! per tensor `u32` name length, name, `u32` rank, `u64` dims, f32 values).

use crate::error::{Error, Result};
use crate::tensor::{Host, Tensor};

/// Encode named tensors (values are read back from the host as f32).
pub fn encode(tensors: &[(&str, &Tensor)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend((tensors.len() as u32).to_le_bytes());
    for (name, t) in tensors {
        let shape = t.shape()?;
        out.extend((name.len() as u32).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend((shape.len() as u32).to_le_bytes());
        for d in &shape {
            out.extend((*d as u64).to_le_bytes());
        }
        for v in t.to_vec_f32()? {
            out.extend(v.to_le_bytes());
        }
    }
    Ok(out)
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| {
                Error::new(format!("strategy state is truncated at byte {} (wanted {n} more)", self.pos))
            })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

/// Decode what [`encode`] wrote into host tensors (constants, in f32).
pub fn decode(host: &Host, bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let mut c = Cursor { b: bytes, pos: 0 };
    let n = c.u32()? as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = c.u32()? as usize;
        let name = String::from_utf8(c.take(len)?.to_vec()).map_err(|_| Error::new("strategy state: bad name"))?;
        let rank = c.u32()? as usize;
        let shape = (0..rank).map(|_| c.u64().map(|d| d as usize)).collect::<Result<Vec<_>>>()?;
        let count: usize = shape.iter().product();
        let data: Vec<f32> = c
            .take(count.checked_mul(4).ok_or_else(|| Error::new("strategy state: tensor too large"))?)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        out.push((name, host.tensor_f32(&data, &shape)?));
    }
    if c.pos != bytes.len() {
        return Err(Error::new(format!("strategy state has {} trailing bytes", bytes.len() - c.pos)));
    }
    Ok(out)
}
