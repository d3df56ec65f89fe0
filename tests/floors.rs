//! The floor rule of docs/architecture.md, checked: a folder of `src/` may use the crate's
//! own paths (`crate::…`) only from the floors below it. Fails naming the file, the line and
//! the floor it reaches up to. Only code counts: comments and doc links are skipped (they
//! create no dependency).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What each floor may use, besides itself. The bottom (`error`, `device`, `support`,
/// `profile`, `fusion`) is open to every floor above it.
fn allowed(floor: &str) -> &'static [&'static str] {
    const BOTTOM: [&str; 5] = ["error", "device", "support", "profile", "fusion"];
    match floor {
        "error" | "device" | "support" | "profile" | "fusion" => &["error"],
        "graph" => &BOTTOM,
        "ops" => &BOTTOM,
        "layers" => &[
            "error", "device", "support", "profile", "fusion", "graph", "ops",
        ],
        "models" => &[
            "error", "device", "support", "profile", "fusion", "graph", "layers",
        ],
        "data" => &[
            "error", "device", "support", "profile", "fusion", "graph", "ops", "layers", "models",
        ],
        "distributed" => &BOTTOM,
        "train" => &[
            "error",
            "device",
            "support",
            "profile",
            "fusion",
            "graph",
            "ops",
            "layers",
            "models",
            "data",
            "distributed",
        ],
        other => panic!("a floor that docs/architecture.md does not name: {other}"),
    }
}

/// The floor an item re-exported at the crate root comes from.
fn root_item(name: &str) -> &'static str {
    match name {
        "Error" | "Result" => "error",
        "select_device" | "keep_freed_gpu_memory" => "device",
        "ElementWise" | "Fusion" => "fusion",
        "LayerRegistry" | "Model" | "NamedWeight" | "ParamCounts" => "models",
        // The prelude gathers graph, layers and models.
        "prelude" => "models",
        _ => "graph",
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The floor of a file under `src/`: its top folder, or its stem for `src/*.rs`.
fn floor_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap();
    let mut parts = relative.iter();
    let first = parts.next()?.to_str()?;
    if parts.next().is_some() {
        Some(first.to_string())
    } else {
        let stem = first.trim_end_matches(".rs");
        (stem != "lib").then(|| stem.to_string())
    }
}

/// Every floor that the code of `text` names through `crate::`, with the line it is on.
fn uses(text: &str) -> Vec<(usize, String)> {
    // Code only: each line cut at its comment (no `//` inside the crate's strings that matter).
    let code: Vec<&str> = text
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .collect();
    let joined = code.join("\n");
    let mut found = Vec::new();
    let mut rest = joined.as_str();
    let mut offset = 0;
    while let Some(at) = rest.find("crate::") {
        let start = at + "crate::".len();
        let after = &rest[start..];
        let line = joined[..offset + at].matches('\n').count() + 1;
        let mut names = Vec::new();
        if let Some(group) = after.strip_prefix('{') {
            // `crate::{a::X, b}`: the first segment of each member.
            let mut depth = 0;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => return true,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    false
                })
                .map(|(i, _)| i)
                .unwrap_or(group.len());
            let mut depth = 0;
            let mut member = String::new();
            for c in group[..end].chars().chain(std::iter::once(',')) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let first = member.trim().split("::").next().unwrap_or("").to_string();
                        if !first.is_empty() {
                            names.push(first);
                        }
                        member.clear();
                        continue;
                    }
                    _ => {}
                }
                member.push(c);
            }
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
        }
        for name in names {
            let floor = if name.starts_with(|c: char| c.is_uppercase()) || name == "prelude" {
                root_item(&name).to_string()
            } else if ["select_device", "keep_freed_gpu_memory"].contains(&name.as_str()) {
                "device".to_string()
            } else {
                name
            };
            found.push((line, floor));
        }
        offset += start;
        rest = &joined[offset..];
    }
    found
}

#[test]
fn no_floor_uses_a_floor_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut floors_seen = BTreeSet::new();
    for file in &files {
        let Some(floor) = floor_of(&src, file) else {
            continue;
        };
        floors_seen.insert(floor.clone());
        let text = std::fs::read_to_string(file).unwrap();
        for (line, used) in uses(&text) {
            if used != floor && !allowed(&floor).contains(&used.as_str()) {
                violations.push(format!(
                    "{}:{line}: `{floor}` uses `{used}`, a floor above it",
                    file.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    // The check must have read the floors it is about.
    for floor in [
        "graph", "ops", "layers", "models", "train", "data", "support",
    ] {
        assert!(floors_seen.contains(floor), "no file of `{floor}` read");
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_floor_check_sees_grouped_and_root_paths() {
    let text = "use crate::{data::Batch, models::{Model, ResNetConfig}};\n\
                // use crate::train::Trainer; (a comment: skipped)\n\
                fn f() -> crate::Result<()> { crate::select_device(\"cpu\")?; Ok(()) }\n\
                /// [`Model`](crate::models::Model)\n\
                type L = crate::LayerRegistry;";
    let found: Vec<String> = uses(text).into_iter().map(|(_, f)| f).collect();
    assert_eq!(found, ["data", "models", "error", "device", "models"]);
}

// ---------------------------------------------------------------------------------------------
// Import circles: the file-level graph of `use`s, re-exports followed to the file that defines
// the item, must have no cycle (a two-file loop is the shortest).

/// The module path of a file under `src/` (`graph/layer.rs` → `["graph", "layer"]`,
/// `ops/mod.rs` → `["ops"]`, `lib.rs` → `[]`).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_str().unwrap().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The text of `text` with comments, string and char literals blanked (so that a path in a
/// doc comment or a message is not an import), line breaks kept.
fn code_only(text: &str) -> String {
    let bytes: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < bytes.len() && bytes[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < bytes.len() {
                if bytes[i] == '/' && bytes.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if bytes[i] == '*' && bytes.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if bytes[i] == '\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || (next == Some('#') && !prev_is_ident(&bytes, i)))
        {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while bytes.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if bytes.get(j) != Some(&'"') || prev_is_ident(&bytes, i) {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                match bytes.get(j) {
                    None => break,
                    Some('"') if (0..hashes).all(|k| bytes.get(j + 1 + k) == Some(&'#')) => {
                        j += 1 + hashes;
                        break;
                    }
                    Some('\n') => out.push('\n'),
                    _ => {}
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < bytes.len() && bytes[i] != '"' {
                if bytes[i] == '\\' {
                    i += 1;
                }
                if bytes.get(i) == Some(&'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            out.push_str("\"\"");
            i += 1;
        } else if c == '\'' && bytes.get(i + 2) == Some(&'\'') {
            out.push_str("' '");
            i += 3;
        } else if c == '\'' && next == Some('\\') {
            let mut j = i + 2;
            while j < bytes.len() && bytes[j] != '\'' {
                j += 1;
            }
            out.push_str("' '");
            i = j + 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_is_ident(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// A path of a `use` and the name it binds.
type UsePath = (Vec<String>, String);

/// The paths of a use tree (`a::{b::C, d}` → `a::b::C`, `a::d`), each with the name it binds.
fn expand_use_tree(tree: &str) -> Vec<(Vec<String>, String)> {
    // Whitespace only where it separates words (`Other as Renamed`).
    let words: Vec<&str> = tree.split_whitespace().collect();
    let mut tree = words.join(" ");
    for sep in ["::", "{", "}", ","] {
        tree = tree
            .replace(&format!(" {sep}"), sep)
            .replace(&format!("{sep} "), sep);
    }
    let mut out = Vec::new();
    fn walk(prefix: &[String], tree: &str, out: &mut Vec<(Vec<String>, String)>) {
        // Split at top-level commas.
        let mut depth = 0;
        let mut start = 0;
        let mut members = Vec::new();
        for (i, c) in tree.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    members.push(&tree[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        members.push(&tree[start..]);
        for member in members.into_iter().filter(|m| !m.is_empty()) {
            if let Some(open) = member.find('{') {
                let head: Vec<String> = member[..open]
                    .trim_end_matches("::")
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                let inner = &member[open + 1..member.len() - 1];
                let mut next = prefix.to_vec();
                next.extend(head);
                walk(&next, inner, out);
            } else {
                let (path, alias) = match member.split_once(" as ") {
                    Some((p, a)) => (p, Some(a)),
                    None => (member, None),
                };
                let mut full = prefix.to_vec();
                full.extend(path.split("::").map(str::to_string));
                if full.last().is_some_and(|s| s == "self") {
                    full.pop();
                }
                let bound = alias
                    .map(str::to_string)
                    .or_else(|| full.last().cloned())
                    .unwrap_or_default();
                out.push((full, bound));
            }
        }
    }
    walk(&[], &tree, &mut out);
    out
}

/// Every `use` statement of a file's code: (is it `pub`/`pub(crate)`, its expanded paths).
fn use_statements(code: &str) -> Vec<(bool, Vec<UsePath>)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = find_word(rest, "use") {
        let before = rest[..at].trim_end();
        let public = before.ends_with("pub") || before.ends_with("pub(crate)");
        let after = &rest[at + 3..];
        let end = after.find(';').unwrap_or(after.len());
        out.push((public, expand_use_tree(&after[..end])));
        rest = &after[end..];
    }
    out
}

/// The byte offset of `word` standing alone (not inside an identifier) in `text`.
fn find_word(text: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = text[from..].find(word) {
        let at = from + i;
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        if !ident(before) && !ident(after) {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// The source tree, read once: each module's file and code.
struct Tree {
    files: std::collections::BTreeMap<Vec<String>, (PathBuf, String)>,
}

impl Tree {
    fn read(src: &Path) -> Tree {
        let mut paths = Vec::new();
        rust_files(src, &mut paths);
        let files = paths
            .into_iter()
            .map(|p| {
                let mut code = code_only(&std::fs::read_to_string(&p).unwrap());
                // A file's unit tests (its last item, by the crate's convention) are not
                // part of the library's structure.
                if let Some(at) = code.find("#[cfg(test)]\nmod tests") {
                    code.truncate(at);
                }
                (module_of(src, &p), (p, code))
            })
            .collect();
        Tree { files }
    }

    /// The module (with a file) that `path` names at its longest, and the rest of the path.
    fn split<'p>(&self, path: &'p [String]) -> (Vec<String>, &'p [String]) {
        for n in (0..=path.len()).rev() {
            if self.files.contains_key(&path[..n]) {
                return (path[..n].to_vec(), &path[n..]);
            }
        }
        (Vec::new(), path)
    }

    /// An absolute path for `path` as written in module `module` (`crate::`, `super::`,
    /// `self::`, or a child module's name); `None` for paths outside the crate.
    fn absolute(&self, module: &[String], path: &[String]) -> Option<Vec<String>> {
        let first = path.first()?;
        match first.as_str() {
            "crate" => Some(path[1..].to_vec()),
            "self" => Some([module, &path[1..]].concat()),
            "super" => {
                let mut base = module.to_vec();
                let mut rest = path;
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
                Some([base.as_slice(), rest].concat())
            }
            child => {
                let mut candidate = module.to_vec();
                candidate.push(child.to_string());
                self.files
                    .contains_key(&candidate)
                    .then(|| [module, path].concat())
            }
        }
    }

    /// The file that defines what absolute `path` names, following re-exports.
    fn resolve(&self, path: &[String], depth: usize) -> Option<Vec<String>> {
        if depth > 16 {
            return None;
        }
        let (module, rest) = self.split(path);
        let Some(item) = rest.first() else {
            return Some(module);
        };
        let code = &self.files.get(&module)?.1;
        for (_, paths) in use_statements(code) {
            for (target, bound) in paths {
                if bound == "*" {
                    continue;
                }
                if &bound == item {
                    let Some(abs) = self.absolute(&module, &target) else {
                        continue;
                    };
                    return self.resolve(&[abs.as_slice(), &rest[1..]].concat(), depth + 1);
                }
            }
        }
        // Not re-exported by name: defined here, or reached through a glob.
        let defines = [
            "struct",
            "enum",
            "fn",
            "trait",
            "type",
            "const",
            "static",
            "macro_rules!",
        ]
        .iter()
        .any(|kw| {
            code.match_indices(kw).any(|(at, _)| {
                code[at + kw.len()..]
                    .trim_start()
                    .strip_prefix(item.as_str())
                    .is_some_and(|r| !r.starts_with(|c: char| c.is_alphanumeric() || c == '_'))
            })
        });
        if defines {
            return Some(module);
        }
        // An inline module (`pub mod prelude { … }`): its items are looked up in this file.
        if find_word(code, "mod").is_some()
            && code.contains(&format!("mod {item} {{"))
            && rest.len() > 1
        {
            return self.resolve(&[module.as_slice(), &rest[1..]].concat(), depth + 1);
        }
        for (_, paths) in use_statements(code) {
            for (target, bound) in paths {
                if bound == "*" {
                    let mut glob = target.clone();
                    glob.pop();
                    if let Some(abs) = self.absolute(&module, &glob) {
                        let full = [abs.as_slice(), rest].concat();
                        if let Some(found) = self.resolve(&full, depth + 1)
                            && found != module
                        {
                            return Some(found);
                        }
                    }
                }
            }
        }
        Some(module)
    }

    /// Every path a module's code names: its `use`s, and `crate::`/`super::`/child-module
    /// paths written inline.
    fn paths_used(&self, module: &[String]) -> Vec<Vec<String>> {
        let code = &self.files[module].1;
        let mut out: Vec<Vec<String>> = use_statements(code)
            .into_iter()
            .flat_map(|(_, paths)| paths.into_iter().map(|(p, _)| p))
            // A glob names no item in particular.
            .filter(|p| p.last().is_some_and(|s| s != "*"))
            .collect();
        let children: Vec<String> = self
            .files
            .keys()
            .filter(|k| k.len() == module.len() + 1 && k.starts_with(module))
            .map(|k| k.last().unwrap().clone())
            .collect();
        let chars: Vec<char> = code.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            if chars[i].is_alphabetic()
                && !prev_is_ident(&chars, i)
                && (i == 0 || chars[i - 1] != ':')
            {
                let mut segments = Vec::new();
                let mut j = i;
                loop {
                    let start = j;
                    while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                        j += 1;
                    }
                    segments.push(chars[start..j].iter().collect::<String>());
                    if chars.get(j) == Some(&':') && chars.get(j + 1) == Some(&':') {
                        j += 2;
                        if !chars.get(j).is_some_and(|c| c.is_alphabetic() || *c == '_') {
                            break;
                        }
                    } else {
                        break;
                    }
                }
                let head = segments[0].as_str();
                // `crate::a::{…}` is a use group, already expanded above.
                let group = chars.get(j) == Some(&'{');
                if segments.len() > 1
                    && !group
                    && (head == "crate" || head == "super" || children.iter().any(|c| c == head))
                {
                    out.push(segments);
                }
                i = j.max(i + 1);
            } else {
                i += 1;
            }
        }
        out
    }

    /// The file-level import graph: module → the modules whose items its code uses.
    fn edges(&self) -> std::collections::BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
        let mut edges = std::collections::BTreeMap::new();
        for module in self.files.keys() {
            let mut targets = BTreeSet::new();
            for path in self.paths_used(module) {
                let Some(abs) = self.absolute(module, &path) else {
                    continue;
                };
                if let Some(file) = self.resolve(&abs, 0)
                    && &file != module
                {
                    targets.insert(file);
                }
            }
            edges.insert(module.clone(), targets);
        }
        edges
    }
}

/// The strongly connected components of more than one module (Tarjan).
fn circles(
    edges: &std::collections::BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
) -> Vec<Vec<Vec<String>>> {
    struct State<'a> {
        edges: &'a std::collections::BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: std::collections::HashMap<&'a Vec<String>, (usize, usize)>,
        stack: Vec<&'a Vec<String>>,
        on_stack: std::collections::HashSet<&'a Vec<String>>,
        next: usize,
        out: Vec<Vec<Vec<String>>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Vec<String>) {
        s.index.insert(v, (s.next, s.next));
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        let edges = s.edges;
        for w in edges.get(v).into_iter().flatten() {
            let Some((w, _)) = edges.get_key_value(w) else {
                continue;
            };
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.index[w].1.min(s.index[v].1);
                s.index.get_mut(v).unwrap().1 = low;
            } else if s.on_stack.contains(w) {
                let low = s.index[w].0.min(s.index[v].1);
                s.index.get_mut(v).unwrap().1 = low;
            }
        }
        if s.index[v].0 == s.index[v].1 {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        edges,
        index: Default::default(),
        stack: Vec::new(),
        on_stack: Default::default(),
        next: 0,
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    state.out
}

fn file_name(module: &[String]) -> String {
    if module.is_empty() {
        "lib.rs".into()
    } else {
        format!("{}.rs", module.join("/"))
    }
}

#[test]
fn no_import_circles_between_files() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let tree = Tree::read(&src);
    let edges = tree.edges();
    // The graph must have been read: the plan uses the symbolic graph.
    assert!(
        edges[&vec!["graph".to_string(), "plan".to_string()]]
            .contains(&vec!["graph".to_string(), "symbolic".to_string()]),
        "the import graph misses graph/plan.rs → graph/symbolic.rs"
    );
    let found: Vec<String> = circles(&edges)
        .into_iter()
        .map(|c| {
            let names: Vec<String> = c.iter().map(|m| file_name(m)).collect();
            let detail: Vec<String> = c
                .iter()
                .map(|m| {
                    let into: Vec<String> = edges[m]
                        .iter()
                        .filter(|t| c.contains(t))
                        .map(|t| file_name(t))
                        .collect();
                    format!("  {} uses {}", file_name(m), into.join(", "))
                })
                .collect();
            format!("circle: {}\n{}", names.join(" ↔ "), detail.join("\n"))
        })
        .collect();
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn the_circle_check_follows_re_exports_and_finds_loops() {
    let mut files = std::collections::BTreeMap::new();
    let module = |s: &str| -> Vec<String> {
        s.split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect()
    };
    for (name, text) in [
        ("", "pub mod a; pub use a::{b::Thing, c::Other as Renamed};"),
        ("a", "pub mod b; pub mod c; pub use b::*;"),
        (
            "a/b",
            "use crate::a::c::helper; // crate::x::Y in a comment\npub struct Thing;",
        ),
        (
            "a/c",
            "use crate::Thing; pub fn helper() { let _ = \"crate::a::b\"; }\npub struct Other;",
        ),
    ] {
        files.insert(module(name), (PathBuf::from(name), code_only(text)));
    }
    let tree = Tree { files };
    assert_eq!(
        tree.resolve(&module("a/Thing"), 0),
        Some(module("a/b")),
        "a glob re-export"
    );
    assert_eq!(
        tree.resolve(&module("Renamed"), 0),
        Some(module("a/c")),
        "an alias"
    );
    let edges = tree.edges();
    assert_eq!(edges[&module("a/b")], BTreeSet::from([module("a/c")]));
    assert_eq!(circles(&edges), vec![vec![module("a/b"), module("a/c")]]);
}
