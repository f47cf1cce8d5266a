//! CHECK: every mapping of this attachment is in place, per family (the reference
//! 1.1.1 checks both families for every pod and so fails on all of them).

use crate::config::{self, PortMapConf};
use crate::rules::{self, Plan};
use weft_core::error::{CniError, Result, code};
use weft_core::masq::Attachment;
use weft_core::skel::Request;

pub fn check(req: &Request, conf: &PortMapConf) -> Result<()> {
    let prev = req
        .conf
        .prev_result()?
        .ok_or_else(|| CniError::config("Required prevResult missing"))?;
    let mappings = config::port_mappings(req)?;
    let ips = config::container_ips(&prev, &req.env.ifname);
    let plan = Plan::new(&req.conf.name, conf, &mappings, &ips);
    if plan.entries.is_empty() {
        return Ok(());
    }
    let env = &req.env;
    let att = Attachment::new(&req.conf.name, &env.container_id, &env.ifname);
    let problems = match rules::list()? {
        None => vec![format!("table inet {} does not exist", rules::TABLE)],
        Some(l) => rules::problems(&l, conf, &plan, &att),
    };
    if problems.is_empty() {
        return Ok(());
    }
    Err(CniError::new(
        code::CHECK_FAILED,
        format!("portmap: {}", problems.join("; ")),
    ))
}
