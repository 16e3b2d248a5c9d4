//! Checksums for every value the state machine trusts besides blocks (which carry their own): run records (and
//! their Bloom filters), range deletions, applied states, range descriptors. A sealed value is the bytes, then
//! the CRC-32C (LE u32) of the table's name, the row's key (u64 LE) and the bytes — so damage, and a value that
//! landed under another key or in another table, is reported as corruption naming the table and row instead of
//! being believed (a damaged filter would make a point read miss a key that a scan finds).

use crate::state_machine::error::{storage, StateMachineError};

fn checksum(table: &str, key: u64, bytes: &[u8]) -> u32 {
    let seed = crc32c::crc32c_append(crc32c::crc32c(table.as_bytes()), &key.to_le_bytes());
    crc32c::crc32c_append(seed, bytes)
}

/// `bytes` followed by their checksum, for row `key` of `table`.
pub(crate) fn seal(table: &str, key: u64, mut bytes: Vec<u8>) -> Vec<u8> {
    let crc = checksum(table, key, &bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// The bytes of a sealed value read from row `key` of `table`, once its checksum verifies.
pub(crate) fn unseal<'a>(table: &str, key: u64, sealed: &'a [u8]) -> Result<&'a [u8], StateMachineError> {
    let Some(split) = sealed.len().checked_sub(4) else {
        return Err(storage(format!(
            "corrupt state machine: table {table}, row {key}: {} bytes, too short for a checksum",
            sealed.len()
        )));
    };
    let (bytes, stored) = sealed.split_at(split);
    if checksum(table, key, bytes).to_le_bytes() != stored {
        return Err(storage(format!("corrupt state machine: table {table}, row {key}: checksum mismatch")));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::{seal, unseal};

    #[test]
    fn damage_another_row_or_another_table_never_verifies() {
        let sealed = seal("runs", 7, b"record".to_vec());
        assert_eq!(unseal("runs", 7, &sealed).unwrap(), b"record");
        for at in 0..sealed.len() {
            for bit in 0..8 {
                let mut damaged = sealed.clone();
                damaged[at] ^= 1 << bit;
                assert!(unseal("runs", 7, &damaged).is_err(), "byte {at} bit {bit}");
            }
        }
        assert!(unseal("runs", 8, &sealed).is_err());
        assert!(unseal("ranges", 7, &sealed).is_err());
        assert!(unseal("runs", 7, &sealed[..3]).is_err());
        let message = unseal("runs", 8, &sealed).unwrap_err().to_string();
        assert!(message.contains("table runs, row 8"), "{message}");
    }
}
