//! Where each setting of a config file is: YAML paths (`pools[0].scheduler.apiVersion`) → line
//! numbers, from a second pass over the text. Errors already carry serde's path; this lets a
//! warning about a valid but doubtful setting point at its line too.

use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// The line of every mapping value and sequence item of a YAML document, by path.
#[derive(Debug, Clone, Default)]
pub(super) struct Lines(HashMap<String, u64>);

impl Lines {
    /// Lines of the nodes of `text`; none when it does not parse (errors say where instead).
    pub(super) fn of(text: &str) -> Self {
        let mut lines = HashMap::new();
        if let Ok(root) = serde_saphyr::from_str::<Node>(text) {
            root.collect("", &mut lines);
        }
        Self(lines)
    }

    /// The line (1-based) of the value at `path`, such as `pools[0].scheduler.apiVersion`.
    pub(super) fn get(&self, path: &str) -> Option<u64> {
        self.0.get(path).copied()
    }
}

/// A YAML node, with its children's locations.
enum Node {
    Map(Vec<(String, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Leaf,
}

impl Node {
    fn collect(&self, path: &str, out: &mut HashMap<String, u64>) {
        let mut add = |child: String, node: &Spanned<Node>| {
            let line = node.referenced.line();
            if line > 0 {
                out.insert(child.clone(), line);
            }
            node.value.collect(&child, out);
        };
        match self {
            Self::Map(entries) => {
                for (k, v) in entries {
                    add(if path.is_empty() { k.clone() } else { format!("{path}.{k}") }, v);
                }
            }
            Self::Seq(items) => {
                for (i, v) in items.iter().enumerate() {
                    add(format!("{path}[{i}]"), v);
                }
            }
            Self::Leaf => {}
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(Key(k)) = map.next_key()? {
            entries.push((k, map.next_value()?));
        }
        Ok(Node::Map(entries))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
}

/// A mapping key, as the path shows it (config keys are strings; numbers and booleans are
/// written as they read).
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar key")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_owned()))
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
        }
        d.deserialize_any(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_lines() {
        let text = "a: 1\npools:\n  - name: p\n    scheduler:\n      apiVersion: v1\n      plugins:\n        - type: t\n          parameters: {lruSize: 4, x: [1, 2]}\n";
        let lines = Lines::of(text);
        let check = |path: &str, want: Option<u64>| assert_eq!(lines.get(path), want, "{path}");
        check("a", Some(1));
        check("pools[0].name", Some(3));
        check("pools[0].scheduler.apiVersion", Some(5));
        check("pools[0].scheduler.plugins[0].type", Some(7));
        check("pools[0].scheduler.plugins[0].parameters.lruSize", Some(8));
        check("pools[0].scheduler.plugins[0].parameters.x[1]", Some(8));
        check("nowhere", None);
        assert!(Lines::of("a: [").get("a").is_none());
    }
}
