//! The disk seam: everything the WAL does to files goes through [`Disk`] and [`DiskFile`], so tests can swap the
//! real file system ([`StdDisk`]) for [`SimDisk`], which injects the faults real disks have: a crash loses what
//! was not synced (or keeps a torn prefix of it), files created since the last directory sync vanish, `fsync`
//! can fail, bits can flip.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

/// File-system operations the WAL needs.
pub trait Disk: Send + Sync + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Paths of the files directly in `dir`, in no particular order.
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Opens a file for reading and appending, creating it if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes creations and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open file: positional reads, appends at the end, sync, truncate.
pub trait DiskFile: Send {
    fn len_bytes(&self) -> io::Result<u64>;
    fn read_exact_at(&self, offset: u64, buffer: &mut [u8]) -> io::Result<()>;
    fn append(&mut self, data: &[u8]) -> io::Result<()>;
    /// Makes every appended byte durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdDisk;

struct StdFile {
    file: File,
    len: u64,
}

impl Disk for StdDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                paths.push(entry.path());
            }
        }
        Ok(paths)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)?;
        let len = file.metadata()?.len();
        Ok(Box::new(StdFile { file, len }))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

impl DiskFile for StdFile {
    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn read_exact_at(&self, offset: u64, buffer: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buffer, offset)
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, self.len)?;
        self.len += data.len() as u64;
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.len = len;
        let _ = self.file.flush();
        Ok(())
    }
}

/// One simulated file: its bytes and how many of them are durable.
#[derive(Clone, Debug, Default)]
struct SimFileState {
    data: Vec<u8>,
    synced_len: usize,
}

#[derive(Debug, Default)]
struct SimDiskState {
    files: BTreeMap<PathBuf, SimFileState>,
    /// Files whose directory entry is durable.
    durable_names: std::collections::BTreeSet<PathBuf>,
    directories: std::collections::BTreeSet<PathBuf>,
    /// The next this-many `sync_data` calls fail.
    failing_syncs: u32,
    /// After a power cut: writes vanish and syncs fail, until `crash` (which models the reboot).
    powered_off: bool,
}

/// An in-memory disk with fault injection. Clones share the same disk.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    state: Arc<Mutex<SimDiskState>>,
}

struct SimFile {
    path: PathBuf,
    state: Arc<Mutex<SimDiskState>>,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} does not exist", path.display()))
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// Power loss. Every file keeps its synced bytes plus, for a torn write, the first
    /// `keep_unsynced(path, unsynced_len)` of its unsynced ones; files whose creation was never made durable by a
    /// directory sync disappear.
    pub fn crash(&self, mut keep_unsynced: impl FnMut(&Path, usize) -> usize) {
        let mut state = self.state.lock();
        state.powered_off = false;
        let durable_names = state.durable_names.clone();
        state.files.retain(|path, _| durable_names.contains(path));
        for (path, file) in state.files.iter_mut() {
            let unsynced = file.data.len() - file.synced_len;
            let kept = keep_unsynced(path, unsynced).min(unsynced);
            file.data.truncate(file.synced_len + kept);
            file.synced_len = file.data.len();
        }
    }

    /// Cuts the power: from now on writes are lost and syncs fail (so nothing more can be reported durable), until
    /// `crash` reboots the disk.
    pub fn power_off(&self) {
        self.state.lock().powered_off = true;
    }

    /// Makes the next `count` `sync_data` calls fail.
    pub fn fail_next_syncs(&self, count: u32) {
        self.state.lock().failing_syncs = count;
    }

    /// Flips one bit of a file's (durable) content.
    pub fn flip_bit(&self, path: &Path, offset: usize, bit: u8) {
        let mut state = self.state.lock();
        let file = state.files.get_mut(path).expect("flip_bit on a missing file");
        file.data[offset] ^= 1 << (bit % 8);
    }

    pub fn file_len(&self, path: &Path) -> Option<usize> {
        self.state.lock().files.get(path).map(|f| f.data.len())
    }

    pub fn unsynced_bytes(&self) -> usize {
        self.state.lock().files.values().map(|f| f.data.len() - f.synced_len).sum()
    }
}

impl Disk for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.state.lock().directories.insert(dir.to_path_buf());
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let state = self.state.lock();
        if !state.directories.contains(dir) {
            return Err(not_found(dir));
        }
        Ok(state.files.keys().filter(|p| p.parent() == Some(dir)).cloned().collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        let mut state = self.state.lock();
        if !state.files.contains_key(path) {
            if !create {
                return Err(not_found(path));
            }
            state.files.insert(path.to_path_buf(), SimFileState::default());
        }
        Ok(Box::new(SimFile { path: path.to_path_buf(), state: Arc::clone(&self.state) }))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.files.remove(path).ok_or_else(|| not_found(path))?;
        // A removal that is not yet durable may be undone by a crash; modelled conservatively as durable at
        // once, which only makes the WAL's job easier on the "file reappears" side (not modelled).
        state.durable_names.remove(path);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        let names: Vec<PathBuf> = state.files.keys().filter(|p| p.parent() == Some(dir)).cloned().collect();
        state.durable_names.extend(names);
        Ok(())
    }
}

impl SimFile {
    fn with_file<T>(&self, action: impl FnOnce(&mut SimFileState) -> T) -> io::Result<T> {
        let mut state = self.state.lock();
        let file = state.files.get_mut(&self.path).ok_or_else(|| not_found(&self.path))?;
        Ok(action(file))
    }
}

impl DiskFile for SimFile {
    fn len_bytes(&self) -> io::Result<u64> {
        self.with_file(|f| f.data.len() as u64)
    }

    fn read_exact_at(&self, offset: u64, buffer: &mut [u8]) -> io::Result<()> {
        self.with_file(|f| {
            let start = offset as usize;
            let end = start + buffer.len();
            if end > f.data.len() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read beyond the end of the file"));
            }
            buffer.copy_from_slice(&f.data[start..end]);
            Ok(())
        })?
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if self.state.lock().powered_off {
            return Ok(());
        }
        self.with_file(|f| f.data.extend_from_slice(data))
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut state = self.state.lock();
        if state.powered_off {
            return Err(io::Error::other("power lost"));
        }
        if state.failing_syncs > 0 {
            state.failing_syncs -= 1;
            return Err(io::Error::other("injected fsync failure"));
        }
        let file = state.files.get_mut(&self.path).ok_or_else(|| not_found(&self.path))?;
        file.synced_len = file.data.len();
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.with_file(|f| {
            f.data.truncate(len as usize);
            f.synced_len = f.synced_len.min(f.data.len());
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_synced_bytes_and_a_chosen_prefix_of_the_rest() {
        let disk = SimDisk::new();
        let dir = Path::new("/wal");
        disk.create_dir_all(dir).unwrap();
        let path = dir.join("a");
        let mut file = disk.open(&path, true).unwrap();
        disk.sync_dir(dir).unwrap();
        file.append(b"durable").unwrap();
        file.sync_data().unwrap();
        file.append(b"-torn-tail").unwrap();
        disk.crash(|_, unsynced| {
            assert_eq!(unsynced, 10);
            3
        });
        let file = disk.open(&path, false).unwrap();
        let mut content = vec![0; file.len_bytes().unwrap() as usize];
        file.read_exact_at(0, &mut content).unwrap();
        assert_eq!(content, b"durable-to");
    }

    #[test]
    fn files_created_without_a_directory_sync_vanish_and_syncs_can_fail() {
        let disk = SimDisk::new();
        let dir = Path::new("/wal");
        disk.create_dir_all(dir).unwrap();
        let mut file = disk.open(&dir.join("new"), true).unwrap();
        file.append(b"x").unwrap();
        disk.fail_next_syncs(1);
        assert!(file.sync_data().is_err());
        assert!(file.sync_data().is_ok());
        disk.crash(|_, _| 0);
        assert!(disk.list(dir).unwrap().is_empty());
    }

    #[test]
    fn std_disk_appends_reads_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut file = StdDisk.open(&path, true).unwrap();
        file.append(b"hello world").unwrap();
        file.sync_data().unwrap();
        file.truncate(5).unwrap();
        file.append(b"!").unwrap();
        let reopened = StdDisk.open(&path, false).unwrap();
        let mut content = vec![0; reopened.len_bytes().unwrap() as usize];
        reopened.read_exact_at(0, &mut content).unwrap();
        assert_eq!(content, b"hello!");
        StdDisk.sync_dir(dir.path()).unwrap();
        assert_eq!(StdDisk.list(dir.path()).unwrap(), vec![path]);
    }
}
