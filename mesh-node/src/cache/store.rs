//! Where objects are kept: a memory tier with a byte budget and TinyLFU admission and
//! eviction (the `moka` crate), and an optional disk tier with its own budget that
//! survives a restart.
//!
//! Both tiers map a cache key to its variants (one per distinct `Vary` selection, a few at
//! most). The disk tier keeps one file per variant — a length-prefixed header (key,
//! policy, head, timings, tags), then the body — and its index in memory; at start it
//! reads the headers back, and a file it cannot read is deleted. Files leave when their
//! entry is evicted, replaced or purged.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use moka::notification::RemovalCause;
use moka::sync::Cache;
use serde::{Deserialize, Serialize};

use super::object::{Body, Head, Object};

/// A key's variants.
pub type Variants = Arc<Vec<Arc<Object>>>;

/// Counts for metrics and `/status`.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct TierStats {
    /// Objects held.
    pub objects: u64,
    /// Bytes held (the budget's unit).
    pub bytes: u64,
    /// Budget.
    pub budget_bytes: u64,
}

fn weigh(variants: &Variants) -> u32 {
    variants
        .iter()
        .map(|o| o.weight())
        .fold(0u32, u32::saturating_add)
}

/// Publishes a tier's size as the `skylane_cache_bytes{tier}` gauge.
fn publish_bytes(tier: &'static str, bytes: u64) {
    metrics::gauge!("skylane_cache_bytes", "tier" => tier).set(bytes as f64);
}

/// The memory tier.
pub struct Memory {
    cache: Cache<String, Variants>,
    budget: u64,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("objects", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl Memory {
    /// A tier of `budget` bytes.
    pub fn new(budget: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(budget)
            .weigher(|_k: &String, v: &Variants| weigh(v))
            .eviction_listener(|_k, _v, cause| {
                if cause == RemovalCause::Size {
                    metrics::counter!("skylane_cache_evictions_total", "tier" => "memory")
                        .increment(1);
                }
            })
            .build();
        Self { cache, budget }
    }

    /// The variants of `key`.
    pub fn get(&self, key: &str) -> Option<Variants> {
        self.cache.get(key)
    }

    /// Stores `variants` under `key`.
    pub fn put(&self, key: String, variants: Variants) {
        self.cache.insert(key, variants);
        publish_bytes("memory", self.cache.weighted_size());
    }

    /// Removes the entries `doomed` picks; returns how many objects went.
    pub fn remove_where(&self, doomed: impl Fn(&str, &Object) -> bool) -> u64 {
        let mut removed = 0;
        for (key, variants) in self.cache.iter() {
            let keep: Vec<Arc<Object>> = variants
                .iter()
                .filter(|o| !doomed(&key, o))
                .cloned()
                .collect();
            let gone = variants.len() - keep.len();
            if gone == 0 {
                continue;
            }
            removed += gone as u64;
            if keep.is_empty() {
                self.cache.invalidate(key.as_str());
            } else {
                self.cache.insert((*key).clone(), Arc::new(keep));
            }
        }
        removed
    }

    /// Counts.
    pub fn stats(&self) -> TierStats {
        self.cache.run_pending_tasks();
        publish_bytes("memory", self.cache.weighted_size());
        TierStats {
            objects: self.cache.iter().map(|(_, v)| v.len() as u64).sum(),
            bytes: self.cache.weighted_size(),
            budget_bytes: self.budget,
        }
    }
}

/// What a disk file's header holds.
#[derive(Serialize, Deserialize)]
struct DiskHeader {
    magic: u32,
    key: String,
    policy: http_cache_semantics::CachePolicy,
    status: u16,
    #[serde(with = "http_serde::header_map")]
    headers: http::HeaderMap,
    len: u64,
    stored_unix_ms: u64,
    fresh_until_unix_ms: u64,
    stale_while_revalidate_ms: u64,
    stale_if_error_ms: u64,
    tags: Vec<String>,
    browser_ttl_s: Option<u64>,
    variant: String,
}

/// Marks a Skylane cache file (and its format version).
const MAGIC: u32 = 0x534b_4301;
/// The longest header read back (a head with large cookies fits).
const MAX_HEADER: u64 = 1 << 20;

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// The disk tier.
pub struct Disk {
    dir: PathBuf,
    index: Cache<String, Variants>,
    budget: u64,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Deletes the files of the disk objects in `variants`: on a blocking thread when called on
/// the runtime (purging many objects would otherwise stall every connection of a node on
/// its single thread), else right here. File names are random, so a deletion that runs
/// late never hits the file of an object stored since.
fn delete_files(variants: &Variants) {
    let paths: Vec<std::path::PathBuf> = variants
        .iter()
        .filter_map(|o| match &o.body {
            Body::Disk { path, .. } => Some(path.clone()),
            Body::Memory(_) => None,
        })
        .collect();
    if paths.is_empty() {
        return;
    }
    let delete = move || {
        for path in &paths {
            let _ = std::fs::remove_file(path);
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(delete)),
        Err(_) => delete(),
    }
}

impl Disk {
    /// Opens (creating) the tier in `dir` with `budget` bytes, loading what is there.
    pub fn open(dir: &Path, budget: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let index = Cache::builder()
            .max_capacity(budget)
            .weigher(|_k: &String, v: &Variants| weigh(v))
            .eviction_listener(|_k, v: Variants, cause| {
                // A replaced entry's files are handled by whoever replaced it.
                if cause != RemovalCause::Replaced {
                    delete_files(&v);
                }
                if cause == RemovalCause::Size {
                    metrics::counter!("skylane_cache_evictions_total", "tier" => "disk")
                        .increment(1);
                }
            })
            .build();
        let disk = Self {
            dir: dir.to_owned(),
            index,
            budget,
        };
        disk.load()?;
        Ok(disk)
    }

    fn load(&self) -> std::io::Result<()> {
        let mut loaded = 0u64;
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "obj") {
                if path.extension().is_some_and(|e| e == "tmp") {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            match read_header(&path) {
                Ok(obj) => {
                    let obj = Arc::new(obj);
                    let mut variants: Vec<Arc<Object>> = self
                        .index
                        .get(&obj.key)
                        .map(|v| (*v).clone())
                        .unwrap_or_default();
                    variants.push(obj.clone());
                    self.index.insert(obj.key.clone(), Arc::new(variants));
                    loaded += 1;
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "unreadable cache file removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        tracing::info!(dir = %self.dir.display(), objects = loaded, "disk cache loaded");
        Ok(())
    }

    /// The variants of `key`.
    pub fn get(&self, key: &str) -> Option<Variants> {
        self.index.get(key)
    }

    /// Writes `obj` (its body in memory) to a file, replacing the variant it stands for;
    /// returns the disk object. Blocking: call it off the async threads.
    pub fn put(
        &self,
        obj: &Object,
        same_variant: impl Fn(&Object) -> bool,
    ) -> std::io::Result<Arc<Object>> {
        let Body::Memory(chunks) = &obj.body else {
            return Err(std::io::Error::other(
                "only objects in memory are written to disk",
            ));
        };
        let header = DiskHeader {
            magic: MAGIC,
            key: obj.key.clone(),
            policy: obj.policy.clone(),
            status: obj.head.status.as_u16(),
            headers: obj.head.headers.clone(),
            len: obj.len,
            stored_unix_ms: unix_ms(obj.stored),
            fresh_until_unix_ms: unix_ms(obj.fresh_until),
            stale_while_revalidate_ms: obj.stale_while_revalidate.as_millis() as u64,
            stale_if_error_ms: obj.stale_if_error.as_millis() as u64,
            tags: obj.tags.clone(),
            browser_ttl_s: obj.browser_ttl.map(|d| d.as_secs()),
            variant: obj.variant.clone(),
        };
        let encoded = postcard::to_stdvec(&header).map_err(std::io::Error::other)?;
        let name: [u8; 16] = rand::random();
        let path = self.dir.join(format!("{}.obj", hex(&name)));
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            f.write_all(&(encoded.len() as u64).to_be_bytes())?;
            f.write_all(&encoded)?;
            for c in chunks.iter() {
                f.write_all(c)?;
            }
            f.flush()?;
        }
        std::fs::rename(&tmp, &path)?;
        let disk_obj = Arc::new(Object {
            body: Body::Disk {
                path,
                offset: 8 + encoded.len() as u64,
            },
            ..obj.clone()
        });
        let old: Vec<Arc<Object>> = self
            .index
            .get(&obj.key)
            .map(|v| (*v).clone())
            .unwrap_or_default();
        let (replaced, mut kept): (Vec<_>, Vec<_>) = old.into_iter().partition(|o| same_variant(o));
        delete_files(&Arc::new(replaced));
        kept.push(disk_obj.clone());
        self.index.insert(obj.key.clone(), Arc::new(kept));
        publish_bytes("disk", self.index.weighted_size());
        Ok(disk_obj)
    }

    /// Removes the objects `doomed` picks (and their files); returns how many went.
    pub fn remove_where(&self, doomed: impl Fn(&str, &Object) -> bool) -> u64 {
        let mut removed = 0;
        for (key, variants) in self.index.iter() {
            let (gone, keep): (Vec<_>, Vec<_>) =
                variants.iter().cloned().partition(|o| doomed(&key, o));
            if gone.is_empty() {
                continue;
            }
            removed += gone.len() as u64;
            delete_files(&Arc::new(gone));
            if keep.is_empty() {
                self.index.invalidate(key.as_str());
            } else {
                self.index.insert((*key).clone(), Arc::new(keep));
            }
        }
        removed
    }

    /// Counts.
    pub fn stats(&self) -> TierStats {
        self.index.run_pending_tasks();
        publish_bytes("disk", self.index.weighted_size());
        TierStats {
            objects: self.index.iter().map(|(_, v)| v.len() as u64).sum(),
            bytes: self.index.weighted_size(),
            budget_bytes: self.budget,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_header(path: &Path) -> std::io::Result<Object> {
    let mut f = std::fs::File::open(path)?;
    let file_len = f.metadata()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let len = u64::from_be_bytes(len);
    if len > MAX_HEADER || 8 + len > file_len {
        return Err(std::io::Error::other("header length out of range"));
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)?;
    let h: DiskHeader = postcard::from_bytes(&buf).map_err(std::io::Error::other)?;
    if h.magic != MAGIC {
        return Err(std::io::Error::other(
            "not a Skylane cache file of this version",
        ));
    }
    if 8 + len + h.len != file_len {
        return Err(std::io::Error::other("truncated body"));
    }
    let status = http::StatusCode::from_u16(h.status).map_err(std::io::Error::other)?;
    Ok(Object {
        key: h.key,
        policy: h.policy,
        head: Head {
            status,
            headers: h.headers,
        },
        body: Body::Disk {
            path: path.to_owned(),
            offset: 8 + len,
        },
        len: h.len,
        stored: from_unix_ms(h.stored_unix_ms),
        fresh_until: from_unix_ms(h.fresh_until_unix_ms),
        stale_while_revalidate: Duration::from_millis(h.stale_while_revalidate_ms),
        stale_if_error: Duration::from_millis(h.stale_if_error_ms),
        tags: h.tags,
        browser_ttl: h.browser_ttl_s.map(Duration::from_secs),
        variant: h.variant,
    })
}
