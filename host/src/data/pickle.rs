//! Just enough of Python's pickle to read numpy arrays: the registry's Animal-MNIST and
//! MNIST packages ship their pixels as pickled `ndarray`s (protocols 2 and 4, the latter
//! Python 2). Pickles are *interpreted* here, never executed: globals are kept as names, and
//! only `numpy.core.multiarray._reconstruct` / `numpy.dtype` structures are turned into
//! arrays.

use std::collections::HashMap;

/// A pickled value, structurally.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Reduce(Box<Value>, Box<Value>),
    Build(Box<Value>, Box<Value>),
}

#[derive(Debug, thiserror::Error)]
#[error("pickle: {0}")]
pub struct PickleError(String);

fn err<T>(m: impl Into<String>) -> Result<T, PickleError> {
    Err(PickleError(m.into()))
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        if self.pos + n > self.b.len() {
            return err(format!("truncated at byte {} (wanted {n} more)", self.pos));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn le<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn line(&mut self) -> Result<String, PickleError> {
        let start = self.pos;
        while self.u8()? != b'\n' {}
        Ok(String::from_utf8_lossy(&self.b[start..self.pos - 1]).into_owned())
    }
}

/// Parse a pickle into a [`Value`].
pub fn parse(bytes: &[u8]) -> Result<Value, PickleError> {
    let mut r = Reader { b: bytes, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let pop = |stack: &mut Vec<Value>| stack.pop().ok_or_else(|| PickleError("stack underflow".into()));
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?;
            } // PROTO
            0x95 => {
                r.le::<8>()?;
            } // FRAME
            b'.' => return pop(&mut stack),
            b'(' => marks.push(stack.len()),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(u16::from_le_bytes(r.le()?) as i64)),
            b'J' => stack.push(Value::Int(i32::from_le_bytes(r.le()?) as i64)),
            0x8a => {
                let n = r.u8()? as usize;
                let b = r.take(n)?;
                if n > 8 {
                    return err("LONG1 wider than 64 bits");
                }
                let mut v = [if b.last().is_some_and(|x| x & 0x80 != 0) { 0xff } else { 0 }; 8];
                v[..n].copy_from_slice(b);
                stack.push(Value::Int(i64::from_le_bytes(v)));
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(r.le()?))),
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()))
            }
            b'X' => {
                let n = u32::from_le_bytes(r.le()?) as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()))
            }
            // Python 2 `str` (SHORT_BINSTRING, BINSTRING) and bytes (SHORT_BINBYTES, BINBYTES,
            // BINBYTES8): raw bytes.
            b'U' | b'C' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()))
            }
            b'T' | b'B' => {
                let n = u32::from_le_bytes(r.le()?) as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()))
            }
            0x8e => {
                let n = u64::from_le_bytes(r.le()?) as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()))
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(module, name))
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                    _ => return err("STACK_GLOBAL needs two strings"),
                }
            }
            0x94 => {
                let top = stack.last().cloned().ok_or_else(|| PickleError("MEMOIZE on an empty stack".into()))?;
                memo.insert(memo.len() as u32, top);
            }
            b'q' | b'r' => {
                let i = if op == b'q' { r.u8()? as u32 } else { u32::from_le_bytes(r.le()?) };
                let top = stack.last().cloned().ok_or_else(|| PickleError("PUT on an empty stack".into()))?;
                memo.insert(i, top);
            }
            b'h' | b'j' => {
                let i = if op == b'h' { r.u8()? as u32 } else { u32::from_le_bytes(r.le()?) };
                stack.push(memo.get(&i).cloned().ok_or_else(|| PickleError(format!("memo {i} is unset")))?);
            }
            b')' => stack.push(Value::Tuple(Vec::new())),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return err("stack underflow in TUPLEn");
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b't' | b'l' => {
                let m = marks.pop().ok_or_else(|| PickleError("TUPLE without MARK".into()))?;
                let items = stack.split_off(m);
                stack.push(if op == b't' { Value::Tuple(items) } else { Value::List(items) });
            }
            b']' => stack.push(Value::List(Vec::new())),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => return err("APPEND to a non-list"),
                }
            }
            b'e' | b'u' => {
                let m = marks.pop().ok_or_else(|| PickleError("APPENDS/SETITEMS without MARK".into()))?;
                let items = stack.split_off(m);
                match (op, stack.last_mut()) {
                    (b'e', Some(Value::List(l))) => l.extend(items),
                    (b'u', Some(Value::Dict(d))) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => return err("APPENDS/SETITEMS on the wrong type"),
                }
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    _ => return err("SETITEM on a non-dict"),
                }
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                stack.push(Value::Reduce(Box::new(f), Box::new(args)));
            }
            b'b' => {
                let state = pop(&mut stack)?;
                let obj = pop(&mut stack)?;
                stack.push(Value::Build(Box::new(obj), Box::new(state)));
            }
            other => return err(format!("unsupported opcode 0x{other:02x} at byte {}", r.pos - 1)),
        }
    }
}

/// A numpy array: shape, element type (`u1`, `i8`, `f4`, ...) and little-endian data.
#[derive(Clone, Debug)]
pub struct NdArray {
    pub shape: Vec<usize>,
    pub dtype: String,
    pub data: Vec<u8>,
}

impl NdArray {
    /// Elements as f32, whatever the stored type.
    pub fn to_f32(&self) -> Result<Vec<f32>, PickleError> {
        let d = &self.data;
        let v = match self.dtype.as_str() {
            "u1" => d.iter().map(|&x| x as f32).collect(),
            "i1" => d.iter().map(|&x| x as i8 as f32).collect(),
            "f4" => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            "f8" => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            "i4" => d.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            "i8" => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            other => return err(format!("unsupported numpy dtype `{other}`")),
        };
        Ok(v)
    }
}

fn latin1(s: &str) -> Result<Vec<u8>, PickleError> {
    s.chars().map(|c| u8::try_from(c as u32).map_err(|_| PickleError(format!("`{c}` is not latin-1")))).collect()
}

/// Interpret a value as a numpy array (`_reconstruct` + `__setstate__`).
pub fn ndarray(v: &Value) -> Result<NdArray, PickleError> {
    let Value::Build(obj, state) = v else { return err("not an ndarray (expected BUILD)") };
    let Value::Reduce(f, _) = &**obj else { return err("not an ndarray (expected REDUCE)") };
    if !matches!(&**f, Value::Global(_, n) if n == "_reconstruct") {
        return err("not an ndarray (expected numpy's _reconstruct)");
    }
    let Value::Tuple(st) = &**state else { return err("ndarray state is not a tuple") };
    let [_, Value::Tuple(shape), dtype, Value::Bool(fortran), data] = st.as_slice() else {
        return err("ndarray state is not (version, shape, dtype, fortran, data)");
    };
    if *fortran {
        return err("Fortran-ordered arrays are not supported");
    }
    let shape = shape
        .iter()
        .map(|d| match d {
            Value::Int(n) if *n >= 0 => Ok(*n as usize),
            _ => err("bad dimension"),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (name, order) = match dtype {
        Value::Build(d, s) => match (&**d, &**s) {
            (Value::Reduce(_, args), Value::Tuple(ds)) => {
                let name = match &**args {
                    Value::Tuple(a) => match a.first() {
                        Some(Value::Str(s)) => s.clone(),
                        _ => return err("dtype without a name"),
                    },
                    _ => return err("dtype arguments are not a tuple"),
                };
                let order = match ds.get(1) {
                    Some(Value::Str(o)) => o.clone(),
                    _ => "|".into(),
                };
                (name, order)
            }
            _ => return err("unrecognised dtype"),
        },
        _ => return err("unrecognised dtype"),
    };
    if order == ">" {
        return err("big-endian arrays are not supported");
    }
    let data = match data {
        Value::Bytes(b) => b.clone(),
        // Python 2 pickles read under Python 3 rules: latin-1 text.
        Value::Str(s) => latin1(s)?,
        // Protocol 2 written by Python 3: `_codecs.encode(text, "latin1")`.
        Value::Reduce(f, args) if matches!(&**f, Value::Global(m, n) if m == "_codecs" && n == "encode") => {
            match &**args {
                Value::Tuple(a) => match a.first() {
                    Some(Value::Str(s)) => latin1(s)?,
                    _ => return err("_codecs.encode without text"),
                },
                _ => return err("_codecs.encode without arguments"),
            }
        }
        _ => return err("ndarray data is not bytes"),
    };
    let n: usize = shape.iter().product();
    let itemsize = name[1..].parse::<usize>().unwrap_or(0);
    if n * itemsize != data.len() {
        return err(format!("array {shape:?} of {name} needs {} bytes, found {}", n * itemsize, data.len()));
    }
    Ok(NdArray { shape, dtype: name, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3), protocol=4)` (numpy 2.4).
    const ARANGE_U8: &[u8] = b"\x80\x04\x95\x91\x00\x00\x00\x00\x00\x00\x00\x8c\x16numpy._core.multiarray\x94\x8c\x0c_reconstruct\x94\x93\x94\x8c\x05numpy\x94\x8c\x07ndarray\x94\x93\x94K\x00\x85\x94C\x01b\x94\x87\x94R\x94(K\x01K\x02K\x03\x86\x94h\x03\x8c\x05dtype\x94\x93\x94\x8c\x02u1\x94\x89\x88\x87\x94R\x94(K\x03\x8c\x01|\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b\x89C\x06\x00\x01\x02\x03\x04\x05\x94t\x94b.";
    /// `pickle.dumps(np.array([[1.5, -2.0]], dtype=np.float32), protocol=2)`: bytes arrive
    /// through `_codecs.encode(text, "latin1")`.
    const F32_PROTO2: &[u8] = b"\x80\x02cnumpy._core.multiarray\x0a_reconstruct\x0aq\x00cnumpy\x0andarray\x0aq\x01K\x00\x85q\x02c_codecs\x0aencode\x0aq\x03X\x01\x00\x00\x00bq\x04X\x06\x00\x00\x00latin1q\x05\x86q\x06Rq\x07\x87q\x08Rq\x09(K\x01K\x01K\x02\x86q\x0acnumpy\x0adtype\x0aq\x0bX\x02\x00\x00\x00f4q\x0c\x89\x88\x87q\x0dRq\x0e(K\x03X\x01\x00\x00\x00<q\x0fNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x10b\x89h\x03X\x0a\x00\x00\x00\x00\x00\xc3\x80?\x00\x00\x00\xc3\x80q\x11h\x05\x86q\x12Rq\x13tq\x14b.";

    #[test]
    fn reads_protocol_2_with_latin1_bytes() {
        let a = ndarray(&parse(F32_PROTO2).unwrap()).unwrap();
        assert_eq!(a.shape, [1, 2]);
        assert_eq!(a.to_f32().unwrap(), [1.5, -2.0]);
    }

    #[test]
    fn reads_a_numpy_array() {
        let v = parse(ARANGE_U8).unwrap();
        let a = ndarray(&v).unwrap();
        assert_eq!(a.shape, [2, 3]);
        assert_eq!(a.dtype, "u1");
        assert_eq!(a.to_f32().unwrap(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn truncated_and_foreign_pickles_are_errors() {
        assert!(parse(&ARANGE_U8[..40]).unwrap_err().to_string().contains("truncated"));
        let v = parse(b"\x80\x02K\x07.").unwrap();
        assert_eq!(v, Value::Int(7));
        assert!(ndarray(&v).is_err());
    }
}
