//! nftables text transactions: build statements as text, pipe them to `nft -f -` as
//! one atomic kernel transaction. Transactions made only of set-element statements
//! skip nft: the `netlink` submodule sends them as one nfnetlink batch (same atomicity, same
//! per-statement errors, ~0.2 ms instead of ~3.5 ms), unless `WEFT_NFT` names an nft
//! binary to use.
//!
//! Why text and not JSON or netlink: the text syntax is nft's documented one, the
//! generated text is easy to read and snapshot, and one `nft -f -` run is one kernel
//! transaction (all of it applies or none does). See `reference/rust-stack.md` §2,
//! design (a″). Nothing here lists the ruleset on the way to applying a
//! transaction; [`list_table`] exists for the paths that may afford it (DEL without
//! hints, CHECK, GC).
//!
//! **No untrusted string reaches the text unchecked.** Names are [`Ident`]s
//! (`[A-Za-z][A-Za-z0-9_-]*`, at most 64 bytes, usually built from a hash with
//! [`Ident::hashed`]); comments are [`Comment`]s (sanitized to a safe character set
//! and cut to nft's 128-byte limit, so they can never close their quotes); addresses
//! and numbers are typed [`Value`]s; the only free text is `&'static str` keywords,
//! which are compile-time constants in the calling code. A keyword-like name
//! (`masquerade`) can still be a *syntax error*, never a second statement.
//!
//! **Costs measured on nft 1.0.6 / kernel 6.x, 2-core VM** (per `nft -f -` run):
//! - a transaction that only adds objects: ~3.5 ms (exec + nft start-up dominate);
//! - any transaction that deletes or flushes something, re-declares an existing base
//!   chain, or *fails* (the kernel aborts it): ~17–20 ms (RCU grace periods);
//! - `nft -j list` of a table: ~3 ms empty, ~10 ms with 1,000 map elements, ~70 ms
//!   with 5,000 (O(N): nft loads the whole cache, `get element` included).
//!
//! **Idempotent teardown.** nft 1.0.6 has no `destroy` command, and deleting a
//! missing object fails the whole transaction with ENOENT. Statements are therefore
//! kept in *units* (one statement, or a [`Transaction::group`] of them);
//! [`Transaction::apply_ignoring`] drops every unit whose statement failed with one of
//! the given [`ErrorKind`]s and retries the rest, so a DEL repeated after a partial
//! or complete earlier DEL still succeeds. nft reports every failing statement of a
//! batch (with its line), so this needs one extra run per round of failures, not one
//! per statement.

use crate::error::{CniError, code};
use ipnet::IpNet;
use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod netlink;

/// Environment variable naming the nft binary to run (tests, unusual installs).
pub const NFT_ENV: &str = "WEFT_NFT";

/// Directories searched for `nft` after `$PATH` (runtimes often exec plugins with a
/// `PATH` that lacks the sbin directories).
const FALLBACK_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"];

/// nft refuses comments longer than this (bytes).
pub const COMMENT_MAX: usize = 128;

/// Our limit for identifiers (the kernel allows 256; shorter keeps listings readable).
pub const IDENT_MAX: usize = 64;

// ---------------------------------------------------------------------------------
// Hashing
// ---------------------------------------------------------------------------------

/// FNV-1a, 64 bit: stable across versions and platforms, used to derive object
/// names from untrusted strings. Not collision resistant against an adversary.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// FNV-1a 64 over several parts, each followed by a 0xff byte (which never occurs in
/// UTF-8), so `["ab", "c"]` and `["a", "bc"]` hash differently.
pub fn hash64(parts: &[&str]) -> u64 {
    let mut buf = Vec::new();
    for p in parts {
        buf.extend_from_slice(p.as_bytes());
        buf.push(0xff);
    }
    fnv1a64(&buf)
}

/// [`hash64`] as 16 lowercase hex digits.
pub fn hash_hex(parts: &[&str]) -> String {
    format!("{:016x}", hash64(parts))
}

// ---------------------------------------------------------------------------------
// Names, comments, values
// ---------------------------------------------------------------------------------

/// A validated nft identifier (table, chain, set or map name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(String);

impl Ident {
    /// Accept `[A-Za-z][A-Za-z0-9_-]*` of at most [`IDENT_MAX`] bytes.
    pub fn new(s: impl Into<String>) -> Result<Ident, CniError> {
        let s = s.into();
        let mut chars = s.chars();
        let ok = s.len() <= IDENT_MAX
            && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if ok {
            Ok(Ident(s))
        } else {
            Err(CniError::internal(format!(
                "invalid nftables name {s:?}: must match [A-Za-z][A-Za-z0-9_-]* (at most {IDENT_MAX} bytes)"
            )))
        }
    }

    /// A name written in the caller's source code; panics if it is not valid.
    pub fn constant(s: &str) -> Ident {
        Ident::new(s).expect("constant nft names are valid")
    }

    /// `<prefix>-<hash_hex(parts)>`; `prefix` must itself be a valid identifier.
    pub fn hashed(prefix: &str, parts: &[&str]) -> Result<Ident, CniError> {
        Ident::new(format!("{prefix}-{}", hash_hex(parts)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A comment, sanitized so it can be put between double quotes: characters outside
/// `[A-Za-z0-9 _.:/@=+,%-]` become `_`, and the text is cut to [`COMMENT_MAX`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Comment(String);

impl Comment {
    pub fn new(s: &str) -> Comment {
        let mut out = String::with_capacity(s.len().min(COMMENT_MAX));
        for c in s.chars() {
            if out.len() >= COMMENT_MAX {
                break;
            }
            let safe = c.is_ascii_alphanumeric() || " _.:/@=+,%-".contains(c);
            out.push(if safe { c } else { '_' });
        }
        Comment(out)
    }

    /// The sanitized text, without quotes.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Comment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

/// A typed value in a rule, a set key or a map value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Addr(IpAddr),
    /// Printed as its network (host bits cleared) with the prefix length.
    Net(IpNet),
    Num(u64),
    /// A number printed in hex, at least 8 digits: `0x0000002a` (marks).
    Hex(u64),
    /// Trusted keyword text from the caller's source code (`tcp`, `ipv4_addr`).
    Kw(&'static str),
    /// An interface name (`ifname` type), printed quoted: `"veth1a2b3c4d"`.
    Iface(Ident),
    /// An Ethernet address (`ether_addr` type): `02:00:0a:00:00:05`.
    Mac([u8; 6]),
    /// A transport port (`inet_service` type).
    Port(u16),
    /// A transport protocol number (`inet_proto` type), printed by name where nft
    /// has one: `tcp`, `udp`, `sctp`.
    Proto(u8),
    /// `a . b . c`
    Concat(Vec<Value>),
}

impl From<IpAddr> for Value {
    fn from(a: IpAddr) -> Value {
        Value::Addr(a)
    }
}

impl From<IpNet> for Value {
    fn from(n: IpNet) -> Value {
        Value::Net(n)
    }
}

impl From<u16> for Value {
    fn from(n: u16) -> Value {
        Value::Num(n.into())
    }
}

impl From<u32> for Value {
    fn from(n: u32) -> Value {
        Value::Num(n.into())
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Addr(a) => write!(f, "{a}"),
            Value::Net(n) => write!(f, "{}/{}", n.network(), n.prefix_len()),
            Value::Num(n) => write!(f, "{n}"),
            Value::Hex(n) => write!(f, "0x{n:08x}"),
            Value::Kw(k) => f.write_str(k),
            Value::Iface(name) => write!(f, "\"{name}\""),
            Value::Mac(m) => write!(
                f,
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ),
            Value::Port(p) => write!(f, "{p}"),
            Value::Proto(6) => f.write_str("tcp"),
            Value::Proto(17) => f.write_str("udp"),
            Value::Proto(132) => f.write_str("sctp"),
            Value::Proto(n) => write!(f, "{n}"),
            Value::Concat(parts) => {
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" . ")?;
                    }
                    write!(f, "{p}")?;
                }
                Ok(())
            }
        }
    }
}

/// A verdict, as a rule's last word or a verdict map's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Continue,
    Return,
    Jump(Ident),
    Goto(Ident),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Continue => f.write_str("continue"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ip,
    Ip6,
    Inet,
    Arp,
    Bridge,
    Netdev,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
            Family::Arp => "arp",
            Family::Bridge => "bridge",
            Family::Netdev => "netdev",
        })
    }
}

// ---------------------------------------------------------------------------------
// Rules, elements, declarations
// ---------------------------------------------------------------------------------

/// A rule body built from typed pieces: `Rule::new().kw("ip daddr").value(net).kw("return")`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule(Vec<String>);

impl Rule {
    pub fn new() -> Rule {
        Rule::default()
    }

    /// Trusted text from the caller's source (`ip daddr`, `masquerade`, `!=`).
    pub fn kw(mut self, kw: &'static str) -> Rule {
        debug_assert!(
            !kw.contains(['\n', ';', '#', '"']),
            "nft keyword text {kw:?} may not contain newline, ';', '#' or '\"'"
        );
        self.0.push(kw.to_string());
        self
    }

    /// An nft expression an administrator wrote in a plugin's config (portmap's
    /// `conditionsV4`), which the plugin has checked to hold no line break, `;` or
    /// `#`, so it cannot end the statement.
    pub fn condition(mut self, text: &str) -> Rule {
        debug_assert!(!text.contains(['\n', '\r', ';', '#']), "{text:?}");
        self.0.push(text.to_string());
        self
    }

    pub fn value(mut self, v: impl Into<Value>) -> Rule {
        self.0.push(v.into().to_string());
        self
    }

    /// `@name`: a reference to a named set or map.
    pub fn set_ref(mut self, name: &Ident) -> Rule {
        self.0.push(format!("@{name}"));
        self
    }

    pub fn verdict(mut self, v: &Verdict) -> Rule {
        self.0.push(v.to_string());
        self
    }

    pub fn comment(mut self, c: &Comment) -> Rule {
        self.0.push(format!("comment {c}"));
        self
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(" "))
    }
}

/// One element of a set (`key`) or map (`key : value`), optionally with a comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    key: Value,
    comment: Option<Comment>,
    data: Option<ElementData>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ElementData {
    Verdict(Verdict),
    Value(Value),
}

impl Element {
    pub fn new(key: impl Into<Value>) -> Element {
        Element {
            key: key.into(),
            comment: None,
            data: None,
        }
    }

    pub fn comment(mut self, c: Comment) -> Element {
        self.comment = Some(c);
        self
    }

    /// The value of a verdict map element.
    pub fn verdict(mut self, v: Verdict) -> Element {
        self.data = Some(ElementData::Verdict(v));
        self
    }

    /// The value of a data map element.
    pub fn value(mut self, v: impl Into<Value>) -> Element {
        self.data = Some(ElementData::Value(v.into()));
        self
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.key)?;
        if let Some(c) = &self.comment {
            write!(f, " comment {c}")?;
        }
        match &self.data {
            Some(ElementData::Verdict(v)) => write!(f, " : {v}"),
            Some(ElementData::Value(v)) => write!(f, " : {v}"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
    Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
    Ingress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Raw,
    Mangle,
    DstNat,
    Filter,
    Security,
    SrcNat,
    Num(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Accept,
    Drop,
}

/// What makes a chain a base chain: `type nat hook postrouting priority srcnat; policy accept;`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: Priority,
    pub policy: Policy,
}

impl fmt::Display for BaseChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
            ChainType::Route => "route",
        };
        let hook = match self.hook {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
            Hook::Ingress => "ingress",
        };
        write!(f, "type {kind} hook {hook} priority ")?;
        match self.priority {
            Priority::Raw => f.write_str("raw")?,
            Priority::Mangle => f.write_str("mangle")?,
            Priority::DstNat => f.write_str("dstnat")?,
            Priority::Filter => f.write_str("filter")?,
            Priority::Security => f.write_str("security")?,
            Priority::SrcNat => f.write_str("srcnat")?,
            Priority::Num(n) => write!(f, "{n}")?,
        }
        let policy = match self.policy {
            Policy::Accept => "accept",
            Policy::Drop => "drop",
        };
        write!(f, "; policy {policy};")
    }
}

/// A named set (`key_type`) or map (`key_type : data_type`) declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDecl {
    key_type: &'static str,
    data_type: Option<&'static str>,
    flags: Vec<&'static str>,
    comment: Option<Comment>,
}

impl SetDecl {
    /// `add set … { type <key_type>; }`
    pub fn set(key_type: &'static str) -> SetDecl {
        SetDecl {
            key_type,
            data_type: None,
            flags: Vec::new(),
            comment: None,
        }
    }

    /// `add map … { type <key_type> : <data_type>; }` (`verdict` for a verdict map).
    pub fn map(key_type: &'static str, data_type: &'static str) -> SetDecl {
        SetDecl {
            data_type: Some(data_type),
            ..SetDecl::set(key_type)
        }
    }

    pub fn flag(mut self, flag: &'static str) -> SetDecl {
        self.flags.push(flag);
        self
    }

    pub fn comment(mut self, c: Comment) -> SetDecl {
        self.comment = Some(c);
        self
    }
}

// ---------------------------------------------------------------------------------
// Transactions
// ---------------------------------------------------------------------------------

/// A list of nft statements applied as one `nft -f -` run (one kernel transaction).
///
/// Statements are kept in units for [`apply_ignoring`](Self::apply_ignoring): each
/// statement is its own unit unless added inside [`group`](Self::group).
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    units: Vec<Vec<Stmt>>,
    grouping: bool,
}

/// One statement: its text, and for element statements the structure the netlink
/// path sends instead.
#[derive(Debug, Clone)]
struct Stmt {
    text: String,
    elems: Option<ElemOp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ElemVerb {
    Add,
    Create,
    Delete,
}

/// `<verb> element <family> <table> <set> { <elems> }`.
#[derive(Debug, Clone)]
struct ElemOp {
    verb: ElemVerb,
    family: Family,
    table: Ident,
    set: Ident,
    elems: Vec<Element>,
}

impl Transaction {
    pub fn new() -> Transaction {
        Transaction::default()
    }

    fn push(&mut self, text: String) -> &mut Self {
        self.push_stmt(Stmt { text, elems: None })
    }

    fn push_stmt(&mut self, stmt: Stmt) -> &mut Self {
        debug_assert!(
            !stmt.text.contains('\n'),
            "one statement per line: {stmt:?}"
        );
        match self.units.last_mut() {
            Some(unit) if self.grouping => unit.push(stmt),
            _ => self.units.push(vec![stmt]),
        }
        self
    }

    /// Statements added by `f` form one unit: [`apply_ignoring`](Self::apply_ignoring)
    /// drops or keeps them together (e.g. a guard `add element` with the `delete
    /// element` it protects). Nested groups join the outer one.
    pub fn group(&mut self, f: impl FnOnce(&mut Transaction)) -> &mut Self {
        if self.grouping {
            f(self);
            return self;
        }
        self.units.push(Vec::new());
        self.grouping = true;
        f(self);
        self.grouping = false;
        if self.units.last().is_some_and(Vec::is_empty) {
            self.units.pop();
        }
        self
    }

    /// Append every unit of `other`.
    pub fn extend(&mut self, other: Transaction) -> &mut Self {
        for unit in other.units {
            if self.grouping {
                for s in unit {
                    self.push_stmt(s);
                }
            } else {
                self.units.push(unit);
            }
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.units.iter().all(Vec::is_empty)
    }

    /// Number of statements (lines).
    pub fn len(&self) -> usize {
        self.units.iter().map(Vec::len).sum()
    }

    pub fn add_table(
        &mut self,
        family: Family,
        table: &Ident,
        comment: Option<&Comment>,
    ) -> &mut Self {
        let mut s = format!("add table {family} {table}");
        if let Some(c) = comment {
            let _ = write!(s, " {{ comment {c}; }}");
        }
        self.push(s)
    }

    pub fn delete_table(&mut self, family: Family, table: &Ident) -> &mut Self {
        self.push(format!("delete table {family} {table}"))
    }

    fn chain_stmt(
        verb: &str,
        family: Family,
        table: &Ident,
        chain: &Ident,
        base: Option<&BaseChain>,
        comment: Option<&Comment>,
    ) -> String {
        let mut s = format!("{verb} chain {family} {table} {chain}");
        if base.is_some() || comment.is_some() {
            s.push_str(" {");
            if let Some(b) = base {
                let _ = write!(s, " {b}");
            }
            if let Some(c) = comment {
                let _ = write!(s, " comment {c};");
            }
            s.push_str(" }");
        }
        s
    }

    /// `add chain`: succeeds when the chain exists (with the same base-chain spec).
    pub fn add_chain(
        &mut self,
        family: Family,
        table: &Ident,
        chain: &Ident,
        base: Option<&BaseChain>,
        comment: Option<&Comment>,
    ) -> &mut Self {
        self.push(Self::chain_stmt("add", family, table, chain, base, comment))
    }

    /// `create chain`: fails with [`ErrorKind::Exists`] when the chain exists.
    pub fn create_chain(
        &mut self,
        family: Family,
        table: &Ident,
        chain: &Ident,
        base: Option<&BaseChain>,
        comment: Option<&Comment>,
    ) -> &mut Self {
        self.push(Self::chain_stmt(
            "create", family, table, chain, base, comment,
        ))
    }

    pub fn flush_chain(&mut self, family: Family, table: &Ident, chain: &Ident) -> &mut Self {
        self.push(format!("flush chain {family} {table} {chain}"))
    }

    /// Fails with [`ErrorKind::Busy`] while a rule or map element jumps to the chain,
    /// and while the chain has rules (flush it first, in the same transaction).
    pub fn delete_chain(&mut self, family: Family, table: &Ident, chain: &Ident) -> &mut Self {
        self.push(format!("delete chain {family} {table} {chain}"))
    }

    /// `add chain` + `flush chain` + `rules`: afterwards the chain holds exactly
    /// `rules`, whatever it held before (idempotent, atomic, repairs tampering).
    pub fn rebuild_chain(
        &mut self,
        family: Family,
        table: &Ident,
        chain: &Ident,
        base: Option<&BaseChain>,
        comment: Option<&Comment>,
        rules: &[Rule],
    ) -> &mut Self {
        self.add_chain(family, table, chain, base, comment)
            .flush_chain(family, table, chain);
        for r in rules {
            self.add_rule(family, table, chain, r);
        }
        self
    }

    /// `flush chain` + `delete chain` as one unit (see [`Self::apply_ignoring`]).
    pub fn drop_chain(&mut self, family: Family, table: &Ident, chain: &Ident) -> &mut Self {
        self.group(|tx| {
            tx.flush_chain(family, table, chain)
                .delete_chain(family, table, chain);
        })
    }

    /// `insert rule` prepends: it is **not** idempotent.
    pub fn insert_rule(
        &mut self,
        family: Family,
        table: &Ident,
        chain: &Ident,
        rule: &Rule,
    ) -> &mut Self {
        self.push(format!("insert rule {family} {table} {chain} {rule}"))
    }

    /// `add rule` appends: it is **not** idempotent.
    pub fn add_rule(
        &mut self,
        family: Family,
        table: &Ident,
        chain: &Ident,
        rule: &Rule,
    ) -> &mut Self {
        self.push(format!("add rule {family} {table} {chain} {rule}"))
    }

    /// `add set` / `add map`: succeeds when it exists with the same type.
    pub fn add_set(
        &mut self,
        family: Family,
        table: &Ident,
        name: &Ident,
        decl: &SetDecl,
    ) -> &mut Self {
        let kind = if decl.data_type.is_some() {
            "map"
        } else {
            "set"
        };
        let mut s = format!(
            "add {kind} {family} {table} {name} {{ type {}",
            decl.key_type
        );
        if let Some(d) = decl.data_type {
            let _ = write!(s, " : {d}");
        }
        s.push(';');
        if !decl.flags.is_empty() {
            let _ = write!(s, " flags {};", decl.flags.join(","));
        }
        if let Some(c) = &decl.comment {
            let _ = write!(s, " comment {c};");
        }
        s.push_str(" }");
        self.push(s)
    }

    /// `delete set`: a set (not a map). Fails with [`ErrorKind::Busy`] while a rule
    /// refers to it (rebuild that chain first, in the same transaction).
    pub fn delete_set(&mut self, family: Family, table: &Ident, name: &Ident) -> &mut Self {
        self.push(format!("delete set {family} {table} {name}"))
    }

    /// `delete map`. Fails with [`ErrorKind::Busy`] while a rule refers to it.
    pub fn delete_map(&mut self, family: Family, table: &Ident, name: &Ident) -> &mut Self {
        self.push(format!("delete map {family} {table} {name}"))
    }

    pub fn flush_set(&mut self, family: Family, table: &Ident, name: &Ident) -> &mut Self {
        self.push(format!("flush set {family} {table} {name}"))
    }

    /// `add element`: a no-op for a key that exists with the same value (its comment is
    /// *not* updated); fails with [`ErrorKind::Exists`] if the key maps to another value.
    /// An empty list adds nothing.
    pub fn add_elements(
        &mut self,
        family: Family,
        table: &Ident,
        set: &Ident,
        elems: &[Element],
    ) -> &mut Self {
        self.elements(ElemVerb::Add, family, table, set, elems)
    }

    /// `create element`: fails with [`ErrorKind::Exists`] for any existing key.
    pub fn create_elements(
        &mut self,
        family: Family,
        table: &Ident,
        set: &Ident,
        elems: &[Element],
    ) -> &mut Self {
        self.elements(ElemVerb::Create, family, table, set, elems)
    }

    fn elements(
        &mut self,
        verb: ElemVerb,
        family: Family,
        table: &Ident,
        set: &Ident,
        elems: &[Element],
    ) -> &mut Self {
        if elems.is_empty() {
            return self;
        }
        let word = match verb {
            ElemVerb::Add => "add",
            ElemVerb::Create => "create",
            ElemVerb::Delete => "delete",
        };
        let items: Vec<String> = match verb {
            ElemVerb::Delete => elems.iter().map(|e| e.key.to_string()).collect(),
            _ => elems.iter().map(Element::to_string).collect(),
        };
        let text = format!(
            "{word} element {family} {table} {set} {{ {} }}",
            items.join(", ")
        );
        let op = ElemOp {
            verb,
            family,
            table: table.clone(),
            set: set.clone(),
            elems: elems.to_vec(),
        };
        self.push_stmt(Stmt {
            text,
            elems: Some(op),
        })
    }

    /// `delete element` by key; fails with [`ErrorKind::NotFound`] for a missing key.
    pub fn delete_elements(
        &mut self,
        family: Family,
        table: &Ident,
        set: &Ident,
        keys: &[Value],
    ) -> &mut Self {
        let elems: Vec<Element> = keys.iter().cloned().map(Element::new).collect();
        self.elements(ElemVerb::Delete, family, table, set, &elems)
    }

    fn render(units: &[&Vec<Stmt>]) -> String {
        let mut s = String::new();
        for unit in units {
            for stmt in unit.iter() {
                s.push_str(&stmt.text);
                s.push('\n');
            }
        }
        s
    }

    /// Apply `units` as one transaction: over nfnetlink when they are all element
    /// statements it can encode (and no nft binary is forced through `WEFT_NFT`),
    /// else through `nft -f -`. Errors are numbered by statement either way.
    fn run_units(units: &[&Vec<Stmt>]) -> Result<(), NftError> {
        let direct: Option<Vec<(&ElemOp, &str)>> = units
            .iter()
            .flat_map(|u| u.iter())
            .map(|s| match &s.elems {
                Some(op) if netlink::encodable(op) => Some((op, s.text.as_str())),
                _ => None,
            })
            .collect();
        match direct {
            Some(ops) if std::env::var_os(NFT_ENV).is_none() => netlink::apply(&ops),
            _ => run_script(&Self::render(units)).map(drop),
        }
    }

    /// Apply all statements in one transaction, keeping the structured error.
    pub fn try_apply(&self) -> Result<(), NftError> {
        if self.is_empty() {
            return Ok(());
        }
        let units: Vec<&Vec<Stmt>> = self.units.iter().collect();
        Self::run_units(&units)
    }

    /// Apply all statements in one transaction; any failure is a CNI error (code 999).
    pub fn apply(&self) -> Result<(), CniError> {
        self.try_apply().map_err(CniError::from)
    }

    /// Apply, dropping every unit with a statement that fails with one of `ignore`
    /// and retrying the rest, until the remainder applies (as one transaction) or
    /// fails otherwise. Returns the dropped units' statements.
    ///
    /// Use it for teardown: `apply_ignoring(&[ErrorKind::NotFound])` makes a DEL of
    /// things that are already (partly) gone succeed and delete the rest.
    pub fn apply_ignoring(&self, ignore: &[ErrorKind]) -> Result<Vec<String>, NftError> {
        let mut units: Vec<&Vec<Stmt>> = self.units.iter().filter(|u| !u.is_empty()).collect();
        let mut dropped = Vec::new();
        while !units.is_empty() {
            let err = match Self::run_units(&units) {
                Ok(_) => return Ok(dropped),
                Err(e) => e,
            };
            let NftError::Failed { errors, .. } = &err else {
                return Err(err);
            };
            if errors.is_empty()
                || !errors
                    .iter()
                    .all(|e| e.line > 0 && ignore.contains(&e.kind))
            {
                return Err(err);
            }
            // Map failing lines (1-based) back to units.
            let mut bad = vec![false; units.len()];
            let mut line = 0;
            for (i, unit) in units.iter().enumerate() {
                let (first, last) = (line + 1, line + unit.len());
                if errors.iter().any(|e| (first..=last).contains(&e.line)) {
                    bad[i] = true;
                }
                line = last;
            }
            if !bad.contains(&true) {
                return Err(err);
            }
            let mut keep = Vec::with_capacity(units.len());
            for (unit, bad) in units.into_iter().zip(bad) {
                if bad {
                    dropped.extend(unit.iter().map(|s| s.text.clone()));
                } else {
                    keep.push(unit);
                }
            }
            units = keep;
        }
        Ok(dropped)
    }

    /// [`apply_ignoring`](Self::apply_ignoring) `NotFound`, as a CNI error otherwise:
    /// the idempotent mode for DEL.
    pub fn apply_teardown(&self) -> Result<(), CniError> {
        self.apply_ignoring(&[ErrorKind::NotFound])
            .map(|_| ())
            .map_err(CniError::from)
    }
}

impl fmt::Display for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units: Vec<&Vec<Stmt>> = self.units.iter().collect();
        f.write_str(&Self::render(&units))
    }
}

// ---------------------------------------------------------------------------------
// Running nft
// ---------------------------------------------------------------------------------

/// What a failing statement failed with, from nft's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// ENOENT: a table, chain, set, element or jump target does not exist.
    NotFound,
    /// EEXIST: `create` of an existing object, or a map key with another value.
    Exists,
    /// EBUSY: deleting a chain or set that is still referenced (or not empty).
    Busy,
    /// The text did not parse (a bug in the caller, or a keyword used as a name).
    Syntax,
    Other,
}

impl ErrorKind {
    fn classify(msg: &str) -> ErrorKind {
        if msg.contains("No such file or directory") {
            ErrorKind::NotFound
        } else if msg.contains("File exists") {
            ErrorKind::Exists
        } else if msg.contains("Device or resource busy") {
            ErrorKind::Busy
        } else if msg.contains("syntax error") {
            ErrorKind::Syntax
        } else {
            ErrorKind::Other
        }
    }
}

/// One error nft reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StmtError {
    /// 1-based line in the script, 0 when nft gave no location.
    pub line: usize,
    pub kind: ErrorKind,
    /// nft's message after `Error: `.
    pub message: String,
    /// The statement nft printed under the message (the failing line).
    pub statement: String,
}

/// Why running nft failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftError {
    /// No nft binary: `tried` says where we looked.
    NotInstalled { tried: String },
    /// Spawning nft or talking to it failed.
    Io(String),
    /// nft ran and exited non-zero.
    Failed {
        status: String,
        stderr: String,
        errors: Vec<StmtError>,
    },
}

impl NftError {
    /// Whether nft ran and every error it reported is one of `kinds`.
    pub fn only(&self, kinds: &[ErrorKind]) -> bool {
        match self {
            NftError::Failed { errors, .. } => {
                !errors.is_empty() && errors.iter().all(|e| kinds.contains(&e.kind))
            }
            _ => false,
        }
    }

    /// Whether nft reported at least one error of `kind`.
    pub fn has(&self, kind: ErrorKind) -> bool {
        matches!(self, NftError::Failed { errors, .. } if errors.iter().any(|e| e.kind == kind))
    }
}

impl fmt::Display for NftError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NftError::NotInstalled { tried } => write!(
                f,
                "the nft binary was not found ({tried}): install the nftables package (e.g. `apt-get install nftables`) or set {NFT_ENV}"
            ),
            NftError::Io(m) => write!(f, "running nft: {m}"),
            NftError::Failed {
                status,
                stderr,
                errors,
            } => match errors.first() {
                Some(e) if e.line > 0 => {
                    write!(
                        f,
                        "nft failed: {} (line {}: `{}`)",
                        e.message, e.line, e.statement
                    )
                }
                Some(e) if !e.statement.is_empty() => {
                    write!(f, "nft failed: {} (`{}`)", e.message, e.statement)
                }
                Some(e) => write!(f, "nft failed: {}", e.message),
                None => write!(f, "nft failed ({status}): {}", first_line(stderr)),
            },
        }
    }
}

impl std::error::Error for NftError {}

impl From<NftError> for CniError {
    fn from(e: NftError) -> CniError {
        let err = CniError::new(code::INTERNAL, e.to_string());
        match &e {
            NftError::Failed { stderr, .. } => err.with_details(truncate(stderr.trim(), 4096)),
            _ => err,
        }
    }
}

fn first_line(s: &str) -> &str {
    s.trim().lines().next().unwrap_or("")
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Parse nft's stderr: `[<file>:<line>:<cols>: ]Error: <message>`, then the echoed
/// statement and a caret line.
pub fn parse_errors(stderr: &str) -> Vec<StmtError> {
    let lines: Vec<&str> = stderr.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(pos) = l.find("Error: ") else {
            continue;
        };
        // The prefix is empty or a location like `/dev/stdin:3:41-48:` (or `netlink:`);
        // an echoed statement (which has spaces) that happens to contain the word is not.
        if l[..pos].trim_end().contains(char::is_whitespace) {
            continue;
        }
        let message = l[pos + "Error: ".len()..].trim().to_string();
        let loc = l[..pos].trim_end().trim_end_matches(':');
        // `/dev/stdin:3:41-48` -> 3 (the file name itself has no ':' for stdin).
        let line = loc
            .rsplit(':')
            .nth(1)
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        let statement = lines
            .get(i + 1)
            .filter(|s| !s.contains("Error: ") && !s.trim_start().starts_with('^'))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        out.push(StmtError {
            line,
            kind: ErrorKind::classify(&message),
            message,
            statement,
        });
    }
    out
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The nft binary: `$WEFT_NFT`, else `nft` on `$PATH`, else the sbin directories.
pub fn nft_binary() -> Result<PathBuf, NftError> {
    find_nft(
        std::env::var_os(NFT_ENV),
        std::env::var_os("PATH"),
        FALLBACK_DIRS,
    )
}

fn find_nft(
    explicit: Option<OsString>,
    path: Option<OsString>,
    fallback: &[&str],
) -> Result<PathBuf, NftError> {
    if let Some(p) = explicit.filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let path = path.unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(fallback.iter().map(PathBuf::from));
    for dir in dirs {
        let cand = dir.join("nft");
        if is_executable(&cand) {
            return Ok(cand);
        }
    }
    Err(NftError::NotInstalled {
        tried: format!("$PATH and {}", fallback.join(", ")),
    })
}

/// Run nft with `args`, feeding `stdin`; returns stdout on success.
pub fn run(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    run_with(&nft_binary()?, args, stdin)
}

fn run_with(bin: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            NftError::NotInstalled {
                tried: bin.display().to_string(),
            }
        } else {
            NftError::Io(format!("spawning {}: {e}", bin.display()))
        }
    })?;
    if let Some(text) = stdin {
        // nft reads its whole input before it prints anything, so writing everything
        // first cannot deadlock on a full stderr pipe.
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let wrote = pipe.write_all(text.as_bytes());
        drop(pipe);
        if let Err(e) = wrote {
            // nft exited early (e.g. it is not nft); its output says more.
            let out = child
                .wait_with_output()
                .map_err(|e2| NftError::Io(e2.to_string()))?;
            if out.status.success() {
                return Err(NftError::Io(format!("writing to nft: {e}")));
            }
            return Err(failed(&out));
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NftError::Io(format!("waiting for nft: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(failed(&out))
    }
}

fn failed(out: &std::process::Output) -> NftError {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    NftError::Failed {
        status: out.status.to_string(),
        errors: parse_errors(&stderr),
        stderr,
    }
}

/// Pipe `script` to `nft -f -`: one atomic transaction.
pub fn run_script(script: &str) -> Result<String, NftError> {
    run(&["-f", "-"], Some(script))
}

// ---------------------------------------------------------------------------------
// Listing (not for hot paths)
// ---------------------------------------------------------------------------------

/// A chain as `nft -j list` shows it. (nft 1.0.6 leaves chain comments out of JSON.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    pub name: String,
    /// `type` of a base chain (`nat`), `None` for a regular chain.
    pub kind: Option<String>,
    pub hook: Option<String>,
    pub prio: Option<i64>,
    pub policy: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuleInfo {
    pub chain: String,
    pub handle: u64,
    pub expr: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ElementInfo {
    /// The key as nft's JSON has it: a string for a plain address, an object for a
    /// prefix or a concatenation.
    pub key: serde_json::Value,
    pub comment: Option<String>,
    /// A map element's value (`{"jump": {"target": "x"}}`), `None` in a set.
    pub data: Option<serde_json::Value>,
}

impl ElementInfo {
    /// The key as a string, for plain keys (addresses, numbers).
    pub fn key_str(&self) -> Option<String> {
        match &self.key {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// `("jump" | "goto", target)` for a verdict map element.
    pub fn verdict_target(&self) -> Option<(&str, &str)> {
        let obj = self.data.as_ref()?.as_object()?;
        let (kind, v) = obj.iter().next()?;
        Some((kind.as_str(), v.get("target")?.as_str()?))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SetInfo {
    pub name: String,
    pub is_map: bool,
    pub elements: Vec<ElementInfo>,
}

/// One table's objects, parsed from `nft -j list table`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Listing {
    pub chains: Vec<ChainInfo>,
    pub rules: Vec<RuleInfo>,
    pub sets: Vec<SetInfo>,
}

impl Listing {
    pub fn chain(&self, name: &str) -> Option<&ChainInfo> {
        self.chains.iter().find(|c| c.name == name)
    }

    pub fn set(&self, name: &str) -> Option<&SetInfo> {
        self.sets.iter().find(|s| s.name == name)
    }

    pub fn rules_of<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a RuleInfo> + 'a {
        self.rules.iter().filter(move |r| r.chain == chain)
    }

    /// Parse `nft -j list …` output.
    pub fn from_json(text: &str) -> Result<Listing, CniError> {
        let doc: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| CniError::internal(format!("parsing `nft -j list` output: {e}")))?;
        let items = doc
            .get("nftables")
            .and_then(|v| v.as_array())
            .ok_or_else(|| CniError::internal("`nft -j list` output has no \"nftables\" array"))?;
        let mut l = Listing::default();
        let s =
            |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        for item in items {
            if let Some(c) = item.get("chain") {
                l.chains.push(ChainInfo {
                    name: s(c, "name").unwrap_or_default(),
                    kind: s(c, "type"),
                    hook: s(c, "hook"),
                    prio: c.get("prio").and_then(|p| p.as_i64()),
                    policy: s(c, "policy"),
                });
            } else if let Some(r) = item.get("rule") {
                l.rules.push(RuleInfo {
                    chain: s(r, "chain").unwrap_or_default(),
                    handle: r.get("handle").and_then(|h| h.as_u64()).unwrap_or(0),
                    expr: r
                        .get("expr")
                        .and_then(|e| e.as_array())
                        .cloned()
                        .unwrap_or_default(),
                });
            } else if let Some((set, is_map)) = item
                .get("map")
                .map(|m| (m, true))
                .or_else(|| item.get("set").map(|m| (m, false)))
            {
                let mut elements = Vec::new();
                for e in set
                    .get("elem")
                    .and_then(|e| e.as_array())
                    .into_iter()
                    .flatten()
                {
                    let (key, data) = match e.as_array() {
                        Some(pair) if is_map && pair.len() == 2 => {
                            (&pair[0], Some(pair[1].clone()))
                        }
                        _ => (e, None),
                    };
                    // `{"elem": {"val": K, "comment": C, …}}` when the element has extras.
                    let (key, comment) = match key.get("elem") {
                        Some(inner) => (
                            inner.get("val").cloned().unwrap_or(serde_json::Value::Null),
                            s(inner, "comment"),
                        ),
                        None => (key.clone(), None),
                    };
                    elements.push(ElementInfo { key, comment, data });
                }
                l.sets.push(SetInfo {
                    name: s(set, "name").unwrap_or_default(),
                    is_map,
                    elements,
                });
            }
        }
        Ok(l)
    }
}

/// `nft -j list table <family> <table>`, parsed; `None` when the table does not exist.
/// O(size of the table): not for the ADD path.
pub fn list_table(family: Family, table: &Ident) -> Result<Option<Listing>, CniError> {
    let fam = family.to_string();
    match run(&["-j", "list", "table", &fam, table.as_str()], None) {
        Ok(out) => Listing::from_json(&out).map(Some),
        Err(e) if e.only(&[ErrorKind::NotFound]) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Ident {
        Ident::new(s).unwrap()
    }

    #[test]
    fn fnv_is_the_standard_fnv1a64() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_ne!(hash_hex(&["ab", "c"]), hash_hex(&["a", "bc"]));
        assert_eq!(hash_hex(&["x"]).len(), 16);
    }

    #[test]
    fn identifiers_are_validated() {
        for ok in ["a", "weft_masq", "masq-0123abcd-ffff", "A9"] {
            assert!(Ident::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "9abc",
            "-a",
            "a b",
            "a;b",
            "a\"",
            "a\nadd table ip x",
            "a.b",
            "é",
            &"a".repeat(IDENT_MAX + 1),
        ] {
            let e = Ident::new(bad).unwrap_err();
            assert_eq!(e.code, 999, "{bad}");
        }
        assert_eq!(
            Ident::hashed("masq", &["n"]).unwrap().as_str(),
            format!("masq-{}", hash_hex(&["n"]))
        );
    }

    #[test]
    fn comments_cannot_break_out() {
        let c = Comment::new("net:a\" ; flush ruleset\nid:\\x {}#é");
        assert_eq!(c.as_str(), "net:a_ _ flush ruleset_id:_x ____");
        assert_eq!(c.to_string(), "\"net:a_ _ flush ruleset_id:_x ____\"");
        let long = Comment::new(&"x".repeat(300));
        assert_eq!(long.as_str().len(), COMMENT_MAX);
    }

    #[test]
    fn values_print_in_nft_syntax() {
        let net: IpNet = "10.1.0.5/24".parse().unwrap();
        assert_eq!(Value::from(net).to_string(), "10.1.0.0/24");
        let v6: IpNet = "fd00::5/64".parse().unwrap();
        assert_eq!(Value::from(v6).to_string(), "fd00::/64");
        let cat = Value::Concat(vec![Value::Kw("tcp"), Value::from(8080u16), Value::Hex(42)]);
        assert_eq!(cat.to_string(), "tcp . 8080 . 0x0000002a");
    }

    fn sample() -> Transaction {
        let (t, c, m) = (id("weft_test"), id("post"), id("pods"));
        let mut tx = Transaction::new();
        tx.add_table(Family::Inet, &t, Some(&Comment::new("managed by weft")))
            .add_set(
                Family::Inet,
                &t,
                &m,
                &SetDecl::map("ipv4_addr", "verdict").comment(Comment::new("pods")),
            )
            .add_set(
                Family::Inet,
                &t,
                &id("nets"),
                &SetDecl::set("ipv4_addr").flag("interval"),
            )
            .add_chain(
                Family::Inet,
                &t,
                &c,
                Some(&BaseChain {
                    kind: ChainType::Nat,
                    hook: Hook::Postrouting,
                    priority: Priority::SrcNat,
                    policy: Policy::Accept,
                }),
                None,
            )
            .flush_chain(Family::Inet, &t, &c)
            .add_rule(
                Family::Inet,
                &t,
                &c,
                &Rule::new().kw("ip saddr vmap").set_ref(&m),
            )
            .create_chain(
                Family::Inet,
                &t,
                &id("x"),
                None,
                Some(&Comment::new("who \"me\"")),
            )
            .add_rule(
                Family::Inet,
                &t,
                &id("x"),
                &Rule::new()
                    .kw("ip daddr")
                    .value("10.0.0.0/8".parse::<IpNet>().unwrap())
                    .verdict(&Verdict::Return)
                    .comment(&Comment::new("subnet")),
            )
            .add_elements(
                Family::Inet,
                &t,
                &m,
                &[
                    Element::new("10.0.0.2".parse::<IpAddr>().unwrap())
                        .comment(Comment::new("a"))
                        .verdict(Verdict::Jump(id("x"))),
                    Element::new("10.0.0.3".parse::<IpAddr>().unwrap())
                        .verdict(Verdict::Goto(id("x"))),
                ],
            )
            .add_elements(Family::Inet, &t, &m, &[])
            .group(|tx| {
                tx.delete_elements(
                    Family::Inet,
                    &t,
                    &m,
                    &[Value::Addr("10.0.0.9".parse().unwrap())],
                )
                .delete_chain(Family::Inet, &t, &id("y"));
            });
        tx
    }

    #[test]
    fn transaction_text() {
        let tx = sample();
        assert_eq!(tx.len(), 11);
        insta::assert_snapshot!(tx.to_string());
    }

    #[test]
    fn groups_are_units() {
        let mut tx = Transaction::new();
        tx.group(|_| {});
        assert!(tx.is_empty());
        tx.flush_chain(Family::Ip, &id("t"), &id("a"));
        tx.group(|tx| {
            tx.flush_chain(Family::Ip, &id("t"), &id("b"));
            tx.group(|tx| {
                tx.flush_chain(Family::Ip, &id("t"), &id("c"));
            });
        });
        assert_eq!(tx.units.len(), 2);
        assert_eq!(tx.units[1].len(), 2);
    }

    #[test]
    fn errors_are_parsed_with_lines_and_kinds() {
        let stderr = "\
/dev/stdin:1:41-48: Error: Could not process rule: No such file or directory
delete element inet weft_masq pods_v4 { 10.9.0.1 }
                                        ^^^^^^^^
/dev/stdin:3:29-35: Error: Could not process rule: Device or resource busy
delete chain inet weft_masq c
                            ^
/dev/stdin:12:1-3: Error: Could not process rule: File exists
create chain inet weft_masq c
^^^^^^
/dev/stdin:2:26-35: Error: syntax error, unexpected masquerade, expecting string
add chain inet weft_masq masquerade
                         ^^^^^^^^^^
Error: No such file or directory
list table inet nosuch
                ^^^^^^
";
        let errs = parse_errors(stderr);
        let got: Vec<(usize, ErrorKind)> = errs.iter().map(|e| (e.line, e.kind)).collect();
        assert_eq!(
            got,
            [
                (1, ErrorKind::NotFound),
                (3, ErrorKind::Busy),
                (12, ErrorKind::Exists),
                (2, ErrorKind::Syntax),
                (0, ErrorKind::NotFound)
            ]
        );
        assert_eq!(
            errs[0].statement,
            "delete element inet weft_masq pods_v4 { 10.9.0.1 }"
        );
        assert_eq!(errs[4].statement, "list table inet nosuch");
        assert_eq!(
            errs[0].message,
            "Could not process rule: No such file or directory"
        );

        let e = NftError::Failed {
            status: "exit status: 1".into(),
            stderr: stderr.into(),
            errors: errs,
        };
        assert!(!e.only(&[ErrorKind::NotFound]));
        assert!(e.has(ErrorKind::Busy));
        let c = CniError::from(e);
        assert_eq!(c.code, 999);
        assert_eq!(
            c.msg,
            "nft failed: Could not process rule: No such file or directory \
             (line 1: `delete element inet weft_masq pods_v4 { 10.9.0.1 }`)"
        );
        assert!(
            c.details.starts_with("/dev/stdin:1:41-48: Error"),
            "{}",
            c.details
        );
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let none = find_nft(
            None,
            Some("/nonexistent/a:/nonexistent/b".into()),
            &["/nonexistent/c"],
        );
        assert!(
            matches!(none, Err(NftError::NotInstalled { .. })),
            "{none:?}"
        );
        let explicit = find_nft(Some("/opt/x/nft".into()), None, &[]).unwrap();
        assert_eq!(explicit, PathBuf::from("/opt/x/nft"));
        let empty = find_nft(Some("".into()), Some("/nonexistent".into()), &[]);
        assert!(empty.is_err());

        // WEFT_NFT pointing nowhere: the spawn fails with NotFound.
        let err = run_with(Path::new("/nonexistent/nft"), &["-f", "-"], Some("")).unwrap_err();
        assert!(matches!(err, NftError::NotInstalled { .. }), "{err:?}");
        let c = CniError::from(err);
        assert_eq!(c.code, 999);
        assert!(c.msg.contains("install the nftables package"), "{}", c.msg);
    }

    #[test]
    fn echoed_statements_mentioning_error_are_not_errors() {
        let stderr = "/dev/stdin:1:1-3: Error: Could not process rule: File exists\n\
                      add element inet t m { 1.2.3.4 comment \"Error: x\" : jump c }\n\
                      ^^^\n";
        let errs = parse_errors(stderr);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].kind, ErrorKind::Exists);
    }

    #[test]
    fn listing_json_is_parsed() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
 {"table": {"family": "inet", "name": "t", "handle": 1}},
 {"map": {"family": "inet", "name": "pods_v4", "table": "t", "type": "ipv4_addr", "handle": 1, "map": "verdict",
   "elem": [[{"elem": {"val": "10.1.0.5", "comment": "net:a"}}, {"jump": {"target": "c1"}}], ["10.1.0.6", {"goto": {"target": "c2"}}]]}},
 {"map": {"family": "inet", "name": "pods_v6", "table": "t", "type": "ipv6_addr", "handle": 2, "map": "verdict"}},
 {"set": {"family": "inet", "name": "s", "table": "t", "type": "ipv4_addr", "handle": 3, "flags": ["interval"],
   "elem": ["1.2.3.4", {"prefix": {"addr": "10.0.0.0", "len": 8}}]}},
 {"chain": {"family": "inet", "table": "t", "name": "postrouting", "handle": 3, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
 {"chain": {"family": "inet", "table": "t", "name": "c1", "handle": 6}},
 {"rule": {"family": "inet", "table": "t", "chain": "c1", "handle": 9, "expr": [{"masquerade": null}]}}]}"#;
        let l = Listing::from_json(json).unwrap();
        let m = l.set("pods_v4").unwrap();
        assert!(m.is_map);
        assert_eq!(m.elements.len(), 2);
        assert_eq!(m.elements[0].key_str().as_deref(), Some("10.1.0.5"));
        assert_eq!(m.elements[0].comment.as_deref(), Some("net:a"));
        assert_eq!(m.elements[0].verdict_target(), Some(("jump", "c1")));
        assert_eq!(m.elements[1].verdict_target(), Some(("goto", "c2")));
        assert!(l.set("pods_v6").unwrap().elements.is_empty());
        let s = l.set("s").unwrap();
        assert!(!s.is_map);
        assert_eq!(s.elements[0].key_str().as_deref(), Some("1.2.3.4"));
        assert_eq!(s.elements[1].key_str(), None);
        let pr = l.chain("postrouting").unwrap();
        assert_eq!((pr.kind.as_deref(), pr.prio), (Some("nat"), Some(100)));
        assert_eq!(l.chain("c1").unwrap().kind, None);
        assert_eq!(l.rules_of("c1").count(), 1);
        assert!(Listing::from_json("{}").is_err());
    }
}
