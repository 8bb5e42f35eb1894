//! Validated scalar newtypes used in the machine config.
//!
//! Each one parses at the document boundary so that the rest of the code never
//! holds an unparsed CIDR or address. Their error messages say what was found
//! and what shape is expected, because that text reaches the operator verbatim.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Implements Display, Serialize, Deserialize (via FromStr) and a string JSON
/// schema for a newtype that round-trips through its text form.
macro_rules! string_newtype {
    ($name:ident, $schema:expr) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                $schema
            }
        }
    };
}

/// A network prefix such as `10.244.0.0/16` or `fd00:10:96::/112`. The address
/// must be the network address (no host bits set), which catches the common
/// typo of writing an interface address where a network was meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let net: IpNet = s.parse().map_err(|_| {
            format!("invalid CIDR {s:?}: expected ADDRESS/PREFIX such as 10.244.0.0/16")
        })?;
        if net.trunc() != net {
            return Err(format!(
                "CIDR {s:?} has host bits set: did you mean {}?",
                net.trunc()
            ));
        }
        Ok(Cidr(net))
    }
}
string_newtype!(
    Cidr,
    json_schema!({"type": "string", "format": "cidr", "examples": ["10.244.0.0/16"]})
);

/// An interface address with its prefix length, such as `192.168.1.10/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InterfaceAddress(pub IpNet);

impl FromStr for InterfaceAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let net: IpNet = s.parse().map_err(|_| {
            format!("invalid address {s:?}: expected ADDRESS/PREFIX such as 192.168.1.10/24")
        })?;
        Ok(InterfaceAddress(net))
    }
}
string_newtype!(
    InterfaceAddress,
    json_schema!({"type": "string", "format": "ip-with-prefix", "examples": ["192.168.1.10/24"]})
);

/// A URL such as `https://10.5.0.2:6443`. Parsed at the boundary; written
/// back without the trailing `/` that a bare URL gains when parsed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint(pub url::Url);

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        url::Url::parse(s)
            .map(Endpoint)
            .map_err(|e| format!("invalid URL {s:?} ({e}): expected https://HOST:PORT"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.as_str();
        if self.0.path() == "/" && self.0.query().is_none() && self.0.fragment().is_none() {
            f.write_str(text.trim_end_matches('/'))
        } else {
            f.write_str(text)
        }
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
impl JsonSchema for Endpoint {
    fn schema_name() -> Cow<'static, str> {
        "Endpoint".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "format": "uri", "examples": ["https://10.5.0.2:6443"]})
    }
}

/// A plain IP address (v4 or v6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ip(pub IpAddr);

impl FromStr for Ip {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse()
            .map(Ip)
            .map_err(|_| format!("invalid IP address {s:?}"))
    }
}
string_newtype!(
    Ip,
    json_schema!({"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]})
);

/// A DNS name (RFC 1123 subdomain): lowercase labels of letters, digits and
/// hyphens, separated by dots, at most 253 characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName(pub String);

impl DnsName {
    /// True when the name is a single label (no dots), which Kubernetes
    /// requires for node names used in some places and for the cluster name.
    pub fn is_label(&self) -> bool {
        !self.0.contains('.')
    }
}

impl FromStr for DnsName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| Err(format!("invalid DNS name {s:?}: {why}"));
        if s.is_empty() {
            return bad("it is empty");
        }
        if s.len() > 253 {
            return bad("longer than 253 characters");
        }
        for label in s.split('.') {
            if label.is_empty() || label.len() > 63 {
                return bad("each dot-separated label must be 1 to 63 characters");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return bad("use lowercase letters, digits and '-' only");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return bad("a label may not start or end with '-'");
            }
        }
        Ok(DnsName(s.to_owned()))
    }
}
string_newtype!(
    DnsName,
    json_schema!({"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", "maxLength": 253})
);

/// A Kubernetes release version such as `1.35.0` (a leading `v` is accepted
/// and dropped). Pre-releases are refused: a node OS pins released software.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KubernetesVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for KubernetesVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FromStr for KubernetesVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid Kubernetes version {s:?}: expected a release such as 1.35.0 (no pre-release suffix)")
        };
        let core = s.strip_prefix('v').unwrap_or(s);
        let parts: Vec<&str> = core.split('.').collect();
        if parts.len() != 3 {
            return Err(bad());
        }
        let num = |p: &str| -> Result<u32, String> {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        Ok(KubernetesVersion {
            major: num(parts[0])?,
            minor: num(parts[1])?,
            patch: num(parts[2])?,
        })
    }
}

impl Serialize for KubernetesVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> Deserialize<'de> for KubernetesVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // YAML reads `1.34` as a float; take any scalar as text so the error
        // below is about the version, not about YAML types.
        let text = scalar_string(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
impl JsonSchema for KubernetesVersion {
    fn schema_name() -> Cow<'static, str> {
        "KubernetesVersion".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "pattern": "^v?[0-9]+\\.[0-9]+\\.[0-9]+$", "examples": ["1.35.0"]})
    }
}

/// Reads a YAML scalar (string, number or boolean) as its text.
///
/// Sysctl values and command-line arguments are strings to the kernel and to
/// the binaries, but operators naturally write `net.ipv4.ip_forward: 1`.
pub fn scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    // A visitor rather than an untagged enum: errors that are not about the
    // value's type (a missing field) pass through unchanged.
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string, number or boolean")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(Text)
}

/// Reads a map whose values are scalars, keeping the values as text.
pub fn scalar_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    struct V(#[serde(deserialize_with = "scalar_string")] String);
    let m = std::collections::BTreeMap::<String, V>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, V(v))| (k, v)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_rejects_host_bits_and_garbage() {
        assert!("10.244.0.0/16".parse::<Cidr>().is_ok());
        let e = "10.244.1.0/16".parse::<Cidr>().unwrap_err();
        assert!(e.contains("did you mean 10.244.0.0/16"), "{e}");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("banana".parse::<Cidr>().is_err());
    }

    #[test]
    fn dns_names() {
        assert!("cp-1.example.com".parse::<DnsName>().is_ok());
        assert!("CP".parse::<DnsName>().is_err());
        assert!("-a".parse::<DnsName>().is_err());
        assert!("a..b".parse::<DnsName>().is_err());
        assert!("".parse::<DnsName>().is_err());
    }

    #[test]
    fn kubernetes_versions() {
        let v: KubernetesVersion = "v1.35.0".parse().unwrap();
        assert_eq!(v.to_string(), "1.35.0");
        assert!("1.34".parse::<KubernetesVersion>().is_err());
        assert!("1.35.0-alpha.1".parse::<KubernetesVersion>().is_err());
    }
}
