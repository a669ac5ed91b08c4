//! Pulls a PEFT directory's two files out of an uploaded `.tar.gz` without
//! trusting anything it declares: decompressed bytes are capped while
//! reading (a gzip bomb stops at the cap), GNU long-name and PAX headers are
//! read only up to a few KiB (the tar crate would buffer any size they
//! declare), and links, unsafe paths and duplicate files are refused.

use std::cell::Cell;
use std::io::{self, Read};
use std::path::{Component, PathBuf};
use std::rc::Rc;

/// The PEFT files an adapter upload must hold.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Largest GNU long-name or PAX header read: real ones hold a path and a
/// few attributes.
pub const MAX_EXTENSION_BYTES: u64 = 8 * 1024;
/// Most entries (files, directories, extension headers) an archive may hold.
pub const MAX_ENTRIES: usize = 64;

/// Why an archive was refused; each message names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the archive unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the archive holds more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    #[error("a {kind} header declares {size} bytes; at most {MAX_EXTENSION_BYTES} are accepted")]
    ExtensionTooLarge { kind: &'static str, size: u64 },
    #[error("links are not allowed ({path})")]
    Link { path: String },
    #[error("unsafe path {path}")]
    UnsafePath { path: String },
    #[error("{file} appears more than once")]
    Duplicate { file: &'static str },
    #[error("no {file}{hint}")]
    Missing { file: &'static str, hint: &'static str },
    #[error("{WEIGHTS_FILE} is not a safetensors file: {reason}")]
    NotSafetensors { reason: String },
    #[error("not a valid .tar.gz: {0}")]
    Malformed(String),
}

/// The two files of an uploaded PEFT directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeftFiles {
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
}

/// A reader that fails once more than `limit` bytes came through, and says
/// so in `tripped` (the tar reader wraps the error it sees).
struct Capped<R> {
    inner: R,
    left: u64,
    limit: u64,
    tripped: Rc<Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // One byte more tells a stream that ends exactly at the cap from one that goes on.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.tripped.set(true);
                    Err(io::Error::other(format!("more than {} bytes", self.limit)))
                }
            };
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Reads at most `size` bytes of an entry that declared `size`.
fn read_exact_entry<R: Read>(entry: &mut R, size: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(size.min(64 << 20) as usize);
    entry.take(size).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The `path` record of a PAX extended header, if any (records are
/// `"<len> <key>=<value>\n"`).
fn pax_path(data: &[u8]) -> Option<Vec<u8>> {
    let mut rest = data;
    let mut path = None;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        if len <= space || len > rest.len() {
            return None;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(value) = record.strip_prefix(b"path=") {
            path = Some(value.to_vec());
        }
        rest = &rest[len..];
    }
    path
}

/// Checks the start of a weights file before it is read whole: the 8-byte
/// header length must be positive and fit the entry, so a file of zeros or
/// noise is refused after a few bytes rather than at the cap.
fn check_safetensors_prefix(prefix: &[u8], size: u64) -> Result<(), ArchiveError> {
    let bad = |reason: String| ArchiveError::NotSafetensors { reason };
    let Some(len) = prefix.get(..8) else {
        return Err(bad(format!("{size} bytes is too short")));
    };
    let n = u64::from_le_bytes(len.try_into().map_err(|_| bad("no header length".into()))?);
    if n == 0 || n > size - 8 {
        return Err(bad(format!("its header length {n} does not fit a {size}-byte file")));
    }
    match prefix.get(8) {
        Some(b'{') | None => Ok(()),
        Some(_) => Err(bad("its header is not a JSON object".into())),
    }
}

/// Unpacks `adapter_config.json` and `adapter_model.safetensors` from a
/// gzipped tar, reading at most `max_bytes` decompressed bytes. Files are
/// matched by name in any directory; other files are skipped unread.
pub fn unpack_peft(gz: &[u8], max_bytes: u64) -> Result<PeftFiles, ArchiveError> {
    let tripped = Rc::new(Cell::new(false));
    let reader = Capped { inner: flate2::read::GzDecoder::new(gz), left: max_bytes, limit: max_bytes, tripped: tripped.clone() };
    let mut archive = tar::Archive::new(reader);
    let io_err = |e: io::Error| {
        if tripped.get() {
            ArchiveError::TooLarge { limit: max_bytes }
        } else {
            ArchiveError::Malformed(e.to_string())
        }
    };
    let entries = archive.entries().map_err(io_err)?.raw(true);
    let (mut config, mut weights) = (None, None);
    // A GNU long name or PAX path names the entry that follows it.
    let mut long_name: Option<Vec<u8>> = None;
    for (i, entry) in entries.enumerate() {
        if i >= MAX_ENTRIES {
            return Err(ArchiveError::TooManyEntries);
        }
        let mut entry = entry.map_err(io_err)?;
        let kind = entry.header().entry_type();
        let size = entry.header().size().map_err(io_err)?;
        let extension = if kind.is_gnu_longname() {
            Some("GNU long name")
        } else if kind.is_gnu_longlink() {
            Some("GNU long link")
        } else if kind.is_pax_local_extensions() {
            Some("PAX")
        } else if kind.is_pax_global_extensions() {
            Some("PAX global")
        } else {
            None
        };
        if let Some(kind_name) = extension {
            if size > MAX_EXTENSION_BYTES {
                return Err(ArchiveError::ExtensionTooLarge { kind: kind_name, size });
            }
            let data = read_exact_entry(&mut entry, size).map_err(io_err)?;
            if kind.is_gnu_longname() {
                let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                long_name = Some(data[..end].to_vec());
            } else if kind.is_pax_local_extensions() {
                if let Some(p) = pax_path(&data) {
                    long_name = Some(p);
                }
            }
            continue;
        }
        let name_bytes = long_name.take().unwrap_or_else(|| entry.path_bytes().into_owned());
        let path = PathBuf::from(String::from_utf8_lossy(&name_bytes).into_owned());
        if kind.is_symlink() || kind.is_hard_link() {
            return Err(ArchiveError::Link { path: path.display().to_string() });
        }
        if path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir | Component::Prefix(_))) {
            return Err(ArchiveError::UnsafePath { path: path.display().to_string() });
        }
        if !kind.is_file() {
            continue;
        }
        if size > max_bytes {
            return Err(ArchiveError::TooLarge { limit: max_bytes });
        }
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let (slot, name) = match file.as_str() {
            CONFIG_FILE => (&mut config, CONFIG_FILE),
            WEIGHTS_FILE => (&mut weights, WEIGHTS_FILE),
            _ => continue,
        };
        if slot.is_some() {
            return Err(ArchiveError::Duplicate { file: name });
        }
        let data = if name == WEIGHTS_FILE {
            let mut prefix = Vec::with_capacity(9);
            (&mut entry).take(9.min(size)).read_to_end(&mut prefix).map_err(io_err)?;
            check_safetensors_prefix(&prefix, size)?;
            let mut data = Vec::with_capacity(size as usize);
            data.extend_from_slice(&prefix);
            (&mut entry).take(size - prefix.len() as u64).read_to_end(&mut data).map_err(io_err)?;
            data
        } else {
            read_exact_entry(&mut entry, size).map_err(io_err)?
        };
        if (data.len() as u64) < size {
            return Err(ArchiveError::Malformed(format!("{name} ends early")));
        }
        *slot = Some(data);
    }
    match (config, weights) {
        (Some(config), Some(weights)) => Ok(PeftFiles { config, weights }),
        (None, _) => Err(ArchiveError::Missing { file: CONFIG_FILE, hint: "" }),
        (_, None) => Err(ArchiveError::Missing { file: WEIGHTS_FILE, hint: " (pickle .bin files are not accepted)" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A tar entry's 512-byte header (ustar), checksummed.
    fn header(name: &str, size: u64, kind: u8) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        // Raw, so the tests can write names `set_path` refuses (`../x`).
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(size);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn padded(data: &[u8]) -> Vec<u8> {
        let mut v = data.to_vec();
        v.resize(data.len().div_ceil(512) * 512, 0);
        v
    }

    fn gzip(raw: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(raw).unwrap();
        gz.finish().unwrap()
    }

    fn weights() -> Vec<u8> {
        let header = br#"{"__metadata__":{}}"#;
        let mut w = (header.len() as u64).to_le_bytes().to_vec();
        w.extend_from_slice(header);
        w
    }

    fn archive(entries: &[(&str, u8, Vec<u8>)]) -> Vec<u8> {
        let mut raw = Vec::new();
        for (name, kind, data) in entries {
            raw.extend(header(name, data.len() as u64, *kind));
            raw.extend(padded(data));
        }
        raw.extend([0u8; 1024]);
        gzip(&raw)
    }

    #[test]
    fn a_peft_directory_unpacks_from_any_folder_with_long_names() {
        let long = format!("{}/{CONFIG_FILE}", "d".repeat(150));
        let mut pax = Vec::new();
        let record = format!("path=x/{WEIGHTS_FILE}\n");
        let len = record.len() + 3;
        pax.extend(format!("{len} {record}").as_bytes());
        let a = archive(&[
            ("dir", b'5', vec![]),
            ("././@LongLink", b'L', format!("{long}\0").into_bytes()),
            ("short-name", b'0', b"{}".to_vec()),
            ("PaxHeaders/x", b'x', pax),
            ("ignored", b'0', weights()),
            ("README.md", b'0', b"hello".to_vec()),
        ]);
        let files = unpack_peft(&a, 1 << 20).unwrap();
        assert_eq!(files.config, b"{}");
        assert_eq!(files.weights, weights());
    }

    #[test]
    fn extension_headers_declaring_more_than_a_few_kib_are_refused_unread() {
        for kind in [b'L', b'K', b'x', b'g'] {
            // Declares 300 MiB but carries none of it: refused on the declaration.
            let mut raw = header("bomb", 300 << 20, kind);
            raw.extend([0u8; 4096]);
            let e = unpack_peft(&gzip(&raw), 1 << 30).unwrap_err();
            assert!(matches!(e, ArchiveError::ExtensionTooLarge { size, .. } if size == 300 << 20), "{}: {e}", kind as char);
        }
    }

    #[test]
    fn decompressed_bytes_stop_at_the_cap() {
        // 64 MiB of zeros in a skipped file: a few tens of KiB gzipped.
        let mut raw = header("junk.bin", 64 << 20, b'0');
        raw.resize(raw.len() + (64 << 20), 0);
        let gz = gzip(&raw);
        assert!(gz.len() < 200 << 10);
        assert!(matches!(unpack_peft(&gz, 1 << 20), Err(ArchiveError::TooLarge { .. })));
    }

    #[test]
    fn a_weights_file_of_zeros_is_refused_at_its_first_bytes() {
        let a = archive(&[(CONFIG_FILE, b'0', b"{}".to_vec()), (WEIGHTS_FILE, b'0', vec![0u8; 1 << 20])]);
        assert!(matches!(unpack_peft(&a, 4 << 20), Err(ArchiveError::NotSafetensors { .. })));
    }

    #[test]
    fn duplicates_links_unsafe_paths_and_missing_files_are_refused_by_name() {
        let twice = archive(&[(CONFIG_FILE, b'0', b"{}".to_vec()), (&format!("b/{CONFIG_FILE}"), b'0', b"{}".to_vec())]);
        assert!(matches!(unpack_peft(&twice, 1 << 20), Err(ArchiveError::Duplicate { file: CONFIG_FILE })));
        let link = archive(&[("l", b'2', vec![])]);
        assert!(matches!(unpack_peft(&link, 1 << 20), Err(ArchiveError::Link { .. })));
        let up = archive(&[("../x", b'0', b"{}".to_vec())]);
        assert!(matches!(unpack_peft(&up, 1 << 20), Err(ArchiveError::UnsafePath { .. })));
        let none = archive(&[(CONFIG_FILE, b'0', b"{}".to_vec())]);
        assert!(unpack_peft(&none, 1 << 20).unwrap_err().to_string().contains(WEIGHTS_FILE));
        let many: Vec<(String, u8, Vec<u8>)> = (0..70).map(|i| (format!("f{i}"), b'0', vec![])).collect();
        let many: Vec<(&str, u8, Vec<u8>)> = many.iter().map(|(n, k, d)| (n.as_str(), *k, d.clone())).collect();
        assert!(matches!(unpack_peft(&archive(&many), 1 << 20), Err(ArchiveError::TooManyEntries)));
        assert!(matches!(unpack_peft(b"not gzip", 1 << 20), Err(ArchiveError::Malformed(_))));
    }
}
