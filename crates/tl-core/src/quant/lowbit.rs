//! Typed low-bit quantization of f32 data: integer codes (INT8, INT4, INT2,
//! symmetric or asymmetric, with per-tensor, per-channel or per-group scales)
//! and the OCP 8-bit floating point formats E4M3 and E5M2.
//!
//! A library API of its own, independent of the GGML block formats in the rest
//! of [`crate::quant`].
//!
//! # Conventions
//!
//! - Tensors are 2-D and row-major, shape `[rows, cols]`; a *channel* is a row.
//! - Scales belong to groups, and every group is a contiguous run of the
//!   row-major data, numbered in order: [`Granularity::PerTensor`] is one group
//!   of all elements, [`Granularity::PerChannel`] one group per row, and
//!   [`Granularity::PerGroup`]`(g)` runs of `g` consecutive elements of a row
//!   (`g` must divide `cols`), so row `r` holds groups `r*cols/g ..
//!   (r+1)*cols/g`.
//! - An integer code `q` of a group with scale `s` and zero point `z` stands
//!   for `(q - z) * s`. Symmetric schemes have `z = 0` and signed codes in
//!   `[-(2^(b-1) - 1), 2^(b-1) - 1]`: the most negative two's-complement value
//!   is left out so that the range is symmetric (INT8 `[-127, 127]`, INT4
//!   `[-7, 7]`, INT2 `[-1, 1]`). Asymmetric schemes have unsigned codes in
//!   `[0, 2^b - 1]` and an integer zero point in that range, so 0.0 is exactly
//!   representable.
//! - Codes are `round_ties_even(x / s + z)` (computed in f64) clamped to the
//!   code range, so elements dequantize to within `s / 2` of their inputs, up
//!   to f32 rounding of the scale and of the product.
//! - A group of zeros gets scale 0 and zero point 0, its codes are 0, and it
//!   dequantizes to exact zeros.
//! - Inputs must be finite: ±inf and NaN are errors naming the element.
//!   Empty tensors are fine and give empty outputs. Nothing here panics.

use thiserror::Error;

/// What went wrong, and where.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum LowBitError {
    #[error("shape [{rows}, {cols}] needs rows*cols elements but {len} were given")]
    ShapeMismatch {
        rows: usize,
        cols: usize,
        len: usize,
    },
    #[error("non-finite input {value} at element {index} (row {row}, column {col})")]
    NonFinite {
        index: usize,
        row: usize,
        col: usize,
        value: f32,
    },
    #[error("group size must be positive")]
    ZeroGroupSize,
    #[error("group size {group_size} does not divide the row length {cols}")]
    GroupSizeNotDividing { group_size: usize, cols: usize },
    #[error("{what}: expected {expected} values, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("code {code} at element {index} is outside the code range [{min}, {max}]")]
    CodeOutOfRange {
        index: usize,
        code: i32,
        min: i32,
        max: i32,
    },
    #[error("symmetric schemes take signed codes and asymmetric ones unsigned codes")]
    SignednessMismatch,
    #[error("scale {scale} of group {group} is not finite and non-negative")]
    InvalidScale { group: usize, scale: f32 },
    #[error("zero point {zero_point} of group {group} is outside [0, {max}]")]
    InvalidZeroPoint {
        group: usize,
        zero_point: i32,
        max: i32,
    },
}

/// Width of an integer code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IntBits {
    Int8,
    Int4,
    Int2,
}

impl IntBits {
    pub const fn bits(self) -> u32 {
        match self {
            IntBits::Int8 => 8,
            IntBits::Int4 => 4,
            IntBits::Int2 => 2,
        }
    }

    /// Codes per byte in [`PackedCodes`]: 1, 2 or 4.
    pub const fn codes_per_byte(self) -> usize {
        (8 / self.bits()) as usize
    }

    /// The inclusive code range: `[-(2^(b-1)-1), 2^(b-1)-1]` signed, `[0,
    /// 2^b-1]` unsigned.
    pub const fn code_range(self, signed: bool) -> (i32, i32) {
        if signed {
            let m = (1 << (self.bits() - 1)) - 1;
            (-m, m)
        } else {
            (0, (1 << self.bits()) - 1)
        }
    }
}

/// Symmetric: zero point 0 and signed codes. Asymmetric: unsigned codes and a
/// per-group integer zero point (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Symmetry {
    Symmetric,
    Asymmetric,
}

/// Which elements share a scale (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One scale for the whole tensor (an empty one too).
    PerTensor,
    /// One scale per row.
    PerChannel,
    /// One scale per run of this many elements along a row; it must be
    /// positive and divide `cols`.
    PerGroup(usize),
}

impl Granularity {
    /// `(groups, elements per group)` for a `[rows, cols]` tensor holding
    /// `len = rows * cols` elements.
    fn layout(self, rows: usize, cols: usize, len: usize) -> Result<(usize, usize), LowBitError> {
        match self {
            Granularity::PerTensor => Ok((1, len)),
            Granularity::PerChannel => Ok((rows, cols)),
            Granularity::PerGroup(0) => Err(LowBitError::ZeroGroupSize),
            Granularity::PerGroup(group_size) if !cols.is_multiple_of(group_size) => {
                Err(LowBitError::GroupSizeNotDividing { group_size, cols })
            }
            Granularity::PerGroup(g) => Ok((rows.saturating_mul(cols / g), g)),
        }
    }
}

/// An integer quantization scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IntScheme {
    pub bits: IntBits,
    pub symmetry: Symmetry,
    pub granularity: Granularity,
}

impl IntScheme {
    pub const fn new(bits: IntBits, symmetry: Symmetry, granularity: Granularity) -> Self {
        Self {
            bits,
            symmetry,
            granularity,
        }
    }

    /// The scheme's inclusive code range (see [`IntBits::code_range`]).
    pub const fn code_range(self) -> (i32, i32) {
        self.bits
            .code_range(matches!(self.symmetry, Symmetry::Symmetric))
    }
}

/// Integer codes, one per byte: signed for symmetric schemes, unsigned for
/// asymmetric ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntCodes {
    Signed(Vec<i8>),
    Unsigned(Vec<u8>),
}

impl IntCodes {
    pub fn len(&self) -> usize {
        match self {
            IntCodes::Signed(c) => c.len(),
            IntCodes::Unsigned(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_signed(&self) -> bool {
        matches!(self, IntCodes::Signed(_))
    }

    /// The codes widened to i32.
    pub fn to_i32(&self) -> Vec<i32> {
        match self {
            IntCodes::Signed(c) => c.iter().map(|&q| i32::from(q)).collect(),
            IntCodes::Unsigned(c) => c.iter().map(|&q| i32::from(q)).collect(),
        }
    }

    /// Checks that every code lies in `bits`' range for its signedness.
    fn check_range(&self, bits: IntBits) -> Result<(), LowBitError> {
        let (min, max) = bits.code_range(self.is_signed());
        match self
            .to_i32()
            .into_iter()
            .enumerate()
            .find(|(_, q)| !(min..=max).contains(q))
        {
            Some((index, code)) => Err(LowBitError::CodeOutOfRange {
                index,
                code,
                min,
                max,
            }),
            None => Ok(()),
        }
    }
}

/// An integer-quantized `[rows, cols]` tensor: codes in row-major order, and
/// one scale and one zero point per group, in group order (zero points are 0
/// for symmetric schemes).
///
/// [`quantize_int`] builds consistent parts; parts assembled by hand can be
/// checked with [`validate`](Self::validate). Dequantizing inconsistent parts
/// gives unspecified values but does not panic.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedInt {
    pub scheme: IntScheme,
    pub shape: [usize; 2],
    pub codes: IntCodes,
    pub scales: Vec<f32>,
    pub zero_points: Vec<i32>,
}

impl QuantizedInt {
    /// Checks that the parts agree: `rows * cols` codes, signed exactly for
    /// symmetric schemes and within the code range; one scale (finite, `>= 0`)
    /// and one zero point (in the code range, 0 if symmetric) per group.
    pub fn validate(&self) -> Result<(), LowBitError> {
        let [rows, cols] = self.shape;
        check_shape(self.codes.len(), rows, cols)?;
        let (groups, _) = self
            .scheme
            .granularity
            .layout(rows, cols, self.codes.len())?;
        let symmetric = self.scheme.symmetry == Symmetry::Symmetric;
        if self.codes.is_signed() != symmetric {
            return Err(LowBitError::SignednessMismatch);
        }
        self.codes.check_range(self.scheme.bits)?;
        check_len("scales", groups, self.scales.len())?;
        check_len("zero points", groups, self.zero_points.len())?;
        check_scales(&self.scales)?;
        let max = if symmetric {
            0
        } else {
            self.scheme.code_range().1
        };
        match self.zero_points.iter().position(|z| !(0..=max).contains(z)) {
            Some(group) => {
                let zero_point = self.zero_points.get(group).copied().unwrap_or_default();
                Err(LowBitError::InvalidZeroPoint {
                    group,
                    zero_point,
                    max,
                })
            }
            None => Ok(()),
        }
    }

    /// The codes packed `codes_per_byte` to a byte (see [`PackedCodes`]).
    pub fn packed_codes(&self) -> PackedCodes {
        pack_masked(&self.codes, self.scheme.bits)
    }

    /// `(q - z) * s` for every element, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.codes.len()];
        self.fill(&mut out);
        out
    }

    /// [`dequantize`](Self::dequantize) into `out`, which must hold exactly
    /// as many elements as there are codes.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<(), LowBitError> {
        check_len("output", self.codes.len(), out.len())?;
        self.fill(out);
        Ok(())
    }

    fn fill(&self, out: &mut [f32]) {
        let Some(n) = group_len(self.scheme.granularity, self.shape, out.len()) else {
            return;
        };
        match &self.codes {
            IntCodes::Signed(c) => dequantize_groups(c, n, &self.scales, &self.zero_points, out),
            IntCodes::Unsigned(c) => dequantize_groups(c, n, &self.scales, &self.zero_points, out),
        }
    }
}

fn dequantize_groups<T: Copy + Into<i32>>(
    codes: &[T],
    n: usize,
    scales: &[f32],
    zps: &[i32],
    out: &mut [f32],
) {
    for ((out, codes), (&s, &z)) in out
        .chunks_mut(n)
        .zip(codes.chunks(n))
        .zip(scales.iter().zip(zps))
    {
        for (o, &q) in out.iter_mut().zip(codes) {
            *o = (q.into() - z) as f32 * s;
        }
    }
}

/// Elements per group, if there are any elements.
fn group_len(granularity: Granularity, [rows, cols]: [usize; 2], len: usize) -> Option<usize> {
    granularity
        .layout(rows, cols, len)
        .ok()
        .map(|(_, n)| n)
        .filter(|&n| n > 0)
}

/// Quantizes a row-major `[rows, cols]` tensor to integer codes.
///
/// Per group, symmetric: `s = absmax / qmax` with `qmax = 2^(b-1) - 1`, `z =
/// 0`. Asymmetric: the group's range is widened to include 0, `[lo, hi] =
/// [min(0, min x), max(0, max x)]`, then `s = (hi - lo) / (2^b - 1)` and `z =
/// floor(0.5 - lo / s)` (`-lo / s` rounded to nearest, ties up). Codes are
/// `round_ties_even(x / s + z)`, clamped to the code range.
///
/// The f32 scale is the largest f32 not above the exact one, but at least
/// `f32::MIN_POSITIVE` (a group that would need a subnormal scale gets
/// `2^-126`, and its subnormal inputs mostly code to 0). With the scale rounded
/// down and that zero point, an asymmetric group's minimum gets code 0 and
/// its maximum code `2^b - 1` (unless the range was widened on that side), as a
/// symmetric group's absmax gets `±qmax`: every group spans its code range, so
/// quantizing the dequantized tensor again gives the same codes.
///
/// Dequantized values can overshoot a group's maximum by up to `s / 2`, so an
/// asymmetric group reaching within `s / 2` of `f32::MAX` can dequantize to
/// infinity.
pub fn quantize_int(
    data: &[f32],
    rows: usize,
    cols: usize,
    scheme: IntScheme,
) -> Result<QuantizedInt, LowBitError> {
    let (groups, n) = check_input(data, rows, cols, scheme.granularity)?;
    let (lo, hi) = scheme.code_range();
    let (lo_f, hi_f) = (f64::from(lo), f64::from(hi));
    let mut scales = Vec::with_capacity(groups);
    let mut zero_points = Vec::with_capacity(groups);
    let mut codes = Vec::with_capacity(data.len());
    // `n` is 0 only when `data` is empty; the scales are padded below.
    for group in data.chunks(n.max(1)) {
        let (s, z) = match scheme.symmetry {
            Symmetry::Symmetric => {
                let absmax = group.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                (scale_below(f64::from(absmax) / hi_f), 0.0)
            }
            Symmetry::Asymmetric => {
                let (mn, mx) = group
                    .iter()
                    .fold((0.0f32, 0.0f32), |(a, b), &x| (a.min(x), b.max(x)));
                let s = scale_below((f64::from(mx) - f64::from(mn)) / hi_f);
                let z = if s > 0.0 {
                    (0.5 - f64::from(mn) / f64::from(s)).floor()
                } else {
                    0.0
                };
                (s, z.clamp(0.0, hi_f))
            }
        };
        codes.extend(group.iter().map(|&x| {
            let q = if s > 0.0 {
                (f64::from(x) / f64::from(s) + z).round_ties_even()
            } else {
                z
            };
            q.clamp(lo_f, hi_f) as i32
        }));
        scales.push(s);
        zero_points.push(z as i32);
    }
    scales.resize(groups, 0.0);
    zero_points.resize(groups, 0);
    // Clamped to the scheme's range, so the casts are exact.
    let codes = match scheme.symmetry {
        Symmetry::Symmetric => IntCodes::Signed(codes.into_iter().map(|q| q as i8).collect()),
        Symmetry::Asymmetric => IntCodes::Unsigned(codes.into_iter().map(|q| q as u8).collect()),
    };
    Ok(QuantizedInt {
        scheme,
        shape: [rows, cols],
        codes,
        scales,
        zero_points,
    })
}

/// The f32 scale for an exact scale `exact >= 0`: 0 for 0, else the largest f32
/// not above `exact`, raised to `f32::MIN_POSITIVE` if below it.
fn scale_below(exact: f64) -> f32 {
    if exact <= 0.0 {
        return 0.0;
    }
    let s = exact as f32;
    let s = if f64::from(s) > exact {
        s.next_down()
    } else {
        s
    };
    s.max(f32::MIN_POSITIVE)
}

/// Checks shape, granularity and finiteness; returns `(groups, group length)`.
fn check_input(
    data: &[f32],
    rows: usize,
    cols: usize,
    granularity: Granularity,
) -> Result<(usize, usize), LowBitError> {
    check_shape(data.len(), rows, cols)?;
    let layout = granularity.layout(rows, cols, data.len())?;
    match data.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(LowBitError::NonFinite {
            index,
            row: index / cols.max(1),
            col: index % cols.max(1),
            value: data.get(index).copied().unwrap_or(f32::NAN),
        }),
        None => Ok(layout),
    }
}

fn check_shape(len: usize, rows: usize, cols: usize) -> Result<(), LowBitError> {
    match rows.checked_mul(cols) {
        Some(n) if n == len => Ok(()),
        _ => Err(LowBitError::ShapeMismatch { rows, cols, len }),
    }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), LowBitError> {
    if expected == got {
        Ok(())
    } else {
        Err(LowBitError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

fn check_scales(scales: &[f32]) -> Result<(), LowBitError> {
    match scales.iter().position(|s| !(s.is_finite() && *s >= 0.0)) {
        Some(group) => {
            let scale = scales.get(group).copied().unwrap_or(f32::NAN);
            Err(LowBitError::InvalidScale { group, scale })
        }
        None => Ok(()),
    }
}

/// Integer codes packed `8 / bits` to a byte: code `i` sits in byte `i /
/// codes_per_byte` at bit offset `(i % codes_per_byte) * bits`, low bits first
/// (the first of two INT4 codes is the low nibble). Signed codes are stored in
/// two's complement; unused bits of the last byte are 0; INT8 is one code per
/// byte. `bytes` should hold `ceil(len / codes_per_byte)` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedCodes {
    pub bits: IntBits,
    pub signed: bool,
    /// Number of codes.
    pub len: usize,
    pub bytes: Vec<u8>,
}

impl PackedCodes {
    /// One code per byte again, signed codes sign-extended. Stored bytes may
    /// hold the two's-complement minimum (-8 for INT4), which
    /// [`QuantizedInt::validate`] rejects; missing bytes read as 0.
    pub fn unpack(&self) -> IntCodes {
        let b = self.bits.bits();
        let per = self.bits.codes_per_byte();
        let mask = ((1u16 << b) - 1) as u8;
        let field = |i: usize| {
            self.bytes
                .get(i / per)
                .map_or(0, |&x| (x >> ((i % per) as u32 * b)) & mask)
        };
        if self.signed {
            IntCodes::Signed(
                (0..self.len)
                    .map(|i| ((field(i) << (8 - b)) as i8) >> (8 - b))
                    .collect(),
            )
        } else {
            IntCodes::Unsigned((0..self.len).map(field).collect())
        }
    }
}

/// Packs codes (see [`PackedCodes`]) after checking that each lies in `bits`'
/// range: `[-(2^(b-1)-1), 2^(b-1)-1]` signed, `[0, 2^b-1]` unsigned.
pub fn pack_codes(codes: &IntCodes, bits: IntBits) -> Result<PackedCodes, LowBitError> {
    codes.check_range(bits)?;
    Ok(pack_masked(codes, bits))
}

fn pack_masked(codes: &IntCodes, bits: IntBits) -> PackedCodes {
    let (b, per) = (bits.bits(), bits.codes_per_byte());
    let mask = ((1u16 << b) - 1) as u8;
    let mut bytes = vec![0u8; codes.len().div_ceil(per)];
    for (i, q) in codes.to_i32().into_iter().enumerate() {
        if let Some(byte) = bytes.get_mut(i / per) {
            *byte |= (q as u8 & mask) << ((i % per) as u32 * b);
        }
    }
    PackedCodes {
        bits,
        signed: codes.is_signed(),
        len: codes.len(),
        bytes,
    }
}

/// An OCP 8-bit floating point format.
///
/// - `E4M3` ("E4M3FN"): 4 exponent bits, bias 7, 3 mantissa bits; no
///   infinities, NaN is `S.1111.111` (0x7F, 0xFF); max finite 448, min normal
///   2^-6, min subnormal 2^-9.
/// - `E5M2`: 5 exponent bits, bias 15, 2 mantissa bits, IEEE-like: infinities
///   0x7C/0xFC, NaNs `S.11111.{01,10,11}`; max finite 57344, min normal 2^-14,
///   min subnormal 2^-16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    E4M3,
    E5M2,
}

/// What an fp8 conversion does with values beyond the largest finite one
/// (after rounding), per the OCP 8-bit floating point spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Saturation {
    /// Clamp to ±max finite; ±inf also becomes ±max finite.
    #[default]
    Saturating,
    /// Overflow (and ±inf) becomes NaN in E4M3 and ±inf in E5M2.
    NonSaturating,
}

impl Fp8Format {
    const fn mantissa_bits(self) -> u32 {
        match self {
            Fp8Format::E4M3 => 3,
            Fp8Format::E5M2 => 2,
        }
    }

    const fn bias(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 7,
            Fp8Format::E5M2 => 15,
        }
    }

    /// The code (without sign) of the largest finite value: 0x7E, 0x7B.
    pub const fn max_finite_code(self) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7E,
            Fp8Format::E5M2 => 0x7B,
        }
    }

    /// 448 or 57344.
    pub const fn max_finite(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    /// The NaN code [`encode`](Self::encode) gives (0x7F, and the quiet 0x7E
    /// for E5M2), with the sign bit of the input NaN added.
    pub const fn nan_code(self) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7F,
            Fp8Format::E5M2 => 0x7E,
        }
    }

    /// Rounds `x` to the nearest value of the format, ties to even mantissa,
    /// subnormals included; the sign is kept (of zero too). Results beyond the
    /// largest finite value, and ±inf, follow `sat`; NaN gives a NaN code.
    pub fn encode(self, x: f32, sat: Saturation) -> u8 {
        let bits = x.to_bits();
        let sign = ((bits >> 24) & 0x80) as u8;
        let overflow = match (sat, self) {
            (Saturation::Saturating, _) => self.max_finite_code(),
            (Saturation::NonSaturating, Fp8Format::E4M3) => 0x7F,
            (Saturation::NonSaturating, Fp8Format::E5M2) => 0x7C,
        };
        if x.is_nan() {
            return sign | self.nan_code();
        }
        if x.is_infinite() {
            return sign | overflow;
        }
        let exp_field = ((bits >> 23) & 0xFF) as i32;
        if exp_field == 0 {
            // ±0 and f32 subnormals (below 2^-126, far under half the smallest
            // fp8 subnormal) round to ±0.
            return sign;
        }
        // |x| = mant * 2^(exp_field - 150), in [2^e, 2^(e+1)).
        let mant = (bits & 0x7F_FFFF) | 0x80_0000;
        let e = exp_field - 127;
        let m = self.mantissa_bits() as i32;
        // The result's biased exponent (1 for subnormals), and the weight
        // 2^quantum of its last mantissa bit.
        let biased = (e + self.bias()).max(1);
        let quantum = biased - self.bias() - m;
        // |x| / 2^quantum = mant / 2^shift with shift >= 23 - m > 0; as mant <
        // 2^24, a shift of 25 or more leaves less than one half.
        let shift = (quantum - (exp_field - 150)) as u32;
        let q = if shift >= 25 {
            0
        } else {
            round_shift_even(mant, shift)
        };
        // A carry out of the mantissa moves into the exponent field by itself.
        let mag = (((biased - 1) as u32) << m) + q;
        if mag > u32::from(self.max_finite_code()) {
            sign | overflow
        } else {
            sign | mag as u8
        }
    }

    /// The exact value of a code (NaN for NaN codes, ±inf for E5M2's).
    pub fn decode(self, code: u8) -> f32 {
        let mag = code & 0x7F;
        let m = self.mantissa_bits();
        let v = match self {
            Fp8Format::E4M3 if mag == 0x7F => f32::NAN,
            Fp8Format::E5M2 if mag == 0x7C => f32::INFINITY,
            Fp8Format::E5M2 if mag > 0x7C => f32::NAN,
            _ => {
                let (exp, man) = (i32::from(mag >> m), i32::from(mag & ((1 << m) - 1)));
                let (sig, e) = match exp {
                    0 => (man, 1 - self.bias() - m as i32),
                    _ => (man + (1 << m), exp - self.bias() - m as i32),
                };
                // 2^e is a normal f32 (e in [-16, 13]).
                sig as f32 * f32::from_bits(((e + 127) as u32) << 23)
            }
        };
        if code & 0x80 != 0 {
            -v
        } else {
            v
        }
    }
}

/// `v / 2^shift` rounded to nearest, ties to even; `1 <= shift <= 24`.
fn round_shift_even(v: u32, shift: u32) -> u32 {
    let (q, rem, half) = (v >> shift, v & ((1 << shift) - 1), 1 << (shift - 1));
    if rem > half || (rem == half && q & 1 == 1) {
        q + 1
    } else {
        q
    }
}

/// f32 to E4M3 (see [`Fp8Format::encode`]).
pub fn f32_to_e4m3(x: f32, sat: Saturation) -> u8 {
    Fp8Format::E4M3.encode(x, sat)
}

/// E4M3 to f32, exact.
pub fn e4m3_to_f32(code: u8) -> f32 {
    Fp8Format::E4M3.decode(code)
}

/// f32 to E5M2 (see [`Fp8Format::encode`]).
pub fn f32_to_e5m2(x: f32, sat: Saturation) -> u8 {
    Fp8Format::E5M2.encode(x, sat)
}

/// E5M2 to f32, exact.
pub fn e5m2_to_f32(code: u8) -> f32 {
    Fp8Format::E5M2.decode(code)
}

/// A scaled-fp8 `[rows, cols]` tensor: element `x` of a group with scale `s`
/// is stored as the (saturating) fp8 code of `x / s` and dequantizes to
/// `decode(code) * s`. Codes are row-major, scales in group order; as for
/// [`QuantizedInt`], inconsistent hand-made parts do not make dequantization
/// panic.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedFp8 {
    pub format: Fp8Format,
    pub granularity: Granularity,
    pub shape: [usize; 2],
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
}

impl QuantizedFp8 {
    /// `decode(code) * s` for every element, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.codes.len()];
        self.fill(&mut out);
        out
    }

    /// [`dequantize`](Self::dequantize) into `out`, which must hold exactly
    /// as many elements as there are codes.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<(), LowBitError> {
        check_len("output", self.codes.len(), out.len())?;
        self.fill(out);
        Ok(())
    }

    fn fill(&self, out: &mut [f32]) {
        let Some(n) = group_len(self.granularity, self.shape, out.len()) else {
            return;
        };
        for ((out, codes), &s) in out
            .chunks_mut(n)
            .zip(self.codes.chunks(n))
            .zip(&self.scales)
        {
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = self.format.decode(c) * s;
            }
        }
    }
}

/// Quantizes a row-major `[rows, cols]` tensor to scaled fp8: per group, `s =
/// absmax / max_finite` (the f32 at or below it, at least `f32::MIN_POSITIVE`;
/// 0 for a group of zeros), codes `encode(x / s)` with saturation.
pub fn quantize_fp8(
    data: &[f32],
    rows: usize,
    cols: usize,
    format: Fp8Format,
    granularity: Granularity,
) -> Result<QuantizedFp8, LowBitError> {
    let (groups, n) = check_input(data, rows, cols, granularity)?;
    let mut scales = Vec::with_capacity(groups);
    let mut codes = Vec::with_capacity(data.len());
    for group in data.chunks(n.max(1)) {
        let absmax = group.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let s = scale_below(f64::from(absmax) / f64::from(format.max_finite()));
        // With s = 0 every element is ±0 and is encoded as it is.
        let div = |x: f32| if s > 0.0 { x / s } else { x };
        codes.extend(
            group
                .iter()
                .map(|&x| format.encode(div(x), Saturation::Saturating)),
        );
        scales.push(s);
    }
    scales.resize(groups, 0.0);
    Ok(QuantizedFp8 {
        format,
        granularity,
        shape: [rows, cols],
        codes,
        scales,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use Granularity::{PerChannel, PerGroup, PerTensor};

    const BITS: [IntBits; 3] = [IntBits::Int8, IntBits::Int4, IntBits::Int2];
    const FORMATS: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];
    const SATS: [Saturation; 2] = [Saturation::Saturating, Saturation::NonSaturating];

    fn schemes(granularity: Granularity) -> Vec<IntScheme> {
        let sym = [Symmetry::Symmetric, Symmetry::Asymmetric];
        BITS.iter()
            .flat_map(|&b| sym.map(|s| IntScheme::new(b, s, granularity)))
            .collect()
    }

    /// Mostly ordinary magnitudes, plus tiny ones (around and below
    /// `f32::MIN_POSITIVE`, subnormals included), zeros and huge ones.
    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            4 => -100.0f32..100.0,
            2 => -1e-3f32..1e-3,
            1 => -2e-38f32..2e-38,
            1 => Just(0.0f32),
            1 => -1e37f32..1e37,
        ]
    }

    /// A granularity and a shape `[rows, cols]` that it fits.
    fn layout() -> impl Strategy<Value = (Granularity, usize, usize)> {
        (0usize..3, 1usize..5, 1usize..5, 1usize..6).prop_map(|(k, rows, groups, g)| {
            ([PerTensor, PerChannel, PerGroup(g)][k], rows, groups * g)
        })
    }

    fn int_case() -> impl Strategy<Value = (IntScheme, [usize; 2], Vec<f32>)> {
        (layout(), 0usize..6).prop_flat_map(|((gran, rows, cols), k)| {
            let scheme = schemes(gran)[k];
            (
                Just(scheme),
                Just([rows, cols]),
                prop::collection::vec(value(), rows * cols),
            )
        })
    }

    /// Allowed |w - ŵ| for a group with scale `s` whose codes lie at most
    /// `qmax` from the zero point: `s / 2` from rounding to nearest, plus float
    /// slack. The f32 scale is at most 2^-23 (relative) below the exact one,
    /// so a group's extreme can land up to `qmax * 2^-23` codes past the range
    /// and be clamped; dequantization rounds `(q - z) * s` to f32, an error of
    /// at most 2^-24 of `|ŵ| <= qmax * s`; the f64 code arithmetic adds ~2^-53.
    /// Together that is below `qmax * s * 2^-22`.
    fn int_tolerance(s: f32, qmax: i32) -> f64 {
        f64::from(s) * (0.5 + f64::from(qmax) * 2f64.powi(-22))
    }

    /// Codes in range and the error bound, for every element.
    fn check_int(data: &[f32], q: &QuantizedInt) {
        q.validate().unwrap();
        let (lo, hi) = q.scheme.code_range();
        let n = group_len(q.scheme.granularity, q.shape, data.len()).unwrap();
        let codes = q.codes.to_i32();
        for (i, (&w, d)) in data.iter().zip(q.dequantize()).enumerate() {
            let (s, z, c) = (q.scales[i / n], q.zero_points[i / n], codes[i]);
            assert!((lo..=hi).contains(&c));
            let err = (f64::from(w) - f64::from(d)).abs();
            assert!(
                err <= int_tolerance(s, hi),
                "{:?} #{i}: w={w:e} ŵ={d:e} s={s:e} q={c} z={z}",
                q.scheme
            );
        }
    }

    proptest! {
        #[test]
        fn int_error_within_half_scale((scheme, [rows, cols], data) in int_case()) {
            check_int(&data, &quantize_int(&data, rows, cols, scheme).unwrap());
        }

        #[test]
        fn int_requantize_gives_same_codes((scheme, [rows, cols], data) in int_case()) {
            let q = quantize_int(&data, rows, cols, scheme).unwrap();
            let again = quantize_int(&q.dequantize(), rows, cols, scheme).unwrap();
            prop_assert_eq!(&again.codes, &q.codes);
            prop_assert_eq!(&again.zero_points, &q.zero_points);
            prop_assert_eq!(q.packed_codes().unpack(), q.codes);
        }

        #[test]
        fn pack_unpack_round_trip(
            b in 0usize..3,
            signed in any::<bool>(),
            raw in prop::collection::vec(any::<u8>(), 0..40),
        ) {
            let bits = BITS[b];
            let (lo, hi) = bits.code_range(signed);
            let wide = raw.iter().map(|&r| lo + i32::from(r) % (hi - lo + 1));
            let codes = match signed {
                true => IntCodes::Signed(wide.map(|q| q as i8).collect()),
                false => IntCodes::Unsigned(wide.map(|q| q as u8).collect()),
            };
            let packed = pack_codes(&codes, bits).unwrap();
            prop_assert_eq!(packed.bytes.len(), raw.len().div_ceil(bits.codes_per_byte()));
            prop_assert_eq!(packed.unpack(), codes);
        }

        #[test]
        fn fp8_tensor_error_bound(
            (gran, rows, cols) in layout(),
            e5m2 in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let fmt = if e5m2 { Fp8Format::E5M2 } else { Fp8Format::E4M3 };
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut x = || rng.gen_range(-1.0f32..1.0) * rng.gen_range(-30.0f32..30.0).exp2();
            let data: Vec<f32> = (0..rows * cols).map(|_| x()).collect();
            let q = quantize_fp8(&data, rows, cols, fmt, gran).unwrap();
            let n = group_len(gran, q.shape, data.len()).unwrap();
            let (m, emin) = (fmt.mantissa_bits() as i32, 1 - fmt.bias());
            for (i, (&x, d)) in data.iter().zip(q.dequantize()).enumerate() {
                let s = f64::from(q.scales[i / n]);
                // Half the format's spacing at x / s (a normal binade's or the
                // subnormals'), plus f32 rounding of x / s and of decode * s.
                let a = f64::from(x).abs();
                let half_step = (a / s * 2f64.powi(-m - 1)).max(2f64.powi(emin - m - 1));
                let tol = s * half_step + a * 2f64.powi(-21);
                prop_assert!(
                    (f64::from(x) - f64::from(d)).abs() <= tol,
                    "{fmt:?} x={x:e} ŵ={d:e}"
                );
            }
        }
    }

    #[test]
    fn int_rounding_and_zero_points() {
        let int4 = IntScheme::new(IntBits::Int4, Symmetry::Symmetric, PerTensor);
        let q = quantize_int(&[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5], 1, 8, int4).unwrap();
        assert_eq!(q.scales, [1.0]);
        assert_eq!(
            q.codes,
            IntCodes::Signed(vec![7, 0, 2, 2, 0, -2, -2, 4]),
            "ties to even"
        );
        // s = 4/3, z = floor(0.5 + 0.75) = 1; 0.0 is code z and comes back exactly.
        let int2 = IntScheme::new(IntBits::Int2, Symmetry::Asymmetric, PerTensor);
        let q = quantize_int(&[-1.0, 0.0, 3.0], 1, 3, int2).unwrap();
        assert_eq!(
            (q.codes.clone(), q.zero_points.clone()),
            (IntCodes::Unsigned(vec![0, 1, 3]), vec![1])
        );
        assert_eq!(q.dequantize()[1].to_bits(), 0);
        // All positive: the range is widened down to 0, so z = 0.
        let int8 = IntScheme::new(IntBits::Int8, Symmetry::Asymmetric, PerTensor);
        let q = quantize_int(&[1.0, 2.55], 1, 2, int8).unwrap();
        assert_eq!(
            (q.codes, q.zero_points),
            (IntCodes::Unsigned(vec![100, 255]), vec![0])
        );
    }

    #[test]
    fn int_all_zero_groups() {
        let data = [0.0, -0.0, 0.0, 0.0, 1.0, -2.0, 3.0, 0.5];
        for (gran, zero_groups) in [(PerChannel, 1), (PerGroup(2), 2)] {
            for scheme in schemes(gran) {
                let q = quantize_int(&data, 2, 4, scheme).unwrap();
                assert!(q.scales[..zero_groups].iter().all(|&s| s == 0.0));
                assert!(q.zero_points[..zero_groups].iter().all(|&z| z == 0));
                assert!(q.codes.to_i32()[..4].iter().all(|&c| c == 0));
                assert!(q.dequantize()[..4].iter().all(|&d| d == 0.0), "{scheme:?}");
                check_int(&data, &q);
            }
        }
        for scheme in schemes(PerTensor) {
            let q = quantize_int(&[0.0; 6], 2, 3, scheme).unwrap();
            assert_eq!((q.dequantize(), q.scales), (vec![0.0; 6], vec![0.0]));
        }
    }

    #[test]
    fn int_denormal_and_single_inputs() {
        let data = [1e-40, -3e-42, f32::MIN_POSITIVE / 2.0, 0.0, 1e-45, -1e-39];
        for gran in [PerTensor, PerChannel, PerGroup(3)] {
            for scheme in schemes(gran) {
                let q = quantize_int(&data, 2, 3, scheme).unwrap();
                assert!(
                    q.scales.iter().all(|&s| s == f32::MIN_POSITIVE),
                    "{scheme:?}"
                );
                check_int(&data, &q);
            }
        }
        for gran in [PerTensor, PerChannel, PerGroup(1)] {
            for scheme in schemes(gran) {
                let (lo, hi) = scheme.code_range();
                for x in [0.7f32, -0.7] {
                    let q = quantize_int(&[x], 1, 1, scheme).unwrap();
                    // The element is its group's extreme: an end of the range.
                    let end = if x > 0.0 { hi } else { lo };
                    assert_eq!(q.codes.to_i32(), [end], "{scheme:?} {x}");
                    check_int(&[x], &q);
                }
            }
        }
    }

    #[test]
    fn input_errors() {
        for (index, bad) in [(5, f32::NAN), (0, f32::INFINITY), (7, f32::NEG_INFINITY)] {
            let mut data = [1.0f32; 8];
            data[index] = bad;
            let at = (index, index / 4, index % 4);
            let want = |e: &LowBitError| match *e {
                LowBitError::NonFinite {
                    index, row, col, ..
                } => (index, row, col) == at,
                _ => false,
            };
            for scheme in schemes(PerGroup(2)) {
                assert!(want(&quantize_int(&data, 2, 4, scheme).unwrap_err()));
            }
            for fmt in FORMATS {
                let err = quantize_fp8(&data, 2, 4, fmt, PerChannel).unwrap_err();
                assert!(
                    want(&err) && err.to_string().contains(&format!("element {index}")),
                    "{err}"
                );
            }
        }
        let data = [1.0f32; 12];
        let int4 = |g| IntScheme::new(IntBits::Int4, Symmetry::Symmetric, g);
        let err = |rows, g| quantize_int(&data, rows, 4, int4(g)).unwrap_err();
        let msg = |rows, g| err(rows, g).to_string();
        assert_eq!(
            msg(3, PerGroup(3)),
            "group size 3 does not divide the row length 4"
        );
        assert_eq!(err(3, PerGroup(0)), LowBitError::ZeroGroupSize);
        assert_eq!(
            msg(5, PerTensor),
            "shape [5, 4] needs rows*cols elements but 12 were given"
        );
        assert!(quantize_int(&data, usize::MAX, 2, int4(PerTensor)).is_err());
        assert!(quantize_fp8(&data, 2, 6, Fp8Format::E4M3, PerGroup(4)).is_err());
        assert!(quantize_fp8(&data, 2, 5, Fp8Format::E4M3, PerTensor).is_err());
    }

    #[test]
    fn empty_tensors() {
        for (rows, cols) in [(0, 0), (0, 4), (3, 0)] {
            for gran in [PerTensor, PerChannel, PerGroup(2)] {
                for scheme in schemes(gran) {
                    let q = quantize_int(&[], rows, cols, scheme).unwrap();
                    q.validate().unwrap();
                    assert!(q.codes.is_empty() && q.dequantize().is_empty());
                    assert!(q.packed_codes().bytes.is_empty());
                }
                let q = quantize_fp8(&[], rows, cols, Fp8Format::E5M2, gran).unwrap();
                assert!(q.codes.is_empty() && q.dequantize().is_empty());
            }
        }
        let int8 = IntScheme::new(IntBits::Int8, Symmetry::Symmetric, PerChannel);
        assert_eq!(quantize_int(&[], 3, 0, int8).unwrap().scales, [0.0; 3]);
    }

    #[test]
    fn validate_and_output_checks() {
        let sym = IntScheme::new(IntBits::Int4, Symmetry::Symmetric, PerChannel);
        let asym = IntScheme {
            symmetry: Symmetry::Asymmetric,
            ..sym
        };
        let (sg, us) = (
            |v: &[i8]| IntCodes::Signed(v.to_vec()),
            |v: &[u8]| IntCodes::Unsigned(v.to_vec()),
        );
        let parts = |scheme, codes, scales: &[f32], zero_points: &[i32]| QuantizedInt {
            scheme,
            shape: [2, 2],
            codes,
            scales: scales.to_vec(),
            zero_points: zero_points.to_vec(),
        };
        let q = parts(sym, sg(&[1, -7, 7, 0]), &[1.0, 0.5], &[0, 0]);
        q.validate().unwrap();
        for bad in [
            parts(sym, sg(&[1, -8, 7, 0]), &[1.0, 0.5], &[0, 0]),
            parts(sym, us(&[1, 2, 3, 4]), &[1.0, 0.5], &[0, 0]),
            parts(sym, sg(&[1, 2, 3]), &[1.0, 0.5], &[0, 0]),
            parts(sym, sg(&[1, 2, 3, 4]), &[1.0], &[0, 0]),
            parts(sym, sg(&[1, 2, 3, 4]), &[1.0, f32::NAN], &[0, 0]),
            parts(sym, sg(&[1, 2, 3, 4]), &[1.0, 0.5], &[0, 1]),
            parts(asym, us(&[1, 2, 3, 16]), &[1.0, 0.5], &[0, 1]),
            parts(asym, us(&[1, 2, 3, 4]), &[1.0, -0.5], &[0, 1]),
            parts(asym, us(&[1, 2, 3, 4]), &[1.0, 0.5], &[0, 16]),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
            bad.dequantize(); // inconsistent parts do not panic
        }
        assert!(q.dequantize_into(&mut [0.0; 3]).is_err());
        let mut out = [0.0; 4];
        q.dequantize_into(&mut out).unwrap();
        assert_eq!(out, [1.0, -7.0, 3.5, 0.0]);
    }

    #[test]
    fn pack_layout() {
        let (sg, us) = (
            |v: &[i8]| IntCodes::Signed(v.to_vec()),
            |v: &[u8]| IntCodes::Unsigned(v.to_vec()),
        );
        for (codes, bits, want) in [
            (us(&[1, 2, 3]), IntBits::Int4, &[0x21, 0x03][..]),
            (us(&[1, 2, 3, 0, 1]), IntBits::Int2, &[0x39, 0x01]),
            (sg(&[-1, 7, -7]), IntBits::Int4, &[0x7F, 0x09]),
            (sg(&[-1, 1, 0, -1]), IntBits::Int2, &[0b11_00_01_11]),
            (sg(&[-127, 5]), IntBits::Int8, &[0x81, 0x05]),
        ] {
            assert_eq!(pack_codes(&codes, bits).unwrap().bytes, want, "{codes:?}");
        }
        assert!(pack_codes(&us(&[4]), IntBits::Int2).is_err());
        assert!(pack_codes(&sg(&[-128]), IntBits::Int8).is_err());
        // The two's-complement minimum unpacks as such (validate rejects it).
        let stored = PackedCodes {
            bits: IntBits::Int4,
            signed: true,
            len: 2,
            bytes: vec![0x8F],
        };
        assert_eq!(stored.unpack(), sg(&[-1, -8]));
    }

    #[test]
    fn fp8_all_codes() {
        let mut nan_codes = [0; 2];
        for (k, fmt) in FORMATS.into_iter().enumerate() {
            for c in 0..=255u8 {
                let (v, mag) = (fmt.decode(c), c & 0x7F);
                let nan = if fmt == Fp8Format::E4M3 {
                    mag == 0x7F
                } else {
                    mag > 0x7C
                };
                assert_eq!(v.is_nan(), nan, "{fmt:?} {c:#04x}");
                assert_eq!(v.is_infinite(), fmt == Fp8Format::E5M2 && mag == 0x7C);
                if nan {
                    nan_codes[k] += 1;
                    continue;
                }
                assert_eq!(v.is_sign_negative(), c >= 0x80);
                assert!(mag == 0 || v.is_infinite() || v.abs() > fmt.decode(c - 1).abs());
                // encode(decode(c)) == c, both zero signs included.
                for sat in SATS {
                    let want = match v.is_infinite() && sat == Saturation::Saturating {
                        true => (c & 0x80) | fmt.max_finite_code(),
                        false => c,
                    };
                    assert_eq!(fmt.encode(v, sat), want, "{fmt:?} {sat:?} {c:#04x} = {v:e}");
                }
            }
        }
        assert_eq!(nan_codes, [2, 6]);
        let p = |e| 2f32.powi(e);
        let e4m3 = [
            (0x7E, 448.0),
            (0xFE, -448.0),
            (0x01, p(-9)),
            (0x07, 7.0 * p(-9)),
            (0x08, p(-6)),
            (0x38, 1.0),
        ];
        for (c, v) in e4m3 {
            assert_eq!(e4m3_to_f32(c), v);
        }
        let e5m2 = [
            (0x7B, 57344.0),
            (0x01, p(-16)),
            (0x04, p(-14)),
            (0x3C, 1.0),
            (0x7C, f32::INFINITY),
            (0xFC, f32::NEG_INFINITY),
        ];
        for (c, v) in e5m2 {
            assert_eq!(e5m2_to_f32(c), v);
        }
        assert_eq!(e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        assert!((0x7D..=0x7F)
            .chain(0xFD..=0xFF)
            .all(|c| e5m2_to_f32(c).is_nan()));
        // E5M2 is the top byte of an IEEE binary16.
        for c in 0..=255u8 {
            let (v, h) = (
                e5m2_to_f32(c),
                half::f16::from_bits(u16::from(c) << 8).to_f32(),
            );
            assert!(
                v.to_bits() == h.to_bits() || (v.is_nan() && h.is_nan()),
                "{c:#04x}"
            );
        }
    }

    #[test]
    fn fp8_midpoints_round_to_even() {
        for fmt in FORMATS {
            for c in 0..fmt.max_finite_code() {
                let (a, b) = (fmt.decode(c), fmt.decode(c + 1));
                let mid = (a + b) / 2.0; // exact: fp8 values have at most 4 significant bits
                assert_eq!(f64::from(mid), (f64::from(a) + f64::from(b)) / 2.0);
                let even = if c % 2 == 0 { c } else { c + 1 };
                for (sign, s) in [(0u8, 1.0f32), (0x80, -1.0)] {
                    for sat in SATS {
                        assert_eq!(fmt.encode(s * mid, sat), sign | even, "{fmt:?} {mid:e}");
                        assert_eq!(fmt.encode(s * mid.next_down(), sat), sign | c);
                        assert_eq!(fmt.encode(s * mid.next_up(), sat), sign | (c + 1));
                    }
                }
            }
        }
    }

    #[test]
    fn fp8_saturation() {
        use Saturation::{NonSaturating as Non, Saturating as Sat};
        // 464 lies between 448 (mantissa 110) and 480 (111, past the max): a tie.
        for (x, sat, non) in [
            (448.0f32, 0x7E, 0x7E),
            (464.0, 0x7E, 0x7E),
            (464.0f32.next_up(), 0x7E, 0x7F),
            (1e6, 0x7E, 0x7F),
            (f32::MAX, 0x7E, 0x7F),
            (f32::INFINITY, 0x7E, 0x7F),
        ] {
            assert_eq!(
                [f32_to_e4m3(x, Sat), f32_to_e4m3(x, Non)],
                [sat, non],
                "E4M3 {x:e}"
            );
            assert_eq!(
                [f32_to_e4m3(-x, Sat), f32_to_e4m3(-x, Non)],
                [sat | 0x80, non | 0x80]
            );
        }
        // 61440 lies between 57344 (mantissa 11) and 65536 (infinity): a tie.
        for (x, sat, non) in [
            (57344.0f32, 0x7B, 0x7B),
            (61440.0f32.next_down(), 0x7B, 0x7B),
            (61440.0, 0x7B, 0x7C),
            (1e6, 0x7B, 0x7C),
            (f32::INFINITY, 0x7B, 0x7C),
        ] {
            assert_eq!(
                [f32_to_e5m2(x, Sat), f32_to_e5m2(x, Non)],
                [sat, non],
                "E5M2 {x:e}"
            );
            assert_eq!(
                [f32_to_e5m2(-x, Sat), f32_to_e5m2(-x, Non)],
                [sat | 0x80, non | 0x80]
            );
        }
        for (fmt, sat) in FORMATS.into_iter().flat_map(|f| SATS.map(|s| (f, s))) {
            assert!(fmt.decode(fmt.encode(f32::NAN, sat)).is_nan());
            assert_eq!(fmt.encode(-f32::NAN, sat), 0x80 | fmt.nan_code());
        }
        assert_eq!(Saturation::default(), Sat);
    }

    /// Brute-force reference encoder, written apart from `encode`: the nearest
    /// of all finite non-negative values (`table[c]` for code `c`) by f64
    /// distance, ties to the even code (even mantissa), with one more
    /// candidate a top-binade step past the max that stands for overflow.
    fn reference_encode(fmt: Fp8Format, table: &[f64], x: f32, sat: Saturation) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let top = table.len() - 1;
        let overflow = match (sat, fmt) {
            (Saturation::Saturating, _) => top as u8,
            (Saturation::NonSaturating, Fp8Format::E4M3) => 0x7F,
            (Saturation::NonSaturating, Fp8Format::E5M2) => 0x7C,
        };
        let a = f64::from(x.abs());
        let beyond = 2.0 * table[top] - table[top - 1];
        // (Past `beyond` the f64 distances to the top values could tie.)
        if a >= beyond {
            return sign | overflow;
        }
        let mut best = (0, f64::INFINITY);
        for (c, v) in table.iter().copied().chain([beyond]).enumerate() {
            let d = (v - a).abs();
            if d < best.1 || (d == best.1 && c % 2 == 0) {
                best = (c, d);
            }
        }
        sign | if best.0 > top { overflow } else { best.0 as u8 }
    }

    #[test]
    fn fp8_matches_brute_force_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(0x1b17);
        for fmt in FORMATS {
            let table: Vec<f64> = (0..=fmt.max_finite_code())
                .map(|c| f64::from(fmt.decode(c)))
                .collect();
            for i in 0..200_000u32 {
                let sign = if rng.gen() { 1.0f32 } else { -1.0 };
                let x = match i % 4 {
                    // Any bit pattern: zeros, f32 subnormals, huge values, inf, NaN.
                    0 => f32::from_bits(rng.gen()),
                    // Log-uniform over the fp8 range, its subnormals and overflow.
                    1 => sign * rng.gen_range(-20.0f32..18.0).exp2(),
                    // Within two ulps of a midpoint between adjacent codes.
                    2 => {
                        let c = rng.gen_range(0..table.len() - 1);
                        let mut m = ((table[c] + table[c + 1]) / 2.0) as f32;
                        for _ in 0..rng.gen_range(0..3) {
                            m = if rng.gen() {
                                m.next_up()
                            } else {
                                m.next_down()
                            };
                        }
                        sign * m
                    }
                    // Uniform up to past the largest values.
                    _ => sign * rng.gen_range(0.0..2.5 * fmt.max_finite()),
                };
                for sat in SATS {
                    let got = fmt.encode(x, sat);
                    match x.is_nan() {
                        true => assert!(fmt.decode(got).is_nan()),
                        false => {
                            let want = reference_encode(fmt, &table, x, sat);
                            assert_eq!(
                                got,
                                want,
                                "{fmt:?} {sat:?} x={x:e} ({:#010x})",
                                x.to_bits()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fp8_tensor_scales() {
        let data = [1.0, 2.0, 4.0, -8.0, 0.0, -0.0, 0.0, 0.0];
        for fmt in FORMATS {
            let q = quantize_fp8(&data, 2, 4, fmt, PerChannel).unwrap();
            assert!(q.scales[0] <= 8.0 / fmt.max_finite() && q.scales[1] == 0.0);
            // The row's absmax maps onto the largest finite code.
            assert_eq!(q.codes[3], 0x80 | fmt.max_finite_code());
            let deq = q.dequantize();
            assert!((deq[3] + 8.0).abs() <= 8.0 * 2f32.powi(-20));
            assert!(deq[4..].iter().all(|&d| d == 0.0));
            assert_eq!(
                quantize_fp8(&deq, 2, 4, fmt, PerChannel).unwrap().codes,
                q.codes
            );
            let mut out = [0.0; 8];
            q.dequantize_into(&mut out).unwrap();
            assert!(out == *deq && q.dequantize_into(&mut out[1..]).is_err());
        }
    }
}
