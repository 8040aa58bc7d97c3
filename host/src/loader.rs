//! Plugin discovery and loading.
//!
//! Loading goes through abi_stable's layout checker, with two Recall-specific rules
//! (DESIGN.md section 2):
//! - each library is initialised through its own `LibHeader`, never `RootModule::load_from_file`,
//!   which caches one module per interface type and would return the first plugin of a kind
//!   for every later one;
//! - when the stock check fails with a layout error, the check is run the other way round
//!   (the plugin's layout as the interface, the host's as the implementation). An OLDER plugin
//!   whose tables are a prefix of the host's passes it and is loaded without the stock check;
//!   real breaks fail both checks.
//!
//! Errors are one readable paragraph; abi_stable's full layout dump is kept in
//! [`LoadError::detail`] for `--verbose`.

use std::path::{Path, PathBuf};

use abi_stable::abi_stability::abi_checking::check_layout_compatibility;
use abi_stable::library::{lib_header_from_path, IsLayoutChecked, LibraryError, RootModule};
use abi_stable::StableAbi;
use recall_sdk::abi::{PluginModuleRef, ABI_VERSION};

/// File name suffix of shared libraries on this platform.
pub const DYLIB_SUFFIX: &str = std::env::consts::DLL_SUFFIX;

/// A plugin module loaded into the process (libraries are never unloaded).
#[derive(Clone)]
pub struct LoadedPlugin {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub description: String,
    pub kind: &'static str,
    /// The recall-sdk version the plugin was built against.
    pub sdk_version: String,
    pub module: PluginModuleRef,
}

/// Why a library could not be loaded as a plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadErrorKind {
    #[error("cannot open {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("{path} is not a Recall plugin: {reason}")]
    NotAPlugin { path: PathBuf, reason: String },
    #[error(
        "plugin {path} was built with recall-sdk {plugin_sdk}, but this recall speaks plugin ABI {host_sdk} \
         and the two are incompatible ({what}); rebuild the plugin against recall-sdk {host_sdk} \
         (`cargo build --release` in the plugin's crate after updating its recall-sdk dependency)"
    )]
    Incompatible { path: PathBuf, plugin_sdk: String, host_sdk: String, what: String },
    #[error("plugin {path} failed to initialise: {reason}")]
    Init { path: PathBuf, reason: String },
}

/// A load failure: a one-paragraph message and the raw abi_stable detail.
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct LoadError {
    pub kind: LoadErrorKind,
    /// abi_stable's full report (can be ~1,000 lines); shown only with `--verbose`.
    pub detail: Option<String>,
}

impl LoadError {
    fn new(kind: LoadErrorKind, detail: Option<String>) -> Self {
        LoadError { kind, detail }
    }
}

/// Load one plugin library.
pub fn load_plugin(path: &Path) -> Result<LoadedPlugin, LoadError> {
    let path_buf = path.to_path_buf();
    if let Err(e) = std::fs::metadata(path) {
        return Err(LoadError::new(LoadErrorKind::Open { path: path_buf, reason: e.to_string() }, None));
    }
    // dlopen maps the file's segments; touching one past the end of a truncated file is a
    // SIGBUS that kills the host with no message. So the headers are read first.
    check_library_file(path)
        .map_err(|reason| LoadError::new(LoadErrorKind::NotAPlugin { path: path_buf.clone(), reason }, None))?;
    let header = lib_header_from_path(path).map_err(|e| match e {
        LibraryError::OpenError { err, .. } => {
            LoadError::new(LoadErrorKind::Open { path: path_buf.clone(), reason: err.to_string() }, None)
        }
        LibraryError::GetSymbolError { .. } => LoadError::new(
            LoadErrorKind::NotAPlugin {
                path: path_buf.clone(),
                reason: "it exports no abi_stable root module (was it built with recall_sdk::export_plugin!?)".into(),
            },
            Some(e.to_string()),
        ),
        other => LoadError::new(
            LoadErrorKind::NotAPlugin { path: path_buf.clone(), reason: "its abi_stable header is unreadable".into() },
            Some(other.to_string()),
        ),
    })?;
    let consts = header.root_mod_consts();
    let plugin_sdk = consts.version_strings().version.as_str().to_string();
    if consts.base_name().as_str() != <PluginModuleRef as RootModule>::BASE_NAME {
        return Err(LoadError::new(
            LoadErrorKind::NotAPlugin {
                path: path_buf,
                reason: format!("it is an abi_stable library for `{}`, not a Recall plugin", consts.base_name()),
            },
            None,
        ));
    }
    let incompatible = |what: String, detail: Option<String>| {
        LoadError::new(
            LoadErrorKind::Incompatible {
                path: path_buf.clone(),
                plugin_sdk: plugin_sdk.clone(),
                host_sdk: ABI_VERSION.into(),
                what,
            },
            detail,
        )
    };
    seed_layout_registry();
    let module = match header.init_root_module::<PluginModuleRef>() {
        Ok(m) => m,
        Err(LibraryError::AbiInstability(stock)) => {
            let IsLayoutChecked::Yes(plugin_layout) = consts.layout() else {
                return Err(incompatible("its layout cannot be checked".into(), Some(stock.to_string())));
            };
            // The plugin may be older than the host: its tables are then a prefix of ours.
            match check_layout_compatibility(plugin_layout, <PluginModuleRef as StableAbi>::LAYOUT) {
                // SAFETY: the reversed check proved the plugin's root module layout is a prefix
                // of the host's; prefix-type accessors for fields the plugin lacks return None.
                Ok(()) => {
                    unsafe { header.init_root_module_with_unchecked_layout::<PluginModuleRef>() }.map_err(|e| {
                        LoadError::new(
                            LoadErrorKind::Init { path: path_buf.clone(), reason: first_line(&e) },
                            Some(e.to_string()),
                        )
                    })?
                }
                Err(reversed) => {
                    return Err(incompatible(
                        "the layouts of their plugin tables differ".into(),
                        Some(format!("{stock}\n--- reversed check ---\n{reversed}")),
                    ))
                }
            }
        }
        Err(e @ LibraryError::IncompatibleVersionNumber { .. }) => {
            return Err(incompatible("different major versions".into(), Some(e.to_string())))
        }
        Err(e @ LibraryError::InvalidAbiHeader(_)) | Err(e @ LibraryError::InvalidCAbi { .. }) => {
            return Err(incompatible("different abi_stable or C ABI".into(), Some(e.to_string())))
        }
        Err(e) => {
            return Err(LoadError::new(
                LoadErrorKind::Init { path: path_buf, reason: first_line(&e) },
                Some(e.to_string()),
            ))
        }
    };
    let info = (module.info())();
    Ok(LoadedPlugin {
        path: path.to_path_buf(),
        name: info.name.to_string(),
        version: info.version.to_string(),
        description: info.description.to_string(),
        kind: module.kind_name(),
        sdk_version: info.sdk_version.to_string(),
        module,
    })
}

/// abi_stable keeps one process-wide record of each prefix type's longest layout seen, and
/// checks every later library against it. Were an older plugin (shorter tables) checked
/// first, that record would be its tables, and every plugin of the host's own version loaded
/// after it would be refused. Checking the host's tables against themselves first makes the
/// record the host's own.
fn seed_layout_registry() {
    static SEEDED: std::sync::Once = std::sync::Once::new();
    SEEDED.call_once(|| {
        let host = <PluginModuleRef as StableAbi>::LAYOUT;
        check_layout_compatibility(host, host).expect("the host's plugin tables are compatible with themselves");
    });
}

/// Check that an ELF shared library's headers parse and that the file holds every byte its
/// loadable segments map. Other formats (Mach-O, PE) are left to the platform's loader.
pub fn check_library_file(path: &Path) -> Result<(), String> {
    use object::read::elf::{FileHeader, ProgramHeader};
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let len = file.metadata().map_err(|e| format!("cannot read its size: {e}"))?.len();
    let data = object::ReadCache::new(file);
    fn segments_within<H: FileHeader>(data: &object::ReadCache<std::fs::File>, len: u64) -> Result<(), String> {
        let truncated = |what: &str| format!("the file is truncated or damaged ({what}); rebuild or reinstall it");
        let header = H::parse(data).map_err(|_| truncated("its ELF header is incomplete"))?;
        let endian = header.endian().map_err(|_| truncated("its ELF header is invalid"))?;
        let segments =
            header.program_headers(endian, data).map_err(|_| truncated("its program headers are cut off"))?;
        for ph in segments.iter().filter(|ph| ph.p_type(endian) == object::elf::PT_LOAD) {
            let (offset, size) = ph.file_range(endian);
            if offset.checked_add(size).is_none_or(|end| end > len) {
                return Err(truncated(&format!(
                    "a loadable segment spans bytes {offset}..{} of a {len}-byte file",
                    offset.saturating_add(size)
                )));
            }
        }
        header.section_headers(endian, data).map_err(|_| truncated("its section headers are cut off"))?;
        Ok(())
    }
    match object::FileKind::parse(&data) {
        Ok(object::FileKind::Elf64) => segments_within::<object::elf::FileHeader64<object::Endianness>>(&data, len),
        Ok(object::FileKind::Elf32) => segments_within::<object::elf::FileHeader32<object::Endianness>>(&data, len),
        Ok(_) if !cfg!(target_os = "linux") => Ok(()),
        _ => Err("it is not an ELF shared library".into()),
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("version", &self.version)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn first_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("unknown error").to_string()
}

/// Directories searched for plugins, in order: configured paths, `RECALL_PLUGIN_PATH`
/// (colon-separated), then the directory of the running executable and its `plugins/`
/// subdirectory (where a build or a bundle puts them). Never the current directory, unless
/// configured explicitly.
pub fn search_path(configured: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = configured.to_vec();
    if let Some(env) = std::env::var_os("RECALL_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        dirs.push(exe_dir.join("plugins"));
        // Test binaries live in target/<profile>/deps; the plugins in target/<profile>.
        if exe_dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(parent) = exe_dir.parent() {
                dirs.push(parent.to_path_buf());
            }
        }
        dirs.push(exe_dir);
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// Plugin file candidates in a directory: `*recall_plugin_*` shared libraries (cargo names a
/// plugin crate `recall-plugin-NAME` → `librecall_plugin_NAME.so`) and any other shared
/// library under a `plugins/` directory.
pub fn candidates(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let in_plugins_dir = dir.file_name().is_some_and(|n| n == "plugins");
    let mut v: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(DYLIB_SUFFIX) && (in_plugins_dir || name.contains("recall_plugin_"))
        })
        .collect();
    v.sort();
    v
}

/// The plugins found on a search path. The first plugin of a given name wins; libraries that
/// fail to load are reported, not fatal.
/// What `recall plugins` lists of a library, as a child process reports it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ProbedPlugin {
    pub name: String,
    pub kind: String,
    pub version: String,
    pub sdk_version: String,
}

impl From<&LoadedPlugin> for ProbedPlugin {
    fn from(p: &LoadedPlugin) -> Self {
        ProbedPlugin {
            name: p.name.clone(),
            kind: p.kind.into(),
            version: p.version.clone(),
            sdk_version: p.sdk_version.clone(),
        }
    }
}

/// Load `lib` in a child process (`recall_exe probe-plugin LIB`), so a library that crashes
/// its loader is reported as broken instead of taking the caller down with it.
pub fn probe_in_child(recall_exe: &Path, lib: &Path) -> Result<ProbedPlugin, String> {
    let out = std::process::Command::new(recall_exe)
        .arg("probe-plugin")
        .arg(lib)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot start {} to probe it: {e}", recall_exe.display()))?;
    if out.status.success() {
        return serde_json::from_slice(&out.stdout).map_err(|e| format!("the probe's report is unreadable: {e}"));
    }
    #[cfg(unix)]
    if let Some(sig) = std::os::unix::process::ExitStatusExt::signal(&out.status) {
        return Err(format!(
            "loading it crashed the process (signal {sig}); the file is damaged: rebuild or remove it"
        ));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(err.trim().trim_start_matches("error: ").to_string())
}

#[derive(Default)]
pub struct Registry {
    pub plugins: Vec<LoadedPlugin>,
    pub failures: Vec<(PathBuf, LoadError)>,
    /// The directories searched, in order (for the message when a plugin is not found).
    pub searched: Vec<PathBuf>,
}

impl Registry {
    pub fn discover(dirs: &[PathBuf]) -> Registry {
        let mut reg = Registry { searched: dirs.to_vec(), ..Registry::default() };
        reg.load_all(dirs.iter().flat_map(|d| candidates(d)));
        reg
    }

    /// Load what an experiment names: the libraries called after those plugins
    /// (`librecall_plugin_NAME`) first, and the rest of the search path only when a name is
    /// not found that way, so an unrelated broken file on the path is never opened.
    pub fn discover_named(dirs: &[PathBuf], names: &[&str]) -> Registry {
        let files =
            |n: &str| format!("{}recall_plugin_{}{DYLIB_SUFFIX}", std::env::consts::DLL_PREFIX, n.replace('-', "_"));
        let wanted: Vec<String> = names.iter().map(|n| files(n)).collect();
        let (named, rest): (Vec<PathBuf>, Vec<PathBuf>) = dirs
            .iter()
            .flat_map(|d| candidates(d))
            .partition(|p| p.file_name().and_then(|f| f.to_str()).is_some_and(|f| wanted.iter().any(|w| w == f)));
        let mut reg = Registry { searched: dirs.to_vec(), ..Registry::default() };
        reg.load_all(named);
        if names.iter().any(|n| !reg.plugins.iter().any(|p| p.name == *n)) {
            reg.load_all(rest);
        }
        reg
    }

    /// Load each library; the first plugin of a name wins, failures are kept.
    fn load_all(&mut self, paths: impl IntoIterator<Item = PathBuf>) {
        for path in paths {
            match load_plugin(&path) {
                Ok(p) => {
                    if !self.plugins.iter().any(|q| q.name == p.name) {
                        self.plugins.push(p);
                    }
                }
                Err(e) => self.failures.push((path, e)),
            }
        }
    }

    /// The plugin called `name` of kind `kind`, or an error listing the available ones.
    pub fn get(&self, name: &str, kind: &str) -> Result<&LoadedPlugin, String> {
        match self.plugins.iter().find(|p| p.name == name) {
            Some(p) if p.kind == kind => Ok(p),
            Some(p) => Err(format!("plugin `{name}` is a {} plugin, but a {kind} is needed here", p.kind)),
            None => {
                let available: Vec<&str> =
                    self.plugins.iter().filter(|p| p.kind == kind).map(|p| p.name.as_str()).collect();
                let mut msg = format!(
                    "unknown {kind} plugin `{name}`; available {kind} plugins: {}",
                    if available.is_empty() { "none".to_string() } else { available.join(", ") }
                );
                let owned: Vec<String> = available.iter().map(|s| s.to_string()).collect();
                if let Some(best) = recall_sdk::config::nearest(name, &owned) {
                    msg.push_str(&format!("; did you mean `{best}`?"));
                }
                if !self.failures.is_empty() {
                    msg.push_str(&format!(
                        " ({} libraries on the plugin path failed to load; run `recall plugins` to see why)",
                        self.failures.len()
                    ));
                }
                let file =
                    format!("{}recall_plugin_{}{DYLIB_SUFFIX}", std::env::consts::DLL_PREFIX, name.replace('-', "_"));
                let dirs: Vec<String> = self.searched.iter().map(|d| d.display().to_string()).collect();
                msg.push_str(&format!(
                    ". Searched: {}. A plugin is a library named {file} (a crate `recall-plugin-{name}`, built with \
                     `cargo build --release`); put its directory in `[plugins] search_path`, `--plugin-path DIR` or \
                     RECALL_PLUGIN_PATH (colon-separated), or copy the library next to the `recall` binary",
                    if dirs.is_empty() { "nothing".to_string() } else { dirs.join(", ") }
                ));
                Err(msg)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_elf_file_is_refused_before_it_is_mapped() {
        // The test executable is an ELF file like any plugin library.
        let whole = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lib.so");
        std::fs::write(&p, &whole).unwrap();
        check_library_file(&p).unwrap();
        for len in [0, 16, 64, 4096, whole.len() / 2, whole.len() - 1] {
            std::fs::write(&p, &whole[..len]).unwrap();
            let e = check_library_file(&p).unwrap_err();
            assert!(e.contains("truncated or damaged") || e.contains("not an ELF"), "{len} bytes: {e}");
        }
        std::fs::write(&p, b"#!/bin/sh\necho not a library\n").unwrap();
        assert_eq!(check_library_file(&p).unwrap_err(), "it is not an ELF shared library");
    }
}
