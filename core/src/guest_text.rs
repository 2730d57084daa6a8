//! Text a guest wrote (serial console output, guest-agent strings) is data, not ours: before it
//! reaches status, logs, events, hook environments or the Cockpit page it is bounded, stripped
//! of terminal escapes and control characters, and shown marked as the guest's.

/// Longest console excerpt kept, in characters.
pub const CONSOLE_EXCERPT: usize = 160;
/// Longest guest-agent word (an interface name) kept, in characters.
pub const AGENT_WORD: usize = 32;

/// `text` without terminal escape sequences (CSI, OSC, DCS/SOS/PM/APC strings, two-byte ESC
/// sequences), control characters (C0, DEL, C1) and bidirectional overrides; runs of whitespace
/// become one space; at most `max` characters (an ellipsis marks a cut).
pub fn clean(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 4));
    let mut count = 0usize;
    let mut chars = text.chars().peekable();
    let mut space = false;
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => skip_escape(&mut chars),
            // 8-bit CSI and OSC introducers.
            '\u{9b}' => skip_csi(&mut chars),
            '\u{9d}' | '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}' => skip_string(&mut chars),
            c if c.is_whitespace() => space = count > 0,
            c if c.is_control() || is_bidi_control(c) => {}
            c => {
                if space {
                    if count + 1 >= max {
                        out.push('…');
                        return out;
                    }
                    out.push(' ');
                    count += 1;
                    space = false;
                }
                if count + 1 >= max && chars.peek().is_some() {
                    out.push('…');
                    return out;
                }
                out.push(c);
                count += 1;
            }
        }
    }
    out
}

/// One guest-supplied word (an interface name): cleaned and bounded.
pub fn guest_word(text: &str, max: usize) -> String {
    let w = clean(text, max);
    if w.is_empty() {
        "(unnamed)".into()
    } else {
        w
    }
}

/// A console excerpt as shown to people: `guest console: "…"`.
pub fn console_excerpt(line: &str) -> String {
    format!("guest console: \"{}\"", clean(line, CONSOLE_EXCERPT).replace('"', "'"))
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn skip_escape(chars: &mut std::iter::Peekable<std::str::Chars>) {
    match chars.next() {
        Some('[') => skip_csi(chars),
        Some(']' | 'P' | 'X' | '^' | '_') => skip_string(chars),
        // Intermediate bytes then one final byte (e.g. `ESC ( B`).
        Some(c) if ('\u{20}'..='\u{2f}').contains(&c) => {
            while let Some(&n) = chars.peek() {
                chars.next();
                if !('\u{20}'..='\u{2f}').contains(&n) {
                    break;
                }
            }
        }
        _ => {}
    }
}

/// Parameters and intermediates up to the final byte (0x40–0x7e).
fn skip_csi(chars: &mut std::iter::Peekable<std::str::Chars>) {
    for c in chars.by_ref() {
        if ('\u{40}'..='\u{7e}').contains(&c) {
            break;
        }
    }
}

/// Up to BEL or ST (`ESC \` or 0x9c).
fn skip_string(chars: &mut std::iter::Peekable<std::str::Chars>) {
    while let Some(c) = chars.next() {
        match c {
            '\u{7}' | '\u{9c}' => break,
            '\u{1b}' => {
                if chars.peek() == Some(&'\\') {
                    chars.next();
                }
                break;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_control_characters_are_stripped() {
        assert_eq!(clean("\u{1b}[31mNo bootable\u{1b}[0m device.\r\n", 80), "No bootable device.");
        assert_eq!(clean("a\u{1b}]0;owned title\u{7}b", 80), "ab");
        assert_eq!(clean("a\u{1b}]8;;http://x\u{1b}\\link\u{1b}]8;;\u{1b}\\b", 80), "alinkb");
        assert_eq!(clean("a\u{1b}Pq#0;2;0;0;0\u{1b}\\b\u{1b}(Bc\u{1b}7d", 80), "abcd");
        assert_eq!(clean("x\u{9b}2Jy\u{8}\u{7f}\u{0}z\u{202e}w", 80), "xyzw");
        assert_eq!(clean("  many \t\n\r spaces  ", 80), "many spaces");
        assert_eq!(clean("VIRTWARDEN_X=1\nrm -rf /", 80), "VIRTWARDEN_X=1 rm -rf /");
    }

    #[test]
    fn long_text_is_cut_with_a_mark_at_the_bound() {
        let long = "y".repeat(1 << 20);
        let c = clean(&long, 160);
        assert_eq!(c.chars().count(), 160);
        assert!(c.ends_with('…'));
        assert_eq!(clean("exactly", 7), "exactly");
        assert_eq!(clean("exactly8", 7), "exactl…");
        assert_eq!(guest_word("\u{1b}[0m", 16), "(unnamed)");
        assert_eq!(console_excerpt("say \"hi\"\u{1b}[2J"), "guest console: \"say 'hi'\"");
    }
}
