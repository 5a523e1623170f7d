//! Helpers that put fuzz bytes into a v2 header's frame, so the fuzzer spends its
//! time in the address block and the TLVs rather than rediscovering the signature,
//! the length field and CRC32C.

/// The v2 signature (the spec's 12 bytes).
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Signature, `ver_cmd`, `fam`, the length of `body`, then `body` (cut to 65535).
pub fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let body = &body[..body.len().min(usize::from(u16::MAX))];
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(ver_cmd);
    out.push(fam);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Length of the address block for a v2 family byte (0 for UNSPEC and unknown ones).
pub fn block_len(fam: u8) -> usize {
    match fam >> 4 {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    }
}

/// If the TLVs after the address block hold a 4-byte CRC32C TLV, writes the right
/// checksum into the first one (the header is summed with that field zeroed), so a
/// mutated header still passes the check and its other TLVs get decoded.
pub fn fix_crc32c(header: &mut [u8]) {
    if header.len() < 16 {
        return;
    }
    let mut at = 16 + block_len(header[13]);
    while at + 3 <= header.len() {
        let (kind, len) = (
            header[at],
            usize::from(u16::from_be_bytes([header[at + 1], header[at + 2]])),
        );
        let value = at + 3;
        if value + len > header.len() {
            return;
        }
        if kind == 0x03 && len == 4 {
            header[value..value + 4].fill(0);
            let crc = crc32c::crc32c(header);
            header[value..value + 4].copy_from_slice(&crc.to_be_bytes());
            return;
        }
        at = value + len;
    }
}
