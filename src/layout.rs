//! What a database directory is, fixed when it is created, and who may use it.
//!
//! - `LOCK`: an exclusive lock ([`Disk::lock`], `flock(2)` on the real file system) taken before anything else in
//!   the directory is read or written, and held for the life of the `Db`. A second open — another process, or
//!   this one again — is refused with [`DbError::AlreadyOpen`] before it touches a file: two writers of one WAL
//!   overwrite each other's segments and lose acknowledged writes.
//! - `LAYOUT`: the format version, the node count and the groups the database was created with (and, from format
//!   3 on, whether it has a meta range), in text with a CRC-32C of its lines. It is written (durably: a temporary
//!   file synced, renamed, the directory synced) before any data, and every later open is checked against it, so a
//!   database created with `nodes = 3` is never opened as an empty one with `nodes = 1` — nor the reverse.
//!
//! A directory holding data but no `LAYOUT` was made by a development build before format 1 (whose state file
//! had no checksums on its run records, applied states and descriptors): it is refused, never read as empty.

use std::io;
use std::path::{Path, PathBuf};

use flotilla_engine::disk::Disk;

use crate::db::{Config, DbError};

/// The version of the directory's format that this code writes. Format 2 adds the meta range (the system's
/// keys from `0xff` on; `flotilla_raftstore::meta`); format 1 has none (every key the users'). Format 3: the logs
/// may hold entries that carry several writes (`Command::batch`, `raftstore/src/peer/propose.rs`), which builds
/// of formats 1 and 2 would apply as empty commands — losing those writes — so they must refuse the directory
/// (its state file's new blocks also carry entry checksums, `engine/src/lsm/block.rs`, which those builds would
/// take for damage); whether there is a meta range is a line of its own from format 3 on. A directory of format 1 or 2 is
/// upgraded to 3 when opened ([`open`]), before anything is written, keeping its meta range or its lack of one.
pub const FORMAT_VERSION: u64 = 3;
/// The formats this code reads.
const FORMATS_READ: [u64; 3] = [1, 2, 3];
/// The lock file's name.
pub const LOCK_FILE: &str = "LOCK";
/// The layout file's name.
pub const LAYOUT_FILE: &str = "LAYOUT";
const HEADER: &str = "flotilla database layout";

/// A database's layout, as created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub format_version: u64,
    pub nodes: u64,
    pub groups: u64,
    /// Whether the database has a meta range: its last group, over the system's keys. In formats 1 and 2 the
    /// version says it (1: no, 2: yes), and a file of theirs is written without this line.
    pub meta_range: bool,
}

/// The held directory lock (released when dropped).
pub struct DirLock {
    _guard: Box<dyn Send + Sync>,
}

fn storage(context: String) -> impl FnOnce(io::Error) -> DbError {
    move |error| DbError::Storage(format!("{context}: {error}"))
}

/// Creates `dir` (durably) and takes its lock.
pub fn lock(disk: &dyn Disk, dir: &Path) -> Result<DirLock, DbError> {
    disk.create_dir_all(dir).map_err(storage(format!("creating {}", dir.display())))?;
    let path = dir.join(LOCK_FILE);
    match disk.lock(&path) {
        Ok(guard) => Ok(DirLock { _guard: guard }),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Err(DbError::AlreadyOpen(format!(
            "{} is in use by another open database (this process or another holds {})",
            dir.display(),
            path.display()
        ))),
        Err(error) => Err(DbError::Storage(format!("locking {}: {error}", path.display()))),
    }
}

/// Takes the lock of the database holding `path` (a WAL directory: `DATA/wal`, or `DATA/node-N/wal`), for tools
/// that work on its files: the nearest ancestor with a `LAYOUT` or `LOCK` file. `None`: no database holds it.
pub fn lock_database_of(disk: &dyn Disk, path: &Path) -> Result<Option<DirLock>, DbError> {
    for dir in path.ancestors().skip(1).take(2) {
        let files = disk.list(dir).unwrap_or_default();
        if files.iter().any(|p| p.file_name().is_some_and(|n| n == LAYOUT_FILE || n == LOCK_FILE)) {
            return lock(disk, dir).map(Some);
        }
    }
    Ok(None)
}

impl Layout {
    pub fn of(config: &Config) -> Layout {
        Layout { format_version: FORMAT_VERSION, nodes: config.nodes, groups: config.groups, meta_range: true }
    }

    /// Whether the database has a meta range: its last group, over the system's keys.
    pub fn has_meta_range(&self) -> bool {
        self.meta_range
    }

    /// This layout in the format this code writes (the same database: its nodes, groups and meta range).
    pub fn upgraded(&self) -> Layout {
        Layout { format_version: FORMAT_VERSION, ..*self }
    }

    fn lines(&self) -> String {
        let mut lines =
            format!("{HEADER}\nformat {}\nnodes {}\ngroups {}\n", self.format_version, self.nodes, self.groups);
        if self.format_version >= 3 {
            lines.push_str(if self.meta_range { "meta_range yes\n" } else { "meta_range no\n" });
        }
        lines
    }

    /// The file's bytes: the lines, then a line with their checksum.
    pub fn encode(&self) -> Vec<u8> {
        let lines = self.lines();
        format!("{lines}crc32c {:08x}\n", crc32c::crc32c(lines.as_bytes())).into_bytes()
    }

    /// Parses the file's bytes; `Err` says what is wrong (damage, or a format this code does not know).
    pub fn decode(bytes: &[u8]) -> Result<Layout, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not text".to_string())?;
        let (lines, checksum_line) = text.trim_end_matches('\n').rsplit_once('\n').ok_or("too short")?;
        let lines = format!("{lines}\n");
        let stored = checksum_line
            .strip_prefix("crc32c ")
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .ok_or("no checksum line")?;
        if crc32c::crc32c(lines.as_bytes()) != stored {
            return Err("checksum mismatch".into());
        }
        let mut fields = lines.lines();
        if fields.next() != Some(HEADER) {
            return Err("not a layout file".into());
        }
        let mut field = |name: &str| -> Result<u64, String> {
            let line = fields.next().ok_or(format!("no {name} line"))?;
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|n| n.parse().ok())
                .ok_or(format!("bad {name} line {line:?}"))
        };
        let (format_version, nodes, groups) = (field("format")?, field("nodes")?, field("groups")?);
        let meta_range = match format_version {
            1 => false,
            2 => true,
            _ => match fields.next() {
                Some("meta_range yes") => true,
                Some("meta_range no") => false,
                line => return Err(format!("bad meta_range line {line:?}")),
            },
        };
        Ok(Layout { format_version, nodes, groups, meta_range })
    }

    /// Refuses a configuration that does not match this layout, saying what was expected.
    pub fn check(&self, config: &Config, dir: &Path) -> Result<(), DbError> {
        if !FORMATS_READ.contains(&self.format_version) {
            return Err(DbError::Storage(format!(
                "{} has format version {}; this build reads versions {FORMATS_READ:?}",
                dir.display(),
                self.format_version
            )));
        }
        if (self.nodes, self.groups) != (config.nodes, config.groups) {
            return Err(DbError::InvalidArgument(format!(
                "{} was created with nodes = {} and groups = {}, but is opened with nodes = {} and groups = {}: open it with \
                 the values it was created with",
                dir.display(),
                self.nodes,
                self.groups,
                config.nodes,
                config.groups
            )));
        }
        Ok(())
    }

    /// Records this layout in `dir`, durably.
    pub fn record(&self, disk: &dyn Disk, dir: &Path) -> Result<(), DbError> {
        write_durably(disk, dir, LAYOUT_FILE, &self.encode())
    }
}

/// Writes file `name` in `dir` whole or not at all, durably: a temporary file written and synced, renamed over
/// the name, the directory synced.
pub fn write_durably(disk: &dyn Disk, dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DbError> {
    let (temporary, path) = (dir.join(format!("{name}.tmp")), dir.join(name));
    let context = format!("writing {}", path.display());
    let mut file = disk.open(&temporary, true).map_err(storage(context.clone()))?;
    file.truncate(0).map_err(storage(context.clone()))?;
    file.write_at(0, bytes).map_err(storage(context.clone()))?;
    file.sync_data().map_err(storage(context.clone()))?;
    drop(file);
    disk.rename(&temporary, &path).map_err(storage(context.clone()))?;
    disk.sync_dir(dir).map_err(storage(context))
}

/// Reads `dir`'s layout and checks `config` against it (a layout of an earlier format is upgraded, durably, before
/// anything else is written); in a new database, records the configuration's.
pub fn open(disk: &dyn Disk, dir: &Path, config: &Config) -> Result<Layout, DbError> {
    let files = disk.list(dir).map_err(storage(format!("listing {}", dir.display())))?;
    let has = |name: &str| files.iter().any(|path| path.file_name().is_some_and(|n| n == name));
    if has(LAYOUT_FILE) {
        let path = dir.join(LAYOUT_FILE);
        let bytes = read_file(disk, &path, 4096)?;
        let layout =
            Layout::decode(&bytes).map_err(|why| DbError::Storage(format!("{} is damaged: {why}", path.display())))?;
        layout.check(config, dir)?;
        if layout.format_version == FORMAT_VERSION {
            return Ok(layout);
        }
        let upgraded = layout.upgraded();
        upgraded.record(disk, dir)?;
        return Ok(upgraded);
    }
    let data = has("state.redb") || disk.list(&dir.join("wal")).is_ok() || disk.list(&node_dir(dir, 1)).is_ok();
    if data {
        return Err(DbError::Storage(format!(
            "{} holds a database without a {LAYOUT_FILE} file, made by a development build before format 1: \
             this build cannot read it (move it away, or delete it)",
            dir.display()
        )));
    }
    let layout = Layout::of(config);
    layout.record(disk, dir)?;
    Ok(layout)
}

/// Whether `dir` holds nothing but its lock (a new directory).
pub fn is_empty(disk: &dyn Disk, dir: &Path) -> Result<bool, DbError> {
    let files = disk.list(dir).map_err(storage(format!("listing {}", dir.display())))?;
    Ok(files.iter().all(|path| path.file_name().is_some_and(|name| name == LOCK_FILE)))
}

/// Where node `id` of a database of more than one node lives.
pub fn node_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node-{id}"))
}

/// A small file's bytes (more than `bytes_max`: damaged).
pub fn read_file(disk: &dyn Disk, path: &Path, bytes_max: u64) -> Result<Vec<u8>, DbError> {
    let context = format!("reading {}", path.display());
    let file = disk.open(path, false).map_err(storage(context.clone()))?;
    let len = file.len_bytes().map_err(storage(context.clone()))?;
    if len > bytes_max {
        return Err(DbError::Storage(format!("{} is damaged: {len} bytes", path.display())));
    }
    let mut bytes = vec![0; len as usize];
    file.read_exact_at(0, &mut bytes).map_err(storage(context))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_engine::disk::SimDisk;

    #[test]
    fn a_layout_round_trips_and_damage_is_refused() {
        for meta_range in [true, false] {
            let layout = Layout { format_version: FORMAT_VERSION, nodes: 3, groups: 64, meta_range };
            assert_eq!(Layout::decode(&layout.encode()), Ok(layout));
        }
        let layout = Layout { format_version: FORMAT_VERSION, nodes: 3, groups: 64, meta_range: false };
        let bytes = layout.encode();
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x04;
            assert!(Layout::decode(&damaged).is_err(), "a flipped bit at {at} went unnoticed");
        }
        assert!(Layout::decode(&bytes[..bytes.len() / 2]).is_err());
        assert!(Layout::decode(b"").is_err());
    }

    #[test]
    fn earlier_formats_are_read_and_upgraded_before_anything_is_written_and_later_ones_refused() {
        let disk = SimDisk::new();
        let config = Config { groups: 4, ..Config::default() };
        for (version, meta_range) in [(1, false), (2, true)] {
            let dir = PathBuf::from(format!("/db-{version}"));
            disk.create_dir_all(&dir).unwrap();
            // As the build of that format wrote it: four lines and the checksum.
            let old = Layout { format_version: version, nodes: 1, groups: 4, meta_range };
            assert_eq!(old.encode().iter().filter(|&&b| b == b'\n').count(), 5);
            old.record(&disk, &dir).unwrap();
            let opened = open(&disk, &dir, &config).unwrap();
            assert_eq!(opened, Layout { format_version: FORMAT_VERSION, nodes: 1, groups: 4, meta_range });
            let stored = Layout::decode(&read_file(&disk, &dir.join(LAYOUT_FILE), 4096).unwrap()).unwrap();
            assert_eq!(stored, opened, "format {version}: the upgrade is not recorded");
            assert_eq!(open(&disk, &dir, &config).unwrap(), opened);
        }
        // As a build of format 2 saw a format-3 file: a version it does not read, refused.
        let dir = PathBuf::from("/db-later");
        disk.create_dir_all(&dir).unwrap();
        let later = FORMAT_VERSION + 1;
        Layout { format_version: later, nodes: 1, groups: 4, meta_range: true }.record(&disk, &dir).unwrap();
        let refused = open(&disk, &dir, &config).unwrap_err();
        assert!(refused.to_string().contains(&format!("format version {later}")), "{refused}");
        // A format-3 file must say whether it has a meta range.
        let lines = format!("{HEADER}\nformat 3\nnodes 1\ngroups 4\n");
        let file = format!("{lines}crc32c {:08x}\n", crc32c::crc32c(lines.as_bytes()));
        assert!(Layout::decode(file.as_bytes()).is_err());
    }

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let disk = SimDisk::new();
        let dir = Path::new("/db");
        let held = lock(&disk, dir).unwrap();
        assert!(matches!(lock(&disk, dir), Err(DbError::AlreadyOpen(_))));
        drop(held);
        lock(&disk, dir).unwrap();
    }

    #[test]
    fn std_disk_locks_are_exclusive_within_a_process_too() {
        let dir = tempfile::tempdir().unwrap();
        let disk = flotilla_engine::disk::StdDisk;
        let held = lock(&disk, dir.path()).unwrap();
        assert!(matches!(lock(&disk, dir.path()), Err(DbError::AlreadyOpen(_))));
        drop(held);
        lock(&disk, dir.path()).unwrap();
    }
}
