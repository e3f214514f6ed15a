//! `kiln spell`: list, show, define, delete and run spells on a running server.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::Subcommand;
use kiln_api::spell::{ParamType, Spell, SpellRunRequest, SpellSource};
use kiln_client::Client;
use serde_json::Value;

use crate::{parse_kv, Remote};

#[derive(Subcommand)]
pub enum SpellCommand {
    /// List the spells your team can run.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a spell's definition as JSON.
    Show {
        #[command(flatten)]
        remote: Remote,
        name: String,
    },
    /// Define (or replace) one of your team's spells from a .toml or .json file.
    Put {
        #[command(flatten)]
        remote: Remote,
        file: PathBuf,
    },
    /// Delete one of your team's spells.
    Delete {
        #[command(flatten)]
        remote: Remote,
        name: String,
    },
    /// Run a spell; prints its output and exits with its exit code.
    Run {
        #[command(flatten)]
        remote: Remote,
        name: String,
        /// An argument, NAME=VALUE (repeatable); VALUE is JSON unless the parameter
        /// is a string.
        #[arg(long = "arg", value_parser = parse_kv)]
        args: Vec<(String, String)>,
        /// Print the whole result as JSON instead.
        #[arg(long)]
        json: bool,
        /// Save the files the spell produced into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub async fn spell(cmd: SpellCommand) -> Result<()> {
    match cmd {
        SpellCommand::List { remote } => {
            let client = Client::new(&remote.url, &remote.api_key);
            println!(
                "{:<24} {:<10} {:<8} DESCRIPTION",
                "NAME", "LANGUAGE", "SOURCE"
            );
            for s in client.list_spells().await? {
                let first = s.description.lines().next().unwrap_or("");
                let source = match s.source {
                    Some(SpellSource::Builtin) => "kiln",
                    Some(SpellSource::File) => "file",
                    Some(SpellSource::Team) => "team",
                    None => "-",
                };
                let lang = serde_json::to_value(s.language)?;
                println!(
                    "{:<24} {:<10} {:<8} {first}",
                    s.name,
                    lang.as_str().unwrap_or(""),
                    source
                );
            }
            Ok(())
        }
        SpellCommand::Show { remote, name } => {
            let client = Client::new(&remote.url, &remote.api_key);
            let spell = client.get_spell(&name).await?;
            println!("{}", serde_json::to_string_pretty(&spell)?);
            Ok(())
        }
        SpellCommand::Put { remote, file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let spell: Spell = if file.extension().is_some_and(|e| e == "toml") {
                kiln_server::spells::parse_toml(&text, SpellSource::Team)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("{} is not a spell file", file.display()))?
            } else {
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a spell as JSON", file.display()))?
            };
            let client = Client::new(&remote.url, &remote.api_key);
            let spell = client
                .put_spell(&Spell {
                    source: None,
                    ..spell
                })
                .await?;
            println!("{}", spell.name);
            Ok(())
        }
        SpellCommand::Delete { remote, name } => {
            Client::new(&remote.url, &remote.api_key)
                .delete_spell(&name)
                .await?;
            Ok(())
        }
        SpellCommand::Run {
            remote,
            name,
            args,
            json,
            out,
        } => {
            let client = Client::new(&remote.url, &remote.api_key);
            let spell = client.get_spell(&name).await?;
            let args = typed_args(&spell, args)?;
            let run = client.run_spell(&name, &SpellRunRequest { args }).await?;
            if let Some(dir) = out {
                save_files(&dir, &run.files)?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&run)?);
            } else {
                print!("{}", run.stdout);
                eprint!("{}", run.stderr);
                if let Some(result) = &run.result {
                    println!("{}", serde_json::to_string_pretty(result)?);
                }
                std::io::stdout().flush()?;
                if run.timed_out {
                    bail!("the spell ran past its timeout and was stopped");
                }
            }
            std::process::exit(run.exit_code.unwrap_or(124));
        }
    }
}

/// `NAME=VALUE` pairs as the spell's parameters type them: a string parameter takes
/// VALUE as it is, any other reads it as JSON.
fn typed_args(spell: &Spell, pairs: Vec<(String, String)>) -> Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for (name, raw) in pairs {
        let kind = spell
            .parameters
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.kind);
        let value = match kind {
            Some(ParamType::String) => Value::String(raw),
            // Unknown names are sent as they are: the server names the problem.
            None => serde_json::from_str(&raw).unwrap_or(Value::String(raw)),
            Some(_) => serde_json::from_str(&raw)
                .with_context(|| format!("--arg {name}: {raw:?} is not JSON"))?,
        };
        out.insert(name, value);
    }
    Ok(out)
}

fn save_files(dir: &std::path::Path, files: &[kiln_api::spell::SpellFile]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for f in files {
        let Some(data) = &f.base64 else {
            eprintln!("{}: {} bytes, too large to be returned", f.path, f.size);
            continue;
        };
        // The server's names come from the sandbox: keep them inside `dir`.
        let name: PathBuf = f
            .path
            .split('/')
            .filter(|c| !c.is_empty() && *c != "." && *c != "..")
            .collect();
        if name.as_os_str().is_empty() {
            continue;
        }
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .with_context(|| format!("{}: bad base64 from the server", f.path))?;
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("saved {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::spell::{SpellLanguage, SpellParam};

    #[test]
    fn arguments_take_their_parameters_types() {
        let p = |name: &str, kind| SpellParam {
            name: name.into(),
            kind,
            description: String::new(),
            default: None,
        };
        let spell = Spell {
            name: "s".into(),
            description: String::new(),
            language: SpellLanguage::Bash,
            code: "true".into(),
            template: None,
            parameters: vec![p("text", ParamType::String), p("n", ParamType::Integer)],
            timeout_secs: None,
            memory_mb: None,
            internet: false,
            packages: vec![],
            source: None,
        };
        let got = typed_args(
            &spell,
            vec![("text".into(), "42".into()), ("n".into(), "42".into())],
        )
        .unwrap();
        assert_eq!(got["text"], Value::String("42".into()));
        assert_eq!(got["n"], Value::from(42));
        assert!(typed_args(&spell, vec![("n".into(), "forty".into())]).is_err());
    }
}
