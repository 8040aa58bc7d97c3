//! `recall new strategy NAME`: an out-of-tree strategy crate that depends on recall-sdk only,
//! builds, and passes `recall check-plugin` as generated.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

const CARGO_TOML: &str = include_str!("../templates/strategy/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("../templates/strategy/lib.rs.tmpl");

/// The recall-sdk sources this binary was built with, if they are still there.
pub fn default_sdk_path() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    p.join("Cargo.toml").is_file().then(|| p.canonicalize().unwrap_or(p))
}

/// Write a strategy crate for plugin `name` into `dir` (which must not exist or be empty).
pub fn new_strategy(name: &str, dir: &Path, sdk: &Path) -> anyhow::Result<()> {
    if name.is_empty()
        || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        || name.starts_with('-')
    {
        bail!("plugin name `{name}` must be lower-case letters, digits and dashes (e.g. `my-ewc`)");
    }
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} exists and is not empty; choose another --dir", dir.display());
    }
    if !sdk.join("Cargo.toml").is_file() {
        bail!("{} is not the recall-sdk crate (no Cargo.toml); pass --sdk PATH/TO/recall/sdk", sdk.display());
    }
    let krate = format!("recall-plugin-{name}");
    let sdk = sdk.canonicalize().with_context(|| format!("cannot resolve {}", sdk.display()))?;
    let fill = |t: &str| {
        t.replace("{{crate}}", &krate)
            .replace("{{lib}}", &krate.replace('-', "_"))
            .replace("{{name}}", name)
            .replace("{{sdk_path}}", &sdk.display().to_string())
    };
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::fsutil::write_atomic(&dir.join("Cargo.toml"), fill(CARGO_TOML).as_bytes())?;
    crate::fsutil::write_atomic(&dir.join("src/lib.rs"), fill(LIB_RS).as_bytes())?;
    crate::fsutil::write_atomic(&dir.join(".gitignore"), b"/target\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_directories_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let sdk = default_sdk_path().unwrap();
        assert!(new_strategy("Bad_Name", &tmp.path().join("x"), &sdk).is_err());
        std::fs::write(tmp.path().join("taken"), "x").unwrap();
        assert!(new_strategy("ok", tmp.path(), &sdk).unwrap_err().to_string().contains("not empty"));
        new_strategy("my-reg", &tmp.path().join("my-reg"), &sdk).unwrap();
        let lib = std::fs::read_to_string(tmp.path().join("my-reg/src/lib.rs")).unwrap();
        assert!(lib.contains("name: \"my-reg\"") && !lib.contains("{{"));
    }
}
