//! Lowercase hexadecimal for bytes: content keys of batch jobs, generator states in checkpoints.

use std::fmt::Write as _;

/// `bytes` as lowercase hex, two digits a byte.
pub fn encode(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut hex, byte| {
        let _ = write!(hex, "{byte:02x}");
        hex
    })
}

/// The bytes of a hex string (either case); `None` for odd lengths or other characters.
pub fn decode(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_hex() {
        assert_eq!(encode(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(decode("000fa5ff").unwrap(), [0x00, 0x0f, 0xa5, 0xff]);
        assert_eq!(decode("ABCD").unwrap(), [0xab, 0xcd]);
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
        assert!(decode("abc").is_none());
        assert!(decode("zz").is_none());
        assert!(decode("+1").is_none());
        assert!(decode("é1").is_none());
    }
}
