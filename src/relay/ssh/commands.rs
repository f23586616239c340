//! What an exec request would run, as the shell would split it, so `blocked_commands`
//! sees each command rather than one string: `true; rm -rf /`, `x && rm  -rf /`,
//! `echo $(rm -rf /)`, `sudo rm -rf /` and `"rm" -rf /` all contain the command
//! `rm -rf /`.
//!
//! This is a guard rail, not a sandbox: a script file, `eval` of a variable, an
//! interpreter (`python -c`) or an alias is not looked into. The README says so.

/// Words that run the command after them: `sudo rm -rf /` is checked as `rm -rf /` too.
const WRAPPERS: &[&str] = &[
    "sudo", "doas", "env", "exec", "command", "nohup", "time", "nice", "builtin", "xargs",
];

/// Each simple command in `line`, its words unquoted and joined by one space, with
/// leading `NAME=value` assignments dropped. Text inside `$(…)`, backticks, `(…)` and
/// the string given to `sh -c`/`bash -c` is split the same way, recursively.
pub fn simple_commands(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    split(line, &mut out, 0);
    out
}

/// Stands for text nested too deeply to follow: it matches every pattern.
const TOO_DEEP: &str = "\u{0}too deep";

/// Why `line` is refused: the first pattern any of its commands matches, or that it
/// nests too deeply to check (fail closed). None when `patterns` is empty.
pub fn blocked_by(patterns: &[String], line: &str) -> Option<String> {
    if patterns.is_empty() {
        return None;
    }
    if line.len() > MAX_LINE {
        return Some("(too long to check)".into());
    }
    let commands = simple_commands(line);
    if commands.iter().any(|c| c == TOO_DEEP) {
        return Some("(nested too deeply to check)".into());
    }
    patterns
        .iter()
        .find(|p| commands.iter().any(|c| glob_match(p, c)))
        .cloned()
}

/// `*` matches any run of characters, `?` one; everything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// The longest exec command checked; a longer one is refused.
const MAX_LINE: usize = 64 * 1024;

/// How deep `sh -c "sh -c '…'"` and `$( $( … ) )` are followed.
const MAX_DEPTH: usize = 8;

fn split(line: &str, out: &mut Vec<String>, depth: usize) {
    if depth > MAX_DEPTH || out.len() > MAX_COMMANDS {
        out.push(TOO_DEEP.into());
        return;
    }
    let chars: Vec<char> = line.chars().collect();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut i = 0;
    let end_command = |words: &mut Vec<String>, out: &mut Vec<String>| {
        finish(std::mem::take(words), out, depth);
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if i + 1 < chars.len() => {
                word.push(chars[i + 1]);
                in_word = true;
                i += 2;
                continue;
            }
            '\'' => {
                let close = chars[i + 1..].iter().position(|&x| x == '\'');
                let stop = close.map_or(chars.len(), |p| i + 1 + p);
                word.extend(&chars[i + 1..stop]);
                in_word = true;
                i = stop + 1;
                continue;
            }
            '"' => {
                let mut j = i + 1;
                while j < chars.len() && chars[j] != '"' {
                    if chars[j] == '\\' && j + 1 < chars.len() {
                        word.push(chars[j + 1]);
                        j += 2;
                        continue;
                    }
                    if chars[j] == '$' && chars.get(j + 1) == Some(&'(') {
                        let (inner, next) = balanced(&chars, j + 2);
                        split(&inner, out, depth + 1);
                        j = next;
                        continue;
                    }
                    if chars[j] == '`' {
                        let (inner, next) = backticked(&chars, j + 1);
                        split(&inner, out, depth + 1);
                        j = next;
                        continue;
                    }
                    word.push(chars[j]);
                    j += 1;
                }
                in_word = true;
                i = j + 1;
                continue;
            }
            '$' if chars.get(i + 1) == Some(&'(') => {
                let (inner, next) = balanced(&chars, i + 2);
                split(&inner, out, depth + 1);
                in_word = true;
                i = next;
                continue;
            }
            '`' => {
                let (inner, next) = backticked(&chars, i + 1);
                split(&inner, out, depth + 1);
                in_word = true;
                i = next;
                continue;
            }
            // Process substitution: `cat <(rm -rf /)`.
            '<' | '>' if chars.get(i + 1) == Some(&'(') => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                let (inner, next) = balanced(&chars, i + 2);
                split(&inner, out, depth + 1);
                i = next;
                continue;
            }
            '(' | '{' if !in_word => {
                let (inner, next) = if c == '(' {
                    balanced(&chars, i + 1)
                } else {
                    braced(&chars, i + 1)
                };
                split(&inner, out, depth + 1);
                i = next;
                continue;
            }
            ';' | '&' | '|' | '\n' | ')' | '}' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                end_command(&mut words, out);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '#' if !in_word => {
                // A comment runs to the end of the line.
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
        i += 1;
    }
    if in_word {
        words.push(word);
    }
    end_command(&mut words, out);
}

/// Shell words that come before a command without being it.
const KEYWORDS: &[&str] = &["!", "if", "then", "else", "elif", "do", "while", "until"];

/// Most commands one line may hold before it counts as too complex to check.
const MAX_COMMANDS: usize = 10_000;

/// Records one simple command, and what it wraps or hands to a shell.
fn finish(words: Vec<String>, out: &mut Vec<String>, depth: usize) {
    if depth > MAX_DEPTH || out.len() > MAX_COMMANDS {
        out.push(TOO_DEEP.into());
        return;
    }
    let rest = strip_prefixes(&words);
    if rest.is_empty() {
        return;
    }
    record(rest, out, depth);
    // `sudo -u root env X=1 rm -rf /`: past each wrapper and its options. An option's
    // value is not the command, so the next few starts all count.
    let mut rest = rest;
    let mut wrappers = 0;
    while let Some(first) = rest.first()
        && WRAPPERS.contains(&program(first))
    {
        wrappers += 1;
        if wrappers > MAX_WRAPPERS {
            out.push(TOO_DEEP.into());
            return;
        }
        rest = &rest[1..];
        let options = rest
            .iter()
            .take_while(|w| w.starts_with('-') || w.contains('='))
            .count();
        for k in options..(options + 4).min(rest.len()) {
            let inner = strip_prefixes(&rest[k..]);
            if !inner.is_empty() {
                record(inner, out, depth);
            }
        }
        rest = &rest[options..];
    }
}

/// Wrappers one command may stack (`sudo env nice …`) before it is refused.
const MAX_WRAPPERS: usize = 16;

/// `/bin/rm` is `rm`.
fn program(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

/// Drops leading `NAME=value` assignments, shell keywords and redirections.
fn strip_prefixes(words: &[String]) -> &[String] {
    let mut rest = words;
    while let Some(w) = rest.first() {
        let assignment = w.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        let redirect_op = w.trim_start_matches(|c: char| c.is_ascii_digit());
        if assignment || KEYWORDS.contains(&w.as_str()) {
            rest = &rest[1..];
        } else if matches!(redirect_op, ">" | ">>" | "<" | "<<" | "<<<" | ">|") {
            // `> file rm …`: the operator and its file.
            rest = rest.get(2..).unwrap_or(&[]);
        } else if redirect_op.starts_with(['>', '<']) {
            rest = &rest[1..];
        } else {
            break;
        }
    }
    rest
}

/// One command as written and with its program's path dropped; a shell's `-c` string
/// is split too.
fn record(rest: &[String], out: &mut Vec<String>, depth: usize) {
    out.push(rest.join(" "));
    let name = program(&rest[0]);
    if name != rest[0] {
        let mut short = vec![name.to_string()];
        short.extend(rest[1..].iter().cloned());
        out.push(short.join(" "));
    }
    if matches!(name, "sh" | "bash" | "dash" | "zsh" | "ksh" | "ash")
        && let Some(pos) = rest.iter().position(|w| w == "-c")
        && let Some(script) = rest.get(pos + 1)
    {
        split(script, out, depth + 1);
    }
}

/// The text up to the `)` that closes one already opened at `start - 1`, and the index
/// after it.
fn balanced(chars: &[char], start: usize) -> (String, usize) {
    closing(chars, start, '(', ')')
}

fn braced(chars: &[char], start: usize) -> (String, usize) {
    closing(chars, start, '{', '}')
}

/// Quoted brackets do not count: in `(echo ")"; rm -rf /)` the group ends at the end.
fn closing(chars: &[char], start: usize, open: char, close: char) -> (String, usize) {
    let mut level = 1;
    let mut quote: Option<char> = None;
    let mut j = start;
    while j < chars.len() {
        let c = chars[j];
        match quote {
            Some(q) if c == q => quote = None,
            Some('"') if c == '\\' => j += 1,
            Some(_) => {}
            None if c == '\\' => j += 1,
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == open => level += 1,
            None if c == close => {
                level -= 1;
                if level == 0 {
                    return (chars[start..j].iter().collect(), j + 1);
                }
            }
            None => {}
        }
        j += 1;
    }
    (chars[start..].iter().collect(), chars.len())
}

fn backticked(chars: &[char], start: usize) -> (String, usize) {
    match chars[start..].iter().position(|&c| c == '`') {
        Some(p) => (chars[start..start + p].iter().collect(), start + p + 1),
        None => (chars[start..].iter().collect(), chars.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("rm -rf *", "rm -rf /"));
        assert!(glob_match("shutdown*", "shutdown -h now"));
        assert!(!glob_match("rm -rf *", "ls"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
    }

    fn blocked(line: &str) -> bool {
        let patterns = vec!["rm -rf *".to_string(), "shutdown*".to_string()];
        blocked_by(&patterns, line).is_some()
    }

    #[test]
    fn the_blocked_command_is_found_wherever_the_shell_would_run_it() {
        for line in [
            "rm -rf /",
            "true; rm -rf /",
            "true && rm -rf /tmp/x",
            "false || rm -rf /",
            "echo hi | rm -rf /",
            "sleep 1 & rm -rf /",
            "true\nrm -rf /",
            "rm   -rf   /",
            "\t rm -rf /",
            "\"rm\" '-rf' /",
            "r\\m -rf /",
            "echo $(rm -rf /)",
            "echo \"$(rm -rf /)\"",
            "echo `rm -rf /`",
            "(rm -rf /)",
            "{ rm -rf /; }",
            "FOO=1 rm -rf /",
            "sudo rm -rf /",
            "sudo -u root rm -rf /",
            "env X=1 rm -rf /",
            "sh -c 'rm -rf /'",
            "/bin/bash -c \"true; rm -rf /\"",
            "bash -c \"sh -c 'rm -rf /'\"",
            "nohup shutdown -h now",
            "shutdown",
            "/bin/rm -rf /",
            "/sbin/shutdown now",
            "! rm -rf /",
            "if rm -rf /; then :; fi",
            ">/dev/null rm -rf /",
            "> /dev/null rm -rf /",
            "2>/dev/null rm -rf /",
            "(echo \")\"; rm -rf /)",
            "cat <(rm -rf /)",
            "sudo -u root -g wheel rm -rf /",
            "sudo env X=1 nice -n 5 rm -rf /",
        ] {
            assert!(blocked(line), "not blocked: {line:?}");
        }
    }

    #[test]
    fn other_commands_pass() {
        for line in [
            "ls -la",
            "echo 'rm -rf /'",
            "echo rm -rf /",
            "grep shutdown /var/log/syslog",
            "# rm -rf /",
            "uptime; df -h",
            "",
        ] {
            assert!(!blocked(line), "blocked: {line:?}");
        }
    }

    #[test]
    fn malformed_input_neither_panics_nor_hides_a_command() {
        for line in [
            "rm -rf / '",
            "echo \"unterminated",
            "$(",
            "`",
            "((((",
            "\\",
            "{",
        ] {
            let _ = simple_commands(line);
        }
        assert!(blocked("rm -rf / 'unterminated"));
        let deep = format!("{}rm -rf /{}", "$(".repeat(50), ")".repeat(50));
        assert!(blocked(&deep));
        // Stacked wrappers give a bounded number of candidates (this once grew
        // exponentially), and the command at the end is still found.
        let wrapped = format!("{}ls", "sudo ".repeat(2000));
        assert!(simple_commands(&wrapped).len() < 100);
        assert!(blocked(&wrapped), "too many wrappers to follow is refused");
        assert!(blocked(&format!("{}rm -rf /", "sudo ".repeat(12))));
        assert!(blocked(&"x".repeat(MAX_LINE + 1)));
    }
}
