//! The README's "Embedding" section shows this crate's files: each code block after a
//! `<!-- examples/host/PATH -->` line must be that file, byte for byte (the Cargo.toml block:
//! its `[dependencies]` section, with the path of a checkout beside the host for this one).
//! So the section cannot drift from code that compiles and passes the smoke test.

use std::path::Path;

const README: &str = include_str!("../../../README.md");
const MARKER: &str = "<!-- examples/host/";

/// Each `(path, block)` the README marks.
fn marked_blocks() -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut rest = README;
    while let Some(at) = rest.find(MARKER) {
        rest = &rest[at + MARKER.len()..];
        let (path, after) = rest
            .split_once(" -->\n")
            .expect("a marker ends with ' -->'");
        let after = after
            .strip_prefix("```")
            .expect("a code block follows its marker");
        let (_, body) = after.split_once('\n').expect("a fence line");
        let end = body.find("\n```\n").expect("the code block ends") + 1;
        blocks.push((path.to_string(), body[..end].to_string()));
        rest = &body[end..];
    }
    blocks
}

#[test]
fn the_readme_shows_this_crate_as_it_is() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let blocks = marked_blocks();
    let paths: Vec<&str> = blocks.iter().map(|(p, _)| p.as_str()).collect();
    for required in [
        "Cargo.toml",
        "Rocket.toml",
        "src/lib.rs",
        "src/main.rs",
        "templates/index.html.tera",
    ] {
        assert!(
            paths.contains(&required),
            "the README shows {required} ({paths:?})"
        );
    }
    for (path, block) in blocks {
        let file =
            std::fs::read_to_string(root.join(&path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        let expected = if path == "Cargo.toml" {
            let start = file
                .find("[dependencies]")
                .expect("a [dependencies] section");
            let end = file[start..]
                .find("\n\n")
                .map_or(file.len(), |e| start + e + 1);
            file[start..end].replace(
                r#"{ path = "../.." }"#,
                r#"{ path = "../stored-messages" }"#,
            )
        } else {
            file
        };
        assert_eq!(
            block, expected,
            "the README's copy of examples/host/{path} differs from the file"
        );
    }
}
