//! Test certificates made with the `openssl` CLI: a CA, a server certificate, a
//! client certificate, and a rogue CA with a client certificate of its own (which
//! servers must refuse). Used by [`crate::etcd`] and [`crate::kube_api`].
//!
//! EC P-256 keys in PKCS#8 (`BEGIN PRIVATE KEY`) by default, because they are fast
//! to make; [`Certs::extra_client`] also makes the key formats real clusters hand
//! out (kubeadm's RSA PKCS#1 `BEGIN RSA PRIVATE KEY`, k3s' SEC1 `BEGIN EC PRIVATE
//! KEY`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `openssl req` options for a new, unencrypted EC P-256 key (PKCS#8).
const NEW_EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

/// Paths of the certificates and keys in one directory. Valid for two days.
#[derive(Debug, Clone)]
pub struct Certs {
    /// The openssl config with the `ca`, `server` and `client` extension sections.
    pub conf: PathBuf,
    /// The CA that signed the server's and the trusted client's certificates.
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    /// Server certificate with SAN `IP:<ip>,IP:127.0.0.1`; usable as a client
    /// certificate too (etcd 3.4's gateway dials its gRPC server with it).
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate (CN=weft-test) signed by [`ca`](Self::ca).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Another CA, trusted by nobody.
    pub rogue_ca: PathBuf,
    /// A client certificate (CN=weft-test) signed by [`rogue_ca`](Self::rogue_ca).
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

/// The private key format of an [`extra_client`](Certs::extra_client) certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// EC P-256, PKCS#8 (`BEGIN PRIVATE KEY`).
    EcPkcs8,
    /// EC P-256, SEC1 (`BEGIN EC PRIVATE KEY`), as k3s writes them.
    EcSec1,
    /// RSA 2048, PKCS#1 (`BEGIN RSA PRIVATE KEY`), as kubeadm's admin.conf holds.
    RsaPkcs1,
}

impl Certs {
    /// Make everything in `dir` (created if missing): a CA, a server certificate for
    /// `ip` and 127.0.0.1 with common name `server_cn`, a client certificate, and a
    /// rogue CA with its own client certificate. Panics when openssl fails.
    pub fn generate(dir: &Path, ip: &str, server_cn: &str) -> Certs {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let p = |name: &str| dir.join(name);
        // Extensions spelled out: Go's x509 is stricter than openssl's defaults.
        // The server certificate is a client certificate too: etcd 3.4's gateway
        // dials the gRPC server presenting it.
        let conf = format!(
            "[req]\ndistinguished_name = dn\n[dn]\n\
             [ca]\nbasicConstraints = critical,CA:TRUE\n\
             keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n\
             [server]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = serverAuth,clientAuth\n\
             subjectAltName = IP:{ip},IP:127.0.0.1\n\
             [client]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = clientAuth\n"
        );
        let conf_path = p("openssl.cnf");
        std::fs::write(&conf_path, conf)
            .unwrap_or_else(|e| panic!("writing {}: {e}", conf_path.display()));
        let certs = Certs {
            conf: conf_path,
            ca: p("ca.crt"),
            ca_key: p("ca.key"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
            rogue_ca: p("rogue-ca.crt"),
            rogue_cert: p("rogue-client.crt"),
            rogue_key: p("rogue-client.key"),
        };
        certs.make_ca("ca", "weft-test-ca");
        certs.make_leaf("server", server_cn, "ca", "server", "2", KeyFormat::EcPkcs8);
        certs.make_leaf(
            "client",
            "weft-test",
            "ca",
            "client",
            "3",
            KeyFormat::EcPkcs8,
        );
        certs.make_ca("rogue-ca", "weft-rogue-ca");
        certs.make_leaf(
            "rogue-client",
            "weft-test",
            "rogue-ca",
            "client",
            "4",
            KeyFormat::EcPkcs8,
        );
        certs
    }

    /// The directory holding everything.
    pub fn dir(&self) -> &Path {
        self.conf.parent().expect("the config is in a directory")
    }

    /// curl's arguments for the trusted client: `--cacert --cert --key`.
    pub fn curl_client_args(&self) -> Vec<String> {
        [
            ("--cacert", &self.ca),
            ("--cert", &self.client_cert),
            ("--key", &self.client_key),
        ]
        .into_iter()
        .flat_map(|(flag, p)| [flag.to_string(), s(p)])
        .collect()
    }

    /// One more client certificate from the trusted CA, with common name `cn` and a
    /// key in `format`, as `<name>.crt` / `<name>.key`: `(cert, key)`.
    pub fn extra_client(&self, name: &str, cn: &str, format: KeyFormat) -> (PathBuf, PathBuf) {
        // Serials only need to differ from the CA's others; derive one from the name.
        let serial = 1000 + name.bytes().map(u32::from).sum::<u32>();
        self.make_leaf(name, cn, "ca", "client", &serial.to_string(), format);
        (
            self.dir().join(format!("{name}.crt")),
            self.dir().join(format!("{name}.key")),
        )
    }

    /// `<dir>/<file>`, for openssl's command line.
    fn path(&self, file: &str) -> String {
        s(&self.dir().join(file))
    }

    /// `openssl req -new -config <conf> -subj /CN=<cn>` and `args`.
    fn req(&self, cn: &str, args: &[&str]) {
        let conf = s(&self.conf);
        let subj = format!("/CN={cn}");
        let mut argv = vec!["req", "-new", "-config", &conf, "-subj", &subj];
        argv.extend_from_slice(args);
        openssl(&argv);
    }

    fn make_ca(&self, name: &str, cn: &str) {
        let (key, crt) = (
            self.path(&format!("{name}.key")),
            self.path(&format!("{name}.crt")),
        );
        let x509 = ["-x509", "-extensions", "ca", "-days", "2"];
        self.req(
            cn,
            &[&x509[..], &NEW_EC_KEY, &["-keyout", &key, "-out", &crt]].concat(),
        );
    }

    fn make_leaf(&self, name: &str, cn: &str, ca: &str, ext: &str, serial: &str, key: KeyFormat) {
        let key_path = self.path(&format!("{name}.key"));
        let csr = self.path(&format!("{name}.csr"));
        match key {
            KeyFormat::EcPkcs8 | KeyFormat::EcSec1 => {
                self.req(
                    cn,
                    &[&NEW_EC_KEY[..], &["-keyout", &key_path, "-out", &csr]].concat(),
                );
            }
            KeyFormat::RsaPkcs1 => {
                openssl(&["genrsa", "-traditional", "-out", &key_path, "2048"]);
                self.req(cn, &["-key", &key_path, "-out", &csr]);
            }
        }
        if key == KeyFormat::EcSec1 {
            // `openssl ec` writes the traditional (SEC1) form by default.
            openssl(&["ec", "-in", &key_path, "-out", &key_path]);
        }
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &self.path(&format!("{ca}.crt")),
            "-CAkey",
            &self.path(&format!("{ca}.key")),
            "-set_serial",
            serial,
            "-days",
            "2",
            "-extfile",
            &s(&self.conf),
            "-extensions",
            ext,
            "-out",
            &self.path(&format!("{name}.crt")),
        ]);
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning openssl: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> String {
    p.display().to_string()
}
