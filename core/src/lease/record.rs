//! A lease as flanneld stores it: key `<prefix>/subnets/A.B.C.D-LEN[&v6-LEN]`, value
//! `{"PublicIP":…,"PublicIPv6":…,"BackendType":…,"BackendData":…,"BackendV6Data":…}`.

use super::gojson;
use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

/// The subnets a lease covers. An IPv6-only lease has the IPv4 part `0.0.0.0/0`,
/// as flanneld writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubnetKey {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

impl fmt::Display for SubnetKey {
    /// flannel's `MakeSubnetKey`: `10.244.84.0-24`, `…&fd44:0:0:50::-64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v4 = self
            .v4
            .unwrap_or_else(|| Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).unwrap());
        write!(f, "{}-{}", v4.network(), v4.prefix_len())?;
        if let Some(v6) = self.v6 {
            write!(f, "&{}-{}", v6.network(), v6.prefix_len())?;
        }
        Ok(())
    }
}

impl FromStr for SubnetKey {
    type Err = String;

    /// The inverse of `Display`, as strict as flannel's `ParseSubnetKey` (lower-case
    /// hex only, network addresses only).
    fn from_str(s: &str) -> Result<SubnetKey, String> {
        let bad = || format!("{s:?} is not a subnet key (A.B.C.D-LEN[&IPV6-LEN])");
        let (v4, v6) = match s.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let v4: Ipv4Net = parse_part(v4).ok_or_else(bad)?;
        let v6 = match v6 {
            Some(p) if p.chars().all(|c| !c.is_ascii_uppercase()) => {
                Some(parse_part::<Ipv6Net>(p).ok_or_else(bad)?)
            }
            Some(_) => return Err(bad()),
            None => None,
        };
        let v4 = (v4.prefix_len() != 0 || v6.is_none()).then_some(v4);
        Ok(SubnetKey { v4, v6 })
    }
}

/// `addr-len` with `addr` the network address.
fn parse_part<N: FromStr + Copy + PartialEq + NetTrunc>(s: &str) -> Option<N> {
    let (addr, len) = s.rsplit_once('-')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let net: N = format!("{addr}/{len}").parse().ok()?;
    (net.trunc_net() == net).then_some(net)
}

trait NetTrunc {
    fn trunc_net(&self) -> Self;
}
impl NetTrunc for Ipv4Net {
    fn trunc_net(&self) -> Self {
        self.trunc()
    }
}
impl NetTrunc for Ipv6Net {
    fn trunc_net(&self) -> Self {
        self.trunc()
    }
}

/// The lease value. Field order and presence are flanneld's (`PublicIPv6` always
/// present, possibly `null`; the rest omitted when empty) so a weft node's value is
/// byte-identical to a flanneld node's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6")]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(rename = "BackendType", skip_serializing_if = "String::is_empty")]
    pub backend_type: String,
    #[serde(rename = "BackendData", skip_serializing_if = "Option::is_none")]
    pub backend_data: Option<BackendData>,
    #[serde(rename = "BackendV6Data", skip_serializing_if = "Option::is_none")]
    pub backend_v6_data: Option<BackendData>,
}

/// A lease's `BackendData` (flannel's `json.RawMessage`), kept as its JSON text: a
/// peer's is only read for its VtepMAC, and 10,000 parsed values would cost weftd
/// several MB (a map per peer) where the text costs ~50 bytes each.
#[derive(Clone)]
pub struct BackendData(Box<RawValue>);

impl BackendData {
    /// The parsed value (`null` is a value too).
    pub fn value(&self) -> Value {
        serde_json::from_str(self.0.get()).expect("holds valid JSON")
    }
}

impl From<Value> for BackendData {
    fn from(v: Value) -> BackendData {
        BackendData(serde_json::value::to_raw_value(&v).expect("a Value serialises"))
    }
}

/// Equal values, whatever the spacing or key order of their texts.
impl PartialEq for BackendData {
    fn eq(&self, other: &BackendData) -> bool {
        self.0.get() == other.0.get() || self.value() == other.value()
    }
}

impl fmt::Debug for BackendData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.get())
    }
}

/// Written as the JSON it holds, not as a string.
impl Serialize for BackendData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl LeaseAttrs {
    /// The value as flanneld marshals it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data serialises")
    }

    /// Parse a value written by flanneld, weft or a person (keys in any case,
    /// `PublicIPv6` null or missing).
    pub fn from_json(text: &[u8]) -> Result<LeaseAttrs, String> {
        let obj = gojson::object(text, "the lease value")?;
        let public_ip = match gojson::string(&obj, "PublicIP")? {
            Some(s) => s
                .parse()
                .map_err(|_| format!("PublicIP: {s:?} is not an IPv4 address"))?,
            None => Ipv4Addr::UNSPECIFIED,
        };
        let public_ipv6 = gojson::string(&obj, "PublicIPv6")?
            .map(|s| {
                s.parse()
                    .map_err(|_| format!("PublicIPv6: {s:?} is not an IPv6 address"))
            })
            .transpose()?;
        // RawMessage keeps a literal `null`; only an absent key is "no data".
        let raw = |name: &str| {
            obj.iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| BackendData::from(v.clone()))
                .next_back()
        };
        Ok(LeaseAttrs {
            public_ip,
            public_ipv6,
            backend_type: gojson::string(&obj, "BackendType")?
                .unwrap_or("")
                .to_owned(),
            backend_data: raw("BackendData"),
            backend_v6_data: raw("BackendV6Data"),
        })
    }
}

/// A lease: whose subnet, its value, and its etcd lease (0 for a reservation, a key
/// without a TTL).
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub key: SubnetKey,
    pub attrs: LeaseAttrs,
    pub etcd_lease: i64,
    /// Time left until the store drops the lease, when it expires at all.
    pub ttl: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_in_flannels_form() {
        for s in [
            "10.244.84.0-24",
            "10.244.37.0-24&fd44:0:0:50::-64",
            "0.0.0.0-0&fd44:0:0:5b::-64",
        ] {
            let k: SubnetKey = s.parse().unwrap();
            assert_eq!(k.to_string(), s);
        }
        let k: SubnetKey = "0.0.0.0-0&fd44:0:0:5b::-64".parse().unwrap();
        assert_eq!(k.v4, None);
        for bad in [
            "10.244.84.1-24",
            "10.244.84.0/24",
            "10.244.84.0-",
            "10.244.84.0-24&FD44::-64",
            "10.244.84.0-24&",
            "x",
            "10.244.84.0-+4",
        ] {
            assert!(bad.parse::<SubnetKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn values_are_byte_identical_to_flanneld() {
        // The values real flanneld wrote (reference/flannel.md §1).
        for golden in [
            r#"{"PublicIP":"10.77.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:8a:a6:b1:ae:b5"}}"#,
            r#"{"PublicIP":"10.77.0.1","PublicIPv6":"fd00:77::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"a6:9d:3c:e4:4a:a3"},"BackendV6Data":{"VNI":1,"VtepMAC":"ea:db:52:26:6b:08"}}"#,
            r#"{"PublicIP":"10.77.0.2","PublicIPv6":null,"BackendType":"host-gw"}"#,
        ] {
            let attrs = LeaseAttrs::from_json(golden.as_bytes()).unwrap();
            assert_eq!(attrs.to_json(), golden);
        }
        let hand = br#"{"publicip":"10.77.0.99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:11:22:33:44:55"}}"#;
        let attrs = LeaseAttrs::from_json(hand).unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::new(10, 77, 0, 99));
        assert_eq!(attrs.public_ipv6, None);
        assert!(
            LeaseAttrs::from_json(br#"{"PublicIP":"x"}"#)
                .unwrap_err()
                .contains("PublicIP")
        );
    }

    #[test]
    fn backend_data_is_kept_as_text_and_compared_as_a_value() {
        let a = LeaseAttrs::from_json(
            br#"{"PublicIP":"10.77.0.1","BackendType":"vxlan","BackendData": { "VtepMAC" : "02:11:22:33:44:55", "VNI":1 },"BackendV6Data":null}"#,
        )
        .unwrap();
        let data = a.backend_data.clone().unwrap();
        assert_eq!(data.value()["VtepMAC"], "02:11:22:33:44:55");
        // Other spacing and key order, same value.
        let same: BackendData =
            serde_json::json!({"VNI": 1, "VtepMAC": "02:11:22:33:44:55"}).into();
        assert_eq!(data, same);
        let other: BackendData =
            serde_json::json!({"VNI": 2, "VtepMAC": "02:11:22:33:44:55"}).into();
        assert_ne!(data, other);
        // A literal null is data (flannel's RawMessage), written back as such.
        assert_eq!(a.backend_v6_data.as_ref().unwrap().value(), Value::Null);
        assert!(
            a.to_json().ends_with(r#""BackendV6Data":null}"#),
            "{}",
            a.to_json()
        );
        assert_eq!(
            format!("{same:?}"),
            r#"{"VNI":1,"VtepMAC":"02:11:22:33:44:55"}"#
        );
    }
}
