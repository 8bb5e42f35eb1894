//! The kernel command line, parsed once the way the kernel does: words
//! split on whitespace, double quotes keep spaces inside a value, and
//! `key=value` words looked up by key. Every reader (init, machined's
//! config sources, network and maintenance token) goes through this one
//! parser.

/// A parsed kernel command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    text: String,
    words: Vec<String>,
}

impl Cmdline {
    /// The running kernel's (`/proc/cmdline`); empty when unreadable.
    pub fn current() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
    }

    pub fn parse(text: &str) -> Self {
        let mut words = Vec::new();
        let mut word = String::new();
        let mut quoted = false;
        let mut started = false;
        for c in text.chars() {
            match c {
                '"' => {
                    quoted = !quoted;
                    started = true;
                }
                c if c.is_whitespace() && !quoted => {
                    if started {
                        words.push(std::mem::take(&mut word));
                        started = false;
                    }
                }
                c => {
                    word.push(c);
                    started = true;
                }
            }
        }
        if started {
            words.push(word);
        }
        Cmdline {
            text: text.trim().to_owned(),
            words,
        }
    }

    /// The text as read.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn words(&self) -> impl Iterator<Item = &str> {
        self.words.iter().map(String::as_str)
    }

    /// The value of the first `key=value`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.words
            .iter()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    /// Every value of `key=value`, in order (`ip=` may repeat).
    pub fn values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.words
            .iter()
            .filter_map(move |w| w.strip_prefix(key)?.strip_prefix('='))
    }

    /// A bare word (`quiet`, `machined.debug`) is present.
    pub fn has(&self, word: &str) -> bool {
        self.words.iter().any(|w| w == word)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_values_and_quotes() {
        let c = Cmdline::parse(
            "BOOT_IMAGE=/vmlinuz slot=A ip=10.0.0.2::10.0.0.1:255.255.255.0:n1:eth0:off ip=dhcp quiet \"machined.note=two words\" machined.token=abc\n",
        );
        assert_eq!(c.get("slot"), Some("A"));
        assert_eq!(c.values("ip").count(), 2);
        assert!(c.has("quiet"));
        assert!(!c.has("slot"));
        assert_eq!(c.get("machined.note"), Some("two words"));
        assert_eq!(c.get("machined.token"), Some("abc"));
        // A key is matched whole: `machined.config` is not `machined.config.inline`.
        let c = Cmdline::parse("machined.config.inline=eA==");
        assert_eq!(c.get("machined.config"), None);
        assert_eq!(Cmdline::parse("").words().count(), 0);
    }
}
