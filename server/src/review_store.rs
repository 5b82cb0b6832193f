//! The TokenReview cache's file (`--token-review-cache-file`): kube-apiserver's answers about
//! agents' tokens, kept across a restart, so a restarted server lets its agents straight back
//! in instead of asking kube-apiserver again for each at `--kubeconfig-qps`.
//!
//! The file holds SHA-256 digests of tokens, never tokens, each with whom kube-apiserver said
//! it belongs to and until when that answer may be reused. Whoever can write it can make the
//! server take a token of their own for any node's agent, so it must be readable and writable
//! by its owner alone; it is written whole to a temporary file and renamed over the old one, so
//! a crash leaves the previous version.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Format of the file; another version is ignored (and replaced at the next save).
const VERSION: u32 = 1;

/// One remembered answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remembered {
    /// SHA-256 of the token.
    pub digest: Vec<u8>,
    pub user: String,
    pub node: Option<String>,
    pub pod: Option<String>,
    /// Reused until then, and not after.
    pub until: SystemTime,
}

/// Which answers a file's entries are: reviews for another audience, or of a token checked
/// against another service account, say nothing about this server's question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub account: String,
    pub audience: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is open to others (mode {mode:o}); it lets whoever writes it pass a token off as any agent's: chmod 600"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{path} is not a TokenReview cache file tether wrote: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    account: String,
    audience: String,
    entries: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    /// Hex.
    digest: String,
    user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    /// Seconds since the Unix epoch.
    until: u64,
}

/// Refuses a file others may read or write. A file that does not exist yet is fine: the
/// server creates it, for its owner alone.
pub fn check(path: &Path) -> Result<(), StoreError> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(StoreError::Exposed {
                    path: path.to_owned(),
                    mode,
                });
            }
            Ok(())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// What the file remembers for `question` and has not expired at `now`, each kept no later
/// than `now + longest` (the server's `--token-review-cache-ttl`, which may have shrunk since
/// the file was written). Also returns how many entries were dropped as expired or as
/// answers to another question. No file yet: nothing.
pub fn load(
    path: &Path,
    question: &Question,
    now: SystemTime,
    longest: Duration,
) -> Result<(Vec<Remembered>, usize), StoreError> {
    check(path)?;
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let file: File = serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
        path: path.to_owned(),
        source,
    })?;
    let total = file.entries.len();
    if file.version != VERSION
        || file.account != question.account
        || file.audience != question.audience
    {
        return Ok((Vec::new(), total));
    }
    // A TTL too long to add to a wall-clock time caps nothing.
    let cap = now.checked_add(longest);
    let kept: Vec<Remembered> = file
        .entries
        .into_iter()
        .filter_map(|entry| {
            let written = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(entry.until))?;
            let until = cap.map_or(written, |cap| written.min(cap));
            (until > now).then_some(())?;
            Some(Remembered {
                digest: hex_decode(&entry.digest)?,
                user: entry.user,
                node: entry.node,
                pod: entry.pod,
                until,
            })
        })
        .collect();
    let dropped = total - kept.len();
    Ok((kept, dropped))
}

/// Replaces the file with `entries`, for its owner alone.
pub fn save(path: &Path, question: &Question, entries: &[Remembered]) -> Result<(), StoreError> {
    let file = File {
        version: VERSION,
        account: question.account.clone(),
        audience: question.audience.clone(),
        entries: entries
            .iter()
            .map(|r| Entry {
                digest: hex_encode(&r.digest),
                user: r.user.clone(),
                node: r.node.clone(),
                pod: r.pod.clone(),
                // Rounded down: a restart may shorten an answer's life, never lengthen it.
                until: r
                    .until
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            })
            .collect(),
    };
    let failed = |source| StoreError::Write {
        path: path.to_owned(),
        source,
    };
    let bytes = serde_json::to_vec(&file).map_err(|e| failed(e.into()))?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(failed)?;
    out.write_all(&bytes).map_err(failed)?;
    out.sync_data().map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn question() -> Question {
        Question {
            account: "system:serviceaccount:kube-system:konnectivity-agent".into(),
            audience: "system:konnectivity-server".into(),
        }
    }

    fn remembered(byte: u8, until: SystemTime) -> Remembered {
        Remembered {
            digest: vec![byte; 32],
            user: "system:serviceaccount:kube-system:konnectivity-agent".into(),
            node: Some(format!("node-{byte}")),
            pod: None,
            until,
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn answers_come_back_until_they_expire_and_never_past_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reviews.json");
        let now = at(1_000_000);
        save(
            &path,
            &question(),
            &[
                remembered(1, at(1_000_600)),
                remembered(2, at(1_000_010)),
                remembered(3, at(999_999)),
            ],
        )
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("token"), "{text}");

        let (kept, dropped) = load(&path, &question(), now, Duration::from_secs(60)).unwrap();
        assert_eq!(dropped, 1);
        assert_eq!(
            kept,
            [remembered(1, at(1_000_060)), remembered(2, at(1_000_010))]
        );
    }

    #[test]
    fn answers_to_another_question_are_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reviews.json");
        save(&path, &question(), &[remembered(1, at(2_000_000))]).unwrap();
        for other in [
            Question {
                account: "system:serviceaccount:kube-system:default".into(),
                ..question()
            },
            Question {
                audience: "https://kubernetes.default.svc".into(),
                ..question()
            },
        ] {
            let (kept, dropped) = load(&path, &other, at(1_000_000), Duration::MAX).unwrap();
            assert!(kept.is_empty());
            assert_eq!(dropped, 1);
        }
    }

    #[test]
    fn a_file_others_can_open_or_tether_did_not_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reviews.json");
        assert!(matches!(check(&path), Ok(())));
        assert!(
            load(&path, &question(), at(0), Duration::ZERO)
                .unwrap()
                .0
                .is_empty()
        );
        std::fs::write(&path, "{\"not\": \"ours\"}").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            check(&path),
            Err(StoreError::Exposed { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load(&path, &question(), at(0), Duration::ZERO),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
