//! The floor rule of docs/architecture.md, checked: a folder of `src/` may use the crate's
//! own paths (`crate::…`) only from the floors below it. Fails naming the file, the line and
//! the floor it reaches up to. Only code counts: comments and doc links are skipped (they
//! create no dependency).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What each floor may use, besides itself. The bottom (`error`, `device`, `support`,
/// `profile`) is open to every floor above it.
fn allowed(floor: &str) -> &'static [&'static str] {
    const BOTTOM: [&str; 4] = ["error", "device", "support", "profile"];
    match floor {
        "error" | "device" | "support" | "profile" => &["error"],
        "graph" => &BOTTOM,
        "ops" => &BOTTOM,
        "layers" => &["error", "device", "support", "profile", "graph", "ops"],
        "models" => &["error", "device", "support", "profile", "graph", "layers"],
        "data" => &[
            "error", "device", "support", "profile", "graph", "ops", "layers", "models",
        ],
        "train" => &[
            "error", "device", "support", "profile", "graph", "ops", "layers", "models", "data",
        ],
        other => panic!("a floor that docs/architecture.md does not name: {other}"),
    }
}

/// The floor an item re-exported at the crate root comes from.
fn root_item(name: &str) -> &'static str {
    match name {
        "Error" | "Result" => "error",
        "select_device" | "keep_freed_gpu_memory" => "device",
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
