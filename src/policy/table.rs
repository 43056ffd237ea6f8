//! The entries of one check (or of `NetClass`), indexed so that finding the
//! entry for a client costs a few hash probes whatever the policy's size:
//! one per prefix length present for the address, one per label of the host
//! name, one for the class label, one for the default. hashbrown's default
//! hasher (randomly seeded foldhash) measured about 40% faster here than
//! std's SipHash (see BENCHMARKS.md).

use hashbrown::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// Where an entry was written: for `policy explain` and for warnings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<str>,
    pub line: u32,
    /// The key as the administrator wrote it, e.g. `1.1.1.11`.
    pub key: Box<str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<V> {
    pub value: V,
    pub origin: Origin,
}

/// A key once normalised: what two entries must share to be duplicates.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// An address or network; an exact address is a /32 or /128.
    Net(IpNet),
    /// A host or domain name, a class label, a sender (`user@dom`, `@dom`,
    /// `dom`) or an AUTH user; always lower case.
    Name(Box<str>),
    /// `default`, `DEFAULT` or `*`.
    Default,
}

/// Exact-match maps by prefix length, probed longest first.
#[derive(Clone, Debug)]
struct PrefixMap<V> {
    /// Prefix lengths that have at least one entry, longest first.
    lengths: Vec<u8>,
    entries: HashMap<(u128, u8), Entry<V>>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap {
            lengths: Vec::new(),
            entries: HashMap::new(),
        }
    }
}

fn mask(bits: u128, len: u8, width: u8) -> u128 {
    if len == 0 {
        0
    } else {
        let shift = width - len;
        (bits >> shift) << shift
    }
}

impl<V> PrefixMap<V> {
    fn insert(&mut self, bits: u128, len: u8, entry: Entry<V>) -> Result<(), &Entry<V>> {
        use hashbrown::hash_map::Entry as Slot;
        match self.entries.entry((bits, len)) {
            Slot::Occupied(slot) => Err(slot.into_mut()),
            Slot::Vacant(slot) => {
                slot.insert(entry);
                if let Err(at) = self.lengths.binary_search_by(|l| len.cmp(l)) {
                    self.lengths.insert(at, len);
                }
                Ok(())
            }
        }
    }

    fn longest_match(&self, bits: u128, width: u8) -> Option<&Entry<V>> {
        self.lengths
            .iter()
            .find_map(|&len| self.entries.get(&(mask(bits, len, width), len)))
    }
}

/// The entries of one check.
#[derive(Clone, Debug)]
pub struct Table<V> {
    v4: PrefixMap<V>,
    v6: PrefixMap<V>,
    names: HashMap<Box<str>, Entry<V>>,
    default: Option<Entry<V>>,
    len: usize,
    /// The first entry, to point a warning at.
    first: Option<Origin>,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Table {
            v4: PrefixMap::default(),
            v6: PrefixMap::default(),
            names: HashMap::new(),
            default: None,
            len: 0,
            first: None,
        }
    }
}

impl<V> Table<V> {
    /// Adds an entry; a duplicate key is refused with the entry that keeps
    /// its place (the first one wins).
    pub fn insert(&mut self, key: Key, entry: Entry<V>) -> Result<(), &Entry<V>> {
        let origin = entry.origin.clone();
        match key {
            Key::Net(IpNet::V4(net)) => {
                self.v4
                    .insert(u32::from(net.network()).into(), net.prefix_len(), entry)?
            }
            Key::Net(IpNet::V6(net)) => {
                self.v6
                    .insert(u128::from(net.network()), net.prefix_len(), entry)?
            }
            Key::Name(name) => {
                use hashbrown::hash_map::Entry as Slot;
                match self.names.entry(name) {
                    Slot::Occupied(slot) => return Err(slot.into_mut()),
                    Slot::Vacant(slot) => {
                        slot.insert(entry);
                    }
                }
            }
            Key::Default => match self.default {
                Some(ref first) => return Err(first),
                None => self.default = Some(entry),
            },
        }
        self.len += 1;
        self.first.get_or_insert(origin);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn first_origin(&self) -> Option<&Origin> {
        self.first.as_ref()
    }

    /// The most specific entry for an address: exact address, then shorter
    /// prefixes.
    pub fn by_address(&self, ip: IpAddr) -> Option<&Entry<V>> {
        match ip {
            IpAddr::V4(v4) => self.v4.longest_match(u32::from(v4).into(), 32),
            IpAddr::V6(v6) => self.v6.longest_match(u128::from(v6), 128),
        }
    }

    /// The entry for a name, then for each parent domain
    /// (`web1.ex.com`, `ex.com`, `com`). `name` must be lower case.
    pub fn by_domain(&self, name: &str) -> Option<&Entry<V>> {
        let mut rest = name;
        loop {
            if let Some(e) = self.names.get(rest) {
                return Some(e);
            }
            match rest.find('.') {
                Some(dot) => rest = &rest[dot + 1..],
                None => return None,
            }
        }
    }

    /// The entry for exactly this name (lower case).
    pub fn by_name(&self, name: &str) -> Option<&Entry<V>> {
        self.names.get(name)
    }

    /// The entry for a sender (lower case, no angle brackets): the address,
    /// then `@domain`, then the domain and its parents.
    pub fn by_sender(&self, sender: &str) -> Option<&Entry<V>> {
        if let Some(e) = self.names.get(sender) {
            return Some(e);
        }
        let at = sender.rfind('@')?;
        self.names
            .get(&sender[at..])
            .or_else(|| self.by_domain(&sender[at + 1..]))
    }

    pub fn default_entry(&self) -> Option<&Entry<V>> {
        self.default.as_ref()
    }
}
