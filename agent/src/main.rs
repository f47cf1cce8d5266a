//! weftd: the node agent, a drop-in for flanneld.

mod daemon;
mod dataplane;
mod flags;
mod health;
mod iface;

use anyhow::Context;
use clap::Parser;
use flags::Flags;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use weft_core::lease::etcd::{EtcdOptions, EtcdSource};
use weft_core::lease::kube::{KubeOptions, KubeSource};
use weft_core::lease::{LeaseError, NetworkConfig, StaticSource};

fn main() {
    let flags = Flags::parse_from(flags::normalise_args(std::env::args()));
    init_logging(&flags);
    if let Err(e) = run(flags) {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}

fn init_logging(flags: &Flags) {
    let level = if flags.verbosity > 0 { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if flags.log_format == "json" {
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
}

fn run(flags: Flags) -> anyhow::Result<()> {
    // Netlink helpers block on their own runtime: use them before ours starts.
    let iface = iface::choose(&flags)?;
    tracing::info!(iface = %iface.name, addr = ?iface.addr_v4, mtu = iface.mtu, "external interface");
    let settings = daemon::Settings {
        iface,
        public_ip: flags.public_ip,
        public_ipv6: flags.public_ipv6,
        subnet_file: flags.subnet_file.clone(),
        renew_margin: Duration::from_secs(flags.subnet_lease_renew_margin * 60),
        ip_masq: flags.ip_masq,
        fully_random: !flags.ip_masq_fully_random_disable,
        forward_rules: flags.iptables_forward_rules,
        rules_resync: Duration::from_secs(flags.iptables_resync),
        peers_resync: Duration::from_secs(flags.peers_resync),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let status = Arc::new(health::Status::default());
        if flags.healthz_port != 0 {
            health::serve(
                SocketAddr::new(flags.healthz_ip, flags.healthz_port),
                status.clone(),
            )
            .await?;
        }
        if flags.kube_subnet_mgr {
            let config = NetworkConfig::parse_unchecked(&read_net_config(&flags)?)?;
            let source = KubeSource::connect(&kube_options(&flags), config).await?;
            return daemon::run(source, &settings, status).await;
        }
        if !flags.pod_cidr.is_empty() {
            let config = NetworkConfig::parse_unchecked(&read_net_config(&flags)?)?;
            let source = StaticSource::new(config, &flags.pod_cidr)?;
            return daemon::run(source, &settings, status).await;
        }
        let source = connect_etcd(&etcd_options(&flags)).await?;
        daemon::run(source, &settings, status).await
    })
}

/// Connect, waiting out an unreachable store (with user/password auth, connecting
/// already talks to etcd). Bad TLS files and flags fail at once.
async fn connect_etcd(opts: &EtcdOptions) -> anyhow::Result<EtcdSource> {
    daemon::every_second(
        "etcd",
        |e| matches!(e, LeaseError::Store(_)),
        async || EtcdSource::connect(opts).await,
    )
    .await
}

fn read_net_config(flags: &Flags) -> anyhow::Result<Vec<u8>> {
    std::fs::read(&flags.net_config_path).with_context(|| {
        format!(
            "reading the network config {}",
            flags.net_config_path.display()
        )
    })
}

/// flanneld's identity: NODE_NAME, else the node of POD_NAMESPACE/POD_NAME.
fn kube_options(flags: &Flags) -> KubeOptions {
    let env = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
    KubeOptions {
        api_url: flags.kube_api_url.clone().filter(|u| !u.is_empty()),
        kubeconfig: flags
            .kubeconfig_file
            .clone()
            .filter(|p| !p.as_os_str().is_empty()),
        annotation_prefix: flags.kube_annotation_prefix.clone(),
        node_name: env("NODE_NAME"),
        pod: env("POD_NAMESPACE").zip(env("POD_NAME")),
        set_network_unavailable: flags.set_node_network_unavailable,
    }
}

fn etcd_options(flags: &Flags) -> EtcdOptions {
    EtcdOptions {
        endpoints: flags.etcd_endpoints.clone(),
        prefix: flags.etcd_prefix.clone(),
        ca_file: flags.etcd_cafile.clone(),
        cert_file: flags.etcd_certfile.clone(),
        key_file: flags.etcd_keyfile.clone(),
        username: flags.etcd_username.clone(),
        password: flags.etcd_password.clone(),
    }
}
