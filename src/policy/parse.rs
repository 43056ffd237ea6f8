//! The `ze-policy.txt` reader. One entry a line, `Check:Key Value`; switches
//! `CHECK_* YES|NO`; `NetClass:Key LABEL`; `RateWindow`, `RateBucket`,
//! `IPv6Prefix` and `DryRun`. Every error names file, line and column; one error refuses the
//! whole policy.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};

use super::names;
use super::table::{Entry, Key, Origin, Table};
use super::{Diagnostic, Policy, PolicyError, PolicyFile};
use crate::bounds::{cut, text, MAX_DIAGNOSTICS, MAX_FIELD_BYTES};
use crate::check::{Check, KeyKind, Switch};
use crate::window::WindowConfig;

/// A setting given once for the whole policy, with where it was set.
struct Setting<T> {
    value: T,
    at: (Arc<str>, u32, u32),
}

#[derive(Default)]
struct Builder {
    switches: [Option<Setting<bool>>; Switch::ALL.len()],
    tables: [Table<Option<u64>>; Check::ALL.len()],
    netclass: Table<Box<str>>,
    window_secs: Option<Setting<u32>>,
    bucket_secs: Option<Setting<u32>>,
    dry_run: Option<Setting<bool>>,
    ipv6_prefix: Option<Setting<u8>>,
    unusual_factor: Option<Setting<u32>>,
    unusual_floor: Option<Setting<u32>>,
    unusual_keys: Option<Setting<u32>>,
    errors: Kept,
    warnings: Kept,
}

/// Diagnostics of one kind: the first [`MAX_DIAGNOSTICS`] in file and line
/// order, and how many more there were. Lines are read in order, so those
/// of a line are pushed in order; those found at the end are inserted.
#[derive(Default)]
struct Kept {
    list: Vec<Diagnostic>,
    more: usize,
}

impl Kept {
    fn push(&mut self, d: Diagnostic) {
        if self.list.len() < MAX_DIAGNOSTICS {
            self.list.push(d);
        } else {
            self.more += 1;
        }
    }

    /// Adds a diagnostic of any place, keeping the first ones by `order`.
    fn insert<K: Ord>(&mut self, d: Diagnostic, order: impl Fn(&Diagnostic) -> K) {
        self.list.push(d);
        self.list.sort_by_key(order);
        if self.list.len() > MAX_DIAGNOSTICS {
            self.list.truncate(MAX_DIAGNOSTICS);
            self.more += 1;
        }
    }
}

/// The place of a token in the current line.
#[derive(Clone)]
struct Place<'a> {
    file: &'a Arc<str>,
    line_no: u32,
    line: &'a str,
}

impl Place<'_> {
    /// The 1-based column, in characters, of byte offset `at`.
    fn column(&self, at: usize) -> u32 {
        self.line[..at].chars().count() as u32 + 1
    }

    /// A diagnostic at byte offset `at` of the line.
    fn diag(&self, at: usize, message: String) -> Diagnostic {
        Diagnostic {
            file: self.file.clone(),
            line: self.line_no,
            column: self.column(at),
            message,
        }
    }

    fn origin(&self, key: &str) -> Origin {
        Origin {
            file: self.file.clone(),
            line: self.line_no,
            key: key.into(),
        }
    }
}

pub(super) fn parse(files: Vec<PolicyFile>) -> Result<Policy, PolicyError> {
    let mut b = Builder::default();
    for file in &files {
        let name: Arc<str> = file.name.as_str().into();
        let text = file.text.strip_prefix('\u{feff}').unwrap_or(&file.text);
        for (i, raw) in text.lines().enumerate() {
            let place = Place {
                file: &name,
                line_no: i as u32 + 1,
                line: raw.strip_suffix('\r').unwrap_or(raw),
            };
            b.line(&place);
        }
    }
    b.finish(files)
}

/// The first whitespace-separated token at or after `from`, as
/// (start, end) byte offsets; `None` at the end of the line.
fn token(line: &str, from: usize) -> Option<(usize, usize)> {
    let rest = &line[from..];
    let start = from + rest.len() - rest.trim_start().len();
    if start == line.len() {
        return None;
    }
    let end = line[start..]
        .find(char::is_whitespace)
        .map_or(line.len(), |n| start + n);
    Some((start, end))
}

impl Builder {
    fn line(&mut self, p: &Place) {
        let Some((start, end)) = token(p.line, 0) else {
            return;
        };
        let head = &p.line[start..end];
        if head.starts_with('#') {
            return;
        }
        let value = token(p.line, end);
        let result = match head.split_once(':') {
            Some((name, key)) => self.entry(p, start, name, key, value),
            None => self.directive(p, start, head, value),
        };
        if let Err(d) = result {
            self.errors.push(d);
            return;
        }
        // The value is the rest of the line; every kind of value here is one
        // word, so a second word is an error (no trailing comments).
        let extra = value.and_then(|(_, vend)| token(p.line, vend));
        if let Some((extra, _)) = extra {
            let found = p.line[extra..].trim_end();
            self.errors.push(p.diag(
                extra,
                format!(
                    "expected the end of the line after the value, found {} \
                     (comments go on a line of their own)",
                    cut(found)
                ),
            ));
        }
    }

    /// `Check:Key Value` or `NetClass:Key LABEL`.
    fn entry(
        &mut self,
        p: &Place,
        start: usize,
        name: &str,
        key: &str,
        value: Option<(usize, usize)>,
    ) -> Result<(), Diagnostic> {
        let key_at = start + name.len() + 1;
        let head = &p.line[start..key_at + key.len()];
        let is_netclass = name.eq_ignore_ascii_case("NetClass");
        let check = if is_netclass {
            None
        } else {
            Some(name.parse::<Check>().map_err(|_| {
                let names: Vec<_> = Check::ALL.iter().map(|c| c.name()).collect();
                p.diag(
                    start,
                    format!(
                        "unknown check {}; expected one of {}, NetClass",
                        cut(name),
                        names.join(", ")
                    ),
                )
            })?)
        };
        if key.is_empty() {
            return Err(p.diag(key_at, format!("expected a key after {}", cut(head))));
        }
        let kind = check.map_or(KeyKind::Client, Check::key_kind);
        let norm = parse_key(kind, key).map_err(|msg| p.diag(key_at, msg))?;
        if is_netclass && norm == Key::Default {
            return Err(p.diag(
                key_at,
                "NetClass takes an address, network or domain, not `default`".to_string(),
            ));
        }
        let Some((vstart, vend)) = value else {
            return Err(p.diag(
                p.line.len(),
                format!("expected a value after {}", cut(head)),
            ));
        };
        let text = &p.line[vstart..vend];
        let origin = p.origin(key);
        let duplicate = match check {
            Some(check) => {
                let limit = parse_limit(text).map_err(|msg| p.diag(vstart, msg))?;
                let table = &mut self.tables[check.index()];
                table
                    .insert(
                        norm,
                        Entry {
                            value: limit,
                            origin,
                        },
                    )
                    .err()
                    .map(|first| (check.name(), first.origin.clone()))
            }
            None => {
                let label = parse_label(text).map_err(|msg| p.diag(vstart, msg))?;
                self.netclass
                    .insert(
                        norm,
                        Entry {
                            value: label,
                            origin,
                        },
                    )
                    .err()
                    .map(|first| ("NetClass", first.origin.clone()))
            }
        };
        if let Some((what, first)) = duplicate {
            self.warnings.push(p.diag(
                start,
                format!(
                    "duplicate entry {}: the first one ({}:{}) wins",
                    cut(&format!("{what}:{key}")),
                    first.file,
                    first.line
                ),
            ));
        }
        Ok(())
    }

    /// `CHECK_* YES|NO`, `RateWindow N`, `RateBucket N`, `DryRun YES|NO`,
    /// `IPv6Prefix N`.
    fn directive(
        &mut self,
        p: &Place,
        start: usize,
        word: &str,
        value: Option<(usize, usize)>,
    ) -> Result<(), Diagnostic> {
        enum Kind {
            Switch(Switch),
            Window,
            Bucket,
            DryRun,
            Ipv6Prefix,
            Unusual(crate::baseline::Setting),
        }
        let kind = if let Some(s) = Switch::from_name(word) {
            Kind::Switch(s)
        } else if word.eq_ignore_ascii_case("RateWindow") {
            Kind::Window
        } else if word.eq_ignore_ascii_case("RateBucket") {
            Kind::Bucket
        } else if word.eq_ignore_ascii_case("DryRun") {
            Kind::DryRun
        } else if word.eq_ignore_ascii_case("IPv6Prefix") {
            Kind::Ipv6Prefix
        } else if let Some(u) = crate::baseline::Setting::from_name(word) {
            Kind::Unusual(u)
        } else {
            return Err(p.diag(
                start,
                format!(
                    "expected `Check:Key Value` or a setting such as CHECK_CONN_RATE YES, \
                     found {}",
                    cut(word)
                ),
            ));
        };
        let Some((vstart, vend)) = value else {
            return Err(p.diag(
                p.line.len(),
                format!("expected a value after {}", cut(word)),
            ));
        };
        let text = &p.line[vstart..vend];
        let at = (p.file.clone(), p.line_no, p.column(start));
        let slot_and_value = match kind {
            Kind::Switch(s) => {
                let v = parse_yes_no(word, text).map_err(|m| p.diag(vstart, m))?;
                set(&mut self.switches[s as usize], v, at)
            }
            Kind::DryRun => {
                let v = parse_yes_no(word, text).map_err(|m| p.diag(vstart, m))?;
                set(&mut self.dry_run, v, at)
            }
            Kind::Ipv6Prefix => {
                let bits = parse_prefix(text).map_err(|m| p.diag(vstart, m))?;
                set(&mut self.ipv6_prefix, bits, at)
            }
            Kind::Unusual(u) => {
                let n = u.parse(text).map_err(|m| p.diag(vstart, m))?;
                let slot = match u {
                    crate::baseline::Setting::Factor => &mut self.unusual_factor,
                    crate::baseline::Setting::Floor => &mut self.unusual_floor,
                    crate::baseline::Setting::Keys => &mut self.unusual_keys,
                };
                set(slot, n, at)
            }
            Kind::Window | Kind::Bucket => {
                let secs = parse_seconds(text).map_err(|m| p.diag(vstart, m))?;
                let slot = match kind {
                    Kind::Window => &mut self.window_secs,
                    _ => &mut self.bucket_secs,
                };
                set(slot, secs, at)
            }
        };
        if let Some((file, line)) = slot_and_value {
            self.warnings.push(p.diag(
                start,
                format!("`{word}` is set again: the first one ({file}:{line}) wins"),
            ));
        }
        Ok(())
    }

    fn finish(mut self, files: Vec<PolicyFile>) -> Result<Policy, PolicyError> {
        let window = self.window_config(&files);
        let switches = self
            .switches
            .each_ref()
            .map(|s| s.as_ref().is_some_and(|s| s.value));
        for check in Check::ALL {
            let table = &self.tables[check.index()];
            if let (false, Some(first)) = (switches[check.switch() as usize], table.first_origin())
            {
                let order = order(&files);
                self.warnings.insert(
                    Diagnostic {
                        file: first.file.clone(),
                        line: first.line,
                        column: 1,
                        message: format!(
                            "{check} entries present but {} is off: they are ignored",
                            check.switch().name()
                        ),
                    },
                    order,
                );
            }
        }
        if !self.errors.list.is_empty() {
            return Err(PolicyError::Invalid {
                errors: self.errors.list,
                more: self.errors.more,
            });
        }
        Ok(Policy {
            switches,
            tables: self.tables,
            netclass: self.netclass,
            window,
            dry_run: self.dry_run.is_some_and(|s| s.value),
            files,
            warnings: self.warnings.list,
            more_warnings: self.warnings.more,
            divisor: 1,
            ipv6_prefix: self
                .ipv6_prefix
                .map_or(super::DEFAULT_IPV6_PREFIX, |s| s.value),
            unusual: crate::baseline::UnusualConfig::new(
                self.unusual_factor.as_ref().map(|s| s.value),
                self.unusual_floor.as_ref().map(|s| s.value),
                self.unusual_keys.as_ref().map(|s| s.value),
            ),
        })
    }

    /// The window from `RateWindow`/`RateBucket`; an impossible pair is an
    /// error at the line that set the window (or the bucket).
    fn window_config(&mut self, files: &[PolicyFile]) -> WindowConfig {
        let d = WindowConfig::DEFAULT;
        let window = self
            .window_secs
            .as_ref()
            .map_or(d.window_secs(), |s| s.value);
        let bucket = self
            .bucket_secs
            .as_ref()
            .map_or(d.bucket_secs(), |s| s.value);
        match WindowConfig::new(window, bucket) {
            Ok(config) => config,
            Err(e) => {
                let at = self
                    .window_secs
                    .as_ref()
                    .or(self.bucket_secs.as_ref())
                    .map(|s| s.at.clone());
                if let Some((file, line, column)) = at {
                    let error = Diagnostic {
                        file,
                        line,
                        column,
                        message: e.to_string(),
                    };
                    self.errors.insert(error, order(files));
                }
                d
            }
        }
    }
}

/// Diagnostics in the order of the files and their lines, as a reader
/// expects.
fn order(files: &[PolicyFile]) -> impl Fn(&Diagnostic) -> (Option<usize>, u32, u32) + '_ {
    |d: &Diagnostic| {
        let file = files.iter().position(|f| *f.name == *d.file);
        (file, d.line, d.column)
    }
}

/// Keeps the first setting; returns where the first was when this is a repeat.
fn set<T>(
    slot: &mut Option<Setting<T>>,
    value: T,
    at: (Arc<str>, u32, u32),
) -> Option<(Arc<str>, u32)> {
    match slot {
        Some(first) => Some((first.at.0.clone(), first.at.1)),
        None => {
            *slot = Some(Setting { value, at });
            None
        }
    }
}

fn parse_yes_no(word: &str, text: &str) -> Result<bool, String> {
    if text.eq_ignore_ascii_case("yes") {
        Ok(true)
    } else if text.eq_ignore_ascii_case("no") {
        Ok(false)
    } else {
        Err(format!(
            "expected YES or NO after {}, found {}",
            cut(word),
            cut(text)
        ))
    }
}

fn parse_seconds(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "expected a number of seconds greater than 0, found {}",
            cut(text)
        )),
    }
}

/// `IPv6Prefix`: a prefix length of 1 to 128 bits.
fn parse_prefix(text: &str) -> Result<u8, String> {
    match text.parse::<u8>() {
        Ok(n @ 1..=128) => Ok(n),
        _ => Err(format!(
            "expected an IPv6 prefix length from 1 to 128 (64: a /64 counts as one \
             client, 128: each address), found {}",
            cut(text)
        )),
    }
}

/// A limit: a decimal integer, optionally with `k` (x1000) or `m`
/// (x1000000). 0 or negative is no limit (`None`).
pub(crate) fn parse_limit(text: &str) -> Result<Option<u64>, String> {
    let bad = || {
        format!(
            "expected a limit (a whole number, optionally with k or m), found {}",
            cut(text)
        )
    };
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (digits, factor) = match unsigned.as_bytes().last() {
        Some(b'k' | b'K') => (&unsigned[..unsigned.len() - 1], 1_000),
        Some(b'm' | b'M') => (&unsigned[..unsigned.len() - 1], 1_000_000),
        _ => (unsigned, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let too_large = || format!("limit {} is too large (at most {})", cut(text), u32::MAX);
    let n = digits
        .parse::<u64>()
        .map_err(|_| too_large())?
        .checked_mul(factor)
        .filter(|n| *n <= u64::from(u32::MAX))
        .ok_or_else(too_large)?;
    Ok((!negative && n > 0).then_some(n))
}

/// A class label: letters, digits, `_` and `-`; kept in lower case.
fn parse_label(text: &str) -> Result<Box<str>, String> {
    if text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Ok(text.to_ascii_lowercase().into())
    } else {
        Err(format!(
            "expected a class label (letters, digits, `_` or `-`), found {}",
            cut(text)
        ))
    }
}

fn is_default(key: &str) -> bool {
    key == "*" || key.eq_ignore_ascii_case("default")
}

/// Normalises a key for a check keyed by `kind`: the form of
/// [`names`] that envelope values are also brought to.
pub(crate) fn parse_key(kind: KeyKind, key: &str) -> Result<Key, String> {
    if is_default(key) {
        return Ok(Key::Default);
    }
    if let Some(c) = names::bad_char(key) {
        return Err(format!(
            "invalid key {}: it holds the control character U+{:04X}",
            cut(key),
            u32::from(c)
        ));
    }
    text("key", key, MAX_FIELD_BYTES).map_err(|e| e.to_string())?;
    match kind {
        KeyKind::Client => parse_client_key(key),
        KeyKind::Sender => parse_sender_key(key),
        KeyKind::AuthUser => Ok(Key::Name(key.to_ascii_lowercase().into())),
    }
}

/// `user@domain`, `@domain`, `domain`, or `<>` for the null sender.
fn parse_sender_key(key: &str) -> Result<Key, String> {
    if key == names::NULL_SENDER {
        return Ok(Key::Name(key.into()));
    }
    let bad = |why: &str| {
        format!(
            "invalid sender key {}: {why}; expected an address, `@domain`, a domain or `<>`",
            cut(key)
        )
    };
    if key.contains(['<', '>']) {
        return Err(bad("angle brackets are only the null sender's (`<>`)"));
    }
    let (local, dom) = match key.split_once('@') {
        Some((local, dom)) => (Some(local), dom),
        None => (None, key),
    };
    if dom.contains('@') {
        return Err(bad("more than one `@`"));
    }
    if dom.is_empty() {
        return Err(bad("no domain after `@`"));
    }
    let dom = names::domain(dom).ok_or_else(|| bad("not a valid domain name"))?;
    Ok(Key::Name(match local {
        Some(local) => format!("{}@{dom}", local.to_ascii_lowercase()).into(),
        None => dom.into(),
    }))
}

/// An address, a ze-filter octet prefix (`1.1.1`), a CIDR network, a host
/// or domain name, or a class label.
fn parse_client_key(key: &str) -> Result<Key, String> {
    // sendmail's form of an IPv6 address (`IPv6:2001:db8::1`, also of a
    // network) is the address.
    let key = match key.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") && key[5..].contains(':') => &key[5..],
        _ => key,
    };
    if key.contains('/') {
        let net: IpNet = key
            .parse()
            .map_err(|_| format!("invalid network {}: expected ADDRESS/LENGTH", cut(key)))?;
        if net.trunc() != net {
            return Err(format!(
                "invalid network {}: bits are set after the prefix (did you mean {}?)",
                cut(key),
                net.trunc()
            ));
        }
        return Ok(Key::Net(ipv4_mapped_net(net)));
    }
    if key.contains(':') {
        return key
            .parse::<IpAddr>()
            .map(|ip| Key::Net(IpNet::from(super::canonical_ip(ip))))
            .map_err(|_| format!("invalid IPv6 address {}", cut(key)));
    }
    if key.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return octet_prefix(key)
            .map(|net| Key::Net(IpNet::V4(net)))
            .ok_or_else(|| {
                format!(
                    "invalid IPv4 address or prefix {}: expected 1 to 4 numbers 0-255 \
                     separated by dots",
                    cut(key)
                )
            });
    }
    let name = names::domain(key);
    let name_ok = name.as_deref().is_some_and(|n| {
        n.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    });
    if let (true, Some(name)) = (name_ok, name) {
        Ok(Key::Name(name.into()))
    } else {
        Err(format!(
            "invalid key {}: expected an IP address, prefix or network, a host or domain \
             name, or a class label",
            cut(key)
        ))
    }
}

/// An IPv4-mapped IPv6 network (`::ffff:1.1.1.0/120`) is the IPv4 network,
/// since mapped client addresses are looked up as IPv4.
fn ipv4_mapped_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, v6.prefix_len() - 96).expect("length <= 32")),
            None => net,
        },
        _ => net,
    }
}

/// `1.1.1.11` is a /32, `1.1.1` a /24, `1.1` a /16, `1` a /8.
fn octet_prefix(key: &str) -> Option<Ipv4Net> {
    let mut octets = [0u8; 4];
    let mut n = 0;
    for part in key.split('.') {
        if n == 4 || part.is_empty() || part.len() > 3 {
            return None;
        }
        octets[n] = part.parse().ok()?;
        n += 1;
    }
    Ipv4Net::new(Ipv4Addr::from(octets), (n * 8) as u8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_take_suffixes_and_zero_or_negative_is_no_limit() {
        assert_eq!(parse_limit("50"), Ok(Some(50)));
        assert_eq!(parse_limit("2k"), Ok(Some(2_000)));
        assert_eq!(parse_limit("1M"), Ok(Some(1_000_000)));
        assert_eq!(parse_limit("0"), Ok(None));
        assert_eq!(parse_limit("-1"), Ok(None));
        assert!(parse_limit("k").is_err());
        assert!(parse_limit("5x").is_err());
        assert!(parse_limit("9999999m").is_err());
    }

    #[test]
    fn client_keys_normalise() {
        let k = |s| parse_key(KeyKind::Client, s);
        assert_eq!(k("1.1.1"), Ok(Key::Net("1.1.1.0/24".parse().unwrap())));
        assert_eq!(k("1.1.1.0/24"), k("1.1.1"));
        assert_eq!(k("1"), Ok(Key::Net("1.0.0.0/8".parse().unwrap())));
        assert_eq!(
            k("2001:DB8::1"),
            Ok(Key::Net("2001:db8::1/128".parse().unwrap()))
        );
        assert_eq!(
            k("::ffff:1.2.3.4"),
            Ok(Key::Net("1.2.3.4/32".parse().unwrap()))
        );
        assert_eq!(
            k("Web1.Example.COM"),
            Ok(Key::Name("web1.example.com".into()))
        );
        assert_eq!(k("*"), Ok(Key::Default));
        assert!(k("1.1.1.256").is_err());
        assert!(k("1.1.1.1.1").is_err());
        assert!(k("10.1.2.3/16").is_err());
        assert!(k("a..b").is_err());
        // sendmail's form.
        assert_eq!(k("IPv6:2001:DB8::1"), k("2001:db8::1"));
        assert_eq!(k("ipv6:2001:db8:0:0:0:0:0:0/32"), k("2001:db8::/32"));
        assert!(k("IPv6:").is_err());
    }
}
