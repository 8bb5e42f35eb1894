//! Reading YAML documents with every problem reported at once, each with its
//! field path and source line.
//!
//! serde stops at the first error. An operator fixing a config by hand wants
//! all of them, so we deserialize from a YAML value tree, and after each
//! error remove the offending node and try again. The source lines come from
//! a separate pass over the YAML events (yaml-rust2 reports positions; serde
//! values carry none).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde_norway::Value;
use serde_path_to_error::Segment;
use yaml_rust2::parser::{Event, Parser};

/// One step in a field path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// Largest document any reader here accepts, in bytes (1 MiB). A machine
/// config with every CA and key is about 20 KiB.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Deepest nesting of maps and lists any reader here accepts. A machine
/// config needs 5 (`machine.network.interfaces[].routes[]`); the limit is
/// checked on the event stream before any recursive pass sees the document.
pub const MAX_NESTING_DEPTH: usize = 64;

/// True for a key shown without quotes in a path: a name made of letters,
/// digits, `_`, `-` and `/`.
fn is_plain_key(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'/'))
}

/// Appends one segment to a rendered path.
fn push_seg(out: &mut String, seg: &Seg) {
    use std::fmt::Write as _;
    match seg {
        Seg::Key(k) if is_plain_key(k) => {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(k);
        }
        // Keys with dots (sysctls), spaces, brackets or nothing at all.
        Seg::Key(k) => {
            let _ = write!(out, "[{k:?}]");
        }
        Seg::Index(i) => {
            let _ = write!(out, "[{i}]");
        }
    }
}

/// Renders a field path as operators write it: `machine.network.interfaces[0].addresses[1]`.
/// Keys that are not plain names (sysctls with dots, anything with spaces
/// or brackets) are quoted: `machine.sysctls["net.ipv4.ip_forward"]`.
pub fn render_path(segs: &[Seg]) -> String {
    let mut out = String::new();
    for seg in segs {
        push_seg(&mut out, seg);
    }
    out
}

/// The path of a key under `base`, rendered as [`render_path`] would.
pub fn key_path(base: &str, key: &str) -> String {
    let mut out = base.to_owned();
    push_seg(&mut out, &Seg::Key(key.to_owned()));
    out
}

/// Reads a path rendered by [`render_path`] back into segments, as far as
/// it can be read: a hand-built path that does not follow the format stops
/// at its first unreadable segment.
pub fn parse_path(path: &str) -> Vec<Seg> {
    let mut segs = Vec::new();
    let mut rest = path;
    loop {
        if rest.is_empty() {
            return segs;
        }
        if let Some(r) = rest.strip_prefix("[\"") {
            // A quoted key, as `{:?}` writes it.
            let mut key = String::new();
            let mut chars = r.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => key.push('\n'),
                        Some('r') => key.push('\r'),
                        Some('t') => key.push('\t'),
                        Some('0') => key.push('\0'),
                        Some('u') => {
                            let tail = &r[i + 2..];
                            let Some(close) = tail.find('}') else {
                                return segs;
                            };
                            let hex = tail.get(1..close).unwrap_or_default();
                            match u32::from_str_radix(hex, 16).ok().and_then(char::from_u32) {
                                Some(ch) => key.push(ch),
                                None => return segs,
                            }
                            // Skip `{HEX}`.
                            for _ in 0..=close {
                                chars.next();
                            }
                        }
                        Some(c) => key.push(c),
                        None => return segs,
                    },
                    c => key.push(c),
                }
            }
            let Some(end) = end else { return segs };
            let Some(after) = r[end + 1..].strip_prefix(']') else {
                return segs;
            };
            segs.push(Seg::Key(key));
            rest = after;
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(close) = r.find(']') else {
                return segs;
            };
            let Ok(i) = r[..close].parse() else {
                return segs;
            };
            segs.push(Seg::Index(i));
            rest = &r[close + 1..];
        } else {
            let r = if segs.is_empty() {
                rest
            } else {
                match rest.strip_prefix('.') {
                    Some(r) => r,
                    None => return segs,
                }
            };
            let end = r.find(['.', '[']).unwrap_or(r.len());
            if end == 0 {
                return segs;
            }
            segs.push(Seg::Key(r[..end].to_owned()));
            rest = &r[end..];
        }
    }
}

/// A problem found in a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Field path, empty for the document as a whole.
    pub path: String,
    /// 1-based source line, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// A budget for [`Problems::summary`] in an error reply: gRPC clients
/// refuse replies whose metadata (the status message included) exceeds
/// 8 KiB by default.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 4096;

impl Problems {
    /// The problems one per line, cut to at most `max_bytes` bytes: as many
    /// whole problems as fit, then how many were left out and where to see
    /// them all. For replies with a size limit, such as a gRPC status
    /// message (clients refuse metadata over 8 KiB).
    pub fn summary(&self, max_bytes: usize) -> String {
        let total = self.0.len();
        let tail = |left: usize| {
            format!(
                "… and {left} more problem{}; `osctl validate FILE` or `osctl apply-config --dry-run` lists them all",
                if left == 1 { "" } else { "s" }
            )
        };
        let mut out = String::new();
        let mut shown = 0;
        for p in &self.0 {
            let line = p.to_string();
            let sep = usize::from(!out.is_empty());
            let left_after = total - shown - 1;
            // Room for this problem, and for the tail if more follow.
            let reserve = if left_after == 0 {
                0
            } else {
                1 + tail(left_after).len()
            };
            if out.len() + sep + line.len() + reserve > max_bytes {
                break;
            }
            if sep == 1 {
                out.push('\n');
            }
            out.push_str(&line);
            shown += 1;
        }
        if shown < total {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&tail(total - shown));
        }
        if out.len() > max_bytes {
            // Only when even the tail does not fit the budget.
            let mut cut = max_bytes;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
        }
        out
    }
}

/// Maps field paths to the 1-based line where their key (or sequence item)
/// starts. Stored as a tree of segments, so memory stays proportional to
/// the document whatever its depth or key lengths.
#[derive(Debug, Default)]
pub struct LineMap {
    /// (parent node, segment) -> node. Node 0 is the document's root.
    children: HashMap<(usize, Seg), usize>,
    /// Each node's parent.
    parents: Vec<usize>,
    /// Each node's line; 0 when unknown (the root of an empty document).
    lines: Vec<usize>,
}

impl LineMap {
    /// Records the lines of every key and item of `text`, up to the first
    /// YAML error (the serde pass reports it) or the limits.
    pub fn build(text: &str) -> LineMap {
        Self::scan(text).0
    }

    /// Like [`LineMap::build`], and the first limit `text` exceeds
    /// ([`MAX_DOCUMENT_BYTES`], [`MAX_NESTING_DEPTH`]). One pass over the
    /// YAML events, no recursion: safe on any input.
    pub fn scan(text: &str) -> (LineMap, Option<Problem>) {
        if let Some(p) = size_problem(text) {
            return (LineMap::default(), Some(p));
        }
        let mut rec = LineRecorder::default();
        let mut parser = Parser::new_from_str(text);
        loop {
            match parser.next_token() {
                Ok((Event::StreamEnd, _)) => break,
                Err(e) => {
                    let p = scan_depth_problem(&e);
                    let p = p.map(|mut p| {
                        p.path = rec.map.path_of(rec.stack.last().map_or(0, Frame::node));
                        p
                    });
                    return (rec.map, p);
                }
                Ok((ev, mark)) => {
                    rec.on_event(ev, mark.line());
                    if rec.stack.len() > MAX_NESTING_DEPTH {
                        let node = rec.stack.last().map_or(0, Frame::node);
                        let p = Problem {
                            path: rec.map.path_of(node),
                            line: Some(mark.line()),
                            message: depth_message(),
                        };
                        return (rec.map, Some(p));
                    }
                }
            }
        }
        (rec.map, None)
    }

    fn root() -> LineMap {
        LineMap {
            children: HashMap::new(),
            parents: vec![0],
            lines: vec![0],
        }
    }

    /// The node for `seg` under `parent`, created with `line` if new.
    fn child(&mut self, parent: usize, seg: Seg, line: usize) -> usize {
        let next = self.parents.len();
        match self.children.entry((parent, seg)) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                e.insert(next);
                self.parents.push(parent);
                self.lines.push(line);
                next
            }
        }
    }

    /// The rendered path of a node (for a rare error: one pass over every
    /// node).
    fn path_of(&self, mut node: usize) -> String {
        let mut chain = HashMap::new();
        while node != 0 {
            chain.insert(node, None);
            node = self.parents[node];
        }
        for ((_, seg), n) in &self.children {
            if let Some(slot) = chain.get_mut(n) {
                *slot = Some(seg);
            }
        }
        let mut nodes: Vec<usize> = chain.keys().copied().collect();
        // A child is always created after its parent.
        nodes.sort_unstable();
        let segs: Vec<Seg> = nodes.iter().filter_map(|n| chain[n].cloned()).collect();
        render_path(&segs)
    }

    /// The line of a rendered path such as `machine.roles[1]`, or of its
    /// nearest ancestor that has one.
    pub fn line_of_path(&self, path: &str) -> Option<usize> {
        self.line_of(&parse_path(path))
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub fn line_of(&self, path: &[Seg]) -> Option<usize> {
        let mut best = self.lines.first().copied().filter(|l| *l > 0);
        let mut node = 0;
        for seg in path {
            match self.children.get(&(node, seg.clone())) {
                Some(n) => {
                    node = *n;
                    best = Some(self.lines[node]);
                }
                None => break,
            }
        }
        best
    }
}

/// The scanner refuses more than 255 nested flow collections (`[[[…`) on
/// its own, before the parser sees the first of them: that is the nesting
/// limit too. Any other scan error is the YAML reader's to report.
fn scan_depth_problem(e: &yaml_rust2::ScanError) -> Option<Problem> {
    e.info().contains("recursion limit").then(|| Problem {
        path: String::new(),
        line: Some(e.marker().line()),
        message: depth_message(),
    })
}

fn depth_message() -> String {
    format!(
        "nested deeper than {MAX_NESTING_DEPTH} levels of maps and lists, the limit: \
         a machine config needs about 5; check that this is the right file"
    )
}

/// The problem with a document over [`MAX_DOCUMENT_BYTES`], naming the line
/// where it crosses the limit.
fn size_problem(text: &str) -> Option<Problem> {
    if text.len() <= MAX_DOCUMENT_BYTES {
        return None;
    }
    let line = 1 + text.as_bytes()[..MAX_DOCUMENT_BYTES]
        .iter()
        .filter(|b| **b == b'\n')
        .count();
    Some(Problem {
        path: String::new(),
        line: Some(line),
        message: format!(
            "the document is {} bytes, over the limit of {MAX_DOCUMENT_BYTES} bytes (1 MiB): \
             a machine config is a few tens of KiB; check that this is the right file",
            text.len()
        ),
    })
}

/// Checks `text` against [`MAX_DOCUMENT_BYTES`] and [`MAX_NESTING_DEPTH`]
/// without building anything: one pass over the YAML events, no recursion.
/// Call it before handing a stranger's document to any other YAML reader
/// (`serde_norway::from_str` included). A YAML syntax error is not a
/// problem here: the reader that follows reports it with its position.
pub fn check_limits(text: &str) -> Result<(), Problem> {
    if let Some(p) = size_problem(text) {
        return Err(p);
    }
    let mut depth = 0usize;
    let mut parser = Parser::new_from_str(text);
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => return Ok(()),
            Err(e) => return scan_depth_problem(&e).map_or(Ok(()), Err),
            Ok((Event::MappingStart(..) | Event::SequenceStart(..), mark)) => {
                depth += 1;
                if depth > MAX_NESTING_DEPTH {
                    return Err(Problem {
                        path: String::new(),
                        line: Some(mark.line()),
                        message: depth_message(),
                    });
                }
            }
            Ok((Event::MappingEnd | Event::SequenceEnd, _)) => depth = depth.saturating_sub(1),
            Ok(_) => {}
        }
    }
}

#[derive(Debug)]
enum Frame {
    /// A map at `node`; `key` is the node of the key whose value comes next.
    Map { node: usize, key: Option<usize> },
    /// A sequence at `node`; `index` is the next item's.
    Seq { node: usize, index: usize },
}

impl Frame {
    fn node(&self) -> usize {
        match self {
            Frame::Map { node, .. } | Frame::Seq { node, .. } => *node,
        }
    }
}

#[derive(Debug)]
struct LineRecorder {
    stack: Vec<Frame>,
    map: LineMap,
}

impl Default for LineRecorder {
    fn default() -> Self {
        LineRecorder {
            stack: Vec::new(),
            map: LineMap::root(),
        }
    }
}

impl LineRecorder {
    /// The node of the value starting now, recorded at `line` if new.
    fn position(&mut self, line: usize) -> usize {
        match self.stack.last_mut() {
            None => {
                if self.map.lines[0] == 0 {
                    self.map.lines[0] = line;
                }
                0
            }
            Some(Frame::Map { key: Some(k), .. }) => *k,
            // A value with no key before it: only after a placeholder key,
            // which `take_key` always sets; keep the map's own node.
            Some(Frame::Map { node, key: None }) => *node,
            Some(Frame::Seq { node, index }) => {
                let (node, index) = (*node, *index);
                self.map.child(node, Seg::Index(index), line)
            }
        }
    }

    /// A value (scalar or finished container) completed in the parent frame.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key, .. }) => *key = None,
            Some(Frame::Seq { index, .. }) => *index += 1,
            None => {}
        }
    }

    /// Called at the start of a value: in a map with no pending key the
    /// value is a key; returns true in that case.
    fn take_key(&mut self, text: impl Into<String>, line: usize) -> bool {
        if let Some(Frame::Map { node, key: None }) = self.stack.last() {
            let node = *node;
            let k = self.map.child(node, Seg::Key(text.into()), line);
            if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
                *key = Some(k);
            }
            return true;
        }
        false
    }

    /// A scalar: a key in a map waiting for one, else a value.
    fn scalar(&mut self, text: String, line: usize) {
        if !self.take_key(text, line) {
            self.position(line);
            self.value_done();
        }
    }

    fn on_event(&mut self, ev: Event, line: usize) {
        match ev {
            Event::Scalar(text, ..) => self.scalar(text, line),
            Event::Alias(_) => self.scalar("*alias".into(), line),
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                // A container used as a map key is not something a config
                // has; a placeholder key keeps the frames aligned.
                self.take_key("?complex", line);
                let node = self.position(line);
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { node, key: None }
                } else {
                    Frame::Seq { node, index: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_done();
            }
            _ => {}
        }
    }
}

fn to_segs(path: &serde_path_to_error::Path) -> Vec<Seg> {
    path.iter()
        .filter_map(|s| match s {
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// Removes the node at `path`; false when there is none.
fn remove_at(root: &mut Value, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = root;
    for seg in parents {
        node = match (seg, node) {
            (Seg::Key(k), Value::Mapping(m)) => match m.get_mut(k.as_str()) {
                Some(v) => v,
                None => return false,
            },
            (Seg::Index(i), Value::Sequence(s)) => match s.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, node) {
        (Seg::Key(k), Value::Mapping(m)) => m.remove(k.as_str()).is_some(),
        (Seg::Index(i), Value::Sequence(s)) if *i < s.len() => {
            s.remove(*i);
            true
        }
        _ => false,
    }
}

/// Items removed from sequences, by the original path of the sequence, so
/// that later errors are reported with the indices the operator wrote.
#[derive(Debug, Default)]
struct RemovedItems(HashMap<String, Vec<usize>>);

impl RemovedItems {
    /// Translates a path in current indices to the document's indices.
    fn original(&self, segs: &[Seg]) -> Vec<Seg> {
        let mut out: Vec<Seg> = Vec::with_capacity(segs.len());
        // `out` rendered, kept up to date segment by segment.
        let mut rendered = String::new();
        for seg in segs {
            let seg = match seg {
                Seg::Index(i) => {
                    let mut orig = *i;
                    if let Some(removed) = self.0.get(&rendered) {
                        // `removed` is sorted; each removed index at or
                        // below the running position shifts it up by one.
                        for r in removed {
                            if *r <= orig {
                                orig += 1;
                            }
                        }
                    }
                    Seg::Index(orig)
                }
                other => other.clone(),
            };
            push_seg(&mut rendered, &seg);
            out.push(seg);
        }
        out
    }

    fn record(&mut self, original: &[Seg]) {
        if let Some((Seg::Index(i), parent)) = original.split_last() {
            let list = self.0.entry(render_path(parent)).or_default();
            list.push(*i);
            list.sort_unstable();
        }
    }
}

/// Extracts `name` from a serde message such as "unknown field `name`, expected ...".
fn backticked<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?.strip_prefix('`')?;
    rest.split('`').next()
}

/// Refuses control characters (U+0000 to U+001F, U+007F to U+009F) in every
/// key and string value of a YAML tree: they end up in command lines, files
/// and certificates, where a newline or an escape sequence changes what is
/// run or shown. A newline is allowed in the values of keys for which
/// `multiline` is true (PEM fields), and in the items of lists under such
/// keys (a list of PEM keys). Walks iteratively; reports at most
/// [`MAX_STRUCTURAL_PROBLEMS`] values.
pub fn control_characters(root: &Value, multiline: impl Fn(&str) -> bool) -> Vec<Problem> {
    let bad = |s: &str, lines: bool| {
        s.chars()
            .enumerate()
            .find(|(_, c)| c.is_control() && !(lines && *c == '\n'))
            .map(|(pos, c)| format!("U+{:04X} at character {}", u32::from(c), pos + 1))
    };
    let mut found = Vec::new();
    // (path, own key, value), depth first in document order.
    let mut stack: Vec<(String, Option<&str>, &Value)> = vec![(String::new(), None, root)];
    while let Some((path, key, v)) = stack.pop() {
        if found.len() >= MAX_STRUCTURAL_PROBLEMS {
            found.push(Problem {
                path: String::new(),
                line: None,
                message: format!(
                    "stopped after {MAX_STRUCTURAL_PROBLEMS} values with control characters"
                ),
            });
            break;
        }
        match v {
            Value::String(s) => {
                let pem = key.is_some_and(&multiline);
                if let Some(at) = bad(s, pem) {
                    let what = if pem {
                        "remove it (a PEM block has nothing but newlines between its lines)"
                    } else {
                        "remove it: this value is one line of text (only PEM certificates and keys span lines)"
                    };
                    found.push(Problem {
                        path,
                        line: None,
                        message: format!("contains a control character ({at}): {what}"),
                    });
                }
            }
            Value::Sequence(items) => {
                for (i, item) in items.iter().enumerate().rev() {
                    let mut p = path.clone();
                    push_seg(&mut p, &Seg::Index(i));
                    // Items are read as their list's key is.
                    stack.push((p, key, item));
                }
            }
            Value::Mapping(fields) => {
                let fields: Vec<_> = fields.iter().collect();
                for (k, item) in fields.into_iter().rev() {
                    let Value::String(k) = k else {
                        continue;
                    };
                    let mut p = path.clone();
                    push_seg(&mut p, &Seg::Key(k.clone()));
                    if let Some(at) = bad(k, false) {
                        found.push(Problem {
                            path: p.clone(),
                            line: None,
                            message: format!(
                                "the name contains a control character ({at}): remove it"
                            ),
                        });
                    }
                    stack.push((p, Some(k.as_str()), item));
                }
            }
            Value::Tagged(t) => stack.push((path, key, &t.value)),
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    found
}

/// Most structural problems (unknown fields, wrong types) [`parse_yaml`]
/// reports in one document before it stops looking.
pub const MAX_STRUCTURAL_PROBLEMS: usize = 200;

/// The outcome of [`parse_yaml`]: the value when the document could be read
/// whole, and every structural problem met on the way.
#[derive(Debug)]
pub struct Parsed<T> {
    pub value: Option<T>,
    pub problems: Vec<Problem>,
    pub lines: LineMap,
    /// Paths removed to get past a problem; later checks skip these.
    pub removed: Vec<String>,
}

/// Parses one YAML document into `T`, collecting every structural problem.
///
/// The document is first checked against [`MAX_DOCUMENT_BYTES`] and
/// [`MAX_NESTING_DEPTH`] in one non-recursive pass, so the recursive readers
/// that follow (serde's) only ever see a bounded tree.
pub fn parse_yaml<T: DeserializeOwned>(text: &str) -> Parsed<T> {
    parse_yaml_with(text, |_| Vec::new())
}

/// [`parse_yaml`], and `check` run over the document's YAML tree before it
/// becomes a `T` (a typed value may have normalized the text away: a URL
/// parser drops tabs and newlines). Its problems come first, with their
/// lines; a later problem at the same path is not repeated.
pub fn parse_yaml_with<T: DeserializeOwned>(
    text: &str,
    check: impl FnOnce(&Value) -> Vec<Problem>,
) -> Parsed<T> {
    let mut problems = Vec::new();
    let mut removed = Vec::new();
    let (lines, limit) = LineMap::scan(text);
    if let Some(p) = limit {
        problems.push(p);
        return Parsed {
            value: None,
            problems,
            lines,
            removed,
        };
    }
    let mut items = RemovedItems::default();
    let mut root: Value = match serde_norway::from_str(text) {
        Ok(Value::Null) => {
            problems.push(Problem {
                path: String::new(),
                line: None,
                message: "the document is empty".into(),
            });
            return Parsed {
                value: None,
                problems,
                lines,
                removed,
            };
        }
        Ok(v) => {
            for mut p in check(&v) {
                p.line = lines.line_of_path(&p.path);
                problems.push(p);
            }
            v
        }
        Err(e) => {
            let line = e.location().map(|l| l.line());
            let mut message = e.to_string();
            // serde_norway appends " at line L column C"; the line is shown separately.
            if let Some(idx) = message.find(" at line ") {
                message.truncate(idx);
            }
            problems.push(Problem {
                path: String::new(),
                line,
                message: format!("not valid YAML: {message}"),
            });
            return Parsed {
                value: None,
                problems,
                lines,
                removed,
            };
        }
    };

    // Each round removes one node, so this ends; the cap guards against a
    // document built to make it slow.
    for round in 0..=MAX_STRUCTURAL_PROBLEMS {
        if round == MAX_STRUCTURAL_PROBLEMS {
            problems.push(Problem {
                path: String::new(),
                line: None,
                message: format!(
                    "stopped after {MAX_STRUCTURAL_PROBLEMS} problems: fix these and check again"
                ),
            });
            break;
        }
        match serde_path_to_error::deserialize::<_, T>(&root) {
            Ok(v) => {
                return Parsed {
                    value: Some(v),
                    problems,
                    lines,
                    removed,
                }
            }
            Err(err) => {
                // `segs` is in the current (possibly shortened) value's
                // indices; `original` in the document's.
                let mut segs = to_segs(err.path());
                let mut message = err.inner().to_string();
                if let Some(idx) = message.find(" at line ") {
                    message.truncate(idx);
                }
                let mut removable = true;
                if let Some(field) = backticked(&message, "unknown field ") {
                    if segs.last() != Some(&Seg::Key(field.to_owned())) {
                        segs.push(Seg::Key(field.to_owned()));
                    }
                } else if let Some(field) = backticked(&message, "missing field ") {
                    segs.push(Seg::Key(field.to_owned()));
                    message = "required field is missing".into();
                    removable = false;
                }
                let original = items.original(&segs);
                let path = render_path(&original);
                // A required field we removed ourselves is already reported,
                // and so is a field `check` refused.
                let already =
                    removed.iter().any(|r| r == &path) || problems.iter().any(|p| p.path == path);
                if !already {
                    problems.push(Problem {
                        line: lines.line_of(&original),
                        path: path.clone(),
                        message,
                    });
                }
                if !removable || !remove_at(&mut root, &segs) {
                    break;
                }
                items.record(&original);
                removed.push(path);
            }
        }
    }
    Parsed {
        value: None,
        problems,
        lines,
        removed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_map_records_keys_and_items() {
        let text = "a:\n  b: 1\n  c:\n    - x\n    - y: 2\nd: [1, 2]\n";
        let m = LineMap::build(text);
        let seg = |s: &str| Seg::Key(s.into());
        assert_eq!(m.line_of(&[seg("a")]), Some(1));
        assert_eq!(m.line_of(&[seg("a"), seg("b")]), Some(2));
        assert_eq!(m.line_of(&[seg("a"), seg("c"), Seg::Index(1)]), Some(5));
        assert_eq!(
            m.line_of(&[seg("a"), seg("c"), Seg::Index(1), seg("y")]),
            Some(5)
        );
        assert_eq!(m.line_of(&[seg("d")]), Some(6));
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(m.line_of(&[seg("a"), seg("zz")]), Some(1));
    }

    type Any = serde_norway::Value;

    fn nested_seqs(depth: usize) -> String {
        format!("{}x\n", "- ".repeat(depth))
    }

    #[test]
    fn deep_nesting_is_refused_with_its_line_before_any_recursion() {
        // The probe's document: ~6,000 nested block sequences, 12 KB. It
        // overflowed the stack in the line-number pass.
        let text = format!("a: 1\nb:\n  {}", nested_seqs(6000));
        let parsed = parse_yaml::<Any>(&text);
        assert!(parsed.value.is_none());
        assert_eq!(parsed.problems.len(), 1, "{:?}", parsed.problems);
        let p = &parsed.problems[0];
        assert_eq!(p.line, Some(3), "{p}");
        assert_eq!(p.path, format!("b{}", "[0]".repeat(MAX_NESTING_DEPTH - 1)));
        assert!(p.message.contains("nested deeper than 64"), "{p}");
        assert!(check_limits(&text).is_err());
        // The same in flow style and with maps, far deeper.
        for text in [
            "[".repeat(200_000),
            "{a: ".repeat(100_000),
            "a:\n".to_owned()
                + &(1..200)
                    .map(|i| format!("{}k:\n", " ".repeat(i)))
                    .collect::<String>(),
        ] {
            let parsed = parse_yaml::<Any>(&text);
            assert!(
                parsed.problems[0].message.contains("nested deeper"),
                "{:?}",
                parsed.problems
            );
            assert!(parsed.problems[0].line.is_some());
            assert!(check_limits(&text).is_err());
            let _ = LineMap::build(&text);
        }
    }

    #[test]
    fn nesting_up_to_the_limit_is_read() {
        let ok = nested_seqs(MAX_NESTING_DEPTH);
        let parsed = parse_yaml::<Any>(&ok);
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        assert!(parsed.value.is_some());
        assert!(check_limits(&ok).is_ok());
        let deep_path = vec![Seg::Index(0); MAX_NESTING_DEPTH];
        assert_eq!(parsed.lines.line_of(&deep_path), Some(1));
        let over = nested_seqs(MAX_NESTING_DEPTH + 1);
        assert!(parse_yaml::<Any>(&over).value.is_none());
        assert!(check_limits(&over).is_err());
        // 64 levels of maps, one per line, with long keys: the line of the
        // deepest key is found.
        let mut text = String::new();
        for i in 0..MAX_NESTING_DEPTH {
            text.push_str(&format!("{}key{i}{}:\n", " ".repeat(i), "x".repeat(200)));
        }
        text.push_str(&format!("{}leaf: 1\n", " ".repeat(MAX_NESTING_DEPTH)));
        // The leaf map is level 64 + 1; one key fewer fits.
        assert!(parse_yaml::<Any>(&text).value.is_none());
        let text: String = text
            .lines()
            .skip(1)
            .map(|l| format!("{}\n", &l[1..]))
            .collect();
        let parsed = parse_yaml::<Any>(&text);
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        let mut segs: Vec<Seg> = (1..MAX_NESTING_DEPTH)
            .map(|i| Seg::Key(format!("key{i}{}", "x".repeat(200))))
            .collect();
        segs.push(Seg::Key("leaf".into()));
        assert_eq!(parsed.lines.line_of(&segs), Some(MAX_NESTING_DEPTH));
        assert_eq!(
            parsed.lines.line_of_path(&render_path(&segs)),
            Some(MAX_NESTING_DEPTH)
        );
    }

    #[test]
    fn many_keys_and_items_are_read() {
        let mut text = String::from("m:\n");
        for i in 0..20_000 {
            text.push_str(&format!("  key{i}: v\n"));
        }
        text.push_str("l:\n");
        for _ in 0..20_000 {
            text.push_str("  - x\n");
        }
        let parsed = parse_yaml::<Any>(&text);
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        assert_eq!(parsed.lines.line_of_path("m.key19999"), Some(20_001));
        assert_eq!(parsed.lines.line_of_path("l[19999]"), Some(40_002));
    }

    #[test]
    fn oversized_documents_are_refused_with_the_line() {
        let line = "k: vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv\n";
        let text = line.repeat(MAX_DOCUMENT_BYTES / line.len() + 1);
        let parsed = parse_yaml::<Any>(&text);
        assert_eq!(parsed.problems.len(), 1);
        let p = &parsed.problems[0];
        assert!(p.message.contains("over the limit of 1048576 bytes"), "{p}");
        assert_eq!(p.line, Some(MAX_DOCUMENT_BYTES / line.len() + 1));
        assert!(check_limits(&text).is_err());
        assert!(check_limits(&text[..MAX_DOCUMENT_BYTES - 100]).is_ok());
    }

    #[test]
    fn paths_render_and_read_back() {
        let segs = vec![
            Seg::Key("machine".into()),
            Seg::Key("sysctls".into()),
            Seg::Key("net.ipv4.ip_forward".into()),
        ];
        assert_eq!(parse_path(&render_path(&segs)), segs);
        let odd = vec![
            Seg::Key("a".into()),
            Seg::Index(3),
            Seg::Key("we\"ird [key]\n\u{1b}é".into()),
            Seg::Key(String::new()),
            Seg::Key("--v".into()),
            Seg::Index(0),
        ];
        let rendered = render_path(&odd);
        assert_eq!(parse_path(&rendered), odd, "{rendered}");
        assert_eq!(
            key_path("cluster.etcd.extraArgs", "a.b"),
            "cluster.etcd.extraArgs[\"a.b\"]"
        );
        assert_eq!(
            key_path("cluster.etcd.extraArgs", "--v"),
            "cluster.etcd.extraArgs.--v"
        );
        // Unreadable tails stop the reading, not the lookup.
        assert_eq!(
            parse_path("a.b[x].c"),
            vec![Seg::Key("a".into()), Seg::Key("b".into())]
        );
    }

    fn problems(n: usize) -> Problems {
        Problems(
            (0..n)
                .map(|i| Problem {
                    path: format!("machine.bogus{i}"),
                    line: Some(i + 1),
                    message: "unknown field `bogus`, expected one of `roles`, `hostname`, `installDisk`, `network`, `sysctls`, `kernelModules`, `certSANs`, `kubelet`".into(),
                })
                .collect(),
        )
    }

    #[test]
    fn summary_fits_the_budget_with_whole_problems() {
        let all = problems(300);
        assert!(all.to_string().len() > 20_000);
        let s = all.summary(4096);
        assert!(s.len() <= 4096, "{}", s.len());
        let lines: Vec<&str> = s.lines().collect();
        let shown = lines.len() - 1;
        assert!(shown > 10, "{s}");
        for (i, l) in lines[..shown].iter().enumerate() {
            assert_eq!(*l, all.0[i].to_string());
        }
        assert_eq!(
            *lines.last().unwrap(),
            format!(
                "… and {} more problems; `osctl validate FILE` or `osctl apply-config --dry-run` lists them all",
                300 - shown
            )
        );
        // Everything fits: no tail.
        let few = problems(3);
        assert_eq!(few.summary(4096), few.to_string());
        // The last problem may use the room the tail would have needed.
        let exact = few.to_string().len();
        assert_eq!(few.summary(exact), few.to_string());
        let s = few.summary(exact - 1);
        assert!(s.ends_with("… and 1 more problem; `osctl validate FILE` or `osctl apply-config --dry-run` lists them all"), "{s}");
        // A budget below one problem: the count alone; below that, cut.
        assert!(few.summary(120).starts_with("… and 3 more problems"));
        assert!(few.summary(10).len() <= 10);
        assert_eq!(Problems(vec![]).summary(100), "");
    }

    #[test]
    fn render_quotes_dotted_keys() {
        let p = [
            Seg::Key("machine".into()),
            Seg::Key("sysctls".into()),
            Seg::Key("net.ipv4.ip_forward".into()),
        ];
        assert_eq!(render_path(&p), "machine.sysctls[\"net.ipv4.ip_forward\"]");
    }
}
