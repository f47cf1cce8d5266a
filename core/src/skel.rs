//! The plugin entry point: read the environment and stdin, validate them the way
//! the spec and libcni's skel do, dispatch the verb, and print exactly one reply.

use crate::args::CniArgs;
use crate::error::{CniError, Result, code};
use crate::netns::NetNs;
use crate::spec::{CniResult, NetConf, parse_netconf};
use crate::version;
use serde::Deserialize;
use std::io::{Read, Write};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }

    /// Variables this verb cannot do without (libcni's table; STATUS needs only the command).
    fn required(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => {
                &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
            }
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
            Command::Gc => &["CNI_PATH"],
            Command::Status | Command::Version => &[],
        }
    }

    /// Whether the verb names one attachment (container ID + ifname).
    fn is_per_container(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }

    /// The first spec version that has this verb.
    fn since(self) -> &'static str {
        match self {
            Command::Check => "0.4.0",
            Command::Gc | Command::Status => "1.1.0",
            _ => "0.1.0",
        }
    }
}

/// The CNI_* environment of one invocation.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: CniArgs,
    /// `CNI_ARGS` as given, passed on unchanged to delegates.
    pub raw_args: String,
    pub path: Vec<PathBuf>,
}

/// The CNI_* variables a plugin reads, in the order libcni lists missing ones.
pub const VAR_ORDER: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

impl Env {
    /// Read and validate the environment; `Ok(None)` when CNI_COMMAND is unset.
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Env>> {
        let get = |k: &str| var(k).unwrap_or_default();
        let raw_cmd = get("CNI_COMMAND");
        if raw_cmd.is_empty() {
            return Ok(None);
        }
        let command = Command::parse(&raw_cmd)
            .ok_or_else(|| CniError::env(format!("unknown CNI_COMMAND: {raw_cmd}")))?;
        let missing: Vec<&str> = VAR_ORDER
            .into_iter()
            .filter(|k| command.required().contains(k) && get(k).is_empty())
            .collect();
        if !missing.is_empty() {
            return Err(CniError::env(format!(
                "required env variables [{}] missing",
                missing.join(",")
            )));
        }
        let raw_args = get("CNI_ARGS");
        // CNI_ARGS belongs to one attachment; the other verbs must not trip on it.
        let args = if command.is_per_container() {
            CniArgs::parse(&raw_args)?
        } else {
            CniArgs::default()
        };
        let env = Env {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args,
            raw_args,
            path: get("CNI_PATH")
                .split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
        };
        if command.is_per_container() {
            validate_container_id(&env.container_id)?;
            validate_ifname(&env.ifname)?;
        }
        Ok(Some(env))
    }
}

fn is_name_like(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// libcni's rule: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
pub fn validate_container_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            "missing containerID",
        ));
    }
    if !is_name_like(id) {
        return Err(CniError::env("invalid characters in containerID").with_details(id));
    }
    Ok(())
}

/// Same alphabet as container IDs; it also keeps names from escaping a data directory.
pub fn validate_network_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(CniError::config("missing network name"));
    }
    if !is_name_like(name) {
        return Err(CniError::config("invalid characters found in network name").with_details(name));
    }
    Ok(())
}

/// Linux interface names: 1-15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<()> {
    let err = |m: &str| Err(CniError::env(m.to_string()));
    if name.is_empty() {
        return err("interface name is empty");
    }
    if name.len() > 15 {
        return Err(CniError::env("interface name is too long")
            .with_details("interface name should be less than 16 characters"));
    }
    if name == "." || name == ".." {
        return err("interface name is . or ..");
    }
    // Only a config can carry one (a bridge name, say): the kernel would cut it there.
    if name.contains('\0') {
        return err("interface name contains a NUL character");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return err("interface name contains / or : or whitespace characters");
    }
    Ok(())
}

/// One attachment named in a GC request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// Everything a verb handler gets.
#[derive(Debug, Clone)]
pub struct Request {
    pub env: Env,
    pub conf: NetConf,
    /// stdin as read, for plugins that parse their own config struct and for delegates.
    pub stdin: Vec<u8>,
}

impl Request {
    /// The config version (validated as supported).
    pub fn version(&self) -> &str {
        self.conf.version()
    }

    /// GC's `cni.dev/valid-attachments` (or the legacy `cni.dev/attachments`).
    pub fn valid_attachments(&self) -> Result<Vec<Attachment>> {
        let v = self
            .conf
            .extra
            .get("cni.dev/valid-attachments")
            .or_else(|| self.conf.extra.get("cni.dev/attachments"));
        let v =
            v.ok_or_else(|| CniError::config("GC needs cni.dev/valid-attachments in the config"))?;
        Vec::<Attachment>::deserialize(v)
            .map_err(|e| CniError::decode(format!("invalid cni.dev/valid-attachments: {e}")))
    }

    /// Parse the plugin's own view of the config from stdin.
    pub fn parse_conf<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.stdin)
            .map_err(|e| CniError::decode(format!("failed to load netconf: {e}")))
    }
}

/// A CNI plugin: one method per verb. VERSION is answered by the skel.
pub trait Plugin {
    /// Whether the plugin enters CNI_NETNS. IPAM plugins do not, and then the skel
    /// neither requires the namespace to exist nor checks which one it is.
    fn uses_netns(&self) -> bool {
        true
    }
    fn add(&self, req: &Request) -> Result<CniResult>;
    fn del(&self, req: &Request) -> Result<()>;
    fn check(&self, req: &Request) -> Result<()>;
    fn gc(&self, req: &Request) -> Result<()>;
    fn status(&self, req: &Request) -> Result<()>;
}

/// What a plugin says about itself without CNI_COMMAND.
pub struct About {
    pub name: &'static str,
    pub version: &'static str,
    /// The manual `--help` prints (NAME, SYNOPSIS, CONFIGURATION, …).
    pub help: &'static str,
}

/// The environment and exit-status sections every plugin shares.
const COMMON_HELP: &str = include_str!("skel/common_help.txt");

/// A plugin's `help` with [`COMMON_HELP`] before its FILES, EXAMPLES or SEE ALSO
/// (whichever comes first), else at the end.
fn manual(help: &str) -> String {
    let at = ["\nFILES\n", "\nEXAMPLES\n", "\nSEE ALSO\n"]
        .iter()
        .filter_map(|s| help.find(s))
        .min()
        .map_or(help.len(), |i| i + 1);
    format!("{}{COMMON_HELP}\n{}", &help[..at], &help[at..])
}

/// What the binary does with command-line arguments (runtimes pass none):
/// `--help`/`-h` and `--version`/`-V` print to stdout and exit 0; anything else is a
/// usage error (2). `None`: no arguments, run as a plugin.
pub fn command_line(about: &About, args: &[String]) -> Option<(String, i32)> {
    let first = args.first()?;
    Some(match first.as_str() {
        "--help" | "-h" => (manual(about.help), 0),
        "--version" | "-V" => (
            format!(
                "{} {} (weft)\nCNI protocol versions supported: {}\n",
                about.name,
                about.version,
                version::SUPPORTED.join(", ")
            ),
            0,
        ),
        other => (
            format!(
                "{}: unexpected argument {other:?}: a CNI plugin is configured through CNI_* \
                 variables and a JSON config on stdin (see --help)\n",
                about.name
            ),
            2,
        ),
    })
}

/// Run the plugin as a process: real env, stdin, stdout; exits with the CNI status.
pub fn main<P: Plugin>(about: About, plugin: P) -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some((text, status)) = command_line(&about, &args) {
        if status == 0 {
            print!("{text}");
        } else {
            eprint!("{text}");
        }
        std::process::exit(status);
    }
    crate::log::init_from_env(about.name);
    install_panic_hook();
    let var = |k: &str| std::env::var(k).ok();
    let status = run(
        &about,
        &plugin,
        &var,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
    );
    std::process::exit(status)
}

/// Print a CNI error instead of Rust's panic text, so the runtime gets a parsable reply.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("plugin panicked: {info}");
        let _ = writeln!(std::io::stderr(), "{msg}");
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(CniError::internal(msg).to_json(version::CURRENT).as_bytes());
        let _ = out.flush();
    }));
}

/// The whole protocol with injectable I/O. Returns the exit status.
pub fn run<P: Plugin>(
    about: &About,
    plugin: &P,
    var: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
) -> i32 {
    let mut reply_version = version::CURRENT.to_string();
    let outcome = dispatch(about, plugin, var, stdin, &mut reply_version);
    let (text, status) = match outcome {
        Ok(text) => (text, 0),
        Err(e) => {
            crate::warn!("{} failed: {e}", var("CNI_COMMAND").unwrap_or_default());
            (e.to_json(&reply_version), 1)
        }
    };
    if stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
        .is_err()
    {
        return 1;
    }
    status
}

fn dispatch<P: Plugin>(
    about: &About,
    plugin: &P,
    var: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    reply_version: &mut String,
) -> Result<String> {
    let Some(env) = Env::from_vars(var)? else {
        eprintln!(
            "CNI {} plugin version {}\nCNI protocol versions supported: {}",
            about.name,
            about.version,
            version::SUPPORTED.join(", ")
        );
        return Ok(String::new());
    };
    let mut input = Vec::new();
    stdin
        .read_to_end(&mut input)
        .map_err(|e| CniError::new(code::IO_FAILURE, format!("error reading from stdin: {e}")))?;
    if env.command == Command::Version {
        return Ok(version_reply(&input));
    }
    let conf = parse_netconf(&input)?;
    version::require_supported(conf.version())?;
    *reply_version = conf.version().to_string();
    validate_network_name(&conf.name)?;
    if !version::at_least(conf.version(), env.command.since()) {
        let verb = env.command.as_str();
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("config version does not allow {verb}"),
        ));
    }
    let mut env = env;
    if plugin.uses_netns() {
        vet_netns(&mut env)?;
    }
    let req = Request {
        env,
        conf,
        stdin: input,
    };
    match req.env.command {
        Command::Add => {
            let result = plugin.add(&req)?;
            // A result the config's version cannot express (no IP at 0.2.0) is a failed
            // ADD: undo it rather than leave state the runtime never heard of.
            result.to_json(req.version()).inspect_err(|_| {
                if let Err(e) = plugin.del(&req) {
                    crate::warn!("rolling back ADD failed: {e}");
                }
            })
        }
        Command::Del => plugin.del(&req).map(|_| String::new()),
        Command::Check => plugin.check(&req).map(|_| String::new()),
        Command::Gc => plugin.gc(&req).map(|_| String::new()),
        Command::Status => plugin.status(&req).map(|_| String::new()),
        Command::Version => unreachable!("answered above"),
    }
}

/// `{"cniVersion": <input's, or ours>, "supportedVersions": [...]}` plus a newline.
fn version_reply(input: &[u8]) -> String {
    let asked = serde_json::from_slice::<serde_json::Value>(input)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| version::CURRENT.to_string());
    let reply = serde_json::json!({ "cniVersion": asked, "supportedVersions": version::SUPPORTED });
    format!("{reply}\n")
}

/// Never act on the plugin's own namespace: a pod verb pointed at the host netns
/// would reconfigure the host. ADD and CHECK need a namespace that exists and is not
/// ours. DEL must still complete: with a namespace that is gone, not a namespace, or
/// our own, it runs with CNI_NETNS cleared, so it cleans up host-side state only.
fn vet_netns(env: &mut Env) -> Result<()> {
    if !env.command.is_per_container() || env.netns.is_empty() {
        return Ok(());
    }
    let verdict = NetNs::open(&env.netns).and_then(|ns| match ns.is_current()? {
        false => Ok(()),
        true => Err(CniError::env(format!(
            "CNI_NETNS {:?} is the plugin's own network namespace; refusing to configure it",
            env.netns
        ))),
    });
    match verdict {
        Err(e) if env.command == Command::Del => {
            crate::warn!("DEL continues without the pod's namespace: {e}");
            env.netns.clear();
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests;
