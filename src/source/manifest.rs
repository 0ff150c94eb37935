//! Kubernetes YAML manifests: files or directories of `*.yaml`/`*.yml`, multi-document, with
//! `kind: List` unpacked. Unknown kinds are skipped with a warning.
//!
//! Parsed with `serde-saphyr` (maintained, panic-free, no `unsafe`; `serde_yaml` is deprecated)
//! into a generic tree (`serde_json::Value`), then each object into its Kubernetes type with
//! `serde_path_to_error`, so errors name the file, document, object and field. Documents are
//! cut apart at their `---` lines (which YAML forbids inside content) and parsed on all cores.
//! [`ManifestCache`] keeps each file's objects until the file changes (size, modification time
//! or inode), so `--watch` and the agent's periodic passes re-parse only the files that changed.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{InputError, InputErrors, Objects, Origin};

/// The files a `--manifests` argument names, in a stable order.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, InputError> {
    let err = |message: String| InputError {
        origin: path.display().to_string(),
        object: "manifests".into(),
        field: "path".into(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| err(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every manifest under `paths`.
pub fn load(paths: &[PathBuf]) -> Result<Objects, InputErrors> {
    ManifestCache::default().load_owned(paths)
}

/// What one file held: its objects and the problems found in it.
#[derive(Debug, Default)]
struct Parsed {
    objects: Objects,
    errors: Vec<InputError>,
}

/// How much manifest text is read before it is parsed (and dropped); the rest waits.
const TEXT_BYTES_PER_PASS: usize = 4 << 20;

/// When a file was last read: size, modification time, inode.
type Stamp = (u64, Option<std::time::SystemTime>, u64);

fn stamp(file: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(file).ok()?;
    Some((m.len(), m.modified().ok(), m.ino()))
}

/// Each manifest file's objects, kept until the file changes.
#[derive(Debug, Default)]
pub struct ManifestCache {
    files: BTreeMap<PathBuf, (Stamp, Arc<Parsed>)>,
}

impl ManifestCache {
    /// Every manifest under `paths`, re-reading only the files that changed since the last call.
    pub fn load(&mut self, paths: &[PathBuf]) -> Result<Objects, InputErrors> {
        let parsed = self.refresh(paths)?;
        let mut objects = Objects::default();
        for p in &parsed {
            objects.reserve_for(&p.objects);
        }
        let mut errors = Vec::new();
        for p in &parsed {
            objects.extend_from(&p.objects);
            errors.extend(p.errors.iter().cloned());
        }
        if errors.is_empty() { Ok(objects) } else { Err(InputErrors(errors)) }
    }

    /// Like [`ManifestCache::load`] on an empty cache, without keeping (or copying) anything.
    fn load_owned(mut self, paths: &[PathBuf]) -> Result<Objects, InputErrors> {
        let parsed = self.refresh(paths)?;
        self.files.clear();
        let mut objects = Objects::default();
        for p in &parsed {
            objects.reserve_for(&p.objects);
        }
        let mut errors = Vec::new();
        for p in parsed {
            let p =
                Arc::try_unwrap(p).unwrap_or_else(|p| Parsed { objects: p.objects.clone(), errors: p.errors.clone() });
            objects.append(p.objects);
            errors.extend(p.errors);
        }
        if errors.is_empty() { Ok(objects) } else { Err(InputErrors(errors)) }
    }

    /// Each file's parse, in order: from the cache when unchanged, parsed (in parallel) otherwise.
    fn refresh(&mut self, paths: &[PathBuf]) -> Result<Vec<Arc<Parsed>>, InputErrors> {
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for path in paths {
            match manifest_files(path) {
                Ok(f) => files.extend(f),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(InputErrors(errors));
        }
        let stamps: Vec<Option<Stamp>> = files.iter().map(|f| stamp(f)).collect();
        let stale: Vec<usize> = (0..files.len())
            .filter(|&i| stamps[i].is_none() || self.files.get(&files[i]).map(|(s, _)| Some(*s)) != Some(stamps[i]))
            .collect();
        // Files are read and parsed a few MiB at a time (on all cores), so that only that much
        // text is held at once, however large the manifests are.
        let mut stale = stale.into_iter().peekable();
        while stale.peek().is_some() {
            let mut texts: Vec<(usize, Result<String, InputError>)> = Vec::new();
            let mut bytes = 0;
            while bytes < TEXT_BYTES_PER_PASS
                && let Some(i) = stale.next()
            {
                let text = std::fs::read_to_string(&files[i]).map_err(|e| InputError {
                    origin: files[i].display().to_string(),
                    object: "manifests".into(),
                    field: "file".into(),
                    message: e.to_string(),
                });
                bytes += text.as_ref().map_or(0, String::len);
                texts.push((i, text));
            }
            let names: Vec<String> = texts.iter().map(|(i, _)| files[*i].display().to_string()).collect();
            let fresh = parse_files(texts.iter().zip(&names).map(|((_, t), n)| (n.as_str(), t.as_ref())).collect());
            for ((i, _), parsed) in texts.iter().zip(fresh) {
                // A file whose metadata cannot be read is read again every time.
                let s = stamps[*i].unwrap_or((u64::MAX, None, u64::MAX));
                self.files.insert(files[*i].clone(), (s, Arc::new(parsed)));
            }
        }
        let wanted: std::collections::BTreeSet<&PathBuf> = files.iter().collect();
        self.files.retain(|f, _| wanted.contains(f));
        Ok(files.iter().filter_map(|f| self.files.get(f).map(|(_, p)| p.clone())).collect())
    }
}

/// One document of a file: its number (from 1) and text.
struct Doc<'a> {
    file: usize,
    number: usize,
    text: &'a str,
}

/// The documents of a multi-document YAML text, cut at its `---` lines (YAML forbids a line
/// starting with `---` inside a document's content). Numbered as YAML parsers count them: text
/// before the first `---` is a document only if it holds more than comments.
fn documents(file: usize, text: &str) -> Vec<Doc<'_>> {
    let mut starts = vec![0];
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let is_marker =
            line.strip_prefix("---").is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace));
        if is_marker && at > 0 {
            starts.push(at);
        }
        at += line.len();
    }
    let mut docs = Vec::new();
    for (k, &start) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(text.len());
        let doc = &text[start..end];
        let marker = doc.starts_with("---");
        let content = doc.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        if k == 0 && !marker && !content {
            continue;
        }
        docs.push(Doc { file, number: docs.len() + 1, text: doc });
    }
    docs
}

/// Parses files (name, text or the error reading it) on all cores; one [`Parsed`] per file.
/// Each thread takes a run of consecutive documents and gathers them into one [`Parsed`] per
/// file it touches (not one per document: at 44,000 Services, per-document vectors of spare
/// capacity alone were 230 MiB); only one document's generic tree is alive per thread.
fn parse_files(files: Vec<(&str, Result<&String, &InputError>)>) -> Vec<Parsed> {
    let mut out: Vec<Parsed> = files.iter().map(|_| Parsed::default()).collect();
    let mut docs = Vec::new();
    for (i, (_, text)) in files.iter().enumerate() {
        match text {
            Ok(t) => docs.extend(documents(i, t)),
            Err(e) => out[i].errors.push((*e).clone()),
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let batch = docs.len().div_ceil(threads * 4).max(1);
    let results: Vec<Vec<(usize, Parsed)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = docs
            .chunks(batch)
            .map(|chunk| {
                let files = &files;
                scope.spawn(move || {
                    let mut runs: Vec<(usize, Parsed)> = Vec::new();
                    for d in chunk {
                        if runs.last().is_none_or(|(f, _)| *f != d.file) {
                            runs.push((d.file, Parsed::default()));
                        }
                        let p = &mut runs.last_mut().expect("pushed above").1;
                        parse_document(files[d.file].0, d.number, d.text, &mut p.objects, &mut p.errors);
                    }
                    runs
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    drop(docs);
    let mut runs: Vec<(usize, Parsed)> = results.into_iter().flatten().collect();
    // Each file's objects in one allocation per kind, in document order.
    for (file, p) in &runs {
        out[*file].objects.reserve_for(&p.objects);
    }
    for (file, p) in runs.drain(..) {
        out[file].objects.append(p.objects);
        out[file].errors.extend(p.errors);
    }
    out
}

/// Parses one file's text (multi-document YAML) into `objects`.
pub fn parse_into(file: &str, text: &str, objects: &mut Objects, errors: &mut Vec<InputError>) {
    for d in documents(0, text) {
        parse_document(file, d.number, d.text, objects, errors);
    }
}

/// One YAML document as a JSON value (`None` when empty). YAML 1.2 scalars, as serde_yaml read
/// them (and as the API server's YAML reader keeps a string field): `y`, `on`, `0755` and
/// `1_000` stay strings.
pub fn yaml_value(text: &str) -> Result<Option<Value>, serde_saphyr::Error> {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    options.underscored_numbers_as_strings = true;
    serde_saphyr::from_str_with_options::<Option<Value>>(text, options)
}

/// Parses one document into `objects`.
fn parse_document(file: &str, number: usize, text: &str, objects: &mut Objects, errors: &mut Vec<InputError>) {
    let origin = format!("{file} (document {number})");
    match yaml_value(text) {
        Ok(Some(value)) => add_value(&Origin(origin), value, objects, errors),
        Ok(None) => {}
        Err(e) => errors.push(InputError {
            origin,
            object: "YAML".into(),
            field: "document".into(),
            message: format!("malformed YAML: {}", e.to_string().lines().next().unwrap_or_default()),
        }),
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn add_value(origin: &Origin, value: Value, objects: &mut Objects, errors: &mut Vec<InputError>) {
    if value.is_null() {
        return;
    }
    let kind = str_at(&value, &["kind"]).unwrap_or_default().to_string();
    let api = str_at(&value, &["apiVersion"]).unwrap_or_default().to_string();
    let ns = str_at(&value, &["metadata", "namespace"]).filter(|n| !n.is_empty()).unwrap_or("default");
    let name = str_at(&value, &["metadata", "name"]).unwrap_or("<unnamed>");
    let object = format!("{kind} {ns}/{name}");
    match (api.as_str(), kind.as_str()) {
        ("v1", "List") => {
            if let Some(Value::Array(items)) = value.get("items").cloned() {
                for (i, item) in items.into_iter().enumerate() {
                    add_value(&Origin(format!("{origin} items[{i}]")), item, objects, errors);
                }
            }
        }
        ("v1", "Service") => push(origin, object, value, &mut objects.services, errors),
        ("discovery.k8s.io/v1", "EndpointSlice") => push(origin, object, value, &mut objects.slices, errors),
        ("v1", "Endpoints") => push(origin, object, value, &mut objects.endpoints, errors),
        ("v1", "Pod") => push(origin, object, value, &mut objects.pods, errors),
        ("v1", "Namespace") => push(origin, object, value, &mut objects.namespaces, errors),
        ("v1", "Node") => push(origin, object, value, &mut objects.nodes, errors),
        _ => {
            tracing::warn!(%origin, api_version = %api, kind = %kind, "skipping object of a kind nftproxy does not read")
        }
    }
}

fn push<T: DeserializeOwned>(
    origin: &Origin,
    object: String,
    value: Value,
    into: &mut Vec<(Origin, Arc<T>)>,
    errors: &mut Vec<InputError>,
) {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(t) => into.push((origin.clone(), Arc::new(t))),
        Err(e) => errors.push(InputError {
            origin: origin.to_string(),
            object,
            field: e.path().to_string(),
            message: e.into_inner().to_string(),
        }),
    }
}

/// A cheap fingerprint of the manifest files (names, sizes, modification times).
pub fn fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    paths
        .iter()
        .flat_map(|p| manifest_files(p).unwrap_or_default())
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            (f, len, meta.and_then(|m| m.modified().ok()))
        })
        .collect()
}

/// Polls the manifests and sends a change whenever a file appears, disappears or is modified.
pub async fn watch(paths: Vec<PathBuf>, every: std::time::Duration, tx: tokio::sync::mpsc::Sender<super::Change>) {
    let mut last = fingerprint(&paths);
    loop {
        tokio::time::sleep(every).await;
        let now = fingerprint(&paths);
        if now != last {
            last = now;
            // A full channel already holds a pending change: coalesced.
            let _ = tx.try_send(super::Change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Objects, Vec<InputError>) {
        let mut o = Objects::default();
        let mut e = Vec::new();
        parse_into("t.yaml", text, &mut o, &mut e);
        (o, e)
    }

    #[test]
    fn a_node_object_gives_its_internal_ips() {
        let (o, errors) = parse(
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\nstatus: {addresses: \
             [{type: InternalIP, address: 192.0.2.1}, {type: ExternalIP, address: 203.0.113.1}, \
             {type: InternalIP, address: '2001:db8::1'}, {type: Hostname, address: node-1}]}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let ips = o.node_internal_ips("node-1").unwrap();
        assert_eq!(ips, ["192.0.2.1".parse::<std::net::IpAddr>().unwrap(), "2001:db8::1".parse().unwrap()]);
        assert_eq!(o.node_internal_ips("node-2"), None);
    }

    #[test]
    fn multi_document_and_lists() {
        let (o, e) = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: p}}\n\
             - {apiVersion: apps/v1, kind: Deployment, metadata: {name: d}}\n---\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.pods.len(), 1);
        assert_eq!(o.pods[0].0.0, "t.yaml (document 2) items[0]");
    }

    #[test]
    fn type_errors_name_the_field() {
        let (_, e) = parse("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - port: eighty\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].object, "Service default/web");
        assert_eq!(e[0].field, "spec.ports[0].port");
    }

    #[test]
    fn documents_are_numbered_as_yaml_parsers_count_them() {
        let svc = |n: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {n}}}\n");
        let text = format!(
            "# header\n---\n{}---\n---\n{}--- {{apiVersion: v1, kind: Pod, metadata: {{name: p}}}}\n",
            svc("a"),
            svc("b")
        );
        let (o, e) = parse(&text);
        assert!(e.is_empty(), "{e:?}");
        let origins: Vec<&str> = o.services.iter().map(|(o, _)| o.0.as_str()).collect();
        assert_eq!(origins, ["t.yaml (document 1)", "t.yaml (document 3)"]);
        assert_eq!(o.pods[0].0.0, "t.yaml (document 4)", "content on the marker line");
        // A YAML 1.1 boolean spelling stays a string.
        let (o, e) = parse(&format!("{}spec: {{ports: [{{name: y, port: 80}}]}}\n", svc("c")));
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(o.services[0].1.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].name.as_deref(), Some("y"));
    }

    #[test]
    fn a_malformed_document_is_reported_and_the_others_still_read() {
        let (o, e) = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\nkind: [Service\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\n",
        );
        assert_eq!(e.len(), 1);
        assert!(e[0].to_string().starts_with("t.yaml (document 2): YAML: document: malformed YAML"), "{}", e[0]);
        assert_eq!(o.services.len(), 2);
    }

    #[test]
    fn the_cache_rereads_only_files_that_changed() {
        let dir = std::env::temp_dir().join(format!("nftproxy-manifest-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svc = |n: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {n}}}\n");
        std::fs::write(dir.join("a.yaml"), svc("a")).unwrap();
        std::fs::write(dir.join("b.yaml"), svc("b")).unwrap();
        let mut cache = ManifestCache::default();
        let names = |o: &Objects| o.services.iter().map(|(_, s)| s.metadata.name.clone().unwrap()).collect::<Vec<_>>();
        assert_eq!(names(&cache.load(std::slice::from_ref(&dir)).unwrap()), ["a", "b"]);
        let a = cache.files[&dir.join("a.yaml")].1.clone();
        std::fs::write(dir.join("b.yaml"), svc("b2")).unwrap();
        assert_eq!(names(&cache.load(std::slice::from_ref(&dir)).unwrap()), ["a", "b2"]);
        assert!(Arc::ptr_eq(&a, &cache.files[&dir.join("a.yaml")].1), "a.yaml was not parsed again");
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        assert_eq!(names(&cache.load(std::slice::from_ref(&dir)).unwrap()), ["b2"]);
        assert_eq!(cache.files.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_yaml_is_an_error() {
        let (_, e) = parse("apiVersion: v1\nkind: [Service\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].message.starts_with("malformed YAML"), "{}", e[0]);
    }
}
