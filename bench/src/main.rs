//! weft-bench: times weft plugins against the reference CNI plugins, interleaved
//! in one run so that machine noise hits both sides alike.

mod harness;
mod nlwatch;
mod rows;
mod stats;
mod throughput;
mod weftd;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use harness::{Impl, Netns, Target, TempDir};
use rows::{ROWS, Row, Run};
use stats::Summary;

const DEFAULT_REFERENCE: &str = "/usr/lib/cni";
const DEFAULT_ITERATIONS: usize = 200;
const DEFAULT_WARMUP: usize = 2;

#[derive(Debug, PartialEq)]
struct Args {
    ours: PathBuf,
    reference: PathBuf,
    iterations: usize,
    warmup: usize,
    only: Option<String>,
    json: Option<PathBuf>,
}

enum Parsed {
    Run(Args),
    Help,
}

fn default_ours() -> PathBuf {
    match std::env::var_os("WEFT_BIN_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("bench/ lives in the workspace")
            .join("target/release"),
    }
}

fn usage() -> String {
    let mut s = format!(
        "\
weft-bench: time weft CNI plugins against the reference plugins, side by side

USAGE: weft-bench [OPTIONS]        (must run as root: it creates a network namespace)

OPTIONS:
  --ours DIR         our plugin binaries [env WEFT_BIN_DIR, else {ours}]
  --reference DIR    reference plugin binaries [{DEFAULT_REFERENCE}]
  --iterations N     timed samples per row and implementation [{DEFAULT_ITERATIONS}]
  --warmup N         untimed iterations first [{DEFAULT_WARMUP}]
  --only TEXT        run only rows whose name contains TEXT (case-insensitive)
  --json FILE        also write the results, raw samples included, as JSON
  -h, --help         this text

Each iteration runs ours then the reference, alternating which goes first. Each
side gets its own scratch dataDir, network name and subnet; ratio = reference / ours
median (above 1.00 means ours is faster).

flannel rows run our flannel on both sides: the reference side's CNI_PATH is a
scratch directory of symlinks to our flannel and the reference bridge and
host-local, so only the delegates differ.

weftd rows (--only weftd) run ours alone, against a real etcd ({etcd}) in a
namespace of their own: there is no flanneld binary to compare with, so the
flanneld figures of the reference doc are printed as notes. They run at most 10
(10,000 peers: 5) timed iterations after at most 1 warm-up.

ROWS:
",
        ours = default_ours().display(),
        etcd = netns_tests::etcd::ETCD_BIN,
    );
    for row in ROWS {
        let _ = writeln!(
            s,
            "  {:<w$} {}",
            row.name,
            row.about,
            w = name_width(ROWS.iter())
        );
    }
    s
}

fn parse_args(argv: impl IntoIterator<Item = String>) -> Result<Parsed> {
    let mut args = Args {
        ours: default_ours(),
        reference: PathBuf::from(DEFAULT_REFERENCE),
        iterations: DEFAULT_ITERATIONS,
        warmup: DEFAULT_WARMUP,
        only: None,
        json: None,
    };
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Parsed::Help);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        let mut value = || -> Result<String> {
            match inline.clone().or_else(|| it.next()) {
                Some(v) => Ok(v),
                None => bail!("{flag} needs a value"),
            }
        };
        let count = |v: String, flag: &str| -> Result<usize> {
            v.parse()
                .with_context(|| format!("{flag}: not a non-negative integer: {v:?}"))
        };
        match flag.as_str() {
            "--ours" => args.ours = PathBuf::from(value()?),
            "--reference" => args.reference = PathBuf::from(value()?),
            "--iterations" => {
                args.iterations = count(value()?, &flag)?;
                if args.iterations == 0 {
                    bail!("--iterations must be at least 1");
                }
            }
            "--warmup" => args.warmup = count(value()?, &flag)?,
            "--only" => args.only = Some(value()?),
            "--json" => args.json = Some(PathBuf::from(value()?)),
            _ => bail!("unknown argument {flag:?} (see --help)"),
        }
    }
    Ok(Parsed::Run(args))
}

type Figures = Vec<(&'static str, f64, &'static str)>;

struct RowResult {
    row: &'static Row,
    /// Indexed like the `impls` array: ours, reference (empty for solo rows).
    samples: [Vec<Duration>; 2],
    /// Solo rows: the extra figures of each timed sample.
    figures: Vec<Figures>,
}

/// Width of the name column for `rows`.
fn name_width<'a>(rows: impl Iterator<Item = &'a Row>) -> usize {
    rows.map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0)
        .max(30)
}

fn is_solo(row: &Row) -> bool {
    matches!(row.run, Run::Solo(_))
}

/// (warm-up, timed) iterations of `row`.
fn iterations(row: &Row, args: &Args) -> (usize, usize) {
    match &row.run {
        Run::Pair(_) | Run::Front { .. } => (args.warmup, args.iterations),
        Run::Solo(s) => (args.warmup.min(1), args.iterations.min(s.max_iterations)),
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("weft-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    if !harness::is_root() {
        eprintln!(
            "weft-bench: must run as root: it creates a network namespace (unshare --net) for \
             CNI_NETNS.\nRun it with sudo, e.g.: sudo {} {}",
            std::env::args()
                .next()
                .unwrap_or_else(|| "weft-bench".into()),
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        );
        return ExitCode::from(2);
    }
    // Plugins like bridge configure "the host": give them a private network namespace
    // as theirs, so neither implementation ever touches the real one. Done while
    // this process is still single-threaded; every child inherits it.
    if let Err(e) = harness::enter_private_netns() {
        eprintln!("weft-bench: {e:#}");
        return ExitCode::FAILURE;
    }
    harness::install_signal_handlers();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let rows: Vec<&'static Row> = ROWS
        .iter()
        .filter(|r| match &args.only {
            Some(only) => r.name.to_lowercase().contains(&only.to_lowercase()),
            None => true,
        })
        .collect();
    if rows.is_empty() {
        let names: Vec<_> = ROWS.iter().map(|r| r.name).collect();
        bail!(
            "--only {:?} matches no row; rows: {names:?}",
            args.only.as_deref().unwrap_or("")
        );
    }

    let impls = [
        Impl {
            label: "ours",
            bin_dir: absolute(&args.ours)?,
            subnet: "10.200.0.0/16",
        },
        Impl {
            label: "reference",
            bin_dir: absolute(&args.reference)?,
            subnet: "10.201.0.0/16",
        },
    ];
    let mut binaries: Vec<(&str, PathBuf)> = Vec::new();
    for row in &rows {
        for plugin in row.plugins {
            let sides = if is_solo(row) || row.front() == Some(plugin) {
                &impls[..1]
            } else {
                &impls[..]
            };
            for imp in sides {
                let bin = imp.plugin(plugin);
                if !is_executable(&bin) {
                    bail!(
                        "{} {plugin} not found or not executable: {}{}",
                        imp.label,
                        bin.display(),
                        if imp.label == "ours" {
                            " (build it with `cargo build --release`, or pass --ours DIR)"
                        } else {
                            ""
                        }
                    );
                }
                let entry = (imp.label, bin);
                if !binaries.contains(&entry) {
                    binaries.push(entry);
                }
            }
        }
    }

    if rows.iter().any(|r| is_solo(r)) {
        binaries.push(("etcd", PathBuf::from(netns_tests::etcd::ETCD_BIN)));
    }

    let scratch = TempDir::new("weft-bench-")?;
    let netns = Netns::create()?;
    // Each implementation's "host": one namespace per side (see Target::host).
    let hosts = [Netns::create()?, Netns::create()?];
    // Started by the first weftd row; dropped (etcd, namespaces) before `scratch`.
    let mut weftd_env: Option<weftd::Env> = None;

    print_machine(args, &binaries, &netns, &hosts, scratch.path());

    let width = name_width(rows.iter().copied());
    let mut results = Vec::new();
    for row in rows {
        let (warmup, timed) = iterations(row, args);
        let sides = if is_solo(row) {
            "weftd only"
        } else {
            "x 2 implementations"
        };
        eprint!(
            "running {:<width$} {warmup} + {timed} iterations {sides} ... ",
            row.name
        );
        let result = match &row.run {
            Run::Pair(run) | Run::Front { run, .. } => {
                run_row(row, *run, &impls, &netns, &hosts, scratch.path(), args).map(|samples| {
                    RowResult {
                        row,
                        samples,
                        figures: Vec::new(),
                    }
                })
            }
            Run::Solo(solo) => {
                let env = match &mut weftd_env {
                    Some(env) => env,
                    None => weftd_env.insert(weftd::Env::new(&impls[0].bin_dir, scratch.path())?),
                };
                run_solo(row, solo, env, warmup, timed)
            }
        };
        let result = result.inspect_err(|_| eprintln!("FAILED"))?;
        eprintln!("done");
        results.push(result);
    }
    drop(weftd_env);

    println!();
    print_table(&results, width);
    if results.iter().any(|r| !is_solo(r.row)) {
        let floor = exec_floor(args.iterations.clamp(20, 200), hosts[0].path())?;
        println!(
            "exec floor: /bin/true spawned the same way, median {:.3} ms (no plugin can be faster)",
            floor
        );
    }
    print_solo_notes(&results);
    if let Some(path) = &args.json {
        let json = to_json(args, &impls, &binaries, &results);
        std::fs::write(path, format!("{json:#}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nJSON written to {}", path.display());
    }
    Ok(())
}

/// Median wall time of spawning `/bin/true` exactly as plugins are spawned: the part
/// of every row that no implementation controls.
fn exec_floor(runs: usize, host: &Path) -> Result<f64> {
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = std::time::Instant::now();
        let mut cmd = std::process::Command::new("/bin/true");
        harness::in_netns(&mut cmd, host)?;
        let status = cmd
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output()
            .context("spawning /bin/true")?
            .status;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(status.success(), "/bin/true failed: {status}");
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// All iterations of a weftd row: ours only.
fn run_solo(
    row: &'static Row,
    solo: &weftd::Solo,
    env: &mut weftd::Env,
    warmup: usize,
    timed: usize,
) -> Result<RowResult> {
    let mut samples = Vec::new();
    let mut figures = Vec::new();
    for i in 0..warmup + timed {
        harness::check_interrupted()?;
        let s = (solo.run)(env, i).with_context(|| format!("row {:?}, iteration {i}", row.name))?;
        if i >= warmup {
            samples.push(s.elapsed);
            figures.push(s.figures);
        }
    }
    Ok(RowResult {
        row,
        samples: [samples, Vec::new()],
        figures,
    })
}

/// All iterations of one row, interleaved: ours then reference on even
/// iterations, reference then ours on odd ones.
fn run_row(
    row: &Row,
    run: fn(&mut harness::Target, usize) -> Result<Duration>,
    impls: &[Impl; 2],
    netns: &Netns,
    hosts: &[Netns; 2],
    scratch: &Path,
    args: &Args,
) -> Result<[Vec<Duration>; 2]> {
    let slug: String = row
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let front_dir = scratch.join(format!("{slug}-bin"));
    let front_impls;
    let impls = match row.front() {
        Some(front) => {
            front_impls = with_front(impls, row.plugins, front, &front_dir)?;
            &front_impls
        }
        None => impls,
    };
    let mut targets = Vec::new();
    for (imp, host) in impls.iter().zip(hosts) {
        let data_dir = scratch.join(format!("{slug}-{}", imp.label));
        std::fs::create_dir(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let network = format!("weft-bench-{}", imp.label);
        targets.push(Target::new(
            imp,
            netns.path(),
            host.path(),
            data_dir,
            network,
        ));
    }

    let mut samples = [Vec::new(), Vec::new()];
    for i in 0..args.warmup + args.iterations {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            harness::check_interrupted()?;
            let t = &mut targets[k];
            let d = run(t, i).with_context(|| {
                format!("row {:?}, {} side, iteration {i}", row.name, t.imp.label)
            })?;
            if i >= args.warmup {
                samples[k].push(d);
            }
        }
    }

    // Clean state for the next row.
    let front_dir = row.front().map(|_| &front_dir);
    for dir in targets.iter().map(|t| &t.data_dir).chain(front_dir) {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(samples)
}

/// `impls` with the reference side's plugins replaced by symlinks in `dir` (new):
/// to our `front`, and to the reference's other `plugins`.
fn with_front(impls: &[Impl; 2], plugins: &[&str], front: &str, dir: &Path) -> Result<[Impl; 2]> {
    std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    for plugin in plugins {
        let imp = &impls[usize::from(*plugin != front)];
        let (target, link) = (imp.plugin(plugin), dir.join(plugin));
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
    }
    let [ours, reference] = impls.clone();
    Ok([
        ours,
        Impl {
            bin_dir: dir.to_path_buf(),
            ..reference
        },
    ])
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn print_machine(
    args: &Args,
    binaries: &[(&str, PathBuf)],
    netns: &Netns,
    hosts: &[Netns; 2],
    scratch: &Path,
) {
    println!("weft-bench");
    println!(
        "  machine:    nproc {}, {}, Linux {}",
        nproc(),
        cpu_model(),
        kernel()
    );
    println!(
        "  iterations: {} timed (+{} warm-up) per row and implementation, interleaved \
         (weftd rows: ours only, at most 10 or 5 timed, 1 warm-up)",
        args.iterations, args.warmup
    );
    println!("  pod netns:  {}", netns.path().display());
    println!(
        "  host netns: ours {}, reference {} (one each: neither side's state weighs on the other)",
        hosts[0].path().display(),
        hosts[1].path().display()
    );
    println!("  dataDir:    under {}", scratch.display());
    println!("  binaries:");
    for (label, b) in binaries {
        let size = std::fs::metadata(b).map(|m| m.len()).unwrap_or(0);
        println!("    {label:<10} {} ({} KiB)", b.display(), size / 1024);
    }
}

fn ratio(ours: &Summary, reference: &Summary) -> f64 {
    reference.median / ours.median
}

fn print_table(results: &[RowResult], w: usize) {
    println!(
        "{:<w$} {:>10} {:>10} {:>7}  {:>19}  {:>19}",
        "row", "ours ms", "ref ms", "ratio", "ours p10..p90", "ref p10..p90"
    );
    println!(
        "{}",
        "-".repeat(w + 1 + 10 + 1 + 10 + 1 + 7 + 2 + 19 + 2 + 19)
    );
    for r in results {
        let Some(o) = Summary::of(&r.samples[0]) else {
            continue;
        };
        let ours = format!("{:.3}..{:.3}", o.p10, o.p90);
        match Summary::of(&r.samples[1]) {
            Some(f) => println!(
                "{:<w$} {:>10.3} {:>10.3} {:>6.2}x  {:>19}  {:>19}",
                r.row.name,
                o.median,
                f.median,
                ratio(&o, &f),
                ours,
                format!("{:.3}..{:.3}", f.p10, f.p90),
            ),
            None => println!(
                "{:<w$} {:>10.3} {:>10} {:>7}  {:>19}  {:>19}",
                r.row.name, o.median, "-", "-", ours, "-"
            ),
        }
    }
    println!("\nms = median wall time of the exec(s); ratio = reference / ours (>1: ours faster)");
    if results.iter().any(|r| is_solo(r.row)) {
        println!(
            "weftd rows: ours only (no flanneld binary here), ms as each row says; see the notes"
        );
    }
}

/// Median of each figure over a solo row's timed samples, in first-seen order.
fn figure_medians(figures: &[Figures]) -> Vec<(&'static str, f64, &'static str)> {
    let mut names: Vec<(&'static str, &'static str)> = Vec::new();
    for f in figures.iter().flatten() {
        if !names.iter().any(|(n, _)| *n == f.0) {
            names.push((f.0, f.2));
        }
    }
    names
        .into_iter()
        .map(|(name, unit)| {
            let mut v: Vec<f64> = figures
                .iter()
                .flatten()
                .filter(|f| f.0 == name)
                .map(|f| f.1)
                .collect();
            v.sort_by(f64::total_cmp);
            (name, stats::percentile(&v, 0.5), unit)
        })
        .collect()
}

fn print_solo_notes(results: &[RowResult]) {
    let mut references_shown: Vec<&str> = Vec::new();
    for r in results {
        let Run::Solo(solo) = &r.row.run else {
            continue;
        };
        println!(
            "\n{}: {} (n={})",
            r.row.name,
            r.row.about,
            r.samples[0].len()
        );
        for (name, value, unit) in figure_medians(&r.figures) {
            let prec = if value >= 100.0 { 0 } else { 1 };
            println!("    {name:<44} {value:>9.prec$} {unit}");
        }
        if references_shown.contains(&solo.reference) {
            println!("    reference: as above");
        } else {
            println!("    reference: {}", solo.reference);
            references_shown.push(solo.reference);
        }
    }
}

fn to_json(
    args: &Args,
    impls: &[Impl; 2],
    binaries: &[(&str, PathBuf)],
    results: &[RowResult],
) -> serde_json::Value {
    let summary = |s: &[Duration]| {
        let ms: Vec<f64> = s.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        match Summary::of(s) {
            Some(x) => serde_json::json!({
                "n": x.n, "median_ms": x.median, "p10_ms": x.p10, "p90_ms": x.p90,
                "min_ms": x.min, "max_ms": x.max, "samples_ms": ms,
            }),
            None => serde_json::Value::Null,
        }
    };
    let rows: Vec<_> = results
        .iter()
        .map(|r| {
            let ratio = match (Summary::of(&r.samples[0]), Summary::of(&r.samples[1])) {
                (Some(o), Some(f)) => serde_json::json!(ratio(&o, &f)),
                _ => serde_json::Value::Null,
            };
            let mut row = serde_json::json!({
                "name": r.row.name,
                "about": r.row.about,
                "ours": summary(&r.samples[0]),
                "reference": summary(&r.samples[1]),
                "ratio_reference_over_ours": ratio,
            });
            if let Run::Solo(solo) = &r.row.run {
                let figures: Vec<_> = figure_medians(&r.figures)
                    .into_iter()
                    .map(|(name, median, unit)| {
                        let samples: Vec<f64> = r
                            .figures
                            .iter()
                            .flatten()
                            .filter(|f| f.0 == name)
                            .map(|f| f.1)
                            .collect();
                        serde_json::json!({
                            "name": name, "unit": unit, "median": median, "samples": samples,
                        })
                    })
                    .collect();
                row["figures"] = serde_json::json!(figures);
                row["reference_note"] = serde_json::json!(solo.reference);
            }
            row
        })
        .collect();
    serde_json::json!({
        "machine": { "nproc": nproc(), "cpu": cpu_model(), "kernel": kernel() },
        "iterations": args.iterations,
        "warmup": args.warmup,
        "ours_dir": impls[0].bin_dir,
        "reference_dir": impls[1].bin_dir,
        "binaries": binaries
            .iter()
            .map(|(label, b)| serde_json::json!({ "side": label, "path": b }))
            .collect::<Vec<_>>(),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &[&str]) -> Result<Parsed> {
        parse_args(a.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flags_with_space_or_equals() {
        let Parsed::Run(a) = parse(&[
            "--ours",
            "/o",
            "--reference=/r",
            "--iterations",
            "7",
            "--only=DEL",
            "--json",
            "x.json",
        ])
        .unwrap() else {
            panic!("expected a run");
        };
        assert_eq!(a.ours, PathBuf::from("/o"));
        assert_eq!(a.reference, PathBuf::from("/r"));
        assert_eq!(a.iterations, 7);
        assert_eq!(a.only.as_deref(), Some("DEL"));
        assert_eq!(a.json, Some(PathBuf::from("x.json")));
        assert_eq!(a.warmup, DEFAULT_WARMUP);
    }

    #[test]
    fn bad_arguments() {
        assert!(parse(&["--iterations"]).is_err());
        assert!(parse(&["--iterations", "x"]).is_err());
        assert!(parse(&["--iterations", "0"]).is_err());
        assert!(parse(&["--frobnicate"]).is_err());
        assert!(matches!(
            parse(&["--only", "x", "--help"]),
            Ok(Parsed::Help)
        ));
    }

    #[test]
    fn front_rows_link_our_front_and_the_reference_delegates() {
        let scratch = TempDir::new("weft-bench-test-").unwrap();
        let side = |label, dir: &str| Impl {
            label,
            bin_dir: PathBuf::from(dir),
            subnet: "10.0.0.0/16",
        };
        let impls = [side("ours", "/o"), side("reference", "/r")];
        let dir = scratch.path().join("bin");
        let [ours, reference] =
            with_front(&impls, &["flannel", "bridge"], "flannel", &dir).unwrap();
        assert_eq!(
            (ours.bin_dir, reference.label),
            (PathBuf::from("/o"), "reference")
        );
        assert_eq!(reference.bin_dir, dir);
        let link = |p| std::fs::read_link(dir.join(p)).unwrap();
        assert_eq!(link("flannel"), PathBuf::from("/o/flannel"));
        assert_eq!(link("bridge"), PathBuf::from("/r/bridge"));
    }

    #[test]
    fn row_names_are_unique() {
        let mut names: Vec<_> = ROWS.iter().map(|r| r.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ROWS.len());
    }
}
