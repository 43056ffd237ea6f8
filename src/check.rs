//! The checks of `docs/policy.md` §1: their names, their switches, what key
//! they are looked up by, their built-in defaults and the reply a client
//! hears when one refuses.

use std::fmt;
use std::str::FromStr;

/// One of ze-filter's checks. The order is the order of `docs/policy.md`
/// §1 and of every report (`policy explain`, verdicts that name several
/// checks).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[repr(u8)]
pub enum Check {
    ConnRate,
    ConnOpen,
    MaxRcpt,
    MsgRate,
    MaxMsgs,
    RcptRate,
    MsgRateFrom,
    RcptRateFrom,
    MaxRcptFrom,
    MsgRateAuth,
    RcptRateAuth,
}

/// What a check's policy entries are keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyKind {
    /// Client address, host name and parents, NetClass label.
    Client,
    /// Envelope sender: address, `@domain`, domain and parents.
    Sender,
    /// SMTP AUTH user name.
    AuthUser,
}

/// How a check measures: over the sliding window (cluster state), as open
/// connections (leases, cluster state), or inside one connection (the
/// milter's session counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    Window,
    Open,
    PerConnection,
}

/// The `CHECK_*` switches. A check is enforced only when its switch is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Switch {
    ConnRate,
    OpenConnections,
    NbRcpt,
    MsgRate,
    NbMsgs,
    RcptRate,
}

impl Switch {
    pub const ALL: [Switch; 6] = [
        Switch::ConnRate,
        Switch::OpenConnections,
        Switch::NbRcpt,
        Switch::MsgRate,
        Switch::NbMsgs,
        Switch::RcptRate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Switch::ConnRate => "CHECK_CONN_RATE",
            Switch::OpenConnections => "CHECK_OPEN_CONNECTIONS",
            Switch::NbRcpt => "CHECK_NB_RCPT",
            Switch::MsgRate => "CHECK_MSG_RATE",
            Switch::NbMsgs => "CHECK_NB_MSGS",
            Switch::RcptRate => "CHECK_RCPT_RATE",
        }
    }

    /// Case-insensitive lookup of a switch name.
    pub fn from_name(name: &str) -> Option<Switch> {
        Switch::ALL
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(name))
    }
}

/// The SMTP reply a refusal produces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: &'static str,
    pub text: String,
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.code, self.enhanced, self.text)
    }
}

impl Check {
    pub const ALL: [Check; 11] = [
        Check::ConnRate,
        Check::ConnOpen,
        Check::MaxRcpt,
        Check::MsgRate,
        Check::MaxMsgs,
        Check::RcptRate,
        Check::MsgRateFrom,
        Check::RcptRateFrom,
        Check::MaxRcptFrom,
        Check::MsgRateAuth,
        Check::RcptRateAuth,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Check::ConnRate => "ConnRate",
            Check::ConnOpen => "ConnOpen",
            Check::MaxRcpt => "MaxRcpt",
            Check::MsgRate => "MsgRate",
            Check::MaxMsgs => "MaxMsgs",
            Check::RcptRate => "RcptRate",
            Check::MsgRateFrom => "MsgRateFrom",
            Check::RcptRateFrom => "RcptRateFrom",
            Check::MaxRcptFrom => "MaxRcptFrom",
            Check::MsgRateAuth => "MsgRateAuth",
            Check::RcptRateAuth => "RcptRateAuth",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn switch(self) -> Switch {
        match self {
            Check::ConnRate => Switch::ConnRate,
            Check::ConnOpen => Switch::OpenConnections,
            Check::MaxRcpt | Check::MaxRcptFrom => Switch::NbRcpt,
            Check::MsgRate | Check::MsgRateFrom | Check::MsgRateAuth => Switch::MsgRate,
            Check::MaxMsgs => Switch::NbMsgs,
            Check::RcptRate | Check::RcptRateFrom | Check::RcptRateAuth => Switch::RcptRate,
        }
    }

    pub fn key_kind(self) -> KeyKind {
        match self {
            Check::MsgRateFrom | Check::RcptRateFrom | Check::MaxRcptFrom => KeyKind::Sender,
            Check::MsgRateAuth | Check::RcptRateAuth => KeyKind::AuthUser,
            _ => KeyKind::Client,
        }
    }

    pub fn measure(self) -> Measure {
        match self {
            Check::ConnOpen => Measure::Open,
            Check::MaxRcpt | Check::MaxMsgs | Check::MaxRcptFrom => Measure::PerConnection,
            _ => Measure::Window,
        }
    }

    /// ze-filter's built-in limit, used when the switch is on and no entry
    /// matches. `None` is no limit.
    pub fn builtin_default(self) -> Option<u64> {
        match self {
            Check::ConnRate => Some(15),
            Check::ConnOpen => Some(10),
            Check::MaxRcpt => Some(200),
            Check::MsgRate => Some(100),
            Check::MaxMsgs => Some(100),
            Check::RcptRate => Some(100),
            _ => None,
        }
    }

    /// Code, enhanced code and words of the refusal (`docs/policy.md` §1).
    fn reply_words(self) -> (u16, &'static str, &'static str) {
        match self {
            Check::ConnRate => (421, "4.5.1", "Connection rate too high"),
            Check::ConnOpen => (421, "4.5.1", "Too many open connections"),
            Check::MaxRcpt | Check::MaxRcptFrom => {
                (451, "4.3.2", "Too many recipients for this message")
            }
            Check::MsgRate | Check::MsgRateFrom | Check::MsgRateAuth => {
                (451, "4.3.2", "Message rate too high")
            }
            Check::MaxMsgs => (451, "4.3.2", "Too many messages for this connection"),
            Check::RcptRate | Check::RcptRateFrom | Check::RcptRateAuth => {
                (451, "4.3.2", "Recipient rate too high")
            }
        }
    }

    /// The reply for a refusal with its figures, e.g.
    /// `451 4.3.2 Message rate too high (40/40 in 600s) - try again later`.
    /// `window_secs` is given for windowed checks only.
    pub fn reply(self, count: u64, limit: u64, window_secs: Option<u32>) -> Reply {
        let (code, enhanced, words) = self.reply_words();
        let text = match window_secs {
            Some(w) => format!("{words} ({count}/{limit} in {w}s) - try again later"),
            None => format!("{words} ({count}/{limit}) - try again later"),
        };
        Reply {
            code,
            enhanced,
            text,
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name is not one of the checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown check `{0}`")]
pub struct UnknownCheck(pub String);

impl FromStr for Check {
    type Err = UnknownCheck;

    /// Case-insensitive, as ze-policy.txt is.
    fn from_str(s: &str) -> Result<Check, UnknownCheck> {
        Check::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownCheck(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_case_insensitively() {
        for c in Check::ALL {
            assert_eq!(c.name().to_uppercase().parse::<Check>(), Ok(c));
            assert_eq!(Check::ALL[c.index()], c);
        }
        assert!("ConnRat".parse::<Check>().is_err());
    }

    #[test]
    fn reply_names_the_figures() {
        let r = Check::MsgRate.reply(40, 40, Some(600));
        assert_eq!(
            r.to_string(),
            "451 4.3.2 Message rate too high (40/40 in 600s) - try again later"
        );
        let r = Check::ConnOpen.reply(6, 5, None);
        assert_eq!(
            r.to_string(),
            "421 4.5.1 Too many open connections (6/5) - try again later"
        );
    }
}
