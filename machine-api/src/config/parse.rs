//! Reading YAML documents with every problem reported at once, each with its
//! field path and source line.
//!
//! serde stops at the first error. An operator fixing a config by hand wants
//! all of them, so we deserialize from a YAML value tree, and after each
//! error remove the offending node and try again. The source lines come from
//! a separate pass over the YAML events (yaml-rust2 reports positions; serde
//! values carry none).

use std::collections::HashMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde_norway::Value;
use serde_path_to_error::Segment;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// One step in a field path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// Renders a field path as operators write it: `machine.network.interfaces[0].addresses[1]`.
/// Keys that contain dots (sysctls) are quoted: `machine.sysctls["net.ipv4.ip_forward"]`.
pub fn render_path(segs: &[Seg]) -> String {
    let mut out = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) if k.contains('.') || k.is_empty() => {
                out.push_str(&format!("[{k:?}]"));
            }
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
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

/// Maps rendered field paths to the 1-based line where their key (or
/// sequence item) starts.
#[derive(Debug, Default)]
pub struct LineMap(HashMap<String, usize>);

impl LineMap {
    pub fn build(text: &str) -> LineMap {
        let mut recv = LineRecorder::default();
        // A scan error here is already reported by the serde pass; keep
        // whatever positions were recorded before it.
        let _ = Parser::new_from_str(text).load(&mut recv, false);
        LineMap(recv.lines)
    }

    /// The line of a rendered path such as `machine.roles[1]`, or of its
    /// nearest ancestor that has one.
    pub fn line_of_path(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(l) = self.0.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub fn line_of(&self, path: &[Seg]) -> Option<usize> {
        (0..=path.len())
            .rev()
            .find_map(|n| self.0.get(&render_path(&path[..n])).copied())
    }
}

#[derive(Debug)]
enum Frame {
    Map { key: Option<String> },
    Seq { index: usize },
}

#[derive(Debug, Default)]
struct LineRecorder {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
}

impl LineRecorder {
    fn path(&self) -> Vec<Seg> {
        self.stack
            .iter()
            .filter_map(|f| match f {
                Frame::Map { key } => key.clone().map(Seg::Key),
                Frame::Seq { index } => Some(Seg::Index(*index)),
            })
            .collect()
    }

    fn record(&mut self, line: usize) {
        let p = render_path(&self.path());
        self.lines.entry(p).or_insert(line);
    }

    /// A value (scalar or finished container) completed in the parent frame.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key }) => *key = None,
            Some(Frame::Seq { index }) => *index += 1,
            None => {}
        }
    }

    /// Called at the start of a value: in a map with no pending key the
    /// value is a key; returns true in that case.
    fn take_key(&mut self, text: &str, line: usize) -> bool {
        if let Some(Frame::Map { key }) = self.stack.last_mut() {
            if key.is_none() {
                *key = Some(text.to_owned());
                self.record(line);
                return true;
            }
        }
        false
    }
}

impl MarkedEventReceiver for LineRecorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(ref text, ..) if self.take_key(text, line) => {}
            Event::Alias(_) if self.take_key("*alias", line) => {}
            Event::Scalar(..) | Event::Alias(_) => {
                self.record(line);
                self.value_done();
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                // A container used as a map key is not something a config
                // has; a placeholder key keeps the frames aligned.
                self.take_key("?complex", line);
                self.record(line);
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { key: None }
                } else {
                    Frame::Seq { index: 0 }
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
        for seg in segs {
            match seg {
                Seg::Index(i) => {
                    let mut orig = *i;
                    if let Some(removed) = self.0.get(&render_path(&out)) {
                        // `removed` is sorted; each removed index at or
                        // below the running position shifts it up by one.
                        for r in removed {
                            if *r <= orig {
                                orig += 1;
                            }
                        }
                    }
                    out.push(Seg::Index(orig));
                }
                other => out.push(other.clone()),
            }
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
pub fn parse_yaml<T: DeserializeOwned>(text: &str) -> Parsed<T> {
    let lines = LineMap::build(text);
    let mut problems = Vec::new();
    let mut removed = Vec::new();
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
        Ok(v) => v,
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
    for _ in 0..200 {
        match serde_path_to_error::deserialize::<_, T>(root.clone()) {
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
                // A required field we removed ourselves is already reported.
                let already = removed.iter().any(|r| r == &path);
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
