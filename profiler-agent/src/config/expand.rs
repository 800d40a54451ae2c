//! `${VAR}` expansion in string values of the config file, so that secrets and per-node
//! values (the node name from the downward API) come from the environment. `${VAR:-default}`
//! gives a default; `$$` is a literal `$`. An unset variable without a default is an error
//! naming the field, never a silent empty string. `relabel` rules are left alone: their
//! `replacement` templates use the same `${1}` syntax for regex groups.

/// A string value that could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandError {
    pub field: String,
    pub reason: String,
}

/// Expands every string in `table` (recursively), naming fields from `prefix`.
pub fn expand_table(
    table: &mut toml::Table,
    prefix: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ExpandError> {
    for (key, value) in table.iter_mut() {
        if prefix.is_empty() && key == "relabel" {
            // Relabel replacements are `$1`/`${1}` templates of their own.
            continue;
        }
        let field = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        expand_value(value, &field, env)?;
    }
    Ok(())
}

fn expand_value(
    value: &mut toml::Value,
    field: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ExpandError> {
    match value {
        toml::Value::String(s) => {
            *s = expand_str(s, env).map_err(|reason| ExpandError {
                field: field.to_owned(),
                reason,
            })?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_value(item, &format!("{field}[{i}]"), env)?;
            }
        }
        toml::Value::Table(table) => expand_table(table, field, env)?,
        _ => {}
    }
    Ok(())
}

/// Expands one string.
pub fn expand_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
            let spec = &body[..end];
            let (name, default) = match spec.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (spec, None),
            };
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("invalid variable name {name:?}"));
            }
            match env(name)
                .filter(|v| !v.is_empty())
                .or(default.map(str::to_owned))
            {
                Some(value) => out.push_str(&value),
                None => return Err(format!("environment variable {name} is not set")),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}
