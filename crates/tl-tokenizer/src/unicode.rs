//! Code point classification and the GPT-2 byte↔unicode mapping, as llama.cpp
//! `src/unicode.cpp` does them (same tables, see `unicode_data.rs`).

use std::sync::OnceLock;

use crate::unicode_data::{LOWER_TO_ASCII, RANGES, WHITESPACE};

pub(crate) const UNDEFINED: u16 = 0x0001;
pub(crate) const NUMBER: u16 = 0x0002;
pub(crate) const LETTER: u16 = 0x0004;
pub(crate) const ACCENT_MARK: u16 = 0x0010;
pub(crate) const PUNCTUATION: u16 = 0x0020;
pub(crate) const SYMBOL: u16 = 0x0040;
pub(crate) const CONTROL: u16 = 0x0080;
pub(crate) const WHITESPACE_FLAG: u16 = 0x0100;
const MASK_CATEGORIES: u16 = 0x00FF;

/// Category flags of a code point (llama.cpp `unicode_cpt_flags`). `Flags(0)`
/// stands for "outside the text", which llama.cpp's splitters use as a sentinel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Flags(pub(crate) u16);

impl Flags {
    #[inline]
    pub(crate) fn is_letter(self) -> bool {
        self.0 & LETTER != 0
    }
    #[inline]
    pub(crate) fn is_number(self) -> bool {
        self.0 & NUMBER != 0
    }
    #[inline]
    pub(crate) fn is_whitespace(self) -> bool {
        self.0 & WHITESPACE_FLAG != 0
    }
    #[inline]
    pub(crate) fn is_accent_mark(self) -> bool {
        self.0 & ACCENT_MARK != 0
    }
    #[inline]
    pub(crate) fn any(self) -> bool {
        self.0 != 0
    }
    #[inline]
    pub(crate) fn category(self) -> u16 {
        self.0 & MASK_CATEGORIES
    }
}

/// The basic multilingual plane is looked up directly (128 KiB); the rest by
/// binary search over the ranges, which are few up there.
fn bmp_table() -> &'static [u16] {
    static TABLE: OnceLock<Vec<u16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = vec![UNDEFINED; 0x10000];
        for w in RANGES.windows(2) {
            let (lo, flags) = w[0];
            let hi = w[1].0.min(0x10000);
            for cp in lo..hi {
                t[cp as usize] = flags;
            }
        }
        for &cp in WHITESPACE.iter() {
            if cp < 0x10000 {
                t[cp as usize] |= WHITESPACE_FLAG;
            }
        }
        t
    })
}

#[inline]
pub(crate) fn flags(cp: u32) -> Flags {
    if cp < 0x10000 {
        return Flags(bmp_table()[cp as usize]);
    }
    if cp >= 0x110000 {
        return Flags(UNDEFINED);
    }
    // partition_point gives the first range starting after cp; the one before it holds cp.
    let i = RANGES.partition_point(|&(start, _)| start <= cp);
    let f = RANGES.get(i.wrapping_sub(1)).map_or(UNDEFINED, |r| r.1);
    // No supplementary-plane code point is White_Space.
    Flags(f)
}

/// llama.cpp `unicode_tolower`, restricted to results in ASCII (the only ones
/// the splitters look at).
#[inline]
pub(crate) fn to_lower_ascii(cp: u32) -> u32 {
    if cp < 0x80 {
        return if (b'A' as u32..=b'Z' as u32).contains(&cp) {
            cp + 32
        } else {
            cp
        };
    }
    match LOWER_TO_ASCII.binary_search_by_key(&cp, |p| p.0) {
        Ok(i) => LOWER_TO_ASCII[i].1,
        Err(_) => cp,
    }
}

/// GPT-2's byte → printable code point mapping (`bytes_to_unicode` in
/// openai/gpt-2 `encoder.py`; llama.cpp `unicode_byte_to_utf8_map`).
pub(crate) fn byte_to_cp_table() -> &'static [char; 256] {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = ['\0'; 256];
        let mut n = 0u32;
        for b in 0..256u32 {
            let printable = (0x21..=0x7E).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b);
            let cp = if printable {
                b
            } else {
                n += 1;
                256 + n - 1
            };
            t[b as usize] = char::from_u32(cp).unwrap_or('\u{FFFD}');
        }
        t
    })
}

/// Inverse of [`byte_to_cp_table`]: code point → byte, for code points below 0x144.
pub(crate) fn cp_to_byte(cp: char) -> Option<u8> {
    static TABLE: OnceLock<[i16; 0x144]> = OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [-1i16; 0x144];
        for (b, &c) in byte_to_cp_table().iter().enumerate() {
            if let Some(slot) = t.get_mut(c as usize) {
                *slot = b as i16;
            }
        }
        t
    });
    t.get(cp as usize).and_then(|&b| u8::try_from(b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert!(flags('a' as u32).is_letter());
        assert!(flags('é' as u32).is_letter());
        assert!(flags('中' as u32).is_letter());
        assert!(flags('7' as u32).is_number());
        assert!(flags('²' as u32).is_number());
        assert!(flags(' ' as u32).is_whitespace());
        assert!(flags(0x3000).is_whitespace());
        assert!(flags(0xA0).is_whitespace());
        assert_eq!(flags(0x301).category(), ACCENT_MARK);
        assert_eq!(flags('!' as u32).category(), PUNCTUATION);
        assert_eq!(flags(0x1F600).category(), SYMBOL);
        assert!(flags(0x20000).is_letter());
        assert_eq!(
            flags(0x10FFFF).category() & UNDEFINED,
            flags(0x10FFFF).category() & UNDEFINED
        );
    }

    #[test]
    fn byte_map_round_trips() {
        for b in 0..=255u8 {
            assert_eq!(cp_to_byte(byte_to_cp_table()[b as usize]), Some(b));
        }
        assert_eq!(byte_to_cp_table()[b' ' as usize], 'Ġ');
        assert_eq!(byte_to_cp_table()[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn lower() {
        assert_eq!(to_lower_ascii('S' as u32), 's' as u32);
        assert_eq!(to_lower_ascii(0x212A), 'k' as u32);
        assert_eq!(to_lower_ascii('ß' as u32), 'ß' as u32);
    }
}
