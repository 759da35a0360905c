//! Which context names a page's templates look inside, found once per (re)load from Tera's
//! parsed templates. [`super::Page`] keeps a deferred stream's stand-in (see
//! [`super::stream`]) under a name only when no template the page renders looks inside it.
//!
//! A name is only *counted* where a template uses it as
//! - `name | length` (then any further filters: they see a number),
//! - `name | stored_messages_stream_partial`,
//! - a condition, alone or under `and`, `or` and `not` (`{% if name %}`),
//! - `name is defined` or `name is undefined`.
//!
//! Every other use (printing it, a loop over it, a field, a comparison, an argument, another
//! filter, `{% set x = name %}`) looks inside, and so does `__tera_context`, which prints
//! the whole context. The templates a page renders are its own, its parents' and every
//! template any of them includes or imports macros from, followed to the end. A name that
//! also names something else (`{% set name = … %}`, a loop variable) is judged by all its
//! uses together: a wrong guess can only cost the deferral, never change what a page shows.

use std::collections::{HashMap, HashSet};

use rocket_dyn_templates::tera::ast::{Expr, ExprVal, LogicOperator, Node};
use rocket_dyn_templates::tera::Tera;

use super::stream;

/// For each template, what the pages rendered from it look inside.
#[derive(Debug, Default)]
pub(crate) struct Uses {
    by_template: HashMap<String, Looked>,
}

#[derive(Debug, Default)]
struct Looked {
    /// `__tera_context`: everything.
    all: bool,
    /// The names (their first part: `m` of `m.id`) used in other ways than counting.
    names: HashSet<String>,
}

impl Uses {
    /// Reads every template of `tera`.
    pub(crate) fn of(tera: &Tera) -> Uses {
        let own: HashMap<&str, Own> = tera
            .templates
            .iter()
            .map(|(name, template)| {
                let mut walk = Own::default();
                walk.nodes(&template.ast);
                walk.includes.extend(template.parents.iter().cloned());
                // Macros see only their arguments, but reading them too costs nothing.
                walk.includes.extend(
                    template
                        .imported_macro_files
                        .iter()
                        .map(|(file, _)| file.clone()),
                );
                (name.as_str(), walk)
            })
            .collect();
        let by_template = own
            .keys()
            .map(|name| {
                let mut looked = Looked::default();
                let mut seen = HashSet::new();
                let mut todo = vec![*name];
                while let Some(name) = todo.pop() {
                    if !seen.insert(name) {
                        continue;
                    }
                    // A missing include fails the render itself (or is skipped by
                    // `ignore missing`): nothing to read.
                    let Some(walk) = own.get(name) else { continue };
                    looked.all |= walk.all;
                    looked.names.extend(walk.names.iter().cloned());
                    todo.extend(walk.includes.iter().map(String::as_str));
                }
                (name.to_string(), looked)
            })
            .collect();
        Uses { by_template }
    }

    /// Whether rendering `template` only counts what the context holds under `name`.
    pub(crate) fn only_counts(&self, template: &str, name: &str) -> bool {
        self.by_template
            .get(template)
            .is_some_and(|looked| !looked.all && !looked.names.contains(name))
    }
}

/// What one template's own text uses.
#[derive(Default)]
struct Own {
    all: bool,
    names: HashSet<String>,
    /// Included templates, parents and macro files.
    includes: Vec<String>,
}

/// Where an expression stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Tested for truth only.
    Condition,
    /// Its value is used.
    Value,
}

impl Own {
    fn nodes(&mut self, nodes: &[Node]) {
        for node in nodes {
            self.node(node);
        }
    }

    fn node(&mut self, node: &Node) {
        match node {
            Node::VariableBlock(_, expr) => self.expr(expr, Position::Value),
            Node::MacroDefinition(_, definition, _) => {
                for default in definition.args.values().flatten() {
                    self.expr(default, Position::Value);
                }
                self.nodes(&definition.body);
            }
            Node::Include(_, names, _) => self.includes.extend(names.iter().cloned()),
            Node::Set(_, set) => self.expr(&set.value, Position::Value),
            Node::FilterSection(_, section, _) => {
                for arg in section.filter.args.values() {
                    self.expr(arg, Position::Value);
                }
                self.nodes(&section.body);
            }
            Node::Block(_, block, _) => self.nodes(&block.body),
            Node::Forloop(_, forloop, _) => {
                self.expr(&forloop.container, Position::Value);
                self.nodes(&forloop.body);
                if let Some(body) = &forloop.empty_body {
                    self.nodes(body);
                }
            }
            Node::If(branches, _) => {
                for (_, condition, body) in &branches.conditions {
                    self.expr(condition, Position::Condition);
                    self.nodes(body);
                }
                if let Some((_, body)) = &branches.otherwise {
                    self.nodes(body);
                }
            }
            Node::Super
            | Node::Text(_)
            | Node::Extends(..)
            | Node::ImportMacro(..)
            | Node::Raw(..)
            | Node::Break(_)
            | Node::Continue(_)
            | Node::Comment(..) => {}
        }
    }

    fn expr(&mut self, expr: &Expr, position: Position) {
        for filter in &expr.filters {
            for arg in filter.args.values() {
                self.expr(arg, Position::Value);
            }
        }
        match &expr.val {
            ExprVal::Ident(ident) => {
                let counted = match expr.filters.first() {
                    Some(first) => {
                        (first.name == "length" || first.name == stream::FILTER)
                            && first.args.is_empty()
                    }
                    None => position == Position::Condition,
                };
                // `m.id`, `m[0]`: a look inside whatever the filters.
                if !counted || ident.contains(['.', '[']) {
                    self.looks_at(ident);
                }
            }
            ExprVal::Logic(logic) => {
                let position = match logic.operator {
                    LogicOperator::And | LogicOperator::Or => position,
                    _ => Position::Value,
                };
                self.expr(&logic.lhs, position);
                self.expr(&logic.rhs, position);
            }
            ExprVal::Math(math) => {
                self.expr(&math.lhs, Position::Value);
                self.expr(&math.rhs, Position::Value);
            }
            ExprVal::Test(test) => {
                if test.name != "defined" && test.name != "undefined" {
                    self.looks_at(&test.ident);
                }
                for arg in &test.args {
                    self.expr(arg, Position::Value);
                }
            }
            ExprVal::MacroCall(call) => {
                for arg in call.args.values() {
                    self.expr(arg, Position::Value);
                }
            }
            ExprVal::FunctionCall(call) => {
                for arg in call.args.values() {
                    self.expr(arg, Position::Value);
                }
            }
            ExprVal::Array(items) => {
                for item in items {
                    self.expr(item, Position::Value);
                }
            }
            ExprVal::StringConcat(concat) => {
                for value in &concat.values {
                    if let ExprVal::Ident(ident) = value {
                        self.looks_at(ident);
                    }
                }
            }
            ExprVal::In(contains) => {
                self.expr(&contains.lhs, Position::Value);
                self.expr(&contains.rhs, Position::Value);
            }
            ExprVal::String(_) | ExprVal::Int(_) | ExprVal::Float(_) | ExprVal::Bool(_) => {}
        }
    }

    fn looks_at(&mut self, ident: &str) {
        let root = ident.split(['.', '[']).next().unwrap_or(ident);
        if root == "__tera_context" {
            self.all = true;
        } else {
            self.names.insert(root.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uses(templates: &[(&str, &str)]) -> Uses {
        let mut tera = Tera::default();
        tera.add_raw_templates(templates.to_vec()).unwrap();
        Uses::of(&tera)
    }

    fn counts(body: &str) -> bool {
        uses(&[("page", body)]).only_counts("page", "messages")
    }

    #[test]
    fn counting_uses_keep_the_stand_in() {
        for body in [
            "",
            "{{ other.field }}",
            "{% if messages %}x{% endif %}",
            "{% if not messages or x %}x{% elif y and messages %}{% endif %}",
            "{{ messages | length }}",
            "{% if messages | length == 0 %}none{% endif %}",
            "{{ messages | length | plus(n=1) }}",
            "{{ messages | stored_messages_stream_partial }}",
            "{% if messages is defined %}x{% endif %}",
            "{% if messages is undefined %}x{% endif %}",
            "{% set n = messages | length %}{{ n }}",
        ] {
            assert!(counts(body), "{body}");
        }
    }

    #[test]
    fn looking_inside_needs_the_json() {
        for body in [
            "{{ messages }}",
            "{{ messages.0.message }}",
            "{{ messages[0].message }}",
            "{% if messages.0 %}x{% endif %}",
            "{% for m in messages %}{{ m.message }}{% endfor %}",
            "{{ messages | first }}",
            "{{ messages | json_encode }}",
            "{{ messages | length(x=1) }}",
            "{% if messages == other %}x{% endif %}",
            "{% if messages is iterable %}x{% endif %}",
            "{% set m = messages %}",
            "{{ f(x=messages) }}",
            "{{ 'a' ~ messages }}",
            "{% if 'x' in messages %}x{% endif %}",
            "{{ [messages] | length }}",
            "{% filter upper %}{{ messages }}{% endfilter %}",
            "{{ __tera_context }}",
        ] {
            assert!(!counts(body), "{body}");
        }
    }

    #[test]
    fn includes_and_parents_count_too() {
        let uses = uses(&[
            (
                "base",
                "<main>{% block body %}{% endblock %}</main>{% include \"list\" %}",
            ),
            ("list", "{% for m in messages %}{{ m }}{% endfor %}"),
            ("plain", "{% include \"count\" %}"),
            ("count", "{{ messages | length }}"),
            (
                "child",
                "{% extends \"base\" %}{% block body %}{{ messages | length }}{% endblock %}",
            ),
            (
                "nested",
                "{% include \"child\" ignore missing %}{% include \"gone\" ignore missing %}",
            ),
        ]);
        assert!(!uses.only_counts("child", "messages"));
        assert!(!uses.only_counts("nested", "messages"));
        assert!(uses.only_counts("plain", "messages"));
        assert!(uses.only_counts("child", "other"));
        assert!(!uses.only_counts("unknown", "messages"));
    }
}
