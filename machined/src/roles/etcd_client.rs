//! A small etcd client over etcd's gRPC-JSON gateway (`/v3/...`) with
//! mutual TLS. machined needs only membership, status and health; the
//! gateway covers those without a second gRPC stack to build and keep.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

/// The key joiners hold while they add themselves ([`EtcdClient::join_lock`]).
pub const JOIN_LOCK_KEY: &str = "/machined/etcd-join-lock";

/// A membership or status call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// etcd's `/health` (a linearizable read, so a round of raft).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Defragmentation and leader transfer: both wait on the member's disk or
/// on raft.
const LONG_CALL: Duration = Duration::from_secs(120);
/// A whole snapshot transfer: etcd's largest supported keyspace (8 GiB)
/// at a slow disk's pace.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3600);
/// No snapshot data for this long ends the transfer.
const SNAPSHOT_IDLE: Duration = Duration::from_secs(60);
/// One gateway message: a 32 KiB chunk in base64 plus its header.
const SNAPSHOT_MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EtcdClientError {
    #[error("etcd TLS setup: {0}")]
    Tls(String),
    #[error("etcd at {url}: {message}")]
    Request { url: String, message: String },
}

/// A member as the gateway reports it (IDs are uint64 written as strings).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Member {
    #[serde(rename = "ID", default, deserialize_with = "u64_text")]
    pub id: u64,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "peerURLs", default)]
    pub peer_urls: Vec<String>,
    #[serde(rename = "clientURLs", default)]
    pub client_urls: Vec<String>,
    #[serde(rename = "isLearner", default)]
    pub is_learner: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub version: String,
    #[serde(rename = "dbSize", default, deserialize_with = "u64_text")]
    pub db_size: u64,
    #[serde(default, deserialize_with = "u64_text")]
    pub leader: u64,
    #[serde(rename = "raftIndex", default, deserialize_with = "u64_text")]
    pub raft_index: u64,
    #[serde(rename = "raftTerm", default, deserialize_with = "u64_text")]
    pub raft_term: u64,
    #[serde(default)]
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Header {
    #[serde(default, deserialize_with = "u64_text")]
    pub member_id: u64,
}

fn u64_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        U(u64),
    }
    match N::deserialize(d)? {
        N::U(u) => Ok(u),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Deserialize)]
struct MembersBody {
    #[serde(default)]
    members: Vec<Member>,
}

#[derive(Deserialize)]
struct AddBody {
    member: Member,
    #[serde(default)]
    members: Vec<Member>,
}

/// A client for one or more etcd endpoints; each call tries them in order.
#[derive(Clone, Debug)]
pub struct EtcdClient {
    http: reqwest::Client,
    endpoints: Vec<String>,
}

impl EtcdClient {
    pub fn new(
        endpoints: Vec<String>,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, EtcdClientError> {
        let tls = |e: reqwest::Error| EtcdClientError::Tls(e.to_string());
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(tls)?;
        let identity = reqwest::Identity::from_pem(format!("{cert_pem}\n{key_pem}").as_bytes())
            .map_err(tls)?;
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .identity(identity)
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(tls)?;
        Ok(EtcdClient { http, endpoints })
    }

    async fn post<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, EtcdClientError> {
        self.post_with_timeout(path, body, CALL_TIMEOUT).await
    }

    async fn post_with_timeout<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: serde_json::Value,
        timeout: Duration,
    ) -> Result<T, EtcdClientError> {
        let mut last = None;
        for ep in &self.endpoints {
            let url = format!("{}{path}", ep.trim_end_matches('/'));
            let err = |message: String| EtcdClientError::Request {
                url: url.clone(),
                message,
            };
            let result = async {
                let resp = self
                    .http
                    .post(&url)
                    .json(&body)
                    .timeout(timeout)
                    .send()
                    .await
                    .map_err(|e| err(format!("{e:#}")))?;
                let status = resp.status();
                let text = resp.text().await.map_err(|e| err(e.to_string()))?;
                if !status.is_success() {
                    return Err(err(format!("HTTP {status}: {}", text.trim())));
                }
                serde_json::from_str::<T>(&text).map_err(|e| err(format!("bad response: {e}")))
            }
            .await;
            match result {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(EtcdClientError::Request {
            url: String::new(),
            message: "no endpoints".into(),
        }))
    }

    pub async fn members(&self) -> Result<Vec<Member>, EtcdClientError> {
        Ok(self
            .post::<MembersBody>("/v3/cluster/member/list", json!({}))
            .await?
            .members)
    }

    /// Adds a member; returns it and the full member list.
    pub async fn add_member(
        &self,
        peer_urls: &[String],
    ) -> Result<(Member, Vec<Member>), EtcdClientError> {
        let b: AddBody = self
            .post("/v3/cluster/member/add", json!({ "peerURLs": peer_urls }))
            .await?;
        Ok((b.member, b.members))
    }

    pub async fn remove_member(&self, id: u64) -> Result<Vec<Member>, EtcdClientError> {
        Ok(self
            .post::<MembersBody>("/v3/cluster/member/remove", json!({ "ID": id.to_string() }))
            .await?
            .members)
    }

    /// Takes the join lock for `holder` (a peer URL) for `ttl_s` seconds:
    /// true when this holder has it (newly, or still from an earlier call),
    /// false when another holder does. A key with a lease, created only if
    /// absent (one transaction), so the lock frees itself.
    ///
    /// Why: etcd checks a MemberAdd against the members already applied, so
    /// two joiners that add themselves at the same moment both pass the
    /// quorum check, and a one-member cluster ends with two unstarted
    /// members, no quorum and joiners that never start. Joiners take this
    /// lock around MemberAdd, so adds happen one at a time and etcd's check
    /// sees the earlier one.
    pub async fn join_lock(&self, holder: &str, ttl_s: u64) -> Result<bool, EtcdClientError> {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        #[derive(Deserialize)]
        struct Grant {
            #[serde(rename = "ID")]
            id: String,
        }
        let grant: Grant = self
            .post("/v3/lease/grant", json!({ "TTL": ttl_s.to_string() }))
            .await?;
        let key = b64(JOIN_LOCK_KEY);
        let txn: serde_json::Value = self
            .post(
                "/v3/kv/txn",
                json!({
                    "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
                    "success": [{"request_put": {"key": key, "value": b64(holder), "lease": grant.id}}],
                    "failure": [{"request_range": {"key": key}}],
                }),
            )
            .await?;
        if txn.get("succeeded").and_then(serde_json::Value::as_bool) == Some(true) {
            return Ok(true);
        }
        let held_by = txn
            .pointer("/responses/0/response_range/kvs/0/value")
            .and_then(serde_json::Value::as_str)
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        Ok(held_by.as_deref() == Some(holder))
    }

    /// Starts a snapshot of the first endpoint's member; read it with
    /// [`SnapshotStream::next_chunk`]. etcd sends it in 32 KiB chunks; the
    /// last 32 bytes of the whole are etcd's own sha256 of the rest, which
    /// `etcdctl snapshot restore` checks. Nothing is buffered beyond one
    /// gateway message.
    pub async fn snapshot(&self) -> Result<SnapshotStream, EtcdClientError> {
        let ep = self.endpoints.first().cloned().unwrap_or_default();
        let url = format!("{}/v3/maintenance/snapshot", ep.trim_end_matches('/'));
        let err = |message: String| EtcdClientError::Request {
            url: url.clone(),
            message,
        };
        let resp = self
            .http
            .post(&url)
            .json(&json!({}))
            // The whole transfer; idle stalls are caught by the chunk
            // timeout in `next_chunk`.
            .timeout(SNAPSHOT_TIMEOUT)
            .send()
            .await
            .map_err(|e| err(format!("{e:#}")))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            return Err(err(format!("HTTP {status}: {}", text.trim())));
        }
        Ok(SnapshotStream {
            resp,
            url,
            pending: Vec::new(),
            done: false,
            total: 0,
        })
    }

    /// Defragments the first endpoint's member.
    pub async fn defragment(&self) -> Result<(), EtcdClientError> {
        let _: serde_json::Value = self
            .post_with_timeout("/v3/maintenance/defragment", json!({}), LONG_CALL)
            .await?;
        Ok(())
    }

    /// The cluster's active alarms as (member ID, alarm name).
    pub async fn alarms(&self) -> Result<Vec<(u64, String)>, EtcdClientError> {
        #[derive(Deserialize)]
        struct A {
            #[serde(rename = "memberID", default, deserialize_with = "u64_text")]
            member_id: u64,
            #[serde(default)]
            alarm: String,
        }
        #[derive(Deserialize)]
        struct Body {
            #[serde(default)]
            alarms: Vec<A>,
        }
        let b: Body = self
            .post(
                "/v3/maintenance/alarm",
                json!({"action": "GET", "memberID": "0", "alarm": "NONE"}),
            )
            .await?;
        Ok(b.alarms
            .into_iter()
            // The gateway omits the enum's zero value (NONE).
            .map(|a| {
                (
                    a.member_id,
                    if a.alarm.is_empty() {
                        "NONE".into()
                    } else {
                        a.alarm
                    },
                )
            })
            .collect())
    }

    /// Clears one alarm.
    pub async fn disarm(&self, member_id: u64, alarm: &str) -> Result<(), EtcdClientError> {
        let _: serde_json::Value = self
            .post(
                "/v3/maintenance/alarm",
                json!({"action": "DEACTIVATE", "memberID": member_id.to_string(), "alarm": alarm}),
            )
            .await?;
        Ok(())
    }

    /// Asks the leader (which must be the first endpoint) to hand
    /// leadership to `target`.
    pub async fn move_leader(&self, target: u64) -> Result<(), EtcdClientError> {
        let _: serde_json::Value = self
            .post_with_timeout(
                "/v3/maintenance/transfer-leadership",
                json!({"targetID": target.to_string()}),
                LONG_CALL,
            )
            .await?;
        Ok(())
    }

    pub async fn status(&self) -> Result<Status, EtcdClientError> {
        self.post("/v3/maintenance/status", json!({})).await
    }

    /// etcd's own health endpoint: healthy when the member has a leader and
    /// can serve a linearizable read.
    pub async fn health(&self) -> Result<(), EtcdClientError> {
        let ep = self.endpoints.first().cloned().unwrap_or_default();
        let url = format!("{}/health", ep.trim_end_matches('/'));
        let err = |message: String| EtcdClientError::Request {
            url: url.clone(),
            message,
        };
        #[derive(Deserialize)]
        struct H {
            health: String,
            #[serde(default)]
            reason: String,
        }
        let resp = self
            .http
            .get(&url)
            .timeout(HEALTH_TIMEOUT)
            .send()
            .await
            .map_err(|e| err(format!("{e:#}")))?;
        let h: H = resp.json().await.map_err(|e| err(e.to_string()))?;
        if h.health == "true" {
            Ok(())
        } else {
            Err(err(format!("unhealthy {}", h.reason).trim().to_owned()))
        }
    }
}

/// A snapshot arriving from etcd's gateway, which writes one JSON object
/// per line: `{"result":{"blob":"<base64>",...}}` or `{"error":{...}}`.
#[derive(Debug)]
pub struct SnapshotStream {
    resp: reqwest::Response,
    url: String,
    pending: Vec<u8>,
    done: bool,
    total: u64,
}

impl SnapshotStream {
    fn err(&self, message: String) -> EtcdClientError {
        EtcdClientError::Request {
            url: self.url.clone(),
            message,
        }
    }

    /// The next chunk of the snapshot, or None at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, EtcdClientError> {
        use base64::Engine;
        #[derive(Deserialize)]
        struct Msg {
            result: Option<Chunk>,
            error: Option<serde_json::Value>,
        }
        #[derive(Deserialize)]
        struct Chunk {
            #[serde(default)]
            blob: String,
        }
        loop {
            let line = match self.pending.iter().position(|b| *b == b'\n') {
                Some(nl) => {
                    let line = self.pending[..nl].to_vec();
                    self.pending.drain(..=nl);
                    line
                }
                None if self.done && !self.pending.is_empty() => std::mem::take(&mut self.pending),
                None if self.done => {
                    if self.total == 0 {
                        return Err(self.err("etcd sent an empty snapshot".into()));
                    }
                    return Ok(None);
                }
                None => {
                    // What is left is the start of one message.
                    if self.pending.len() > SNAPSHOT_MAX_LINE {
                        return Err(self.err("a gateway message longer than 1 MiB".into()));
                    }
                    let next = tokio::time::timeout(SNAPSHOT_IDLE, self.resp.chunk())
                        .await
                        .map_err(|_| {
                            self.err(format!("no data for {} s", SNAPSHOT_IDLE.as_secs()))
                        })?
                        .map_err(|e| self.err(format!("{e:#}")))?;
                    match next {
                        Some(bytes) => self.pending.extend_from_slice(&bytes),
                        None => self.done = true,
                    }
                    continue;
                }
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let m: Msg = serde_json::from_slice(&line)
                .map_err(|e| self.err(format!("bad snapshot message: {e}")))?;
            if let Some(e) = m.error {
                return Err(self.err(format!("snapshot failed: {e}")));
            }
            let blob = m.result.map(|c| c.blob).unwrap_or_default();
            let data = base64::engine::general_purpose::STANDARD
                .decode(blob.as_bytes())
                .map_err(|e| self.err(format!("bad snapshot chunk: {e}")))?;
            if data.is_empty() {
                continue;
            }
            self.total += data.len() as u64;
            return Ok(Some(data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_json_with_string_ids_parses() {
        let j = r#"{"header":{"cluster_id":"1","member_id":"17237436991929493444"},
            "members":[{"ID":"17237436991929493444","name":"a","peerURLs":["https://127.0.0.2:2380"],
            "clientURLs":["https://127.0.0.2:2379"]},{"ID":"5","peerURLs":["https://x:2380"]}]}"#;
        let b: MembersBody = serde_json::from_str(j).unwrap();
        assert_eq!(b.members[0].id, 17237436991929493444);
        assert_eq!(b.members[1].name, "");
        let s: Status = serde_json::from_str(
            r#"{"header":{"member_id":"9"},"version":"3.4.23","dbSize":"20480","leader":"9","raftIndex":"4","raftTerm":"2"}"#,
        )
        .unwrap();
        assert_eq!((s.header.member_id, s.db_size, s.leader), (9, 20480, 9));
    }
}
