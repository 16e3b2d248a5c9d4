//! A redb storage backend for crash tests: the database lives in memory, and [`SimRedbBackend::crash`] reverts it
//! to the image of its last `sync_data`, as power loss would. Clones share one disk, so a test keeps a handle while
//! redb owns another.
//!
//! To crash a live database: `power_off()` (every later write and sync is discarded, including what redb does
//! while closing), drop the `Database`, `crash()`, `power_on()`, and open a new `Database` on a clone. To break
//! it instead (a disk that fails): `fail()`, after which every write and sync returns an I/O error.

use std::io;
use std::sync::Arc;

use parking_lot::Mutex;
use redb::StorageBackend;

#[derive(Debug, Default)]
struct Image {
    live: Vec<u8>,
    synced: Vec<u8>,
    powered_off: bool,
    failing: bool,
}

#[derive(Clone, Debug, Default)]
pub struct SimRedbBackend {
    image: Arc<Mutex<Image>>,
}

impl SimRedbBackend {
    pub fn new() -> SimRedbBackend {
        SimRedbBackend::default()
    }

    pub fn power_off(&self) {
        self.image.lock().powered_off = true;
    }

    pub fn power_on(&self) {
        self.image.lock().powered_off = false;
    }

    /// Every later write and sync fails with an I/O error (a disk that went away).
    pub fn fail(&self) {
        self.image.lock().failing = true;
    }

    /// Loses everything written since the last sync.
    pub fn crash(&self) {
        let mut image = self.image.lock();
        image.live = image.synced.clone();
    }
}

impl StorageBackend for SimRedbBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.image.lock().live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let image = self.image.lock();
        let start = offset as usize;
        let source = image
            .live
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read beyond the end"))?;
        out.copy_from_slice(source);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut image = self.image.lock();
        if !image.powered_off {
            image.live.resize(len as usize, 0);
        }
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut image = self.image.lock();
        if image.failing {
            return Err(io::Error::other("the simulated disk failed"));
        }
        if !image.powered_off {
            image.synced = image.live.clone();
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut image = self.image.lock();
        if image.failing {
            return Err(io::Error::other("the simulated disk failed"));
        }
        if image.powered_off {
            return Ok(());
        }
        let end = offset as usize + data.len();
        if image.live.len() < end {
            image.live.resize(end, 0);
        }
        image.live[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
}
