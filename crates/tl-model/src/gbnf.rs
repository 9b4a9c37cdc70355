//! llama.cpp's GBNF grammars translated to llguidance's Lark syntax.
//!
//! GBNF: `name ::= alternatives` rules (a rule runs until the next
//! `name ::=`), `"literals"` and `[character classes]` with llama.cpp's
//! escapes (`\n \r \t \\ \" \] \- \xHH \uHHHH \UHHHHHHHH`), `.` for any
//! character, `( )` groups, `|`, the postfix `* + ? {m} {m,} {m,n}`, and
//! `#` comments; the start rule is `root`. Rule names become `g_<name>`
//! (lowercase, `-` → `_`, numbered if that collides), literals JSON-quoted
//! strings, classes and `.` regular expressions with every non-alphanumeric
//! character written as `\x{..}`.

use std::collections::HashMap;

/// Translates a GBNF grammar; an error names the line and what is wrong.
pub fn to_lark(src: &str) -> Result<String, String> {
    let toks = lex(src)?;
    // Rules: NAME ::= … up to the next NAME ::=.
    let mut rules: Vec<(String, usize, Vec<Tok>)> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let (line, t) = (toks[i].line, &toks[i].tok);
        let name = match t {
            T::Name(n) if matches!(toks.get(i + 1).map(|t| &t.tok), Some(T::Def)) => n.clone(),
            _ => {
                return Err(format!(
                    "line {line}: expected `name ::=`, found {}",
                    t.show()
                ))
            }
        };
        let mut j = i + 2;
        while j < toks.len()
            && !(matches!(toks[j].tok, T::Name(_))
                && matches!(toks.get(j + 1).map(|t| &t.tok), Some(T::Def)))
        {
            j += 1;
        }
        if j == i + 2 {
            return Err(format!("line {line}: rule `{name}` is empty"));
        }
        rules.push((name, line, toks[i + 2..j].to_vec()));
        i = j;
    }
    if !rules.iter().any(|r| r.0 == "root") {
        return Err("the grammar has no `root` rule".into());
    }
    // Lark names for the GBNF names.
    let mut names: HashMap<String, String> = HashMap::new();
    let mut used: HashMap<String, usize> = HashMap::new();
    for (n, line, _) in &rules {
        if names.contains_key(n) {
            return Err(format!("line {line}: rule `{n}` is defined twice"));
        }
        let base: String = format!(
            "g_{}",
            n.chars()
                .map(|c| if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                })
                .collect::<String>()
        );
        let k = used.entry(base.clone()).or_insert(0);
        *k += 1;
        let lark = if *k == 1 { base } else { format!("{base}_{k}") };
        names.insert(n.clone(), lark);
    }
    let mut out = format!("start: {}\n", names["root"]);
    for (n, line, body) in &rules {
        let mut s = String::new();
        let mut depth = 0i32;
        for t in body {
            let piece = match &t.tok {
                T::Name(r) => names
                    .get(r)
                    .cloned()
                    .ok_or_else(|| format!("line {}: rule `{r}` is not defined", t.line))?,
                T::Def => return Err(format!("line {}: unexpected `::=`", t.line)),
                T::Lit(v) => {
                    if v.is_empty() {
                        "\"\"".to_string()
                    } else {
                        serde_json::to_string(v).map_err(|e| e.to_string())?
                    }
                }
                T::Class(neg, items) => class_regex(*neg, items),
                T::Any => "/(?s:.)/".to_string(),
                T::Open => {
                    depth += 1;
                    "(".into()
                }
                T::Close => {
                    depth -= 1;
                    if depth < 0 {
                        return Err(format!("line {}: unbalanced `)`", t.line));
                    }
                    ")".into()
                }
                T::Bar => "|".into(),
                T::Op(c) => c.to_string(),
                T::Rep(a, b) => match b {
                    Some(b) if Some(*b) == Some(*a) => format!("{{{a}}}"),
                    Some(b) => format!("{{{a},{b}}}"),
                    None => format!("{{{a},}}"),
                },
            };
            // Postfix operators attach to what precedes them.
            if !s.is_empty()
                && !s.ends_with('(')
                && !matches!(t.tok, T::Op(_) | T::Rep(..) | T::Close)
            {
                s.push(' ');
            }
            s.push_str(&piece);
        }
        if depth != 0 {
            return Err(format!("line {line}: rule `{n}` has an unclosed `(`"));
        }
        out.push_str(&format!("{}: {}\n", names[n], s));
    }
    Ok(out)
}

#[derive(Clone, Debug)]
enum T {
    Name(String),
    Def,
    Lit(String),
    /// Negated, and (first, last) code point ranges.
    Class(bool, Vec<(char, char)>),
    Any,
    Open,
    Close,
    Bar,
    Op(char),
    Rep(usize, Option<usize>),
}

impl T {
    fn show(&self) -> String {
        match self {
            T::Name(n) => format!("`{n}`"),
            T::Def => "`::=`".into(),
            T::Lit(l) => format!("{l:?}"),
            T::Class(..) => "a character class".into(),
            T::Any => "`.`".into(),
            T::Open => "`(`".into(),
            T::Close => "`)`".into(),
            T::Bar => "`|`".into(),
            T::Op(c) => format!("`{c}`"),
            T::Rep(..) => "a repetition".into(),
        }
    }
}

#[derive(Clone, Debug)]
struct Tok {
    tok: T,
    line: usize,
}

fn class_regex(neg: bool, items: &[(char, char)]) -> String {
    let esc = |c: char| {
        if c.is_ascii_alphanumeric() {
            c.to_string()
        } else {
            format!("\\x{{{:x}}}", c as u32)
        }
    };
    let mut s = String::from("/[");
    if neg {
        s.push('^');
    }
    for &(a, b) in items {
        s.push_str(&esc(a));
        if b != a {
            s.push('-');
            s.push_str(&esc(b));
        }
    }
    s.push_str("]/");
    s
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let cs: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0usize, 1usize);
    while i < cs.len() {
        let c = cs[i];
        let start_line = line;
        let push = |out: &mut Vec<Tok>, tok| {
            out.push(Tok {
                tok,
                line: start_line,
            })
        };
        match c {
            '\n' => {
                line += 1;
                i += 1;
            }
            c if c.is_whitespace() => i += 1,
            '#' => {
                while i < cs.len() && cs[i] != '\n' {
                    i += 1;
                }
            }
            ':' if cs.get(i + 1) == Some(&':') && cs.get(i + 2) == Some(&'=') => {
                push(&mut out, T::Def);
                i += 3;
            }
            '"' => {
                i += 1;
                let mut s = String::new();
                loop {
                    let Some(&c) = cs.get(i) else {
                        return Err(format!("line {start_line}: unterminated string"));
                    };
                    match c {
                        '"' => {
                            i += 1;
                            break;
                        }
                        '\\' => {
                            let (ch, n) = escape(&cs, i, start_line)?;
                            s.push(ch);
                            i += n;
                        }
                        '\n' => return Err(format!("line {start_line}: newline in a string")),
                        c => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                push(&mut out, T::Lit(s));
            }
            '[' => {
                i += 1;
                let neg = cs.get(i) == Some(&'^');
                if neg {
                    i += 1;
                }
                let mut items = Vec::new();
                loop {
                    let Some(&c) = cs.get(i) else {
                        return Err(format!("line {start_line}: unterminated character class"));
                    };
                    if c == ']' {
                        i += 1;
                        break;
                    }
                    let (a, n) = class_char(&cs, i, start_line)?;
                    i += n;
                    if cs.get(i) == Some(&'-') && cs.get(i + 1).is_some_and(|&c| c != ']') {
                        let (b, n) = class_char(&cs, i + 1, start_line)?;
                        if b < a {
                            return Err(format!(
                                "line {start_line}: character range {a:?}-{b:?} is reversed"
                            ));
                        }
                        items.push((a, b));
                        i += 1 + n;
                    } else {
                        items.push((a, a));
                    }
                }
                if items.is_empty() && !neg {
                    return Err(format!("line {start_line}: empty character class"));
                }
                push(&mut out, T::Class(neg, items));
            }
            '.' => {
                push(&mut out, T::Any);
                i += 1;
            }
            '(' => {
                push(&mut out, T::Open);
                i += 1;
            }
            ')' => {
                push(&mut out, T::Close);
                i += 1;
            }
            '|' => {
                push(&mut out, T::Bar);
                i += 1;
            }
            '*' | '+' | '?' => {
                push(&mut out, T::Op(c));
                i += 1;
            }
            '{' => {
                let end = cs[i..]
                    .iter()
                    .position(|&c| c == '}')
                    .ok_or(format!("line {start_line}: unterminated `{{`"))?;
                let body: String = cs[i + 1..i + end].iter().collect();
                let num = |s: &str| {
                    s.trim()
                        .parse::<usize>()
                        .map_err(|_| format!("line {start_line}: bad repetition {{{body}}}"))
                };
                let rep = match body.split_once(',') {
                    None => {
                        let n = num(&body)?;
                        T::Rep(n, Some(n))
                    }
                    Some((a, b)) if b.trim().is_empty() => T::Rep(num(a)?, None),
                    Some((a, b)) => {
                        let (a, b) = (num(a)?, num(b)?);
                        if b < a {
                            return Err(format!("line {start_line}: bad repetition {{{body}}}"));
                        }
                        T::Rep(a, Some(b))
                    }
                };
                push(&mut out, rep);
                i += end + 1;
            }
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => {
                let mut n = String::new();
                while i < cs.len()
                    && (cs[i].is_ascii_alphanumeric() || cs[i] == '-' || cs[i] == '_')
                {
                    n.push(cs[i]);
                    i += 1;
                }
                push(&mut out, T::Name(n));
            }
            c => return Err(format!("line {start_line}: unexpected character {c:?}")),
        }
    }
    Ok(out)
}

/// A character of a class (escapes included): the char and its length.
fn class_char(cs: &[char], i: usize, line: usize) -> Result<(char, usize), String> {
    match cs[i] {
        '\\' => escape(cs, i, line),
        '\n' => Err(format!("line {line}: newline in a character class")),
        c => Ok((c, 1)),
    }
}

/// The escape at `cs[i]` (a backslash): the char and its length.
fn escape(cs: &[char], i: usize, line: usize) -> Result<(char, usize), String> {
    let Some(&e) = cs.get(i + 1) else {
        return Err(format!("line {line}: trailing backslash"));
    };
    let hex = |n: usize| -> Result<(char, usize), String> {
        let h: String = cs
            .get(i + 2..i + 2 + n)
            .map(|s| s.iter().collect())
            .unwrap_or_default();
        u32::from_str_radix(&h, 16)
            .ok()
            .filter(|_| h.len() == n)
            .and_then(char::from_u32)
            .map(|c| (c, 2 + n))
            .ok_or(format!("line {line}: bad escape \\{e}{h}"))
    };
    match e {
        'n' => Ok(('\n', 2)),
        'r' => Ok(('\r', 2)),
        't' => Ok(('\t', 2)),
        'x' => hex(2),
        'u' => hex(4),
        'U' => hex(8),
        '\\' | '"' | '[' | ']' | '-' | '^' | '/' => Ok((e, 2)),
        _ => Err(format!("line {line}: unknown escape \\{e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::to_lark;

    #[test]
    fn translates_rules_literals_classes_and_repetitions() {
        let g = "# a comment\nroot ::= \"a\\n\" item-list?\nitem-list ::= ([0-9a-f] | [^\\]x])+ ws{2,3}\nws ::= [ \\t]*\n";
        let l = to_lark(g).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            l,
            "start: g_root\ng_root: \"a\\n\" g_item_list?\n\
             g_item_list: (/[0-9a-f]/ | /[^\\x{5d}x]/)+ g_ws{2,3}\n\
             g_ws: /[\\x{20}\\x{9}]/*\n"
        );
    }

    #[test]
    fn errors_name_the_line() {
        for (g, want) in [
            ("root ::= foo", "rule `foo` is not defined"),
            ("root ::= \"a", "line 1: unterminated string"),
            ("root ::= \"a\"\nx ::= [z-a]", "line 2: character range"),
            ("item ::= \"a\"", "no `root` rule"),
            ("root ::= (\"a\"", "unclosed `(`"),
            ("root ::= \"a\" {3,1}", "bad repetition"),
            ("root ::= \"\\q\"", "unknown escape"),
        ] {
            let e = to_lark(g).err().unwrap_or_default();
            assert!(e.contains(want), "{g:?}: {e}");
        }
    }
}
