//! What relayratectl prints: the answers of the Admin service as plain
//! views (serialised as one JSON object with `--json`) and as aligned
//! tables for a person. Everything here is pure, so it is unit-tested.
//! Every value in the text is escaped ([`Escaped`]): keys, addresses and
//! policy files come from outside, and must not drive the terminal.

use std::fmt::Write as _;

use relayrate::check::Check;
use relayrate::policy::report::why_no_limit;
use relayrate::proto::v1 as pb;
use relayrate::terminal::{Escaped, EscapedText};
use serde::Serialize;

/// How a column's cells line up: numbers read best right-aligned.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Columns padded to their widest cell, two spaces apart, a header line
/// first. Trailing spaces are cut so that lines diff and grep cleanly.
/// Cells are escaped.
pub fn table(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| Escaped(c).to_string()).collect())
        .collect();
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            match columns[i].1 {
                Align::Left => {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
                Align::Right => {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Milliseconds since the epoch as RFC 3339 in UTC, to the second
/// (`2023-11-14T22:13:20Z`). Written out by hand: one conversion does not
/// justify a date crate.
pub fn rfc3339_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let mut days = secs / 86_400;
    let of_day = secs % 86_400;
    let mut year = 1970u64;
    loop {
        let len = if is_leap(year) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        year += 1;
    }
    let feb = if is_leap(year) { 29 } else { 28 };
    let months = [31, feb, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 1;
    for len in months {
        if days < len {
            break;
        }
        days -= len;
        month += 1;
    }
    format!(
        "{year:04}-{month:02}-{:02}T{:02}:{:02}:{:02}Z",
        days + 1,
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

fn is_leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

/// The first 12 hex digits of a policy hash: enough to tell policies
/// apart at a glance, as git's short ids.
pub fn short_hash(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// A check number from the wire as its policy-file name (`ConnRate`);
/// a number this build does not know stays visible as such.
pub fn check_name(check: i32) -> String {
    pb::Check::try_from(check)
        .ok()
        .and_then(|c| Check::try_from(c).ok())
        .map_or_else(|| format!("check#{check}"), |c| c.name().to_string())
}

/// `-` for 0, which the service uses for "none" (no limit, no window).
fn or_dash(n: u64, f: impl Fn(u64) -> String) -> String {
    if n == 0 {
        "-".to_string()
    } else {
        f(n)
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[derive(Debug, Serialize)]
pub struct MemberView {
    pub id: u64,
    pub addr: String,
    pub voter: bool,
    pub health: String,
    pub matched_index: u64,
}

impl From<&pb::Member> for MemberView {
    fn from(m: &pb::Member) -> MemberView {
        MemberView {
            id: m.id,
            addr: m.addr.clone(),
            voter: m.voter,
            health: m.health.clone(),
            matched_index: m.matched_index,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct MembersView {
    pub members: Vec<MemberView>,
}

impl From<&pb::MembersResponse> for MembersView {
    fn from(r: &pb::MembersResponse) -> MembersView {
        MembersView {
            members: r.members.iter().map(MemberView::from).collect(),
        }
    }
}

impl MembersView {
    pub fn text(&self) -> String {
        members_table(&self.members)
    }
}

fn members_table(members: &[MemberView]) -> String {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.addr.clone(),
                if m.voter { "voter" } else { "learner" }.to_string(),
                m.health.clone(),
                m.matched_index.to_string(),
            ]
        })
        .collect();
    table(
        &[
            ("id", Align::Right),
            ("addr", Align::Left),
            ("kind", Align::Left),
            ("health", Align::Left),
            ("matched", Align::Right),
        ],
        &rows,
    )
}

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub id: u64,
    pub role: String,
    pub term: u64,
    /// 0 when the node knows no leader.
    pub leader_id: u64,
    pub leader_addr: String,
    pub last_log_index: u64,
    pub last_applied_index: u64,
    pub ready: bool,
    pub policy_hash: String,
    pub policy_applied_unix_ms: u64,
    /// The same instant in RFC 3339, for a person reading the JSON.
    pub policy_applied: Option<String>,
    pub counters: u64,
    pub leases: u64,
    pub members: Vec<MemberView>,
}

impl From<&pb::StatusResponse> for StatusView {
    fn from(s: &pb::StatusResponse) -> StatusView {
        StatusView {
            id: s.id,
            role: s.role.clone(),
            term: s.term,
            leader_id: s.leader_id,
            leader_addr: s.leader_addr.clone(),
            last_log_index: s.last_log_index,
            last_applied_index: s.last_applied_index,
            ready: s.ready,
            policy_hash: s.policy_hash.clone(),
            policy_applied_unix_ms: s.policy_applied_unix_ms,
            policy_applied: (s.policy_applied_unix_ms > 0)
                .then(|| rfc3339_utc(s.policy_applied_unix_ms)),
            counters: s.counters,
            leases: s.leases,
            members: s.members.iter().map(MemberView::from).collect(),
        }
    }
}

impl StatusView {
    pub fn text(&self) -> String {
        let leader = if self.leader_id == 0 {
            "none known".to_string()
        } else {
            format!("{}@{}", self.leader_id, self.leader_addr)
        };
        let policy = if self.policy_hash.is_empty() {
            "none".to_string()
        } else {
            match &self.policy_applied {
                Some(t) => format!("{} applied {t}", short_hash(&self.policy_hash)),
                None => short_hash(&self.policy_hash).to_string(),
            }
        };
        let rows = [
            ("node", self.id.to_string()),
            ("role", self.role.clone()),
            ("term", self.term.to_string()),
            ("leader", leader),
            ("last log", self.last_log_index.to_string()),
            ("applied", self.last_applied_index.to_string()),
            ("ready", yes_no(self.ready).to_string()),
            ("policy", policy),
            ("counters", self.counters.to_string()),
            ("leases", self.leases.to_string()),
        ];
        let mut out = String::new();
        for (name, value) in rows {
            let _ = writeln!(out, "{name:<10}{}", Escaped(value));
        }
        out.push('\n');
        out.push_str(&members_table(&self.members));
        out
    }
}

#[derive(Debug, Serialize)]
pub struct KeyCountView {
    pub check: String,
    pub key: String,
    pub count: u64,
    /// 0 when no limit applies.
    pub limit: u64,
    pub percent: f64,
    /// 0 for open connections and per-connection checks.
    pub window_secs: u32,
    pub enabled: bool,
    /// Why the check is off or sets no limit, in words; absent when it
    /// applies a limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Counting well above its own baseline now.
    pub unusual: bool,
    /// Events in the current bucket.
    pub bucket_count: u64,
    /// The usual count per bucket at this hour; absent without history.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
}

impl From<&pb::KeyCount> for KeyCountView {
    fn from(k: &pb::KeyCount) -> KeyCountView {
        let check = pb::Check::try_from(k.check)
            .ok()
            .and_then(|c| Check::try_from(c).ok());
        KeyCountView {
            check: check_name(k.check),
            key: k.key.clone(),
            count: k.count,
            limit: k.limit,
            percent: k.percent,
            window_secs: k.window_secs,
            enabled: k.enabled,
            note: check.and_then(|c| why_no_limit(c, k.enabled, k.limit > 0, None)),
            unusual: k.unusual,
            bucket_count: k.bucket_count,
            baseline: k.baseline,
        }
    }
}

impl KeyCountView {
    fn limit_cell(&self) -> String {
        or_dash(self.limit, |l| l.to_string())
    }

    fn percent_cell(&self) -> String {
        if self.limit == 0 {
            "-".to_string()
        } else {
            format!("{:.1}", self.percent)
        }
    }

    fn window_cell(&self) -> String {
        or_dash(u64::from(self.window_secs), |w| format!("{w}s"))
    }

    fn baseline_cell(&self) -> String {
        self.baseline
            .map_or_else(|| "-".to_string(), |b| format!("{b:.1}"))
    }
}

#[derive(Debug, Serialize)]
pub struct TopView {
    pub keys: Vec<KeyCountView>,
    /// `top --unusual`: the bucket and baseline columns too.
    #[serde(skip)]
    pub unusual: bool,
}

impl From<&pb::TopResponse> for TopView {
    fn from(r: &pb::TopResponse) -> TopView {
        TopView {
            keys: r.keys.iter().map(KeyCountView::from).collect(),
            unusual: false,
        }
    }
}

impl TopView {
    /// The view of `top --unusual` when `unusual`.
    pub fn unusual_only(self, unusual: bool) -> TopView {
        TopView { unusual, ..self }
    }

    pub fn text(&self) -> String {
        if self.keys.is_empty() {
            let none = if self.unusual {
                "no unusual keys"
            } else {
                "no counters"
            };
            return format!("{none}\n");
        }
        let rows: Vec<Vec<String>> = self
            .keys
            .iter()
            .map(|k| {
                let mut row = vec![
                    k.check.clone(),
                    k.key.clone(),
                    k.count.to_string(),
                    k.limit_cell(),
                    k.percent_cell(),
                    k.window_cell(),
                ];
                if self.unusual {
                    row.extend([k.bucket_count.to_string(), k.baseline_cell()]);
                }
                row
            })
            .collect();
        let mut columns = vec![
            ("check", Align::Left),
            ("key", Align::Left),
            ("count", Align::Right),
            ("limit", Align::Right),
            ("percent", Align::Right),
            ("window", Align::Right),
        ];
        if self.unusual {
            columns.extend([("bucket", Align::Right), ("usual", Align::Right)]);
        }
        table(&columns, &rows)
    }
}

#[derive(Debug, Serialize)]
pub struct ShowView {
    pub key: String,
    pub checks: Vec<KeyCountView>,
}

impl ShowView {
    pub fn new(key: &str, r: &pb::ShowResponse) -> ShowView {
        ShowView {
            key: key.to_string(),
            checks: r.checks.iter().map(KeyCountView::from).collect(),
        }
    }

    pub fn text(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .checks
            .iter()
            .map(|k| {
                vec![
                    k.check.clone(),
                    k.count.to_string(),
                    k.limit_cell(),
                    k.percent_cell(),
                    k.window_cell(),
                    yes_no(k.enabled).to_string(),
                    k.note.clone().unwrap_or_else(|| "-".to_string()),
                ]
            })
            .collect();
        let mut out = format!("key {}\n", Escaped(&self.key));
        out.push_str(&table(
            &[
                ("check", Align::Left),
                ("count", Align::Right),
                ("limit", Align::Right),
                ("percent", Align::Right),
                ("window", Align::Right),
                ("enabled", Align::Left),
                ("note", Align::Left),
            ],
            &rows,
        ));
        out
    }
}

#[derive(Debug, Serialize)]
pub struct ResetView {
    pub key: String,
    /// `None` when every check of the key was reset.
    pub check: Option<String>,
    pub cleared: u64,
}

impl ResetView {
    pub fn text(&self) -> String {
        let what = match &self.check {
            Some(c) => format!("{c} counters"),
            None => "counters".to_string(),
        };
        format!("{}: cleared {} {what}\n", Escaped(&self.key), self.cleared)
    }
}

#[derive(Debug, Serialize)]
pub struct PolicyFileView {
    pub name: String,
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct PolicyView {
    pub hash: String,
    pub applied_unix_ms: u64,
    pub applied: Option<String>,
    pub files: Vec<PolicyFileView>,
}

impl From<&pb::ShowPolicyResponse> for PolicyView {
    fn from(r: &pb::ShowPolicyResponse) -> PolicyView {
        PolicyView {
            hash: r.hash.clone(),
            applied_unix_ms: r.applied_unix_ms,
            applied: (r.applied_unix_ms > 0).then(|| rfc3339_utc(r.applied_unix_ms)),
            files: r
                .files
                .iter()
                .map(|f| PolicyFileView {
                    name: f.name.clone(),
                    text: f.text.clone(),
                })
                .collect(),
        }
    }
}

impl PolicyView {
    /// A header, then each file as `head` shows several: `==> NAME <==`.
    pub fn text(&self) -> String {
        let mut out = format!("hash     {}\n", Escaped(&self.hash));
        let _ = writeln!(
            out,
            "applied  {}",
            self.applied.as_deref().unwrap_or("never")
        );
        for f in &self.files {
            let _ = write!(
                out,
                "\n==> {} <==\n{}",
                Escaped(&f.name),
                EscapedText(&f.text)
            );
            if !f.text.ends_with('\n') {
                out.push('\n');
            }
        }
        out
    }
}

#[derive(Debug, Serialize)]
pub struct AppliedView {
    pub hash: String,
    pub changed: bool,
    pub warnings: Vec<String>,
}

impl AppliedView {
    /// The result line; warnings are printed apart, on stderr.
    pub fn text(&self) -> String {
        if self.changed {
            format!("policy {} in force\n", Escaped(&self.hash))
        } else {
            format!(
                "policy {} unchanged: already in force\n",
                Escaped(&self.hash)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_under_their_header() {
        let t = table(
            &[("name", Align::Left), ("n", Align::Right)],
            &[
                vec!["a".into(), "1234".into()],
                vec!["longer".into(), "5".into()],
            ],
        );
        assert_eq!(t, "name       n\na       1234\nlonger     5\n");
    }

    #[test]
    fn a_table_without_rows_is_its_header() {
        let t = table(&[("a", Align::Left), ("bb", Align::Left)], &[]);
        assert_eq!(t, "a  bb\n");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_utc(1_735_689_599_000), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339_utc(4_107_542_400_000), "2100-03-01T00:00:00Z");
    }

    #[test]
    fn hashes_are_cut_to_twelve_digits() {
        assert_eq!(short_hash("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_hash("abc"), "abc");
        assert_eq!(short_hash(""), "");
    }

    #[test]
    fn checks_are_named_as_in_policy_files() {
        assert_eq!(check_name(pb::Check::ConnRate as i32), "ConnRate");
        assert_eq!(check_name(pb::Check::RcptRateAuth as i32), "RcptRateAuth");
        assert_eq!(check_name(99), "check#99");
        assert_eq!(check_name(0), "check#0");
    }

    fn key_count(check: pb::Check, key: &str, count: u64, limit: u64, window: u32) -> pb::KeyCount {
        pb::KeyCount {
            check: check as i32,
            key: key.into(),
            count,
            limit,
            percent: if limit == 0 {
                0.0
            } else {
                count as f64 * 100.0 / limit as f64
            },
            window_secs: window,
            enabled: true,
            ..Default::default()
        }
    }

    #[test]
    fn top_shows_percent_to_one_decimal_and_dashes_for_none() {
        let top = TopView::from(&pb::TopResponse {
            keys: vec![
                key_count(pb::Check::ConnRate, "10.0.0.1", 12, 20, 600),
                key_count(pb::Check::ConnOpen, "10.0.0.2", 1, 3, 0),
                key_count(pb::Check::MsgRateFrom, "a@b.test", 7, 0, 600),
            ],
        });
        assert_eq!(
            top.text(),
            "\
check        key       count  limit  percent  window
ConnRate     10.0.0.1     12     20     60.0    600s
ConnOpen     10.0.0.2      1      3     33.3       -
MsgRateFrom  a@b.test      7      -        -    600s
"
        );
        let json = serde_json::to_value(&top).unwrap();
        assert_eq!(json["keys"][0]["check"], "ConnRate");
        assert_eq!(json["keys"][0]["count"], 12);
        assert_eq!(json["keys"][0]["window_secs"], 600);
    }

    #[test]
    fn an_empty_top_says_so() {
        let empty = TopView {
            keys: vec![],
            unusual: false,
        };
        assert_eq!(empty.text(), "no counters\n");
        assert_eq!(empty.unusual_only(true).text(), "no unusual keys\n");
    }

    #[test]
    fn top_unusual_shows_the_bucket_and_the_usual_count() {
        let mut k = key_count(pb::Check::ConnRate, "10.0.0.1", 120, 1000, 600);
        k.unusual = true;
        k.bucket_count = 20;
        k.baseline = Some(4.0);
        let mut new = key_count(pb::Check::MsgRate, "10.0.0.2", 12, 0, 600);
        new.unusual = true;
        new.bucket_count = 12;
        let top = TopView::from(&pb::TopResponse { keys: vec![k, new] }).unusual_only(true);
        assert_eq!(
            top.text(),
            "\
check     key       count  limit  percent  window  bucket  usual
ConnRate  10.0.0.1    120   1000     12.0    600s      20    4.0
MsgRate   10.0.0.2     12      -        -    600s      12      -
"
        );
        let json = serde_json::to_value(&top).unwrap();
        assert_eq!(json["keys"][0]["unusual"], true);
        assert_eq!(json["keys"][0]["baseline"], 4.0);
        assert_eq!(json["keys"][1].get("baseline"), None);
    }

    fn status() -> pb::StatusResponse {
        pb::StatusResponse {
            id: 2,
            role: "follower".into(),
            term: 5,
            leader_id: 1,
            leader_addr: "127.0.0.1:7451".into(),
            last_log_index: 40,
            last_applied_index: 39,
            ready: true,
            members: vec![
                pb::Member {
                    id: 1,
                    addr: "127.0.0.1:7451".into(),
                    voter: true,
                    health: "leader".into(),
                    matched_index: 40,
                },
                pb::Member {
                    id: 12,
                    addr: "10.0.0.12:7450".into(),
                    voter: false,
                    health: "lagging".into(),
                    matched_index: 7,
                },
            ],
            policy_hash: "9f86d081884c7d659a2feaa0c55ad015".into(),
            policy_applied_unix_ms: 1_700_000_000_000,
            counters: 3,
            leases: 1,
        }
    }

    #[test]
    fn status_text_names_the_leader_and_lists_members() {
        let text = StatusView::from(&status()).text();
        assert_eq!(
            text,
            "\
node      2
role      follower
term      5
leader    1@127.0.0.1:7451
last log  40
applied   39
ready     yes
policy    9f86d081884c applied 2023-11-14T22:13:20Z
counters  3
leases    1

id  addr            kind     health   matched
 1  127.0.0.1:7451  voter    leader        40
12  10.0.0.12:7450  learner  lagging        7
"
        );
    }

    #[test]
    fn status_without_leader_or_policy_says_none() {
        let mut s = status();
        s.leader_id = 0;
        s.leader_addr.clear();
        s.policy_hash.clear();
        s.policy_applied_unix_ms = 0;
        let view = StatusView::from(&s);
        let text = view.text();
        assert!(text.contains("leader    none known\n"), "{text}");
        assert!(text.contains("policy    none\n"), "{text}");
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["policy_applied"], serde_json::Value::Null);
        assert_eq!(json["members"][1]["voter"], false);
    }

    #[test]
    fn show_lists_every_check_of_the_key() {
        let show = ShowView::new(
            "10.0.0.1",
            &pb::ShowResponse {
                checks: vec![
                    key_count(pb::Check::ConnRate, "10.0.0.1", 0, 15, 600),
                    pb::KeyCount {
                        enabled: false,
                        ..key_count(pb::Check::MsgRate, "10.0.0.1", 0, 0, 600)
                    },
                    key_count(pb::Check::MsgRateFrom, "10.0.0.1", 0, 0, 600),
                    key_count(pb::Check::MaxRcpt, "10.0.0.1", 0, 0, 0),
                ],
            },
        );
        assert_eq!(
            show.text(),
            "\
key 10.0.0.1
check        count  limit  percent  window  enabled  note
ConnRate         0     15      0.0    600s  yes      -
MsgRate          0      -        -    600s  no       off: CHECK_MSG_RATE is not YES
MsgRateFrom      0      -        -    600s  yes      no limit: an entry of 0 matches, or none does and MsgRateFrom has no built-in default
MaxRcpt          0      -        -       -  yes      no limit: the entry that matches says 0
"
        );
    }

    #[test]
    fn policy_show_prints_each_file_after_its_name() {
        let view = PolicyView::from(&pb::ShowPolicyResponse {
            files: vec![
                pb::PolicyFile {
                    name: "a.txt".into(),
                    text: "CHECK_CONN_RATE YES\n".into(),
                },
                pb::PolicyFile {
                    name: "b.txt".into(),
                    text: "ConnRate:default 9".into(),
                },
            ],
            hash: "abc".into(),
            applied_unix_ms: 0,
        });
        assert_eq!(
            view.text(),
            "hash     abc\napplied  never\n\n==> a.txt <==\nCHECK_CONN_RATE YES\n\n==> b.txt <==\nConnRate:default 9\n"
        );
    }

    #[test]
    fn values_from_outside_are_escaped_in_the_text() {
        let evil = "10.0.0.1\nConnRate  6.6.6.6\x1b[2J";
        let escaped = "10.0.0.1\\nConnRate  6.6.6.6\\x1b[2J";
        let top = TopView::from(&pb::TopResponse {
            keys: vec![key_count(pb::Check::ConnRate, evil, 1, 2, 600)],
        })
        .text();
        let show = ShowView::new(evil, &pb::ShowResponse { checks: vec![] }).text();
        let reset = ResetView {
            key: evil.into(),
            check: None,
            cleared: 0,
        }
        .text();
        let mut s = status();
        s.members[1].addr = evil.into();
        let status = StatusView::from(&s).text();
        let policy = PolicyView::from(&pb::ShowPolicyResponse {
            files: vec![pb::PolicyFile {
                name: evil.into(),
                // A line break in a file is one: the text keeps its lines.
                text: "ConnRate:a\x1b[2J 5\n\tConnOpen:a 1\n".into(),
            }],
            hash: "abc".into(),
            applied_unix_ms: 0,
        })
        .text();
        for (text, lines) in [(top, 2), (show, 2), (reset, 1), (status, 14), (policy, 6)] {
            assert!(!text.contains('\x1b'), "{text}");
            assert!(text.contains(escaped), "{text}");
            assert_eq!(text.lines().count(), lines, "{text}");
        }
        // A policy file keeps its lines and tabs.
        let policy = PolicyView::from(&pb::ShowPolicyResponse {
            files: vec![pb::PolicyFile {
                name: "a".into(),
                text: "X 1\n\tY 2\n".into(),
            }],
            hash: "abc".into(),
            applied_unix_ms: 0,
        });
        assert!(policy.text().ends_with("==> a <==\nX 1\n\tY 2\n"));
    }

    #[test]
    fn reset_and_apply_say_what_happened() {
        let r = ResetView {
            key: "10.0.0.1".into(),
            check: Some("ConnRate".into()),
            cleared: 1,
        };
        assert_eq!(r.text(), "10.0.0.1: cleared 1 ConnRate counters\n");
        let a = AppliedView {
            hash: "abc".into(),
            changed: false,
            warnings: vec![],
        };
        assert_eq!(a.text(), "policy abc unchanged: already in force\n");
    }
}
