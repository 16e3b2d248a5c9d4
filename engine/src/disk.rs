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
    /// Renames a file (replacing `to` if it exists); durable once its directory is synced.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes creations, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open file: positional reads and writes, appends at the end, sync, truncate.
pub trait DiskFile: Send {
    fn len_bytes(&self) -> io::Result<u64>;
    fn read_exact_at(&self, offset: u64, buffer: &mut [u8]) -> io::Result<()>;
    /// Writes at `offset`, overwriting what is there and growing the file if it reaches past the end.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        let end = self.len_bytes()?;
        self.write_at(end, data)
    }
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

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
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

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        self.len = self.len.max(offset + data.len() as u64);
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

/// One simulated file's content: what reads see, what survives a crash, and the writes in between.
#[derive(Clone, Debug, Default)]
struct SimFileState {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Writes since the last sync, in order: a crash keeps the durable image plus a prefix of these bytes.
    unsynced: Vec<(usize, Vec<u8>)>,
}

impl SimFileState {
    fn write_at(&mut self, offset: usize, bytes: &[u8]) {
        write_into(&mut self.data, offset, bytes);
        self.unsynced.push((offset, bytes.to_vec()));
    }

    fn unsynced_len(&self) -> usize {
        self.unsynced.iter().map(|(_, bytes)| bytes.len()).sum()
    }

    /// After a crash: the durable image, then the first `kept` unsynced bytes in write order (a torn write).
    fn crash(&mut self, mut kept: usize) {
        let mut image = std::mem::take(&mut self.durable);
        for (offset, bytes) in std::mem::take(&mut self.unsynced) {
            let take = kept.min(bytes.len());
            write_into(&mut image, offset, &bytes[..take]);
            kept -= take;
            if kept == 0 {
                break;
            }
        }
        self.data = image.clone();
        self.durable = image;
    }
}

fn write_into(image: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    if image.len() < offset + bytes.len() {
        image.resize(offset + bytes.len(), 0);
    }
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
}

#[derive(Debug, Default)]
struct SimDiskState {
    /// Names (as the live directory has them) to file ids.
    names: BTreeMap<PathBuf, u64>,
    /// Names as the last directory sync left them: what a crash goes back to.
    durable_names: BTreeMap<PathBuf, u64>,
    contents: BTreeMap<u64, SimFileState>,
    next_file_id: u64,
    directories: std::collections::BTreeSet<PathBuf>,
    /// The next this-many `sync_data` calls fail.
    failing_syncs: u32,
    /// After a power cut: writes vanish and syncs fail, until `crash` (which models the reboot).
    powered_off: bool,
}

impl SimDiskState {
    fn file(&mut self, path: &Path) -> io::Result<&mut SimFileState> {
        let id = *self.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(self.contents.get_mut(&id).expect("named files have content"))
    }
}

/// An in-memory disk with fault injection. Clones share the same disk.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    state: Arc<Mutex<SimDiskState>>,
}

/// An open file. Like a file descriptor, it follows the file across renames (it holds the file's id).
struct SimFile {
    id: u64,
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

    /// Power loss. Directory entries go back to the last directory sync (unsynced creations, renames and removals
    /// are undone); every file keeps its durable bytes plus, for a torn write, the first
    /// `keep_unsynced(path, unsynced_len)` bytes of its unsynced writes, in the order they were made.
    pub fn crash(&self, mut keep_unsynced: impl FnMut(&Path, usize) -> usize) {
        let mut state = self.state.lock();
        state.powered_off = false;
        state.names = state.durable_names.clone();
        let live: BTreeMap<u64, PathBuf> = state.names.iter().map(|(path, id)| (*id, path.clone())).collect();
        state.contents.retain(|id, _| live.contains_key(id));
        for (id, file) in state.contents.iter_mut() {
            let unsynced = file.unsynced_len();
            file.crash(keep_unsynced(&live[id], unsynced).min(unsynced));
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

    /// Flips one bit of a file's content (durable and live alike: damage on the medium).
    pub fn flip_bit(&self, path: &Path, offset: usize, bit: u8) {
        let mut state = self.state.lock();
        let file = state.file(path).expect("flip_bit on a missing file");
        file.data[offset] ^= 1 << (bit % 8);
        if offset < file.durable.len() {
            file.durable[offset] ^= 1 << (bit % 8);
        }
    }

    pub fn file_len(&self, path: &Path) -> Option<usize> {
        self.state.lock().file(path).ok().map(|f| f.data.len())
    }

    pub fn unsynced_bytes(&self) -> usize {
        self.state.lock().contents.values().map(SimFileState::unsynced_len).sum()
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
        Ok(state.names.keys().filter(|p| p.parent() == Some(dir)).cloned().collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        let mut state = self.state.lock();
        let id = match state.names.get(path) {
            Some(id) => *id,
            None if create => {
                let id = state.next_file_id;
                state.next_file_id += 1;
                state.names.insert(path.to_path_buf(), id);
                state.contents.insert(id, SimFileState::default());
                id
            }
            None => return Err(not_found(path)),
        };
        Ok(Box::new(SimFile { id, path: path.to_path_buf(), state: Arc::clone(&self.state) }))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.names.remove(path).ok_or_else(|| not_found(path))?;
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        let id = state.names.remove(from).ok_or_else(|| not_found(from))?;
        state.names.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        let in_dir = |path: &PathBuf| path.parent() == Some(dir);
        state.durable_names.retain(|path, _| !in_dir(path));
        let live: Vec<(PathBuf, u64)> = state.names.iter().filter(|(path, _)| in_dir(path)).map(|(p, id)| (p.clone(), *id)).collect();
        state.durable_names.extend(live);
        Ok(())
    }
}

impl SimFile {
    fn with_file<T>(&self, action: impl FnOnce(&mut SimFileState) -> T) -> io::Result<T> {
        let mut state = self.state.lock();
        let file = state.contents.get_mut(&self.id).ok_or_else(|| not_found(&self.path))?;
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

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.state.lock().powered_off {
            return Ok(());
        }
        self.with_file(|f| f.write_at(offset as usize, data))
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
        let file = state.contents.get_mut(&self.id).ok_or_else(|| not_found(&self.path))?;
        for (offset, bytes) in std::mem::take(&mut file.unsynced) {
            write_into(&mut file.durable, offset, &bytes);
        }
        file.durable.truncate(file.data.len());
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        // Modelled as durable at once (the WAL syncs right after truncating).
        self.with_file(|f| {
            let len = len as usize;
            f.data.truncate(len);
            f.durable.truncate(len);
            for (offset, bytes) in &mut f.unsynced {
                bytes.truncate(len.saturating_sub(*offset));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk with the directory `/wal` holding an empty file `a` whose name is durable.
    fn disk_with_file() -> (SimDisk, &'static Path, PathBuf, Box<dyn DiskFile>) {
        let disk = SimDisk::new();
        let dir = Path::new("/wal");
        disk.create_dir_all(dir).unwrap();
        let path = dir.join("a");
        let file = disk.open(&path, true).unwrap();
        disk.sync_dir(dir).unwrap();
        (disk, dir, path, file)
    }

    fn read(disk: &SimDisk, path: &Path) -> Vec<u8> {
        let file = disk.open(path, false).unwrap();
        let mut content = vec![0; file.len_bytes().unwrap() as usize];
        file.read_exact_at(0, &mut content).unwrap();
        content
    }

    #[test]
    fn crash_keeps_synced_bytes_and_a_chosen_prefix_of_the_rest() {
        let (disk, _, path, mut file) = disk_with_file();
        file.append(b"durable").unwrap();
        file.sync_data().unwrap();
        file.append(b"-torn-tail").unwrap();
        disk.crash(|_, unsynced| {
            assert_eq!(unsynced, 10);
            3
        });
        assert_eq!(read(&disk, &path), b"durable-to");
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
    fn unsynced_overwrites_revert_or_tear_on_a_crash_in_write_order() {
        let (disk, _, path, mut file) = disk_with_file();
        file.write_at(0, b"aaaaaaaa").unwrap();
        file.sync_data().unwrap();
        file.write_at(2, b"BB").unwrap();
        file.sync_data().unwrap();
        file.write_at(4, b"CC").unwrap(); // unsynced overwrite
        file.write_at(10, b"DD").unwrap(); // unsynced, past the end (a gap of zeros)
        assert_eq!(read(&disk, &path), b"aaBBCCaa\0\0DD");
        disk.crash(|_, unsynced| {
            assert_eq!(unsynced, 4);
            3 // the first write whole, one byte of the second
        });
        assert_eq!(read(&disk, &path), b"aaBBCCaa\0\0D");
        drop(file);
        let mut file = disk.open(&path, false).unwrap();
        file.write_at(0, b"zz").unwrap();
        disk.crash(|_, _| 0);
        assert_eq!(read(&disk, &path), b"aaBBCCaa\0\0D", "an unsynced overwrite is undone");
    }

    #[test]
    fn renames_and_removals_are_undone_by_a_crash_until_the_directory_is_synced() {
        let disk = SimDisk::new();
        let dir = Path::new("/wal");
        disk.create_dir_all(dir).unwrap();
        let (old, new, gone) = (dir.join("old"), dir.join("new"), dir.join("gone"));
        for path in [&old, &gone] {
            let mut file = disk.open(path, true).unwrap();
            file.append(b"content").unwrap();
            file.sync_data().unwrap();
        }
        disk.sync_dir(dir).unwrap();
        disk.rename(&old, &new).unwrap();
        disk.remove(&gone).unwrap();
        assert_eq!(disk.list(dir).unwrap(), vec![new.clone()]);
        disk.crash(|_, _| 0);
        let mut names = disk.list(dir).unwrap();
        names.sort();
        assert_eq!(names, vec![gone.clone(), old.clone()], "neither the rename nor the removal was durable");
        disk.rename(&old, &new).unwrap();
        disk.remove(&gone).unwrap();
        disk.sync_dir(dir).unwrap();
        disk.crash(|_, _| 0);
        assert_eq!(disk.list(dir).unwrap(), vec![new.clone()]);
        assert_eq!(read(&disk, &new), b"content", "the content follows the name");
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
        file.write_at(0, b"J").unwrap();
        let reopened = StdDisk.open(&path, false).unwrap();
        let mut content = vec![0; reopened.len_bytes().unwrap() as usize];
        reopened.read_exact_at(0, &mut content).unwrap();
        assert_eq!(content, b"Jello!");
        StdDisk.sync_dir(dir.path()).unwrap();
        assert_eq!(StdDisk.list(dir.path()).unwrap(), vec![path]);
    }
}
