//! The `ze-policy.txt` reader's diagnostics (`docs/policy.md` §3): every
//! kind of error names its file, line and column (1-based, in characters),
//! a policy with any error is refused whole, and what is legal (comments,
//! case, suffixes, duplicates, switched-off checks) is read as documented.

use std::net::IpAddr;

use relayrate::check::{Check, Switch};
use relayrate::policy::{Client, Diagnostic, Matched, Policy, PolicyError, PolicyFile};

const FILE: &str = "ze-policy.txt";

fn file(name: &str, text: &str) -> PolicyFile {
    PolicyFile {
        name: name.to_string(),
        text: text.to_string(),
    }
}

fn ok(text: &str) -> Policy {
    match Policy::parse_str(FILE, text) {
        Ok(p) => p,
        Err(e) => panic!("policy refused:\n{e}\n--- text ---\n{text}"),
    }
}

/// Every diagnostic of a refused policy.
fn refused(files: Vec<PolicyFile>) -> Vec<Diagnostic> {
    match Policy::parse(files) {
        Err(PolicyError::Invalid { errors, .. }) => errors,
        Err(e) => panic!("expected Invalid, got {e:?}"),
        Ok(_) => panic!("policy accepted"),
    }
}

fn errors(text: &str) -> Vec<Diagnostic> {
    refused(vec![file(FILE, text)])
}

/// The one diagnostic of `text`, checked for place and message fragment.
#[track_caller]
fn assert_error(text: &str, line: u32, column: u32, fragment: &str) {
    let d = errors(text);
    assert_eq!(d.len(), 1, "expected one error for {text:?}, got {d:#?}");
    let d = &d[0];
    assert_eq!(
        (&*d.file, d.line, d.column),
        (FILE, line, column),
        "place of {:?} for {text:?}",
        d.message
    );
    assert!(
        d.message.contains(fragment),
        "message {:?} lacks {fragment:?} (text {text:?})",
        d.message
    );
}

fn ip(s: &str) -> Client {
    Client::from_ip(s.parse::<IpAddr>().unwrap())
}

// ---------------------------------------------------------------- errors

#[test]
fn unknown_check_name() {
    assert_error(
        "# a comment\nConnRat:1.1.1.11 50\n",
        2,
        1,
        "unknown check `ConnRat`",
    );
    let d = &errors("ConnRat:1.1.1.11 50")[0];
    assert!(
        d.message
            .contains("expected one of ConnRate, ConnOpen, MaxRcpt"),
        "{}",
        d.message
    );
    assert!(
        d.message.ends_with("RcptRateAuth, NetClass"),
        "{}",
        d.message
    );
    // An empty name before the colon is an unknown check too.
    assert_error(":1.1.1.11 50", 1, 1, "unknown check ``");
}

#[test]
fn unknown_directive_or_word() {
    assert_error(
        "CHECK_CONN_RATE YES\n\nFOO BAR\n",
        3,
        1,
        "expected `Check:Key Value` or a setting such as CHECK_CONN_RATE YES, found `FOO`",
    );
    // A misspelt switch is an unknown word.
    assert_error("CHECK_CONNRATE YES", 1, 1, "found `CHECK_CONNRATE`");
    // A lone word is one too.
    assert_error("ConnRate", 1, 1, "found `ConnRate`");
}

#[test]
fn missing_key() {
    // `ConnRate:` is the first token and `50` the value: the key is empty,
    // and the column is the one just after the colon.
    assert_error("ConnRate: 50", 1, 10, "expected a key after `ConnRate:`");
    assert_error("ConnRate:", 1, 10, "expected a key after `ConnRate:`");
    assert_error(
        "NetClass: FRIEND",
        1,
        10,
        "expected a key after `NetClass:`",
    );
}

#[test]
fn missing_value() {
    // The column is just past the end of the line.
    assert_error(
        "ConnRate:1.1.1.11",
        1,
        18,
        "expected a value after `ConnRate:1.1.1.11`",
    );
    assert_error(
        "NetClass:10.0.0.0/8",
        1,
        20,
        "expected a value after `NetClass:10.0.0.0/8`",
    );
    assert_error(
        "CHECK_CONN_RATE",
        1,
        16,
        "expected a value after `CHECK_CONN_RATE`",
    );
    assert_error("RateWindow", 1, 11, "expected a value after `RateWindow`");
}

#[test]
fn bad_limit() {
    for bad in ["abc", "5x", "k", "1.5", "-", "5kk", "0x10"] {
        assert_error(
            &format!("CHECK_CONN_RATE YES\nConnRate:1.1.1.11 {bad}\n"),
            2,
            19,
            &format!("expected a limit (a whole number, optionally with k or m), found `{bad}`"),
        );
    }
}

#[test]
fn limit_too_large() {
    let max = "(at most 4294967295)";
    for big in ["4294967296", "4295m", "4294968k", "99999999999999999999999"] {
        assert_error(
            &format!("MaxRcpt:default {big}"),
            1,
            17,
            &format!("limit `{big}` is too large {max}"),
        );
    }
    // The largest limit is accepted.
    let p = ok("CHECK_NB_RCPT YES\nMaxRcpt:default 4294967295\nMaxRcpt:1.1.1.11 4294m");
    assert_eq!(p.limit(Check::MaxRcpt, &ip("2.2.2.2")), Some(4_294_967_295));
    assert_eq!(
        p.limit(Check::MaxRcpt, &ip("1.1.1.11")),
        Some(4_294_000_000)
    );
}

#[test]
fn second_word_after_the_value() {
    let msg = "expected the end of the line after the value, found `# fifty` \
               (comments go on a line of their own)";
    assert_error("ConnRate:1.1.1.11 50 # fifty", 1, 22, msg);
    assert_error(
        "CHECK_CONN_RATE YES # on",
        1,
        21,
        "expected the end of the line after the value, found `# on`",
    );
    assert_error("NetClass:10.0.0.0/8 FRIEND LOCAL", 1, 28, "found `LOCAL`");
    // Trailing blanks are not a second word.
    ok("ConnRate:1.1.1.11 50   \t");
}

#[test]
fn switch_value_not_yes_or_no() {
    assert_error(
        "CHECK_CONN_RATE maybe",
        1,
        17,
        "expected YES or NO after `CHECK_CONN_RATE`, found `maybe`",
    );
    assert_error(
        "CHECK_NB_RCPT 1",
        1,
        15,
        "expected YES or NO after `CHECK_NB_RCPT`, found `1`",
    );
    assert_error(
        "CHECK_MSG_RATE ON",
        1,
        16,
        "expected YES or NO after `CHECK_MSG_RATE`, found `ON`",
    );
    assert_error(
        "DryRun true",
        1,
        8,
        "expected YES or NO after `DryRun`, found `true`",
    );
}

#[test]
fn bad_ipv4_key() {
    assert_error(
        "ConnRate:1.1.1.256 5",
        1,
        10,
        "invalid IPv4 address or prefix `1.1.1.256`: expected 1 to 4 numbers 0-255 separated by dots",
    );
    assert_error(
        "ConnOpen:1.2.3.4.5 5",
        1,
        10,
        "invalid IPv4 address or prefix `1.2.3.4.5`",
    );
    assert_error(
        "ConnRate:1..1 5",
        1,
        10,
        "invalid IPv4 address or prefix `1..1`",
    );
    assert_error(
        "MaxMsgs:1.1.1. 5",
        1,
        9,
        "invalid IPv4 address or prefix `1.1.1.`",
    );
}

#[test]
fn bad_cidr_key() {
    assert_error(
        "ConnRate:10.1.2.3/16 5",
        1,
        10,
        "invalid network `10.1.2.3/16`: bits are set after the prefix (did you mean 10.1.0.0/16?)",
    );
    assert_error(
        "ConnRate:10.0.0.0/33 5",
        1,
        10,
        "invalid network `10.0.0.0/33`: expected ADDRESS/LENGTH",
    );
    assert_error(
        "ConnRate:2001:db8::1/32 5",
        1,
        10,
        "invalid network `2001:db8::1/32`: bits are set after the prefix (did you mean 2001:db8::/32?)",
    );
    assert_error(
        "ConnRate:2001:db8::/129 5",
        1,
        10,
        "invalid network `2001:db8::/129`",
    );
    assert_error(
        "NetClass:10.0.0.0/x FRIEND",
        1,
        10,
        "invalid network `10.0.0.0/x`",
    );
}

#[test]
fn bad_ipv6_key() {
    assert_error(
        "ConnRate:2001:db8::zz 5",
        1,
        10,
        "invalid IPv6 address `2001:db8::zz`",
    );
    assert_error(
        "ConnRate:1:2:3:4:5:6:7:8:9 5",
        1,
        10,
        "invalid IPv6 address `1:2:3:4:5:6:7:8:9`",
    );
    assert_error(
        "ConnRate:2001:db8:::1 5",
        1,
        10,
        "invalid IPv6 address `2001:db8:::1`",
    );
}

#[test]
fn bad_host_name_key() {
    let msg = "expected an IP address, prefix or network, a host or domain name, or a class label";
    assert_error("ConnRate:a..b 5", 1, 10, "invalid key `a..b`");
    assert_error("ConnRate:a..b 5", 1, 10, msg);
    assert_error(
        "ConnRate:web!.example.com 5",
        1,
        10,
        "invalid key `web!.example.com`",
    );
    assert_error(
        "ConnRate:.example.com 5",
        1,
        10,
        "invalid key `.example.com`",
    );
    assert_error("NetClass:bad$host FRIEND", 1, 10, "invalid key `bad$host`");
    // Sender keys have their own rules.
    assert_error(
        "MsgRateFrom:<joe@example.com> 5",
        1,
        13,
        "invalid sender key `<joe@example.com>`: angle brackets are only the null sender's \
         (`<>`); expected an address, `@domain`, a domain or `<>`",
    );
    assert_error("MaxRcptFrom:a@b@c 5", 1, 13, "invalid sender key `a@b@c`");
}

#[test]
fn bad_netclass_label() {
    assert_error(
        "NetClass:10.0.0.0/8 FR!END",
        1,
        21,
        "expected a class label (letters, digits, `_` or `-`), found `FR!END`",
    );
    assert_error("NetClass:example.com local.net", 1, 22, "found `local.net`");
}

#[test]
fn bad_window_or_bucket_value() {
    let msg = |v: &str| format!("expected a number of seconds greater than 0, found `{v}`");
    assert_error("RateWindow abc", 1, 12, &msg("abc"));
    assert_error("RateWindow 0", 1, 12, &msg("0"));
    assert_error("RateWindow -600", 1, 12, &msg("-600"));
    assert_error("RateBucket 0", 1, 12, &msg("0"));
    assert_error("RateBucket 30s", 1, 12, &msg("30s"));
    assert_error("RateBucket 10k", 1, 12, &msg("10k"));
}

#[test]
fn unusual_settings_are_bounded_and_placed() {
    assert_error(
        "UnusualFactor -1",
        1,
        15,
        "expected a number from 0 to 1000 after UnusualFactor (0: off), found `-1`",
    );
    assert_error(
        "# c\n  UnusualFloor 0\n",
        2,
        16,
        "expected a number from 1 to 1000000 after UnusualFloor, found `0`",
    );
    assert_error(
        "UnusualKeys 10000001",
        1,
        13,
        "from 1 to 10000000 after UnusualKeys",
    );
    assert_error(
        "UnusualFloor",
        1,
        13,
        "expected a value after `UnusualFloor`",
    );
    let p = ok("unusualfactor 6\nUnusualFloor 3\nUnusualKeys 50\n");
    let u = p.unusual();
    assert_eq!((u.factor, u.floor, u.keys), (6, 3, 50));
    let d = ok("").unusual();
    assert_eq!((d.factor, d.floor, d.keys), (4, 10, 200_000));
}

#[test]
fn window_not_a_multiple_of_the_bucket() {
    // The error is at the line that set the window.
    assert_error(
        "RateBucket 30\n  RateWindow 100\n",
        2,
        3,
        "RateWindow 100 is not a multiple of RateBucket 30",
    );
    // Only the bucket is set: the default window of 600 s does not divide.
    assert_error(
        "# c\nRateBucket 7\n",
        2,
        1,
        "RateWindow 600 is not a multiple of RateBucket 7",
    );
    assert_error(
        "RateWindow 6000\nRateBucket 1\n",
        1,
        1,
        "RateWindow 6000 / RateBucket 1 makes more than 1024 buckets",
    );
    // A divisible pair is read.
    let p = ok("RateWindow 1200\nRateBucket 60\n");
    assert_eq!(
        (p.window().window_secs(), p.window().bucket_secs()),
        (1200, 60)
    );
    let p = ok("# nothing\n");
    assert_eq!(
        (p.window().window_secs(), p.window().bucket_secs()),
        (600, 30)
    );
}

#[test]
fn indented_entries_count_leading_blanks() {
    assert_error("    ConnRat:1.1.1.11 50", 1, 5, "unknown check `ConnRat`");
    assert_error("  ConnRate:1.1.1.256 5", 1, 12, "invalid IPv4 address");
    assert_error("   ConnRate:1.1.1.11 abc", 1, 22, "found `abc`");
    assert_error("  ConnRate: 50", 1, 12, "expected a key after `ConnRate:`");
    assert_error("  ConnRate:1.1.1.11", 1, 20, "expected a value");
    assert_error("  FOO BAR", 1, 3, "found `FOO`");
    // Indented entries are legal.
    let p = ok("  CHECK_CONN_RATE YES\n\t ConnRate:1.1.1.11 50\n");
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), Some(50));
}

#[test]
fn tabs_separate_and_count_as_one_column() {
    let p = ok("CHECK_CONN_RATE\tYES\nConnRate:1.1.1.11\t50\nConnOpen:1.1.1.11 \t 5\t\n");
    assert!(p.is_enabled(Check::ConnRate));
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), Some(50));
    assert_eq!(p.entries(Check::ConnOpen).len(), 1);
    // A tab is one character.
    assert_error("\tConnRate:1.1.1.256\t5", 1, 11, "`1.1.1.256`");
    assert_error("ConnRate:1.1.1.11\t50\t# x", 1, 22, "found `# x`");
    assert_error("\t\tConnRate:1.1.1.11\tfifty", 1, 21, "found `fifty`");
}

#[test]
fn columns_are_characters_not_bytes() {
    // `é` is two bytes: a byte column would be 22.
    assert_error("MsgRateAuth:h\u{e9}llo 5 x", 1, 21, "found `x`");
    // An internationalized host name is a key; a bad word after it is
    // found at its character column (a byte column would be 23).
    assert_error("ConnRate:h\u{e9}llo.com 5 x", 1, 22, "found `x`");
    assert_error(
        "ConnRate:h\u{e9}llo!.com 5",
        1,
        10,
        "invalid key `h\u{e9}llo!.com`",
    );
    assert_error("\u{a0}\u{a0}FOO BAR", 1, 3, "found `FOO`");
}

#[test]
fn every_error_is_reported_one_per_line() {
    let text = "\
CHECK_CONN_RATE YES
ConnRat:1.1.1.11 50
ConnRate:1.1.1.12 60
FOO BAR
  ConnRate: 50
ConnRate:1.1.1.256 5
MaxRcpt:default abc
CHECK_NB_RCPT maybe
ConnRate:1.1.1.13 70
";
    let d = errors(text);
    let got: Vec<(&str, u32, u32)> = d.iter().map(|d| (&*d.file, d.line, d.column)).collect();
    assert_eq!(
        got,
        vec![
            (FILE, 2, 1),
            (FILE, 4, 1),
            (FILE, 5, 12),
            (FILE, 6, 10),
            (FILE, 7, 17),
            (FILE, 8, 15),
        ]
    );
    assert!(d[0].message.contains("unknown check `ConnRat`"));
    assert!(d[1].message.contains("found `FOO`"));
    assert!(d[2].message.contains("expected a key after `ConnRate:`"));
    assert!(d[3].message.contains("`1.1.1.256`"));
    assert!(d[4].message.contains("found `abc`"));
    assert!(d[5].message.contains("found `maybe`"));
    // The display form is FILE:LINE:COL: message.
    assert_eq!(
        d[2].to_string(),
        "ze-policy.txt:5:12: expected a key after `ConnRate:`"
    );
    // The error's display lists them all, one a line.
    let all = PolicyError::Invalid {
        errors: d.clone(),
        more: 0,
    }
    .to_string();
    assert_eq!(all.lines().count(), 6);
    assert!(all
        .lines()
        .nth(1)
        .unwrap()
        .starts_with("ze-policy.txt:4:1: "));
}

#[test]
fn an_error_in_the_second_file_names_the_second_file() {
    let d = refused(vec![
        file("site.txt", "CHECK_CONN_RATE YES\nConnRate:1.1.1.11 50\n"),
        file("defaults.txt", "# defaults\nConnRate:default abc\n"),
    ]);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(
        (&*d[0].file, d[0].line, d[0].column),
        ("defaults.txt", 2, 18)
    );
    assert!(d[0].message.contains("found `abc`"));

    // Errors in both: each names its own file, lines counted per file.
    let d = refused(vec![
        file("a.txt", "\n\nFOO BAR\n"),
        file("b.txt", "ConnRat:x 1\n"),
    ]);
    let got: Vec<(&str, u32, u32)> = d.iter().map(|d| (&*d.file, d.line, d.column)).collect();
    assert_eq!(got, vec![("a.txt", 3, 1), ("b.txt", 1, 1)]);
}

#[test]
fn crlf_line_endings_parse() {
    let p = ok("# comment\r\nCHECK_CONN_RATE YES\r\nConnRate:1.1.1.11 50\r\n\r\nNetClass:10.0.0.0/8 FRIEND\r\nConnRate:FRIEND 7\r\n");
    assert!(p.is_enabled(Check::ConnRate));
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), Some(50));
    assert_eq!(p.limit(Check::ConnRate, &ip("10.9.9.9")), Some(7));
    assert_eq!(p.class_of(&ip("10.9.9.9")), Some("friend"));
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
    // No line ending without a final newline, and a lone CR at the end.
    let p = ok("CHECK_CONN_RATE YES\r\nConnRate:1.1.1.11 50\r");
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), Some(50));
    // The CR is not part of the line: not in the column, not in the message.
    assert_error(
        "CHECK_CONN_RATE YES\r\nConnRate:1.1.1.11\r\n",
        2,
        18,
        "expected a value after `ConnRate:1.1.1.11`",
    );
    let d = &errors("CHECK_CONN_RATE YES\r\nConnRate:1.1.1.11 abc\r\n")[0];
    assert_eq!(
        d.message,
        "expected a limit (a whole number, optionally with k or m), found `abc`"
    );
}

#[test]
fn a_file_with_any_error_is_refused_whole() {
    let text = "\
CHECK_CONN_RATE YES
CHECK_MSG_RATE YES
ConnRate:1.1.1.11 50
ConnRate:1.1.1.11 60
MsgRate:1.1.1.11 40
MsgRate:1.1.1.12 4O
ConnRate:default 15
";
    // Only the error is reported (not the duplicate's warning), and no
    // policy comes out of it.
    let d = errors(text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!((d[0].line, d[0].column), (6, 18));
    assert!(d[0].message.contains("found `4O`"));
    // Same across files: a good first file does not survive a bad second.
    let r = Policy::parse(vec![
        file("good.txt", "CHECK_CONN_RATE YES\nConnRate:1.1.1.11 50\n"),
        file("bad.txt", "ConnRate:1.1.1.12\n"),
    ]);
    assert!(
        matches!(&r, Err(PolicyError::Invalid { errors: d, .. }) if d.len() == 1 && &*d[0].file == "bad.txt"),
        "{r:?}"
    );
}

#[test]
fn unreadable_file_is_a_read_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.txt");
    std::fs::write(&good, "CHECK_CONN_RATE YES\n").unwrap();
    let missing = dir.path().join("missing.txt");
    match Policy::from_paths(&[&good, &missing]) {
        Err(PolicyError::Read { path, .. }) => {
            assert_eq!(path, missing.display().to_string());
        }
        other => panic!("expected a read error, got {other:?}"),
    }
    // Paths are read in order and named as given.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "ConnRate:1.1.1.11\n").unwrap();
    let d = match Policy::from_paths(&[&good, &bad]) {
        Err(PolicyError::Invalid { errors, .. }) => errors,
        other => panic!("expected Invalid, got {other:?}"),
    };
    assert_eq!(&*d[0].file, bad.display().to_string());
    assert_eq!((d[0].line, d[0].column), (1, 18));
}

// ---------------------------------------------------------------- non-errors

#[test]
fn comments_and_blank_lines_are_ignored() {
    let p = ok("\
# a comment
   # an indented comment
\t# after a tab
#ConnRate:1.1.1.11 50 with words after

   \t
##
CHECK_CONN_RATE YES
");
    assert!(p.is_enabled(Check::ConnRate));
    let total: usize = Check::ALL.iter().map(|c| p.entries(*c).len()).sum();
    assert_eq!(total, 0);
    assert!(p.warnings().is_empty());
    // An empty file is a valid, empty policy with every switch off.
    let p = ok("");
    for s in Switch::ALL {
        assert!(!p.switch(s), "{s:?}");
    }
}

#[test]
fn names_keys_and_switches_are_case_insensitive() {
    let p = ok("\
check_conn_rate yes
Check_Open_Connections Yes
CHECK_NB_RCPT no
CONNRATE:Web1.Example.COM 7
connrate:DEFAULT 9
netclass:10.0.0.0/8 Friend
ConnRate:FRIEND 11
CONNOPEN:2001:DB8::1 3
ratewindow 1200
RATEBUCKET 60
");
    assert!(p.is_enabled(Check::ConnRate));
    assert!(p.is_enabled(Check::ConnOpen));
    assert!(!p.is_enabled(Check::MaxRcpt));
    let host = |h: &str| ip("2.2.2.2").with_host(h);
    assert_eq!(p.limit(Check::ConnRate, &host("web1.example.com")), Some(7));
    assert_eq!(
        p.limit(Check::ConnRate, &host("WEB1.EXAMPLE.COM.")),
        Some(7)
    );
    assert_eq!(
        p.limit(Check::ConnRate, &host("www.web1.example.com")),
        Some(7)
    );
    assert_eq!(p.limit(Check::ConnRate, &host("example.com")), Some(9));
    assert_eq!(p.limit(Check::ConnRate, &ip("10.1.2.3")), Some(11));
    assert_eq!(p.class_of(&ip("10.1.2.3")), Some("friend"));
    assert_eq!(p.limit(Check::ConnOpen, &ip("2001:db8::1")), Some(3));
    assert_eq!(
        (p.window().window_secs(), p.window().bucket_secs()),
        (1200, 60)
    );
    // `*`, `default` and `DEFAULT` are the same key.
    for spelling in ["*", "default", "Default"] {
        let p = ok(&format!("CHECK_MSG_RATE YES\nMsgRate:{spelling} 33\n"));
        assert_eq!(p.limit(Check::MsgRate, &ip("9.9.9.9")), Some(33));
    }
    // Senders and AUTH users too.
    let p = ok("CHECK_MSG_RATE YES\nMsgRateFrom:@Example.COM 5\nMsgRateAuth:JOE 6\n");
    let c = ip("9.9.9.9")
        .with_sender("<Joe@EXAMPLE.com>")
        .with_auth("Joe");
    assert_eq!(p.limit(Check::MsgRateFrom, &c), Some(5));
    assert_eq!(p.limit(Check::MsgRateAuth, &c), Some(6));
}

#[test]
fn limits_take_k_and_m_suffixes() {
    let p = ok("\
CHECK_CONN_RATE YES
CHECK_MSG_RATE YES
CHECK_RCPT_RATE YES
CHECK_NB_RCPT YES
ConnRate:1.1.1.1 2k
ConnRate:1.1.1.2 4K
MsgRate:1.1.1.1 3M
MsgRate:1.1.1.2 1m
RcptRate:1.1.1.1 +7
MaxRcpt:1.1.1.1 0
MaxRcpt:1.1.1.2 -1
MaxRcpt:default 100
");
    let l = |c, a| p.limit(c, &ip(a));
    assert_eq!(l(Check::ConnRate, "1.1.1.1"), Some(2_000));
    assert_eq!(l(Check::ConnRate, "1.1.1.2"), Some(4_000));
    assert_eq!(l(Check::MsgRate, "1.1.1.1"), Some(3_000_000));
    assert_eq!(l(Check::MsgRate, "1.1.1.2"), Some(1_000_000));
    assert_eq!(l(Check::RcptRate, "1.1.1.1"), Some(7));
    // 0 and negative are no limit, and do not fall through to the default.
    assert_eq!(l(Check::MaxRcpt, "1.1.1.1"), None);
    assert_eq!(l(Check::MaxRcpt, "1.1.1.2"), None);
    assert_eq!(l(Check::MaxRcpt, "1.1.1.3"), Some(100));
}

#[test]
fn a_duplicate_warns_naming_the_first_and_the_first_wins() {
    let p = ok("\
CHECK_CONN_RATE YES
ConnRate:1.1.1.11 50
ConnRate:1.1.1.11 60
");
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), Some(50));
    assert_eq!(p.entries(Check::ConnRate).len(), 1);
    let w = p.warnings();
    assert_eq!(w.len(), 1, "{w:#?}");
    assert_eq!((&*w[0].file, w[0].line, w[0].column), (FILE, 3, 1));
    assert_eq!(
        w[0].message,
        "duplicate entry `ConnRate:1.1.1.11`: the first one (ze-policy.txt:2) wins"
    );
    match p.resolve(Check::ConnRate, &ip("1.1.1.11")).matched {
        Matched::Entry(o) => assert_eq!(o.line, 2),
        m => panic!("{m:?}"),
    }

    // Different spellings of one key are duplicates too.
    let p = ok("\
CHECK_CONN_RATE YES
ConnRate:1.1.1 5
  ConnRate:1.1.1.0/24 6
ConnRate:default 15
ConnRate:* 16
ConnRate:Web.Example.com 7
ConnRate:web.example.COM 8
");
    let w: Vec<(u32, u32, &str)> = p
        .warnings()
        .iter()
        .map(|w| (w.line, w.column, w.message.as_str()))
        .collect();
    assert_eq!(
        w,
        vec![
            (
                3,
                3,
                "duplicate entry `ConnRate:1.1.1.0/24`: the first one (ze-policy.txt:2) wins"
            ),
            (
                5,
                1,
                "duplicate entry `ConnRate:*`: the first one (ze-policy.txt:4) wins"
            ),
            (
                7,
                1,
                "duplicate entry `ConnRate:web.example.COM`: the first one (ze-policy.txt:6) wins"
            ),
        ]
    );
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.99")), Some(5));
    assert_eq!(p.limit(Check::ConnRate, &ip("9.9.9.9")), Some(15));
    let web = ip("9.9.9.9").with_host("web.example.com");
    assert_eq!(p.limit(Check::ConnRate, &web), Some(7));

    // A repeated setting: the first one wins, with a warning.
    let p = ok("CHECK_CONN_RATE NO\nCHECK_CONN_RATE YES\n");
    assert!(!p.is_enabled(Check::ConnRate));
    assert_eq!(p.warnings().len(), 1);
    assert_eq!((p.warnings()[0].line, p.warnings()[0].column), (2, 1));
    assert_eq!(
        p.warnings()[0].message,
        "`CHECK_CONN_RATE` is set again: the first one (ze-policy.txt:1) wins"
    );
    // The same key in two checks is no duplicate.
    let p = ok("CHECK_CONN_RATE YES\nCHECK_OPEN_CONNECTIONS YES\nConnRate:1.1.1.11 50\nConnOpen:1.1.1.11 5\n");
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
}

#[test]
fn entries_of_a_switched_off_check_warn() {
    // Absent switch.
    let p = ok("# c\nConnRate:1.1.1.11 50\nConnRate:default 15\n");
    let w = p.warnings();
    assert_eq!(w.len(), 1, "{w:#?}");
    assert_eq!((&*w[0].file, w[0].line, w[0].column), (FILE, 2, 1));
    assert_eq!(
        w[0].message,
        "ConnRate entries present but CHECK_CONN_RATE is off: they are ignored"
    );
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), None);
    let r = p.resolve(Check::ConnRate, &ip("1.1.1.11"));
    assert!(!r.enabled);
    assert_eq!(r.limit, None);

    // Switch said NO; the per-sender check shares CHECK_MSG_RATE.
    let p = ok("\
CHECK_MSG_RATE NO
CHECK_CONN_RATE YES
ConnRate:1.1.1.11 50
MsgRateFrom:@example.com 10
");
    let w: Vec<(u32, &str)> = p
        .warnings()
        .iter()
        .map(|w| (w.line, w.message.as_str()))
        .collect();
    assert_eq!(
        w,
        vec![(
            4,
            "MsgRateFrom entries present but CHECK_MSG_RATE is off: they are ignored"
        )]
    );
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), Some(50));
}

#[test]
fn the_first_duplicate_across_two_files_wins() {
    let p = Policy::parse(vec![
        file("site.txt", "CHECK_CONN_RATE YES\nConnRate:1.1.1.11 50\n"),
        file(
            "defaults.txt",
            "CHECK_CONN_RATE NO\n# defaults\nConnRate:1.1.1.11 15\nConnRate:default 10\n",
        ),
    ])
    .expect("valid");
    assert!(p.is_enabled(Check::ConnRate));
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), Some(50));
    assert_eq!(p.limit(Check::ConnRate, &ip("2.2.2.2")), Some(10));
    match p.resolve(Check::ConnRate, &ip("1.1.1.11")).matched {
        Matched::Entry(o) => assert_eq!((&*o.file, o.line), ("site.txt", 2)),
        m => panic!("{m:?}"),
    }
    let w: Vec<String> = p.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        vec![
            "defaults.txt:1:1: `CHECK_CONN_RATE` is set again: the first one (site.txt:1) wins",
            "defaults.txt:3:1: duplicate entry `ConnRate:1.1.1.11`: the first one (site.txt:2) wins",
        ]
    );
}

// ---------------------------------------------------------------- bugs

/// The space after the colon makes `ConnRate:` the first word and the key
/// the value, so the limit is a "second word": the reader then says to put
/// comments on a line of their own and points at the limit (column 20),
/// not at the missing key (column 10).
#[test]
fn a_space_after_the_colon_is_reported_as_a_missing_key() {
    assert_error(
        "ConnRate: 1.1.1.11 50",
        1,
        10,
        "expected a key after `ConnRate:`",
    );
}

/// The window error is found after every line has been read and appended
/// last, so diagnostics are not in file order.
#[test]
fn diagnostics_are_in_file_order() {
    let d = errors("RateWindow 100\nConnRat:1.1.1.11 50\n");
    let got: Vec<(u32, u32)> = d.iter().map(|d| (d.line, d.column)).collect();
    assert_eq!(got, vec![(1, 1), (2, 1)]);
}

/// An exact IPv4-mapped address key is taken as IPv4 (as clients are), but
/// a mapped network is kept as IPv6: it is accepted and can never match.
#[test]
fn an_ipv4_mapped_network_key_matches_ipv4_clients() {
    let p = ok("CHECK_CONN_RATE YES\nConnRate:::ffff:1.1.1.0/120 7\n");
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), Some(7));
}
