//! Server-side apply of untyped objects (JSON with `apiVersion`, `kind` and `metadata`), for
//! phases whose objects are a few plain ones (the monitoring phase's namespace, Secrets and
//! dashboard ConfigMap). Same field manager, same `force`, same dry-run comparison as
//! [`super::apply`]; the resource path comes from the object's `apiVersion` and `kind`.

use std::fmt;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch};
use kube::{Api, Client};
use serde_json::Value;

use super::apply::{classify, comparable, params};
use super::{block_on, Change, ChangeKind, K8sError, Mode};
use crate::phases::turnd::KubeApi;

/// Objects to apply through the API server at `api`, in order.
#[derive(Clone, PartialEq, Eq)]
pub struct ObjectSet {
    /// The API server.
    pub api: KubeApi,
    /// The objects (Secrets among them: `Debug` shows names only).
    pub objects: Vec<Value>,
}

impl fmt::Debug for ObjectSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectSet")
            .field("api", &self.api)
            .field("objects", &self.ids())
            .finish()
    }
}

/// `Kind/name` of an object.
pub fn object_id(o: &Value) -> String {
    format!(
        "{}/{}",
        o["kind"].as_str().unwrap_or_default(),
        o["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn api_for(client: &Client, o: &Value) -> Api<DynamicObject> {
    let api_version = o["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, o["kind"].as_str().unwrap_or_default());
    let resource = ApiResource::from_gvk(&gvk);
    match o["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

async fn patch(client: &Client, o: &Value, mode: Mode) -> Result<Value, K8sError> {
    let id = object_id(o);
    let verb = match mode {
        Mode::Apply => "apply",
        Mode::DryRun => "dry-run apply",
    };
    let name = o["metadata"]["name"].as_str().unwrap_or_default();
    let answer = api_for(client, o)
        .patch(name, &params(mode), &Patch::Apply(o))
        .await
        .map_err(|e| classify(verb, id.clone(), e))?;
    serde_json::to_value(&answer).map_err(|e| K8sError::Client(format!("{id}: {e}")))
}

async fn get(client: &Client, o: &Value) -> Result<Option<Value>, K8sError> {
    let id = object_id(o);
    let name = o["metadata"]["name"].as_str().unwrap_or_default();
    let live = api_for(client, o)
        .get_opt(name)
        .await
        .map_err(|e| classify("get", id.clone(), e))?;
    live.map(|l| serde_json::to_value(&l))
        .transpose()
        .map_err(|e| K8sError::Client(format!("{id}: {e}")))
}

impl ObjectSet {
    /// `Kind/name` of every object.
    pub fn ids(&self) -> Vec<String> {
        self.objects.iter().map(object_id).collect()
    }

    /// What applying would change, asked of the server as [`super::plan`] does (a read and a
    /// server-side dry run per object; objects in a namespace that does not exist yet are
    /// created without asking); every object [`ChangeKind::Unverified`] when no server
    /// answers. The flag says whether the server was asked.
    ///
    /// # Errors
    /// [`K8sError::Refused`] when the server refuses an object.
    pub async fn plan(&self, client: &Client) -> Result<(Vec<Change>, bool), K8sError> {
        let mut out = Vec::new();
        let mut namespace_missing = false;
        for o in &self.objects {
            let kind = if namespace_missing {
                ChangeKind::Create
            } else {
                let live = match get(client, o).await {
                    Ok(live) => live,
                    Err(K8sError::Unreachable { source }) => {
                        tracing::info!("Kubernetes API unreachable ({source}): planning offline");
                        let offline = self
                            .objects
                            .iter()
                            .map(|o| Change {
                                object: object_id(o),
                                kind: ChangeKind::Unverified,
                            })
                            .collect();
                        return Ok((offline, false));
                    }
                    Err(e) => return Err(e),
                };
                match live {
                    None => {
                        namespace_missing |= o["kind"] == "Namespace";
                        ChangeKind::Create
                    }
                    Some(live) => {
                        let after = patch(client, o, Mode::DryRun).await?;
                        if comparable(live) == comparable(after) {
                            ChangeKind::Unchanged
                        } else {
                            ChangeKind::Update
                        }
                    }
                }
            };
            out.push(Change {
                object: object_id(o),
                kind,
            });
        }
        Ok((out, true))
    }

    /// Applies every object in order (blocking).
    ///
    /// # Errors
    /// The first object that failed, or a client that cannot be built.
    pub fn run(&self) -> Result<(), K8sError> {
        block_on(async {
            let client = self.api.client().await?;
            for o in &self.objects {
                patch(&client, o, Mode::Apply).await?;
            }
            Ok(())
        })?
    }
}
