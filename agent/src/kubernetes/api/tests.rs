use serde_json::json;

use super::*;

const UID: &str = "4f1c2a7e-9b1d-4e0a-8c61-3f5b2d7a9e10";

fn pod(uid: &str, node: &str, version: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": "bot-7f9c", "namespace": "ai-chat", "uid": uid,
                     "resourceVersion": version, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": "agent",
                 "containers": [{"name": "app", "image": "python:3.12"}]},
        "status": {"phase": "Running"}
    })
}

fn event(kind: &str, object: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap()
}

fn info(labels: &[(&str, &str)]) -> PodInfo {
    PodInfo {
        namespace: "ai-chat".into(),
        name: "bot-7f9c".into(),
        uid: UID.into(),
        service_account: Some("agent".into()),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[test]
fn reads_pod_events() {
    let added = event(
        "ADDED",
        pod(UID, "node-a", "17", json!({"app": "langchain"})),
    );
    assert_eq!(
        Event::parse(&added, "node-a"),
        Ok(Event::Pod {
            version: "17".into(),
            info: info(&[("app", "langchain")])
        })
    );
    let deleted = event("DELETED", pod(UID, "node-a", "18", json!({})));
    assert_eq!(
        Event::parse(&deleted, "node-a"),
        Ok(Event::Gone {
            version: "18".into(),
            uid: UID.into()
        })
    );
    // Another node's pod is as good as gone from this one.
    let elsewhere = event("MODIFIED", pod(UID, "node-b", "19", json!({})));
    assert_eq!(
        Event::parse(&elsewhere, "node-a"),
        Ok(Event::Gone {
            version: "19".into(),
            uid: UID.into()
        })
    );
}

#[test]
fn reads_bookmarks_and_errors() {
    let bookmark = event(
        "BOOKMARK",
        json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "42",
               "annotations": {"k8s.io/initial-events-end": "true"}}, "spec": {"containers": null}}),
    );
    assert_eq!(
        Event::parse(&bookmark, "node-a"),
        Ok(Event::Bookmark {
            version: "42".into()
        })
    );
    let gone = event(
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "too old resource version: 5 (40)", "reason": "Expired", "code": 410}),
    );
    assert_eq!(Event::parse(&gone, "node-a"), Ok(Event::TooOld));
    let other = event(
        "ERROR",
        json!({"kind": "Status", "status": "Failure", "message": "internal error", "code": 500}),
    );
    assert_eq!(
        Event::parse(&other, "node-a"),
        Ok(Event::Error {
            code: 500,
            message: "internal error".into()
        })
    );
}

#[test]
fn malformed_events_are_errors() {
    for line in [
        &b"not json"[..],
        br#"{"type":"ADDED"}"#,
        br#"{"type":"SOMETHING","object":{}}"#,
        br#"{"type":"ADDED","object":{"metadata":{"uid":"x"}}}"#,
        br#"{"type":"ADDED","object":{"metadata":"nope"}}"#,
    ] {
        assert!(
            Event::parse(line, "node-a").is_err(),
            "{}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn pods_without_a_valid_uid_or_name_are_left_out() {
    for bad in [
        pod("../../etc", "node-a", "1", json!({})),
        pod(UID, "node-a", "1", json!({})).tap(|p| p["metadata"]["name"] = json!("")),
        pod(UID, "node-a", "1", json!({})).tap(|p| p["spec"] = json!({})),
    ] {
        let pod: Pod = serde_json::from_value(bad).unwrap();
        assert_eq!(pod.info("node-a"), None);
    }
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}

impl Tap for serde_json::Value {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

#[test]
fn splits_a_watch_into_lines_across_frames() {
    let mut lines = Lines::default();
    assert_eq!(lines.push(b"{\"a\":").unwrap(), Vec::<Vec<u8>>::new());
    assert_eq!(
        lines.push(b"1}\n\n{\"b\":2}\n{\"c\"").unwrap(),
        vec![b"{\"a\":1}\n".to_vec(), b"{\"b\":2}\n".to_vec()]
    );
    assert_eq!(lines.push(b":3}\n").unwrap(), vec![b"{\"c\":3}\n".to_vec()]);
    let huge = vec![b'x'; MAX_EVENT + 1];
    assert!(lines.push(&huge).is_err());
}

#[test]
fn a_list_replaces_what_was_known_and_says_what_changed() {
    let pods = ApiPods::default();
    let other = "0b7d6c1e-2a3f-4b5c-9d8e-7f6a5b4c3d2e";
    let mut first = HashMap::new();
    first.insert(UID.to_string(), info(&[]));
    let mut second = info(&[]);
    second.uid = other.into();
    first.insert(other.to_string(), second.clone());
    let mut changed = pods.replace(first);
    changed.sort();
    assert_eq!(changed, vec![other.to_string(), UID.to_string()]);
    // Same pods, one relabelled, one gone.
    let mut next = HashMap::new();
    next.insert(UID.to_string(), info(&[("app", "langchain")]));
    assert_eq!(pods.replace(next), vec![UID.to_string()]);
    assert_eq!(pods.pod(other), None);
    assert!(!pods.upsert(info(&[("app", "langchain")])));
    assert!(pods.upsert(info(&[("app", "web")])));
}

#[test]
fn refusals_say_what_to_do() {
    let body = br#"{"kind":"Status","status":"Failure","message":"pods is forbidden: User \"system:serviceaccount:warden:warden\" cannot list resource \"pods\"","reason":"Forbidden","code":403}"#;
    let text = refused("https://10.96.0.1:443/api/v1/pods", 403, body).to_string();
    assert!(text.contains("403: pods is forbidden"), "{text}");
    assert!(text.contains("get, list and watch on pods"), "{text}");
    let text = refused("u", 401, b"Unauthorized").to_string();
    assert!(text.contains("token_file"), "{text}");
}

#[test]
fn query_values_are_encoded() {
    assert_eq!(percent_encode("node-a.example"), "node-a.example");
    assert_eq!(percent_encode("a b&c=d"), "a%20b%26c%3Dd");
}
