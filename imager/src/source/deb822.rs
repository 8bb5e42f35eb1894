//! A zero-copy reader of deb822 control data (Release, Packages,
//! *.sources): paragraphs separated by blank lines, `Name: value` fields,
//! continuation lines starting with a space or tab, `#` comment lines.

/// One paragraph: its fields in file order, values trimmed, continuation
/// lines included (with their newlines).
#[derive(Debug, Default)]
pub(crate) struct Paragraph<'a> {
    fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Paragraph<'a> {
    /// The value of the field `name` (case-insensitive), if present.
    pub(crate) fn get(&self, name: &str) -> Option<&'a str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// Splits `text` into paragraphs.
pub(crate) fn paragraphs<'a>(text: &'a str) -> Vec<Paragraph<'a>> {
    type Field<'a> = Option<(&'a str, usize, usize)>;
    fn flush_field<'a>(text: &'a str, cur: &mut Paragraph<'a>, field: &mut Field<'a>) {
        if let Some((name, start, end)) = field.take() {
            cur.fields.push((name, text[start..end].trim()));
        }
    }
    let mut out = Vec::new();
    let mut cur = Paragraph::default();
    // The field being read: name, value start offset, value end offset.
    let mut field: Field<'a> = None;
    let mut pos = 0;
    for raw in text.split_inclusive('\n') {
        let line_start = pos;
        pos += raw.len();
        let line = raw.trim_end_matches(['\n', '\r']);
        let line_end = line_start + line.len();
        if line.trim().is_empty() {
            flush_field(text, &mut cur, &mut field);
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else if line.starts_with('#') {
            // Comment line: ends nothing, belongs to no field.
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, _, end)) = field.as_mut() {
                *end = line_end;
            }
        } else if let Some(colon) = line.find(':') {
            flush_field(text, &mut cur, &mut field);
            let name = line[..colon].trim();
            field = Some((name, line_start + colon + 1, line_end));
        }
        // A line that is neither is malformed; it is ignored like apt's
        // parser skips what it cannot read.
    }
    flush_field(text, &mut cur, &mut field);
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_fields_and_continuations() {
        let text = "A: 1\r\nb: two\n three\n# c\n\n\nA:  x \nDescription: d\n more\n .\n";
        let ps = paragraphs(text);
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].get("a"), Some("1"));
        assert_eq!(ps[0].get("B"), Some("two\n three"));
        assert_eq!(ps[1].get("A"), Some("x"));
        assert_eq!(ps[1].get("description"), Some("d\n more\n ."));
        assert_eq!(ps[1].get("missing"), None);
    }
}
