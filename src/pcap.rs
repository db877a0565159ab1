//! Capture of every frame to and from the guest in libpcap format
//! (LINKTYPE_ETHERNET, microsecond timestamps), for tcpdump and tshark.
//!
//! The engines hand each frame to the [`Tap`]: one relaxed load when no
//! capture runs; a copy into a bounded queue when one does (a full queue
//! drops the frame and counts it: capture never slows the guest). A
//! writer thread of the capture's own writes the files: a ring of
//! `files` files (NAME, NAME.1, ...), each begun with the pcap header and
//! ended before it would pass `max_bytes`, the oldest overwritten. The
//! writer flushes whenever the queue runs dry, so a file can be read while
//! the capture runs.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Frames captured but not yet written, at most.
const QUEUE_FRAMES: usize = 8192;
/// Bytes captured but not yet written, at most.
const QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// The largest frame recorded whole (a 64 KiB segment and its header).
pub const SNAPLEN: u32 = 262_144;
const GLOBAL_HEADER: usize = 24;
const RECORD_HEADER: usize = 16;

/// One capture's numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// The first file of the ring.
    pub file: Option<PathBuf>,
    /// Frames written.
    pub frames: u64,
    /// Frames dropped because the writer fell behind.
    pub dropped: u64,
    /// Files begun (the ring wraps after `files`).
    pub files_begun: u64,
}

struct Running {
    queue: SyncSender<(SystemTime, Vec<u8>)>,
    writer: std::thread::JoinHandle<io::Result<()>>,
    file: PathBuf,
}

/// Counters shared with the writer thread.
#[derive(Default)]
struct Counts {
    frames: AtomicU64,
    dropped: AtomicU64,
    files_begun: AtomicU64,
    queued_bytes: AtomicUsize,
}

/// Where frames are captured while a capture runs.
#[derive(Default)]
pub struct Tap {
    on: AtomicBool,
    running: Mutex<Option<Running>>,
    counts: Arc<Counts>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The capture state is valid whatever panicked while holding it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a capture could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One runs already.
    #[error("a capture is running already (to {0})")]
    Running(PathBuf),
    /// The first file could not be created.
    #[error("cannot create {path}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The writer thread could not start.
    #[error("cannot start the capture's writer")]
    Thread(#[source] io::Error),
}

impl Tap {
    /// Records one frame, if a capture runs.
    pub fn record(&self, frame: &[u8]) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        let running = lock(&self.running);
        let Some(running) = running.as_ref() else {
            return;
        };
        let counts = &self.counts;
        if counts.queued_bytes.load(Ordering::Relaxed) + frame.len() > QUEUE_BYTES {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        counts
            .queued_bytes
            .fetch_add(frame.len(), Ordering::Relaxed);
        if running
            .queue
            .try_send((SystemTime::now(), frame.to_vec()))
            .is_err()
        {
            counts
                .queued_bytes
                .fetch_sub(frame.len(), Ordering::Relaxed);
            counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts capturing into the ring that begins at `path`.
    pub fn start(&self, path: &Path, max_bytes: u64, files: u32) -> Result<(), Error> {
        let mut running = lock(&self.running);
        if let Some(r) = running.as_ref() {
            return Err(Error::Running(r.file.clone()));
        }
        let first = begin(path).map_err(|source| Error::Create {
            path: path.to_owned(),
            source,
        })?;
        // Each capture counts from zero (none is being recorded now: the
        // lock is held and the last writer has ended).
        let counts = self.counts.clone();
        counts.frames.store(0, Ordering::Relaxed);
        counts.dropped.store(0, Ordering::Relaxed);
        counts.queued_bytes.store(0, Ordering::Relaxed);
        counts.files_begun.store(1, Ordering::Relaxed);
        let (queue, frames) = sync_channel(QUEUE_FRAMES);
        let ring = Ring {
            path: path.to_owned(),
            max_bytes,
            files: files.max(1),
            index: 0,
            out: first,
            written: GLOBAL_HEADER as u64,
        };
        let writer_counts = counts;
        let writer = std::thread::Builder::new()
            .name("vg-pcap".into())
            .spawn(move || write_all(ring, &frames, &writer_counts))
            .map_err(Error::Thread)?;
        *running = Some(Running {
            queue,
            writer,
            file: path.to_owned(),
        });
        self.on.store(true, Ordering::Relaxed);
        tracing::info!(file = %path.display(), max_bytes, files, "capture started");
        Ok(())
    }

    /// Stops the capture, once everything queued is written; its numbers.
    /// None when none ran.
    pub fn stop(&self) -> Option<Stats> {
        let running = lock(&self.running).take()?;
        self.on.store(false, Ordering::Relaxed);
        drop(running.queue);
        if let Ok(Err(e)) | Err(e) = running
            .writer
            .join()
            .map_err(|_| io::Error::other("the writer panicked"))
        {
            tracing::warn!(error = %e, "the capture ended with an error");
        }
        let stats = self.stats_of(Some(running.file));
        tracing::info!(?stats, "capture stopped");
        Some(stats)
    }

    /// The running capture's numbers (file None when none runs).
    pub fn stats(&self) -> Stats {
        let file = lock(&self.running).as_ref().map(|r| r.file.clone());
        self.stats_of(file)
    }

    fn stats_of(&self, file: Option<PathBuf>) -> Stats {
        let c = &self.counts;
        Stats {
            file,
            frames: c.frames.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            files_begun: c.files_begun.load(Ordering::Relaxed),
        }
    }
}

/// The files a capture writes.
struct Ring {
    path: PathBuf,
    max_bytes: u64,
    files: u32,
    index: u32,
    out: BufWriter<File>,
    written: u64,
}

impl Ring {
    fn name(&self, index: u32) -> PathBuf {
        if index == 0 {
            return self.path.clone();
        }
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{index}"));
        PathBuf::from(name)
    }

    fn write(&mut self, at: SystemTime, frame: &[u8], counts: &Counts) -> io::Result<()> {
        let kept = frame.len().min(SNAPLEN as usize);
        let size = (RECORD_HEADER + kept) as u64;
        if self.written + size > self.max_bytes && self.written > GLOBAL_HEADER as u64 {
            self.out.flush()?;
            self.index = (self.index + 1) % self.files;
            self.out = begin(&self.name(self.index))?;
            self.written = GLOBAL_HEADER as u64;
            counts.files_begun.fetch_add(1, Ordering::Relaxed);
        }
        let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        let seconds = u32::try_from(since.as_secs()).unwrap_or(u32::MAX);
        let mut header = [0u8; RECORD_HEADER];
        header[..4].copy_from_slice(&seconds.to_le_bytes());
        header[4..8].copy_from_slice(&since.subsec_micros().to_le_bytes());
        let kept_len = u32::try_from(kept).unwrap_or(SNAPLEN);
        header[8..12].copy_from_slice(&kept_len.to_le_bytes());
        let original = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        header[12..16].copy_from_slice(&original.to_le_bytes());
        self.out.write_all(&header)?;
        self.out.write_all(frame.get(..kept).unwrap_or_default())?;
        self.written += size;
        Ok(())
    }
}

/// Creates (or truncates) a capture file and writes the pcap header.
fn begin(path: &Path) -> io::Result<BufWriter<File>> {
    let mut out = BufWriter::with_capacity(256 * 1024, File::create(path)?);
    let mut header = [0u8; GLOBAL_HEADER];
    header[..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    header[4..6].copy_from_slice(&2u16.to_le_bytes());
    header[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone and sigfigs stay 0.
    header[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
    header[20..24].copy_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
    out.write_all(&header)?;
    out.flush()?;
    Ok(out)
}

/// The writer thread: until the queue closes.
fn write_all(
    mut ring: Ring,
    frames: &Receiver<(SystemTime, Vec<u8>)>,
    counts: &Counts,
) -> io::Result<()> {
    loop {
        let (at, frame) = match frames.try_recv() {
            Ok(next) => next,
            Err(TryRecvError::Empty) => {
                ring.out.flush()?;
                match frames.recv() {
                    Ok(next) => next,
                    Err(_) => return ring.out.flush(),
                }
            }
            Err(TryRecvError::Disconnected) => return ring.out.flush(),
        };
        counts
            .queued_bytes
            .fetch_sub(frame.len(), Ordering::Relaxed);
        ring.write(at, &frame, counts)?;
        counts.frames.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The records of a pcap file: (captured length, original length).
    fn records(path: &Path) -> Vec<(u32, u32)> {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(bytes[..4], 0xa1b2_c3d4u32.to_le_bytes());
        assert_eq!(bytes[20..24], 1u32.to_le_bytes());
        let mut at = GLOBAL_HEADER;
        let mut out = Vec::new();
        while at < bytes.len() {
            let field =
                |i: usize| u32::from_le_bytes(bytes[at + i..at + i + 4].try_into().unwrap());
            let (kept, original) = (field(8), field(12));
            out.push((kept, original));
            at += RECORD_HEADER + kept as usize;
        }
        assert_eq!(at, bytes.len(), "a record runs past the end");
        out
    }

    #[test]
    fn frames_go_into_a_ring_of_files_within_the_limit() {
        let dir = std::env::temp_dir().join(format!("vg-pcap-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cap.pcap");
        let tap = Tap::default();
        tap.record(&[1; 60]); // no capture yet: nothing
        tap.start(&path, 4096, 3).unwrap();
        assert!(matches!(tap.start(&path, 4096, 3), Err(Error::Running(_))));
        for i in 0..100u8 {
            tap.record(&[i; 100]);
        }
        let stats = tap.stop().unwrap();
        assert_eq!(stats.frames, 100);
        assert_eq!(stats.dropped, 0);
        // 116 bytes a record, 35 records a file: 3 files, the ring full
        // and not yet wrapped.
        assert_eq!(stats.files_begun, 3);
        let mut total = 0;
        for name in ["cap.pcap", "cap.pcap.1", "cap.pcap.2"] {
            let file = dir.join(name);
            assert!(std::fs::metadata(&file).unwrap().len() <= 4096);
            let recs = records(&file);
            assert!(recs.iter().all(|&r| r == (100, 100)));
            total += recs.len();
        }
        assert_eq!(total, 100);
        assert!(!dir.join("cap.pcap.3").exists());
        assert!(tap.stop().is_none());
        // A frame over the snap length keeps its original length.
        tap.start(&path, 1 << 20, 1).unwrap();
        tap.record(&vec![0; SNAPLEN as usize + 10]);
        tap.stop().unwrap();
        assert_eq!(records(&path), [(SNAPLEN, SNAPLEN + 10)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
