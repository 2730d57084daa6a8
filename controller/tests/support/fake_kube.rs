//! An in-memory Kubernetes API server for operator tests and the operator benchmark, served to
//! kube clients through tower-test mocks: lists and streaming watches (with resource versions and
//! replay), server-side apply of objects and their status (a no-op apply changes nothing and
//! sends no event, as the real server does), deletes, events. Every request is recorded, so tests
//! count what the operator sends.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

pub type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;
type Handle = tower_test::mock::Handle<Request<Body>, Response<ResponseBody>>;

pub const POLICIES: &str = "/apis/virtwarden.io/v1alpha1/hostpolicies";
pub const ENACTMENTS: &str = "/apis/virtwarden.io/v1alpha1/hostpolicyenactments";
pub const NODES: &str = "/api/v1/nodes";
/// The heartbeat Leases in the client's default namespace ("default").
pub const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/default/leases";

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub body: Value,
}

impl Call {
    pub fn is_watch(&self) -> bool {
        self.uri.contains("watch=true")
    }
    /// A request that changes something (everything but GET).
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }
}

struct Watch {
    collection: String,
    name: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    rv: u64,
    uid: u64,
    /// (collection, name) → object.
    objects: BTreeMap<(String, String), Value>,
    /// (rv, collection, event) for watch replay.
    history: Vec<(u64, String, Value)>,
    watches: Vec<Watch>,
    calls: Vec<Call>,
    /// Collections whose list requests wait until released.
    held: HashSet<String>,
}

#[derive(Default)]
pub struct FakeKube {
    state: Mutex<State>,
    released: Notify,
    /// Woken on every request.
    pub requested: Notify,
}

fn collection_of(kind: &str) -> &'static str {
    match kind {
        "HostPolicy" => POLICIES,
        "HostPolicyEnactment" => ENACTMENTS,
        "Node" => NODES,
        "Lease" => LEASES,
        other => panic!("fake API: unknown kind {other}"),
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn query_param(uri: &str, key: &str) -> Option<String> {
    let query = uri.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%3D", "=").replace("%2F", "/").replace("%2C", ","))
    })
}

impl FakeKube {
    pub fn new() -> Arc<Self> {
        Arc::new(FakeKube::default())
    }

    /// A kube client talking to this server.
    pub fn client(self: &Arc<Self>) -> Client {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<ResponseBody>>();
        tokio::spawn(self.clone().serve(handle));
        Client::new(svc, "default")
    }

    async fn serve(self: Arc<Self>, mut handle: Handle) {
        while let Some((req, send)) = handle.next_request().await {
            let this = self.clone();
            tokio::spawn(async move {
                let method = req.method().as_str().to_string();
                let uri = req.uri().to_string();
                let body = req.into_body().collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let response = this.handle(Call { method, uri, body }).await;
                send.send_response(response);
            });
        }
    }

    async fn handle(&self, call: Call) -> Response<ResponseBody> {
        self.state.lock().unwrap().calls.push(call.clone());
        self.requested.notify_waiters();
        let path = call.path().to_string();
        let (collection, name, status) = split_path(&path);
        match call.method.as_str() {
            "GET" if name.is_none() && call.is_watch() => self.watch(&collection, &call),
            "GET" if name.is_none() => {
                loop {
                    let released = self.released.notified();
                    if !self.state.lock().unwrap().held.contains(&collection) {
                        break;
                    }
                    released.await;
                }
                self.list(&collection, &call)
            }
            "GET" => self.get(&collection, name.as_deref().unwrap_or_default()),
            "PATCH" if collection.contains("/events") => json_response(StatusCode::OK, &call.body),
            "PATCH" => self.apply(&collection, name.as_deref().unwrap_or_default(), status, &call.body),
            "POST" if collection.contains("/events") => {
                let mut ev = call.body.clone();
                ev["metadata"]["name"] = json!("e");
                json_response(StatusCode::CREATED, &ev)
            }
            "DELETE" => self.delete(&collection, name.as_deref().unwrap_or_default()),
            _ => json_response(StatusCode::METHOD_NOT_ALLOWED, &status_body(405, "MethodNotAllowed", &path)),
        }
    }

    fn list(&self, collection: &str, call: &Call) -> Response<ResponseBody> {
        let st = self.state.lock().unwrap();
        let wanted =
            query_param(&call.uri, "fieldSelector").and_then(|f| f.strip_prefix("metadata.name=").map(String::from));
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((c, n), _)| c == collection && wanted.as_ref().is_none_or(|w| w == n))
            .map(|(_, o)| o.clone())
            .collect();
        json_response(StatusCode::OK, &json!({"metadata": {"resourceVersion": st.rv.to_string()}, "items": items}))
    }

    fn get(&self, collection: &str, name: &str) -> Response<ResponseBody> {
        let st = self.state.lock().unwrap();
        match st.objects.get(&(collection.to_string(), name.to_string())) {
            Some(o) => json_response(StatusCode::OK, o),
            None => json_response(StatusCode::NOT_FOUND, &status_body(404, "NotFound", name)),
        }
    }

    fn watch(&self, collection: &str, call: &Call) -> Response<ResponseBody> {
        let (tx, rx) = mpsc::unbounded_channel();
        let name =
            query_param(&call.uri, "fieldSelector").and_then(|f| f.strip_prefix("metadata.name=").map(String::from));
        let since: u64 = query_param(&call.uri, "resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut st = self.state.lock().unwrap();
        for (rv, c, ev) in &st.history {
            if *rv > since && c == collection && name.as_ref().is_none_or(|n| ev["object"]["metadata"]["name"] == *n) {
                let _ = tx.send(line(ev));
            }
        }
        st.watches.push(Watch { collection: collection.to_string(), name, tx });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let body = BodyExt::boxed_unsync(StreamBody::new(stream));
        Response::builder().status(StatusCode::OK).body(body).unwrap()
    }

    /// Server-side apply, simplified: the fields in the body replace the object's (labels and
    /// owner references of metadata, spec, or status for the status subresource).
    fn apply(&self, collection: &str, name: &str, status: bool, body: &Value) -> Response<ResponseBody> {
        let mut st = self.state.lock().unwrap();
        let key = (collection.to_string(), name.to_string());
        let existing = st.objects.get(&key).cloned();
        let (mut object, created) = match existing {
            Some(o) => (o, false),
            None if status => return json_response(StatusCode::NOT_FOUND, &status_body(404, "NotFound", name)),
            None => {
                st.uid += 1;
                let mut o = json!({"apiVersion": body["apiVersion"], "kind": body["kind"],
                    "metadata": {"name": name, "uid": format!("uid-{}", st.uid), "generation": 1,
                                 "creationTimestamp": "2026-01-01T00:00:00Z"}});
                if body.get("spec").is_some() {
                    o["spec"] = Value::Null;
                }
                (o, true)
            }
        };
        let before = object.clone();
        if status {
            object["status"] = body["status"].clone();
        } else {
            for field in ["labels", "ownerReferences"] {
                if let Some(v) = body["metadata"].get(field) {
                    object["metadata"][field] = v.clone();
                }
            }
            if let Some(spec) = body.get("spec") {
                if !created && object["spec"] != *spec {
                    let g = object["metadata"]["generation"].as_i64().unwrap_or(1);
                    object["metadata"]["generation"] = json!(g + 1);
                }
                object["spec"] = spec.clone();
            }
        }
        if !created && object == before {
            return json_response(StatusCode::OK, &object);
        }
        let event_type = if created { "ADDED" } else { "MODIFIED" };
        let object = st.store(collection, object, event_type);
        json_response(if created { StatusCode::CREATED } else { StatusCode::OK }, &object)
    }

    fn delete(&self, collection: &str, name: &str) -> Response<ResponseBody> {
        let mut st = self.state.lock().unwrap();
        match st.objects.remove(&(collection.to_string(), name.to_string())) {
            Some(o) => {
                st.announce(collection, o.clone(), "DELETED");
                json_response(StatusCode::OK, &o)
            }
            None => json_response(StatusCode::NOT_FOUND, &status_body(404, "NotFound", name)),
        }
    }

    // ---- what tests do as "someone else" (kubectl, the garbage collector, the kubelet) ----

    /// Create or replace an object as an administrator would; returns it as stored.
    pub fn put(&self, object: Value) -> Value {
        let mut st = self.state.lock().unwrap();
        let collection = collection_of(object["kind"].as_str().unwrap_or_default()).to_string();
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let existing = st.objects.get(&(collection.clone(), name)).cloned();
        let mut object = object;
        let event_type = match &existing {
            Some(old) => {
                object["metadata"]["uid"] = old["metadata"]["uid"].clone();
                let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let bump = old.get("spec") != object.get("spec");
                object["metadata"]["generation"] = json!(if bump { g + 1 } else { g });
                if object.get("status").is_none() {
                    if let Some(s) = old.get("status") {
                        object["status"] = s.clone();
                    }
                }
                "MODIFIED"
            }
            None => {
                st.uid += 1;
                if object["metadata"].get("uid").is_none() {
                    object["metadata"]["uid"] = json!(format!("uid-{}", st.uid));
                }
                object["metadata"]["generation"] = json!(1);
                "ADDED"
            }
        };
        st.store(&collection, object, event_type)
    }

    /// Delete an object, and with it (as the garbage collector does) the objects it owns.
    pub fn remove(&self, kind: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        let collection = collection_of(kind).to_string();
        let Some(gone) = st.objects.remove(&(collection.clone(), name.to_string())) else { return };
        let uid = gone["metadata"]["uid"].clone();
        st.announce(&collection, gone, "DELETED");
        let owned: Vec<(String, String)> = st
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"].as_array().is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in owned {
            if let Some(o) = st.objects.remove(&key) {
                st.announce(&key.0, o, "DELETED");
            }
        }
    }

    pub fn object(&self, kind: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(&(collection_of(kind).to_string(), name.to_string())).cloned()
    }

    pub fn objects(&self, kind: &str) -> Vec<Value> {
        let collection = collection_of(kind);
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|((c, _), _)| c == collection)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Hold list requests of `collection` until [`FakeKube::release`].
    pub fn hold_lists(&self, collection: &str) {
        self.state.lock().unwrap().held.insert(collection.to_string());
    }

    pub fn release(&self, collection: &str) {
        self.state.lock().unwrap().held.remove(collection);
        self.released.notify_waiters();
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn call_count(&self) -> usize {
        self.state.lock().unwrap().calls.len()
    }
}

impl State {
    fn store(&mut self, collection: &str, mut object: Value, event_type: &str) -> Value {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        self.objects.insert((collection.to_string(), name), object.clone());
        self.announce(collection, object.clone(), event_type);
        object
    }

    fn announce(&mut self, collection: &str, mut object: Value, event_type: &str) {
        if event_type == "DELETED" {
            self.rv += 1;
            object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        }
        let event = json!({"type": event_type, "object": object});
        self.history.push((self.rv, collection.to_string(), event.clone()));
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        self.watches.retain(|w| {
            if w.collection != collection || w.name.as_ref().is_some_and(|n| *n != name) {
                return !w.tx.is_closed();
            }
            w.tx.send(line(&event)).is_ok()
        });
    }
}

fn line(event: &Value) -> Bytes {
    let mut v = serde_json::to_vec(event).unwrap();
    v.push(b'\n');
    Bytes::from(v)
}

fn json_response(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap());
    let body = BodyExt::boxed_unsync(http_body_util::Full::new(bytes));
    Response::builder().status(status).header("content-type", "application/json").body(body).unwrap()
}

/// `/apis/g/v/plural[/name[/status]]` → (collection path, name, is status subresource).
fn split_path(path: &str) -> (String, Option<String>, bool) {
    for collection in [POLICIES, ENACTMENTS, NODES, LEASES] {
        if let Some(rest) = path.strip_prefix(collection) {
            let mut parts = rest.trim_start_matches('/').split('/').filter(|s| !s.is_empty());
            let name = parts.next().map(String::from);
            let status = parts.next() == Some("status");
            return (collection.to_string(), name, status);
        }
    }
    (path.to_string(), None, false)
}

/// A Node object with labels.
pub fn node(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})
}
