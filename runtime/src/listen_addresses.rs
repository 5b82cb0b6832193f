//! `--listen-addresses-file`: where each listener ended up, for whoever started the process
//! with ports of 0 and needs to know which the kernel chose.

use std::io;
use std::path::Path;

/// Writes `addresses` (listener name, address) to `path` as one JSON object. The file appears
/// whole or not at all: it is written beside `path` and renamed into place, so a reader that
/// sees it can trust every listener in it is bound.
pub fn write(path: &Path, addresses: &[(&str, String)]) -> io::Result<()> {
    let object: serde_json::Map<String, serde_json::Value> = addresses
        .iter()
        .map(|(name, address)| ((*name).to_owned(), address.clone().into()))
        .collect();
    let mut text = serde_json::Value::Object(object).to_string();
    text.push('\n');
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_names_every_listener_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("addresses.json");
        write(
            &path,
            &[
                ("health", "127.0.0.1:43101".to_owned()),
                ("frontend", "/run/a \"quoted\" path.sock".to_owned()),
            ],
        )
        .unwrap();
        let read: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(read["health"], "127.0.0.1:43101");
        assert_eq!(read["frontend"], "/run/a \"quoted\" path.sock");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
