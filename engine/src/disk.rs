//! The disk seam: everything a node does to files — the WAL's segments, the state machine's redb file (through
//! [`Disk::open_redb`]), the database's lock and layout files — goes through [`Disk`] and [`DiskFile`], so tests
//! can swap the real file system ([`StdDisk`]) for [`SimDisk`], which injects the faults real disks have: a crash
//! loses what was not synced (or keeps a torn prefix of it), files and directories created since the last sync of
//! the directory holding them vanish (with everything in them), `fsync` can fail, bits can flip.
//!
//! A directory entry is durable only once the directory holding it is synced (POSIX; what crash-consistency
//! studies of LevelDB and SQLite assume). [`Disk::create_dir_all`] therefore syncs the parent of every directory
//! it creates before it returns; whoever creates a file syncs its directory before relying on it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

/// File-system operations the WAL needs.
pub trait Disk: Send + Sync + 'static {
    /// Creates one directory; `Ok(false)` if it already exists, `NotFound` if its parent does not. Not durable
    /// until its parent is synced: use [`Disk::create_dir_all`].
    fn create_dir(&self, dir: &Path) -> io::Result<bool>;
    /// Creates `dir` and its missing ancestors, each made durable (its parent synced) before this returns.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        // The directory holding `dir` (`.` for a relative path of one component; none for a root).
        let parent = dir.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
        let created = match (self.create_dir(dir), parent) {
            (Err(error), Some(parent)) if error.kind() == io::ErrorKind::NotFound && parent != Path::new(".") => {
                self.create_dir_all(parent)?;
                self.create_dir(dir)?
            }
            (other, _) => other?,
        };
        match parent {
            Some(parent) if created => self.sync_dir(parent),
            _ => Ok(()),
        }
    }

    /// Paths of the files directly in `dir`, in no particular order.
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Opens a file for reading and appending, creating it if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Renames a file (replacing `to` if it exists); durable once its directory is synced.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes creations, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes the exclusive lock of the file at `path` (creating it), held until the returned guard is dropped;
    /// `WouldBlock` if anyone holds it — another process, or this one through another open.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn Send + Sync>>;
    /// Opens the redb file at `path` (creating it) as a redb storage backend. Like any file's, its name is durable
    /// once its directory is synced.
    fn open_redb(&self, path: &Path) -> io::Result<RedbFile>;
}

/// A redb file on one of the disks (a concrete type: redb takes its backend by value, and the real file's
/// backend keeps redb's own file locks).
#[derive(Debug)]
pub enum RedbFile {
    Std(redb::backends::FileBackend),
    Sim(SimRedbFile),
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
    /// Sets the file's length: cuts it, or extends it with zeros (sparse).
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
    fn create_dir(&self, dir: &Path) -> io::Result<bool> {
        match std::fs::create_dir(dir) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
            Err(error) => Err(error),
        }
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

    fn lock(&self, path: &Path) -> io::Result<Box<dyn Send + Sync>> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        // flock(2): per open file description, so a second open in this process is refused as well.
        file.try_lock().map_err(|error| match error {
            std::fs::TryLockError::WouldBlock => io::Error::new(io::ErrorKind::WouldBlock, "locked"),
            std::fs::TryLockError::Error(error) => error,
        })?;
        Ok(Box::new(file))
    }

    fn open_redb(&self, path: &Path) -> io::Result<RedbFile> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let backend = redb::backends::FileBackend::new(file).map_err(|error| io::Error::other(error.to_string()))?;
        Ok(RedbFile::Std(backend))
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
    /// The length last set by `truncate` (durable at once): past `data`, up to here, the file reads as zeros
    /// (sparse, as a real file extended by `set_len`).
    len_set: usize,
}

impl SimFileState {
    fn len(&self) -> usize {
        self.data.len().max(self.len_set)
    }

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
    directories: BTreeSet<PathBuf>,
    /// Directories whose own entry was made durable by a sync of their parent (a top-level one, without a
    /// parent, always is): a crash removes every other directory and everything in it.
    durable_directories: BTreeSet<PathBuf>,
    /// Paths whose lock is held (see [`Disk::lock`]).
    locks: BTreeSet<PathBuf>,
    /// The next this-many `sync_data` calls fail.
    failing_syncs: u32,
    /// After this many more successful `sync_data` calls, the next one fails.
    syncs_before_failure: Option<u32>,
    /// After a power cut: writes vanish and syncs fail, until `crash` (which models the reboot).
    powered_off: bool,
    /// Bytes passed to `write_at` of any file so far.
    bytes_written_total: u64,
}

impl SimDiskState {
    /// Whether `dir` survives a crash: it and every ancestor below the top are durable entries.
    fn survives(&self, dir: &Path) -> bool {
        match dir.parent() {
            None => true,
            Some(parent) => self.durable_directories.contains(dir) && self.survives(parent),
        }
    }

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
        let directories: BTreeSet<PathBuf> =
            state.directories.iter().filter(|dir| state.survives(dir)).cloned().collect();
        state.directories = directories;
        let names: BTreeMap<PathBuf, u64> = state
            .durable_names
            .iter()
            .filter(|(path, _)| path.parent().is_some_and(|dir| state.directories.contains(dir)))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        state.names = names.clone();
        state.durable_names = names;
        state.locks.clear(); // the processes that held them are gone
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

    /// Lets `succeeding` more `sync_data` calls succeed, then makes the next one fail.
    pub fn fail_sync_after(&self, succeeding: u32) {
        self.state.lock().syncs_before_failure = Some(succeeding);
    }

    /// Flips one bit of a file's content (durable and live alike: damage on the medium).
    pub fn flip_bit(&self, path: &Path, offset: usize, bit: u8) {
        let mut state = self.state.lock();
        let file = state.file(path).expect("flip_bit on a missing file");
        if offset >= file.data.len() {
            file.data.resize(offset + 1, 0); // a sparse part: its zeros are made real
        }
        file.data[offset] ^= 1 << (bit % 8);
        if offset < file.durable.len() {
            file.durable[offset] ^= 1 << (bit % 8);
        }
    }

    pub fn file_len(&self, path: &Path) -> Option<usize> {
        self.state.lock().file(path).ok().map(|f| f.len())
    }

    /// How far a file's written bytes reach (past this, up to its length, it is sparse).
    pub fn written_len(&self, path: &Path) -> Option<usize> {
        self.state.lock().file(path).ok().map(|f| f.data.len())
    }

    /// Bytes written to any file so far.
    pub fn bytes_written_total(&self) -> u64 {
        self.state.lock().bytes_written_total
    }

    pub fn unsynced_bytes(&self) -> usize {
        self.state.lock().contents.values().map(SimFileState::unsynced_len).sum()
    }
}

impl Disk for SimDisk {
    fn create_dir(&self, dir: &Path) -> io::Result<bool> {
        let mut state = self.state.lock();
        if let Some(parent) = dir.parent().filter(|p| p.parent().is_some()) {
            if !state.directories.contains(parent) {
                return Err(not_found(parent));
            }
        }
        Ok(state.directories.insert(dir.to_path_buf()))
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
        if !state.directories.contains(dir) && dir.parent().is_some() {
            return Err(not_found(dir));
        }
        let in_dir = |path: &PathBuf| path.parent() == Some(dir);
        state.durable_names.retain(|path, _| !in_dir(path));
        let live: Vec<(PathBuf, u64)> =
            state.names.iter().filter(|(path, _)| in_dir(path)).map(|(p, id)| (p.clone(), *id)).collect();
        state.durable_names.extend(live);
        let children: Vec<PathBuf> = state.directories.iter().filter(|path| in_dir(path)).cloned().collect();
        state.durable_directories.extend(children);
        Ok(())
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn Send + Sync>> {
        drop(self.open(path, true)?);
        if !self.state.lock().locks.insert(path.to_path_buf()) {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, format!("{} is locked", path.display())));
        }
        Ok(Box::new(SimLock { path: path.to_path_buf(), state: Arc::clone(&self.state) }))
    }

    fn open_redb(&self, path: &Path) -> io::Result<RedbFile> {
        drop(self.open(path, true)?);
        let id = *self.state.lock().names.get(path).ok_or_else(|| not_found(path))?;
        Ok(RedbFile::Sim(SimRedbFile { id, path: path.to_path_buf(), state: Arc::clone(&self.state) }))
    }
}

/// A held [`SimDisk`] lock: released when dropped (or by a crash).
struct SimLock {
    path: PathBuf,
    state: Arc<Mutex<SimDiskState>>,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.state.lock().locks.remove(&self.path);
    }
}

/// A [`SimDisk`] file as redb's storage: writes are unsynced until `sync_data`, so a crash loses or tears them
/// like any other file's.
#[derive(Debug)]
pub struct SimRedbFile {
    id: u64,
    path: PathBuf,
    state: Arc<Mutex<SimDiskState>>,
}

impl SimRedbFile {
    fn file(&self) -> SimFile {
        SimFile { id: self.id, path: self.path.clone(), state: Arc::clone(&self.state) }
    }
}

impl redb::StorageBackend for SimRedbFile {
    fn len(&self) -> io::Result<u64> {
        self.file().len_bytes()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file().read_exact_at(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut file = self.file();
        let current = file.len_bytes()?;
        if len <= current {
            return file.truncate(len);
        }
        // Growing writes zeros, unsynced like any write.
        file.write_at(current, &vec![0; (len - current) as usize])
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file().sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file().write_at(offset, data)
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
        self.with_file(|f| f.len() as u64)
    }

    fn read_exact_at(&self, offset: u64, buffer: &mut [u8]) -> io::Result<()> {
        self.with_file(|f| {
            let start = offset as usize;
            let end = start + buffer.len();
            if end > f.len() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read beyond the end of the file"));
            }
            // What was written, then the zeros of the sparse rest.
            let written = f.data.len().clamp(start, end) - start;
            if written > 0 {
                buffer[..written].copy_from_slice(&f.data[start..start + written]);
            }
            buffer[written..].fill(0);
            Ok(())
        })?
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        {
            let mut state = self.state.lock();
            if state.powered_off {
                return Ok(());
            }
            state.bytes_written_total += data.len() as u64;
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
        match state.syncs_before_failure {
            Some(0) => {
                state.syncs_before_failure = None;
                return Err(io::Error::other("injected fsync failure"));
            }
            Some(left) => state.syncs_before_failure = Some(left - 1),
            None => {}
        }
        let file = state.contents.get_mut(&self.id).ok_or_else(|| not_found(&self.path))?;
        for (offset, bytes) in std::mem::take(&mut file.unsynced) {
            write_into(&mut file.durable, offset, &bytes);
        }
        file.durable.truncate(file.data.len());
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        // Modelled as durable at once (the WAL syncs right after setting a length). Extending is sparse.
        self.with_file(|f| {
            let len = len as usize;
            f.len_set = len;
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
    fn directories_are_durable_only_once_their_parent_is_synced() {
        let disk = SimDisk::new();
        let (top, nested) = (Path::new("/db"), Path::new("/db/wal"));
        disk.create_dir(top).unwrap();
        disk.create_dir(nested).unwrap();
        assert!(matches!(disk.create_dir(Path::new("/none/x")), Err(e) if e.kind() == io::ErrorKind::NotFound));
        let mut file = disk.open(&nested.join("a"), true).unwrap();
        file.append(b"data").unwrap();
        file.sync_data().unwrap();
        disk.sync_dir(nested).unwrap();
        // The file and its name are durable, but not the directories holding it: a crash takes all of it.
        disk.crash(|_, _| 0);
        assert!(disk.list(top).is_err() && disk.list(nested).is_err());
        assert!(disk.open(&nested.join("a"), false).is_err());
        // `create_dir_all` syncs each parent it adds an entry to.
        disk.create_dir_all(nested).unwrap();
        let mut file = disk.open(&nested.join("a"), true).unwrap();
        file.append(b"data").unwrap();
        file.sync_data().unwrap();
        disk.sync_dir(nested).unwrap();
        disk.crash(|_, _| 0);
        assert_eq!(disk.list(nested).unwrap(), vec![nested.join("a")]);
        assert_eq!(disk.file_len(&nested.join("a")), Some(4));
    }

    #[test]
    fn a_lock_is_exclusive_until_dropped_or_a_crash() {
        let disk = SimDisk::new();
        disk.create_dir_all(Path::new("/db")).unwrap();
        let path = Path::new("/db/LOCK");
        let held = disk.lock(path).unwrap();
        assert_eq!(disk.lock(path).err().map(|e| e.kind()), Some(io::ErrorKind::WouldBlock));
        drop(held);
        let _held = disk.lock(path).unwrap();
        disk.crash(|_, _| 0);
        disk.lock(path).unwrap();
    }

    #[test]
    fn a_redb_file_on_the_sim_disk_loses_unsynced_writes_in_a_crash() {
        use redb::StorageBackend;
        let disk = SimDisk::new();
        disk.create_dir_all(Path::new("/db")).unwrap();
        let path = Path::new("/db/state.redb");
        let RedbFile::Sim(file) = disk.open_redb(path).unwrap() else { panic!("a simulated file") };
        disk.sync_dir(Path::new("/db")).unwrap();
        file.write(0, b"synced").unwrap();
        file.sync_data().unwrap();
        file.set_len(64).unwrap();
        file.write(6, b" not synced").unwrap();
        disk.crash(|_, _| 0);
        let RedbFile::Sim(file) = disk.open_redb(path).unwrap() else { panic!("a simulated file") };
        assert_eq!(file.len().unwrap(), 6);
        let mut read = [0; 6];
        file.read(0, &mut read).unwrap();
        assert_eq!(&read, b"synced");
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
