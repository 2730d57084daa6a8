//! The plan as text for people: one line per action, then notes, then a summary line.

use super::Plan;

/// Stable, greppable text. Golden tests compare it byte for byte.
pub fn render_text(plan: &Plan) -> String {
    let mut out = String::new();
    for action in &plan.network {
        out.push_str(&action.line());
        out.push('\n');
    }
    for action in &plan.actions {
        out.push_str(&action.line());
        out.push('\n');
    }
    for held in &plan.held {
        out.push_str(&held.line());
        out.push('\n');
    }
    for note in &plan.notes {
        out.push_str(&note.line());
        out.push('\n');
    }
    let n = plan.len();
    let held = match plan.held.len() {
        0 => String::new(),
        h => format!(", {h} held"),
    };
    if n == 0 && held.is_empty() {
        out.push_str("in sync: nothing to do\n");
    } else {
        out.push_str(&format!("{n} action{} planned{held}\n", if n == 1 { "" } else { "s" }));
    }
    out
}
