//! Egress rate shaping with an htb qdisc.
//!
//! rtnetlink 0.17 (netlink-packet-route 0.24) has no htb options, and an htb
//! class needs rate tables that `tc` computes, so the qdisc and class are
//! installed by running `tc` (from iproute2), inside the link's namespace
//! through [`crate::command_in_netns`] when it is a named one, in the
//! caller's namespace for [`crate::Ns::Root`]. Finding and deleting the root
//! qdisc is done over rtnetlink.

use std::io;
use std::process::Command;

use crate::netns::command_in_netns;
use crate::Ns;

/// The htb class (under qdisc `1:`) that all traffic goes to; `tc` parses
/// both `default 10` and `classid 1:10` as hex, so they match.
const CLASS_MINOR: &str = "10";

/// Highest accepted rate: 100 Gbit/s (beyond that `tc` computes nonsense).
pub const MAX_RATE_BITS_PER_SEC: u64 = 100_000_000_000;

/// The `tc` argument lists that install shaping at `rate` bits/s on `link`,
/// assuming it has no root qdisc of its own yet:
///
/// 1. `qdisc add dev LINK root handle 1: htb default 10`
/// 2. `class add dev LINK parent 1: classid 1:10 htb rate Rbit ceil Rbit
///    burst B cburst B quantum Q`
///
/// The burst is 10 ms worth of data (at least 4 full frames): `tc`'s own
/// default overflows at rates of 1 Gbit/s and more. The quantum is what `tc`
/// would pick (rate/10) clamped to htb's useful range, which avoids its
/// "quantum is big" warning.
pub fn htb_commands(link: &str, rate_bits_per_sec: u64) -> io::Result<[Vec<String>; 2]> {
    if rate_bits_per_sec == 0 || rate_bits_per_sec > MAX_RATE_BITS_PER_SEC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("rate {rate_bits_per_sec} bit/s is outside 1..={MAX_RATE_BITS_PER_SEC} bit/s"),
        ));
    }
    let bytes_per_sec = rate_bits_per_sec / 8;
    let burst = (bytes_per_sec / 100).max(4 * 1514);
    let quantum = (bytes_per_sec / 10).clamp(1514, 200_000);
    let rate = format!("{rate_bits_per_sec}bit");
    let args = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    Ok([
        args(&[
            "qdisc",
            "add",
            "dev",
            link,
            "root",
            "handle",
            "1:",
            "htb",
            "default",
            CLASS_MINOR,
        ]),
        args(&[
            "class",
            "add",
            "dev",
            link,
            "parent",
            "1:",
            "classid",
            &format!("1:{CLASS_MINOR}"),
            "htb",
            "rate",
            &rate,
            "ceil",
            &rate,
            "burst",
            &burst.to_string(),
            "cburst",
            &burst.to_string(),
            "quantum",
            &quantum.to_string(),
        ]),
    ])
}

/// A `tc ARGS` command that runs in `ns`.
pub(crate) fn tc_command(ns: Ns<'_>, args: &[String]) -> Result<Command, crate::NetError> {
    let mut cmd = Command::new("tc");
    cmd.args(args);
    if let Ns::Named(name) = ns {
        command_in_netns(&mut cmd, name)?;
    }
    Ok(cmd)
}

/// Run a command built by [`tc_command`]; a non-zero exit becomes an error
/// holding tc's stderr.
pub(crate) async fn run_tc(cmd: Command) -> io::Result<()> {
    let shown = format!(
        "tc {}",
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let output = tokio::process::Command::from(cmd)
        .output()
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run `{shown}`: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(io::Error::other(format!(
        "`{shown}` failed ({}): {}",
        output.status,
        stderr.trim()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htb_commands_at_10_mbit() {
        let [qdisc, class] = htb_commands("xl-h1", 10_000_000).expect("valid rate");
        assert_eq!(
            qdisc.join(" "),
            "qdisc add dev xl-h1 root handle 1: htb default 10"
        );
        assert_eq!(
            class.join(" "),
            "class add dev xl-h1 parent 1: classid 1:10 htb rate 10000000bit \
             ceil 10000000bit burst 12500 cburst 12500 quantum 125000"
        );
    }

    #[test]
    fn htb_burst_and_quantum_stay_in_range() {
        let [_, class] = htb_commands("v", 64_000).expect("valid rate");
        let s = class.join(" ");
        assert!(s.contains("burst 6056 cburst 6056 quantum 1514"), "{s}");
        let [_, class] = htb_commands("v", 10_000_000_000).expect("valid rate");
        let s = class.join(" ");
        assert!(s.contains("burst 12500000 "), "{s}");
        assert!(s.ends_with("quantum 200000"), "{s}");
    }

    #[test]
    fn htb_rejects_silly_rates() {
        for rate in [0, MAX_RATE_BITS_PER_SEC + 1] {
            let e = htb_commands("v", rate).expect_err("must be refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        }
    }
}
