//! Kubernetes YAML manifests: files or directories of `*.yaml`/`*.yml`, multi-document, with
//! `kind: List` unpacked. Unknown kinds are skipped with a warning.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_yaml::Value;

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
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    for path in paths {
        match manifest_files(path) {
            Ok(files) => {
                for file in files {
                    match std::fs::read_to_string(&file) {
                        Ok(text) => parse_into(&file.display().to_string(), &text, &mut objects, &mut errors),
                        Err(e) => errors.push(InputError {
                            origin: file.display().to_string(),
                            object: "manifests".into(),
                            field: "file".into(),
                            message: e.to_string(),
                        }),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() { Ok(objects) } else { Err(InputErrors(errors)) }
}

/// Parses one file's text (multi-document YAML) into `objects`.
pub fn parse_into(file: &str, text: &str, objects: &mut Objects, errors: &mut Vec<InputError>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = format!("{file} (document {})", i + 1);
        let value = match <Value as serde::Deserialize>::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(InputError {
                    origin,
                    object: "YAML".into(),
                    field: "document".into(),
                    message: format!("malformed YAML: {e}"),
                });
                // The YAML parser cannot resynchronise after a syntax error.
                return;
            }
        };
        add_value(&Origin(origin), value, objects, errors);
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
            if let Some(Value::Sequence(items)) = value.get("items").cloned() {
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
    into: &mut Vec<(Origin, T)>,
    errors: &mut Vec<InputError>,
) {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(t) => into.push((origin.clone(), t)),
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
            let _ = tx.try_send(super::Change::now());
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
    fn malformed_yaml_is_an_error() {
        let (_, e) = parse("apiVersion: v1\nkind: [Service\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].message.starts_with("malformed YAML"), "{}", e[0]);
    }
}
