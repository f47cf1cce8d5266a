//! resolv.conf parsing for `ipam.resolvConf`.

use std::path::Path;
use weft_core::error::{CniError, Result};
use weft_core::spec::Dns;

/// `nameserver` (each), `domain`, `search` and `options` (all fields); `#`/`;` comments.
pub fn parse_resolv_conf(path: &Path) -> Result<Dns> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CniError::config(format!("resolvConf {}: {e}", path.display())))?;
    Ok(parse(&text))
}

fn parse(text: &str) -> Dns {
    let mut dns = Dns::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let rest = || fields.clone().skip(1).map(str::to_string);
        match fields.clone().next() {
            Some("nameserver") => dns.nameservers.extend(rest().take(1)),
            Some("domain") => dns.domain = rest().next().unwrap_or_default(),
            Some("search") => dns.search.extend(rest()),
            Some("options") => dns.options.extend(rest()),
            _ => {}
        }
        fields.next();
    }
    dns
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_every_directive() {
        let dns = super::parse(
            "# comment\nnameserver 10.0.0.10\nnameserver fd::10 ; trailing\ndomain example.com\n\
             search a.example b.example\noptions ndots:5 edns0\nbogus line\n",
        );
        assert_eq!(dns.nameservers, ["10.0.0.10", "fd::10"]);
        assert_eq!(dns.domain, "example.com");
        assert_eq!(dns.search, ["a.example", "b.example"]);
        assert_eq!(dns.options, ["ndots:5", "edns0"]);
    }
}
