//! A minimal XML element tree and writer: generated XML is built from typed specs through
//! this, never by pasting strings, so every attribute and text is escaped.

use std::fmt::Write as _;

/// An XML element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    name: &'static str,
    attrs: Vec<(&'static str, String)>,
    children: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    /// An empty element.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Adds an attribute.
    #[must_use]
    pub fn attr(mut self, name: &'static str, value: impl ToString) -> Self {
        self.attrs.push((name, value.to_string()));
        self
    }

    /// Adds a child element.
    #[must_use]
    pub fn child(mut self, child: Element) -> Self {
        self.children.push(Node::Element(child));
        self
    }

    /// Adds several child elements.
    #[must_use]
    pub fn children(mut self, children: impl IntoIterator<Item = Element>) -> Self {
        self.children
            .extend(children.into_iter().map(Node::Element));
        self
    }

    /// Adds text content.
    #[must_use]
    pub fn text(mut self, text: impl ToString) -> Self {
        self.children.push(Node::Text(text.to_string()));
        self
    }

    /// The document, indented by two spaces, ending in a newline.
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        let pad = "  ".repeat(depth);
        let _ = write!(out, "{pad}<{}", self.name);
        for (k, v) in &self.attrs {
            let _ = write!(out, " {k}='{}'", escape(v));
        }
        match self.children.as_slice() {
            [] => out.push_str("/>\n"),
            [Node::Text(t)] => {
                let _ = writeln!(out, ">{}</{}>", escape(t), self.name);
            }
            children => {
                out.push_str(">\n");
                for c in children {
                    match c {
                        Node::Element(e) => e.write(out, depth + 1),
                        Node::Text(t) => {
                            let _ = writeln!(out, "{pad}  {}", escape(t));
                        }
                    }
                }
                let _ = writeln!(out, "{pad}</{}>", self.name);
            }
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_indents() {
        let x = Element::new("a")
            .attr("q", "it's <x>")
            .child(Element::new("b").text("1 & 2"))
            .child(Element::new("c"));
        assert_eq!(
            x.to_xml(),
            "<a q='it&apos;s &lt;x&gt;'>\n  <b>1 &amp; 2</b>\n  <c/>\n</a>\n"
        );
    }
}
